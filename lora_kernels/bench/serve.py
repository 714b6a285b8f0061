"""``lora-bench serve``: decode-step latency of a Llama-style model serving n adapters in one batch.

For each batch size B (one new token per sequence, each sequence drawing its own adapter):

* ``base``: the model without LoRA (the floor);
* ``peft.mixed``: PEFT with every adapter loaded, ``model(input_ids, adapter_names=[...])`` (PEFT's
  mixed-batch path);
* ``lk``: the same adapters through :func:`lora_kernels.integrations.peft.from_peft` (patched model, one
  LoRABatch build per step, the batched kernels);
* on CUDA each also as a CUDA-graph replay (``[graph]``): ``lk`` through
  :class:`~lora_kernels.integrations.graphs.DecodeGraph` (batch build inside the graph); ``base`` and
  ``peft.mixed`` captured as they are, reported ``ERROR`` with the reason when capture fails.

The step is the model's forward on [B, 1] tokens without a KV cache (projections, LoRA, MLP and head of a
decode step; attention over the new token only). ``lk`` rows are checked against ``peft.mixed``'s logits
(fp32: 1e-4, bf16/fp16: 5e-2 of max |logit|) before timing; a failing row is ``FAIL`` and not timed. Timing:
CUDA events over eager calls or graph replays (warm L2), median and quartiles; without a GPU, wall clock on
tiny shapes, labelled "CPU smoke, not a GPU measurement". JSON like ``lora-bench sgmv``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from typing import Callable, Dict, List

import torch

from . import envinfo, measure
from .common import (CPU_LABEL, DTYPES, budget_spent, default_out_path, doc_header, fmt, fmt_us, pick_device,
                     pick_dtype, render_table)
from .common import write_json as _write_json
from .sgmv import _csv_ints

__all__ = ["add_arguments", "run", "format_table"]

SCHEMA = "lora_kernels.bench.serve/1"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPU_MODEL = dict(hidden=4096, intermediate=11008, layers=2, heads=32, kv_heads=8, vocab=32000)
CPU_MODEL = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256)
# The model's size options: --hidden, --intermediate, --layers, --heads, --kv-heads, --vocab (None: the default).
_MODEL_HELP = dict(hidden="hidden size", intermediate="MLP width", layers="decoder layers", heads="attention heads",
                   kv_heads="key/value heads", vocab="vocabulary")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and adapters")
    for key, what in _MODEL_HELP.items():
        g.add_argument("--" + key.replace("_", "-"), type=int,
                       help=f"{what} (GPU default {GPU_MODEL[key]}; CPU {CPU_MODEL[key]})")
    g.add_argument("--adapters", type=int, help="adapters loaded (GPU default 32; CPU 4)")
    g.add_argument("--ranks", type=_csv_ints, default=[8, 16, 32, 64], help="ranks cycled over the adapters")
    g.add_argument("--batch", type=_csv_ints, help="decode batch sizes (GPU default 1,8,32,64; CPU 1,4)")
    g = p.add_argument_group("measurement")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on a GPU, fp32 on CPU")
    g.add_argument("--impls", help="comma-separated subset of base,peft.mixed,lk (default all)")
    g.add_argument("--no-graphs", action="store_true", help="eager rows only")
    g.add_argument("--reps", type=int, help="timed repetitions (default 50 GPU, 5 CPU)")
    g.add_argument("--warmup", type=int, help="untimed repetitions")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cpu", action="store_true", help="the CPU smoke path even when a GPU is present")
    g.add_argument("--time-budget", type=float, help="stop starting new batch sizes after this many seconds")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="JSON path (default bench/results/<gpu>/serve-<timestamp>.json; CPU: out/cpu-smoke)")
    g.add_argument("--no-progress", action="store_true", help="accepted for symmetry with the other commands")


def _build(cfg: dict, n: int, ranks: List[int], dtype, device, seed: int):
    import peft
    import transformers

    torch.manual_seed(seed)
    mc = transformers.LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"],
                                  intermediate_size=cfg["intermediate"], num_hidden_layers=cfg["layers"],
                                  num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
                                  max_position_embeddings=64)
    with torch.device(device):
        base = transformers.LlamaForCausalLM(mc).to(dtype).eval()
    names = [f"a{k}" for k in range(n)]
    pm = None
    for k, name in enumerate(names):
        r = ranks[k % len(ranks)]
        lc = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)
        pm = peft.get_peft_model(copy.deepcopy(base), lc, adapter_name=name) if pm is None else pm
        if k:
            pm.add_adapter(name, lc)
    return base, pm.to(device, dtype).eval(), names


def _row(B: int, impl: str, status: str, **kw) -> dict:
    row = {"batch": B, "impl": impl, "status": status, "us_median": None, "us_p25": None, "us_p75": None,
           "graph": None, "why": None, "max_abs_diff": None, "allowed": None, "overhead_vs_base": None}
    row.update(kw)
    return row


def _time(timer, fn: Callable[[], object], graphs: bool, device) -> tuple:
    if graphs:
        run, graphed, err = timer.capture(fn)
        if not graphed:
            return None, err
    else:
        run = fn
    q = measure.quantiles(timer.time(run))
    return q, None


def _problem(B: int, vocab: int, names: List[str], device, seed: int):
    g = torch.Generator().manual_seed(seed + B)
    tok = torch.randint(0, vocab, (B, 1), generator=g).to(device)
    req = [names[int(k)] for k in torch.randint(0, len(names), (B,), generator=g)]
    return tok, req


def peft_rows(B: int, base, pm, names, impls, timer, device, graphs: bool, seed: int) -> List[dict]:
    """``base`` and ``peft.mixed`` rows (PEFT's layers in place); ``[graph]`` rows when ``graphs``."""
    tok, req = _problem(B, base.config.vocab_size, names, device, seed)
    fns: Dict[str, Callable[[], object]] = {
        "base": lambda: base(tok, use_cache=False).logits,
        "peft.mixed": lambda: pm(tok, adapter_names=req, use_cache=False).logits,
    }
    rows: List[dict] = []
    for mode in ["eager"] + (["graph"] if graphs else []):
        for name in impls:
            label = f"{name}[{mode}]"
            try:
                with torch.inference_mode():
                    fns[name]()
                    q, err = _time(timer, fns[name], mode == "graph", device)
            except Exception as e:
                rows.append(_row(B, label, "ERROR", graph=mode == "graph",
                                 why=f"{type(e).__name__}: {e}".splitlines()[0][:200]))
                continue
            if q is None:
                rows.append(_row(B, label, "ERROR", graph=True, why=f"capture failed: {err}"))
                continue
            rows.append(_row(B, label, "ok", us_median=q["median"], us_p25=q["p25"], us_p75=q["p75"],
                             graph=mode == "graph", reps=q["n"]))
    return rows


def lk_rows(B: int, base, pm, names, timer, device, graphs: bool, dtype, seed: int) -> List[dict]:
    """``lk`` rows: reference logits from PEFT's mixed batch first, then :func:`from_peft` (patch), checked and
    timed (eager, and a :class:`DecodeGraph` replay when ``graphs``), then the patch is undone."""
    from ..integrations.graphs import DecodeGraph
    from ..integrations.peft import from_peft

    tok, req = _problem(B, base.config.vocab_size, names, device, seed)
    with torch.inference_mode():
        ref = pm(tok, adapter_names=req, use_cache=False).logits.float()
    tol = (1e-4 if dtype == torch.float32 else 5e-2) * float(ref.abs().max())
    serving = from_peft(pm, names, max_tokens=max(B, 1))
    rows: List[dict] = []
    try:
        ids = serving.ids_for(req).to(device)
        for mode in ["eager"] + (["graph"] if graphs else []):
            label = f"lk[{mode}]"
            try:
                with torch.inference_mode():
                    if mode == "graph":
                        dg = DecodeGraph(serving.patch, B).capture()
                        out = dg.replay(ids, input_ids=tok).float()
                        fn = dg.graph.replay
                    else:
                        def fn():
                            return serving.model(tok, adapter_ids=ids, use_cache=False).logits
                        out = fn().float()
                    diff = float((out - ref).abs().max())
                    if not diff <= tol:
                        rows.append(_row(B, label, "FAIL", graph=mode == "graph", max_abs_diff=diff, allowed=tol,
                                         why=f"logits differ from PEFT's mixed batch by {diff:.3g} > {tol:.3g}"))
                        continue
                    q = measure.quantiles(timer.time(fn))
            except Exception as e:
                rows.append(_row(B, label, "ERROR", graph=mode == "graph",
                                 why=f"{type(e).__name__}: {e}".splitlines()[0][:200]))
                continue
            rows.append(_row(B, label, "ok", us_median=q["median"], us_p25=q["p25"], us_p75=q["p75"],
                             graph=mode == "graph", max_abs_diff=diff, allowed=tol, reps=q["n"]))
    finally:
        serving.restore()
    return rows


def format_table(rows: List[dict]) -> str:
    """batch, impl, status, us median [p25-p75], overhead vs base, max |diff| vs PEFT's logits."""
    hdr = ("batch", "impl", "status", "us median [p25-p75]", "vs base", "max|diff| vs PEFT")
    cells = [(str(r["batch"]), r["impl"], r["status"], fmt_us(r, ".1f"),
              "-" if r["overhead_vs_base"] is None else f"{100 * r['overhead_vs_base']:+.0f}%",
              fmt(r["max_abs_diff"], ".2e")) for r in rows]
    return render_table(hdr, cells, rows, show_why=lambda r: r["status"] != "ok")


def run(args) -> int:
    """Run the benchmark; 0 when every row passed (or could not be captured: ERROR rows for graphs of
    ``base``/``peft.mixed`` are reported, not failures), 1 when an ``lk`` row failed or errored, 2 on bad args."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"lora-bench serve: needs transformers and peft ({e})", file=sys.stderr)
        return 2
    gpu, device = pick_device(args.cpu)
    dtype = pick_dtype(args.dtype, gpu)
    d = GPU_MODEL if gpu else CPU_MODEL
    cfg = {k: getattr(args, k.replace("-", "_"), None) or v for k, v in d.items()}
    n = args.adapters or (32 if gpu else 4)
    batches = args.batch or ([1, 8, 32, 64] if gpu else [1, 4])
    impls = [s.strip() for s in (args.impls or "base,peft.mixed,lk").split(",") if s.strip()]
    bad = [s for s in impls if s not in ("base", "peft.mixed", "lk")]
    if bad or n < 1:
        print(f"lora-bench serve: expected --impls among base,peft.mixed,lk and --adapters >= 1, got {bad} / {n}",
              file=sys.stderr)
        return 2
    graphs = gpu and not args.no_graphs
    timer = measure.make_timer(device, args.reps or (50 if gpu else 5), args.warmup, use_graphs=True,
                               flush="none")
    env = envinfo.collect(device)
    gpu_name = env["gpu"]["name"] if env["gpu"] else None
    t0 = time.perf_counter()
    base, pm, names = _build(cfg, n, args.ranks, dtype, device, args.seed)
    rows: List[dict] = []
    for B in batches:
        if budget_spent(args.time_budget, t0):
            rows.append(_row(B, "*", "SKIP", why=f"--time-budget {args.time_budget}s spent"))
            continue
        batch_rows = peft_rows(B, base, pm, names, [i for i in impls if i != "lk"], timer, device, graphs,
                               args.seed)
        if "lk" in impls:
            batch_rows += lk_rows(B, base, pm, names, timer, device, graphs, dtype, args.seed)
        floor = {r["graph"]: r["us_median"] for r in batch_rows
                 if r["impl"].startswith("base[") and r["status"] == "ok"}
        for r in batch_rows:
            if r["status"] == "ok" and floor.get(r["graph"]):
                r["overhead_vs_base"] = r["us_median"] / floor[r["graph"]] - 1.0
        rows += batch_rows
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
    doc = {
        **doc_header("serve", SCHEMA, gpu, None if gpu else CPU_LABEL, env, args, git_commit=False),
        "timer": timer.describe(),
        "config": {**cfg, "adapters": n, "ranks": args.ranks, "batches": batches, "dtype": measure.dtype_name(dtype),
                   "step": "forward on [B, 1] tokens, no KV cache", "targets": TARGETS},
        "rows": rows,
    }
    out = args.out or default_out_path(gpu_name, prefix="serve")
    _write_json(out, doc)
    if not gpu:
        print(f"[{CPU_LABEL}]")
    print(format_table(rows))
    print(f"JSON: {out}")
    failed = [r for r in rows if r["impl"].startswith("lk") and r["status"] in ("FAIL", "ERROR")]
    return 1 if failed else 0
