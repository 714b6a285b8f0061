"""Compile every Triton kernel of ``lora_kernels.triton`` for real GPU targets, ahead of time, without a GPU.

Run by tests/test_triton_compile.py in a subprocess with ``TRITON_INTERPRET`` unset (the interpreter replaces
``@triton.jit`` at import time, so it cannot be in the test process). Usage::

    python tests/triton_aot_driver.py [--archs 90,80] [--out results.json]
    python tests/triton_aot_driver.py --recompiles --out sweep.json   # serving sweep only (serving_sweep)

How the cases are enumerated: the launchers themselves run, on small CPU tensors, with
``JITFunction.run`` patched to *record* each launch (kernel, arguments, constexprs, num_warps/num_stages)
instead of launching. So the signatures (pointer dtypes, i32/i64 scalars) and constexpr configurations are
the ones the launchers really produce for the tuning defaults (``lora_kernels.tuning.default_config``) over a
set of shapes chosen to reach every branch (decode with split-K, odd ``in`` (EVEN_K false), multi-slice,
rank > 64, more than ``_FLAT_SEGMENT_LIMIT`` segments, mixed mode, fused and two-pass; the persistent kernel of
the default strategy in each config bucket, both ALIGNED variants: :func:`persistent_scenarios`), plus the largest
tile of each op's tuning sweep (``candidate_configs``), in bf16, fp16 and fp32. Identical launches compile once.

Each case is compiled as the launch would compile it: the signature, constexprs, specialisation attributes
(``tt.divisibility`` 16 for pointers aligned to 16 bytes and integers divisible by 16; integers equal to 1 as
constants) and options come from Triton's own launch-time code (:func:`launch_specialization`: the JIT's binder
``create_function_from_signature`` + ``JITFunction._pack_args``, the two steps ``JITFunction.run`` takes before
compiling) applied to the recorded arguments, and are cross-checked against what ``JITFunction.run`` itself hands
to its compiler (:func:`jit_run_specialization`, run with a stand-in driver for the target and the compile step
captured). Then ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
options=...)`` builds a cubin (Triton's own ptxas), checked for:

* shared memory within the target's per-block limit (a config over it compiles but fails to launch);
* 64-bit offsets: in the TTIR, every ``tt.addptr`` applied directly to a data-tensor argument (or to its
  ``tt.splat``) carries an i64 offset. The launchers' convention is ``base + row * row_stride + col``; the
  first term is the one that exceeds 2^31 for tensors over 2^31 elements, so it must already be int64 when
  it meets the base pointer. (Small metadata arguments, listed in ``_SMALL``, are exempt.)
* grids within CUDA's limits (axes 1 and 2 <= 65535), also for launches recorded on ``meta`` tensors of
  large sizes (:func:`big_grid_scenarios`: recorded only, never compiled);
* "wide" variant (bf16, sm_90, one per kernel): every integer argument typed i64, which is what Triton passes
  when a stride or size is >= 2^31: the kernel must still compile (specialised as a launch with each integer
  ``v + 2**32`` would be: i64, divisibility by 16 kept, no constant 1).

Each result also carries what the PTX says about global memory access widths (:func:`gmem_accesses`: ld/st.global
per vector width and element type, cp.async per size) and ptxas's registers, stack frame and spill bytes
(:func:`ptxas_usage`).

``--recompiles``: only :func:`serving_sweep`, the persistent kernel's Triton JIT cache keys over a serving sweep of
token counts and adapter mixes (tests/test_recompiles.py).

The report also shows the specialisation matters (``spec_effect``: one launch compiled with and without its
attributes gives different PTX) and checks the mechanism on a probe kernel (``probe_spec``).

Prints one JSON object per case on stdout (and writes the list to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import collections  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

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

# Pointer arguments that index small metadata (a few entries per adapter, slice, level or job; the persistent
# kernel's plan: a few int32 per token tile, smaller than the batch's meta): exempt from the 64-bit offset check.
_SMALL = {"meta_ptr", "off_ptr", "rank_ptr", "scale_ptr", "sinfo_ptr", "shapes", "starts", "jobs_ptr",
          "tile_start_ptr", "terms_ptr", "coefs_ptr", "counter_ptr", "lnw_ptr", "lnb_ptr", "ref", "plan_ptr"}

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32",
        torch.int64: "*i64", torch.uint8: "*u8", torch.int8: "*i8", torch.int16: "*i16"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")

# ---- launch capture ----------------------------------------------------------------------------------------
_captured: list = []
_scenario = ["?"]


_grids: list = []  # (scenario, kernel, grid) of every recorded launch


_REAL_RUN = JITFunction.run


def _record(self, *args, grid, warmup, **kwargs):
    _captured.append((_scenario[0], self, args, kwargs))
    _grids.append((_scenario[0], self.__name__, tuple(grid) if not callable(grid) else grid(kwargs)))


JITFunction.run = _record


def _launch_kwargs(fn, kwargs):
    """The keyword arguments as ``JITFunction.run`` completes them before binding (debug, instrumentation)."""
    kw = dict(kwargs)
    kw["debug"] = kw.get("debug", fn.debug) or knobs.runtime.debug
    kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    return kw


def _widen(fn, args, kwargs):
    """The launch with every non-constexpr integer argument ``v + 2**32``: Triton types it i64 (as for a size or
    stride >= 2^31) and keeps its divisibility by 16; none equals 1 any more."""
    const = {p.name for p in fn.params if p.is_constexpr}
    names = [p.name for p in fn.params]

    def w(name, v):
        return v + 2**32 if type(v) is int and name not in const else v

    return (tuple(w(n, v) for n, v in zip(names, args)),
            {k: w(k, v) if k in names else v for k, v in kwargs.items()})


def launch_specialization(fn, args, kwargs, arch: int = 90, wide: bool = False):
    """What Triton's JIT compiles for this launch on ``sm_<arch>``, computed by Triton's own launch-time code
    (the binder from ``create_function_from_signature`` and ``JITFunction._pack_args``) on the real arguments:
    ``(signature, constexprs, attrs, options)`` with ``signature`` {name: type or "constexpr"}, ``constexprs``
    {name: value} (the constexpr parameters and the integers equal to 1), ``attrs`` {(index,): [[attr, value]]}
    (``tt.divisibility`` 16 for 16-byte aligned pointers and integers divisible by 16) and ``options`` the
    backend's options dict. ``wide``: as :func:`_widen`."""
    if wide:
        args, kwargs = _widen(fn, args, kwargs)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kw = _launch_kwargs(fn, kwargs)
    bound, spec, opts = binder(*args, **kw)
    options, sig, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    names = fn.arg_names
    consts = {}
    for path, v in constexprs.items():
        assert len(path) == 1, f"{fn.__name__}: tuple arguments are not supported here ({path})"
        consts[names[path[0]]] = v
    return sig, consts, attrs, options.__dict__


class _StandInDriver:
    """Just enough of a Triton driver for ``JITFunction.run`` to reach its compile step without a GPU."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def jit_run_specialization(fn, args, kwargs, arch: int = 90):
    """``(signature, constexprs, attrs, options)`` that ``JITFunction.run`` itself hands to its compile step for
    this launch (run for real, with a stand-in driver for ``sm_<arch>`` and ``_do_compile`` captured: nothing is
    compiled or launched). The independent check of :func:`launch_specialization`."""
    got = {}

    def capture(key, signature, device, constexprs, options, attrs, warmup):
        got.update(signature=signature, constexprs=constexprs, attrs=attrs, options=options)
        return None  # run() returns before any launch

    prev_active, prev_caches = _driver._active, fn.__dict__.get("device_caches")
    _driver.set_active(_StandInDriver(arch))
    fn.device_caches = collections.defaultdict(fn.create_binder)
    fn._do_compile = capture
    try:
        _REAL_RUN(fn, *args, grid=(1,), warmup=False, **kwargs)
    finally:
        del fn._do_compile
        if prev_caches is not None:
            fn.device_caches = prev_caches
        _driver.set_active(prev_active)
    names = fn.arg_names
    consts = {names[p[0]]: v for p, v in got["constexprs"].items()}
    return got["signature"], consts, got["attrs"], got["options"].__dict__


def named_attrs(fn, attrs) -> dict:
    """``attrs`` by parameter name, the non-empty ones only (for reports)."""
    return {fn.arg_names[p[0]]: [list(a) for a in v] for p, v in attrs.items() if v}


def case_of(fn, args, kwargs, wide=False, arch: int = 90):
    """(signature, constexprs, attrs, options, launch options) of one recorded launch as Triton's JIT
    specialises it (:func:`launch_specialization`); the launch options are the ``_OPTIONS`` subset (reports,
    de-duplication)."""
    sig, consts, attrs, options = launch_specialization(fn, args, kwargs, arch, wide)
    opts = {k: options[k] for k in _OPTIONS if k in kwargs}
    return sig, consts, attrs, options, opts


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


def ttir_divisible_args(ttir: str) -> list[str]:
    """Arguments of the compiled kernel's TTIR signature that carry ``tt.divisibility = 16`` (what the compiler
    was actually told, as opposed to what the launch specialisation asked for)."""
    m = re.search(r"tt\.func public @\w+\((.*?)\)\s*(attributes|\{)", ttir, re.S)
    if not m:
        return []
    return sorted(name for name, rest in re.findall(r"%([\w#]+): ([^%]*)", m.group(1))
                  if "tt.divisibility = 16" in rest)


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


def persistent_scenarios(dt):
    """The persistent kernel (add_lora_'s default strategy), called as the public op calls it: the batch's plan
    and workspace, the slice widths (``outs``, which the ALIGNED variant needs). Few shapes (CI compiles each in
    three dtypes on two archs), together reaching: the three config buckets of ``tuning._default_persistent``
    (decode T <= 64, prefill T <= 512, larger), one slice and three unequal ones, mixed mode, N_K > 1 (partial
    sums; decode with a wide ``in``) and N_K == 1, EVEN_K false, and both ALIGNED variants (the fallback reached
    by y an odd column offset view, and by slice widths not multiples of 8)."""
    shapes = {  # name: (T, in, outs, merged, y an odd column offset view)
        "decode_s1": (24, 4096, (128,), -1, False),
        "decode_s3": (40, 256, (128, 64, 32), 0, False),
        "prefill_s3": (200, 256, (256, 64, 64), -1, False),
        "large_s1": (600, 256, (128,), 0, False),
        "unaligned_y": (100, 200, (128,), -1, True),
        "unaligned_widths_s3": (24, 256, (100, 28, 60), 0, False),
    }
    for name, (T, in_f, outs, merged, odd_y) in shapes.items():
        w = _weights(in_f, outs, [16, 8, 32], dt)
        batch = LoRABatch.from_ids(_ids(T, 3), w.max_adapters, ranks=w.ranks)
        x = torch.zeros(T, in_f, dtype=dt)
        y = torch.zeros(T, w.out_features + 1, dtype=dt)[:, 1:] if odd_y else torch.zeros(T, w.out_features, dtype=dt)
        _scenario[0] = f"persistent:{name}:merged={merged}"
        nbytes = sgmv.workspace_bytes(y, x, w.a, w.b, w.max_rank, batch.meta, batch.max_tokens, w.slice_outs, merged)
        sgmv.add_lora_(y, x, w.a, w.b, w.offsets, w.ranks, w.scales, batch.meta, batch.max_tokens, w.slice_info,
                       w.max_rank, merged=merged, plan=batch.plan, ws=batch.workspace(nbytes), outs=w.slice_outs)


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


SCENARIOS = {"sgmv": sgmv_scenarios, "persistent": persistent_scenarios, "dual_lora": dual_scenarios,
             "merge": merge_scenarios, "deform": deform_scenarios}
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
        sig, consts, attrs, _, opts = case_of(fn, a, k)
        key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(consts.items())), tuple(sorted(opts.items())),
               repr(sorted(attrs.items())))
        if key not in seen:
            seen.add(key)
            out.append((key, sc, fn, a, k))
    return out


# A global memory instruction of the PTX: ld/st.global with its dot-separated qualifiers (.nc, .cg, .gpu.acquire,
# .L1::evict_last, .L2::cache_hint, ...), the vector width .v2/.v4/.v8 and the type (.b16, .u32, .f32, ...); or an
# asynchronous copy global -> shared (cp.async.{ca,cg}.shared.global [dst], [src], bytes).
_GMEM = re.compile(r"^\s*(?:@!?%p\w*\s+)?(ld|st)\.global((?:\.[\w:]+)*)\s", re.M)
_CP_ASYNC = re.compile(r"^\s*(?:@!?%p\w*\s+)?cp\.async\.\w+\.shared\.global(?:\.[\w:]+)*\s+\[[^\]]*\],\s*"
                       r"\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)", re.M)
_PTX_TYPE = re.compile(r"^[bsuf](8|16|32|64|128)$|^bf16$")


def gmem_accesses(ptx: str) -> dict:
    """What the PTX says about global memory access widths: ``{"ld": {shape: n}, "st": {shape: n}, "cp.async":
    {bytes: n}}`` where ``shape`` is ``"v<N>.<type>"`` or ``"<type>"`` (qualifiers dropped: ``ld.global.nc.v4.b32``
    and ``ld.global.L1::evict_last.v4.b32`` are both ``"v4.b32"``, 16 bytes; ``ld.global.cg.b16`` is ``"b16"``, a
    scalar 2-byte load) and ``n`` the number of such instructions (static count, not executions). :func:`access_bytes`
    turns a shape into its bytes."""
    out = {"ld": {}, "st": {}, "cp.async": {}}
    for op, quals in _GMEM.findall(ptx):
        parts = quals.strip(".").split(".")
        vec = next((q for q in parts if q in ("v2", "v4", "v8")), None)
        typ = next((q for q in parts if _PTX_TYPE.match(q)), "?")
        shape = f"{vec}.{typ}" if vec else typ
        out[op][shape] = out[op].get(shape, 0) + 1
    for size in _CP_ASYNC.findall(ptx):
        n = str(int(size, 0))
        out["cp.async"][n] = out["cp.async"].get(n, 0) + 1
    return out


# Self-test of gmem_accesses (the report's "gmem_probe"; tests/test_triton_compile.py knows the answer).
_GMEM_PROBE_PTX = """
	@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
	ld.global.nc.L1::evict_last.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
	@!%p12 ld.global.cg.b16 { %rs1 }, [ %rd2 + 0 ];
	ld.global.L1::evict_last.L2::cache_hint.v2.b32 { %r5, %r6 }, [ %rd3 + 0 ], %rd9;
	ld.global.gpu.acquire.b32 %r7, [%rd4];
	st.global.b16 [ %rd5 + 0 ], { %rs2 };
	@%p3 st.global.v4.b32 [ %rd6 + 0 ], { %r1, %r2, %r3, %r4 };
	cp.async.cg.shared.global [ %r8 + 0 ], [ %rd7 + 0 ], 0x10, %r9;
	cp.async.ca.shared.global [ %r10 + 0 ], [ %rd8 + 0 ], 4;
	cp.async.commit_group;
	atom.global.gpu.acq_rel.add.u32 %r11, [%rd4], 1;
	ld.shared.v4.b32 { %r1, %r2, %r3, %r4 }, [ %r12 + 0 ];
	st.shared.b16 [ %r13 + 0 ], %rs3;
"""


def access_bytes(shape: str) -> int:
    """Bytes one thread moves with one instruction of :func:`gmem_accesses`'s ``shape`` (``"v4.b32"`` -> 16)."""
    vec, _, typ = shape.rpartition(".")
    bits = int(re.sub(r"\D", "", typ) or 0)
    return (int(vec[1:]) if vec else 1) * bits // 8


def _by_bytes(shapes: dict, op: str) -> dict:
    """{bytes per instruction (str): count} of one op's :func:`gmem_accesses` entry."""
    out: dict = {}
    for shape, n in shapes.items():
        b = shape if op == "cp.async" else str(access_bytes(shape))
        out[b] = out.get(b, 0) + n
    return out


_PTXAS_USAGE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def ptxas_usage(ptx: str, arch: int, options: dict) -> dict:
    """Registers, stack frame and spill bytes of the kernel, from ``ptxas -v`` run on its PTX with the flags
    Triton's own make_cubin uses (Triton runs ptxas -v too but keeps the log only with TRITON_DUMP_PTXAS_LOG,
    and not at all for a cached kernel, so it is run again here: about 0.3 s)."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    fmad = [] if options.get("enable_fp_fusion", True) else ["--fmad=false"]
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(d, "k.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    m, r = _PTXAS_USAGE.search(log), _PTXAS_REGS.search(log)
    if not m or not r:
        raise RuntimeError(f"unexpected ptxas -v output: {log[-1000:]}")
    return {"registers": int(r.group(1)), "stack": int(m.group(1)), "spill_stores": int(m.group(2)),
            "spill_loads": int(m.group(3))}


def compile_case(fn, sig, consts, attrs, options, opts, arch):
    """Compile one launch's variant (signature, constexprs, specialisation attrs, full options) for sm_<arch>."""
    t0 = time.time()
    res = {"kernel": fn.__name__, "arch": arch, "sig": sig, "consts": {k: str(v) for k, v in consts.items()},
           "attrs": named_attrs(fn, attrs), "opts": opts}
    try:
        k = triton_aot_compile(fn, sig, consts, arch, options, attrs=attrs)
        res["ok"] = bool(k.asm.get("cubin"))
        res["shared"] = int(k.metadata.shared)
        res["narrow"] = narrow_offsets(k.asm["ttir"], sig)
        res["ttir_divisible"] = ttir_divisible_args(k.asm["ttir"])
        res["gmem"] = gmem_accesses(k.asm["ptx"])
        res["gmem_bytes"] = {op: _by_bytes(shapes, op) for op, shapes in res["gmem"].items()}
        res.update(ptxas_usage(k.asm["ptx"], arch, options))
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
    name, sig, consts = key[:3]
    c, sg = dict(consts), dict(sig)
    f = tuple((k, c[k]) for k in _FLAGS if k in c)
    f += tuple((k, int(c[k]) > 1) for k in ("SPLIT_K", "SPLIT_M", "N_SPLIT", "NUM_SLICES") if k in c)
    return (name, c.get("SEG_P2", 1) == 0) + f + tuple(sorted(v for v in sg.values() if v.startswith("*")))


# Kernels whose every unique launch is compiled on every arch, in every dtype (the report's access widths and
# spills are checked per variant: tests/test_triton_compile.py).
_EVERY_VARIANT = {"_sgmv_persistent_kernel"}


def plan(cases, archs, full=False):
    """(case index, arch, wide) jobs. Default (CI, about a minute and a half on 2 cores): on archs[0], one bf16
    launch per code path (:func:`_structure`) plus the tuning sweep's largest tiles; one fp32 launch per kernel
    and one fp16 launch per tl.dot kernel; on every other arch, one bf16 launch per tl.dot kernel (mma v2 instead
    of Hopper's wgmma); one "wide" (all-i64 integers) bf16 launch per kernel; every unique launch of the
    ``_EVERY_VARIANT`` kernels on every arch. ``full``: every unique launch on every arch, plus the wide ones."""
    jobs, seen = [], set()
    for i, (key, sc, fn, _args, _kwargs) in enumerate(cases):
        dn = sc.split(":", 1)[0]
        name = fn.__name__
        if name in _EVERY_VARIANT and not full:
            jobs += [(i, arch, False) for arch in archs]
            if dn == "bf16" and (dn, name) not in seen:
                jobs.append((i, archs[0], True))
            seen.add((dn, name))
            continue
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
    sig, consts, attrs, options, opts = case_of(fn, a, k, wide=wide, arch=arch)
    r = compile_case(fn, sig, consts, attrs, options, opts, arch)
    r["scenario"] = sc + (":wide_i64" if wide else "")
    r["limit"] = SMEM_LIMIT.get(arch)
    return r


# ---- the specialisation: checked on a probe, against JITFunction.run, and shown to change the code ----------
@triton.jit
def _spec_probe(a_ptr, b_ptr, n16, n7, one, BLOCK: tl.constexpr):
    """Probe of :func:`launch_specialization`: a_ptr aligned, b_ptr not; n16 divisible by 16, n7 not; one == 1."""
    offs = tl.arange(0, BLOCK)
    v = tl.load(a_ptr + offs * one, mask=offs < n16)
    tl.store(b_ptr + offs, v, mask=offs < n7)


def probe_spec() -> dict:
    """The probe's specialisation, by Triton's launch-time code and by ``JITFunction.run`` (test_triton_compile
    compares both with the rule written out)."""
    buf = torch.zeros(64)
    args, kwargs = (buf, buf[1:], 32, 7, 1), {"BLOCK": 16, "num_warps": 1}
    out = {}
    for how, f in (("launch", launch_specialization), ("jit_run", jit_run_specialization)):
        sig, consts, attrs, _ = f(_spec_probe, args, kwargs, 90)
        out[how] = {"sig": sig, "consts": consts, "attrs": named_attrs(_spec_probe, attrs)}
    return out


def check_against_jit_run(cases, arch: int) -> tuple[int, list[str]]:
    """Every unique launch: :func:`launch_specialization` equals what ``JITFunction.run`` would compile."""
    bad = []
    for _key, sc, fn, a, k in cases:
        ours = launch_specialization(fn, a, k, arch)
        theirs = jit_run_specialization(fn, a, k, arch)
        if ours != theirs:
            diff = [n for n, x, y in zip(("signature", "constexprs", "attrs", "options"), ours, theirs) if x != y]
            bad.append(f"{fn.__name__} [{sc}]: {diff} differ")
    return len(cases), bad


# Wide global loads: 16-byte asynchronous copies to shared memory, or vector loads (.v2/.v4/.v8).
_WIDE_LOAD = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:cp\.async\.\w+\.shared\.global|ld\.global(?:\.\w+)*\.v[248])\b",
                        re.M)


def spec_effect(cases, arch: int) -> dict:
    """One launch (bf16 shrink, in = 4096: aligned pointers, sizes and strides divisible by 16) compiled with
    its specialisation attributes and without them: the PTX must differ, and the specialised kernel loads its
    tiles with wide (16-byte) copies where the unspecialised one needs element-wise loads (it cannot assume the
    alignment)."""
    pick = next(c for c in cases if c[2].__name__ == "_sgmv_shrink_kernel" and c[1].startswith("bf16:")
                and "decode_splitk" in c[1])
    _key, sc, fn, a, k = pick
    sig, consts, attrs, options, _ = case_of(fn, a, k, arch=arch)
    ptx = {}
    for how, at in (("with", attrs), ("without", {})):
        ptx[how] = triton_aot_compile(fn, sig, consts, arch, options, attrs=at).asm["ptx"]
    return {"kernel": fn.__name__, "scenario": sc, "attrs": named_attrs(fn, attrs),
            "ptx_differs": ptx["with"] != ptx["without"],
            "wide_loads_with": len(_WIDE_LOAD.findall(ptx["with"])),
            "wide_loads_without": len(_WIDE_LOAD.findall(ptx["without"]))}


# ---- run-time recompiles over a serving sweep (tests/test_recompiles.py) -----------------------------------------
#: Token counts of the sweep: every T up to 80 (the decode bucket and past its edge), every odd T above (primes
#: among them), and the powers of two and bucket edges.
SWEEP_TS = tuple(range(1, 81)) + tuple(range(81, 512, 2)) + (128, 256, 384, 512)
#: The sweep's weights: (in, slice widths), each with max_adapters = 64 adapters of rank 16.
SWEEP_WEIGHTS = {"s1": (256, (128,)), "s3": (256, (128, 64, 64))}
SWEEP_ADAPTERS, SWEEP_RANK, SWEEP_CAPACITY = 64, 16, 512


def _sweep_points():
    """(T, active adapters, fixed capacity?, merged id) per point: two adapter counts per T, together every count
    1..64 many times over (tokens round-robin over them, every 4th token of every third point with no adapter);
    even points rebuild one batch of capacity 512 in place (a server's preallocated batch), odd points use a batch
    sized to T (``LoRABatch.from_ids`` with no capacity), so the capacity-derived arguments vary too; mixed mode
    merges adapter ``i % 64``."""
    pts = []
    for j, T in enumerate(SWEEP_TS):
        for n in sorted({1 + (5 * j) % SWEEP_ADAPTERS, 1 + (5 * j + 32) % SWEEP_ADAPTERS}):
            i = len(pts)
            pts.append((T, n, i % 2 == 0, i % SWEEP_ADAPTERS))
    return pts


class _JitKeys:
    """Triton's own JIT cache key of a launch on ``sm_<arch>``: what ``JITFunction.run`` looks up before it
    compiles (the kernel's binder from ``create_function_from_signature``, then ``compute_cache_key`` over its
    specialisation and options). ``specialize``: parameter names taken off the kernel's ``do_not_specialize``
    list (a mutant binder, to show the count would catch such a kernel)."""

    def __init__(self, fn, arch: int = 90, specialize=()):
        from triton.runtime.jit import KernelParam

        self.fn = fn
        self.backend = make_backend(GPUTarget("cuda", arch, 32))
        params = [KernelParam(p.num, p._param, p.do_not_specialize and p.name not in specialize,
                              p.do_not_specialize_on_alignment) for p in fn.params]
        self.binder = create_function_from_signature(fn.signature, params, self.backend)
        self.key_cache: dict = {}

    def key(self, args, kwargs):
        from triton.runtime.jit import compute_cache_key

        _bound, spec, opts = self.binder(*args, **_launch_kwargs(self.fn, kwargs))
        return compute_cache_key(self.key_cache, spec, opts)

    def variant(self, args, kwargs) -> dict:
        """The launch's constexprs and specialisation attributes, by name (what a key stands for)."""
        kw = _launch_kwargs(self.fn, kwargs)
        _, _sig, consts, attrs = self.fn._pack_args(self.backend, kw, *self.binder(*args, **kw))
        return {"consts": {self.fn.arg_names[p[0]]: v for p, v in consts.items()},
                "attrs": named_attrs(self.fn, attrs)}


def _record_add_lora(fn, w, batch, dt, merged):
    """(args, kwargs) of the one ``fn`` launch that add_lora_ makes with the default config, called as the public
    op calls it (the batch's plan and workspace, the slice widths); recorded, not run."""
    T = batch.num_tokens
    x = torch.zeros(T, w.in_features, dtype=dt)
    y = torch.zeros(T, w.out_features, dtype=dt)
    start = len(_captured)
    nbytes = sgmv.workspace_bytes(y, x, w.a, w.b, w.max_rank, batch.meta, batch.max_tokens, w.slice_outs, merged)
    sgmv.add_lora_(y, x, w.a, w.b, w.offsets, w.ranks, w.scales, batch.meta, batch.max_tokens, w.slice_info,
                   w.max_rank, merged=merged, plan=batch.plan, ws=batch.workspace(nbytes), outs=w.slice_outs)
    launched = [c for c in _captured[start:] if c[1] is fn]
    del _captured[start:]
    assert len(launched) == 1, f"T={T}: expected one {fn.__name__} launch, got {len(launched)}"
    return launched[0][2], launched[0][3]


_PLAN_CONSTS = ("EVEN_K",)  # the constexprs persistent_plan derives from the shape


def _summary(g) -> dict:
    """One group's report entry (see :func:`serving_sweep`)."""
    variants = list(g["keys"].values())

    def differing(field):
        return sorted({c for v in variants for c in v[field]
                       if len({json.dumps(str(u[field].get(c))) for u in variants}) > 1})

    consts, attrs = differing("consts"), differing("attrs")
    without = {json.dumps([{c: str(v) for c, v in sorted(u["consts"].items()) if c not in _PLAN_CONSTS},
                           u["attrs"]], sort_keys=True) for u in variants}
    return {"launches": g["launches"], "Ts": sorted(g["Ts"]), "adapters": sorted(g["adapters"]),
            "buckets": [{"config": json.loads(c), "T_min": min(ts), "T_max": max(ts)}
                        for c, ts in g["buckets"].items()],
            "n_keys": len(variants), "n_keys_without": {"+".join(_PLAN_CONSTS): len(without)},
            "variants": [{"T_min": min(v["Ts"]), "T_max": max(v["Ts"]), "n_T": len(set(v["Ts"])),
                          "consts": {c: str(v["consts"].get(c)) for c in consts},
                          "attrs": {c: v["attrs"].get(c) for c in attrs}} for v in variants],
            "mutants": {name: len(ks) for name, ks in g["mut"].items()}}


def serving_sweep(dtypes=("fp16", "bf16", "fp32"), mutants=True) -> dict:
    """Record the persistent kernel's launches over :func:`_sweep_points` (:func:`_record_add_lora`), per
    (weights, dtype, mixed) group, and count what a serving process would compile: the distinct Triton JIT cache
    keys (:class:`_JitKeys`), against the distinct persistent configs the sweep crosses (``tuning``'s buckets).
    Per group: ``buckets`` [{config, T range}], ``n_keys``, ``variants`` (per key: its T values, and the
    constexprs and specialisation attributes that differ between the group's keys), ``n_keys_without`` (keys
    with ``_PLAN_CONSTS`` ignored) and ``mutants`` {name: n_keys with that name specialised}."""
    fn = sgmv._sgmv_persistent_kernel
    keys = _JitKeys(fn)
    dns = [p.name for p in fn.params if p.do_not_specialize]
    mut = {n: _JitKeys(fn, specialize=(n,)) for n in dns} if mutants else {}
    pts = _sweep_points()
    weights = {(wn, dn): _weights(K, outs, [SWEEP_RANK] * SWEEP_ADAPTERS, DTYPES[dn])
               for wn, (K, outs) in SWEEP_WEIGHTS.items() for dn in dtypes}
    ranks = next(iter(weights.values())).ranks
    fixed = LoRABatch(SWEEP_CAPACITY, SWEEP_ADAPTERS)
    groups: dict = {}
    t0 = time.time()
    for i, (T, n, use_fixed, m) in enumerate(pts):
        ids = torch.arange(T, dtype=torch.int32) % n
        if i % 3 == 2:
            ids[::4] = -1
        batch = fixed.build(ids, ranks) if use_fixed else LoRABatch.from_ids(ids, SWEEP_ADAPTERS, ranks=ranks)
        for (wn, dn), w in weights.items():
            for merged in (-1, m):
                a, k = _record_add_lora(fn, w, batch, DTYPES[dn], merged)
                cfg = tuning.get_config_cached("add_lora", DTYPES[dn], T, w.in_features, w.out_features, w.max_rank)
                g = groups.setdefault((wn, dn, merged >= 0), {"launches": 0, "Ts": set(), "adapters": set(),
                                                              "buckets": {}, "keys": {}, "mut": {}})
                g["launches"] += 1
                g["Ts"].add(T)
                g["adapters"].add(n)
                g["buckets"].setdefault(json.dumps(cfg["persistent"], sort_keys=True), []).append(T)
                kk = keys.key(a, k)
                if kk not in g["keys"]:
                    g["keys"][kk] = {"Ts": [], **keys.variant(a, k)}
                g["keys"][kk]["Ts"].append(T)
                for name, mk in mut.items():
                    g["mut"].setdefault(name, set()).add(mk.key(a, k))
    return {"seconds": round(time.time() - t0, 1), "points": len(pts), "do_not_specialize": dns,
            "groups": [{"weights": wn, "dtype": dn, "mixed": mixed, **_summary(g)}
                       for (wn, dn, mixed), g in groups.items()]}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="90,80")
    ap.add_argument("--out", default=None)
    ap.add_argument("--families", default=None)
    ap.add_argument("--full", action="store_true", help="every unique launch on every arch (slow)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--recompiles", action="store_true",
                    help="only the serving sweep of the persistent kernel's JIT cache keys (:func:`serving_sweep`)")
    ns = ap.parse_args(argv)
    if ns.recompiles:
        report = serving_sweep()
        print(json.dumps({k: v for k, v in report.items() if k != "groups"}))
        if ns.out:
            with open(ns.out, "w") as f:
                json.dump(report, f)
        return
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
              "probe_narrow": narrow_offsets(probe.asm["ttir"], sig), "probe_spec": probe_spec(),
              "gmem_probe": gmem_accesses(_GMEM_PROBE_PTX)}
    report["spec_checked"], report["spec_mismatch"] = check_against_jit_run(_CASES, archs[0])
    if any(c[2].__name__ == "_sgmv_shrink_kernel" for c in _CASES):  # not with --families lacking sgmv
        report["spec_effect"] = spec_effect(_CASES, archs[0])
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
