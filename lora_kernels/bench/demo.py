"""``lora-bench demo``: a three-layer model of :class:`lora_kernels.nn.LoRALinear` layers serving one batch in
which every token picks its own adapter (ranks 4, 8, 16 and 8; some tokens use none), checked against the fp32
reference :func:`lora_kernels.reference.lora_delta` layer by layer.

Runs on the GPU when there is one (bf16), else on the CPU (fp32, the reference backend; no Triton interpreter
needed). Deterministic (seed 0), well under a second on a CPU. Exit status 0 when the check passes, 1 when not.
"""

from __future__ import annotations

import sys
import time
from typing import List

import torch

__all__ = ["add_arguments", "run"]

_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}  # x max(1, max|ref|)


def add_arguments(p) -> None:
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--hidden", type=int, default=64, help="width of every layer (default 64)")
    p.add_argument("--tokens", type=int, default=16, help="tokens in the batch (default 16)")
    p.add_argument("--layers", type=int, default=3, help="LoRALinear layers (default 3)")
    p.add_argument("--seed", type=int, default=0)


def _reference_model(layers, acts, x: torch.Tensor, ids: torch.Tensor, with_lora: bool) -> torch.Tensor:
    """The model in fp32, layer by layer: ``h = base(h) + lora_delta(h, weights, ids)`` (then the activation)."""
    import lora_kernels as lk

    h = x.float()
    for layer, act in zip(layers, acts):
        base = layer.base
        out = h @ base.weight.float().t() + (base.bias.float() if base.bias is not None else 0.0)
        if with_lora:
            out = out + lk.reference.lora_delta(h, layer.weights, ids)
        h = act(out) if act is not None else out
    return h


def run(args) -> int:
    from torch import nn

    import lora_kernels as lk

    t_start = time.perf_counter()
    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    H, T, L = args.hidden, args.tokens, args.layers
    ranks = [4, 8, 16, 8]
    N = len(ranks) + 1  # one slot stays free
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    layers: List[nn.Module] = []
    for _ in range(L):
        base = nn.Linear(H, H, bias=True)
        with torch.no_grad():
            base.weight.copy_(torch.randn(H, H, generator=g) / H**0.5)
            base.bias.copy_(torch.randn(H, generator=g) * 0.1)
        base = base.to(device=device, dtype=dtype)
        w = lk.LoRAWeights(H, H, max_adapters=N, max_rank=max(ranks), dtype=dtype, device=device)
        for r in ranks:
            A = torch.randn(r, H, generator=g) / H**0.5
            B = torch.randn(H, r, generator=g) / r**0.5  # not zero (PEFT's init): the demo shows a delta
            w.add(A.to(device, dtype), B.to(device, dtype), alpha=2.0 * r)
        layers.append(lk.nn.LoRALinear(base, w))
    acts = [nn.GELU() if i < L - 1 else None for i in range(L)]
    model = nn.Sequential(*[m for pair in zip(layers, acts) for m in pair if m is not None]).eval()

    # Every adapter appears; about a fifth of the tokens use none.
    ids = torch.arange(T, dtype=torch.int64) % len(ranks)
    ids[torch.rand(T, generator=g) < 0.2] = -1
    ids[: len(ranks)] = torch.arange(len(ranks))
    ids = ids[torch.randperm(T, generator=g)].to(torch.int32)
    x = torch.randn(T, H, generator=g).to(device, dtype)
    ids_dev = ids.to(device)

    backend = lk.backends.select("sgmv", device.type)
    print(f"lora-bench demo: {L} LoRALinear layers ({H} -> {H}), {len(ranks)} adapters of ranks {ranks}, "
          f"{T} tokens, {str(dtype).replace('torch.', '')} on {device.type} (backend: {backend})")
    print(f"adapter ids per token: {ids.tolist()}")

    batch = lk.LoRABatch(T, N, device).build(ids_dev, ranks=layers[0].weights.ranks)
    none_batch = lk.LoRABatch(T, N, device).build(torch.full((T,), -1, dtype=torch.int32, device=device))
    with torch.no_grad():
        with lk.use_batch(batch):
            out = model(x)
        with lk.use_batch(none_batch):
            base_out = model(x)
        ref = _reference_model(layers, acts, x, ids_dev, True)
        ref_base = _reference_model(layers, acts, x, ids_dev, False)

    outf, basef = out.float(), base_out.float()
    tol = _TOL[dtype] * max(1.0, float(ref.abs().max()))
    print(f"{'adapter':>7}  {'rank':>4}  {'tokens':>6}  {'|delta| (output - base output)':>30}  "
          f"{'max |out - reference|':>21}")
    rows_ok = True
    for i in list(range(len(ranks))) + [-1]:
        sel = (ids == i).nonzero().flatten().to(device)
        if sel.numel() == 0:
            continue
        dn = float((outf[sel] - basef[sel]).norm())
        dref = float((ref[sel] - ref_base[sel]).norm())
        err = float((outf[sel] - ref[sel]).abs().max())
        rows_ok &= err <= tol
        if i >= 0:
            print(f"{i:>7}  {ranks[i]:>4}  {sel.numel():>6}  {dn:>16.4f} (ref {dref:.4f})  {err:>21.3g}")
        else:
            untouched = bool(torch.equal(out[sel], base_out[sel]))
            print(f"{'none':>7}  {'-':>4}  {sel.numel():>6}  {dn:>16.4f} (ref 0)       {err:>21.3g}"
                  f"  ({'bit-identical to the base model' if untouched else 'NOT identical to the base model'})")
            rows_ok &= untouched
    err = float((outf - ref).abs().max())
    finite = bool(torch.isfinite(outf).all())
    ok = rows_ok and finite and err <= tol
    dt = time.perf_counter() - t_start
    print(f"check: max |out - fp32 reference| = {err:.3g} (tolerance {tol:.3g}): {'PASS' if ok else 'FAIL'} "
          f"[{dt:.2f} s]")
    if not ok:
        print("lora-bench demo: the output does not match the reference", file=sys.stderr)
    return 0 if ok else 1
