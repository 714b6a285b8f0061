"""``lora-bench linear``: the decode step of one LoRA'd linear layer against its base GEMV alone (issue 15).

For every token count T of a decode sweep (default 1, 2, 4, 8, 16, 32, 64), a layer ``in -> out`` (default
4096 -> 4096 with a bias) and ``n`` adapters (default 8 of rank 16; ``--ranks`` cycles mixed ranks over them),
drawn by the tokens with ``--dist`` (default ``distinct``: every token its own request's adapter), in bf16 on a
GPU, the rows are:

* ``base``: ``F.linear(x, W0, bias)`` alone, the GEMV every other row is compared with;
* ``lk.add_lora_``: ``F.linear``, then ``lk.add_lora_`` as the dispatcher runs it (``path``: the compiled decode
  kernel where this GPU's tuning table verified it, else the backend it selects); on the CPU under
  ``TRITON_INTERPRET=1`` also ``lk.add_lora_[triton]`` (the Triton kernels, interpreted);
* ``vllm-style[<backend>]``: ``F.linear``, then ``lk.shrink`` (a memset of h and the shrink) and ``lk.expand_``:
  the three launches vLLM spends on the delta;
* ``cuda.fused_lora_linear_``: ``torch.ops.lora_kernels_C.fused_lora_linear_``, base GEMV and delta in one launch
  (what ``LoRALinear`` runs for a decode step once ``fused_linear_cuda`` is verified);
* ``cuda.sgmv_decode_``: ``F.linear``, then ``lora_kernels_C::sgmv_decode_`` (what ``add_lora_`` runs for
  T <= 64 once ``sgmv_decode_cuda`` is verified).

The two ``cuda.*`` rows run whether or not ``lora-bench tune`` verified their kernel on this GPU (the row says
``verified`` or ``unverified``); without a CUDA device, the compiled extension or its op, or past the kernel's
limits (T <= 64, ranks <= 256), they are ``SKIP`` with the reason.

Every row is checked before it is timed, by the rule of ``lora-bench sgmv``
(:func:`~lora_kernels.bench.measure.check_output`): against the fp32 reference ``x W0^T + bias`` (plus the LoRA
delta but for ``base``), an error at most twice PyTorch's own in the dtype (``F.linear`` and the naive
per-adapter loop) plus the floor, finite, and for the rows that add into ``F.linear``'s output the tokens with no
adapter bit-identical to it. A row that fails is ``FAIL`` and is not timed; the exit status is then 1.

Per row: us (median and quartiles of CUDA-graph replays with an L2 flush before each, as ``lora-bench sgmv``),
launches per call (kernels, memsets and copies of one eager call, counted with the torch profiler), % of the
bytes bound (``W0 + bias + x + y`` and the active adapters' A and B, each byte moved once, at the GPU's copy
bandwidth: :func:`~lora_kernels.bench.measure.roof_for_device`) and the ratio to the base GEMV's time. Without a
GPU the sweep runs on tiny CPU shapes with wall-clock timing, labelled "CPU smoke, not a GPU measurement"
(launches and % of the bound are then "-").
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import sys
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from . import cases as C
from . import measure
from .baselines import NaiveLoop
from .common import (doc_header, err_text, exit_status, finish_doc, fmt, fmt_us, pick_device, pick_dtype, print_footer,
                     print_start, render_table, run_sweep, sweep_doc)
from .sgmv import _csv_ints, _pick_impls, _safe_report, add_body, add_sweep_arguments, sweep_setup, two_op_body

__all__ = ["add_arguments", "run", "format_table", "LinearImpl", "LinearProblem", "impls_for", "run_case"]

SCHEMA = "lora_kernels.bench.linear/1"
GPU_TOKENS = [1, 2, 4, 8, 16, 32, 64]
# (GPU, CPU) defaults: a 7B-sized projection with a handful of requests' adapters; a tiny odd-sized CPU smoke layer.
DEFAULTS = {"hidden_in": (4096, 64), "hidden_out": (4096, 96), "adapters": (8, 3), "ranks": ([16], [4, 8]),
            "tokens": (GPU_TOKENS, [1, 3])}
_KERNEL_DEVICE_TYPE = "cuda"  # where the compiled-kernel rows run (a CPU test points it at "cpu" with stub ops)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("layer and adapters")
    g.add_argument("--tokens", type=_csv_ints,
                   help="the decode sweep's token counts (default 1,2,4,8,16,32,64; CPU 1,3)")
    g.add_argument("--hidden-in", type=int, help="input width (default 4096; CPU 64)")
    g.add_argument("--hidden-out", type=int, help="output width (default 4096; CPU 96)")
    g.add_argument("--adapters", type=int, help="adapters loaded (default 8; CPU 3)")
    g.add_argument("--ranks", type=_csv_ints,
                   help="ranks cycled over the adapters, e.g. 8,16,64 (default 16; CPU 4,8)")
    g.add_argument("--dist", choices=C.DISTRIBUTIONS, default="distinct",
                   help="adapter popularity (default distinct: token t uses adapter t mod n)")
    g.add_argument("--frac-none", type=float, default=0.0, help="fraction of tokens with no adapter (-1)")
    g.add_argument("--no-bias", action="store_true", help="a base layer without bias")
    add_sweep_arguments(p, "linear", "row", "token counts")


# ---- one token count: the problem ------------------------------------------------------------------------


@dataclass
class LinearProblem:
    """One T of the sweep. ``prob``: the adapters, x and ids (:func:`~lora_kernels.bench.cases.make_problem`);
    ``w0`` [out, in] and ``bias`` [out] (or None) the base layer, in the dtype; ``y_base = F.linear(x, w0, bias)``;
    ``ref_base`` / ``ref`` the fp32 references without / with the LoRA delta and ``tol_base`` / ``tol`` their
    :func:`~lora_kernels.bench.measure.tolerance`; ``bytes_base`` / ``bytes_lora`` the bytes each row moves at
    least (W0, bias, x and y once; the LoRA rows also the active adapters' A and B at their own ranks)."""

    prob: C.Problem
    w0: torch.Tensor
    bias: Optional[torch.Tensor]
    y_base: torch.Tensor
    ref_base: torch.Tensor
    ref: torch.Tensor
    tol_base: Dict[str, float]
    tol: Dict[str, float]
    bytes_base: int
    bytes_lora: int

    @property
    def T(self) -> int:
        return self.prob.case.tokens

    def new_batch(self):
        """A :class:`~lora_kernels.LoRABatch` of this T's ids (one per row: the compiled kernels keep counters
        and the Triton launcher a prepared record in it)."""
        import lora_kernels as lk

        w = self.prob.weights
        return lk.LoRABatch(max(1, self.T), w.max_adapters, self.prob.x.device).build(self.prob.ids, ranks=w.ranks)


def make_linear_problem(case: C.Case, dtype: torch.dtype, device: torch.device, bias: bool, seed: int
                        ) -> LinearProblem:
    """The adapters of ``case`` (:func:`~lora_kernels.bench.cases.make_problem`) and a base layer W0 ~ N(0, 1/in),
    bias ~ N(0, 1), deterministic from ``seed``, with the references, tolerances and byte counts."""
    import lora_kernels as lk

    prob = C.make_problem(case, dtype, device, seed=seed)
    g = torch.Generator(device=device).manual_seed(seed + 7)
    in_f, out_f = case.hidden_in, case.hidden_out
    w0 = (torch.randn(out_f, in_f, generator=g, device=device) / math.sqrt(in_f)).to(dtype)
    b = torch.randn(out_f, generator=g, device=device).to(dtype) if bias else None
    y_base = F.linear(prob.x, w0, b)
    with measure.exact_fp32():
        ref_base = F.linear(prob.x.float(), w0.float(), b.float() if b is not None else None)
        ref = ref_base + lk.reference.lora_delta(prob.x, prob.weights, prob.ids)
    y_torch = NaiveLoop(prob.weights, prob.ids)(y_base.clone(), prob.x)  # PyTorch's LoRA'd layer in the dtype
    es = torch.empty(0, dtype=dtype).element_size()
    bytes_base = es * (out_f * in_f + (out_f if bias else 0) + case.tokens * (in_f + out_f))
    bytes_lora = bytes_base + es * int(prob.info["active_rank_sum"]) * (in_f + out_f)
    return LinearProblem(prob, w0, b, y_base, ref_base, ref, measure.tolerance(ref_base, y_base, dtype),
                         measure.tolerance(ref, y_torch, dtype), bytes_base, bytes_lora)


# ---- the rows ----------------------------------------------------------------------------------------------


@dataclass
class LinearImpl:
    """One row of the sweep. ``make(lp)`` returns the zero-argument callable that is checked, captured and timed;
    it returns the layer's output y [T, out]. ``lora``: y includes the LoRA delta (else the base alone);
    ``adds_to_base``: y is ``F.linear``'s output with the delta added in place, so tokens with no adapter must keep
    it bit for bit. ``dispatched``: the library chooses the path (the row records which). ``kernel`` / ``op`` /
    ``limits`` (max T, max rank): a compiled kernel's name in ``VERIFIABLE_KERNELS``, its extension op and the
    bounds past which the row is skipped."""

    name: str
    kind: str  # "base" | "lora_kernels" | "vllm-style" | "cuda"
    what: str
    make: Callable[[LinearProblem], Callable[[], torch.Tensor]]
    lora: bool = True
    adds_to_base: bool = True
    dispatched: bool = False
    kernel: Optional[str] = None
    op: Optional[str] = None
    limits: Optional[tuple] = None


def _make_base(lp: LinearProblem) -> Callable[[], torch.Tensor]:
    x, w0, b = lp.prob.x, lp.w0, lp.bias
    return lambda: F.linear(x, w0, b)


def _make_lib(backend: Optional[str], body: Callable[..., None]):
    """A row maker: ``F.linear``, then ``body(y, x, weights, batch)`` (sgmv's :func:`add_body` or
    :func:`two_op_body`) with ``backend`` forced, or as the dispatcher chooses when None."""

    def make(lp: LinearProblem) -> Callable[[], torch.Tensor]:
        import lora_kernels as lk

        x, w0, b, w, batch = lp.prob.x, lp.w0, lp.bias, lp.prob.weights, lp.new_batch()
        scope = (lambda: lk.backends.use_backend(backend)) if backend else contextlib.nullcontext

        def fn() -> torch.Tensor:
            y = F.linear(x, w0, b)
            with scope():
                body(y, x, w, batch)
            return y

        return fn

    return make


def _make_fused(lp: LinearProblem) -> Callable[[], torch.Tensor]:
    """The compiled fused kernel called as LoRALinear calls it (``lora_linear._fused_``), past its dispatch gate."""
    from ..nn import lora_linear as L

    w, batch, x = lp.prob.weights, lp.new_batch(), lp.prob.x
    base = torch.nn.Linear(w.in_features, w.out_features, bias=lp.bias is not None, device="meta")
    base.weight = torch.nn.Parameter(lp.w0, requires_grad=False)
    if lp.bias is not None:
        base.bias = torch.nn.Parameter(lp.bias, requires_grad=False)
    layer = L.LoRALinear(base, w, batch=batch)
    op = _ext_op("fused_lora_linear_")
    return lambda: L._fused_(op, layer, x, batch, -1)


def _make_decode(lp: LinearProblem) -> Callable[[], torch.Tensor]:
    """``F.linear``, then the compiled decode kernel called as add_lora_ calls it (``sgmv._decode_``), past its
    dispatch gate, with its partial sums in the batch's workspace (capturable)."""
    from ..ops import sgmv as S

    w, batch, x, w0, b = lp.prob.weights, lp.new_batch(), lp.prob.x, lp.w0, lp.bias
    ws = batch.workspace(S._decode_ws_bytes(x, w.num_slices, w.max_rank, -1))
    op = _ext_op("sgmv_decode_")

    def fn() -> torch.Tensor:
        y = F.linear(x, w0, b)
        S._decode_(op, y, x, w.a, w.b, w.offsets, w.ranks, w.scales, batch.meta, w.slice_outs, w.max_rank, -1,
                   batch.plan, ws)
        return y

    return fn


def _ext_op(name: str):
    import lora_kernels as lk

    return getattr(lk._ext.get(), name)


def impls_for(device: torch.device) -> List[LinearImpl]:
    """Every row on ``device`` (module docstring), in the table's order."""
    import lora_kernels as lk
    from ..nn import lora_linear as L
    from ..ops import sgmv as S

    sel = lk.backends.select("sgmv", device.type)
    out = [LinearImpl("base", "base", "F.linear(x, W0, bias) alone", _make_base, lora=False, adds_to_base=False),
           LinearImpl("lk.add_lora_", "lora_kernels", "F.linear, then lk.add_lora_ as dispatched",
                      _make_lib(None, add_body), dispatched=True)]
    if device.type == "cpu" and lk.backends.interpreting() and lk.backends.triton_can_run("cpu") is None:
        out.append(LinearImpl("lk.add_lora_[triton]", "lora_kernels",
                              "F.linear, then lk.add_lora_ on the Triton backend (interpreted)",
                              _make_lib("triton", add_body)))
    out += [
        LinearImpl(f"vllm-style[{sel}]", "vllm-style", "F.linear, then lk.shrink (memset + shrink) and lk.expand_",
                   _make_lib(sel, two_op_body)),
        LinearImpl("cuda.fused_lora_linear_", "cuda", "lora_kernels_C::fused_lora_linear_: GEMV + delta, one launch",
                   _make_fused, adds_to_base=False, kernel=L._FUSED_KERNEL, op="fused_lora_linear_",
                   limits=(L._FUSED_MAX_T, L._FUSED_MAX_RANK)),
        LinearImpl("cuda.sgmv_decode_", "cuda", "F.linear, then lora_kernels_C::sgmv_decode_", _make_decode,
                   kernel=S._DECODE_KERNEL, op="sgmv_decode_", limits=(S._DECODE_MAX_T, S._DECODE_MAX_RANK)),
    ]
    return out


def _unavailable(impl: LinearImpl, lp: LinearProblem) -> Optional[str]:
    """Why a compiled-kernel row cannot run here (None when it can, and for every other row)."""
    if impl.op is None:
        return None
    import lora_kernels as lk

    dev = lp.prob.x.device
    if dev.type != _KERNEL_DEVICE_TYPE:
        return f"needs a CUDA device (this run is on {dev.type})"
    max_t, max_rank = impl.limits
    if lp.T > max_t:
        return f"T = {lp.T} is past the kernel's limit of {max_t} tokens (a decode kernel)"
    if lp.prob.weights.max_rank > max_rank:
        return f"rank {lp.prob.weights.max_rank} is past the kernel's limit of {max_rank}"
    ext = lk._ext.get()
    if ext is None:
        return f"no compiled extension: {lk._ext.status()}"
    try:
        getattr(ext, impl.op)
    except (AttributeError, RuntimeError):
        return f"the compiled extension has no {impl.op} op"
    return None


def _default_path(lp: LinearProblem) -> str:
    """What ``lk.add_lora_`` runs for this T: the compiled decode kernel where its gate opens, else the backend."""
    import lora_kernels as lk
    from ..ops import sgmv as S

    w, x = lp.prob.weights, lp.prob.x
    if S._decode_op(lp.y_base, x, w.num_slices, w.max_rank) is not None:
        return f"compiled {S._DECODE_KERNEL}"
    return lk.backends.select("sgmv", x.device.type)


# ---- measuring ---------------------------------------------------------------------------------------------


def _row(T: int, impl: LinearImpl, status: str, **kw) -> dict:
    r = {"T": T, "impl": impl.name, "kind": impl.kind, "what": impl.what, "status": status, "path": None,
         "verified": None, "us_median": None, "us_p25": None, "us_p75": None, "us_min": None, "reps": 0,
         "graph": None, "graph_error": None, "launches": None, "launch_names": [], "bytes": None,
         "pct_bytes_bound": None, "ratio_to_base": None, "err_max": None, "err_allowed": None, "rel_err": None,
         "why": ""}
    r.update(kw)
    return r


def run_impl(impl: LinearImpl, lp: LinearProblem, timer, bandwidth: Optional[float]) -> dict:
    """Check, capture and time one row on one T (:func:`measure.checked_timing`), then count its launches;
    returns its JSON row."""
    import lora_kernels as lk

    dev = lp.prob.x.device
    extra: dict = {"bytes": lp.bytes_lora if impl.lora else lp.bytes_base}
    if impl.kernel is not None:
        extra["verified"] = impl.kernel in lk.tuning.verified_kernels(dev)
    if impl.dispatched:
        extra["path"] = _default_path(lp)
    skip = _unavailable(impl, lp)
    if skip is not None:
        return _row(lp.T, impl, "SKIP", why=skip, **extra)
    try:
        fn = impl.make(lp)
    except Exception as e:
        return _row(lp.T, impl, "ERROR", why=err_text(e), **extra)
    out: Dict[str, torch.Tensor] = {}

    def call() -> None:
        out["y"] = fn()

    ref, tol = (lp.ref, lp.tol) if impl.lora else (lp.ref_base, lp.tol_base)
    ids = lp.prob.ids
    none_mask = ids < 0 if impl.adds_to_base else torch.zeros_like(ids, dtype=torch.bool)
    res = measure.checked_timing(
        call, lambda: measure.check_output(out["y"], lp.y_base, ref, none_mask, tol["allowed"]), timer, dev,
        f"T{lp.T}/{impl.name}", reset=lambda: out["y"].fill_(float("nan")))
    chk = res["check"] or {}
    extra.update(err_max=chk.get("err_max"), err_allowed=chk.get("err_allowed"), rel_err=chk.get("rel_err"))
    if res["status"] != "ok":
        return _row(lp.T, impl, res["status"], graph=res["graph"], why=res["why"], **extra)
    q = res["q"]
    launches, names = measure.count_launches(call, dev)
    row = _row(lp.T, impl, "ok", us_median=q["median"], us_p25=q["p25"], us_p75=q["p75"], us_min=q["min"],
               reps=q["n"], graph=res["graph"], graph_error=res["graph_error"], launches=launches,
               launch_names=names, **extra)
    if bandwidth and q["median"] > 0:
        row["pct_bytes_bound"] = 100.0 * row["bytes"] / bandwidth / (q["median"] * 1e-6)
    return row


def run_case(case: C.Case, impls: List[LinearImpl], dtype: torch.dtype, device: torch.device, timer,
             bandwidth: Optional[float], bias: bool, seed: int) -> Dict[str, object]:
    """Every row on one T: ``{"case": <T, bytes, tolerances>, "rows": [...]}``, ratios to the base row's time."""
    lp = make_linear_problem(case, dtype, device, bias, seed)
    info = {**case.to_dict(), **lp.prob.info, "T": case.tokens, "dtype": measure.dtype_name(dtype), "seed": seed,
            "bytes_base": lp.bytes_base, "bytes_lora": lp.bytes_lora, "tolerance": lp.tol,
            "tolerance_base": lp.tol_base,
            "bound_us_base": lp.bytes_base / bandwidth * 1e6 if bandwidth else None,
            "bound_us_lora": lp.bytes_lora / bandwidth * 1e6 if bandwidth else None}
    rows = []
    for impl in impls:
        rows.append(run_impl(impl, lp, timer, bandwidth))
        gc.collect()
    base_us = next((r["us_median"] for r in rows if r["kind"] == "base" and r["status"] == "ok"), None)
    info["base_us"] = base_us
    for r in rows:
        if base_us and r["status"] == "ok":
            r["ratio_to_base"] = r["us_median"] / base_us
    del lp
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"case": info, "rows": rows}


# ---- the sweep ---------------------------------------------------------------------------------------------


def _sweep_cases(args, gpu: bool) -> List[C.Case]:
    """One case per T of the sweep (the layer's shape and the adapters from the options, else the defaults)."""
    pick = {k: getattr(args, k) if getattr(args, k) is not None else v[0 if gpu else 1] for k, v in DEFAULTS.items()}
    if pick["adapters"] < 1 or pick["hidden_in"] < 1 or pick["hidden_out"] < 1:
        raise ValueError(f"expected --adapters, --hidden-in and --hidden-out >= 1, got {pick['adapters']}, "
                         f"{pick['hidden_in']}, {pick['hidden_out']}")
    return [replace(C.custom_case(f"T={T}", T, pick["hidden_in"], pick["hidden_out"], pick["adapters"],
                                  pick["ranks"], args.dist, args.frac_none, "shuffled"), note="decode sweep")
            for T in pick["tokens"]]


def _note(r: dict) -> str:
    if r["verified"] is not None:
        return "verified" if r["verified"] else "unverified"
    return f"path: {r['path']}" if r["path"] else ""


def format_table(rows: List[dict]) -> str:
    """T, row, status, us median [p25-p75], launches per call, % of the bytes bound, ratio to the base GEMV, and
    a note (the CUDA rows: verified or not on this GPU; lk.add_lora_: the path it took)."""
    hdr = ("T", "impl", "status", "us median [p25-p75]", "launches", "% bytes bound", "x base", "note")
    cells = [(str(r["T"]), r["impl"], r["status"], fmt_us(r), fmt(r["launches"], "d"),
              fmt(r["pct_bytes_bound"], ".1f"), fmt(r["ratio_to_base"], ".2f"), _note(r)) for r in rows]
    return render_table(hdr, cells, rows, group="T")


def run(args) -> int:
    """Run the sweep; returns 0 when every row passed its check (or was skipped), 1 otherwise, 2 on bad options."""
    import lora_kernels as lk

    gpu, device = pick_device(args.cpu)
    dtype = pick_dtype(args.dtype, gpu, cpu_default=torch.float16)
    try:
        cases = _sweep_cases(args, gpu)
        impls = _pick_impls(impls_for(device), args.impls)
    except ValueError as e:
        print(f"lora-bench linear: {e}", file=sys.stderr)
        return 2
    env, gpu_name, timer, roof, out_path, label = sweep_setup(args, gpu, device, dtype, "linear")
    c0 = cases[0]
    doc = sweep_doc(
        doc_header("linear", SCHEMA, gpu, label, env, args),
        dtype=measure.dtype_name(dtype),
        timing=timer.describe(),
        roof=roof.to_dict() if roof else None,
        layer={"in_features": c0.hidden_in, "out_features": c0.hidden_out, "bias": not args.no_bias,
               "adapters": c0.adapters, "ranks": list(c0.ranks), "dist": args.dist, "frac_none": args.frac_none,
               "tokens": [c.tokens for c in cases]},
        backends=_safe_report(lk),
        extension=lk._ext.status() if gpu else None,
        verified_kernels=sorted(lk.tuning.verified_kernels(device)),
        bytes_rule="bytes = W0 + bias + x + y (each once) + the active adapters' A and B at their ranks (LoRA "
                   "rows); % bytes bound = bytes / copy bandwidth / median",
        correctness_rule=("max|y - ref_fp32| <= 2 * max|y_torch - ref_fp32| + 1e-6 + rtol * max|ref_fp32| "
                          "(rtol 1e-3 bf16, 1e-4 fp16, 1e-6 fp32), finite; y_torch = F.linear + the naive loop "
                          "in dtype; rows adding into F.linear's output keep tokens with no adapter bit-identical"),
        launch_rule="kernels + memsets + copies of one eager call (torch profiler, CUDA activity); None on the CPU",
        impls=[{"name": i.name, "kind": i.kind, "what": i.what} for i in impls],
    )
    print_start("linear", label, measure.dtype_name(dtype), "" if roof is None else (
        f"{gpu_name}, {measure.dtype_name(dtype)}, {timer.describe()['method']}; "
        f"bytes bound at {roof.bandwidth / 1e12:.2f} TB/s ({roof.source})"))
    bw = roof.bandwidth if roof else None

    def one(case: C.Case) -> dict:
        try:
            return run_case(case, impls, dtype, device, timer, bw, not args.no_bias, args.seed)
        except Exception as e:
            setup = LinearImpl("(case setup)", "aux", "building the problem", None)
            return {"case": case.to_dict(), "rows": [_row(case.tokens, setup, "ERROR", why=err_text(e))]}

    t0 = run_sweep(cases, lambda c: c.name, one, doc, out_path, args.time_budget, "linear", not args.no_progress)
    finish_doc(doc, t0, out_path)
    print(format_table(doc["rows"]))
    print_footer(doc["skipped_cases"], label, out_path)
    return exit_status(doc["rows"], lambda r: f"T={r['T']}/{r['impl']}")
