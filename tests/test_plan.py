"""The batch's work plan (lora_kernels.plan) and the persistent kernel that walks it.

* The tile lists ``LoRABatch.build`` writes are exactly the tiles of the spec (every family, the virtual
  segment of the tokens with no adapter, counts), checked against a plain-Python cut of ``to_dict()``.
* Through the public op on the Triton backend (interpreter): the kernel uses the batch's plan and workspace,
  leaves the counters at zero (the invariant between calls), is bitwise reproducible, and allocates nothing
  on a repeated call.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_rule, lowp_add_lora_

import lora_kernels as lk
from lora_kernels import backends, reference
from lora_kernels.plan import PLAN_BLOCK_M, PlanLayout


def _expected_tiles(d: dict, T: int, bm: int):
    """(real tiles, all tiles) as (pos0, len, adapter) lists, cut from the host copy of the batch."""
    real = []
    for start, length, ad in zip(d["seg_start"], d["seg_len"], d["active_adapters"]):
        for m0 in range(0, length, bm):
            real.append((start + m0, min(bm, length - m0), ad))
    virtual = [(d["num_valid"] + m0, min(bm, T - d["num_valid"] - m0), -1)
               for m0 in range(0, T - d["num_valid"], bm)]
    return real, real + virtual


def _family(b: lk.LoRABatch, bm: int):
    pl = b.plan_layout
    off, n = pl.family(bm), pl.n_max(bm)
    p = b.plan.tolist()
    n_real, n_all = p[off], p[off + 1]
    tiles = list(zip(p[off + 2 : off + 2 + n], p[off + 2 + n : off + 2 + 2 * n], p[off + 2 + 2 * n : off + 2 + 3 * n]))
    return n_real, n_all, tiles


@pytest.mark.parametrize("T,N,frac_none,cap", [(0, 3, 0.0, 4), (1, 1, 0.0, 1), (5, 4, 0.4, 9), (17, 3, 0.0, 17),
                                               (100, 7, 0.25, 130), (300, 40, 0.1, 300), (64, 64, 1.0, 64)])
def test_plan_lists_are_exact(T, N, frac_none, cap):
    g = torch.Generator().manual_seed(T * 31 + N)
    ids = torch.randint(0, N, (T,), generator=g, dtype=torch.int32)
    ids[torch.rand(T, generator=g) < frac_none] = -1
    b = lk.LoRABatch(cap, N).build(ids)
    d = b.to_dict()
    for bm in PLAN_BLOCK_M:
        real, every = _expected_tiles(d, T, bm)
        n_real, n_all, tiles = _family(b, bm)
        assert (n_real, n_all) == (len(real), len(every)), bm
        assert tiles[:n_all] == every, bm
        assert all(t == (0, 0, -1) for t in tiles[n_all:]), f"BLOCK_M={bm}: entries past the count not cleared"
        assert n_all <= b.plan_layout.n_max(bm)
    # counters and 'done' start at zero
    assert not any(b.plan[: b.plan_layout.done + 1].tolist())


def test_plan_rebuild_shrinks_lists():
    b = lk.LoRABatch(64, 8).build(torch.arange(64, dtype=torch.int32) % 8)
    b.build(torch.tensor([3, 3, -1], dtype=torch.int32))
    n_real, n_all, tiles = _family(b, 16)
    assert (n_real, n_all) == (1, 2) and tiles[:2] == [(0, 2, 3), (2, 1, -1)]
    assert all(t == (0, 0, -1) for t in tiles[2:])


def test_plan_family_names_the_block():
    with pytest.raises(ValueError, match="BLOCK_M"):
        PlanLayout(16, 4).family(32)


def _setup(T=37, K=72, outs=(40, 24), N=5, ranks=(8, 0, 16, 4, 12), dtype=torch.float16, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = lk.LoRAWeights(K, list(outs), max_adapters=N, max_rank=max(ranks), dtype=dtype, device=device)
    for i, r in enumerate(ranks):
        if r:
            w.add([(torch.randn(r, K, generator=g) * 0.2).to(device, dtype) for _ in outs],
                  [(torch.randn(o, r, generator=g) * 0.2).to(device, dtype) for o in outs], scale=0.5 + 0.25 * i,
                  adapter_id=i)
    ids = torch.randint(-1, N, (T,), generator=g, dtype=torch.int32).to(device)
    x = torch.randn(T, K, generator=g).to(device, dtype)
    y0 = torch.randn(T, sum(outs), generator=g).to(device, dtype)
    return w, ids, x, y0


@pytest.mark.parametrize("merged", [None, 2])
@pytest.mark.parametrize("n_k", [0, 3])
def test_public_op_on_the_plan(merged, n_k, monkeypatch):
    """lk.add_lora_ on the Triton backend: the batch's plan and workspace, counters back to 0, deterministic,
    no new workspace on a repeated call, and the values of the spec."""
    from lora_kernels import tuning

    w, ids, x, y0 = _setup(seed=n_k + (merged or 0))
    batch = lk.LoRABatch(64, w.max_adapters).build(ids, ranks=w.ranks)
    if n_k:
        real = tuning.get_config_cached

        def forced(op, *a, **k):
            cfg = real(op, *a, **k)
            return {**cfg, "persistent": {**cfg["persistent"], "N_K": n_k, "BLOCK_N": 16}} if op == "add_lora" else cfg

        monkeypatch.setattr(tuning, "get_config_cached", forced)
    with backends.use_backend("triton"):
        y1 = lk.add_lora_(y0.clone(), x, w, batch, merged=merged)
        ws = batch._workspace
        assert ws.numel() > 0, "the batch's workspace was not used"
        assert not any(batch.plan[: batch.plan_layout.done + 1].tolist()), "counters not reset to 0"
        y2 = lk.add_lora_(y0.clone(), x, w, batch, merged=merged)
        assert batch._workspace.data_ptr() == ws.data_ptr(), "a repeated call allocated a new workspace"
    assert torch.equal(y1, y2), "two identical calls differ (the split-K sum must be deterministic)"
    if merged is None:
        ref = reference.add_lora_(y0.to(torch.float32, copy=True), x, w.a, w.b, w.offsets, w.ranks, w.scales, ids,
                                  w.slice_cols, w.slice_outs)
        low = lowp_add_lora_(y0.clone(), x, w, ids, y0.dtype)
        assert_close_rule(y1, ref, low, name="persistent add_lora_", base=y0)
    else:
        with backends.use_backend("reference"):
            want = lk.add_lora_(y0.clone(), x, w, batch, merged=merged)
        assert (y1.float() - want.float()).abs().max() <= 2e-2 * (want.float() - y0.float()).abs().max()


# ---- on a GPU (bench/gpu_check.sh runs `pytest -m cuda`) -------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 16, 64, 300, 1000])
@pytest.mark.parametrize("merged", [None, 1])
def test_cuda_persistent_prebound_graph_and_determinism(T, merged):
    """The persistent kernel on the GPU: values of the spec, bitwise equal over repeated calls (deterministic
    split-K sum), the pre-bound launch equal to the plain launch, counters back to 0, and a CUDA graph replay with
    new x equal to an eager call (grid fixed by the GPU, no allocation, no host sync)."""
    from lora_kernels.triton import sgmv

    w, ids, x, y0 = _setup(T=T, K=4096, outs=(4096, 1024), N=5, ranks=(16, 0, 64, 8, 32), dtype=torch.bfloat16,
                           seed=T, device="cuda")
    batch = lk.LoRABatch(1024, w.max_adapters, device="cuda").build(ids, ranks=w.ranks)
    ys = [lk.add_lora_(y0.clone(), x, w, batch, merged=merged) for _ in range(3)]
    torch.cuda.synchronize()
    assert all(torch.equal(ys[0], y) for y in ys[1:]), "repeated calls differ"
    assert not batch.plan[: batch.plan_layout.done + 1].any(), "counters not reset"
    sgmv.PREBOUND = False
    try:
        plain = lk.add_lora_(y0.clone(), x, w, batch, merged=merged)
    finally:
        sgmv.PREBOUND = True
    assert torch.equal(plain, ys[0]), "the pre-bound launch differs from the plain launch"
    with backends.use_backend("reference"):
        want = lk.add_lora_(y0.float(), x.float(), w, batch, merged=merged)
    d = (want - y0.float()).abs().max()
    assert (ys[0].float() - want).abs().max() <= 2e-2 * d + 1e-2, "values differ from the spec"
    # CUDA graph: capture once, replay with new x
    y_g = y0.clone()
    lk.add_lora_(y_g.clone(), x, w, batch, merged=merged)  # warm-up (compile, workspace) outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        lk.add_lora_(y_g, x, w, batch, merged=merged)
    x.copy_(torch.randn_like(x))
    y_g.copy_(y0)
    g.replay()
    eager = lk.add_lora_(y0.clone(), x, w, batch, merged=merged)
    torch.cuda.synchronize()
    assert torch.equal(y_g, eager), "graph replay differs from the eager call"
