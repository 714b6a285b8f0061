"""``lora-bench backward``: forward + backward of the multi-adapter LoRA delta (training), in tokens/s.

Cases: T tokens spread uniformly over ``--adapters`` adapters (default 64) of mixed ranks (``--ranks``, cycled:
default 8,16,32,64), hidden ``--hidden`` -> ``--hidden``, about 5% of the tokens with no adapter (-1). Each
timed step clears the gradients, runs the forward and the backward (grad x, grad A and grad B of every adapter)
with a fixed upstream gradient.

Implementations:
    lk     ``lk.lora_delta`` on paged storage (``LoRAWeights.requires_grad_()``): the segmented backward
           (Triton on a GPU, the reference on the CPU); gradients land in ``w.a.grad`` / ``w.b.grad``.
    loop   the per-adapter PyTorch loop: one ``A_i`` / ``B_i`` parameter pair per adapter, token indices
           precomputed on the host outside the timed region, ``index_add_`` of each adapter's delta; autograd.

Correctness (per case, before timing): the gradients of both implementations against the same loop run in fp32
(TF32 off) with the project's rule (``max|g - ref| <= 2 max|g_loop_dtype - ref| + floor``, see
:mod:`lora_kernels.bench.measure`). Timing: :class:`~lora_kernels.bench.measure.GpuTimer` (CUDA graph replay
when the step can be captured, eager otherwise, recorded per row; L2 flushed before each replay) on a GPU; on
the CPU a wall-clock smoke run on tiny shapes, labelled as such (never a GPU number).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Dict, List, Optional

import torch

from . import envinfo, measure
from .common import (budget_spent, budget_why, default_out_path, doc_header, failed_rows, finish_doc, pick_device,
                     pick_dtype)
from .common import write_json as _write_json
from .sgmv import DTYPES, _csv_ints, _err_text, _safe_report

__all__ = ["add_arguments", "run", "format_table"]

SCHEMA = "lora-bench-backward/1"
CPU_LABEL = "CPU smoke run: tiny shapes, wall-clock, reference backend; not a GPU measurement"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=_csv_ints, default=None,
                   help="token counts (default: 256,1024,4096 on a GPU; 32,128 on the CPU)")
    p.add_argument("--hidden", type=int, default=None, help="in = out features (default 4096 GPU, 64 CPU)")
    p.add_argument("--adapters", type=int, default=None, help="adapters in the batch (default 64 GPU, 8 CPU)")
    p.add_argument("--ranks", type=_csv_ints, default=[8, 16, 32, 64], help="ranks, cycled over the adapters")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--impls", default="lk,loop", help="comma list of lk, loop")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--no-graphs", action="store_true", help="time eager launches instead of CUDA graph replays")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/<gpu>/backward-<date>.json; "
                   "out/cpu-smoke/ without a GPU)")
    p.add_argument("--time-budget", type=float, default=None, help="stop starting new cases after this many s")
    p.add_argument("--no-progress", action="store_true")


class _Problem:
    """Paged weights, per-adapter copies for the loop, a batch, x and dy for one case."""

    def __init__(self, T: int, hidden: int, n_adapters: int, ranks: List[int], dtype, device, seed: int):
        import lora_kernels as lk

        g = torch.Generator().manual_seed(seed)
        rk = [ranks[i % len(ranks)] for i in range(n_adapters)]
        self.ranks = rk
        self.w = lk.LoRAWeights(hidden, hidden, n_adapters, max(rk), capacity_rows=sum(rk), dtype=dtype,
                                device=device)
        self.A, self.B, self.scale = [], [], []
        for r in rk:
            A = torch.randn(r, hidden, generator=g) / hidden**0.5
            B = torch.randn(hidden, r, generator=g) / r**0.5
            self.w.add(A.to(dtype), B.to(dtype), alpha=2.0 * r)
            self.A.append(A.to(device, dtype))
            self.B.append(B.to(device, dtype))
            self.scale.append(2.0)
        ids = torch.randint(0, n_adapters, (T,), generator=g, dtype=torch.int32)
        ids[torch.rand(T, generator=g) < 0.05] = -1
        self.ids = ids
        self.toks = [(ids == i).nonzero().flatten().to(device) for i in range(n_adapters)]
        self.batch = lk.LoRABatch.from_ids(ids.to(device), n_adapters, ranks=self.w.ranks)
        self.x = torch.randn(T, hidden, generator=g).to(device, dtype)
        self.dy = torch.randn(T, hidden, generator=g).to(device, dtype)
        self.w.requires_grad_()

    # -- the library: paged storage, one autograd op ------------------------------------------------------------
    def lk_step(self, x: torch.Tensor):
        import lora_kernels as lk

        self.w.a.grad = None
        self.w.b.grad = None
        x.grad = None
        lk.lora_delta(x, self.w, self.batch).backward(self.dy)

    def lk_grads(self):
        x = self.x.clone().requires_grad_()
        self.lk_step(x)
        return self._paged_to_list(self.w.a.grad, self.w.b.grad) + [x.grad]

    def _paged_to_list(self, ga, gb):
        out = []
        for i, r in enumerate(self.ranks):
            off = int(self.w.offsets[i])
            out += [ga[0, off : off + r], gb[off : off + r].t()]
        return out

    # -- the baseline: one parameter pair per adapter, a Python loop ------------------------------------------------
    def loop_params(self, dtype):
        ps = []
        for A, B in zip(self.A, self.B):
            ps += [A.detach().to(dtype).requires_grad_(), B.detach().to(dtype).requires_grad_()]
        return ps

    def loop_step(self, x: torch.Tensor, ps, dy: Optional[torch.Tensor] = None):
        for p in ps:
            p.grad = None
        x.grad = None
        y = torch.zeros(x.shape[0], self.w.out_features, dtype=x.dtype, device=x.device)
        for i, toks in enumerate(self.toks):
            if toks.numel():
                A, B = ps[2 * i], ps[2 * i + 1]
                y = y.index_add(0, toks, self.scale[i] * ((x[toks] @ A.t()) @ B.t()))
        y.backward(self.dy.to(x.dtype) if dy is None else dy)

    def loop_grads(self, dtype):
        ps = self.loop_params(dtype)
        x = self.x.detach().to(dtype).requires_grad_()
        self.loop_step(x, ps)
        # adapters absent from the batch get no grad from autograd: zeros, as the paged storage has
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps] + [x.grad]


def _check(got: List[torch.Tensor], ref: List[torch.Tensor], lowp: List[torch.Tensor], dtype) -> Dict[str, float]:
    """Worst ratio err / bound over all gradients (<= 1 passes) and the largest error."""
    worst, max_err = 0.0, 0.0
    for g, r, lp in zip(got, ref, lowp):
        if r.numel() == 0:
            continue
        tol = measure.tolerance(r.float(), lp, dtype)
        err = (g.double() - r.double()).abs().max().item()
        if not torch.isfinite(g).all():
            return {"ratio": float("inf"), "max_err": float("inf")}
        worst = max(worst, err / max(tol["allowed"], 1e-30))
        max_err = max(max_err, err)
    return {"ratio": worst, "max_err": max_err}


def _row(case: str, impl: str, status: str, **kw) -> dict:
    return {"case": case, "impl": impl, "status": status, **kw}


def run_case(T: int, args, dtype, device, timer) -> List[dict]:
    hidden, n = args.hidden, args.adapters
    case = f"t{T}-h{hidden}-a{n}-r{'.'.join(map(str, args.ranks))}"
    prob = _Problem(T, hidden, n, args.ranks, dtype, device, args.seed + T)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = prob.loop_grads(torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    lowp = prob.loop_grads(dtype)
    rows = []
    times = {}
    for impl in args.impls.split(","):
        meta = {"T": T, "hidden": hidden, "adapters": n, "ranks": args.ranks, "sum_active_rank": sum(
            r for r, t in zip(prob.ranks, prob.toks) if t.numel())}
        try:
            if impl == "lk":
                got = prob.lk_grads()
                fn = functools.partial(prob.lk_step, prob.x.clone().requires_grad_())
            elif impl == "loop":
                got = prob.loop_grads(dtype)
                fn = functools.partial(prob.loop_step, prob.x.clone().requires_grad_(), prob.loop_params(dtype))
            else:
                rows.append(_row(case, impl, "ERROR", why=f"unknown impl {impl!r} (lk, loop)", **meta))
                continue
            chk = _check(got, ref, lowp, dtype)
            run, graphed, why = timer.capture(fn)
            us = timer.time(run)
            q = measure.quantiles(us)
            times[impl] = q["median"]
            status = "ok" if chk["ratio"] <= 1.0 else "FAIL"
            rows.append(_row(case, impl, status, median_us=q["median"], p25_us=q["p25"], p75_us=q["p75"],
                             tokens_per_s=T / (q["median"] * 1e-6), graph=graphed, graph_error=why,
                             err_ratio=chk["ratio"], max_err=chk["max_err"], **meta))
        except Exception as e:
            rows.append(_row(case, impl, "ERROR", why=_err_text(e), **meta))
    if "lk" in times and "loop" in times:
        for r in rows:
            if r["impl"] == "lk" and "median_us" in r:
                r["speedup_vs_loop"] = times["loop"] / times["lk"]
    return rows


def format_table(rows: List[dict]) -> str:
    head = f"{'case':28s} {'impl':5s} {'status':6s} {'median us':>10s} {'tokens/s':>12s} {'vs loop':>8s} {'graph':>5s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        med = f"{r['median_us']:.1f}" if "median_us" in r else "-"
        tps = f"{r['tokens_per_s']:.3g}" if "tokens_per_s" in r else "-"
        sp = f"{r['speedup_vs_loop']:.2f}x" if "speedup_vs_loop" in r else "-"
        lines.append(f"{r['case']:28s} {r['impl']:5s} {r['status']:6s} {med:>10s} {tps:>12s} {sp:>8s} "
                     f"{str(r.get('graph', '-')):>5s}" + (f"  {r['why']}" if "why" in r else ""))
    return "\n".join(lines)


def run(args) -> int:
    """Run the cases; 0 when every row passed its check, 1 otherwise."""
    import lora_kernels as lk

    gpu, device = pick_device(args.cpu)
    dtype = pick_dtype(args.dtype, gpu)
    args.tokens = args.tokens or ([256, 1024, 4096] if gpu else [32, 128])
    args.hidden = args.hidden or (4096 if gpu else 64)
    args.adapters = args.adapters or (64 if gpu else 8)
    env = envinfo.collect(device)
    gpu_name = env["gpu"]["name"] if env["gpu"] else None
    timer = measure.make_timer(device, args.reps, args.warmup, use_graphs=not args.no_graphs)
    out_path = args.out or default_out_path(gpu_name, prefix="backward")
    label = None if gpu else CPU_LABEL
    doc = {
        **doc_header("backward", SCHEMA, gpu, label, env, args),
        "dtype": measure.dtype_name(dtype), "timing": timer.describe(), "backends": _safe_report(lk),
        "what": "fwd+bwd of the multi-adapter LoRA delta (grad x, A, B of every adapter); tokens/s = T / median",
        "correctness_rule": "every gradient: max|g - ref_fp32| <= 2 * max|g_loop_dtype - ref_fp32| + floor "
                            "(ref = per-adapter loop in fp32, TF32 off)",
        "rows": [], "skipped": [], "complete": False,
    }
    print(f"lora-bench backward: {label or gpu_name}, {measure.dtype_name(dtype)}")
    t0 = time.perf_counter()
    for T in args.tokens:
        if budget_spent(args.time_budget, t0):
            doc["skipped"].append({"T": T, "why": budget_why(args.time_budget)})
            continue
        try:
            doc["rows"].extend(run_case(T, args, dtype, device, timer))
        except Exception as e:
            doc["rows"].append(_row(f"t{T}", "(setup)", "ERROR", why=_err_text(e)))
        _write_json(out_path, doc)
    finish_doc(doc, t0, out_path)
    print(format_table(doc["rows"]))
    for s in doc["skipped"]:
        print(f"skipped T={s['T']}: {s['why']}")
    print(f"wrote {out_path}")
    return 1 if failed_rows(doc["rows"]) else 0


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(run(p.parse_args()))
