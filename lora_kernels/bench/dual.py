"""``lora-bench dual``: time the Dual-LoRA delta (forward, and forward + backward) against PyTorch.

Implementations (each judged against the fp32 reference before it is timed; a failing one is ``FAIL`` and not
timed):

* ``lora_kernels``: :func:`lora_kernels.dual_lora` (Triton on a GPU: fused [A; T] shrink + LayerNorm/gate
  epilogue, SGMV expand; backward with SGMV launches and the segmented weight-gradient kernel).
* ``torch``: the same maths in PyTorch, one adapter at a time over token index lists built once on the host
  (the ``nn.Linear`` + ``nn.LayerNorm`` per adapter way; the LayerNorm output and the gate are materialised).
* ``torch_compile``: ``torch.compile`` of ``torch`` (the index lists are constants, so it traces).
* ``reference``: :func:`lora_kernels.reference.dual_lora_delta` (the spec; host loop with a sync per step).

Default problem: the paper's r = 32 (alpha 64) on a 4096 -> 4096 projection, 4096 tokens over 4 adapters
(uniform), bf16 on a GPU. Rows: time (median, quartiles, us; eager launches, L2 flushed on a GPU) and peak
memory above the inputs (``torch.cuda.max_memory_allocated``), for ``fwd`` and ``fwd+bwd`` (grads of x and of
every adapter tensor). Without a GPU: a tiny CPU smoke run labelled as such (proves the command and the JSON,
not any speed). JSON schema ``lora_kernels.bench.dual/1``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
from typing import Callable, Dict, List, Optional

import torch

from . import envinfo, measure
from .common import CPU_LABEL, DTYPES, gpu_record_path, pick_device, pick_dtype, write_json

__all__ = ["add_arguments", "run"]

SCHEMA = "lora_kernels.bench.dual/1"
# max|out - ref| / max|ref| accepted per dtype (the delta is a few dots deep: a handful of ulps)
REL_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, help="tokens T (default 4096 on a GPU, 16 on CPU)")
    p.add_argument("--hidden-in", type=int, help="input width (default 4096 on a GPU, 64 on CPU)")
    p.add_argument("--hidden-out", type=int, help="output width (default: --hidden-in)")
    p.add_argument("--rank", type=int, default=32, help="Dual-LoRA rank r of every adapter (default 32)")
    p.add_argument("--alpha", type=float, default=64.0, help="alpha (scale alpha / r; default 64)")
    p.add_argument("--adapters", type=int, default=4, help="adapters the tokens draw from (uniform)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on a GPU, fp32 on CPU")
    p.add_argument("--impls", help="comma-separated globs of implementation names (default: all)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated: fwd, fwd+bwd")
    p.add_argument("--reps", type=int, help="timed repetitions (default 50 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, help="untimed repetitions first")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even with a GPU")
    p.add_argument("--out", help="JSON path (default: bench/results/<gpu>/dual-<time>.json on a GPU, none on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no per-row progress lines")
    p.add_argument("--time-budget", type=float, help="accepted for gpu_check.sh symmetry (the sweep is small)")


def _problem(T, in_f, out_f, r, alpha, n_ad, dtype, device, seed):
    import lora_kernels as lk

    g = torch.Generator().manual_seed(seed)
    w = lk.DualLoRAWeights(in_f, out_f, n_ad, r, dtype=dtype, device=device)
    for _ in range(n_ad):
        i = w.new_adapter(r, alpha, generator=g)
        with torch.no_grad():  # a trained-looking adapter: nonzero B and LN affine
            off = int(w.offsets[i])
            w.b[off : off + r] = (torch.randn(r, out_f, generator=g) / r**0.5).to(device, dtype)
            w.ln_weight[off : off + r] = (1 + 0.1 * torch.randn(r, generator=g)).to(device, dtype)
    ids = torch.randint(0, n_ad, (T,), generator=g, dtype=torch.int32)
    batch = lk.LoRABatch.from_ids(ids.to(device), n_ad, ranks=w.ranks)
    x = torch.randn(T, in_f, generator=g).to(device, dtype)
    dy = torch.randn(T, out_f, generator=g).to(device, dtype)
    return w, batch, ids, x, dy


def _torch_impl(w, ids):
    """Per-adapter PyTorch (index lists and row ranges fixed on the host once)."""
    groups = []
    for i in sorted(set(ids.tolist())):
        idx = (ids == i).nonzero().flatten().to(w.device)
        r = w.rank_of(i)
        groups.append((idx, int(w.offsets[i]), r, float(w.scales[0, i])))

    def f(x, a, b, lw, lb):
        out = torch.zeros(x.shape[0], b.shape[1], dtype=x.dtype, device=x.device)
        for idx, o, r, s in groups:
            xs = x[idx]
            u = xs @ a[0, o : o + r].t()
            v = xs @ a[0, o + r : o + 2 * r].t()
            ln = torch.nn.functional.layer_norm(u, (r,), lw[o : o + r], lb[o : o + r], 1e-5)
            out = out.index_add(0, idx, s * ((torch.relu(v) * ln) @ b[o : o + r]))
        return out

    return f


def _impls(w, batch, ids) -> Dict[str, Callable]:
    import lora_kernels as lk

    tf = _torch_impl(w, ids)
    tok = ids.to(w.device)

    def ref(x, a, b, lw, lb):
        return lk.reference.dual_lora_delta(x, a, b, lw, lb, w.offsets, w.ranks, w.scales, tok).to(x.dtype)

    def ours(x, a, b, lw, lb):
        w.a, w.b, w.ln_weight, w.ln_bias = a, b, lw, lb
        return lk.dual_lora(x, w, batch)

    return {"lora_kernels": ours, "torch": tf, "torch_compile": torch.compile(tf), "reference": ref}


def _row(impl, mode, status, **kw) -> dict:
    return {"impl": impl, "mode": mode, "status": status, **kw}


def run(args) -> int:
    """Run the benchmark; 0 when every row passed, 1 otherwise."""
    gpu, device = pick_device(args.cpu)
    dtype = pick_dtype(args.dtype, gpu)
    T = args.tokens or (4096 if gpu else 16)
    in_f = args.hidden_in or (4096 if gpu else 64)
    out_f = args.hidden_out or in_f
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("fwd", "fwd+bwd")]
    if bad:
        print(f"--modes: expected fwd and/or fwd+bwd, got {bad}")
        return 2
    w, batch, ids, x, dy = _problem(T, in_f, out_f, args.rank, args.alpha, args.adapters, dtype, device, args.seed)
    impls = _impls(w, batch, ids)
    if args.impls:
        pats = [p.strip() for p in args.impls.split(",") if p.strip()]
        impls = {k: v for k, v in impls.items() if any(fnmatch.fnmatch(k, p) for p in pats)}
    timer = measure.make_timer(device, args.reps or (None if gpu else 3), args.warmup, use_graphs=False)
    if gpu:
        timer.reps = args.reps or 50
    storage = [w.a.detach(), w.b.detach(), w.ln_weight.detach(), w.ln_bias.detach()]
    # the spec, fp32
    ref_leaves = [t.detach().float().clone().requires_grad_() for t in [x] + storage]
    import lora_kernels as lk

    d_ref = lk.reference.dual_lora_delta(*ref_leaves, w.offsets, w.ranks, w.scales, ids.to(device))
    d_ref.backward(dy.float())
    ref_grads = [t.grad for t in ref_leaves]
    rows: List[dict] = []
    for name, fn in impls.items():
        for mode in modes:
            leaves = [t.detach().clone().requires_grad_(mode == "fwd+bwd") for t in [x] + storage]

            def step(fn=fn, leaves=leaves, mode=mode):
                if mode == "fwd":
                    with torch.no_grad():
                        return fn(*leaves), None
                for t in leaves:
                    t.grad = None
                out = fn(*leaves)
                out.backward(dy)
                return out, [t.grad for t in leaves]

            try:
                out, grads = step()
                errs = {"delta": _rel(out, d_ref)}
                if grads is not None:
                    for gname, gr, rg in zip(("dx", "da", "db", "dln_w", "dln_b"), grads, ref_grads):
                        errs[gname] = _rel(gr, rg)
                tol = REL_TOL[dtype]
                worst = max(errs.values())
                if not worst <= tol:
                    rows.append(_row(name, mode, "FAIL", why=f"rel err {worst:.3g} > {tol:g}", rel_err=errs))
                    continue
                if gpu:
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                step()
                peak = (torch.cuda.max_memory_allocated() - base) if gpu else None
                q = measure.quantiles(timer.time(step))
                rows.append(_row(name, mode, "ok", us_median=q["median"], us_p25=q["p25"], us_p75=q["p75"],
                                 us_min=q["min"], reps=q["n"], peak_bytes=peak, rel_err=errs))
            except Exception as e:  # one broken implementation must not hide the others
                rows.append(_row(name, mode, "ERROR", why=f"{type(e).__name__}: {e}".splitlines()[0][:300]))
            if not args.no_progress:
                r = rows[-1]
                print(f"  {name:14s} {mode:8s} {r['status']:5s} {r.get('us_median', float('nan')):12.1f} us",
                      flush=True)
    for mode in modes:
        ok = {r["impl"]: r for r in rows if r["mode"] == mode and r["status"] == "ok"}
        if "lora_kernels" in ok:
            for r in ok.values():
                r["speedup_of_lora_kernels"] = r["us_median"] / ok["lora_kernels"]["us_median"]
    rec = {
        "schema": SCHEMA, **envinfo.collect(device if gpu else None),
        "label": None if gpu else CPU_LABEL,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "problem": {"tokens": T, "in": in_f, "out": out_f, "rank": args.rank, "alpha": args.alpha,
                    "adapters": args.adapters, "dist": "uniform", "dtype": measure.dtype_name(dtype)},
        "timer": timer.describe(), "rows": rows,
    }
    print(format_table(rows, rec["label"]))
    path = gpu_record_path(args.out, rec["gpu"]["name"] if gpu and rec.get("gpu") else None, "dual")
    if path:
        write_json(path, rec)
        print(f"wrote {path}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _rel(out: Optional[torch.Tensor], ref: torch.Tensor) -> float:
    if out is None:
        return float("inf")
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-12))


def format_table(rows: List[dict], label: Optional[str] = None) -> str:
    head = f"{'impl':14s} {'mode':8s} {'status':6s} {'median us':>11s} {'p25':>10s} {'p75':>10s} " \
           f"{'peak MiB':>9s} {'x vs ours':>9s}"
    lines = ([f"[{label}]"] if label else []) + [head]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['impl']:14s} {r['mode']:8s} {r['status']:6s} {r.get('why', '')}")
            continue
        pk = f"{r['peak_bytes'] / 2**20:9.1f}" if r.get("peak_bytes") is not None else f"{'-':>9s}"
        sp = f"{r['speedup_of_lora_kernels']:9.2f}" if "speedup_of_lora_kernels" in r else f"{'-':>9s}"
        lines.append(f"{r['impl']:14s} {r['mode']:8s} {'ok':6s} {r['us_median']:11.1f} {r['us_p25']:10.1f} "
                     f"{r['us_p75']:10.1f} {pk} {sp}")
    return "\n".join(lines)
