"""Triton SGMV launchers (lora_kernels.triton.sgmv) against the fp32 reference.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest.py and again
below before anything imports Triton). The interpreter is slow, so the main matrix is a deterministic
*pairwise* sample of popularity x fraction of -1 tokens x T x hidden size x slices x dtype x layout x
storage (every pair of values appears in some case), each case running every strategy; special cases
(split-K, padded storage, rank-0 slices, 64+ adapters, the 2-D grid fallback, bf16, mixed dtypes, T = 0,
the all -1 batch) have their own tests.

Every numeric check compares against a reference computed into a *copy* of the baseline y0 (the reference
functions write in place: ``y0.float()`` is y0 itself for fp32) and uses the tolerance rule with ``base=y0``,
so a kernel that adds no delta, or the delta twice, fails every case (tests/helpers.py).
"""

from __future__ import annotations

import itertools
import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from helpers import (
    DISTRIBUTIONS,
    assert_close_rule,
    lowp_add_lora_,
    lowp_expand_,
    lowp_shrink,
    make_ids,
    make_weights,
    random_ranks,
)
from helpers import weights_on as _on

from lora_kernels import reference
from lora_kernels.batch import LoRABatch
from lora_kernels.triton import sgmv
from lora_kernels.weights import LoRAWeights

DEV = "cuda" if torch.cuda.is_available() else "cpu"
RANKS = (1, 8, 16, 33, 64, 128)


# ---- case generation --------------------------------------------------------------------------------------
def pairwise(factors: dict, seed: int = 0, tries: int = 40) -> list:
    """Greedy (AETG-style) pairwise covering array: every pair of values of every two factors appears in at
    least one case. Deterministic for a given seed."""
    names = list(factors)
    uncovered = {(a, va, b, vb) for a, b in itertools.combinations(names, 2)
                 for va in factors[a] for vb in factors[b]}
    rng = random.Random(seed)
    cases = []

    def pairs(c):
        return {(a, c[a], b, c[b]) for a, b in itertools.combinations(names, 2)}

    while uncovered:
        a, va, b, vb = min(uncovered, key=repr)
        best, gain = None, -1
        for _ in range(tries):
            c = {n: rng.choice(factors[n]) for n in names}
            c[a], c[b] = va, vb
            g = len(pairs(c) & uncovered)
            if g > gain:
                best, gain = c, g
        cases.append(best)
        uncovered -= pairs(best)
    return cases


FACTORS = {
    "dist": DISTRIBUTIONS,
    "T": (1, 7, 33, 257),
    "frac_none": (0.0, 0.3, 0.8),  # every case serves some tokens; the all -1 batch has its own test
    "in_f": (16, 48, 200),
    "slices": (1, 3),
    "dtype": ("fp16", "fp32"),
    "layout": ("contiguous", "strided"),
    "storage": ("paged", "churn"),
    "tiles": ("default", "small"),
}
# "small": 16-wide tiles everywhere (several rank chunks per adapter in expand, several column blocks per
# slice, K loops of many steps) and N_SPLIT=3 column groups in the fused kernel.
SMALL_TILES = {
    "shrink": {"BLOCK_M": 16, "BLOCK_K": 16, "BLOCK_R": 16},
    "expand": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_R": 16},
    "fused": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "N_SPLIT": 3},
    "persistent": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "N_K": 3},
}
# add_lora_'s strategies: "persistent" (the default: one launch over the batch's plan), "fused", "two_pass"
STRATEGIES = ("persistent", "fused", "two_pass")
CASES = pairwise(FACTORS)
# Busy cases at the largest sizes, on top of the pairwise sample.
_K = ("dist", "T", "frac_none", "in_f", "slices", "dtype", "layout", "storage", "tiles")
CASES += [dict(zip(_K, v)) for v in (
    ("zipf", 257, 0.3, 200, 3, "fp16", "strided", "churn", "default"),
    ("uniform", 257, 0.0, 200, 1, "fp32", "contiguous", "paged", "default"),
    ("distinct", 33, 0.3, 200, 3, "fp16", "contiguous", "churn", "small"),
)]
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


def _case_id(c: dict) -> str:
    return "-".join(f"{v}" for v in c.values())


# ---- building blocks ---------------------------------------------------------------------------------------
def _strided(t: torch.Tensor, pad: int = 5) -> torch.Tensor:
    """A copy of t as a column slice of a wider tensor (row stride > width, unit column stride)."""
    big = torch.full((t.shape[0], t.shape[1] + 2 * pad), float("nan"), dtype=t.dtype, device=t.device)
    v = big[:, pad : pad + t.shape[1]]
    v.copy_(t)
    return v


def _setup(case: dict, seed: int):
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[case["dtype"]]
    outs = (48,) if case["slices"] == 1 else (48, 16, 16)
    n_adapters = 6
    ranks = random_ranks(n_adapters, RANKS, g)
    w = make_weights(case["in_f"], outs, ranks, dtype=dt, generator=g, churn=case["storage"] == "churn")
    ids = make_ids(case["dist"], case["T"], n_adapters, case["frac_none"], g)
    assert bool((ids >= 0).any()), f"case {_case_id(case)}: no token has an adapter (only the early exit runs)"
    x = torch.randn(case["T"], case["in_f"], generator=g).to(dt)
    y0 = torch.randn(case["T"], w.out_features, generator=g).to(dt)
    return w, ids, x, y0


def _batch(ids: torch.Tensor, w: LoRAWeights, max_tokens=None) -> LoRABatch:
    return LoRABatch.from_ids(ids.to(DEV), w.max_adapters, ranks=w.ranks.to(DEV), max_tokens=max_tokens)


def _h_poisoned(h_ref: torch.Tensor, w: LoRAWeights, ids: torch.Tensor) -> torch.Tensor:
    """h_ref with NaN wherever expand must not read (past each token's rank, tokens with -1)."""
    h = h_ref.clone()
    S, _, r_cap = h.shape
    col = torch.arange(r_cap)
    for t, i in enumerate(ids.tolist()):
        for s in range(S):
            r = int(w.ranks[s, i]) if i >= 0 else 0
            h[s, t, col >= r] = float("nan")
    return h


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0:
        return True
    ib = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ib), b.contiguous().view(ib))


def _run_add_lora(w, ids, x, y0, config, strided=False, batch=None):
    """add_lora_ on DEV; returns y on the CPU."""
    wd = _on(w, DEV)
    batch = batch or _batch(ids, w)
    y = _strided(y0.to(DEV)) if strided else y0.to(DEV, copy=True)
    xx = _strided(x.to(DEV)) if strided else x.to(DEV)
    sgmv.add_lora_(y, xx, wd.a, wd.b, wd.offsets, wd.ranks, wd.scales, batch.meta, batch.max_tokens,
                   wd.slice_info, w.max_rank, config)
    return y.cpu()


def _run_shrink(w, ids, x, config=None, strided=False):
    wd = _on(w, DEV)
    batch = _batch(ids, w)
    h = torch.full((w.num_slices, x.shape[0], w.max_rank), float("nan"), device=DEV)
    sgmv.shrink(_strided(x.to(DEV)) if strided else x.to(DEV), wd.a, wd.offsets, wd.ranks, batch.meta,
                batch.max_tokens, h, config)
    return h.cpu()


def _run_expand(w, ids, y0, h, config=None, strided=False):
    wd = _on(w, DEV)
    batch = _batch(ids, w)
    y = _strided(y0.to(DEV)) if strided else y0.to(DEV, copy=True)
    sgmv.expand_(y, h.to(DEV), wd.b, wd.offsets, wd.ranks, wd.scales, batch.meta, batch.max_tokens,
                 wd.slice_info, config)
    return y.cpu()


def _fp32_copy(y0: torch.Tensor) -> torch.Tensor:
    """A new fp32 tensor holding y0: the in-place reference writes into it, never into y0 (``y0.float()`` is y0
    itself when y0 is fp32, and then the baseline would already hold the delta)."""
    return y0.to(torch.float32, copy=True)


def _ref_add_lora(w, ids, x, y0):
    """The fp32 spec of ``y0 += delta``, computed into a copy (y0 stays the baseline)."""
    return reference.add_lora_(_fp32_copy(y0), x, w.a, w.b, w.offsets, w.ranks, w.scales, ids, w.slice_cols,
                               w.slice_outs)


def _check_add_lora(y, w, ids, x, y0, name):
    dt = y0.dtype
    before = y0.clone()
    ref = _ref_add_lora(w, ids, x, y0)
    low = lowp_add_lora_(y0.clone(), x, w, ids, dt)
    assert _same_bits(y0, before), f"{name}: the yardsticks wrote into the baseline y0"
    assert_close_rule(y, ref, low, name=name, base=y0)
    none = ids < 0
    assert _same_bits(y[none], y0[none]), f"{name}: rows of tokens with no adapter changed"


# ---- the pairwise matrix -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matrix(case):
    """shrink, expand_, and add_lora_ with both strategies, on one case of the pairwise sample."""
    seed = CASES.index(case)
    w, ids, x, y0 = _setup(case, seed)
    strided = case["layout"] == "strided"
    dt = DTYPES[case["dtype"]]
    r_cap = w.max_rank
    small = case["tiles"] == "small"

    # shrink: fp32 h, exact zeros where the spec says so
    h = _run_shrink(w, ids, x, SMALL_TILES["shrink"] if small else None, strided=strided)
    h_ref = reference.shrink(x, w.a, w.offsets, w.ranks, ids, r_cap)
    assert_close_rule(h, h_ref, lowp_shrink(x, w, ids, r_cap, dt), dtype=dt, name="shrink h", base=0.0)
    assert torch.equal(h[h_ref == 0], h_ref[h_ref == 0]), "shrink: expected exact zeros past ranks / for -1 tokens"

    # expand_: reads only h[s, t, :r] of tokens in segments (everything else is NaN here)
    y = _run_expand(w, ids, y0, _h_poisoned(h_ref, w, ids), SMALL_TILES["expand"] if small else None,
                    strided=strided)
    ref = reference.expand_(_fp32_copy(y0), h_ref, w.b, w.offsets, w.ranks, w.scales, ids, w.slice_cols,
                            w.slice_outs)
    assert_close_rule(y, ref, lowp_expand_(y0.clone(), h_ref, w, ids, dt), name="expand_ y", base=y0)
    assert _same_bits(y[ids < 0], y0[ids < 0]), "expand_: rows of tokens with no adapter changed"

    configs = {"persistent": {"strategy": "persistent"}, "fused": {"strategy": "fused"},
               "two_pass": {"strategy": "two_pass"},
               # the persistent kernel with `in` split in two (partial sums, the last split's reduction) and
               # narrow column blocks (many expand items per tile)
               "persistent_split": {"strategy": "persistent", "persistent": {"N_K": 2, "BLOCK_N": 16}}}
    if small:
        configs["fused"].update(SMALL_TILES["fused"])
        configs["two_pass"].update(shrink=SMALL_TILES["shrink"], expand=SMALL_TILES["expand"])
        configs["persistent"]["persistent"] = SMALL_TILES["persistent"]
    for strategy, cfg in configs.items():
        y = _run_add_lora(w, ids, x, y0, cfg, strided)
        _check_add_lora(y, w, ids, x, y0, f"add_lora_ {strategy}")


def test_pairwise_covers_every_pair():
    for a, b in itertools.combinations(FACTORS, 2):
        seen = {(c[a], c[b]) for c in CASES}
        assert seen == set(itertools.product(FACTORS[a], FACTORS[b])), (a, b)
    # the pairs are only worth counting if every case serves tokens (not only the all -1 early exit)
    assert all(c["frac_none"] < 1.0 for c in CASES)
    for seed, c in enumerate(CASES):
        _setup(c, seed)  # asserts some token has an adapter


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_all_tokens_without_adapter(strategy):
    """The one explicit all -1 batch: shrink writes exact zeros, expand_ and add_lora_ leave y bit-identical
    (NaN in h where nothing may be read)."""
    g = torch.Generator().manual_seed(11)
    w = make_weights(48, (48, 16), [8, 33, 1], dtype=torch.float16, generator=g)
    ids = make_ids("uniform", 9, 3, 1.0, g)
    assert bool((ids == -1).all())
    x = torch.randn(9, 48, generator=g).half()
    y0 = torch.randn(9, w.out_features, generator=g).half()
    h = _run_shrink(w, ids, x)
    assert torch.equal(h, torch.zeros_like(h)), "shrink: expected zeros for tokens with no adapter"
    y = _run_expand(w, ids, y0, torch.full_like(h, float("nan")))
    assert _same_bits(y, y0), "expand_: rows of tokens with no adapter changed"
    y = _run_add_lora(w, ids, x, y0, {"strategy": strategy})
    assert _same_bits(y, y0), f"add_lora_ {strategy}: rows of tokens with no adapter changed"


# ---- targeted cases ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("split_k,block_k", [(2, 16), (4, 32), (3, 64)])
def test_split_k(split_k, block_k):
    """Split-K shrink (fp32 atomics into zeroed h), alone and inside two-pass add_lora_; in=200 is not a
    multiple of any split, and (3, 64) leaves an empty split that must be dropped."""
    g = torch.Generator().manual_seed(10 + split_k)
    w = make_weights(200, (48, 16, 16), [8, 33, 1, 16], dtype=torch.float16, generator=g)
    ids = make_ids("uniform", 7, 4, 0.3, g)
    x = torch.randn(7, 200, generator=g).half()
    h = _run_shrink(w, ids, x, {"SPLIT_K": split_k, "BLOCK_K": block_k, "BLOCK_R": 16})
    h_ref = reference.shrink(x, w.a, w.offsets, w.ranks, ids, w.max_rank)
    assert_close_rule(h, h_ref, lowp_shrink(x, w, ids, w.max_rank, torch.float16), dtype=torch.float16, base=0.0)
    assert torch.equal(h[h_ref == 0], h_ref[h_ref == 0])
    y0 = torch.randn(7, 80, generator=g).half()
    cfg = {"strategy": "two_pass", "shrink": {"SPLIT_K": split_k, "BLOCK_K": block_k}}
    y = _run_add_lora(w, ids, x, y0, cfg)
    _check_add_lora(y, w, ids, x, y0, "two_pass split-K")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_padded_layout_rank0_and_poisoned_padding(strategy):
    """Padded stacks via LoRAWeights.from_padded: rows past each rank hold NaN (any read of them would show),
    one slice of one adapter has rank 0 (its columns must stay bit-identical) and one slot is empty (rank 0
    in every slice) but named by tokens."""
    g = torch.Generator().manual_seed(3)
    N, r_max, in_f, outs = 4, 33, 48, (16, 48)
    ranks = torch.tensor([[5, 33, 0, 16], [5, 0, 0, 1]], dtype=torch.int32)  # [S, N]; slot 2 empty
    a = torch.full((2, N, r_max, in_f), float("nan"))
    b = torch.full((N, r_max, sum(outs)), float("nan"))
    cols = (0, outs[0])
    for s in range(2):
        for i in range(N):
            r = int(ranks[s, i])
            a[s, i, :r] = torch.randn(r, in_f, generator=g) / in_f ** 0.5
            b[i, :r, cols[s] : cols[s] + outs[s]] = torch.randn(r, outs[s], generator=g) / max(r, 1) ** 0.5
    w = LoRAWeights.from_padded(a, b, ranks=ranks, scales=torch.rand(2, N, generator=g) + 0.5, slice_outs=outs)
    ids = torch.tensor([0, 1, 2, -1, 3, 1, 2, 0, 3, 3, -1], dtype=torch.int32)
    x = torch.randn(len(ids), in_f, generator=g)
    y0 = torch.randn(len(ids), sum(outs), generator=g)
    y = _run_add_lora(w, ids, x, y0, {"strategy": strategy})
    _check_add_lora(y, w, ids, x, y0, f"padded {strategy}")
    untouched = (ids < 0) | (ids == 2)
    assert _same_bits(y[untouched], y0[untouched])
    assert _same_bits(y[ids == 1][:, cols[1]:], y0[ids == 1][:, cols[1]:]), "rank-0 slice columns changed"


def test_many_adapters():
    """70 adapters of mixed ranks, every token a different one, plus a zipf batch over them."""
    g = torch.Generator().manual_seed(4)
    n = 70
    w = make_weights(16, 24, random_ranks(n, RANKS, g), dtype=torch.float16, generator=g)
    for dist, T in (("distinct", 90), ("zipf", 64)):
        ids = make_ids(dist, T, n, 0.1, g)
        x = torch.randn(T, 16, generator=g).half()
        y0 = torch.randn(T, 24, generator=g).half()
        for strategy in STRATEGIES:
            y = _run_add_lora(w, ids, x, y0, {"strategy": strategy})
            _check_add_lora(y, w, ids, x, y0, f"{dist} {strategy}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_2d_grid_fallback(monkeypatch, strategy):
    """Above _FLAT_SEGMENT_LIMIT segments the kernels use the (tile, segment) 2-D grid instead of the
    per-program prefix sum; force it."""
    monkeypatch.setattr(sgmv, "_FLAT_SEGMENT_LIMIT", 0)
    g = torch.Generator().manual_seed(5)
    w = make_weights(48, (16, 16), [8, 33, 1], dtype=torch.float32, generator=g)
    ids = make_ids("uniform", 33, 3, 0.3, g)
    x = torch.randn(33, 48, generator=g)
    y0 = torch.randn(33, 32, generator=g)
    y = _run_add_lora(w, ids, x, y0, {"strategy": strategy, "BLOCK_M": 16,
                                      "shrink": {"BLOCK_M": 16}, "expand": {"BLOCK_M": 32}})
    _check_add_lora(y, w, ids, x, y0, f"2-D grid {strategy}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bf16(strategy):
    """bf16 activations and weights (in the interpreter: the UPCAST path, see the sgmv module docstring)."""
    g = torch.Generator().manual_seed(6)
    w = make_weights(48, (48, 16, 16), [16, 33, 1], dtype=torch.bfloat16, generator=g)
    ids = make_ids("zipf", 33, 3, 0.3, g)
    x = torch.randn(33, 48, generator=g).bfloat16()
    y0 = torch.randn(33, 80, generator=g).bfloat16()
    y = _run_add_lora(w, ids, x, y0, {"strategy": strategy})
    _check_add_lora(y, w, ids, x, y0, f"bf16 {strategy}")


@pytest.mark.parametrize("x_dt,w_dt,y_dt", [(torch.float32, torch.float16, torch.float32),
                                            (torch.float16, torch.float32, torch.float16),
                                            (torch.float16, torch.float16, torch.float32)])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mixed_dtypes(x_dt, w_dt, y_dt, strategy):
    """Weights in another dtype than x (cast per tile to x's dtype), y in another dtype than x."""
    g = torch.Generator().manual_seed(7)
    w = make_weights(48, 48, [8, 33], dtype=w_dt, generator=g)
    ids = make_ids("uniform", 7, 2, 0.3, g)
    x = torch.randn(7, 48, generator=g).to(x_dt)
    y0 = torch.randn(7, 48, generator=g).to(y_dt)
    y = _run_add_lora(w, ids, x, y0, {"strategy": strategy})
    # PyTorch baseline: x's precision for the shrink, y's for the expand, as the kernels do.
    ref = _ref_add_lora(w, ids, x, y0)
    h_low = lowp_shrink(x, w, ids, w.max_rank, x_dt)
    low = lowp_expand_(y0.clone(), h_low, w, ids, y_dt)
    low_dt = x_dt if x_dt != torch.float32 else y_dt
    assert_close_rule(y, ref, low, dtype=low_dt, base=y0)
    assert _same_bits(y[ids < 0], y0[ids < 0])


def test_empty_batch_is_a_noop():
    w = _on(make_weights(16, (16, 16), [8], dtype=torch.float16), DEV)
    batch = _batch(torch.zeros(0, dtype=torch.int32), w)
    x = torch.zeros(0, 16, dtype=torch.float16, device=DEV)
    y = torch.zeros(0, 32, dtype=torch.float16, device=DEV)
    h = torch.zeros(2, 0, 8, device=DEV)
    sgmv.shrink(x, w.a, w.offsets, w.ranks, batch.meta, batch.max_tokens, h)
    sgmv.expand_(y, h, w.b, w.offsets, w.ranks, w.scales, batch.meta, batch.max_tokens, w.slice_info)
    for strategy in ("fused", "two_pass"):
        sgmv.add_lora_(y, x, w.a, w.b, w.offsets, w.ranks, w.scales, batch.meta, batch.max_tokens, w.slice_info,
                       w.max_rank, {"strategy": strategy})
    assert y.shape == (0, 32)


def test_batch_capacity_larger_than_T():
    """A batch allocated for more tokens than this step has (the serving case): meta offsets come from
    max_tokens, not T."""
    g = torch.Generator().manual_seed(8)
    w = make_weights(48, 16, [8, 16, 1], dtype=torch.float32, generator=g, max_adapters=5)
    ids = make_ids("skewed", 7, 3, 0.3, g)
    x = torch.randn(7, 48, generator=g)
    y0 = torch.randn(7, 16, generator=g)
    for strategy in ("fused", "two_pass"):
        y = _run_add_lora(w, ids, x, y0, {"strategy": strategy}, batch=_batch(ids, w, max_tokens=40))
        _check_add_lora(y, w, ids, x, y0, f"capacity {strategy}")


def test_explicit_bad_config_raises():
    w = _on(make_weights(16, 16, [8], dtype=torch.float32), DEV)
    batch = _batch(torch.zeros(3, dtype=torch.int32), w)
    x, y = torch.zeros(3, 16, device=DEV), torch.zeros(3, 16, device=DEV)
    args = (y, x, w.a, w.b, w.offsets, w.ranks, w.scales, batch.meta, batch.max_tokens, w.slice_info, 8)
    for bad in ({"strategy": "magic"}, {"BLOCK_M": 24}, {"bogus": 1}, {"shrink": {"SPLIT_K": 0}}):
        with pytest.raises(ValueError, match="config"):
            sgmv.add_lora_(*args, bad)


# ---- GPU only ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cuda_graph_capture(strategy):
    """Capture add_lora_ in a CUDA graph, rebuild the batch in place with other ids, replay: the replay must
    serve the new batch (no host-side state baked in), in bf16 with real tensor-core dots."""
    g = torch.Generator().manual_seed(9)
    w = make_weights(200, (48, 16, 16), random_ranks(8, RANKS, g), dtype=torch.bfloat16, generator=g, churn=True)
    wd = _on(w, "cuda")
    T = 257
    ids = make_ids("zipf", T, 8, 0.3, g)
    x = torch.randn(T, 200, generator=g).bfloat16()
    y0 = torch.randn(T, 80, generator=g).bfloat16()
    xd, y_g = x.cuda(), y0.cuda()
    batch = LoRABatch(T, w.max_adapters, device="cuda").build(ids.cuda(), ranks=wd.ranks)
    cfg = {"strategy": strategy}
    args = (xd, wd.a, wd.b, wd.offsets, wd.ranks, wd.scales, batch.meta, T, wd.slice_info, w.max_rank, cfg)
    sgmv.add_lora_(y_g.clone(), *args)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sgmv.add_lora_(y_g, *args)
    ids2 = make_ids("uniform", T, 8, 0.1, g)
    batch.build(ids2.cuda(), ranks=wd.ranks)
    y_g.copy_(y0.cuda())
    graph.replay()
    torch.cuda.synchronize()
    _check_add_lora(y_g.cpu(), w, ids2, x, y0, f"cuda graph {strategy}")
