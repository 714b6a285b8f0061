"""``lora-bench overhead``: host time per op call on the serving hot path (BENCHMARKS.md: <= 10 us per call).

Two measurements, per op (``add_lora_``, ``add_lora_(merged=m)``, ``shrink``, ``expand_``,
``LoRALinear.forward`` and ``lora_linear`` under ``torch.no_grad()``):

* ``stubbed`` (every machine): CPU tensors, with the device work replaced by no-ops (the reference functions,
  the mixed-mode reference and the Triton launchers are monkeypatched for the duration), so what is timed is
  validation, dispatch (backend selection, the custom op or the direct call) and the Python around them.
  ``LoRALinear.forward`` and ``lora_linear`` still run their base ``F.linear`` on a tiny shape; the row
  ``base F.linear`` times that alone so it can be subtracted.
* ``launcher`` (every machine with Triton): ``add_lora_`` / ``add_lora_(merged=0)`` decode-shaped (T = 1 and 16,
  4096 -> 4096, rank 16, bf16) with the whole host path down to the driver call real: the Triton backend is
  forced, the persistent kernel is compiled once for a stand-in sm_90 target (Triton's own ptxas, no GPU), and
  every timed call runs the launcher's Python (config lookup, ``persistent_plan``, workspace views), Triton's
  ``JITFunction.run`` (binding, specialisation, cache key and hit, ``CompiledKernel.launch_metadata``) and the
  CUDA launcher object's ``__call__`` (scratch allocation); only its final call, ``cuda_utils.launch`` (the C
  function that extracts the pointers and calls ``cuLaunchKernelEx``), is a counting no-op
  (:func:`launcher_driver`). CPU tensors (the binder reads ``data_ptr`` for the alignment only). Run in a child
  process with ``TRITON_INTERPRET`` unset: the interpreter replaces ``@triton.jit`` at import time, and the
  stand-in driver must never reach a process that may use a real GPU.
* ``cuda-eager`` (with a GPU): real per-call wall time of eager launches (no CUDA graph), decode-shaped
  (T = 1, 4096 -> 4096, rank 16, bf16), ``n`` calls back to back then one synchronize: the host cost of a call
  when it exceeds the kernel's, else the kernel time.

Both are taken twice: ``fast`` (the default eager path: one combined argument predicate, then the op's
implementation called directly) and ``dispatcher`` (``lora_kernels.ops.sgmv.fast_path = False``: the detailed
per-argument checks and the ``torch.ops.lora_kernels.*`` custom op, which is also what torch.compile, tracing
and profiling use), so the saving is measured in one run on one machine.

Each figure is the median over ``--repeats`` runs of ``--iters`` calls (us per call), with the min and max.
JSON schema ``lora_kernels.bench.overhead/1``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional

import torch

from . import envinfo
from .common import gpu_record_path, write_json

SCHEMA = "lora_kernels.bench.overhead/1"
TARGET_US = 10.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iters", type=int, default=2000, help="calls per timed run (default 2000)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs; the median is reported (default 7)")
    p.add_argument("--tokens", type=int, default=4, help="T of the stubbed CPU case (default 4)")
    p.add_argument("--hidden", type=int, default=64, help="in = out of the stubbed CPU case (default 64)")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA eager measurement even with a GPU")
    p.add_argument("--no-launcher", action="store_true", help="skip the launcher measurement (stand-in sm_90 "
                                                              "driver, child process)")
    p.add_argument("--launcher-tokens", default="1,16", help="T values of the launcher measurement (default 1,16)")
    p.add_argument("--out", help="JSON path (default: none on the CPU; bench/results/<gpu>/overhead-<time>.json "
                                 "on a GPU)")


# ---- stubbing the device work ---------------------------------------------------------------------------


@contextlib.contextmanager
def stub_kernels() -> Iterator[None]:
    """Replace every SGMV device computation (reference and Triton) by a no-op inside the block.

    ``shrink`` stubs return an uninitialised fp32 h of the right shape (the real launch allocates it too)."""
    from .. import reference
    from ..ops import sgmv as ops_sgmv

    def _shrink(x, a, offsets, ranks, meta, r_cap, *rest):
        return torch.empty(a.shape[0], x.shape[0], r_cap, dtype=torch.float32, device=x.device)

    def _lora_add(y0, *rest):
        return y0

    patches = [(reference, "add_lora_", lambda *a, **k: None), (reference, "expand_", lambda *a, **k: None),
               (reference, "shrink", _shrink), (reference, "lora_add", _lora_add),
               (ops_sgmv, "_reference_mixed_", lambda *a, **k: None)]
    try:
        from ..triton import sgmv as tri  # only when importable; the CPU stubbed case never reaches it

        def _tshrink(x, a, offsets, ranks, meta, max_tokens, h, *rest, **kw):
            return h

        patches += [(tri, "add_lora_", lambda *a, **k: None), (tri, "expand_", lambda *a, **k: None),
                    (tri, "shrink", _tshrink)]
    except Exception:  # pragma: no cover - triton missing
        pass
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, fn in patches:
            setattr(mod, name, fn)
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


# ---- timing ---------------------------------------------------------------------------------------------


def time_calls(fn: Callable[[], object], iters: int, repeats: int, sync: Optional[Callable[[], None]] = None
               ) -> Dict[str, float]:
    """us per call of ``fn``: median / min / max over ``repeats`` runs of ``iters`` back-to-back calls."""
    for _ in range(max(10, iters // 10)):
        fn()
    if sync:
        sync()
    runs: List[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if sync:
            sync()
        runs.append((time.perf_counter() - t0) / iters * 1e6)
    return {"us_median": statistics.median(runs), "us_min": min(runs), "us_max": max(runs)}


def _setup(T: int, hidden: int, rank: int, dtype: torch.dtype, device: str):
    import lora_kernels as lk

    g = torch.Generator().manual_seed(0)
    w = lk.LoRAWeights(hidden, hidden, 4, rank, dtype=dtype, device=device)
    for r in (rank, max(1, rank // 2)):
        w.add(torch.randn(r, hidden, generator=g).to(dtype), torch.randn(hidden, r, generator=g).to(dtype),
              alpha=16.0)
    ids = torch.tensor([(0, 1, -1)[t % 3] for t in range(T)], dtype=torch.int32, device=device)
    batch = lk.LoRABatch.from_ids(ids, 4, ranks=w.ranks)
    x = torch.randn(T, hidden, generator=g).to(device=device, dtype=dtype)
    y = torch.randn(T, hidden, generator=g).to(device=device, dtype=dtype)
    base = torch.nn.Linear(hidden, hidden, bias=False).to(device=device, dtype=dtype)
    layer = lk.nn.LoRALinear(base, w, batch=batch)
    h = torch.zeros(1, T, rank, dtype=torch.float32, device=device)
    return lk, w, batch, x, y, base, layer, h


def _cases(T: int, hidden: int, rank: int, dtype: torch.dtype, device: str) -> Dict[str, Callable[[], object]]:
    lk, w, batch, x, y, base, layer, h = _setup(T, hidden, rank, dtype, device)
    W0 = base.weight
    return {
        "add_lora_": lambda: lk.add_lora_(y, x, w, batch),
        "add_lora_(merged=0)": lambda: lk.add_lora_(y, x, w, batch, merged=0),
        "shrink": lambda: lk.shrink(x, w, batch),
        "expand_": lambda: lk.expand_(y, h, w, batch),
        "LoRALinear.forward": lambda: layer(x),
        "lora_linear": lambda: lk.lora_linear(x, W0, None, w, batch),
        "base F.linear": lambda: torch.nn.functional.linear(x, W0),
    }


@contextlib.contextmanager
def _path(name: str) -> Iterator[None]:
    from ..ops import sgmv as ops_sgmv

    prev = ops_sgmv.fast_path
    ops_sgmv.fast_path = name == "fast"
    try:
        yield
    finally:
        ops_sgmv.fast_path = prev


def _measure(cases: Dict[str, Callable[[], object]], mode: str, device: str, T: int, hidden: int, iters: int,
             repeats: int, sync=None) -> List[dict]:
    rows = []
    for name, fn in cases.items():
        for path in ("fast", "dispatcher"):
            if name == "base F.linear" and path == "dispatcher":
                continue  # no lora_kernels code in it
            with _path(path):
                rows.append({"op": name, "mode": mode, "path": path, "device": device, "T": T, "hidden": hidden,
                             **time_calls(fn, iters, repeats, sync=sync)})
    return rows


def measure_stubbed(iters: int, repeats: int, T: int = 4, hidden: int = 64) -> List[dict]:
    """Host time per call of each op on CPU tensors with the device work stubbed out (fp32). One intra-op
    thread: host overhead is single-threaded Python, and the tiny base GEMM only gets noisier with more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad(), stub_kernels():
            return _measure(_cases(T, hidden, 8, torch.float32, "cpu"), "stubbed", "cpu", T, hidden, iters,
                            repeats)
    finally:
        torch.set_num_threads(threads)


def measure_cuda(iters: int, repeats: int) -> List[dict]:
    """Per-call wall time of eager launches on the GPU (decode T = 1, 4096 -> 4096, rank 16, bf16)."""
    with torch.no_grad():
        return _measure(_cases(1, 4096, 16, torch.bfloat16, "cuda"), "cuda-eager", "cuda", 1, 4096, iters,
                        repeats, sync=torch.cuda.synchronize)


def format_table(rows: List[dict]) -> str:
    lines = [f"{'op':22s} {'mode':11s} {'path':10s} {'us/call':>9s} {'min':>8s} {'max':>8s}  (target {TARGET_US:g} us)"]
    for r in rows:
        lines.append(f"{r['op']:22s} {r['mode']:11s} {r['path']:10s} {r['us_median']:9.2f} {r['us_min']:8.2f} "
                     f"{r['us_max']:8.2f}")
    return "\n".join(lines)


def run(args) -> int:
    rows = measure_stubbed(args.iters, args.repeats, args.tokens, args.hidden)
    gpu = torch.cuda.is_available() and not args.no_cuda
    if gpu:
        rows += measure_cuda(max(1, args.iters // 4), args.repeats)
    print(format_table(rows))
    rec = {"schema": SCHEMA, "target_us": TARGET_US,
           "command": "lora-bench overhead " + " ".join(getattr(args, "argv", []) or []),
           **envinfo.collect(torch.device("cuda") if gpu else None), "rows": rows}
    # on a GPU envinfo always names it (gpu_info is None only without CUDA)
    path = gpu_record_path(args.out, rec["gpu"]["name"] if gpu and rec.get("gpu") else None, "overhead")
    if path:
        write_json(path, rec)
        print(f"wrote {path}")
    return 0
