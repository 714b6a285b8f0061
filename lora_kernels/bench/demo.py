"""``lora-bench demo``: a three-layer model of :class:`lora_kernels.nn.LoRALinear` layers serving one batch in
which every token picks its own adapter (ranks 4, 8, 16 and 8; some tokens use none), run by the Triton kernels
and checked against the fp32 reference :func:`lora_kernels.reference.lora_delta` layer by layer.

On a GPU: bf16 (``--dtype`` to change it), the default CUDA path (Triton). Without one (or with ``--cpu``): the
same Triton kernels in Triton's CPU interpreter (``TRITON_INTERPRET=1``, fp32 by default, or fp16), so the check
is a real kernel against the reference, never the reference against itself. The interpreter must be on before
Triton decorates the kernels: the demo turns it on itself when no kernel module is loaded yet and there is no
GPU in this process, else it runs itself again in a fresh process with ``TRITON_INTERPRET=1``.

The check is the library's numerics rule (``lora_kernels.bench.measure.tolerance``): the max error against the
fp32 reference is at most twice PyTorch's error doing the same model in the demo's dtype, plus a small floor; the
allowed error must also be below half the adapters' effect on the output, so a kernel that adds nothing or adds
the delta twice cannot pass. Tokens with no adapter must be bit-identical to the base model's output.
Deterministic (seed 0), a few seconds on a CPU. Exit status 0 when the check passes, 1 when not.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import List, Optional

import torch

__all__ = ["add_arguments", "run"]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Set in the environment of the re-run process: a child that still cannot interpret stops instead of looping.
_CHILD_ENV = "LORA_KERNELS_DEMO_CHILD"


def add_arguments(p) -> None:
    p.add_argument("--cpu", action="store_true", help="run on the CPU (Triton interpreter) even when a GPU is present")
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="precision (default: bf16 on a GPU, fp32 on the CPU; bf16 needs a GPU)")
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


def _torch_delta(h: torch.Tensor, w, ids: torch.Tensor) -> torch.Tensor:
    """The LoRA delta by PyTorch in h's dtype, one adapter at a time (the yardstick of the numerics rule)."""
    out = torch.zeros(h.shape[0], w.out_features, dtype=h.dtype, device=h.device)
    for i in w.loaded:
        t = (ids == i).nonzero().flatten()
        for s in range(w.num_slices):
            A, B, sc = w.adapter(i, s)
            c0 = w.slice_cols[s]
            out[t, c0 : c0 + w.slice_outs[s]] = sc * ((h[t] @ A.to(h.dtype).t()) @ B.to(h.dtype).t())
    return out


def _torch_model(layers, acts, x: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The same model computed by PyTorch in ``dtype`` (base layer, then ``+ delta``, then the activation)."""
    h = x.to(dtype)
    for layer, act in zip(layers, acts):
        base = layer.base
        out = torch.nn.functional.linear(h, base.weight.to(dtype), None if base.bias is None else base.bias.to(dtype))
        out = out + _torch_delta(h, layer.weights, ids)
        h = act(out) if act is not None else out
    return h


# ---- running the Triton kernels on the CPU -----------------------------------------------------------------
def _kernels_interpreted() -> bool:
    """True when lora_kernels' Triton kernels and triton.language's own ``@jit`` helpers (``tl.cumsum``...) were
    decorated by the interpreter, so they run on CPU tensors."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from ..triton import sgmv

    return isinstance(sgmv._sgmv_fused_kernel, InterpretedFunction) and isinstance(tl.cumsum, InterpretedFunction)


def _cpu_triton_here() -> Optional[str]:
    """Make the Triton kernels runnable on CPU tensors in this process. None when they are; "rerun" when only a
    fresh process can (Triton already imported for the GPU, or a GPU here whose Triton use by the caller must
    not be switched to the interpreter); else why Triton cannot run at all."""
    from .. import backends

    if "triton" not in sys.modules and not backends.interpreting() and not torch.cuda.is_available():
        # Triton decorates every @jit function (its own tl.cumsum... and ours) at import: with nothing imported
        # yet and no GPU, the interpreter is the only way Triton runs in this process
        os.environ["TRITON_INTERPRET"] = "1"
    why = backends.triton_status()
    if why:
        return why
    if backends.interpreting() and _kernels_interpreted():
        return None
    return "rerun"


def _rerun_interpreted(args) -> int:
    """Run the demo again in a fresh interpreter with ``TRITON_INTERPRET=1``; returns its exit status."""
    import lora_kernels

    argv = ["--cpu", "--dtype", args.dtype, "--hidden", str(args.hidden), "--tokens", str(args.tokens),
            "--layers", str(args.layers), "--seed", str(args.seed)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(lora_kernels.__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", **{_CHILD_ENV: "1"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    print("lora-bench demo: running again with TRITON_INTERPRET=1 (Triton's CPU interpreter)", flush=True)
    return subprocess.run([sys.executable, "-m", "lora_kernels", "demo", *argv], env=env).returncode


def run(args) -> int:
    from torch import nn

    import lora_kernels as lk

    from . import measure

    t_start = time.perf_counter()
    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    dtype = _DTYPES.get(args.dtype) or (torch.bfloat16 if gpu else torch.float32)
    if not gpu:
        if dtype == torch.bfloat16:
            print("lora-bench demo: --dtype bf16 needs a GPU (the interpreter's bf16 tl.dot is unreliable); "
                  "use fp32 or fp16 on the CPU", file=sys.stderr)
            return 1
        why = _cpu_triton_here()
        if why == "rerun":
            if os.environ.get(_CHILD_ENV):
                print("lora-bench demo: Triton's interpreter did not take effect in the fresh process",
                      file=sys.stderr)
                return 1
            return _rerun_interpreted(args)
        if why is not None:
            print(f"lora-bench demo: needs Triton to check a kernel on the CPU: {why}", file=sys.stderr)
            return 1
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

    # The kernels under test: on the CPU the Triton backend is forced (the automatic choice there is the reference).
    forced = None if gpu else "triton"
    with lk.backends.use_backend(forced):
        backend = lk.backends.select("sgmv", device.type)
    where = " (Triton's CPU interpreter)" if backend == "triton" and device.type == "cpu" else ""
    print(f"lora-bench demo: {L} LoRALinear layers ({H} -> {H}), {len(ranks)} adapters of ranks {ranks}, "
          f"{T} tokens, {str(dtype).replace('torch.', '')} on {device.type} (backend: {backend}{where})")
    print(f"adapter ids per token: {ids.tolist()}")

    batch = lk.LoRABatch(T, N, device).build(ids_dev, ranks=layers[0].weights.ranks)
    none_batch = lk.LoRABatch(T, N, device).build(torch.full((T,), -1, dtype=torch.int32, device=device))
    with torch.no_grad():
        with lk.backends.use_backend(forced):
            with lk.use_batch(batch):
                out = model(x)
            with lk.use_batch(none_batch):
                base_out = model(x)
        ref = _reference_model(layers, acts, x, ids_dev, True)
        ref_base = _reference_model(layers, acts, x, ids_dev, False)
        lowp = _torch_model(layers, acts, x, ids_dev, dtype)

    outf, basef = out.float(), base_out.float()
    tol = measure.tolerance(ref, lowp, dtype)
    allowed = tol["allowed"]
    effect = float((ref - ref_base).abs().max())  # what the adapters change: a no-op kernel is off by this much
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
        rows_ok &= err <= allowed
        if i >= 0:
            print(f"{i:>7}  {ranks[i]:>4}  {sel.numel():>6}  {dn:>16.4f} (ref {dref:.4f})  {err:>21.3g}")
        else:
            untouched = bool(torch.equal(out[sel], base_out[sel]))
            print(f"{'none':>7}  {'-':>4}  {sel.numel():>6}  {dn:>16.4f} (ref 0)       {err:>21.3g}"
                  f"  ({'bit-identical to the base model' if untouched else 'NOT identical to the base model'})")
            rows_ok &= untouched
    err = float((outf - ref).abs().max())
    finite = bool(torch.isfinite(outf).all())
    sharp = allowed <= 0.5 * effect  # else a kernel adding nothing (or twice the delta) could pass
    ok = rows_ok and finite and sharp and err <= allowed
    dt = time.perf_counter() - t_start
    print(f"rule: allowed = 2 x PyTorch {str(dtype).replace('torch.', '')} error {tol['err_torch']:.3g} + floor "
          f"{tol['floor']:.3g} = {allowed:.3g} (the adapters change the output by up to {effect:.3g})")
    print(f"check: max |out - fp32 reference| = {err:.3g} (tolerance {allowed:.3g}): {'PASS' if ok else 'FAIL'} "
          f"[{backend}{where}, {dt:.2f} s]")
    if not sharp:
        print("lora-bench demo: the tolerance is not below half the adapters' effect: the check cannot tell a "
              "wrong kernel", file=sys.stderr)
    if not ok:
        print("lora-bench demo: the output does not match the reference", file=sys.stderr)
    return 0 if ok else 1
