"""The cached host plan of merge_many_ / unmerge_many_ (lora_kernels.ops.merge_plan): the vectorised tables equal
the per-layer reference, cached and uncached merges give bit-identical results, and the cache misses whenever
an adapter is added/removed, W is replaced, the scales are written or the lambdas differ (even in the sign of
zero). CPU: the reference path and the Triton kernel in the interpreter (tiny shapes)."""

from __future__ import annotations

import math

import pytest
import torch
from test_merge import adversarial_W, assert_bits_equal, make_weights

import lora_kernels as lk
from lora_kernels.ops import merge as M
from lora_kernels.ops.merge import checks, dispatch
from lora_kernels.ops import merge_plan as MP

SHAPES = [(16, (8, 4, 4)), (12, (20,)), (7, (5,)), (32, (16, 16))]  # fused slices; in % 4 != 0 (unpacked codes)


@pytest.fixture(autouse=True)
def _fresh_cache():
    prev = MP.set_enabled(True)
    MP.clear()
    _LIVE.clear()
    yield
    MP.set_enabled(prev)
    MP.clear()


def _layers(dtype=torch.float16, seed=0, ranks=((3,), (8,))):
    ws = [make_weights(i, o, [r * len(o) for r in ranks], dtype, seed=seed + k, scale_b=0.2)
          for k, (i, o) in enumerate(SHAPES)]
    W0s = [adversarial_W(dtype, (w.out_features, w.in_features), seed=seed + 10 + k) for k, w in enumerate(ws)]
    return ws, W0s


_LIVE: dict = {}


def _merge(W0s, ws, adapters, lambdas=None, backend="reference", fresh=False):
    """merge_many_ into persistent copies of W0s (the plan is keyed by W's data pointers, so a warm merge
    needs the same tensors), reset to W0s first. Returns ``(snapshots of the merged Ws, live Ws, records)``."""
    key = tuple(id(W0) for W0 in W0s)
    if fresh or key not in _LIVE:
        _LIVE[key] = [W0.clone() for W0 in W0s]
    Ws = _LIVE[key]
    for W, W0 in zip(Ws, W0s):
        W.copy_(W0)
    with lk.backends.use_backend(backend):
        recs = M.merge_many_(Ws, ws, adapters, lambdas)
    return [W.clone() for W in Ws], Ws, recs


def _assert_same(a, b, what):
    (Wa, _, ra), (Wb, _, rb) = a, b
    for i, (x, y, p, q) in enumerate(zip(Wa, Wb, ra, rb)):
        assert_bits_equal(x, y, f"{what}: merged W[{i}]")
        assert torch.equal(p.code, q.code), f"{what}: codes of layer {i}"
        assert torch.equal(p.escape_idx, q.escape_idx) and p.escapes == q.escapes, f"{what}: escapes of layer {i}"
        assert_bits_equal(p.escape_val, q.escape_val, f"{what}: escape values of layer {i}")


@pytest.mark.parametrize("tile", [(32, 64), (1, 1024), (2, 4)])
def test_vectorised_tables_equal_reference(tile):
    """build_tables_vec == build_tables (the per-layer Python packing), for every layer and for a subset
    (one dtype group), with ranks 0 in some slices (terms skipped, jobs kept)."""
    ws, W0s = _layers(torch.float32)
    plans = [checks._plan(W, w, [1, 0], [0.5, -1.5], "W") for W, w in zip(W0s, ws)]
    plans[1]["terms"][0][4] = 0  # a rank-0 term: its job stays, the term is dropped
    terms, coefs = dispatch._terms_tensors([p["terms"] for p in plans], [p["coefs"] for p in plans])
    codes = [torch.empty((W.numel() + 3) // 4, dtype=torch.uint8) for W in W0s]
    packed = [W.shape[1] % 4 == 0 for W in W0s]
    for layers in (list(range(len(W0s))), [1, 3]):
        ref = M.build_tables([dict(W=W0s[i], code=codes[i], packed=packed[i], a=ws[i].a, b=ws[i].b,
                                   terms=plans[i]["terms"], coefs=plans[i]["coefs"], layer_index=i) for i in layers],
                             *tile, torch.device("cpu"))
        vec = MP.build_tables_vec(W0s, [w.a for w in ws], [w.b for w in ws], terms, coefs, layers,
                                  [c.data_ptr() for c in codes], packed, *tile, torch.device("cpu"))
        assert ref[4] == vec[4] and ref[4] > 0
        for name, x, y in zip(("jobs", "tile_start", "terms", "coefs"), ref[:4], vec[:4]):
            assert x.dtype == y.dtype and torch.equal(x, y), f"{name} differ for layers {layers}"


def _unmerge_check(res, W0s, what):
    _, Ws, recs = res
    M.unmerge_many_(Ws, recs)
    for W, W0 in zip(Ws, W0s):
        assert_bits_equal(W, W0, what)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cached_and_uncached_bit_identical(backend):
    ws, W0s = _layers()
    MP.set_enabled(False)
    uncached = _merge(W0s, ws, [1, 0], [0.5, 1.5], backend)
    assert MP.info()["entries"] == 0
    _unmerge_check(uncached, W0s, "uncached unmerge")
    MP.set_enabled(True)
    cold = _merge(W0s, ws, [1, 0], [0.5, 1.5], backend)
    _assert_same(uncached, cold, "uncached vs cold")
    _unmerge_check(cold, W0s, "cold unmerge")
    warm = _merge(W0s, ws, [1, 0], [0.5, 1.5], backend)
    assert MP.info()["hits"] == 1 and MP.info()["misses"] == 1
    plan = cold[2][0]._plan
    assert warm[2][0]._plan is plan  # the warm merge used the cold one's plan
    assert sum(r.escapes for r in warm[2]) > 0  # the adversarial values exercise the escape list
    _assert_same(uncached, warm, "uncached vs warm")
    _unmerge_check(warm, W0s, "warm unmerge")
    if backend == "triton":  # the op found its plan through the dispatcher: tables cached, unmerge reused them
        tabs = plan.tables
        assert tabs[("unmerge", True)][0][3] is tabs[("merge", True)][0][3]


def test_unmerge_of_a_subset_or_reordered_records_plans_from_scratch():
    """Records used apart from their merge_many_ call (one layer, or reversed) still unmerge bit-exactly."""
    ws, W0s = _layers()
    for backend in ("reference", "triton"):
        _, Ws, recs = _merge(W0s, ws, [1], None, backend)
        M.unmerge_(Ws[2], recs[2])
        rest = [0, 1, 3][::-1]
        M.unmerge_many_([Ws[i] for i in rest], [recs[i] for i in rest])
        for W, W0 in zip(Ws, W0s):
            assert_bits_equal(W, W0, f"unmerge [{backend}]")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_add_remove_invalidates(backend):
    ws, W0s = _layers()
    _unmerge_check(_merge(W0s, ws, [1], None, backend), W0s, "first cycle")
    # Reload slot 1 of one layer with another adapter (other rank and scale): the plan must miss.
    w = ws[0]
    w.remove(1)
    g = torch.Generator().manual_seed(99)
    w.add([torch.randn(5, w.in_features, generator=g) for _ in w.slice_outs],
          [torch.randn(o, 5, generator=g) * 0.3 for o in w.slice_outs], alpha=3.0, adapter_id=1)
    misses = MP.info()["misses"]
    after = _merge(W0s, ws, [1], None, backend)
    assert MP.info()["misses"] == misses + 1
    _unmerge_check(after, W0s, "after reload")
    MP.set_enabled(False)
    fresh = _merge(W0s, ws, [1], None, backend, fresh=True)
    MP.set_enabled(True)
    _assert_same(fresh, after, "after reload")
    # Removing another adapter (not merged) bumps the version: a miss, same result.
    ws[1].remove(0)
    misses = MP.info()["misses"]
    again = _merge(W0s, ws, [1], None, backend)
    assert MP.info()["misses"] == misses + 1
    _assert_same(fresh, again, "after removing another adapter")
    _unmerge_check(again, W0s, "after removing another adapter")
    # Removing the merged adapter: the cached plan is not used, the call is refused (free slot).
    ws[2].remove(1)
    with pytest.raises(ValueError, match="adapters"):
        _merge(W0s, ws, [1], None, backend)
    for W, W0 in zip(_LIVE[tuple(id(W0) for W0 in W0s)], W0s):
        assert_bits_equal(W, W0, "refused")


def test_token_check_catches_a_stale_plan_without_version_bump():
    """Even if an allocation is changed behind LoRAWeights' back (version not bumped), the allocation tokens
    make the cached plan miss."""
    ws, W0s = _layers(torch.float32)
    _merge(W0s, ws, [1])
    w = ws[0]
    off, n = w._alloc[1]
    w._alloc[1] = (off, n)  # a new token object, same values
    misses = MP.info()["misses"]
    _merge(W0s, ws, [1])
    assert MP.info()["misses"] == misses + 1


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_replaced_W_misses_and_merges_the_new_tensor(backend):
    ws, W0s = _layers()
    _, Ws, recs = _merge(W0s, ws, [0], None, backend)
    M.unmerge_many_(Ws, recs)
    new = [W.clone() for W in Ws]  # replaced: other data pointers
    misses = MP.info()["misses"]
    with lk.backends.use_backend(backend):
        recs2 = M.merge_many_(new, ws, [0])
    assert MP.info()["misses"] == misses + 1
    for W, W0 in zip(Ws, W0s):
        assert_bits_equal(W, W0, "the old tensors are untouched")
    MP.set_enabled(False)
    fresh = _merge(W0s, ws, [0], None, backend, fresh=True)
    _assert_same(fresh, ([W.clone() for W in new], new, recs2), "replaced W")
    M.unmerge_many_(new, recs2)
    for W, W0 in zip(new, W0s):
        assert_bits_equal(W, W0, "replaced W unmerge")
    # A transposed view of a square W has W's pointer and shape: refused, not served from the cache.
    sq = lk.LoRAWeights(8, 8, max_adapters=2, max_rank=2, dtype=torch.float16)
    sq.add(torch.randn(2, 8), torch.randn(8, 2))
    MP.set_enabled(True)
    Wsq = torch.randn(8, 8, dtype=torch.float16)
    M.unmerge_many_([Wsq], M.merge_many_([Wsq], [sq], [0]))
    with pytest.raises(ValueError, match="contiguous"):
        M.merge_many_([Wsq.t()], [sq], [0])


def test_scales_write_and_lambdas_key_the_plan():
    ws, W0s = _layers(torch.float32)
    a = _merge(W0s, ws, [1])
    with torch.no_grad():
        ws[3].scales[:, 1] = 7.0  # written behind add(): the tensor's version counter changes
    b = _merge(W0s, ws, [1])
    assert b[2][0]._plan is not a[2][0]._plan
    assert b[2][3].scales == ((7.0, 7.0),)
    MP.set_enabled(False)
    _assert_same(_merge(W0s, ws, [1], fresh=True), b, "after a scales write")
    MP.set_enabled(True)
    # lambdas 0.0 and -0.0 are equal floats but give different W (the sign of a zero delta): two plans.
    p0 = _merge(W0s, ws, [1], 0.0)[2][0]._plan
    p1 = _merge(W0s, ws, [1], -0.0)[2][0]._plan
    assert p0 is not p1 and p0.coefs_t[0].item() == 0.0 and str(p1.coefs_t[0].item()) == "-0.0"


def test_cache_is_bounded_and_holds_weights_weakly():
    import gc
    import weakref

    ws, W0s = _layers(torch.float32)
    for lam in range(MP._MAX_ENTRIES + 5):
        _merge(W0s, ws, [0], float(lam))
    assert MP.info()["entries"] == MP._MAX_ENTRIES
    r = weakref.ref(ws[0])
    del ws
    _LIVE.clear()
    gc.collect()
    assert r() is None  # the cache does not keep a model's adapters alive


def test_mode_controller_switches_hit_the_cache_and_see_reloads():
    from lora_kernels.nn import LoRALinear, ModeController

    torch.manual_seed(0)
    ws, W0s = _layers(torch.float32)
    bases = []
    for W0 in W0s:
        lin = torch.nn.Linear(W0.shape[1], W0.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(W0)
        bases.append(lin)
    ctl = ModeController([LoRALinear(b, w) for b, w in zip(bases, ws)])
    ctl.set_mode("mixed", adapter=1)
    merged_once = [b.weight.detach().clone() for b in bases]
    ctl.set_mode("unmerged")
    hits = MP.info()["hits"]
    ctl.set_mode("merged", adapter=1)
    assert MP.info()["hits"] == hits + 1
    for b, m in zip(bases, merged_once):
        assert_bits_equal(b.weight.detach(), m, "warm switch")
    ctl.set_mode("unmerged")
    ws[0].remove(1)  # adapter 1 leaves layer 0: the next switch plans again and leaves layer 0 alone
    ctl.set_mode("mixed", adapter=1)
    assert_bits_equal(bases[0].weight.detach(), W0s[0], "layer without the adapter")
    for b, m in zip(bases[1:], merged_once[1:]):
        assert_bits_equal(b.weight.detach(), m, "other layers")
    ctl.set_mode("unmerged")
    for b, W0 in zip(bases, W0s):
        assert_bits_equal(b.weight.detach(), W0, "back to unmerged")


@pytest.mark.parametrize("lambdas", [[0.5, -1.5], [1e-40, 3.0e30], [-0.0, 1.0 / 3.0]])
def test_vectorised_plan_equals_per_layer_plan(lambdas):
    """merge_many_'s all-layers planning == the per-layer _plan (terms, coefs bit for bit incl. subnormal
    products and signed zeros, scales, ranks, offsets, tokens)."""
    ws, W0s = _layers(torch.float32)
    with torch.no_grad():
        ws[2].scales[:, 0] = 0.1  # a scale whose product with the lambdas rounds
    flat = torch.cat([w.scales.reshape(-1).float() for w in ws])
    off, pos = {}, 0
    for w in ws:
        off[id(w)] = pos
        pos += w.scales.numel()
    fast = checks._plan_fast(W0s, ws, [1, 0], lambdas, flat, off)
    assert fast is not None
    plans, terms, coefs = fast
    slow = [checks._plan(W, w, [1, 0], lambdas, "W") for W, w in zip(W0s, ws)]
    t_ref, c_ref = dispatch._terms_tensors([p["terms"] for p in slow], [p["coefs"] for p in slow])
    assert torch.equal(terms, t_ref)
    assert torch.equal(coefs.view(torch.int32), c_ref.view(torch.int32))
    for p, q in zip(plans, slow):
        for k in ("ids", "lams", "terms", "ranks", "offsets", "scales", "tokens"):
            assert p[k] == q[k], k
        assert [math.copysign(1.0, c) for c in p["coefs"]] == [math.copysign(1.0, c) for c in q["coefs"]]
        assert p["coefs"] == q["coefs"]
    # lambda * scale overflowing fp32, or a layer failing a cheap check: the per-layer path raises, naming it.
    assert checks._plan_fast(W0s, ws, [1, 0], [3e38, 1e38], flat, off) is None
    with pytest.raises(ValueError, match="lambda \\* scale finite"):
        M.merge_many_([W.clone() for W in W0s], ws, [1, 0], [3e38, 1e38])
    assert checks._plan_fast([W0s[0], W0s[1].t()], ws[:2], [1], None, flat, off) is None
    with pytest.raises(ValueError, match=r"Ws\[1\]"):
        M.merge_many_([W0s[0].clone(), W0s[1].clone()[:, :-1]], ws[:2], [1])


def test_bench_host_planning_field_leaves_weights_and_launch_alone():
    from lora_kernels.bench.merge_host import host_planning
    from lora_kernels.nn import LoRALinear

    ws, W0s = _layers(torch.float32)
    Ws = [W0.clone() for W0 in W0s]
    layers = []
    for W, w in zip(Ws, ws):
        lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        lin.weight = torch.nn.Parameter(W, requires_grad=False)
        layers.append(LoRALinear(lin, w))
    run, select = dispatch._run, dispatch._select
    hp = host_planning(Ws, ws, layers, 0, 1, reps=2)
    assert dispatch._run is run and dispatch._select is select
    assert hp["weights"] == len(Ws)
    for op in ("merge", "unmerge", "switch", "set_mode"):
        assert 0 < hp[op + "_warm_ms"] < 1e4 and 0 < hp[op + "_cold_ms"] < 1e4
    for W, W0 in zip(Ws, W0s):
        assert_bits_equal(W, W0, "host planning must not change the weights")
    assert all(layer.mode == "unmerged" for layer in layers)


def test_lora_bench_merge_reports_host_planning(tmp_path):
    import json

    from lora_kernels.cli import main

    out = tmp_path / "merge.json"
    main(["merge", "--cpu", "--sections", "model", "--layers", "1", "--hidden", "16", "--mlp", "24", "--rank", "2",
          "--impls", "no-such-impl", "--no-progress", "--out", str(out)])
    doc = json.loads(out.read_text())
    hp = doc["cases"][0]["host_planning"]
    assert doc["host_planning"][doc["cases"][0]["case"]] == hp
    assert hp["weights"] == 7 and "error" not in hp
    for op in ("merge", "unmerge", "switch", "set_mode"):
        assert hp[op + "_cold_ms"] > 0 and hp[op + "_warm_ms"] > 0


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_cached_and_uncached_bit_identical(backend):
    """On the GPU: warm (cached plan, re-pointed code column, unmerge tables derived from the merge's) and
    uncached merges give the same W, codes and escapes, over several cycles; bf16, fused slices, in % 4 != 0."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    if backend == "cuda" and dispatch._cuda_ops() is None:
        pytest.skip("the compiled extension has no merge kernel (rebuild it)")
    dt = torch.bfloat16
    shapes = [(512, (256, 128, 128)), (98, (33,)), (1376, (512,))]
    ws = []
    for k, (i, o) in enumerate(shapes):
        w = make_weights(i, o, [(8,) * len(o), (16,) * len(o)], dt, seed=40 + k, scale_b=0.3)
        a, b = w.to_padded()
        ws.append(lk.LoRAWeights.from_padded(a.cuda(), b.cuda(), ranks=w.ranks.cuda(), scales=w.scales.cuda(),
                                             slice_outs=list(w.slice_outs)))
    W0s = [adversarial_W(dt, (w.out_features, w.in_features), seed=50 + k).cuda() for k, w in enumerate(ws)]
    MP.set_enabled(False)
    ref_ = _merge(W0s, ws, [1, 0], [0.5, 1.5], backend)
    _unmerge_check(ref_, W0s, "uncached")
    MP.set_enabled(True)
    assert sum(r.escapes for r in ref_[2]) > 0
    for cycle in range(3):
        got = _merge(W0s, ws, [1, 0], [0.5, 1.5], backend)
        assert got[2][0]._plan.key is not None
        _assert_same(ref_, got, f"cycle {cycle}")
        _unmerge_check(got, W0s, f"cycle {cycle}")
    assert MP.info()["hits"] == 2
