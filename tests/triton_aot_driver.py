"""Compile every Triton kernel of ``lora_kernels.triton`` for real GPU targets, ahead of time, without a GPU.

Run by tests/test_triton_compile.py in a subprocess with ``TRITON_INTERPRET`` unset (the interpreter replaces
``@triton.jit`` at import time, so it cannot be in the test process). Usage::

    python tests/triton_aot_driver.py [--archs 90,80] [--out results.json]

How the cases are enumerated: the launchers themselves run, on small CPU tensors, with
``JITFunction.run`` patched to *record* each launch (kernel, arguments, constexprs, num_warps/num_stages)
instead of launching. So the signatures (pointer dtypes, i32/i64 scalars) and constexpr configurations are
the ones the launchers really produce for the tuning defaults (``lora_kernels.tuning.default_config``) over a
set of shapes chosen to reach every branch (decode with split-K, odd ``in`` (EVEN_K false), multi-slice,
rank > 64, more than ``_FLAT_SEGMENT_LIMIT`` segments, mixed mode, fused and two-pass), plus the largest tile
of each op's tuning sweep (``candidate_configs``), in bf16, fp16 and fp32. Identical launches compile once.

Each unique case is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` to a
cubin (Triton's own ptxas), and checked for:

* shared memory within the target's per-block limit (a config over it compiles but fails to launch);
* 64-bit offsets: in the TTIR, every ``tt.addptr`` applied directly to a data-tensor argument (or to its
  ``tt.splat``) carries an i64 offset. The launchers' convention is ``base + row * row_stride + col``; the
  first term is the one that exceeds 2^31 for tensors over 2^31 elements, so it must already be int64 when
  it meets the base pointer. (Small metadata arguments, listed in ``_SMALL``, are exempt.)
* grids within CUDA's limits (axes 1 and 2 <= 65535), also for launches recorded on ``meta`` tensors of
  large sizes (:func:`big_grid_scenarios`: recorded only, never compiled);
* "wide" variant (bf16, sm_90, one per kernel): every integer argument typed i64, which is what Triton passes
  when a stride or size is >= 2^31: the kernel must still compile.

Prints one JSON object per case on stdout (and writes the list to ``--out``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

from helpers import make_weights, triton_aot_compile  # noqa: E402

from lora_kernels import tuning  # noqa: E402
from lora_kernels.batch import LoRABatch  # noqa: E402
from lora_kernels.triton import deform, dual_lora, merge, sgmv, sgmv_backward  # noqa: E402

# Per-block shared memory opt-in limits (bytes): sm_90 227 KB, sm_80 163 KB.
SMEM_LIMIT = {90: 232448, 80: 166912}

# Pointer arguments that index small metadata (a few entries per adapter, slice, level or job): exempt from
# the 64-bit offset check.
_SMALL = {"meta_ptr", "off_ptr", "rank_ptr", "scale_ptr", "sinfo_ptr", "shapes", "starts", "jobs_ptr",
          "tile_start_ptr", "terms_ptr", "coefs_ptr", "counter_ptr", "lnw_ptr", "lnb_ptr", "ref"}

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32",
        torch.int64: "*i64", torch.uint8: "*u8", torch.int8: "*i8", torch.int16: "*i16"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")

# ---- launch capture ----------------------------------------------------------------------------------------
_captured: list = []
_scenario = ["?"]


_grids: list = []  # (scenario, kernel, grid) of every recorded launch


def _record(self, *args, grid, warmup, **kwargs):
    _captured.append((_scenario[0], self, args, kwargs))
    _grids.append((_scenario[0], self.__name__, tuple(grid) if not callable(grid) else grid(kwargs)))


JITFunction.run = _record


def case_of(fn, args, kwargs, wide=False):
    """(signature, constexprs, options) of one recorded launch, specialised as Triton's launcher does (ints
    equal to 1 become constexprs, except ``do_not_specialize`` ones); ``wide``: every integer argument as i64."""
    params = list(inspect.signature(fn.fn).parameters)
    vals = dict(zip(params, args))
    opts = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
    vals.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
    const_names = {params[i] for i in fn.constexprs} if fn.constexprs and isinstance(
        next(iter(fn.constexprs)), int) else {p.name for p in fn.params if p.is_constexpr}
    dns = {p.name for p in fn.params if p.do_not_specialize}
    sig, consts = {}, {}
    for name in params:
        v = vals[name]
        # Triton's launch-time specialisation: an int argument equal to 1 becomes the constant 1
        if name in const_names or (not wide and type(v) is int and v == 1 and name not in dns):
            sig[name] = "constexpr"
            consts[name] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = _PTR[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i64" if wide or not -2**31 <= v < 2**31 else "i32"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name}: unsupported {type(v).__name__}")
    return sig, consts, opts


_ADDPTR = re.compile(r"tt\.addptr (%[\w#]+), %[\w#]+ : ([^,]+), (\S+)")
_SPLAT = re.compile(r"(%[\w#]+) = tt\.splat (%[\w#]+) ")


def narrow_offsets(ttir: str, sig: dict) -> list[str]:
    """Data-tensor arguments that get a non-i64 offset added directly to their base pointer (see module doc)."""
    m = re.search(r"tt\.func public @\w+\((.*?)\)\s*(attributes|\{)", ttir, re.S)
    names = [n for n, t in sig.items() if t != "constexpr"]
    arg_ssa = re.findall(r"(%[\w#]+): ", m.group(1)) if m else []
    base = {ssa: names[i] for i, ssa in enumerate(arg_ssa) if i < len(names) and sig[names[i]].startswith("*")}
    for dst, src in _SPLAT.findall(ttir):
        if src in base:
            base[dst] = base[src]
    bad = set()
    for ptr, _, off_t in _ADDPTR.findall(ttir):
        name = base.get(ptr)
        if name is not None and name not in _SMALL and not off_t.rstrip(")").endswith("i64>") and off_t != "i64":
            bad.add(f"{name}:{off_t}")
    return sorted(bad)


@triton.jit
def _offset_probe_kernel(x_ptr, y_ptr, stride, BLOCK: tl.constexpr):
    """Self-test of :func:`narrow_offsets`: x gets an int32 row offset (flagged), y an int64 one (not)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + rows * stride)
    tl.store(y_ptr + rows.to(tl.int64) * stride, v)


def kernels_in_package() -> list[str]:
    """Names of the ``@triton.jit`` kernels (``*_kernel``) defined in every module of lora_kernels.triton."""
    import importlib
    import pkgutil

    import lora_kernels.triton as pkg

    names = set()
    for mod in pkgutil.iter_modules(pkg.__path__):
        m = importlib.import_module(f"{pkg.__name__}.{mod.name}")
        for v in vars(m).values():
            if isinstance(v, JITFunction) and v.__name__.endswith("_kernel") and v.__module__ == m.__name__:
                names.add(v.__name__)
    return sorted(names)


# ---- scenarios: run the launchers (recorded, never executed) -----------------------------------------------
def _weights(in_f, outs, ranks, dtype, max_adapters=None):
    return make_weights(in_f, outs, ranks, dtype=dtype, max_adapters=max_adapters)


def _ids(T, n, frac_none=0.25):
    ids = torch.arange(T, dtype=torch.int32) % n
    ids[: int(T * frac_none)] = -1
    return ids


def sgmv_scenarios(dt):
    shapes = {  # name: (T, in, outs, ranks, max_adapters)
        "decode_splitk": (1, 4096, (4096,), [8, 16], None),
        "odd_multislice": (100, 200, (96, 32, 32), [8, 64, 33], None),
        "rank128_wide": (300, 1024, (2048,), [128, 16], None),
        "grid2d": (2100, 64, (64,), [8, 16], 4096),
    }
    for name, (T, in_f, outs, ranks, n_max) in shapes.items():
        w = _weights(in_f, outs, ranks, dt, n_max)
        ids = _ids(T, len(ranks))
        batch = LoRABatch.from_ids(ids, w.max_adapters, ranks=w.ranks)
        x = torch.zeros(T, in_f, dtype=dt)
        y = torch.zeros(T, w.out_features, dtype=dt)
        args = (y, x, w.a, w.b, w.offsets, w.ranks, w.scales, batch.meta, batch.max_tokens, w.slice_info,
                w.max_rank)
        for strategy in ("two_pass", "fused"):
            for merged in (-1, 0):
                _scenario[0] = f"sgmv:{name}:{strategy}:merged={merged}"
                sgmv.add_lora_(*args, config={"strategy": strategy}, merged=merged)
        if name in ("odd_multislice", "rank128_wide"):
            # the largest tile of each op's tuning sweep (shared memory, registers)
            vol = {"shrink": ("BLOCK_M", "BLOCK_K", "BLOCK_R"), "expand": ("BLOCK_M", "BLOCK_N", "BLOCK_R")}
            for op, keys in vol.items():
                cands = tuning.candidate_configs(op, dt, T, in_f, w.out_features, w.max_rank)
                big = max(cands, key=lambda c: (c[keys[0]] * c[keys[1]] * c[keys[2]], c["num_stages"]))
                _scenario[0] = f"sgmv:{name}:sweep_max_{op}"
                sgmv.add_lora_(*args, config={"strategy": "two_pass", op: big})
            fused = [c for c in tuning.candidate_configs("add_lora", dt, T, in_f, w.out_features, w.max_rank)
                     if c["strategy"] == "fused"]
            if fused:
                _scenario[0] = f"sgmv:{name}:sweep_max_fused"
                big = max(fused, key=lambda c: c["BLOCK_M"] * c["BLOCK_N"])
                sgmv.add_lora_(*args, config={k: big[k] for k in tuning._FUSED_KEYS + ("strategy",)})
            dy = torch.zeros_like(y)
            for cfg in (None, {"SPLIT_M": 4}):
                _scenario[0] = f"sgmv_backward:{name}:{cfg}"
                sgmv_backward.lora_backward(dy, x, w.a, w.b, w.offsets, w.ranks, w.scales, batch.meta,
                                            batch.max_tokens, w.slice_info, w.slice_cols, w.slice_outs,
                                            w.max_rank, config=cfg)


def dual_scenarios(dt):
    from lora_kernels.dual_weights import DualLoRAWeights  # noqa: F401  (layout documented there)

    for T, in_f, out_f, ranks in ((9, 200, 96, [8, 32]), (100, 256, 128, [64, 16])):
        r_cap = max(ranks)
        R = 2 * sum(ranks) + 8
        offs, o = [], 0
        for r in ranks:
            offs.append(o)
            o += 2 * r
        offsets = torch.tensor(offs, dtype=torch.int64)
        rk = torch.tensor([ranks], dtype=torch.int32)
        scales = torch.ones(1, len(ranks))
        ids = _ids(T, len(ranks))
        batch = LoRABatch.from_ids(ids, len(ranks), ranks=rk)
        a = torch.zeros(1, R, in_f, dtype=dt)
        b = torch.zeros(R, out_f, dtype=dt)
        ln_w, ln_b = torch.ones(R, dtype=dt), torch.zeros(R, dtype=dt)
        x = torch.zeros(T, in_f, dtype=dt)
        y = torch.zeros(T, out_f, dtype=dt)
        info = torch.tensor([[0, out_f]], dtype=torch.int64)
        in_info = torch.tensor([[0, in_f]], dtype=torch.int64)
        uv = torch.zeros(T, 2 * r_cap)
        _scenario[0] = f"dual_lora:T{T}:fwd"
        dual_lora.dual_lora_(y, x, a, b, ln_w, ln_b, offsets, rk, scales, batch.meta, batch.max_tokens, info,
                             r_cap, 1e-5, uv=uv)
        _scenario[0] = f"dual_lora:T{T}:bwd"
        dual_lora.dual_lora_backward(torch.zeros_like(y), x, a, b, ln_w, ln_b, uv, offsets, rk, 2 * rk, scales,
                                     batch.meta, batch.max_tokens, in_info, r_cap, 1e-5)


def merge_scenarios(dt):
    jobs = torch.zeros(3, merge.JOB_COLS, dtype=torch.int64)
    tile_start = torch.tensor([0, 4, 9], dtype=torch.int64)
    terms = torch.zeros(4, 2, dtype=torch.int64)
    coefs = torch.zeros(4)
    counter = torch.zeros(2, dtype=torch.int32)
    for ab in sorted({dt, torch.float32}, key=str):
        for unmerge in (False, True):
            for exact in (False, True):
                _scenario[0] = f"merge:ab={ab}:unmerge={unmerge}:exact={exact}"
                merge.launch_merge_grouped(jobs, tile_start, terms, coefs, counter, 12, dt, ab, unmerge, exact)


def deform_scenarios(dt):
    B, H, D, L, P, Q = 1, 2, 64, 4, 4, 576
    ss = torch.tensor([[24, 24]] * L, dtype=torch.int64)
    starts = torch.arange(L, dtype=torch.int64) * 576
    S = 576 * L
    value = torch.zeros(B, S, H, D, dtype=dt)
    for lt in sorted({dt, torch.float32}, key=str):
        loc = torch.zeros(B, Q, H, L, P, 2, dtype=lt)
        attn = torch.zeros(B, Q, H, L, P, dtype=lt)
        go = torch.zeros(B, Q, H * D, dtype=dt)
        _scenario[0] = f"deform:pool:loc={lt}"
        deform.deform_pool_fwd(value, ss, starts, loc, attn)
        for det in (False, True):
            deform.deform_pool_bwd(go, value, ss, starts, loc, attn, deterministic=det)
        ref = torch.zeros(Q, 2, dtype=torch.float32)
        _scenario[0] = f"deform:sample:off={lt}"
        deform.deform_sample_fwd(value, ss, starts, ref, loc, attn)
        for det in (False, True):
            deform.deform_sample_bwd(go, value, ss, starts, ref, loc, attn, deterministic=det)


def big_grid_scenarios():
    """Launchers on ``meta`` tensors (nothing allocated, nothing compiled) at sizes whose grids could pass
    CUDA's limits: only the recorded grids are checked."""
    B, H, D, L, P, Q = 4096, 32, 64, 4, 4, 576  # B * H = 131072 > 65535
    kw = dict(device="meta")
    value = torch.empty(B, 576 * L, H, D, dtype=torch.bfloat16, **kw)
    ss, starts = torch.empty(L, 2, dtype=torch.int64, **kw), torch.empty(L, dtype=torch.int64, **kw)
    loc, attn = torch.empty(B, Q, H, L, P, 2, **kw), torch.empty(B, Q, H, L, P, **kw)
    go = torch.empty(B, Q, H * D, dtype=torch.bfloat16, **kw)
    ref = torch.empty(Q, 2, **kw)
    _scenario[0] = "grid:deform_B4096_H32"
    deform.deform_pool_fwd(value, ss, starts, loc, attn)
    deform.deform_pool_bwd(go, value, ss, starts, loc, attn, deterministic=True)
    deform.deform_sample_fwd(value, ss, starts, ref, loc, attn)
    deform.deform_sample_bwd(go, value, ss, starts, ref, loc, attn, deterministic=True)


def grids_over_limits() -> list[str]:
    """Recorded launches whose grid exceeds CUDA's limits (axis 0 < 2^31, axes 1 and 2 <= 65535)."""
    big_grid_scenarios()
    lim = (2**31 - 1, 65535, 65535)
    return [f"{k} [{sc}] grid={g}" for sc, k, g in _grids if any(int(n) > m for n, m in zip(g, lim))]


SCENARIOS = {"sgmv": sgmv_scenarios, "dual_lora": dual_scenarios, "merge": merge_scenarios,
             "deform": deform_scenarios}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def collect(families=None, dtypes=("bf16", "fp16", "fp32")):
    """Unique recorded launches: list of (key, scenario, fn, sig, consts, opts)."""
    for dn in dtypes:
        for fam, run in SCENARIOS.items():
            if families is None or fam in families:
                _scenario[0] = fam
                start = len(_captured)
                run(DTYPES[dn])
                for i in range(start, len(_captured)):
                    sc, fn, a, k = _captured[i]
                    _captured[i] = (f"{dn}:{sc}", fn, a, k)
    seen, out = set(), []
    for sc, fn, a, k in _captured:
        sig, consts, opts = case_of(fn, a, k)
        key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(consts.items())), tuple(sorted(opts.items())))
        if key not in seen:
            seen.add(key)
            out.append((key, sc, fn, a, k))
    return out


def compile_case(fn, sig, consts, opts, arch):
    t0 = time.time()
    res = {"kernel": fn.__name__, "arch": arch, "sig": sig, "consts": {k: str(v) for k, v in consts.items()},
           "opts": opts}
    try:
        k = triton_aot_compile(fn, sig, consts, arch, opts)
        res["ok"] = bool(k.asm.get("cubin"))
        res["shared"] = int(k.metadata.shared)
        res["narrow"] = narrow_offsets(k.asm["ttir"], sig)
        res["error"] = "" if res["ok"] else "no cubin"
    except Exception as e:  # noqa: BLE001 - reported per case, the test fails on it
        res["ok"], res["shared"], res["narrow"] = False, -1, []
        res["error"] = f"{type(e).__name__}: {str(e)[-1500:]}"
    res["seconds"] = round(time.time() - t0, 2)
    return res


_FLAGS = ("MIXED", "EVEN_K", "SAVE_UV", "PER_SLICE_G", "UNMERGE", "EXACT", "WRITE_GV", "W_KIND", "AB_KIND")
_DOT_KERNELS = {"_sgmv_shrink_kernel", "_sgmv_expand_kernel", "_sgmv_fused_kernel", "_sgmv_outer_kernel",
                "_dual_lora_shrink_kernel", "_dual_lora_wgrad_kernel", "_merge_grouped_kernel"}


def _structure(key):
    """A launch's code path: kernel, branch flags, >1-ness of the split/slice counts, the 2-D grid, dtypes."""
    name, sig, consts, _ = key
    c, sg = dict(consts), dict(sig)
    f = tuple((k, c[k]) for k in _FLAGS if k in c)
    f += tuple((k, int(c[k]) > 1) for k in ("SPLIT_K", "SPLIT_M", "N_SPLIT", "NUM_SLICES") if k in c)
    return (name, c.get("SEG_P2", 1) == 0) + f + tuple(sorted(v for v in sg.values() if v.startswith("*")))


def plan(cases, archs, full=False):
    """(case index, arch, wide) jobs. Default (CI, about a minute on 2 cores): on archs[0], one bf16 launch per
    code path (:func:`_structure`) plus the tuning sweep's largest tiles; one fp32 launch per kernel and one
    fp16 launch per tl.dot kernel; on every other arch, one bf16 launch per tl.dot kernel (mma v2 instead of
    Hopper's wgmma); one "wide" (all-i64 integers) bf16 launch per kernel. ``full``: every unique launch on
    every arch, plus the wide ones."""
    jobs, seen = [], set()
    for i, (key, sc, fn, _args, _kwargs) in enumerate(cases):
        dn = sc.split(":", 1)[0]
        name = fn.__name__
        if full:
            jobs += [(i, arch, False) for arch in archs]
        elif dn == "bf16":
            s = ("sweep", key) if "sweep_max" in sc else _structure(key)
            if s not in seen:
                jobs.append((i, archs[0], False))
        elif (dn, name) not in seen and (dn == "fp32" or name in _DOT_KERNELS):
            jobs.append((i, archs[0], False))
        if dn == "bf16" and (dn, name) not in seen:
            if not full and name in _DOT_KERNELS:
                jobs += [(i, arch, False) for arch in archs[1:]]
            jobs.append((i, archs[0], True))
        seen.add((dn, name))
        if dn == "bf16" and not full:
            seen.add(("sweep", key) if "sweep_max" in sc else _structure(key))
    return jobs


_CASES: list = []


def _run_job(job):
    i, arch, wide = job
    key, sc, fn, a, k = _CASES[i]
    sig, consts, opts = case_of(fn, a, k, wide=wide)
    r = compile_case(fn, sig, consts, opts, arch)
    r["scenario"] = sc + (":wide_i64" if wide else "")
    r["limit"] = SMEM_LIMIT.get(arch)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="90,80")
    ap.add_argument("--out", default=None)
    ap.add_argument("--families", default=None)
    ap.add_argument("--full", action="store_true", help="every unique launch on every arch (slow)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ns = ap.parse_args(argv)
    archs = [int(a) for a in ns.archs.split(",")]
    _CASES[:] = collect(ns.families.split(",") if ns.families else None)
    jobs = plan(_CASES, archs, ns.full)
    results = []
    if ns.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(ns.jobs) as pool:
            it = pool.imap_unordered(_run_job, jobs)
            for r in it:
                results.append(r)
                print(json.dumps(r), flush=True)
    else:
        for job in jobs:
            results.append(_run_job(job))
            print(json.dumps(results[-1]), flush=True)
    probe = triton_aot_compile(_offset_probe_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "stride": "i32"},
                               {"BLOCK": 64}, archs[0], {"num_warps": 4})
    sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "stride": "i32", "BLOCK": "constexpr"}
    report = {"triton": triton.__version__, "results": results, "kernels": kernels_in_package(),
              "n_grids": len(_grids), "grids_over": grids_over_limits(),
              "probe_narrow": narrow_offsets(probe.asm["ttir"], sig)}
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
