"""``lora-bench vce``: deform_pool (VCE's multi-scale deformable pooling), forward and forward+backward.

Cases (GPU): the VCE shape of the official code (CLIP ViT-L/14-336: 4 levels of 24x24, 16 heads x 64 channels,
576 queries, 4 points per level) at batch 1 and 8 (``--batches``). Without a GPU: a CPU smoke run on tiny shapes,
labelled so (wall-clock, not a measurement).

Implementations:
    ``lk-cuda``       this library's compiled kernels (csrc/kernels/deform_pool.cuh; forced, whatever tuning says)
    ``lk-triton``     this library's Triton kernels (the default on a GPU until ``lora-bench tune`` verifies CUDA)
    ``lk-sample-{cuda,triton}``   the fused ``deform_sample`` (softmax and loc = ref + offset / (W_l, H_l) in the
                      kernel) from fp32 offsets / logits, as the VCE module calls it
    ``lk-unfused-{cuda,triton}``  the module-style unfused form of the same step: softmax and locations in torch
                      (fp32), then ``deform_pool`` (compare with lk-sample-*: what the fusion saves)
    ``grid_sample``   the reference: per-level ``F.grid_sample`` in fp32 (what the PyTorch fallback does)
    ``grid_sample-compile``  ``torch.compile`` of the reference
    ``detr-fp32-baseline``   an fp32 one-thread-per-channel kernel of the Deformable-DETR kind (the op the official
                      VCE code runs: scalar loads, location/weight re-read per channel, atomics for every
                      gradient), compiled in this library's extension as a stand-in; fp32 only
Each at ``--dtypes`` (default bf16,fp32 on a GPU; the baseline only at fp32).

Timing: each op is captured in a CUDA graph when it can be (eager otherwise; the row says which), L2 flushed
before each timed replay, CUDA events; median and quartiles in us. fwd+bwd = forward then
``torch.autograd.grad`` of all three inputs. Peak memory: the extra bytes allocated above the inputs during one
eager call (``torch.cuda.max_memory_allocated``). Each row's output (and for fwd+bwd, gradients) is checked
against the fp32 reference (``status`` PASS/FAIL, tolerance by dtype). Speedups vs ``grid_sample`` and vs the
baseline are in each row (same dtype for grid_sample, fp32 baseline for every dtype).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from . import envinfo, measure
from .common import (CPU_LABEL, DTYPES, add_out, add_seed_and_cpu, budget_spent, budget_why, default_out_path,
                     doc_header, failed_rows, finish_doc, pick_device, print_footer)
from .common import write_json as _write_json

__all__ = ["add_arguments", "run", "SCHEMA", "baseline_fwd", "baseline_bwd", "format_table"]

SCHEMA = "lora_kernels.bench.vce/1"
# The compiled reference last: its compile is the slowest step, and a time budget cuts rows from the end.
IMPLS = ("lk-cuda", "lk-triton", "lk-sample-cuda", "lk-sample-triton", "lk-unfused-cuda", "lk-unfused-triton",
         "grid_sample", "detr-fp32-baseline", "grid_sample-compile")
# VCE's sampling step from raw offsets / logits (fp32, as the module passes them with fp32 modules): the fused op vs
# the module-style unfused form (softmax and locations in torch, fp32, then deform_pool).
_SAMPLE_IMPLS = ("lk-sample-cuda", "lk-sample-triton", "lk-unfused-cuda", "lk-unfused-triton")
_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("shapes")
    g.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8 GPU; 1 CPU)")
    g.add_argument("--levels", type=int, default=4, help="levels (default 4)")
    g.add_argument("--grid", type=int, help="side of each level (default 24 GPU, 4 CPU)")
    g.add_argument("--heads", type=int, help="heads (default 16 GPU, 2 CPU)")
    g.add_argument("--head-dim", type=int, help="channels per head (default 64 GPU, 8 CPU)")
    g.add_argument("--queries", type=int, help="queries (default 576 GPU, 16 CPU)")
    g.add_argument("--points", type=int, help="points per level (default 4 GPU, 2 CPU)")
    g = p.add_argument_group("measurement")
    g.add_argument("--dtypes", help="comma-separated from bf16, fp16, fp32 (default bf16,fp32 GPU; fp32 CPU)")
    g.add_argument("--impls", help=f"comma-separated substrings of {IMPLS} (default: all)")
    g.add_argument("--ops", default="fwd,fwd+bwd", help="fwd and/or fwd+bwd")
    g.add_argument("--reps", type=int, help="timed replays (default 50 GPU, 3 CPU)")
    g.add_argument("--warmup", type=int, default=3)
    g.add_argument("--no-graphs", action="store_true", help="time eager launches instead of CUDA graph replays")
    g.add_argument("--l2-flush", choices=measure.FLUSH_MODES, default="read")
    g.add_argument("--no-compile", action="store_true", help="skip grid_sample-compile (its compile takes a while)")
    add_seed_and_cpu(g)
    g.add_argument("--time-budget", type=float, help="stop starting new rows after this many seconds")
    g = p.add_argument_group("output")
    add_out(g, "vce")
    g.add_argument("--no-progress", action="store_true")


# ---- the Deformable-DETR-style baseline (compiled extension) ------------------------------------------------------
def _ext_ops():
    from ..ops import deform

    ops = deform._cuda_ops()
    if ops is None:
        raise RuntimeError("the compiled extension has no deform_pool kernels")
    return ops


def baseline_fwd(value, shapes, starts, loc, attn) -> torch.Tensor:
    """fp32 Deformable-DETR-style forward (one thread per output channel). CUDA fp32 contiguous inputs."""
    out = value.new_empty(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
    _ext_ops().deform_pool_fwd_(out, value, shapes, starts, loc, attn, True)
    return out


def baseline_bwd(grad_out, value, shapes, starts, loc, attn):
    """fp32 Deformable-DETR-style backward (atomics for grad value, locations and weights)."""
    gv = torch.zeros_like(value)
    gl = torch.zeros_like(loc)
    ga = torch.zeros_like(attn)
    _ext_ops().deform_pool_bwd_(gv, gl, ga, grad_out, value, shapes, starts, loc, attn, True)
    return gv, gl, ga


# ---- problems and implementations -------------------------------------------------------------------------------
def _problem(B, levels, grid, H, D, Q, P, dtype, device, gen):
    shapes = [(grid, grid)] * levels
    S = levels * grid * grid
    value = torch.randn(B, S, H, D, generator=gen).to(device, dtype)
    loc = (torch.rand(B, Q, H, levels, P, 2, generator=gen) * 1.1 - 0.05).to(device, dtype)
    logits = torch.randn(B, Q, H, levels * P, generator=gen)
    attn = torch.softmax(logits, -1).view(B, Q, H, levels, P).to(device, dtype)
    ref = torch.rand(Q, 2, generator=gen)
    wh = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32).view(1, 1, 1, levels, 1, 2)
    offsets = ((loc.float().cpu() - ref.view(1, Q, 1, 1, 1, 2)) * wh).to(device)  # fp32: loc = ref + offsets / wh
    g = torch.randn(B, Q, H * D, generator=gen).to(device, dtype)
    ss = torch.tensor(shapes, dtype=torch.int64, device=device)
    sizes = ss[:, 0] * ss[:, 1]
    return dict(value=value, loc=loc, attn=attn, g=g, ss=ss, starts=torch.cumsum(sizes, 0) - sizes, shapes=shapes,
                ref=ref.to(device), offsets=offsets, logits=logits.to(device), wh=wh.to(device))


def _fn(impl: str, pb: dict) -> Callable:
    """(value, loc, attn) -> out for an implementation."""
    import lora_kernels as lk
    from lora_kernels import backends, reference

    ss, starts, shapes = pb["ss"], pb["starts"], pb["shapes"]
    if impl in ("lk-cuda", "lk-triton"):
        be = impl[3:]

        def f(v, sl, a):
            with backends.use_backend(be):
                return lk.deform_pool(v, ss, starts, sl, a, validate=False)
        return f
    if impl in ("lk-sample-cuda", "lk-sample-triton"):
        be, ref = impl[10:], pb["ref"]

        def f(v, off, lg):
            with backends.use_backend(be):
                return lk.deform_sample(v, ss, starts, ref, off, lg, validate=False)
        return f
    if impl in ("lk-unfused-cuda", "lk-unfused-triton"):
        be, ref, wh = impl[11:], pb["ref"], pb["wh"]

        def f(v, off, lg):
            B, Q, H, L, P, _ = off.shape
            loc = torch.addcdiv(ref.view(1, Q, 1, 1, 1, 2), off, wh)
            w = torch.softmax(lg, -1).view(B, Q, H, L, P)
            with backends.use_backend(be):
                return lk.deform_pool(v, ss, starts, loc, w, validate=False)
        return f
    if impl == "grid_sample":
        return lambda v, sl, a: reference.deform_pool(v, shapes, None, sl, a)
    if impl == "grid_sample-compile":
        return torch.compile(lambda v, sl, a: reference.deform_pool(v, shapes, None, sl, a))
    raise ValueError(impl)


def _runner(impl: str, op: str, pb: dict):
    """A no-argument callable running ``op`` (fwd | fwd+bwd), returning (out, grads or None)."""
    v, sl, a, g = pb["value"], pb["loc"], pb["attn"], pb["g"]
    if impl in _SAMPLE_IMPLS:  # inputs: raw offsets and logits
        sl, a = pb["offsets"], pb["logits"]
    if impl == "detr-fp32-baseline":
        ss, starts = pb["ss"], pb["starts"]
        if op == "fwd":
            return lambda: (baseline_fwd(v, ss, starts, sl, a), None)
        return lambda: (baseline_fwd(v, ss, starts, sl, a), baseline_bwd(g, v, ss, starts, sl, a))
    f = _fn(impl, pb)
    if op == "fwd":
        def run_f():
            with torch.no_grad():
                return f(v, sl, a), None
        return run_f
    vi, li, ai = (t.detach().requires_grad_(True) for t in (v, sl, a))

    def run_fb():
        out = f(vi, li, ai)
        grads = torch.autograd.grad(out, (vi, li, ai), g)
        return out.detach(), grads
    return run_fb


def _check(got, ref, dtype, pb, sample: bool = False) -> Optional[str]:
    """None when the output (and gradients) are within the dtype's tolerance of the fp32 reference. ``sample``:
    the gradients are of the offsets and logits (mapped back: grad loc = grad offsets * (W_l, H_l); grad logits
    compared with the softmax Jacobian applied to the reference's grad weights)."""
    out, grads = got
    if grads is not None and sample:
        gw = ref[1][2].reshape(pb["logits"].shape)
        w = pb["attn"].float().reshape(gw.shape)
        want_lg = w * (gw - (w * gw).sum(-1, keepdim=True))
        err = float((grads[2].float() - want_lg).abs().max())
        if not (err <= _TOL[dtype] * max(1.0, float(want_lg.abs().max()))):
            return f"grad logits: max abs err {err:.3g}"
        grads = (grads[0], grads[1].float() * pb["wh"], ref[1][2])
    pairs = [("out", out, ref[0])]
    if grads is not None:
        # location gradients are one-sided on pixel grid lines; compare them off the lines only
        size = torch.tensor([[w, h] for h, w in pb["shapes"]], dtype=torch.float32, device=out.device)
        pix = pb["loc"].float() * size[None, None, None, :, None, :] - 0.5
        smooth = (pix - pix.round()).abs() > 1e-2
        pairs += [("grad value", grads[0], ref[1][0]), ("grad loc", grads[1][smooth], ref[1][1][smooth]),
                  ("grad weights", grads[2], ref[1][2])]
    for name, a, b in pairs:
        a = a.float()
        scale = max(1.0, float(b.abs().max()))
        err = float((a - b).abs().max())
        if not (err <= _TOL[dtype] * scale):
            return f"{name}: max abs err {err:.3g} > {_TOL[dtype] * scale:.3g}"
    return None


def _peak(fn, device) -> Optional[int]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    res = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del res
    return int(peak)


def format_table(rows: List[dict]) -> str:
    hdr = ("case", "dtype", "impl", "op", "status", "us median [p25-p75]", "peak MiB", "x grid_sample",
           "x detr-fp32")
    lines = []
    for r in rows:
        us = "-" if r.get("us_median") is None else f"{r['us_median']:.1f} [{r['us_p25']:.1f}-{r['us_p75']:.1f}]"
        pk = "-" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**20:.1f}"
        s1 = "-" if r.get("speedup_vs_grid_sample") is None else f"{r['speedup_vs_grid_sample']:.2f}"
        s2 = "-" if r.get("speedup_vs_baseline") is None else f"{r['speedup_vs_baseline']:.2f}"
        lines.append((r["case"], r["dtype"], r["impl"], r["op"], r["status"], us, pk, s1, s2))
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(hdr)]
    out = ["  ".join(h.ljust(w) for h, w in zip(hdr, widths)), "  ".join("-" * w for w in widths)]
    for cells, r in zip(lines, rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
        if r["status"] in ("FAIL", "ERROR") and r.get("why"):
            out.append(f"    -> {r['why']}")
    return "\n".join(out)


def run(args) -> int:
    """Run the benchmark; 0 when every row passed or was skipped, 1 on a FAIL/ERROR row, 2 on bad arguments."""
    from .. import backends

    gpu, device = pick_device(args.cpu)
    try:
        batches = [int(b) for b in (args.batches or ("1,8" if gpu else "1")).split(",") if b.strip()]
        dtypes = [DTYPES[d.strip()] for d in (args.dtypes or ("bf16,fp32" if gpu else "fp32")).split(",") if d.strip()]
    except (ValueError, KeyError) as e:
        print(f"lora-bench vce: --batches/--dtypes: bad value ({e})", file=sys.stderr)
        return 2
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if not ops or any(o not in ("fwd", "fwd+bwd") for o in ops):
        print(f"lora-bench vce: --ops: expected fwd and/or fwd+bwd, got {args.ops!r}", file=sys.stderr)
        return 2
    grid = args.grid or (24 if gpu else 4)
    H = args.heads or (16 if gpu else 2)
    D = args.head_dim or (64 if gpu else 8)
    Q = args.queries or (576 if gpu else 16)
    P = args.points or (4 if gpu else 2)
    pats = [p.strip() for p in (args.impls or "").split(",") if p.strip()]
    impls = [i for i in IMPLS if (not pats or any(p in i for p in pats))
             and not (args.no_compile and i == "grid_sample-compile")]
    env = envinfo.collect(device)
    gpu_name = env["gpu"]["name"] if env["gpu"] else None
    reps = args.reps or (50 if gpu else 3)
    timer = measure.make_timer(device, reps, args.warmup, use_graphs=not args.no_graphs, flush=args.l2_flush)
    out_path = args.out or default_out_path(gpu_name, prefix="vce")
    label = None if gpu else CPU_LABEL
    doc = {
        **doc_header("vce", SCHEMA, gpu, label, env, args),
        "timing": timer.describe(),
        "shapes": {"batches": batches, "levels": [[grid, grid]] * args.levels, "heads": H, "head_dim": D,
                   "queries": Q, "points": P},
        "rows": [], "complete": False,
    }
    print(f"lora-bench vce: {label or gpu_name}; impls {impls}; dtypes {[measure.dtype_name(d) for d in dtypes]}")
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()

    def log(msg):
        if not args.no_progress:
            print(f"[vce {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    for B in batches:
        case = f"B{B}-L{args.levels}x{grid}x{grid}-H{H}xD{D}-Q{Q}-P{P}"
        for dtype in dtypes:
            pb = _problem(B, args.levels, grid, H, D, Q, P, dtype, device, gen)
            ref32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                     for k, v in pb.items()}
            refs = {op: _runner("grid_sample", op, ref32)() for op in ops}
            times: Dict[tuple, float] = {}
            for impl in impls:
                if impl == "detr-fp32-baseline" and dtype != torch.float32:
                    continue
                for op in ops:
                    row = {"case": case, "B": B, "dtype": measure.dtype_name(dtype), "impl": impl, "op": op,
                           "status": "SKIP", "why": None, "us_median": None, "graphed": None, "peak_bytes": None}
                    doc["rows"].append(row)
                    if budget_spent(args.time_budget, t0):
                        row["why"] = budget_why(args.time_budget)
                        continue
                    if impl in ("lk-cuda", "lk-sample-cuda", "lk-unfused-cuda", "detr-fp32-baseline") and not gpu:
                        row["why"] = "needs a GPU"
                        continue
                    if impl.endswith("-triton") and backends.triton_can_run(device.type):
                        row["why"] = backends.triton_can_run(device.type)
                        continue
                    log(f"{case} {row['dtype']} {impl} {op}")
                    try:
                        fn = _runner(impl, op, pb)
                        why = _check(fn(), refs[op], dtype, pb, sample=impl in _SAMPLE_IMPLS)
                        row["peak_bytes"] = _peak(fn, device)
                        replay, graphed, gwhy = timer.capture(fn)
                        q = measure.quantiles(timer.time(replay))
                        row.update(us_median=q["median"], us_p25=q["p25"], us_p75=q["p75"], graphed=graphed,
                                   capture_error=gwhy, status="FAIL" if why else "PASS", why=why)
                        times[(impl, op)] = q["median"]
                    except Exception as e:  # noqa: BLE001  (a broken implementation is a row, not a crash)
                        row.update(status="ERROR", why=f"{type(e).__name__}: {e}".splitlines()[0][:300])
                    _write_json(out_path, doc)
                    gc.collect()
            for row in doc["rows"]:
                if row["case"] == case and row["dtype"] == measure.dtype_name(dtype) and row["us_median"]:
                    gs = times.get(("grid_sample", row["op"]))
                    row["speedup_vs_grid_sample"] = gs / row["us_median"] if gs else None
            del pb, refs
            if gpu:
                torch.cuda.empty_cache()
        base = {r["op"]: r["us_median"] for r in doc["rows"]
                if r["case"] == case and r["impl"] == "detr-fp32-baseline" and r["us_median"]}
        for row in doc["rows"]:
            if row["case"] == case and row["us_median"] and base.get(row["op"]):
                row["speedup_vs_baseline"] = base[row["op"]] / row["us_median"]
    finish_doc(doc, t0, out_path)
    print(format_table(doc["rows"]))
    print_footer([], label, out_path)
    return 1 if failed_rows(doc["rows"]) else 0
