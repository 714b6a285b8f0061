"""Mixed mode (issue 5 item 4): ``add_lora_(y, x, weights, batch, merged=m)`` with the base weight holding
``W0 + delta_m``. Tokens of m get nothing, tokens of ``j != m`` get ``delta_j - delta_m``, tokens with -1 get
``-delta_m``, so ``base_merged(x) + mixed delta`` must equal ``base(x) + unmerged delta`` within the tolerance
rule (tests/helpers.py), on the Triton kernels (the CPU interpreter here; fused, two-pass, split-K) and on the
reference path, for every popularity distribution, with -1 tokens, mixed ranks and slices.

The merge is simulated exactly as the serving stack does it in fp32: ``W = W0 + s_m B_m A_m`` (per slice, in
fp32), base outputs ``x W^T`` rounded to the activation dtype.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from helpers import DISTRIBUTIONS, assert_close_rule, lowp_add_lora_, make_ids, make_weights
from helpers import weights_on as _on

import lora_kernels as lk
from lora_kernels import reference
from lora_kernels.weights import LoRAWeights

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
# per adapter (id = index); in the 3-slice variant adapter 3's middle slice is then set to rank 0 (as
# LoRAWeights.from_padded allows), and ranks differ per slice
RANKS_1 = [8, 33, 1, 16, 4]
RANKS_3 = [8, 33, 1, (16, 2, 4), 4]
SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "N_SPLIT": 3,
         "shrink": {"BLOCK_M": 16, "BLOCK_K": 16, "BLOCK_R": 16}, "expand": {"BLOCK_M": 16, "BLOCK_N": 16,
                                                                            "BLOCK_R": 16}}
STRATEGIES = {
    "fused": {"strategy": "fused"},
    "two_pass": {"strategy": "two_pass"},
    "split_k": {"strategy": "two_pass", "shrink": {"SPLIT_K": 3, "BLOCK_K": 16}},
    "small_tiles_fused": {"strategy": "fused", **{k: v for k, v in SMALL.items() if k not in ("shrink", "expand")}},
    "small_tiles_two_pass": {"strategy": "two_pass", "shrink": SMALL["shrink"], "expand": SMALL["expand"]},
}


def _sgmv():
    return pytest.importorskip("lora_kernels.triton.sgmv")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0:
        return True
    ib = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ib), b.contiguous().view(ib))


# ---- the simulated merge -----------------------------------------------------------------------------------
def _delta_weight(w: LoRAWeights, m: int) -> torch.Tensor:
    """``s_m B_m A_m`` per slice, stacked to [out, in], in fp64."""
    d = torch.zeros(w.out_features, w.in_features, dtype=torch.float64)
    for s in range(w.num_slices):
        A, B, sc = w.adapter(m, s)
        c0 = w.slice_cols[s]
        if A.shape[0]:
            d[c0 : c0 + w.slice_outs[s]] = sc * (B.double().cpu() @ A.double().cpu())
    return d


class Setup:
    """Weights, ids, x, base weights W0 and W = W0 + delta_m (fp32), and the base outputs in x's dtype."""

    def __init__(self, dist, dt, slices, m_pick="largest", T=33, in_f=48, frac_none=0.25, seed=0, ids=None,
                 ranks=None):
        g = torch.Generator().manual_seed(seed)
        outs = (48,) if slices == 1 else (32, 16, 16)
        ranks = ranks or (RANKS_1 if slices == 1 else RANKS_3)
        self.w = make_weights(in_f, outs, ranks, dtype=dt, generator=g, max_adapters=len(ranks) + 1)
        if slices == 3 and ranks is RANKS_3:
            self.w.ranks[1, 3] = 0  # a rank-0 slice: its columns must stay untouched for adapter 3's tokens
        total = [max(r) if isinstance(r, tuple) else r for r in ranks]
        self.m = total.index(max(total)) if m_pick == "largest" else total.index(min(total))
        self.ids = make_ids(dist, T, len(ranks), frac_none, g) if ids is None else ids
        self.x = torch.randn(self.ids.shape[0], in_f, generator=g).to(dt)
        self.w0 = torch.randn(sum(outs), in_f, generator=g) / in_f ** 0.5  # fp32 base weight
        self.wm = (self.w0.double() + _delta_weight(self.w, self.m)).float()  # the merge, done in fp32
        self.dt = dt
        self.y_base = (self.x.float() @ self.w0.t()).to(dt)
        self.y_merged = (self.x.float() @ self.wm.t()).to(dt)
        self.T = self.ids.shape[0]

    def truth(self) -> torch.Tensor:
        """base(x) + unmerged delta, exactly (fp64 base product + the fp32 reference delta)."""
        d = reference.lora_delta(self.x, self.w, self.ids)
        return self.x.double() @ self.w0.double().t() + d.double()

    def lowp(self) -> torch.Tensor:
        """PyTorch in the low precision doing the same mixed computation (the rule's yardstick)."""
        ids, m, dt = self.ids, self.m, self.dt
        none = torch.full_like(ids, -1)
        z = torch.zeros(self.T, self.w.out_features, dtype=dt)
        dj = lowp_add_lora_(z.clone(), self.x, self.w, torch.where(ids == m, none, ids), dt)
        dm = lowp_add_lora_(z.clone(), self.x, self.w, torch.where(ids == m, none, torch.full_like(ids, m)), dt)
        return self.y_merged + dj - dm

    def batch(self, extra=5):
        return lk.LoRABatch(self.T + extra, self.w.max_adapters, DEV).build(self.ids.to(DEV),
                                                                              ranks=self.w.ranks.to(DEV))

    def run_triton(self, config, merged=None):
        """The Triton launcher with an explicit config; returns y (CPU)."""
        sgmv = _sgmv()
        wd = _on(self.w, DEV)
        b = self.batch()
        y = self.y_merged.to(DEV, copy=True)
        sgmv.add_lora_(y, self.x.to(DEV), wd.a, wd.b, wd.offsets, wd.ranks, wd.scales, b.meta, b.max_tokens,
                       wd.slice_info, self.w.max_rank, config, merged=self.m if merged is None else merged)
        return y.cpu()

    def run_public(self, backend):
        with lk.backends.use_backend(backend):
            y = self.y_merged.to(DEV, copy=True)
            lk.add_lora_(y, self.x.to(DEV), _on(self.w, DEV), self.batch(), merged=self.m)
        return y.cpu()

    def check(self, y, name):
        assert_close_rule(y, self.truth(), self.lowp(), dtype=self.dt, name=name)
        of_m = self.ids == self.m
        assert _same_bits(y[of_m], self.y_merged[of_m]), f"{name}: rows of the merged adapter's tokens changed"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or lk.backends.interpreting()


needs_triton = pytest.mark.skipif(not _triton_available(), reason="Triton needs TRITON_INTERPRET=1 or a GPU")


# ---- the matrix: every distribution x dtype x slices; m with the largest / the smallest rank --------------
CASES = [(dist, dt, slices, "largest" if (dt == "fp16") == (slices == 1) else "smallest")
         for dist in DISTRIBUTIONS for dt in ("fp16", "fp32") for slices in (1, 3)]


@needs_triton
@pytest.mark.parametrize("dist,dt,slices,m_pick", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_mixed_equals_unmerged_triton(dist, dt, slices, m_pick):
    """Fused and two-pass kernels (plus split-K / small tiles on alternate cases) vs the unmerged truth."""
    k = CASES.index((dist, dt, slices, m_pick))
    st = Setup(dist, DTYPES[dt], slices, m_pick, seed=k)
    names = ["fused", "two_pass"] + (["split_k", "small_tiles_fused"] if k % 2 else ["small_tiles_two_pass"])
    for name in names:
        st.check(st.run_triton(STRATEGIES[name]), f"{dist} {dt} S={slices} m={m_pick} {name}")


@pytest.mark.parametrize("dist,dt,slices,m_pick", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_mixed_equals_unmerged_reference(dist, dt, slices, m_pick):
    st = Setup(dist, DTYPES[dt], slices, m_pick, seed=100 + CASES.index((dist, dt, slices, m_pick)))
    st.check(st.run_public("reference"), f"reference {dist} {dt} S={slices}")


# ---- special batches ---------------------------------------------------------------------------------------
def _runs(st):
    """(name, y) for every implementation that runs here."""
    out = [("reference", st.run_public("reference"))]
    if _triton_available():
        out += [(n, st.run_triton(STRATEGIES[n])) for n in ("fused", "two_pass", "split_k")]
    return out


@pytest.mark.parametrize("dt", ["fp16", "fp32"])
def test_merged_adapter_absent_from_batch(dt):
    """m not in the batch: every token (adapter or -1) still gets -delta_m."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 4, (21,), generator=g, dtype=torch.int32)  # adapters 0..3; m = 1 (rank 33) mapped away
    ids[ids == 1] = -1
    st = Setup("uniform", DTYPES[dt], 3, "largest", ids=ids, seed=7)
    assert st.m == 1 and not bool((ids == st.m).any())
    for name, y in _runs(st):
        st.check(y, f"m absent {name}")


@pytest.mark.parametrize("dt", ["fp16", "fp32"])
def test_all_tokens_of_the_merged_adapter_leave_y_unchanged(dt):
    st = Setup("identical", DTYPES[dt], 3, "largest", ids=torch.full((17,), 1, dtype=torch.int32), seed=8)
    assert st.m == 1
    for name, y in _runs(st):
        assert _same_bits(y, st.y_merged), f"{name}: y changed although every token uses the merged adapter"
        st.check(y, f"all m {name}")


@pytest.mark.parametrize("dt", ["fp16", "fp32"])
def test_all_tokens_without_adapter_get_minus_delta_m(dt):
    st = Setup("uniform", DTYPES[dt], 1, "smallest", ids=torch.full((19,), -1, dtype=torch.int32), seed=9)
    dm = reference.lora_delta(st.x, st.w, torch.full_like(st.ids, st.m)).double()
    for name, y in _runs(st):
        st.check(y, f"all -1 {name}")
        # and the truth is base(x): y_merged - delta_m
        assert_close_rule(y, st.y_merged.double() - dm, st.lowp(), dtype=st.dt, name=f"all -1 {name} vs -delta_m")


@needs_triton
@pytest.mark.parametrize("strategy", ["fused", "two_pass"])
def test_2d_grid_fallback(monkeypatch, strategy):
    """Above _FLAT_SEGMENT_LIMIT segments the (tile, segment) 2-D grid is used: it must count the virtual
    segment of -1 tokens too."""
    monkeypatch.setattr(_sgmv(), "_FLAT_SEGMENT_LIMIT", 0)
    st = Setup("zipf", torch.float32, 3, "smallest", seed=10)
    st.check(st.run_triton({"strategy": strategy, "BLOCK_M": 16, "shrink": {"BLOCK_M": 16},
                            "expand": {"BLOCK_M": 16}}), f"2-D grid {strategy}")


@needs_triton
@pytest.mark.parametrize("strategy", ["fused", "two_pass"])
def test_bf16_interpreter_path(strategy):
    st = Setup("skewed", torch.bfloat16, 3, "largest", seed=11)
    st.check(st.run_triton({"strategy": strategy}), f"bf16 {strategy}")


@needs_triton
def test_many_adapters_distinct():
    """Every token a different adapter (66 segments + the virtual one)."""
    ranks = [1 + (7 * i) % 40 for i in range(66)]
    st = Setup("distinct", torch.float16, 1, "largest", T=70, in_f=16, ranks=ranks, seed=12, frac_none=0.1)
    for name in ("fused", "two_pass"):
        st.check(st.run_triton(STRATEGIES[name]), f"66 adapters {name}")


@needs_triton
def test_public_op_on_the_triton_backend_matches_reference():
    st = Setup("zipf", torch.float16, 3, "largest", seed=13)
    got = st.run_public("triton")
    st.check(got, "public triton")
    want = st.run_public("reference")
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def test_merged_none_is_the_normal_op():
    st = Setup("uniform", torch.float32, 1, seed=14)
    b = st.batch()
    y1, y2 = st.y_base.clone(), st.y_base.clone()
    lk.add_lora_(y1, st.x, st.w, b)
    lk.add_lora_(y2, st.x, st.w, b, merged=None)
    assert _same_bits(y1, y2)


def test_empty_batch_is_a_noop_in_mixed_mode():
    st = Setup("uniform", torch.float32, 3, seed=22)
    b = lk.LoRABatch(4, st.w.max_adapters).build(torch.empty(0, dtype=torch.int32))
    y = torch.empty(0, st.w.out_features)
    for backend in ("reference",) + (("triton",) if _triton_available() else ()):
        with lk.backends.use_backend(backend):
            assert lk.add_lora_(y, torch.empty(0, st.w.in_features), st.w, b, merged=st.m) is y


# ---- refusals ----------------------------------------------------------------------------------------------
def test_refusals_name_merged_and_leave_y_untouched():
    st = Setup("uniform", torch.float32, 1, seed=15)  # 5 adapters in 6 slots: slot 5 is free
    b = st.batch()
    y = st.y_merged.clone()
    for bad in (-1, 6, 100, 5, True, 1.0, "1"):
        with pytest.raises(ValueError, match=r"^merged:"):
            lk.add_lora_(y, st.x, st.w, b, merged=bad)
        assert _same_bits(y, st.y_merged), bad
    with pytest.raises(ValueError, match=r"^merged: .*free slot"):
        lk.add_lora_(y, st.x, st.w, b, merged=5)
    with pytest.raises(ValueError, match=r"^merged:"):
        lk.shrink(st.x, st.w, b, merged=1)
    h = lk.shrink(st.x, st.w, b)
    with pytest.raises(ValueError, match=r"^merged:"):
        lk.expand_(y, h, st.w, b, merged=1)
    assert _same_bits(y, st.y_merged)


@needs_triton
def test_triton_launcher_refuses_bad_merged():
    st = Setup("uniform", torch.float32, 1, seed=16)
    for bad in (-2, 6):
        with pytest.raises(ValueError, match=r"^merged:"):
            st.run_triton({"strategy": "fused"}, merged=bad)


# ---- custom op ---------------------------------------------------------------------------------------------
def test_schema_and_opcheck():
    schema = torch.ops.lora_kernels.add_lora_.default._schema
    assert "Int merged=-1" in str(schema), str(schema)  # SymInt: what custom_op makes of a Python int
    writes = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    # y, and the batch's plan (the persistent kernel's counters, reset by its last program) and workspace
    assert writes == ["y", "plan", "ws"]
    st = Setup("uniform", torch.float32, 3, seed=17, T=9)
    b = st.batch()
    w = st.w
    args = (st.y_merged.clone(), st.x, w.a, w.b, w.offsets, w.ranks, w.scales, b.meta, w.slice_info, b.max_tokens,
            w.max_rank)
    torch.library.opcheck(torch.ops.lora_kernels.add_lora_.default, args + (st.m,))
    torch.library.opcheck(torch.ops.lora_kernels.add_lora_.default, args)
    ws = b.workspace(1 << 16)
    torch.library.opcheck(torch.ops.lora_kernels.add_lora_.default,
                          args + (st.m, b.plan, ws, list(w.slice_outs)))


# ---- LoRALinear ----------------------------------------------------------------------------------------------
def _layer(st: Setup):
    lin = torch.nn.Linear(st.w.in_features, st.w.out_features, bias=False)
    with torch.no_grad():
        lin.weight.copy_(st.w0)
    return lk.nn.LoRALinear(lin, st.w)


def test_set_serving_mode_validates():
    st = Setup("uniform", torch.float32, 1, seed=18)
    layer = _layer(st)
    assert (layer.mode, layer.merged_adapter) == ("unmerged", None)
    for mode, adapter, name in (("bogus", None, "mode"), ("unmerged", 1, "adapter"), ("mixed", None, "adapter"),
                                ("merged", 6, "adapter"), ("mixed", 5, "adapter"), ("mixed", True, "adapter")):
        with pytest.raises(ValueError, match=rf"^{name}:"):
            layer.set_serving_mode(mode, adapter)
        assert (layer.mode, layer.merged_adapter) == ("unmerged", None)
    layer.set_serving_mode("merged", 5)  # a free slot is fine for merged mode (delta_m = 0 on this layer)
    layer.set_serving_mode("mixed", 1)
    assert (layer.mode, layer.merged_adapter) == ("mixed", 1)
    assert "mixed, adapter=1" in repr(layer)


@torch.no_grad()
def test_lora_linear_modes_match_unmerged():
    """unmerged on W0, mixed on W0 + delta_m, merged on W0 + delta_m for a batch of m only: same outputs."""
    st = Setup("skewed", torch.float32, 3, "largest", seed=19)
    layer = _layer(st)
    b = st.batch()
    with lk.use_batch(b):
        unmerged = layer(st.x)
        layer.base.weight.copy_(st.wm)
        layer.set_serving_mode("mixed", st.m)
        mixed = layer(st.x)
        assert_close_rule(mixed, st.truth(), st.lowp(), name="LoRALinear mixed")
        torch.testing.assert_close(mixed, unmerged, rtol=1e-5, atol=1e-5)
        ids_m = torch.full_like(st.ids, st.m)
        b.build(ids_m, ranks=st.w.ranks)
        layer.set_serving_mode("merged", st.m)
        merged = layer(st.x)
        layer.base.weight.copy_(st.w0)
        layer.set_serving_mode("unmerged")
        want = layer(st.x)
    torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_lora_linear_mixed_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces mixed mode; a mode change recompiles (documented), new ids in
    place do not."""
    st = Setup("zipf", torch.float32, 1, "largest", seed=20, T=12)
    layer = _layer(st)
    layer.base.weight.copy_(st.wm)
    layer.set_serving_mode("mixed", st.m)
    b = st.batch()
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    with lk.use_batch(b):
        eager = layer(st.x)
        got = compiled(st.x)
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
        ids2 = torch.flip(st.ids, [0])
        b.build(ids2, ranks=st.w.ranks)
        torch._dynamo.config.error_on_recompile = True
        try:
            got2 = compiled(st.x)
        finally:
            torch._dynamo.config.error_on_recompile = False
        torch.testing.assert_close(got2, layer(st.x), rtol=1e-5, atol=1e-5)
        layer.set_serving_mode("merged", st.m)  # recompiles (mode is guarded)
        torch.testing.assert_close(compiled(st.x), st.y_merged, rtol=1e-5, atol=1e-5)


# ---- GPU ---------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("strategy", ["fused", "two_pass", "split_k"])
def test_cuda_bf16_mixed(strategy):
    """bf16 with real tensor-core dots, 7B-like width, mixed ranks, zipf ids with -1 tokens."""
    st = Setup("zipf", torch.bfloat16, 3, "largest", T=257, in_f=1024, seed=21,
               ranks=[8, 128, 1, (16, 2, 64), 33])
    st.check(st.run_triton(STRATEGIES[strategy]), f"cuda bf16 {strategy}")


@pytest.mark.cuda
@pytest.mark.parametrize("strategy", ["fused", "two_pass"])
def test_cuda_graph_mixed_replays_new_ids(strategy):
    """Mixed mode captured in a CUDA graph: rebuilt ids (other -1 tokens, other segments) are served on replay,
    so the virtual segment and the grid bound need no host data."""
    st = Setup("zipf", torch.bfloat16, 3, "largest", T=129, in_f=256, seed=23)
    sgmv = _sgmv()
    wd = _on(st.w, "cuda")
    b = lk.LoRABatch(st.T, st.w.max_adapters, "cuda").build(st.ids.cuda(), ranks=wd.ranks)
    x, y = st.x.cuda(), st.y_merged.cuda()
    args = (x, wd.a, wd.b, wd.offsets, wd.ranks, wd.scales, b.meta, b.max_tokens, wd.slice_info, st.w.max_rank,
            {"strategy": strategy})
    sgmv.add_lora_(y.clone(), *args, merged=st.m)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sgmv.add_lora_(y, *args, merged=st.m)
    g = torch.Generator().manual_seed(24)
    st.ids = make_ids("uniform", st.T, 5, 0.4, g)
    b.build(st.ids.cuda(), ranks=wd.ranks)
    y.copy_(st.y_merged.cuda())
    graph.replay()
    torch.cuda.synchronize()
    st.check(y.cpu(), f"cuda graph mixed {strategy}")
