"""A toy serving loop whose traffic mix changes over time, switching between unmerged, mixed and merged modes.

A small decoder-like stack of LoRALinear layers (per block: fused q/k/v with three slices, o, up, down) holds 8
adapters of mixed ranks. Traffic goes through four phases: uniform over the 8 adapters; adapter 3 takes 80%;
all requests use adapter 3; uniform again. Before each step the scheduler hands the batch's host-side adapter
counts and the requests' waiting credit to ``ModeController.auto`` (V-LoRA's rule: merge the dominant adapter
when it holds more than half the batch and at most half the requests are starving; mixed mode while other
adapters remain; merged when all tokens use it). Each step prints the mode, the switch time, the forward time,
and checks the output against the fp32 unmerged reference with the project's tolerance rule (the same model
computed by PyTorch in the serving dtype, in the same mode, is the low-precision baseline). Exit status 1 on
a mismatch. GPU (bf16) when there is one, else the CPU (fp32).

    python python/mode_switch.py [--steps-per-phase 6] [--requests 32]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import lora_kernels as lk
from lora_kernels.nn import LoRALinear, ModeController, VLoRAPolicy

N_ADAPTERS = 8
HOT = 3
RANKS = [4, 8, 16, 32, 8, 16, 64, 4]


def build(hidden: int, kv: int, mlp: int, blocks: int, dtype, device) -> torch.nn.ModuleList:
    g = torch.Generator().manual_seed(0)

    def lin(i, o):
        m = torch.nn.Linear(i, o, bias=False)
        with torch.no_grad():
            m.weight.copy_(torch.randn(o, i, generator=g) / i ** 0.5)
        return m.to(device=device, dtype=dtype).requires_grad_(False)

    def weights(i, outs):
        outs = [outs] if isinstance(outs, int) else outs
        w = lk.LoRAWeights(i, outs, max_adapters=N_ADAPTERS, max_rank=max(RANKS), dtype=dtype, device=device)
        for r in RANKS:
            A = [torch.randn(r, i, generator=g) / i ** 0.5 for _ in outs]
            B = [torch.randn(o, r, generator=g) * 0.5 / r ** 0.5 for o in outs]
            w.add(A if len(outs) > 1 else A[0], B if len(outs) > 1 else B[0], alpha=2 * r)
        return w

    layers = torch.nn.ModuleList()
    for _ in range(blocks):
        layers.append(torch.nn.ModuleDict({
            "qkv": LoRALinear(lin(hidden, hidden + 2 * kv), weights(hidden, [hidden, kv, kv])),
            "o": LoRALinear(lin(hidden, hidden), weights(hidden, hidden)),
            "up": LoRALinear(lin(hidden, mlp), weights(hidden, mlp)),
            "down": LoRALinear(lin(mlp, hidden), weights(mlp, hidden)),
        }))
    return layers


def forward(model, x, linear):
    """The model's dataflow, with ``linear(layer, h)`` computing each LoRALinear (the module, or a simulation)."""
    for blk in model:
        hidden = blk["o"].in_features
        q, k, v = linear(blk["qkv"], x).split([hidden, *blk["qkv"].weights.slice_outs[1:]], dim=-1)
        x = x + linear(blk["o"], q * torch.sigmoid(k.mean(-1, keepdim=True)) + v.mean(-1, keepdim=True))
        x = x + linear(blk["down"], F.gelu(linear(blk["up"], x)))
    return x


def _naive_delta_(y, h, w, ids, dtype, sign=1.0):
    """``y[t, cols_s] += sign * s_i (h[t] A_i^T) B_i^T`` by a per-adapter loop in ``dtype`` (PyTorch)."""
    for i in sorted(set(ids.tolist()) - {-1}):
        rows = (ids == i).nonzero().flatten()
        for s in range(w.num_slices):
            A, B, sc = w.adapter(i, s)
            c0, n = w.slice_cols[s], w.slice_outs[s]
            d = ((h[rows] @ A.to(dtype).t()) @ B.to(dtype).t()) * sc
            y[rows, c0:c0 + n] += sign * d
    return y


def simulate(model, originals, x, ids, mode, m, dtype):
    """The model by PyTorch in ``dtype`` in ``mode``: W_eff = round(W + s_m B_m A_m) when m is merged, deltas by
    the naive loop (mixed: delta_j - delta_m). ``dtype`` fp32 + ``unmerged`` is the reference."""

    def linear(layer, h):
        w, W = layer.weights, originals[id(layer)].float()
        merged = mode != "unmerged" and m in w.loaded
        if merged:
            d = torch.zeros_like(W)
            for s in range(w.num_slices):
                A, B, sc = w.adapter(m, s)
                d[w.slice_cols[s]:w.slice_cols[s] + w.slice_outs[s]] += sc * (B.float() @ A.float())
            W = W + d
        y = F.linear(h, W.to(dtype))
        if mode == "unmerged" or (mode == "mixed" and not merged):
            _naive_delta_(y, h, w, ids, dtype)
        elif mode == "mixed":
            _naive_delta_(y, h, w, ids, dtype)
            _naive_delta_(y, h, w, torch.full_like(ids, m), dtype, sign=-1.0)
        return y

    return forward(model, x.to(dtype), linear)


def traffic(phase: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Adapter ids of ``n`` requests: 0 uniform, 1 adapter 3 at 80%, 2 all adapter 3, 3 uniform again."""
    uniform = torch.randint(0, N_ADAPTERS, (n,), generator=g, dtype=torch.int32)
    if phase == 1:
        hot = torch.rand(n, generator=g) < 0.8
        return torch.where(hot, torch.full_like(uniform, HOT), uniform)
    if phase == 2:
        return torch.full((n,), HOT, dtype=torch.int32)
    return uniform


PHASES = ("uniform", "adapter 3 at 80%", "all adapter 3", "uniform")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps-per-phase", type=int, default=6)
    ap.add_argument("--requests", type=int, default=32, help="requests per step (one decode token each)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build(args.hidden, args.hidden // 4, 2 * args.hidden, args.blocks, dtype, device)
    originals = {id(m): m.base.weight.detach().clone() for m in model.modules() if isinstance(m, LoRALinear)}
    ctl = ModeController(model)
    ctl.policy = VLoRAPolicy(dominant_fraction=0.5, starving_credit=8.0, max_starving_fraction=0.5)
    batch = lk.LoRABatch(max_tokens=args.requests, max_adapters=N_ADAPTERS, device=device)
    g = torch.Generator().manual_seed(1)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    credit = torch.zeros(args.requests)
    failures, modes_seen, step = 0, {}, 0
    print(f"{'step':>4}  {'phase':16s}  {'mode':12s}  {'switch us':>9s}  {'forward us':>10s}  "
          f"{'hot share':>9s}  {'err / allowed':>21s}")
    for phase, pname in enumerate(PHASES):
        for _ in range(args.steps_per_phase):
            ids = traffic(phase, args.requests, g)
            # Host-side inputs of the policy: what the scheduler knows without touching the device.
            counts = dict(zip(*[t.tolist() for t in torch.unique(ids, return_counts=True)]))
            credit = (credit + 1) * (torch.rand(args.requests, generator=g) < 0.5)  # served requests reset
            sync()
            t0 = time.perf_counter()
            mode, m = ctl.auto(counts, credit.tolist())
            sync()
            t_switch = (time.perf_counter() - t0) * 1e6
            x = torch.randn(args.requests, args.hidden, generator=g).to(device, dtype)
            ids_d = ids.to(device)
            batch.build(ids_d, ranks=model[0]["qkv"].weights.ranks)
            with torch.no_grad(), lk.use_batch(batch):
                sync()
                t0 = time.perf_counter()
                out = forward(model, x, lambda layer, h: layer(h))
                sync()
                t_fwd = (time.perf_counter() - t0) * 1e6
                ref = simulate(model, originals, x.float(), ids_d, "unmerged", None, torch.float32)
                lowp = simulate(model, originals, x, ids_d, mode, m, dtype)
            err = float((out.float() - ref).abs().max())
            allowed = 2 * float((lowp.float() - ref).abs().max()) + 1e-6 + \
                {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}[dtype] * float(ref.abs().max())
            ok = bool(torch.isfinite(out).all()) and err <= allowed
            failures += not ok
            label = mode if m is None else f"{mode}({m})"
            modes_seen[label] = modes_seen.get(label, 0) + 1
            print(f"{step:4d}  {pname:16s}  {label:12s}  {t_switch:9.1f}  {t_fwd:10.1f}  "
                  f"{counts.get(HOT, 0) / args.requests:9.0%}  {err:9.2e} / {allowed:9.2e}"
                  f"{'' if ok else '  MISMATCH'}")
            step += 1
    ctl.set_mode("unmerged")
    exact = all(torch.equal(m.base.weight, originals[id(m)]) for m in model.modules() if isinstance(m, LoRALinear))
    print(f"modes: {modes_seen}; weight-changing switches: {ctl.switches}; base weights bit-identical after "
          f"returning to unmerged: {exact}")
    ok = failures == 0 and exact
    print(f"{'OK' if ok else 'FAILED'}: {step - failures}/{step} steps within the tolerance rule on {device} "
          f"({str(dtype).replace('torch.', '')})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
