"""``lora-bench sgmv``: time the batched LoRA delta of this library against the PyTorch baselines.

For every case (BENCHMARKS.md's table, or a shape from the command line) and every implementation:

1. build the problem deterministically (:func:`~lora_kernels.bench.cases.make_problem`);
2. run the implementation once eagerly and judge its output against the fp32 reference
   (:func:`~lora_kernels.bench.measure.check_output`); a failing implementation is reported ``FAIL`` and is
   never timed;
3. capture it in a CUDA graph, replay once and judge again (a graph that replays wrongly is a ``FAIL`` too);
4. time the replays with an L2 flush before each (median and quartiles);
5. derive GB/s (minimal bytes / median), % of the roofline and the speedup over the best passing baseline.

Without a GPU the same sweep runs on tiny CPU shapes with wall-clock timing, labelled "CPU smoke, not a GPU
measurement": it proves the command and the JSON, not any speed.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from . import cases as C
from . import envinfo, measure
from .common import (CPU_LABEL, DTYPES, add_out, add_seed_and_cpu, default_out_path, doc_header, exit_status,
                     finish_doc, fmt, fmt_us, pick_device, pick_dtype, print_footer, print_start, render_table,
                     run_sweep, sweep_doc)
from .common import err_text as _err_text
from .baselines import BmmGather, NaiveLoop

__all__ = ["add_arguments", "run", "Impl", "library_impls", "baseline_impls"]

SCHEMA = "lora_kernels.bench.sgmv/1"
# DTYPES and _err_text (from .common) stay importable from here: other benches import them from this module.


def _csv_ints(s: str) -> List[int]:
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {s!r}")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cases")
    g.add_argument("--cases", help="comma-separated names or globs of the named cases (see --list)")
    g.add_argument("--list", action="store_true", help="list the named cases and exit")
    g.add_argument("--smoke", action="store_true", help="run the tiny smoke cases (the default without a GPU)")
    g.add_argument("--no-extra", action="store_true", help="only BENCHMARKS.md's table rows (skip the extra cases)")
    g.add_argument("--tokens", type=_csv_ints, help="custom case(s): token count(s), e.g. 1,64,4096")
    g.add_argument("--hidden-in", type=int, help="custom case: input width")
    g.add_argument("--hidden-out", type=int, help="custom case: output width (default: --hidden-in)")
    g.add_argument("--adapters", type=int, help="custom case: adapter slots loaded")
    g.add_argument("--active", type=int, help="custom case: adapters the tokens draw from (default: all)")
    g.add_argument("--ranks", type=_csv_ints, help="ranks cycled over the adapters, e.g. 16 or 8,16,32,64,128")
    g.add_argument("--dist", choices=C.DISTRIBUTIONS, help="adapter popularity (overrides the cases' own)")
    g.add_argument("--frac-none", type=float, help="fraction of tokens with no adapter (-1)")
    g.add_argument("--order", choices=C.ORDERS, help="token layout: shuffled (decode) or contiguous (prefill)")
    g.add_argument("--name", help="custom case name")
    add_sweep_arguments(p, "sgmv", "implementation", "cases")


def add_sweep_arguments(p: argparse.ArgumentParser, bench: str, row: str, step: str) -> None:
    """The "measurement" and "output" option groups of a sweep like ``lora-bench <bench>`` (sgmv, linear):
    ``--dtype``, ``--impls`` (globs of ``row`` names), the timer's options (:func:`measure.add_timing_arguments`),
    ``--seed``, ``--cpu``, ``--time-budget`` (no new ``step`` started past it), ``--out``, ``--no-progress``."""
    g = p.add_argument_group("measurement")
    g.add_argument("--dtype", choices=sorted(DTYPES),
                   help="activation/weight dtype (default bf16 on a GPU, fp16 on CPU)")
    g.add_argument("--impls", help=f"comma-separated globs of {row} names to run (default: all)")
    measure.add_timing_arguments(g)
    add_seed_and_cpu(g)
    g.add_argument("--time-budget", type=float,
                   help=f"stop starting new {step} after this many seconds (the JSON keeps what ran)")
    g = p.add_argument_group("output")
    add_out(g, bench)
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


# ---- implementations -------------------------------------------------------------------------------------


@dataclass
class Impl:
    """One timed implementation. ``make(problem, y, state)`` returns the zero-argument callable that is
    checked, captured and timed; ``y`` is its output buffer (a copy of ``problem.y0``); ``state`` holds
    per-case objects shared by implementations (the built batch)."""

    name: str
    kind: str  # "lora_kernels" | "baseline" | "aux"
    backend: Optional[str]
    make: Callable[..., Callable[[], object]]


def library_impls(device: torch.device) -> List[Impl]:
    """This library's ops on ``device``: ``add_lora_`` and ``shrink`` + ``expand_`` with the backend the
    dispatcher picks (plus the Triton interpreter on CPU when ``TRITON_INTERPRET=1``), and the batch build."""
    import lora_kernels as lk

    sel = lk.backends.select("sgmv", device.type)
    backs = [sel]
    if device.type == "cpu" and lk.backends.interpreting() and lk.backends.triton_can_run("cpu") is None:
        backs.append("triton")
    out: List[Impl] = []
    for b in backs:
        out.append(Impl(f"lk.add_lora_[{b}]", "lora_kernels", b, _make_lib(b, add_body)))
    out.append(Impl(f"lk.shrink+expand_[{sel}]", "lora_kernels", sel, _make_lib(sel, two_op_body)))
    bb = lk.backends.select("batch", device.type)
    out.append(Impl(f"lk.LoRABatch.build[{bb}]", "aux", bb, _make_build(bb)))
    return out


def add_body(y: torch.Tensor, x: torch.Tensor, w, batch) -> None:
    """The library's one-op LoRA delta: ``lk.add_lora_(y, x, w, batch)``."""
    import lora_kernels as lk

    lk.add_lora_(y, x, w, batch)


def two_op_body(y: torch.Tensor, x: torch.Tensor, w, batch) -> None:
    """The library's two-op LoRA delta: ``h = lk.shrink(x, w, batch)`` then ``lk.expand_(y, h, w, batch)`` (on the
    Triton backend shrink zeroes h first: memset + shrink + expand, vLLM's three launches)."""
    import lora_kernels as lk

    lk.expand_(y, lk.shrink(x, w, batch), w, batch)


def _make_lib(backend: str, body: Callable[..., None]):
    """An :class:`Impl` maker running ``body(y, x, weights, batch)`` with ``backend`` forced."""

    def make(prob: C.Problem, y: torch.Tensor, state: dict):
        import lora_kernels as lk

        w, x, batch = prob.weights, prob.x, state["batch"]

        def fn():
            with lk.backends.use_backend(backend):
                body(y, x, w, batch)

        return fn

    return make


def _make_build(backend: str):
    def make(prob: C.Problem, y: torch.Tensor, state: dict):
        import lora_kernels as lk

        w = prob.weights
        b2 = lk.LoRABatch(max(1, prob.case.tokens), w.max_adapters, prob.x.device)
        state["build_batch"] = b2

        def fn():
            with lk.backends.use_backend(backend):
                b2.build(prob.ids, ranks=w.ranks, validate=False)

        return fn

    return make


def baseline_impls() -> List[Impl]:
    """The naive per-adapter loop and the padded gather + bmm (:mod:`lora_kernels.bench.baselines`)."""

    def mk(cls):
        def make(prob: C.Problem, y: torch.Tensor, state: dict):
            base = cls(prob.weights, prob.ids)
            x = prob.x
            return lambda: base(y, x)

        return make

    return [Impl(cls.name, "baseline", None, mk(cls)) for cls in (NaiveLoop, BmmGather)]


# ---- one case --------------------------------------------------------------------------------------------


def _reference(prob: C.Problem) -> torch.Tensor:
    import lora_kernels as lk

    with measure.exact_fp32():
        return prob.y0.float() + lk.reference.lora_delta(prob.x, prob.weights, prob.ids)


def _row(case: C.Case, impl: Impl, status: str, **kw) -> dict:
    r = {"case": case.name, "impl": impl.name, "kind": impl.kind, "backend": impl.backend, "status": status,
         "us_median": None, "us_p25": None, "us_p75": None, "us_min": None, "reps": 0, "gbps": None,
         "pct_roof": None, "speedup_vs_best_baseline": None, "graph": None, "graph_error": None,
         "err_max": None, "err_allowed": None, "rel_err": None, "why": ""}
    r.update(kw)
    return r


def run_impl(impl: Impl, prob: C.Problem, timer, state: dict, ref: torch.Tensor, none_mask: torch.Tensor,
             allowed: float, roof_s: Optional[float]) -> dict:
    """Check, capture and time one implementation on one problem (:func:`measure.checked_timing`); returns its
    JSON row."""
    case, dev = prob.case, prob.x.device
    y = prob.y0.clone()
    try:
        fn = impl.make(prob, y, state)
    except Exception as e:
        return _row(case, impl, "ERROR", why=_err_text(e))
    if impl.kind == "aux":
        res = measure.checked_timing(fn, lambda: _check_build(state), timer, dev, f"{case.name}/{impl.name}")
    else:
        res = measure.checked_timing(fn, lambda: measure.check_output(y, prob.y0, ref, none_mask, allowed), timer,
                                     dev, f"{case.name}/{impl.name}", reset=lambda: y.copy_(prob.y0))
    chk = res["check"] or {}
    base = {"err_max": chk.get("err_max"), "err_allowed": chk.get("err_allowed"), "rel_err": chk.get("rel_err")}
    if res["status"] != "ok":
        return _row(case, impl, res["status"], graph=res["graph"], why=res["why"], **base)
    q = res["q"]
    row = _row(case, impl, "ok", us_median=q["median"], us_p25=q["p25"], us_p75=q["p75"], us_min=q["min"],
               reps=q["n"], graph=res["graph"], graph_error=res["graph_error"], **base)
    if impl.kind != "aux" and q["median"] > 0:
        row["gbps"] = prob.bytes_min / (q["median"] * 1e-6) / 1e9
        if roof_s is not None:
            row["pct_roof"] = 100.0 * roof_s / (q["median"] * 1e-6)
    return row


def _check_build(state: dict) -> dict:
    """The timed builder's batch must equal the torch builder's (the reference) field by field."""
    got = state["build_batch"].to_dict()
    want = state["batch_ref"].to_dict()
    ok = got == want
    diff = [k for k in want if got.get(k) != want[k]]
    return {"ok": ok, "why": "" if ok else f"batch fields differ from the torch builder: {diff}"}


def run_case(case: C.Case, impls: List[Impl], dtype: torch.dtype, device: torch.device, timer,
             roof: Optional[measure.Roof], seed: int) -> Dict[str, object]:
    """Every implementation on one case. Returns ``{"case": ..., "rows": [...]}``."""
    import lora_kernels as lk

    prob = C.make_problem(case, dtype, device, seed=seed)
    w = prob.weights
    state: dict = {}
    state["batch"] = lk.LoRABatch(max(1, case.tokens), w.max_adapters, device).build(prob.ids, ranks=w.ranks)
    with lk.backends.use_backend("reference"):
        state["batch_ref"] = lk.LoRABatch(max(1, case.tokens), w.max_adapters, device).build(prob.ids, ranks=w.ranks)
    ref = _reference(prob)
    y_torch = NaiveLoop(w, prob.ids)(prob.y0.clone(), prob.x)
    tol = measure.tolerance(ref, y_torch, dtype)
    none_mask = prob.ids < 0
    roof_s = roof.seconds(prob.bytes_min, prob.flops) if roof is not None else None
    info = {**case.to_dict(), **prob.info, "dtype": measure.dtype_name(dtype), "seed": seed,
            "roof_us": roof_s * 1e6 if roof_s is not None else None, "tolerance": tol}
    rows = []
    for impl in impls:
        if impl.name == BmmGather.name and device.type == "cuda":
            need = BmmGather.workspace_bytes(w, case.tokens)
            free = torch.cuda.mem_get_info(device)[0]
            if need > 0.5 * free:
                rows.append(_row(case, impl, "SKIP", why=f"needs {need / 2**30:.1f} GiB of gathered weights, "
                                                          f"{free / 2**30:.1f} GiB free"))
                continue
        rows.append(run_impl(impl, prob, timer, state, ref, none_mask, tol["allowed"], roof_s))
        gc.collect()
    ok_base = [r["us_median"] for r in rows if r["kind"] == "baseline" and r["status"] == "ok"]
    best = min(ok_base) if ok_base else None
    info["best_baseline_us"] = best
    for r in rows:
        if best is not None and r["status"] == "ok" and r["kind"] != "aux" and r["us_median"]:
            r["speedup_vs_best_baseline"] = best / r["us_median"]
    del prob, state, ref, y_torch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"case": info, "rows": rows}


# ---- the sweep -------------------------------------------------------------------------------------------


def _pick_cases(args, gpu: bool) -> List[C.Case]:
    custom = any(v is not None for v in (args.tokens, args.hidden_in, args.hidden_out, args.adapters, args.ranks))
    if custom:
        h_in = args.hidden_in or (4096 if gpu and not args.smoke else 64)
        h_out = args.hidden_out or h_in
        adapters = args.adapters or (64 if gpu and not args.smoke else 4)
        ranks = args.ranks or [16 if gpu else 8]
        out = []
        for T in args.tokens or [256 if gpu and not args.smoke else 16]:
            nm = args.name if args.name and len(args.tokens or [0]) == 1 else None
            out.append(C.custom_case(nm, T, h_in, h_out, adapters, ranks, args.dist or "uniform",
                                     args.frac_none or 0.0, args.order or "shuffled", args.active))
        return out
    pool = C.SMOKE_CASES if (args.smoke or not gpu) else C.NAMED_CASES
    if args.cases and not args.smoke and not gpu:
        pool = C.SMOKE_CASES + C.NAMED_CASES  # naming a GPU case on the CPU is allowed (and slow)
    picked = C.select_cases(args.cases, pool, include_extra=not args.no_extra)
    return [C.override(c, args.dist, args.frac_none, args.order) for c in picked]


def _pick_impls(all_impls: List[Impl], patterns: Optional[str]) -> List[Impl]:
    if not patterns:
        return all_impls
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    out = [i for i in all_impls if any(fnmatch.fnmatchcase(i.name, p) for p in pats)]
    if not out:
        raise ValueError(f"--impls: expected globs matching {[i.name for i in all_impls]}, got {patterns!r}")
    return out


def format_table(rows: List[dict]) -> str:
    """The printed table: case, impl, status, us median [p25-p75], GB/s, % of roof, speedup vs best baseline."""
    hdr = ("case", "impl", "status", "us median [p25-p75]", "GB/s", "% roof", "speedup")
    cells = [(r["case"], r["impl"], r["status"], fmt_us(r), fmt(r["gbps"], ".4g"), fmt(r["pct_roof"], ".1f"),
              fmt(r["speedup_vs_best_baseline"], ".2f") + ("x" if r["speedup_vs_best_baseline"] is not None else ""))
             for r in rows]
    return render_table(hdr, cells, rows, group="case")


def run(args) -> int:
    """Run the sweep; returns 0 when every row passed its check (or was skipped), 1 otherwise."""
    import lora_kernels as lk

    if args.list:
        for c in C.NAMED_CASES + C.SMOKE_CASES:
            print(f"{c.name:28s} T={c.tokens:<5d} {c.hidden_in}->{c.hidden_out} adapters={c.adapters} "
                  f"ranks={','.join(map(str, c.ranks))} dist={c.dist}{' (extra)' if c.extra else ''}  {c.note}")
        return 0
    gpu, device = pick_device(args.cpu)
    dtype = pick_dtype(args.dtype, gpu, cpu_default=torch.float16)
    try:
        cases = _pick_cases(args, gpu)
        impls = _pick_impls(library_impls(device) + baseline_impls(), args.impls)
    except ValueError as e:
        print(f"lora-bench sgmv: {e}", file=sys.stderr)
        return 2
    env, gpu_name, timer, roof, out_path, label = sweep_setup(args, gpu, device, dtype, "sgmv")
    doc = sweep_doc(
        doc_header("sgmv", SCHEMA, gpu, label, env, args),
        dtype=measure.dtype_name(dtype),
        timing=timer.describe(),
        roof=roof.to_dict() if roof else None,
        backends=_safe_report(lk),
        correctness_rule=("max|y - ref_fp32| <= 2 * max|y_torch - ref_fp32| + 1e-6 + rtol * max|ref_fp32| "
                          "(rtol 1e-3 bf16, 1e-4 fp16, 1e-6 fp32), "
                          "finite, tokens with no adapter bit-identical; y_torch = naive loop in dtype"),
        impls=[{"name": i.name, "kind": i.kind, "backend": i.backend} for i in impls],
    )
    print_start("sgmv", label, measure.dtype_name(dtype), "" if roof is None else (
        f"{gpu_name}, {measure.dtype_name(dtype)}, {timer.describe()['method']}; "
        f"roof: {roof.bandwidth / 1e12:.2f} TB/s, {roof.peak / 1e12:.0f} TFLOP/s ({roof.source})"))

    def one(case: C.Case) -> dict:
        try:
            return run_case(case, impls, dtype, device, timer, roof, args.seed)
        except Exception as e:
            return {"case": case.to_dict(), "rows": [_row(case, Impl("(case setup)", "aux", None, None), "ERROR",
                                                          why=_err_text(e))]}

    t0 = run_sweep(cases, lambda c: c.name, one, doc, out_path, args.time_budget, "sgmv", not args.no_progress)
    finish_doc(doc, t0, out_path)
    print(format_table(doc["rows"]))
    print_footer(doc["skipped_cases"], label, out_path)
    return exit_status(doc["rows"], lambda r: f"{r['case']}/{r['impl']}")


def sweep_setup(args, gpu: bool, device: torch.device, dtype: torch.dtype, bench: str) -> tuple:
    """What a sweep (``lora-bench sgmv``, ``linear``) sets up from its options (:func:`add_sweep_arguments`):
    ``(env, gpu_name, timer, roof, out_path, label)``: the environment record and GPU name (None on the CPU), the
    timer, the GPU's roofline (None on the CPU), the JSON path (``--out`` or the bench's default) and the CPU
    label (None on a GPU)."""
    env = envinfo.collect(device)
    gpu_name = env["gpu"]["name"] if env["gpu"] else None
    timer = measure.make_timer(device, args.reps, args.warmup, use_graphs=not args.no_graphs, flush=args.l2_flush)
    roof = measure.roof_for_device(device, dtype, measure=args.measure_roof) if gpu else None
    out_path = args.out or default_out_path(gpu_name, prefix=bench)
    return env, gpu_name, timer, roof, out_path, None if gpu else CPU_LABEL


def _safe_report(lk) -> Dict[str, str]:
    try:
        return lk.backends.report()
    except Exception as e:  # never let the environment report break a measurement
        return {"error": _err_text(e)}
