"""Timing, the correctness rule and the roofline used by ``lora-bench``.

Timing on a GPU (:class:`GpuTimer`): the op is warmed up on a side stream, captured in a CUDA graph, and each
timed replay is preceded by an L2 flush (by default a read of a buffer of ``max(2 x L2, 128 MiB)``, outside the
timed region; ``write`` and ``none`` on request) and bracketed by CUDA events on the same stream; the result
is the median and quartiles over the replays, in microseconds. An op that cannot be captured is timed the same
way eagerly (``graph: false`` in the record). On the CPU (:class:`CpuTimer`) the op is timed with
``time.perf_counter`` per call: a smoke measurement, never a GPU number.

Correctness (:func:`tolerance`, :func:`check_output`): the fp32 reference is the spec; an implementation in a
low-precision dtype passes when ``max |y - ref| <= 2 * max |y_torch - ref| + floor``, where ``y_torch`` is the
same computation done by PyTorch in that dtype (the naive loop) and ``floor = 1e-6 + rtol * max |ref|`` with
``rtol`` 1e-3 (bf16), 1e-4 (fp16), 1e-6 (fp32), the project's rule (tests/helpers.py); NaN/Inf never pass;
tokens with no adapter must be bit-identical to y0.

Roofline (:func:`roof_for_device`): ``roof_s = max(bytes / bandwidth, flops / peak)`` with the problem's
minimal bytes and FLOPs (:class:`~lora_kernels.bench.cases.Problem`) and per-GPU ceilings from
:data:`GPU_ROOFS`, or measured once (a device-to-device copy and a bf16 matmul) for a GPU not in the table.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .common import err_text

__all__ = [
    "GPU_ROOFS", "Roof", "roof_for_device", "quantiles", "tolerance", "check_output", "GpuTimer", "CpuTimer",
    "nvtx_range", "checked_timing", "count_launches", "sync", "exact_fp32", "add_timing_arguments",
]

FLUSH_MODES = ("read", "write", "none")

# (substring of torch.cuda.get_device_name(), copy bandwidth B/s, peak FLOP/s per dtype, source). The first
# match wins; None = not known well enough, measure instead (e.g. the PCIe H100 has ~2 TB/s).
GPU_ROOFS = (
    ("H100 PCIe", None, None, "PCIe part: measured at run time"),
    ("H100", 2.9e12, {"bf16": 740e12, "fp16": 740e12, "fp32": 60e12},
     "BENCHMARKS.md (H100 80GB: ~2.9 TB/s measured copy, ~740 TFLOP/s dense bf16; fp32 non-tensor ~60 TFLOP/s)"),
    ("H200", 4.3e12, {"bf16": 790e12, "fp16": 790e12, "fp32": 60e12},
     "device KINDS.md (H200: ~4.3 TB/s measured copy, ~790 TFLOP/s dense bf16 on random data)"),
)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


@dataclass
class Roof:
    """Ceilings of one GPU: ``bandwidth`` B/s, ``peak`` FLOP/s for the benchmark dtype, where they came from."""

    bandwidth: float
    peak: float
    source: str

    def seconds(self, nbytes: float, flops: float) -> float:
        return max(nbytes / self.bandwidth, flops / self.peak)

    def to_dict(self) -> dict:
        return {"bandwidth_Bps": self.bandwidth, "peak_flops": self.peak, "source": self.source,
                "formula": "roof_s = max(bytes / bandwidth, flops / peak)"}


def _measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ts = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) * 1e-3)
    return 2 * src.numel() * 4 / sorted(ts)[len(ts) // 2]


def _measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    ts = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) * 1e-3)
    return 2 * n**3 / sorted(ts)[len(ts) // 2]


def roof_for_device(device: torch.device, dtype: torch.dtype, measure: bool = False) -> Roof:
    """The roofline ceilings of ``device`` for ``dtype``: from :data:`GPU_ROOFS`, or measured (also when
    ``measure``): a 1 GiB device-to-device copy (bytes read + written) and an 8192^3 matmul in ``dtype``."""
    name = torch.cuda.get_device_name(device)
    dn = dtype_name(dtype)
    if not measure:
        for sub, bw, peaks, src in GPU_ROOFS:
            if sub in name:
                if bw is not None:
                    return Roof(bw, peaks[dn], f"table: {src}")
                break
    bw = _measure_copy_bandwidth(device)
    peak = _measure_matmul_peak(device, dtype)
    return Roof(bw, peak, f"measured on this GPU ({name}): 1 GiB device copy, 8192^3 {dn} matmul")


def quantiles(xs: Sequence[float]) -> Dict[str, float]:
    """Median, 25th and 75th percentiles (linear interpolation), min and count."""
    v = sorted(xs)
    if not v:
        return {"median": float("nan"), "p25": float("nan"), "p75": float("nan"), "min": float("nan"), "n": 0}

    def q(p: float) -> float:
        k = (len(v) - 1) * p
        lo = int(k)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)

    return {"median": q(0.5), "p25": q(0.25), "p75": q(0.75), "min": v[0], "n": len(v)}


# The floor of the numerics rule, relative to max|ref| (the same numbers as tests/helpers.py).
RTOL_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
ATOL_FLOOR = 1e-6


def tolerance(ref: torch.Tensor, y_torch: torch.Tensor, dtype: torch.dtype) -> Dict[str, float]:
    """The allowed max abs error: ``2 * max|y_torch - ref| + 1e-6 + rtol(dtype) * max|ref|`` (module doc)."""
    err_torch = float((y_torch.float() - ref).abs().max()) if ref.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    floor = ATOL_FLOOR + RTOL_FLOOR[dtype] * scale
    return {"err_torch": err_torch, "floor": floor, "allowed": 2.0 * err_torch + floor}


def check_output(
    y: torch.Tensor, y0: torch.Tensor, ref: torch.Tensor, none_mask: torch.Tensor, allowed: float,
) -> Dict[str, object]:
    """Judge one output: max abs error vs ``allowed``, finiteness, untouched rows, and the relative Frobenius
    error of the delta ``||(y - y0) - (ref - y0)|| / ||ref - y0||`` (reported, not judged)."""
    yf = y.float()
    finite = bool(torch.isfinite(yf).all())
    err = float((yf - ref).abs().max()) if y.numel() else 0.0
    y0f = y0.float()
    dref = ref - y0f
    denom = float(dref.norm()) or 1.0
    rel = float(((yf - y0f) - dref).norm()) / denom if y.numel() else 0.0
    untouched = bool(torch.equal(y[none_mask], y0[none_mask])) if bool(none_mask.any()) else True
    ok = finite and untouched and err <= allowed
    why = [] if ok else [m for m, bad in (("NaN/Inf in output", not finite),
                                          ("tokens with no adapter were modified", not untouched),
                                          (f"max abs error {err:.3g} > allowed {allowed:.3g}", err > allowed)) if bad]
    return {"ok": ok, "err_max": err, "err_allowed": allowed, "rel_err": rel, "untouched_ok": untouched,
            "finite": finite, "why": "; ".join(why)}


def add_timing_arguments(g) -> None:
    """``--reps``, ``--warmup``, ``--no-graphs``, ``--l2-flush`` and ``--measure-roof`` on the argument group
    ``g``, as ``lora-bench sgmv`` and ``linear`` word them (what :func:`make_timer` and :func:`roof_for_device`
    take)."""
    g.add_argument("--reps", type=int, help="timed repetitions per implementation (default 100 GPU, 10 CPU)")
    g.add_argument("--warmup", type=int, help="untimed repetitions before timing")
    g.add_argument("--no-graphs", action="store_true", help="time eager launches instead of CUDA graph replays")
    g.add_argument("--l2-flush", choices=FLUSH_MODES, default="read",
                   help="how the L2 is flushed before each replay (default read: a 2 x L2 buffer is read)")
    g.add_argument("--measure-roof", action="store_true",
                   help="measure copy bandwidth and matmul peak even for a known GPU")


@contextlib.contextmanager
def exact_fp32():
    """TF32 off for CUDA matmuls inside (the fp32 references must be fp32); the previous setting restored."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@contextlib.contextmanager
def nvtx_range(name: str):
    """An NVTX range (domain ``lora-bench``) around one benchmark config, when the nvtx package is present."""
    try:
        import nvtx as _nv
    except Exception:  # pragma: no cover - nvtx is a dependency
        yield
        return
    with _nv.annotate(name, domain="lora-bench"):
        yield


class CpuTimer:
    """Wall-clock timing (``time.perf_counter``) of ``fn`` on CPU tensors: ``warmup`` calls, then ``reps``."""

    kind = "cpu-wallclock"

    def __init__(self, reps: int = 10, warmup: int = 1):
        self.reps, self.warmup = reps, warmup

    def describe(self) -> dict:
        return {"method": "CPU smoke, not a GPU measurement: time.perf_counter around each call",
                "reps": self.reps, "warmup": self.warmup}

    def capture(self, fn: Callable[[], object]):
        """CPU: nothing to capture; returns (fn, False, None)."""
        return fn, False, None

    def time(self, run: Callable[[], object]) -> List[float]:
        for _ in range(self.warmup):
            run()
        out = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            run()
            out.append((time.perf_counter() - t0) * 1e6)
        return out


class GpuTimer:
    """CUDA-graph replay timing with an L2 flush before every replay (see the module docstring)."""

    kind = "cuda-graph"

    def __init__(self, device: torch.device, reps: int = 100, warmup: int = 10, use_graphs: bool = True,
                 flush: str = "read"):
        if flush not in FLUSH_MODES:
            raise ValueError(f"flush: expected one of {FLUSH_MODES}, got {flush!r}")
        self.device = torch.device(device)
        self.reps, self.warmup, self.use_graphs, self.flush_mode = reps, warmup, use_graphs, flush
        props = torch.cuda.get_device_properties(self.device)
        self.l2_bytes = int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
        nbytes = max(2 * self.l2_bytes, 128 * 2**20)
        self.flush_buf = torch.ones(nbytes // 4, dtype=torch.float32, device=self.device)
        self.flush_out = torch.empty((), dtype=torch.float32, device=self.device)

    def describe(self) -> dict:
        how = {"read": "L2 flushed before each replay by reading a buffer outside the timed region",
               "write": "L2 flushed before each replay by writing a buffer outside the timed region",
               "none": "no L2 flush (warm cache)"}[self.flush_mode]
        return {"method": ("CUDA graph replay" if self.use_graphs else "eager launches") + f", {how}; CUDA events",
                "l2_flush": self.flush_mode,
                "reps": self.reps, "warmup": self.warmup, "l2_bytes": self.l2_bytes,
                "flush_bytes": self.flush_buf.numel() * 4}

    def flush(self) -> None:
        # Reading leaves clean lines: no write-backs of the flush buffer land inside the next timed replay
        # (a write flush, triton.testing.do_bench's zero_(), leaves the L2 full of dirty lines).
        if self.flush_mode == "read":
            torch.sum(self.flush_buf, dim=0, out=self.flush_out)
        elif self.flush_mode == "write":
            self.flush_buf.fill_(1.0)

    def capture(self, fn: Callable[[], object]):
        """Warm ``fn`` up on a side stream and capture it in a graph. Returns ``(run, graphed, error)``:
        ``run`` replays the graph, or is ``fn`` itself when capture failed (``error`` says why)."""
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(s)
        torch.cuda.synchronize(self.device)
        if not self.use_graphs:
            return fn, False, "graphs disabled (--no-graphs)"
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                fn()
        except Exception as e:  # e.g. an op that syncs with the host
            torch.cuda.synchronize(self.device)
            return fn, False, f"{type(e).__name__}: {e}".splitlines()[0][:200]
        return g.replay, True, None

    def time(self, run: Callable[[], object]) -> List[float]:
        for _ in range(self.warmup):
            self.flush()
            run()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for i in range(self.reps):
            self.flush()
            starts[i].record()
            run()
            ends[i].record()
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]


def make_timer(device: torch.device, reps: Optional[int], warmup: Optional[int], use_graphs: bool = True,
               flush: str = "read"):
    """:class:`GpuTimer` on a CUDA device (100 reps), :class:`CpuTimer` otherwise (10 reps)."""
    if torch.device(device).type == "cuda":
        return GpuTimer(device, reps or 100, 10 if warmup is None else warmup, use_graphs, flush)
    return CpuTimer(reps or 10, 1 if warmup is None else warmup)


def checked_timing(fn: Callable[[], object], check: Callable[[], dict], timer, device: torch.device, label: str,
                   reset: Optional[Callable[[], object]] = None) -> Dict[str, object]:
    """Check, capture and time one implementation, the way every ``lora-bench`` row is measured.

    ``fn`` runs once eagerly and ``check()`` judges what it left (a dict with ``ok`` and ``why``, e.g. from
    :func:`check_output`); a failing ``fn`` is never timed. Then ``timer.capture(fn)``; when it made a CUDA graph
    and ``reset`` is given, ``reset()`` clobbers the output, one replay runs and ``check()`` judges again (a graph
    that replays wrongly fails too). Last, ``timer.time`` over the replays (NVTX range ``label``).

    Returns ``{"status", "why", "check", "q", "graph", "graph_error"}``: status ``ok`` (``q``: the
    :func:`quantiles` in us), ``FAIL`` (a check failed: ``why`` says which; ``graph`` True for the replay's) or
    ``ERROR`` (``fn`` raised, or the timing did: ``why`` starts with "timing: "); ``check`` is the first check's
    dict (None when ``fn`` raised)."""
    res: Dict[str, object] = {"status": "ERROR", "why": "", "check": None, "q": None, "graph": None,
                              "graph_error": None}
    try:
        with nvtx_range(f"{label}/check"):
            fn()
        sync(device)
    except Exception as e:
        return {**res, "why": err_text(e)}
    chk = check()
    res["check"] = chk
    if not chk["ok"]:
        return {**res, "status": "FAIL", "why": chk["why"]}
    try:
        run, graphed, gerr = timer.capture(fn)
        if graphed and reset is not None:  # the replay must compute the same thing
            reset()
            run()
            sync(device)
            chk2 = check()
            if not chk2["ok"]:
                return {**res, "status": "FAIL", "graph": True, "why": "CUDA graph replay: " + chk2["why"]}
        with nvtx_range(label):
            ts = timer.time(run)
    except Exception as e:
        return {**res, "why": "timing: " + err_text(e)}
    return {**res, "status": "ok", "q": quantiles(ts), "graph": graphed, "graph_error": gerr}


def sync(device: torch.device) -> None:
    """Wait for ``device``'s work (a CUDA device; nothing to wait for on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# Kineto's activity kinds of device work; the GPU timeline also carries syncs ("cuda_sync") and the spans of
# record_function ranges ("gpu_user_annotation"), which launch nothing.
_DEVICE_WORK = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})


def _is_device_work(event, cuda) -> bool:
    kind = getattr(event, "activity_type", None)
    if kind:
        return kind in _DEVICE_WORK
    return event.device_type == cuda  # a torch whose events carry no activity kind


def count_launches(fn: Callable[[], object], device: torch.device) -> Tuple[Optional[int], List[str]]:
    """Device work items one eager call of ``fn`` enqueues on a CUDA ``device``: kernels, memsets and memcpys, as
    the torch profiler (CUPTI) records them. Returns ``(count, names)``; ``(None, [])`` on the CPU (no launches
    to count) or when the profiler fails (``names`` then holds its error)."""
    if torch.device(device).type != "cuda":
        return None, []
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        names = [e.name for e in prof.events() if _is_device_work(e, DeviceType.CUDA)]
    except Exception as e:  # a profiler that cannot start (CUPTI busy or denied) leaves the count out, not the row
        return None, [f"profiler failed: {err_text(e)}"]
    return len(names), [n[:100] for n in names]
