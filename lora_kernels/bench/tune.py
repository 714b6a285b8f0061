"""``lora-bench tune``: pick the fastest correct Triton config per shape bucket on this GPU and write the table.

For every benchmark case (one per :func:`lora_kernels.tuning.bucket_key`: the first case of a bucket stands
for it) and every op asked for (``add_lora`` by default; ``shrink`` and ``expand`` too with ``--ops``), each of
:func:`lora_kernels.tuning.candidate_configs` (an evenly spaced subset when ``--max-configs`` is smaller,
always including the default, which comes first) is run through the raw Triton launcher
(:mod:`lora_kernels.triton.sgmv`), checked against the fp32 reference with the rule of ``lora-bench sgmv``
(a config that fails, or does not compile, is dropped), then timed by CUDA-graph replay with an L2 flush.
The fastest passing config of each bucket is written with :func:`lora_kernels.tuning.write_table` (merged
over the GPU's existing table unless ``--replace``), so the ops pick it up from then on.

Refuses (exit status 2) without a CUDA GPU or without Triton.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import cases as C
from . import envinfo, measure
from .baselines import NaiveLoop

__all__ = ["add_arguments", "run"]

NO_GPU_MSG = ("lora-bench tune: needs a CUDA GPU to time kernels on (torch.cuda.is_available() is False here); "
              "run it on the GPU machine, e.g. through bench/gpu_check.sh")


def add_arguments(p) -> None:
    p.add_argument("--cases", help="comma-separated names or globs of the benchmark cases whose shapes to tune "
                                   "(default: all of lora-bench sgmv's named cases)")
    p.add_argument("--ops", default="add_lora", help="comma-separated ops: add_lora, shrink, expand (default add_lora)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--max-configs", type=int, default=24, help="candidates timed per bucket (default 24)")
    p.add_argument("--reps", type=int, default=30, help="timed replays per candidate (default 30)")
    p.add_argument("--time-budget", type=float, help="stop starting new candidates after this many seconds")
    p.add_argument("--replace", action="store_true", help="write only the buckets tuned now (default: merge)")
    p.add_argument("--no-write", action="store_true", help="report only; leave the tuning table alone")
    p.add_argument("--out", help="also write a report JSON (the table and every candidate's timing) here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def _subset(cands: List[dict], k: int) -> List[dict]:
    """``k`` evenly spaced candidates, the first (the default) always included."""
    if k >= len(cands):
        return list(cands)
    if k <= 1:
        return cands[:1]
    idx = sorted({round(i * (len(cands) - 1) / (k - 1)) for i in range(k)})
    return [cands[i] for i in idx]


def _torch_shrink(prob: C.Problem, r_cap: int) -> torch.Tensor:
    """h in the activations' dtype via PyTorch (the precision the correctness rule compares with), as fp32."""
    w = prob.weights
    h = torch.zeros(w.num_slices, prob.x.shape[0], r_cap, dtype=torch.float32, device=prob.x.device)
    for idx, slices in NaiveLoop(w, prob.ids).groups:
        xi = prob.x.index_select(0, idx)
        for s, (_, _, A, _, _) in enumerate(slices):
            h[s, idx, : A.shape[0]] = (xi @ A.t()).float()
    return h


def _torch_expand(prob: C.Problem, h: torch.Tensor) -> torch.Tensor:
    w = prob.weights
    y = prob.y0.clone()
    for idx, slices in NaiveLoop(w, prob.ids).groups:
        for s, (c0, n, A, Bt, scale) in enumerate(slices):
            hi = h[s].index_select(0, idx)[:, : A.shape[0]].to(y.dtype)
            y[:, c0 : c0 + n].index_add_(0, idx, (hi @ Bt).mul_(scale))
    return y


class _OpBench:
    """Reference, tolerance and a launcher factory for one op on one problem."""

    def __init__(self, op: str, prob: C.Problem, batch, dtype: torch.dtype):
        import lora_kernels as lk

        from ..triton import sgmv as tsgmv

        self.op, self.prob, self.batch = op, prob, batch
        w, x = prob.weights, prob.x
        self.r_cap = w.max_rank
        T, in_f, out_f = x.shape[0], w.in_features, w.out_features
        tok = prob.ids.to(torch.int32)
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            if op == "shrink":
                self.key = lk.tuning.bucket_key("shrink", dtype, T, in_f, 0, self.r_cap)
                self.shape = (T, in_f, 0, self.r_cap)
                self.ref = lk.reference.shrink(x, w.a, w.offsets, w.ranks, tok, self.r_cap)
                torch_out = _torch_shrink(prob, self.r_cap)
                self.base = torch.zeros_like(self.ref)
            else:
                self.h_ref = lk.reference.shrink(x, w.a, w.offsets, w.ranks, tok, self.r_cap)
                yref = prob.y0.float().clone()
                lk.reference.expand_(yref, self.h_ref, w.b, w.offsets, w.ranks, w.scales, tok, w.slice_cols,
                                     w.slice_outs)
                self.ref = yref if op == "expand" else prob.y0.float() + lk.reference.lora_delta(x, w, prob.ids)
                if op == "expand":
                    self.key = lk.tuning.bucket_key("expand", dtype, T, 0, out_f, self.r_cap)
                    self.shape = (T, 0, out_f, self.r_cap)
                    torch_out = _torch_expand(prob, self.h_ref)
                else:
                    self.key = lk.tuning.bucket_key("add_lora", dtype, T, in_f, out_f, self.r_cap)
                    self.shape = (T, in_f, out_f, self.r_cap)
                    torch_out = NaiveLoop(w, prob.ids)(prob.y0.clone(), x)
                self.base = prob.y0
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        self.tol = measure.tolerance(self.ref, torch_out, dtype)
        self.none_mask = prob.ids < 0
        self.out = self.base.clone()
        self._tsgmv = tsgmv

    def make(self, cfg: dict) -> Callable[[], None]:
        w, x, b, out, t = self.prob.weights, self.prob.x, self.batch, self.out, self._tsgmv
        if self.op == "shrink":
            return lambda: t.shrink(x, w.a, w.offsets, w.ranks, b.meta, b.max_tokens, out, config=cfg)
        if self.op == "expand":
            h = self.h_ref
            return lambda: t.expand_(out, h, w.b, w.offsets, w.ranks, w.scales, b.meta, b.max_tokens, w.slice_info,
                                     config=cfg)
        return lambda: t.add_lora_(out, x, w.a, w.b, w.offsets, w.ranks, w.scales, b.meta, b.max_tokens,
                                   w.slice_info, self.r_cap, config=cfg)

    def check(self) -> dict:
        if self.op == "shrink":
            o = self.out
            finite = bool(torch.isfinite(o).all())
            err = float((o - self.ref).abs().max()) if o.numel() else 0.0
            ok = finite and err <= self.tol["allowed"]
            return {"ok": ok, "err_max": err, "err_allowed": self.tol["allowed"],
                    "why": "" if ok else f"max abs error {err:.3g} > allowed {self.tol['allowed']:.3g} or non-finite"}
        return measure.check_output(self.out, self.base, self.ref, self.none_mask, self.tol["allowed"])

    def reset(self) -> None:
        self.out.copy_(self.base)


def _bench_config(ob: _OpBench, cfg: dict, timer: measure.GpuTimer) -> Tuple[Optional[float], str]:
    """(median us, "") for a passing config, (None, why) otherwise."""
    dev = ob.out.device
    ob.reset()
    try:
        fn = ob.make(cfg)
        fn()
        _sync(dev)
    except Exception as e:
        return None, f"launch: {_err(e)}"
    chk = ob.check()
    if not chk["ok"]:
        return None, "check: " + chk["why"]
    try:
        run, graphed, gerr = timer.capture(fn)
        if graphed:
            ob.reset()
            run()
            _sync(dev)
            chk = ob.check()
            if not chk["ok"]:
                return None, "graph replay check: " + chk["why"]
        q = measure.quantiles(timer.time(run))
    except Exception as e:
        return None, f"timing: {_err(e)}"
    return q["median"], ""


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def _case_keys(case: C.Case, ops: List[str], dtype: torch.dtype) -> List[str]:
    """The bucket keys a case tunes, from its sizes alone (the same arguments the launchers look up)."""
    from .. import tuning

    T, i, o, r = case.tokens, case.hidden_in, case.hidden_out, max(C.ranks_of(case))
    shape = {"shrink": (T, i, 0, r), "expand": (T, 0, o, r), "add_lora": (T, i, o, r)}
    return [tuning.bucket_key(op, dtype, *shape[op]) for op in ops]


def _device_healthy(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return True
    except Exception:
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tune_cases(
    cases: List[C.Case], ops: List[str], dtype: torch.dtype, device: torch.device, timer, max_configs: int,
    time_budget: Optional[float] = None, progress: bool = False, seed: int = 0,
) -> Tuple[Dict[str, dict], List[dict], Optional[str]]:
    """Time the candidates of every (case bucket, op); returns ``(entries, report, aborted)``: the fastest
    passing config per bucket key, a record per bucket (every candidate's median or why it was dropped), and
    why the sweep stopped early (None if it did not). ``timer`` is a :class:`~lora_kernels.bench.measure.GpuTimer`
    (or a ``CpuTimer`` with the Triton interpreter, for tests)."""
    import lora_kernels as lk

    t0 = time.perf_counter()
    entries: Dict[str, dict] = {}
    report: List[dict] = []
    aborted: Optional[str] = None
    try:
        from tqdm import tqdm
    except Exception:  # pragma: no cover
        tqdm = None
    seen = set()
    for case in cases:
        if aborted:
            break
        if all(k in seen for k in _case_keys(case, ops, dtype)):
            continue  # every bucket of this case was tuned on an earlier case
        prob = C.make_problem(case, dtype, device, seed=seed)
        w = prob.weights
        batch = lk.LoRABatch(max(1, case.tokens), w.max_adapters, device).build(prob.ids, ranks=w.ranks)
        for op in ops:
            if aborted:
                break
            ob = _OpBench(op, prob, batch, dtype)
            if ob.key in seen:
                continue
            seen.add(ob.key)
            cands = _subset(lk.tuning.candidate_configs(op, dtype, *ob.shape), max_configs)
            rec = {"bucket": ob.key, "case": case.name, "op": op,
                   "shape": dict(zip(("T", "in", "out", "r_cap"), ob.shape)), "tolerance": ob.tol, "candidates": []}
            it = cands
            if tqdm is not None and progress:
                it = tqdm(cands, desc=f"{case.name}/{op}", unit="cfg", file=sys.stderr, mininterval=1.0, leave=False)
            for cfg in it:
                if time_budget is not None and time.perf_counter() - t0 > time_budget:
                    aborted = aborted or f"time budget of {time_budget:.0f} s spent"
                    break
                us, why = _bench_config(ob, cfg, timer)
                rec["candidates"].append({"config": cfg, "us_median": us, "why": why})
                if us is None and not _device_healthy(device):
                    aborted = f"CUDA context broken after config {cfg}: {why}"
                    break
            ok = [c for c in rec["candidates"] if c["us_median"] is not None]
            if ok:
                best = min(ok, key=lambda c: c["us_median"])
                rec["best"] = best
                first = rec["candidates"][0]
                rec["default_us"] = first["us_median"] if first["config"] == cands[0] else None
                entries[ob.key] = best["config"]
                sp = (rec["default_us"] / best["us_median"]) if rec["default_us"] else None
                print(f"{ob.key:48s} best {best['us_median']:9.2f} us"
                      f"{'' if sp is None else f'  ({sp:.2f}x the default)'}  "
                      f"[{len(ok)}/{len(rec['candidates'])} passed]")
            else:
                print(f"{ob.key:48s} no passing config among {len(rec['candidates'])} timed")
            report.append(rec)
            del ob
            gc.collect()
        del prob, batch, w
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return entries, report, aborted


def _verify_build_batch_cuda(device: torch.device, ext) -> Optional[str]:
    """The compiled LoRABatch builder vs the torch builder: None when every case matches, else why not."""
    import lora_kernels as lk
    from lora_kernels.batch import build_batch_torch_

    gen = torch.Generator().manual_seed(0)
    for T, N in ((0, 4), (1, 1), (7, 3), (257, 64), (4096, 64), (8192, 1000), (70000, 70000)):
        ids = torch.randint(-2, N + 1, (T,), generator=gen, dtype=torch.int32).to(device)
        ranks = torch.randint(1, 129, (3, N), generator=gen, dtype=torch.int32).to(device)
        for rk in (None, ranks):
            got = lk.LoRABatch(max(T, 1), N, device)
            want = lk.LoRABatch(max(T, 1), N, device)
            ext.build_batch_(got.meta, ids, rk, got.max_tokens, N)
            build_batch_torch_(want.meta, ids, rk, want.max_tokens, N)
            lay = got.layout
            n = lay.scalars + 4
            # Entries past T of the token arrays are unspecified; compare everything else.
            used = torch.cat([got.meta[:T], got.meta[lay.max_tokens : lay.max_tokens + T],
                              got.meta[2 * lay.max_tokens : n]])
            ref = torch.cat([want.meta[:T], want.meta[lay.max_tokens : lay.max_tokens + T],
                             want.meta[2 * lay.max_tokens : n]])
            if not torch.equal(used, ref):
                return f"mismatch vs the torch builder at T={T}, N={N}"
    torch.cuda.synchronize(device)
    return None


def _verify_merge_cuda(device: torch.device, ext) -> Optional[str]:
    """The compiled grouped merge kernel: merged weights within one rounding of the fp32 reference delta, and
    unmerge bit-exact, over every dtype, fused slices, mixed ranks, odd widths and escapes (tiny weights)."""
    import lora_kernels as lk
    from lora_kernels import reference
    from lora_kernels.ops import merge as M

    try:
        _ = ext.merge_grouped_
    except (AttributeError, RuntimeError):
        return "the extension has no merge kernel"
    gen = torch.Generator().manual_seed(1)
    for in_f, outs, ranks, dtype in ((96, (80,), (4, 8, 16), torch.bfloat16),
                                      (64, (48, 16, 16), (8, 16, 4), torch.float16),
                                      (37, (29,), (2, 33), torch.bfloat16), (4096, (4096,), (16, 64), torch.bfloat16),
                                      (128, (96,), (16,), torch.float32)):
        w = lk.LoRAWeights(in_f, list(outs), max_adapters=len(ranks), max_rank=max(ranks), dtype=dtype,
                           device=device)
        for r in ranks:
            w.add([torch.randn(r, in_f, generator=gen) * 0.05 for _ in outs],
                  [torch.randn(o, r, generator=gen) * 0.05 for o in outs], alpha=2 * r)
        W0 = torch.randn(w.out_features, in_f, generator=gen) * 0.02
        W0.view(-1)[::17] = 1e-6  # tiny weights: large relative deltas, so the escape path runs too
        W0 = W0.to(device, dtype)
        W = W0.clone()
        ids = list(range(len(ranks)))
        lams = [1.0 - 0.5 * k for k in ids]
        with torch.no_grad(), lk.backends.use_backend("cuda"):
            rec = M.merge_(W, w, ids, lams)
            want = (W0.float().cpu() + reference.merge_delta(W.shape, w.a.float().cpu(), w.b.float().cpu(),
                                                             rec._terms, rec._coefs)).to(dtype)
            # One rounding of an fp32 sum whose order differs from the reference's: at most one ulp apart.
            ulp = torch.finfo(dtype).eps * want.float().abs().clamp_min(torch.finfo(dtype).tiny)
            if not bool(((W.cpu().float() - want.float()).abs() <= ulp * 1.0001).all()):
                return f"merged weights differ from the reference by more than one ulp ({dtype}, in={in_f})"
            for _ in range(3):
                M.unmerge_(W, rec)
                if not torch.equal(W, W0):
                    return f"unmerge is not bit-exact ({dtype}, in={in_f})"
                rec = M.merge_(W, w, ids, lams)
            M.unmerge_(W, rec)
        torch.cuda.synchronize(device)
        if not torch.equal(W, W0):
            return f"unmerge is not bit-exact after cycles ({dtype}, in={in_f})"
    return None


def _verify_deform_cuda(device: torch.device, ext) -> Optional[str]:
    """deform_pool's compiled kernels, forward and every gradient, vs the fp64 reference
    (:func:`lora_kernels.ops.deform.verify_cuda`)."""
    from lora_kernels.ops.deform import verify_cuda

    return verify_cuda(device, ext)


# ---- the decode kernels' verifiers (sgmv_decode_cuda, fused_linear_cuda) ------------------------------------------
def _decode_weights(in_f: int, outs, ranks, dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    """LoRAWeights with one adapter per entry of ``ranks`` (alpha = 2 r; A and B scaled to unit-size products)."""
    import lora_kernels as lk

    w = lk.LoRAWeights(in_f, list(outs), max_adapters=len(ranks), max_rank=max(ranks), dtype=dtype, device=device)
    for r in ranks:
        w.add([torch.randn(r, in_f, generator=gen) / in_f**0.5 for _ in outs],
              [torch.randn(o, r, generator=gen) / r**0.5 for o in outs], alpha=2.0 * r)
    return w


def _decode_batch(T: int, n_adapters: int, merged: Optional[int], device: torch.device, gen: torch.Generator):
    """(ids on the CPU, LoRABatch on ``device``): T tokens, about a quarter of them -1, token 0 served (by adapter 0,
    or 1 when 0 is the merged one)."""
    import lora_kernels as lk

    ids = torch.randint(0, n_adapters, (T,), generator=gen, dtype=torch.int32)
    ids[torch.rand(T, generator=gen) < 0.25] = -1
    ids[0] = 0 if merged != 0 else 1  # every case serves a token
    return ids, lk.LoRABatch.from_ids(ids.to(device), n_adapters)


def _reference_delta_(want: torch.Tensor, x: torch.Tensor, w, ids: torch.Tensor, m: int) -> torch.Tensor:
    """``want`` (fp32, CPU) plus the fp32 reference delta of x (mixed mode when m >= 0: delta_j - delta_m)."""
    from lora_kernels import reference
    from lora_kernels.ops import sgmv as S

    args = (x.float().cpu(), w.a.float().cpu(), w.b.float().cpu(), w.offsets.cpu(), w.ranks.cpu(), w.scales.cpu(),
            ids, w.slice_cols, w.slice_outs)
    return reference.add_lora_(want, *args) if m < 0 else S._reference_mixed_(want, *args, m)


def _decode_verdict(name: str, got: List[torch.Tensor], counters: torch.Tensor, want: torch.Tensor,
                    replaced: torch.Tensor, replaced_name: str, untouched=None) -> Optional[str]:
    """What both decode verifiers require of a case's two runs ``got``: the counters back to zero, the runs
    bit-identical (deterministic), ``untouched`` = (rows, their original values) unchanged when given, and an error
    vs the fp32 reference ``want`` at most twice that of ``replaced`` (the path the kernel replaces) plus one ulp of
    max |want|. None when it passes, else why not."""
    dt = got[0].dtype
    if not bool((counters == 0).all()):
        return f"counters not reset to zero ({name})"
    bits = torch.int16 if dt != torch.float32 else torch.int32
    if not torch.equal(got[0].view(bits), got[1].view(bits)):
        return f"two runs differ (not deterministic) ({name})"
    if untouched is not None:
        rows, orig = untouched
        if not torch.equal(got[0].cpu()[rows], orig.cpu()[rows]):
            return f"rows it must not touch changed ({name})"
    err = float((got[0].float().cpu() - want).abs().max())
    err_rep = float((replaced.float().cpu() - want).abs().max())
    bound = 2 * err_rep + torch.finfo(dt).eps * float(want.abs().max())
    if not err <= bound:
        return (f"error {err:.3g} vs the fp32 reference exceeds {bound:.3g} ({replaced_name}: {err_rep:.3g}) "
                f"({name})")
    return None


def _verify_decode_cases(device: torch.device, ext, op_name: str, missing: str, seed: int, cases,
                         check_case: Callable) -> Optional[str]:
    """The case loop of a decode verifier: the extension's op ``op_name`` (``missing`` when it has none), then
    ``check_case(op, device, case, gen)`` per case, one generator seeded ``seed`` for all; the first failure's
    reason, or None."""
    if device.type != "cuda":
        return f"needs a CUDA device, got {device}"
    try:
        op = getattr(ext, op_name)
    except (AttributeError, RuntimeError):
        return missing
    gen = torch.Generator().manual_seed(seed)
    for case in cases:
        why = check_case(op, device, case, gen)
        if why is not None:
            return why
    return None


# (in, outs, ranks, x/y dtype, weights dtype, T, merged): decode shapes (T <= 64) incl. fused slices, mixed mode,
# a rank-256 adapter, odd widths (the scalar fallback) and weights in another dtype than x / y.
_DECODE_CASES = (
    (4096, (4096,), (8, 16, 64), torch.bfloat16, torch.bfloat16, 1, None),
    (4096, (4096,), (8, 16, 64), torch.float16, torch.float16, 16, None),
    (4096, (4096, 1024, 1024), (16, 8, 128), torch.bfloat16, torch.bfloat16, 7, 1),
    (2048, (2048, 512, 512), (4, 32), torch.float16, torch.float16, 64, 0),
    (1000, (72, 13), (5, 33, 9), torch.bfloat16, torch.bfloat16, 64, 2),
    (264, (40,), (256, 3), torch.float16, torch.float32, 33, None),
    (512, (96,), (16, 7), torch.float32, torch.bfloat16, 5, 0),
)


def _check_sgmv_decode_case(op, device: torch.device, case, gen: torch.Generator) -> Optional[str]:
    """One case of :func:`_verify_sgmv_decode_cuda`."""
    from ..plan import decode_counters

    import lora_kernels as lk
    from lora_kernels.ops import sgmv as S

    in_f, outs, ranks, dt, wdt, T, merged = case
    name = f"in={in_f} outs={outs} ranks={ranks} {dt}/{wdt} T={T} merged={merged}"
    w = _decode_weights(in_f, outs, ranks, wdt, device, gen)
    ids, batch = _decode_batch(T, len(ranks), merged, device, gen)
    x = torch.randn(T, in_f, generator=gen).to(device, dt)
    y0 = torch.randn(T, w.out_features, generator=gen).to(device, dt)
    m = -1 if merged is None else merged
    got = []
    for _ in range(2):
        y = y0.clone()
        S._decode_(op, y, x, w.a, w.b, w.offsets, w.ranks, w.scales, batch.meta, w.slice_outs, w.max_rank, m,
                   batch.plan, None)
        got.append(y)
    y_tr = y0.clone()
    with torch.no_grad(), lk.backends.use_backend("triton"):
        lk.add_lora_(y_tr, x, w, batch, merged=merged)
    torch.cuda.synchronize(device)
    want = _reference_delta_(y0.float().cpu(), x, w, ids, m)
    keep = ids == (m if m >= 0 else -1)  # rows the op must not touch
    return _decode_verdict(name, got, decode_counters(batch.plan), want, y_tr, "Triton path", untouched=(keep, y0))


def _verify_sgmv_decode_cuda(device: torch.device, ext) -> Optional[str]:
    """The compiled decode LoRA kernel (what add_lora_ runs for T <= 64 once verified) vs the fp32 reference on
    the CPU: per case an error at most twice the Triton path's it replaces (plus one ulp of the largest output),
    rows it must not touch (tokens with -1; in mixed mode the merged adapter's tokens) bit-identical, a second run
    bit-identical to the first (deterministic), and the counters back to zero."""
    return _verify_decode_cases(device, ext, "sgmv_decode_", "the extension has no sgmv_decode kernel", 2,
                                _DECODE_CASES, _check_sgmv_decode_case)


# (in, outs, ranks, dtype of x / W0 / adapters, T, merged, bias): decode shapes (T <= 64) incl. fused slices, mixed
# mode, bias and none, a rank-256 adapter, T > 16 (several token groups), odd widths (the scalar fallback, a last
# tile of < 8 features).
_FUSED_CASES = (
    (4096, (4096,), (8, 16, 64), torch.bfloat16, 1, None, False),
    (4096, (4096,), (8, 16, 64), torch.float16, 16, None, True),
    (4096, (4096, 1024, 1024), (16, 8, 128), torch.bfloat16, 7, 1, True),
    (2048, (2048, 512, 512), (4, 32), torch.float16, 64, 0, False),
    (1000, (72, 13), (5, 33, 9), torch.bfloat16, 64, 2, True),
    (264, (40,), (256, 3), torch.float16, 33, None, True),
    (512, (96,), (16, 7), torch.float32, 5, 0, False),
)


def _check_fused_linear_case(op, device: torch.device, case, gen: torch.Generator) -> Optional[str]:
    """One case of :func:`_verify_fused_linear_cuda`."""
    from ..plan import fused_counters

    import lora_kernels as lk
    from lora_kernels.nn import lora_linear as L

    in_f, outs, ranks, dt, T, merged, has_bias = case
    name = f"in={in_f} outs={outs} ranks={ranks} {dt} T={T} merged={merged} bias={has_bias}"
    w = _decode_weights(in_f, outs, ranks, dt, device, gen)
    base = torch.nn.Linear(in_f, w.out_features, bias=has_bias).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(w.out_features, in_f, generator=gen) / in_f**0.5)
        if has_bias:
            base.bias.copy_(torch.randn(w.out_features, generator=gen))
    ids, batch = _decode_batch(T, len(ranks), merged, device, gen)
    layer = L.LoRALinear(base.to(device, dt), w, batch=batch)
    x = torch.randn(T, in_f, generator=gen).to(device, dt)
    m = -1 if merged is None else merged
    got = [L._fused_(op, layer, x, batch, m) for _ in range(2)]
    if merged is not None:
        layer.set_serving_mode("mixed", merged)
    with torch.no_grad(), lk.backends.use_backend("triton"):  # a forced backend: the unfused path
        y_tr = layer(x).view(T, -1)
    torch.cuda.synchronize(device)
    want = x.float().cpu() @ base.weight.float().cpu().t()
    if has_bias:
        want += base.bias.float().cpu()
    want = _reference_delta_(want, x, w, ids, m)
    return _decode_verdict(name, got, fused_counters(batch.plan), want, y_tr, "unfused path")


def _verify_fused_linear_cuda(device: torch.device, ext) -> Optional[str]:
    """The compiled fused LoRA linear (what LoRALinear runs for T <= 64 once verified: base GEMV + delta in one
    launch) vs the fp32 reference on the CPU (x W0^T + bias + the reference delta, rounded once): per case an error
    at most twice that of the unfused path it replaces (base(x) + add_lora_ on Triton, plus one ulp of the largest
    output), a second run bit-identical to the first (deterministic), and the counters back to zero."""
    return _verify_decode_cases(device, ext, "fused_lora_linear_", "the extension has no fused_lora_linear kernel", 3,
                                _FUSED_CASES, _check_fused_linear_case)


# Each compiled kernel that the dispatcher may choose only after verification on the GPU at hand
# (lora_kernels.tuning.VERIFIABLE_KERNELS): name -> check(device, extension) returning None when it passes, else
# the reason. A kernel family adds its check here.
VERIFIERS: Dict[str, Callable[[torch.device, object], Optional[str]]] = {
    "build_batch_cuda": _verify_build_batch_cuda,
    "merge_cuda": _verify_merge_cuda,
    "deform_cuda": _verify_deform_cuda,
    "sgmv_decode_cuda": _verify_sgmv_decode_cuda,
    "fused_linear_cuda": _verify_fused_linear_cuda,
}


def verify_compiled_kernels(device: torch.device) -> Tuple[List[str], Dict[str, str]]:
    """Check each compiled kernel against the path it would replace, on this GPU. Returns the names that
    passed (for the table's ``verified_kernels``) and a report name -> "pass" / the reason it did not."""
    import lora_kernels as lk
    import lora_kernels._ext

    ext = lk._ext.get()
    if ext is None:
        why = f"not available: {lk._ext.status()}"
        return [], {name: why for name in VERIFIERS}
    passed: List[str] = []
    report: Dict[str, str] = {}
    for name, check in VERIFIERS.items():
        try:
            why = check(device, ext)
        except Exception as e:  # noqa: BLE001  (a failing kernel is reported, never recorded as verified)
            why = f"error: {_err(e)}"
        report[name] = "pass" if why is None else why
        if why is None:
            passed.append(name)
    return passed, report


def run(args) -> int:
    import lora_kernels as lk

    if not torch.cuda.is_available():
        print(NO_GPU_MSG, file=sys.stderr)
        return 2
    why = lk.backends.triton_can_run("cuda")
    if why:
        print(f"lora-bench tune: needs Triton on the GPU: {why}", file=sys.stderr)
        return 2
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in lk.tuning.OPS]
    if bad or not ops:
        print(f"lora-bench tune: --ops: expected names from {lk.tuning.OPS}, got {args.ops!r}", file=sys.stderr)
        return 2
    try:
        cases = C.select_cases(args.cases, C.NAMED_CASES + C.SMOKE_CASES) if args.cases else list(C.NAMED_CASES)
    except ValueError as e:
        print(f"lora-bench tune: {e}", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = torch.device("cuda")
    gpu_name = torch.cuda.get_device_name(device)
    env = envinfo.collect(device)
    timer = measure.GpuTimer(device, reps=args.reps, warmup=3)
    print(f"lora-bench tune: {gpu_name}, {args.dtype}, ops {ops}, {len(cases)} case(s), "
          f"<= {args.max_configs} candidates per bucket")
    t0 = time.perf_counter()
    entries, report, aborted = tune_cases(cases, ops, dtype, device, timer, args.max_configs, args.time_budget,
                                          progress=not args.no_progress, seed=args.seed)
    meta = {
        "commit": env["git"]["commit"],
        "tuned_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "tuned_by": "lora-bench tune",
        "dtype_tuned": args.dtype,
        "method": timer.describe()["method"] + f"; {args.reps} replays per candidate, median",
        "driver": env["gpu"]["driver"] if env["gpu"] else None,
        "aborted": aborted,
    }
    verified, verify_report = verify_compiled_kernels(device)
    for name, outcome in verify_report.items():
        print(f"compiled kernel {name}: {outcome}")
    meta["verified_report"] = verify_report
    path = None
    table = None
    if not args.no_write and (entries or verified):
        merged = {} if args.replace else lk.tuning.load_table(gpu_name)
        merged.update(entries)
        path = lk.tuning.write_table(gpu_name, merged, meta, verified_kernels=verified)
        with open(path) as f:
            table = json.load(f)
        print(f"wrote {len(entries)} tuned bucket(s) ({len(merged)} in all), verified kernels {verified}, to {path}")
    elif not entries:
        print("lora-bench tune: nothing passed; the table is unchanged")
    if args.out:
        d = os.path.dirname(args.out)
        if d:
            os.makedirs(d, exist_ok=True)
        doc = {"schema": "lora_kernels.bench.tune/1", "gpu": env["gpu"], "versions": env["versions"],
               "git_commit": env["git"]["commit"], "meta": meta, "table_path": path, "table": table,
               "entries": entries, "buckets": report, "elapsed_s": time.perf_counter() - t0}
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1, default=str)
            f.write("\n")
        print(f"wrote {args.out}")
    if aborted:
        print(f"lora-bench tune: stopped early: {aborted}")
    return 0 if entries else 1
