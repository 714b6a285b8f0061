"""``lora-bench merge``: time merge, unmerge and the whole-model mode switch against PyTorch baselines.

Sections:

* ``layer``: one weight of each 7B shape (q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008), one
  adapter of rank ``--rank``: ``merge`` (``W += s B A``) and ``unmerge`` (undo it).
* ``model``: ``--layers`` decoder layers x 7 projections as :class:`~lora_kernels.nn.LoRALinear` (32 layers:
  6.5 G weights, 13 GB in bf16): ``merge`` (unmerged -> merged m, every layer), ``unmerge`` (back), and
  ``switch`` (merged m -> merged k: unmerge m then merge k).

Implementations: ``lk.merge_[exact|approx]`` / ``lk.merge_many_[exact|approx]`` (this library; one grouped
launch over all layers for the model), ``lk.ModeController`` (model only, eager: ``set_mode`` with its Python
overhead), ``torch.addmm_`` (``W.addmm_(B, A, alpha=+-s)`` per layer) and ``peft-loop`` (PEFT's
``W += (B @ A) * s`` in W's dtype, then ``W -= ...`` recomputed, per layer).

Timing: the two directions (merge then unmerge, or switch m->k then k->m) alternate, each captured in its own
CUDA graph when it can be (eagerly otherwise), with an L2 flush before each timed replay and CUDA events
around it (:mod:`lora_kernels.bench.measure`); median and quartiles in us. Bytes bound per direction:
read W + write W + A + B (``bytes``; the same for every implementation), and with the side data of an exact
record (2 bits per weight: ``bytes_with_side``); % of roof = bytes / copy bandwidth / median. The switch moves
both passes (unmerge + merge).

Exactness: after one eager merge + unmerge cycle, and again after all the timed cycles, each weight is
compared with its original: ``mismatch_frac`` (after one) and ``mismatch_frac_after`` (after all) are the
fractions of weights no longer bit-identical; an exact implementation FAILs unless both are 0. The merged
weight of the layer cases is also judged against the fp32 reference (the project's rule, with
``torch.addmm_`` as the low-precision baseline). Without a GPU: a CPU smoke run on small shapes, labelled so.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import common, envinfo, measure
from .common import (CPU_LABEL, DTYPES, add_out, add_seed_and_cpu, budget_spent, budget_why, doc_header, failed_rows,
                     finish_doc, pick_device, write_json)
from .common import err_text as _err_text
from .common import fmt, fmt_us, not_ok, print_footer, render_table

__all__ = ["add_arguments", "run", "SCHEMA"]

SCHEMA = "lora_kernels.bench.merge/1"
PROJ = ("q", "k", "v", "o", "gate", "up", "down")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("shapes")
    g.add_argument("--sections", default="layer,model", help="comma-separated: layer, model (default both)")
    g.add_argument("--layers", type=int, help="decoder layers of the model section (default 32 GPU, 1 CPU)")
    g.add_argument("--hidden", type=int, help="hidden size (default 4096 GPU, 64 CPU)")
    g.add_argument("--mlp", type=int, help="MLP size (default 11008 GPU, 176 CPU)")
    g.add_argument("--rank", type=int, help="adapter rank (default 16 GPU, 8 CPU)")
    g = p.add_argument_group("measurement")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight dtype (default bf16)")
    g.add_argument("--impls", help="comma-separated substrings of implementation names to run (default: all)")
    g.add_argument("--reps", type=int, help="timed cycles per implementation (default 50 GPU layer, 10 GPU "
                                            "model, 5 CPU)")
    g.add_argument("--warmup", type=int, default=2, help="untimed cycles before timing")
    g.add_argument("--no-graphs", action="store_true", help="time eager launches instead of CUDA graph replays")
    g.add_argument("--l2-flush", choices=measure.FLUSH_MODES, default="read", help="L2 flush before each replay")
    g.add_argument("--measure-roof", action="store_true", help="measure the copy bandwidth even for a known GPU")
    add_seed_and_cpu(g)
    g.add_argument("--time-budget", type=float, help="stop starting new cases after this many seconds")
    g = p.add_argument_group("output")
    add_out(g, "merge")
    g.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


# ---- problems --------------------------------------------------------------------------------------------


@dataclass
class Layer:
    name: str
    W: torch.Tensor  # [out, in]
    w: object  # LoRAWeights holding adapters 0 and 1


def _make_layer(name: str, out_f: int, in_f: int, rank: int, dtype, device, gen: torch.Generator,
                gen_w: torch.Generator) -> Layer:
    """W ~ N(0, 0.02^2) drawn on ``device`` (``gen_w``: 13 GB of weights are not drawn on the host); two
    adapters (ids 0, 1) of ``rank`` with A ~ U(+-1/sqrt(in)), B ~ N(0, 0.01^2), alpha = 2 rank."""
    import lora_kernels as lk

    W = torch.empty(out_f, in_f, device=device, dtype=torch.float32 if dtype != torch.float32 else dtype)
    W.normal_(0.0, 0.02, generator=gen_w)
    W = W.to(dtype)
    w = lk.LoRAWeights(in_f, out_f, max_adapters=2, max_rank=rank, dtype=dtype, device=device)
    for _ in range(2):
        A = (torch.rand(rank, in_f, generator=gen) * 2 - 1) / in_f ** 0.5
        B = torch.randn(out_f, rank, generator=gen) * 0.01
        w.add(A, B, alpha=2 * rank)
    return Layer(name, W, w)


def _shapes(hidden: int, mlp: int) -> List[Tuple[str, int, int]]:
    return [(p, mlp if p in ("gate", "up") else hidden, mlp if p == "down" else hidden) for p in PROJ]


def _layer_bytes(layer: Layer, adapter: int = 0) -> Tuple[float, float]:
    W = layer.W
    A, B, _ = layer.w.adapter(adapter)
    ab = (A.numel() + B.numel()) * A.element_size()
    base = 2 * W.numel() * W.element_size() + ab
    return float(base), float(base + W.numel() / 4)  # + 2 bits of side data per weight


# ---- implementations: (forward, backward) pairs over a list of layers -------------------------------------


def _merge_ops():
    try:
        mod = importlib.import_module("lora_kernels.ops.merge")
    except Exception as e:
        return None, f"lora_kernels.ops.merge unavailable: {type(e).__name__}: {e}".splitlines()[0][:200]
    for n in ("merge_", "unmerge_", "merge_many_", "unmerge_many_"):
        if not hasattr(mod, n):
            return None, f"lora_kernels.ops.merge has no {n}"
    return mod, None


def _sb(layer: Layer, a: int):
    A, B, s = layer.w.adapter(a)
    return A, B, s


def pair_lk_layer(layers: List[Layer], a: int, k: Optional[int], exact: bool):
    ops, why = _merge_ops()
    if ops is None:
        raise _Skip(why)
    st: Dict[str, object] = {}
    L = layers[0]
    if k is None:
        def fwd():
            st["rec"] = ops.merge_(L.W, L.w, [a], exact=exact)

        def bwd():
            ops.unmerge_(L.W, st.pop("rec"))
        return fwd, bwd, None
    raise ValueError("layer cases have no switch")


def pair_lk_many(layers: List[Layer], a: int, k: Optional[int], exact: bool):
    ops, why = _merge_ops()
    if ops is None:
        raise _Skip(why)
    Ws = [L.W for L in layers]
    ws = [L.w for L in layers]
    st: Dict[str, object] = {}
    if k is None:
        def fwd():
            st["recs"] = ops.merge_many_(Ws, ws, [a], exact=exact)

        def bwd():
            ops.unmerge_many_(Ws, st.pop("recs"))
        return fwd, bwd, None
    # switch: a is merged before timing; fwd = a -> k, bwd = k -> a
    st["recs"] = ops.merge_many_(Ws, ws, [a], exact=exact)

    def to_k():
        ops.unmerge_many_(Ws, st.pop("recs"))
        st["recs"] = ops.merge_many_(Ws, ws, [k], exact=exact)

    def to_a():
        ops.unmerge_many_(Ws, st.pop("recs"))
        st["recs"] = ops.merge_many_(Ws, ws, [a], exact=exact)

    def cleanup():
        ops.unmerge_many_(Ws, st.pop("recs"))
    return to_k, to_a, cleanup


def pair_controller(layers: List[Layer], a: int, k: Optional[int], exact: bool, model=None):
    from ..nn import LoRALinear, ModeController

    if not hasattr(LoRALinear, "set_serving_mode"):
        raise _Skip("LoRALinear has no set_serving_mode (mixed mode not in this build)")
    ops, why = _merge_ops()
    if ops is None:
        raise _Skip(why)
    ctl = ModeController(model, exact=exact)
    if k is None:
        return (lambda: ctl.set_mode("merged", a)), (lambda: ctl.set_mode("unmerged")), None
    ctl.set_mode("merged", a)
    return (lambda: ctl.set_mode("merged", k)), (lambda: ctl.set_mode("merged", a)), \
        (lambda: ctl.set_mode("unmerged"))


def _addmm(L: Layer, a: int, sign: float):
    A, B, s = _sb(L, a)
    L.W.addmm_(B, A, alpha=sign * s)


def _peft(L: Layer, a: int, sign: float):
    A, B, s = _sb(L, a)
    delta = (B @ A) * s  # PEFT's get_delta_weight: in the weights' dtype
    if sign > 0:
        L.W.add_(delta)
    else:
        L.W.sub_(delta)


def _loop_pair(step: Callable[[Layer, int, float], None]):
    def make(layers: List[Layer], a: int, k: Optional[int], exact: bool):
        def run(adapter_sign):
            def f():
                for L in layers:
                    for ad, sg in adapter_sign:
                        step(L, ad, sg)
            return f
        if k is None:
            return run([(a, 1.0)]), run([(a, -1.0)]), None
        step_all = run([(a, 1.0)])
        step_all()
        return run([(a, -1.0), (k, 1.0)]), run([(k, -1.0), (a, 1.0)]), run([(a, -1.0)])
    return make


class _Skip(Exception):
    pass


@dataclass
class Impl:
    name: str
    kind: str  # lora_kernels | baseline
    exact: bool
    make: Callable
    graphs: bool = True
    model_only: bool = False


def impls_for(section: str) -> List[Impl]:
    lk_pair = pair_lk_layer if section == "layer" else pair_lk_many
    nm = "lk.merge_" if section == "layer" else "lk.merge_many_"
    out = [Impl(f"{nm}[exact]", "lora_kernels", True, lambda *a, **kw: lk_pair(*a[:3], True)),
           Impl(f"{nm}[approx]", "lora_kernels", False, lambda *a, **kw: lk_pair(*a[:3], False))]
    if section == "model":
        out.append(Impl("lk.ModeController[exact]", "lora_kernels", True,
                        lambda layers, a, k, exact, model=None: pair_controller(layers, a, k, True, model),
                        graphs=False, model_only=True))
    out.append(Impl("torch.addmm_", "baseline", False, lambda *a, **kw: _loop_pair(_addmm)(*a[:3], False)))
    out.append(Impl("peft-loop", "baseline", False, lambda *a, **kw: _loop_pair(_peft)(*a[:3], False)))
    return out


# ---- timing ----------------------------------------------------------------------------------------------


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _capture_pair(fwd, bwd, device):
    """Warm up and capture ``fwd`` and ``bwd`` in two graphs. Returns (run_f, run_b, graphed, error)."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(2):
            fwd()
            bwd()
    torch.cuda.current_stream(device).wait_stream(s)
    torch.cuda.synchronize(device)
    gf, gb = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(gf):
            fwd()
        with torch.cuda.graph(gb):
            bwd()
    except Exception as e:
        torch.cuda.synchronize(device)
        return fwd, bwd, False, f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return gf.replay, gb.replay, True, None


def _time_pair(timer, run_f, run_b, reps: int, warmup: int) -> Tuple[List[float], List[float]]:
    for _ in range(warmup):
        run_f()
        run_b()
    tf: List[float] = []
    tb: List[float] = []
    if isinstance(timer, measure.GpuTimer):
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(2 * reps)]
        for i in range(reps):
            for j, run in ((0, run_f), (1, run_b)):
                timer.flush()
                s, e = ev[2 * i + j]
                s.record()
                run()
                e.record()
        torch.cuda.synchronize(timer.device)
        for i in range(reps):
            tf.append(ev[2 * i][0].elapsed_time(ev[2 * i][1]) * 1e3)
            tb.append(ev[2 * i + 1][0].elapsed_time(ev[2 * i + 1][1]) * 1e3)
        return tf, tb
    for _ in range(reps):
        for run, acc in ((run_f, tf), (run_b, tb)):
            t0 = time.perf_counter()
            run()
            acc.append((time.perf_counter() - t0) * 1e6)
    return tf, tb


def _mismatch(layers: List[Layer], originals: List[torch.Tensor]) -> float:
    n = sum(W0.numel() for W0 in originals)
    bad = 0
    for L, W0 in zip(layers, originals):
        # bitwise: compare the raw bits (NaN-safe, distinguishes +0 / -0)
        bad += int((L.W.view(_int_view(L.W.dtype)) != W0.view(_int_view(W0.dtype))).sum())
    return bad / max(n, 1)


def _int_view(dtype):
    return {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]


def _restore(layers: List[Layer], originals: List[torch.Tensor]) -> None:
    with torch.no_grad():
        for L, W0 in zip(layers, originals):
            L.W.copy_(W0)


def _row(case: str, impl: Impl, op: str, status: str, **kw) -> dict:
    r = {"case": case, "impl": impl.name, "kind": impl.kind, "exact": impl.exact, "op": op, "status": status,
         "us_median": None, "us_p25": None, "us_p75": None, "us_min": None, "reps": 0, "bytes": None,
         "bytes_with_side": None, "gbps": None, "pct_roof": None, "pct_roof_with_side": None, "graph": None,
         "graph_error": None, "mismatch_frac": None, "mismatch_frac_after": None, "cycles": None,
         "bit_exact": None, "merged_err_max": None, "merged_err_allowed": None, "why": ""}
    r.update(kw)
    return r


def _merged_check(layers: List[Layer], originals, a: int) -> Optional[dict]:
    """Judge the merged weight of a single-layer case against the fp32 reference (addmm_ as the baseline)."""
    if len(layers) != 1:
        return None
    L, W0 = layers[0], originals[0]
    A, B, s = _sb(L, a)
    ref = W0.float() + s * (B.float() @ A.float())
    y_torch = W0.clone().addmm_(B, A, alpha=s)
    tol = measure.tolerance(ref, y_torch, W0.dtype)
    none = torch.zeros(W0.shape[0], dtype=torch.bool, device=W0.device)
    return measure.check_output(L.W, W0, ref, none, tol["allowed"])


def run_impl(case: str, impl: Impl, layers: List[Layer], originals, ops: List[str], switch: bool, timer,
             reps: int, warmup: int, roof: Optional[measure.Roof], bytes_pair, model=None) -> List[dict]:
    """Check, capture and time one implementation on one case; returns one row per direction."""
    device = layers[0].W.device
    a, k = 0, (1 if switch else None)
    rows: List[dict] = []
    cleanup = None
    try:
        with torch.no_grad():
            fwd, bwd, cleanup = impl.make(layers, a, k, impl.exact, model=model)
            # one eager cycle: exactness (and the merged weight, for single layers)
            fwd()
            _sync(device)
            chk = None if switch else _merged_check(layers, originals, a)
            bwd()
            _sync(device)
            if cleanup is not None:
                cleanup()
                _sync(device)
            mis1 = _mismatch(layers, originals)
            _restore(layers, originals)
            if switch:
                fwd, bwd, cleanup = impl.make(layers, a, k, impl.exact, model=model)
            graphed, gerr = False, "graphs disabled" if not impl.graphs else None
            run_f, run_b = fwd, bwd
            if isinstance(timer, measure.GpuTimer) and timer.use_graphs and impl.graphs:
                run_f, run_b, graphed, gerr = _capture_pair(fwd, bwd, device)
            with measure.nvtx_range(f"merge/{case}/{impl.name}"):
                tf, tb = _time_pair(timer, run_f, run_b, reps, warmup)
            _sync(device)
            if cleanup is not None:
                cleanup()
                _sync(device)
            # the eager check cycle, the capture warm-up (GPU) and every warm-up and timed cycle
            cycles = 1 + (2 if isinstance(timer, measure.GpuTimer) and timer.use_graphs and impl.graphs else 0) \
                + warmup + reps
            mis_n = _mismatch(layers, originals)
    except _Skip as e:
        _restore(layers, originals)
        return [_row(case, impl, op, "SKIP", why=str(e)) for op in ops]
    except Exception as e:
        _restore(layers, originals)
        return [_row(case, impl, op, "ERROR", why=_err_text(e)) for op in ops]
    _restore(layers, originals)
    exact_ok = mis1 == 0.0 and mis_n == 0.0
    status, why = "ok", ""
    if impl.exact and not exact_ok:
        status, why = "FAIL", f"not bit-exact after unmerge: {mis1:.3g} of weights differ after one cycle, " \
                              f"{mis_n:.3g} after {cycles}"
    if chk is not None and not chk["ok"]:
        status, why = "FAIL", "merged weight: " + chk["why"]
    for op, ts in zip(ops, (tf, tb)):
        q = measure.quantiles(ts)
        nb, nbs = bytes_pair[op]
        sec = q["median"] * 1e-6
        r = _row(case, impl, op, status, why=why, us_median=q["median"], us_p25=q["p25"], us_p75=q["p75"],
                 us_min=q["min"], reps=q["n"], bytes=nb, bytes_with_side=nbs if impl.exact else None,
                 gbps=nb / sec / 1e9 if sec > 0 else None, graph=graphed, graph_error=gerr, mismatch_frac=mis1,
                 mismatch_frac_after=mis_n, cycles=cycles, bit_exact=exact_ok,
                 merged_err_max=chk["err_max"] if chk else None,
                 merged_err_allowed=chk["err_allowed"] if chk else None)
        if roof is not None and sec > 0:
            r["pct_roof"] = 100.0 * roof.seconds(nb, 0.0) / sec
            if impl.exact:
                r["pct_roof_with_side"] = 100.0 * roof.seconds(nbs, 0.0) / sec
        rows.append(r)
    return rows


# ---- the sweep -------------------------------------------------------------------------------------------


def default_out_path(gpu_name: Optional[str]) -> str:
    return common.default_out_path(gpu_name, prefix="merge")


def format_table(rows: List[dict]) -> str:
    """case, impl, op, status, us median [p25-p75], GB/s, % roof (with side data), mismatch after 1/N cycles."""
    hdr = ("case", "impl", "op", "status", "us median [p25-p75]", "GB/s", "% roof", "mismatch 1 / N cycles")
    cells = []
    for r in rows:
        pr = fmt(r["pct_roof"], ".1f")
        if r.get("pct_roof_with_side") is not None:
            pr += f" ({r['pct_roof_with_side']:.1f})"
        mm = "-" if r["mismatch_frac"] is None else f"{r['mismatch_frac']:.2%} / {r['mismatch_frac_after']:.2%}"
        cells.append((r["case"], r["impl"], r["op"], r["status"], fmt_us(r, ".1f"), fmt(r["gbps"], ".4g"), pr, mm))
    # the two directions of a cycle share one why: printed once, under the first
    return render_table(hdr, cells, rows, group="case",
                        show_why=lambda r: not_ok(r) and r["op"] in ("merge", "switch m->k"))


def _build_model(layers: List[Layer]):
    from ..nn import LoRALinear

    mods = []
    for L in layers:
        lin = torch.nn.Linear(L.W.shape[1], L.W.shape[0], bias=False, device="meta")
        lin.weight = torch.nn.Parameter(L.W, requires_grad=False)
        mods.append(LoRALinear(lin, L.w))
    return torch.nn.ModuleList(mods)


def run(args) -> int:
    """Run the benchmark; returns 0 when every row passed (or was skipped), 1 otherwise, 2 on bad arguments."""
    gpu, device = pick_device(args.cpu)
    dtype = DTYPES[args.dtype]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in ("layer", "model")]
    if bad or not sections:
        print(f"lora-bench merge: --sections: expected layer and/or model, got {args.sections!r}", file=sys.stderr)
        return 2
    hidden = args.hidden or (4096 if gpu else 64)
    mlp = args.mlp or (11008 if gpu else 176)
    rank = args.rank or (16 if gpu else 8)
    n_layers = args.layers if args.layers is not None else (32 if gpu else 1)
    if min(hidden, mlp, rank, n_layers) < 1:
        print("lora-bench merge: --hidden, --mlp, --rank and --layers must be >= 1", file=sys.stderr)
        return 2
    env = envinfo.collect(device)
    gpu_name = env["gpu"]["name"] if env["gpu"] else None
    timer = measure.make_timer(device, 1, 0, use_graphs=not args.no_graphs, flush=args.l2_flush)
    roof = measure.roof_for_device(device, dtype, measure=args.measure_roof) if gpu else None
    out_path = args.out or default_out_path(gpu_name)
    label = None if gpu else CPU_LABEL
    tdesc = timer.describe()
    tdesc.update({"reps": "per case (see rows)", "pairs": "merge/unmerge (or switch m->k / k->m) alternate, "
                  "each direction its own graph and its own timed replay"})
    doc = {
        **doc_header("merge", SCHEMA, gpu, label, env, args),
        "dtype": measure.dtype_name(dtype), "timing": tdesc, "roof": roof.to_dict() if roof else None,
        "shapes": {"hidden": hidden, "mlp": mlp, "rank": rank, "layers": n_layers, "projections": list(PROJ)},
        "bytes_rule": ("per direction: read W + write W + A + B in W's dtype (bytes); + 2 bits per weight of side "
                       "data for an exact record (bytes_with_side); a switch = unmerge + merge"),
        "exactness_rule": ("mismatch_frac: fraction of weights not bit-identical to the original after one "
                           "merge + unmerge (or switch there and back) cycle; mismatch_frac_after: after every "
                           "timed cycle; exact implementations must have both 0"),
        "cases": [], "rows": [], "skipped_cases": [], "complete": False,
    }
    if label:
        print(f"lora-bench merge: {label} ({measure.dtype_name(dtype)} on the CPU, wall-clock timing)")
    else:
        print(f"lora-bench merge: {gpu_name}, {measure.dtype_name(dtype)}, {tdesc['method']}; roof "
              f"{roof.bandwidth / 1e12:.2f} TB/s ({roof.source})")
    pats = [p.strip() for p in (args.impls or "").split(",") if p.strip()]
    gen = torch.Generator().manual_seed(args.seed)
    gen_w = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if not args.no_progress:
            print(f"[merge {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def budget_left(name: str) -> bool:
        if budget_spent(args.time_budget, t0):
            doc["skipped_cases"].append({"case": name, "why": budget_why(args.time_budget)})
            return False
        return True

    def impls(section: str) -> List[Impl]:
        return [i for i in impls_for(section) if not pats or any(p in i.name for p in pats)]

    if "layer" in sections:
        seen = set()
        for proj, out_f, in_f in _shapes(hidden, mlp):
            if (out_f, in_f) in seen:
                continue
            seen.add((out_f, in_f))
            name = f"layer-{out_f}x{in_f}-r{rank}"
            if not budget_left(name):
                continue
            L = _make_layer(proj, out_f, in_f, rank, dtype, device, gen, gen_w)
            orig = [L.W.clone()]
            nb = _layer_bytes(L)
            reps = args.reps or (50 if gpu else 5)
            doc["cases"].append({"case": name, "section": "layer", "out": out_f, "in": in_f, "rank": rank,
                                 "projections": [p for p, o, i in _shapes(hidden, mlp) if (o, i) == (out_f, in_f)],
                                 "bytes_per_direction": nb[0]})
            for impl in impls("layer"):
                log(f"{name} {impl.name}")
                doc["rows"].extend(run_impl(name, impl, [L], orig, ["merge", "unmerge"], False, timer, reps,
                                            args.warmup, roof, {"merge": nb, "unmerge": nb}))
                _write(out_path, doc)
            del L, orig
            gc.collect()
    if "model" in sections:
        name = f"model-{n_layers}x7-r{rank}"
        if budget_left(name):
            layers = [_make_layer(p, o, i, rank, dtype, device, gen, gen_w) for _ in range(n_layers)
                      for p, o, i in _shapes(hidden, mlp)]
            orig = [L.W.clone() for L in layers]
            model = _build_model(layers)
            b = [_layer_bytes(L) for L in layers]
            nb = (sum(x for x, _ in b), sum(y for _, y in b))
            reps = args.reps or (10 if gpu else 3)
            doc["cases"].append({"case": name, "section": "model", "layers": n_layers, "weights": len(layers),
                                 "elements": sum(L.W.numel() for L in layers), "rank": rank,
                                 "bytes_per_direction": nb[0]})
            # Host planning per switch, cold and warm plan cache (kernel launch stubbed): its own field.
            try:
                from .merge_host import host_planning

                hp = host_planning([L.W for L in layers], [L.w for L in layers], list(model), 0, 1)
            except Exception as e:  # noqa: BLE001 - reported, never fatal to the timed rows
                hp = {"error": _err_text(e)}
            doc["cases"][-1]["host_planning"] = hp
            doc.setdefault("host_planning", {})[name] = hp
            log(f"{name} host planning (ms, cold/warm): " + ", ".join(
                f"{op} {hp[op + '_cold_ms']:.2f}/{hp[op + '_warm_ms']:.2f}" for op in
                ("merge", "unmerge", "switch", "set_mode") if op + "_cold_ms" in hp))
            if not _restore_ok(layers, orig):
                raise RuntimeError("lora-bench merge: host planning measurement changed the weights")
            for impl in impls("model"):
                for switch, ops, bp in ((False, ["merge", "unmerge"], {"merge": nb, "unmerge": nb}),
                                        (True, ["switch m->k", "switch k->m"],
                                         {"switch m->k": (2 * nb[0], 2 * nb[1]),
                                          "switch k->m": (2 * nb[0], 2 * nb[1])})):
                    if not budget_left(f"{name}/{impl.name}/{'switch' if switch else 'merge'}"):
                        continue
                    log(f"{name} {impl.name} {'switch' if switch else 'merge/unmerge'}")
                    doc["rows"].extend(run_impl(name, impl, layers, orig, ops, switch, timer, reps, args.warmup,
                                                roof, bp, model=model))
                    _write(out_path, doc)
                    if gpu:
                        torch.cuda.empty_cache()
            del layers, orig, model
            gc.collect()
    finish_doc(doc, t0, out_path)
    print(format_table(doc["rows"]))
    for case, hp in doc.get("host_planning", {}).items():
        if "error" in hp:
            print(f"host planning {case}: ERROR {hp['error']}")
            continue
        print(f"host planning {case} ({hp['weights']} weights, launch stubbed, ms cold/warm): " + ", ".join(
            f"{op} {hp[op + '_cold_ms']:.2f}/{hp[op + '_warm_ms']:.2f}" for op in
            ("merge", "unmerge", "switch", "set_mode") if op + "_cold_ms" in hp))
    print_footer(doc["skipped_cases"], label, out_path)
    badr = failed_rows(doc["rows"])
    if badr:
        print(f"{len(badr)} row(s) FAILED or ERRORED: " + ", ".join(sorted({f"{r['case']}/{r['impl']}" for r in badr})))
    return 1 if badr else 0


def _restore_ok(layers: List[Layer], originals: List[torch.Tensor]) -> bool:
    return _mismatch(layers, originals) == 0


_write = write_json
