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
implementation called directly; on the Triton backend the launcher's prepared record and pre-bound launch,
``triton.sgmv.add_lora_prepared_``) and ``dispatcher`` (``lora_kernels.ops.sgmv.fast_path = False``: the detailed
per-argument checks and the ``torch.ops.lora_kernels.*`` custom op, which is also what torch.compile, tracing
and profiling use), so the saving is measured in one run on one machine. The launcher mode adds
``fast-plain``: the fast path with ``triton.sgmv.PREBOUND = False`` (no prepared record; every launch through
Triton's ``kernel[grid](...)``), the cost the prepared launch saves.

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
    """``fast`` (the default), ``fast-plain`` (the fast path with the Triton launcher's prepared / pre-bound
    launch off: ``triton.sgmv.PREBOUND = False``, every launch through ``kernel[grid](...)``; launcher mode only)
    or ``dispatcher``."""
    from ..ops import sgmv as ops_sgmv

    prev = ops_sgmv.fast_path
    ops_sgmv.fast_path = name in ("fast", "fast-plain")
    tri = prev_pre = None
    if name == "fast-plain":
        from ..triton import sgmv as tri

        prev_pre, tri.PREBOUND = tri.PREBOUND, False
    try:
        yield
    finally:
        ops_sgmv.fast_path = prev
        if tri is not None:
            tri.PREBOUND = prev_pre


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


# ---- the launcher mode: the real host path down to the driver's launch call ---------------------------------
LAUNCHER_ARCH = 90
LAUNCHER_HIDDEN, LAUNCHER_RANK = 4096, 16


class _LaunchStub:
    """Stand-in for ``cuda_utils.launch`` (the C launch function the CUDA launcher object calls last): counts
    calls and keeps the last grid. Nothing else is skipped."""

    def __init__(self):
        self.calls = 0
        self.grid = None
        self.log = None  # a list: every call's full argument tuple is appended (tests/test_prebound_launch.py)

    def __call__(self, grid_x, grid_y, grid_z, *rest):
        self.calls += 1
        self.grid = (grid_x, grid_y, grid_z)
        if self.log is not None:
            self.log.append((grid_x, grid_y, grid_z) + rest)


class _StandInUtils:
    """The parts of Triton's ``CudaUtils`` (the compiled ``cuda_utils`` module, which needs libcuda and a GPU)
    that loading and launching a compiled kernel touch: device properties of an H100/H200-class sm_90 part, a
    dummy module/function handle, and the launch stub."""

    def __init__(self, launch: _LaunchStub):
        self.launch = launch

    def build_signature_metadata(self, signature):
        return bytes(len(signature))  # read only by the (stubbed) C launch function

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, 1024  # module, function, n_regs, n_spills, max threads per block

    def unload_module(self, module):
        pass


class _StandInDriver:
    """A Triton driver for ``sm_<arch>`` with no GPU: device 0, stream 0, the real ``CudaLauncher`` class (so
    its Python runs) over :class:`_StandInUtils`."""

    def __init__(self, arch: int, launch: _LaunchStub):
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.driver import CudaLauncher

        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _StandInUtils(launch)
        self.launcher_cls = CudaLauncher

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def launcher_driver(arch: int = LAUNCHER_ARCH) -> Iterator[_LaunchStub]:
    """Inside the block Triton targets a stand-in ``sm_<arch>`` GPU (compiles with its own ptxas) and the
    ``sgmv`` ops take the Triton backend on CPU tensors; the yielded stub counts the launches.

    Patched for the duration: ``triton.runtime.driver.active``; the nvidia driver module's ``PyKernelArg`` /
    ``ARG_*`` (set from the compiled ``cuda_utils`` module when a real driver loads; ``CudaLauncher.__init__``
    only builds argument annotations with them, read by the stubbed C call alone); ``backends.triton_can_run``
    (CPU tensors are refused without the interpreter, which would replace the compiled kernels). Use it in a
    process that never touches a real GPU: compiled kernels stay in the JIT caches after the block."""
    from triton.backends.nvidia import driver as nvd
    from triton.runtime import driver as rt_driver

    from .. import backends

    stub = _LaunchStub()
    prev_active = rt_driver._active
    saved = [(nvd, n, getattr(nvd, n)) for n in ("PyKernelArg", "ARG_CONSTEXPR", "ARG_KERNEL", "ARG_TUPLE")]
    saved.append((backends, "triton_can_run", backends.triton_can_run))
    try:
        if nvd.PyKernelArg is None:
            nvd.PyKernelArg = lambda nested_tuple, type: (type, nested_tuple)
            nvd.ARG_CONSTEXPR, nvd.ARG_KERNEL, nvd.ARG_TUPLE = 0, 1, 2
        backends.triton_can_run = lambda device_type: None
        rt_driver.set_active(_StandInDriver(arch, stub))
        with backends.use_backend("triton"):
            yield stub
    finally:
        rt_driver._active = prev_active  # None stays None: the default driver is made lazily, as before
        for mod, name, v in saved:
            setattr(mod, name, v)


def _launcher_cases(T: int) -> Dict[str, Callable[[], object]]:
    lk, w, batch, x, y, *_ = _setup(T, LAUNCHER_HIDDEN, LAUNCHER_RANK, torch.bfloat16, "cpu")
    return {"add_lora_": lambda: lk.add_lora_(y, x, w, batch),
            "add_lora_(merged=0)": lambda: lk.add_lora_(y, x, w, batch, merged=0)}


def launcher_rows(iters: int, repeats: int, tokens=(1, 16)) -> List[dict]:
    """The ``launcher`` rows, in this process (which must have ``TRITON_INTERPRET`` unset before Triton was
    imported and must not use a real GPU afterwards: :func:`measure_launcher` runs it in a child). Per row,
    besides the timing: ``calls`` (op calls made, warm-up included), ``launches`` (stubbed launch calls: equal
    to ``calls``, one persistent launch per op call), ``grid`` (the last launch's), ``compile_s`` (the row's first
    call, which compiled the kernel or loaded it from Triton's cache), ``jit_cache`` (compiled variants held
    afterwards) and ``cubin_bytes`` (the newest variant's sm_90 binary)."""
    from ..triton import sgmv as tri

    kern = tri._sgmv_persistent_kernel
    if not hasattr(kern, "device_caches"):
        raise RuntimeError(f"launcher mode: {type(kern).__name__} is not a JITFunction (TRITON_INTERPRET set "
                           f"before Triton was imported?)")
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad(), launcher_driver() as stub:
            for T in tokens:
                for name, fn in _launcher_cases(T).items():
                    for path in ("fast", "fast-plain", "dispatcher"):
                        n0 = stub.calls
                        with _path(path):
                            t0 = time.perf_counter()
                            fn()
                            compile_s = time.perf_counter() - t0
                            times = time_calls(fn, iters, repeats)
                        calls = 1 + max(10, iters // 10) + iters * repeats  # first call, warm-up, timed
                        cache = kern.device_caches[0][0]  # the kernels JITFunction.run compiled for sm_90
                        rows.append({"op": name, "mode": "launcher", "path": path,
                                     "device": f"cpu (stand-in sm_{LAUNCHER_ARCH})", "T": T,
                                     "hidden": LAUNCHER_HIDDEN, "rank": LAUNCHER_RANK, "dtype": "bf16", **times,
                                     "calls": calls, "launches": stub.calls - n0, "grid": list(stub.grid or ()),
                                     "compile_s": round(compile_s, 3), "jit_cache": len(cache),
                                     "cubin_bytes": len(list(cache.values())[-1].asm["cubin"])})
    finally:
        torch.set_num_threads(threads)
    return rows


def measure_launcher(iters: int, repeats: int, tokens=(1, 16), timeout: float = 600.0) -> List[dict]:
    """:func:`launcher_rows` in a child process (``TRITON_INTERPRET`` removed from its environment); raises
    RuntimeError with the child's stderr when it fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "lora_kernels.bench.overhead", "--launcher-worker", "--iters", str(iters),
           "--repeats", str(repeats), "--launcher-tokens", ",".join(str(t) for t in tokens)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"launcher mode: child exited with {p.returncode}:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def format_table(rows: List[dict]) -> str:
    lines = [f"{'op':22s} {'mode':11s} {'path':10s} {'T':>3s} {'us/call':>9s} {'min':>8s} {'max':>8s}  "
             f"(target {TARGET_US:g} us)"]
    for r in rows:
        lines.append(f"{r['op']:22s} {r['mode']:11s} {r['path']:10s} {r['T']:3d} {r['us_median']:9.2f} "
                     f"{r['us_min']:8.2f} {r['us_max']:8.2f}")
    return "\n".join(lines)


def _tokens(spec: str) -> tuple:
    return tuple(int(t) for t in spec.split(",") if t.strip())


def run(args) -> int:
    if getattr(args, "launcher_worker", False):  # the child of measure_launcher: rows as one JSON line
        print(json.dumps(launcher_rows(args.iters, args.repeats, _tokens(args.launcher_tokens))))
        return 0
    rows = measure_stubbed(args.iters, args.repeats, args.tokens, args.hidden)
    if not args.no_launcher:
        from .. import backends

        if backends.triton_status() is None:
            rows += measure_launcher(args.iters, args.repeats, _tokens(args.launcher_tokens))
        else:
            print(f"launcher mode skipped: {backends.triton_status()}", file=sys.stderr)
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


if __name__ == "__main__":  # measure_launcher's child (python -m lora_kernels.bench.overhead --launcher-worker ...)
    _ap = argparse.ArgumentParser()
    add_arguments(_ap)
    _ap.add_argument("--launcher-worker", action="store_true", help=argparse.SUPPRESS)
    sys.exit(run(_ap.parse_args()))
