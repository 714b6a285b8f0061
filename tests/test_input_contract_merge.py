"""Input contract of merge_ / unmerge_ / merge_many_ / unmerge_many_ (issue 13): what is refused (the exception
names the culprit), that a refusal or a failure at ANY step changes nothing (every W bit for bit, W's version
counter, the records, the adapter storage, the plan cache), and that everything still works afterwards (a valid
merge + unmerge round trip is bit-exact).

Classes (counts in the report): outputs overlapping library-owned storage or live records; ids and lambdas of
every type and value; failures injected at every step of merge_many_ / unmerge_many_ (reference backend and
the Triton kernel in the interpreter, tiny shapes, two dtype groups so that a later launch can fail after an
earlier one wrote); a bounded hypothesis fuzz over the arguments. CPU tensors only."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_merge import adversarial_W, assert_bits_equal, make_weights

import lora_kernels as lk
from lora_kernels import reference
from lora_kernels.ops import merge as M
from lora_kernels.ops import merge_plan as MP
from lora_kernels.ops.merge import checks, dispatch
from lora_kernels.triton import merge as tmerge

_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}
STORAGE = ("a", "b", "offsets", "ranks", "scales", "slice_info")  # every tensor a LoRAWeights owns


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT[t.element_size()]) if t.is_floating_point() else t


@pytest.fixture(autouse=True)
def _fresh_cache():
    prev = MP.set_enabled(True)
    MP.clear()
    yield
    MP.set_enabled(prev)
    MP.clear()


def _state(Ws, ws, recs=()):
    """Everything a merge call could change: W bits and versions, the adapter storage and allocation, the
    records' fields, the plan cache's entries."""
    return dict(
        W=[bits(W).clone() for W in Ws], ver=[W._version for W in Ws],
        weights=[[bits(getattr(w, n)).clone() for n in STORAGE] + [dict(w._alloc), dict(w._host_ranks), w.version]
                 for w in ws],
        recs=[(r.used, r.version, r.escapes, r.code.clone(), r.escape_idx.clone(), bits(r.escape_val).clone())
              for r in recs],
        cache=[(k, id(e), tuple(sorted(e.tables, key=str))) for k, e in MP._cache.items()],
    )


def _assert_state(before, after, what=""):
    for i, (a, b) in enumerate(zip(before["W"], after["W"])):
        assert torch.equal(a, b), f"{what}: W[{i}] changed"
    assert before["ver"] == after["ver"], f"{what}: W versions {before['ver']} -> {after['ver']}"
    for i, (a, b) in enumerate(zip(before["weights"], after["weights"])):
        for n, x, y in zip(STORAGE + ("_alloc", "_host_ranks", "version"), a, b):
            same = torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
            assert same, f"{what}: weights[{i}].{n} changed"
    for i, (a, b) in enumerate(zip(before["recs"], after["recs"])):
        assert a[:3] == b[:3] and all(torch.equal(x, y) for x, y in zip(a[3:], b[3:])), f"{what}: record {i}"
    # the cache may only lose nothing and gain nothing (tables of a variant built by the failed call are fine)
    assert [k[:2] for k in before["cache"]] == [k[:2] for k in after["cache"]], f"{what}: plan cache changed"


def _round_trip(Ws, ws, adapters=(1, 0), lambdas=(0.5, -2.0), exact=True):
    """A valid merge + unmerge afterwards: W back bit for bit (exact)."""
    W0 = [W.clone() for W in Ws]
    recs = M.merge_many_(Ws, ws, list(adapters), list(lambdas), exact=exact)
    assert any(not torch.equal(bits(a), bits(b)) for a, b in zip(Ws, W0)), "the merge changed nothing"
    M.unmerge_many_(Ws, recs)
    if exact:
        for W, W_ in zip(Ws, W0):
            assert_bits_equal(W, W_, "round trip after the refusal")


def _one(dt=torch.float32, seed=70):
    w = make_weights(16, (8,), [4, 2], dt, seed=seed, max_adapters=4)
    return w, torch.randn(8, 16, generator=torch.Generator().manual_seed(seed)).to(dt)


# ---- class 1: outputs overlapping library-owned storage ------------------------------------------------------------
def _storage_view(w, name, shape, dt):
    """A tensor of ``shape`` / ``dt`` laid over the storage ``w.<name>`` (reinterpreted, as a hostile caller would)."""
    t = getattr(w, name)
    flat = t.reshape(-1).view(torch.uint8)
    n = shape[0] * shape[1] * torch.empty((), dtype=dt).element_size()
    assert flat.numel() >= n, (name, flat.numel(), n)
    return flat[:n].view(dt).view(shape)


@pytest.mark.parametrize("name", STORAGE)
def test_merge_into_adapter_storage_is_refused(name):
    """Ws[1] laid over any tensor a LoRAWeights of the call owns (a, b, offsets, ranks, scales, slice_info, read
    as floats, as a hostile caller would): was accepted, the merge rewrote what it read and the 'bit-exact'
    unmerge recomputed another delta."""
    g = torch.Generator().manual_seed(1)
    w = lk.LoRAWeights(4, 2, max_adapters=4, max_rank=2, dtype=torch.float32)
    w.add(torch.randn(2, 4, generator=g), torch.randn(2, 2, generator=g), alpha=2.0)
    small = lk.LoRAWeights(2, 1, max_adapters=2, max_rank=1, dtype=torch.float32)  # W [1, 2]: fits in every tensor
    small.add(torch.randn(1, 2, generator=g), torch.randn(1, 1, generator=g), alpha=1.0)
    W0 = torch.randn(2, 4, generator=g)
    W1 = _storage_view(w, name, (1, 2), torch.float32)
    Ws, ws = [W0, W1], [w, small]
    before = _state(Ws, ws)
    with pytest.raises(ValueError, match=rf"^Ws\[1\]: expected memory disjoint from weights\[0\]\.{name} "):
        M.merge_many_(Ws, ws, 0)
    _assert_state(before, _state(Ws, ws))
    _round_trip([W0, torch.randn(1, 2)], ws, [0], [0.5])


@pytest.mark.parametrize("name", ["a", "b"])
def test_merge_into_a_view_of_a_or_b_is_refused(name):
    """The issue's case: merge_(w.a[0, :out], w, ...) (and the same for b) broke the bit-exact unmerge."""
    w = make_weights(16, (16,), [4, 2], torch.float32, seed=4, max_adapters=4)
    W = w.a[0, :16] if name == "a" else w.b[:16]
    assert tuple(W.shape) == (16, 16) and W.is_contiguous()
    before = _state([W], [w])
    with pytest.raises(ValueError, match=rf"^W: expected memory disjoint from weights\.{name} "):
        M.merge_(W, w, [0, 1])
    _assert_state(before, _state([W], [w]))


@pytest.mark.parametrize("case", ["W_in_other_a", "W_in_other_b", "W_in_record_code", "W_in_record_escapes",
                                  "weights_under_live_W"])
def test_merge_overlapping_a_live_record_is_refused(case):
    """While a record is live (not unmerged), its unmerge will write its W and read its adapter storage and side
    data: a later merge may not write into those, nor read adapter rows that are such a W (was accepted: the
    first record's unmerge then changed the second record's adapter, or its own side data was overwritten)."""
    w1, _ = _one(seed=1)
    w2, _ = _one(seed=2)
    W1 = adversarial_W(torch.float32, (8, 16), seed=3)
    if case == "weights_under_live_W":  # W1 lies in w2's A storage, merged with w1 (w2 is not in that call)
        W1 = w2.a[0, 4:12]
        W1.copy_(adversarial_W(torch.float32, (8, 16), seed=3))
    rec1 = M.merge_(W1, w1, [0, 1], [1.0, -0.5])
    W1_merged = W1.clone()
    tiny = lk.LoRAWeights(2, 1, max_adapters=2, max_rank=1, dtype=torch.float32)
    tiny.add(torch.ones(1, 2), torch.ones(1, 1), alpha=1.0)
    W2, ws2 = torch.randn(8, 16), w2
    if case == "W_in_other_a":
        W2 = w1.a[0, 4:12]  # w1's rows are what rec1's unmerge reads; w1 is not part of this call
    elif case == "W_in_other_b":
        W2 = w1.b.reshape(-1)[: 8 * 16].view(8, 16)
    elif case == "W_in_record_code":
        W2, ws2 = rec1.code[:8].view(torch.float32).view(1, 2), tiny
    elif case == "W_in_record_escapes":
        assert rec1.escapes >= 1
        W2, ws2 = rec1.escape_idx[:1].view(torch.float32).view(1, 2), tiny
    before = _state([W1, W2], [w1, ws2], [rec1])
    pat = (r"^weights\.a: expected memory disjoint from the weight Ws\[0\] of a live MergeRecord"
           if case == "weights_under_live_W" else r"^W: expected memory disjoint from the (adapter storage|side data)")
    with pytest.raises(ValueError, match=pat):
        M.merge_(W2, ws2, 0)
    _assert_state(before, _state([W1, W2], [w1, ws2], [rec1]))
    assert torch.equal(bits(W1), bits(W1_merged))
    M.unmerge_(W1, rec1)  # the live record still restores W1 exactly
    assert torch.equal(bits(W1), bits(adversarial_W(torch.float32, (8, 16), seed=3)))
    Wn = torch.randn(8, 16)
    Wn0 = Wn.clone()
    M.unmerge_(Wn, M.merge_(Wn, w2, 0))  # and merging works afterwards
    assert_bits_equal(Wn, Wn0)


def test_unmerge_refuses_a_transposed_square_w():
    """unmerge_(W.t(), rec) of a square W: same pointer, shape, dtype and version (was accepted: the unmerge
    computed W.t() - delta and wrote garbage)."""
    w = make_weights(8, (8,), [3], torch.float32, seed=5)
    W = torch.randn(8, 8)
    W0 = W.clone()
    rec = M.merge_(W, w, 0)
    Wm = W.clone()
    with pytest.raises(ValueError, match=r"^W: expected the contiguous tensor the merge wrote"):
        M.unmerge_(W.t(), rec)
    assert_bits_equal(W, Wm)
    assert not rec.used
    M.unmerge_(W, rec)
    assert_bits_equal(W, W0)


def test_lone_tensor_or_weights_instead_of_lists_is_named():
    w, W = _one()
    with pytest.raises(TypeError, match=r"^Ws: expected a sequence of weight tensors"):
        M.merge_many_(W, [w], 0)  # was: "weights: expected 8 LoRAWeights (one per W)" (it iterated W's rows)
    with pytest.raises(TypeError, match=r"^weights: expected a sequence of LoRAWeights"):
        M.merge_many_([W], w, 0)
    rec = M.merge_(W, w, 0)
    with pytest.raises(TypeError, match=r"^records: expected a sequence of MergeRecords"):
        M.unmerge_many_([W], rec)
    M.unmerge_many_([W], [rec])


# ---- class 2: ids and lambdas --------------------------------------------------------------------------------------
BAD_LAMBDAS = [
    ("str", "1", TypeError), ("str_in_list", ["1"], TypeError), ("bytes", b"1", TypeError),
    ("bool", True, TypeError), ("bool_in_list", [False], TypeError), ("complex", 1j, TypeError),
    ("complex_in_list", [1 + 0j], TypeError), ("nan", float("nan"), ValueError), ("inf", float("inf"), ValueError),
    ("-inf_in_list", [float("-inf")], ValueError), ("np_nan", np.float64("nan"), ValueError),
    ("huge_int", 10**400, ValueError), ("coef_overflow", 1e300, ValueError), ("bool_tensor", torch.tensor(True),
                                                                               TypeError),
    ("nan_tensor", torch.tensor([float("nan")]), ValueError), ("complex_tensor", torch.tensor([1j]), TypeError),
    ("2d_tensor", torch.ones(1, 1), ValueError), ("none_in_list", [None], TypeError),
    ("dict", {0: 1.0}, TypeError), ("wrong_length", [1.0, 2.0], ValueError), ("meta_tensor",
                                                                              torch.ones(1, device="meta"), TypeError),
]


@pytest.mark.parametrize("name,lam,exc", BAD_LAMBDAS, ids=[c[0] for c in BAD_LAMBDAS])
def test_bad_lambdas_are_refused_naming_lambdas(name, lam, exc):
    w, W = _one()
    before = _state([W], [w])
    with pytest.raises(exc, match=r"^lambdas"):
        M.merge_(W, w, 0, lam)
    _assert_state(before, _state([W], [w]))
    _round_trip([W], [w])


GOOD_LAMBDAS = [("np_float32", np.float32(0.5)), ("np_float64", np.float64(0.5)), ("tensor_0d", torch.tensor(0.5)),
                ("tensor_1d", torch.tensor([0.5])), ("np_array", np.array([0.5])), ("np_0d", np.array(0.5)),
                ("int", 1), ("np_int", np.int64(1)), ("generator", (v for v in [0.5])),
                ("fp64_tensor", torch.tensor([0.5], dtype=torch.float64))]


@pytest.mark.parametrize("name,lam", GOOD_LAMBDAS, ids=[c[0] for c in GOOD_LAMBDAS])
def test_real_lambdas_of_any_type_merge_like_floats(name, lam):
    """numpy scalars, 0-dim and 1-D tensors and arrays are real numbers too (were refused, or 'iteration over a
    0-d tensor'); they merge bit-identically to the Python float."""
    w, W = _one()
    W0, Wf = W.clone(), W.clone()
    want = 1.0 if name in ("int", "np_int") else 0.5
    M.merge_(Wf, w, 0, want)
    rec = M.merge_(W, w, 0, lam)
    assert_bits_equal(W, Wf, name)
    M.unmerge_(W, rec)
    assert_bits_equal(W, W0, name)


BAD_IDS = [
    ("float", 1.0, TypeError), ("float_in_list", [1.0], TypeError), ("bool", True, TypeError),
    ("bool_in_list", [0, False], TypeError), ("str", "0", TypeError), ("none", None, TypeError),
    ("empty", [], ValueError), ("out_of_range", [0, 4], ValueError), ("negative", -1, ValueError),
    ("huge", 2**70, ValueError), ("np_huge", np.uint64(2**63), ValueError), ("free_slot", [3], ValueError),
    ("float_tensor", torch.tensor([0.0]), TypeError), ("bool_tensor", torch.tensor([True]), TypeError),
    ("2d_tensor", torch.zeros(1, 1, dtype=torch.int64), ValueError), ("float_array", np.array([1.0]), TypeError),
    ("dict", {0: 1}, TypeError), ("int64_tensor_out_of_range", torch.tensor([2**40]), ValueError),
]


@pytest.mark.parametrize("name,ids,exc", BAD_IDS, ids=[c[0] for c in BAD_IDS])
def test_bad_ids_are_refused_naming_adapters(name, ids, exc):
    w, W = _one()
    before = _state([W], [w])
    with pytest.raises(exc, match=r"^adapters"):
        M.merge_many_([W], [w], ids)
    _assert_state(before, _state([W], [w]))
    _round_trip([W], [w])


GOOD_IDS = [("np_int64", np.int64(1)), ("np_int32_list", [np.int32(1)]), ("tensor_0d", torch.tensor(1)),
            ("tensor_1d", torch.tensor([1, 0])), ("int32_tensor", torch.tensor([1, 0], dtype=torch.int32)),
            ("np_array", np.array([1, 0])), ("tuple", (1, 0)), ("range", range(1, -1, -1)),
            ("duplicate", [1, 1])]


@pytest.mark.parametrize("name,ids", GOOD_IDS, ids=[c[0] for c in GOOD_IDS])
def test_integer_ids_of_any_type_merge_like_ints(name, ids):
    """Integer ids of every integer type are read as Python ints before any narrowing (numpy ints and tensors
    were refused); a duplicate id is two terms of the sum (documented), restored exactly."""
    w, W = _one()
    W0, Wi = W.clone(), W.clone()
    plain = [1, 1] if name == "duplicate" else ([1] if name in ("np_int64", "np_int32_list", "tensor_0d") else [1, 0])
    lams = [0.5] * len(plain)
    M.merge_(Wi, w, plain, lams)
    rec = M.merge_(W, w, ids, lams)
    assert rec.adapters == tuple(plain) and all(type(j) is int for j in rec.adapters)
    assert_bits_equal(W, Wi, name)
    M.unmerge_(W, rec)
    assert_bits_equal(W, W0, name)


@pytest.mark.parametrize("exact", ["no", 1, None, np.bool_(True)])
def test_exact_must_be_a_bool(exact):
    w, W = _one()
    before = _state([W], [w])
    with pytest.raises(TypeError, match=r"^exact: expected a bool"):  # was: the custom op's schema error
        M.merge_(W, w, 0, exact=exact)
    _assert_state(before, _state([W], [w]))


# ---- class 3: failures injected at every step -----------------------------------------------------------------
class Injected(Exception):
    pass


def _layers():
    """Three layers, two dtype groups (two launches on Triton), one with in % 4 != 0 (codes packed after the
    launch), adversarial W (escapes in every layer)."""
    specs = [(16, (8,), torch.float16), (12, (8,), torch.float32), (10, (6,), torch.float16)]
    ws = [make_weights(i, o, [2, 3], dt, seed=k, scale_b=0.3) for k, (i, o, dt) in enumerate(specs)]
    W0 = [adversarial_W(dt, (w.out_features, w.in_features), seed=20 + k)
          for k, ((_, _, dt), w) in enumerate(zip(specs, ws))]
    return ws, W0


MERGE_STEPS = [(checks, "_plan_many"), (checks, "_check_live"), (checks, "_new_records"), (MP, "store"),
               (checks, "_register_live"), (dispatch, "_tables"), (tmerge, "launch_merge_grouped"),
               (reference, "merge_delta"), (reference, "pack_codes"), (reference, "escape_indices"),
               (dispatch, "_escape_merged_values"), (dispatch, "_scatter"), (dispatch, "_split_outs"),
               (dispatch, "_merged_nonfinite")]
UNMERGE_STEPS = [(dispatch, "_tables"), (tmerge, "launch_merge_grouped"), (reference, "merge_delta"),
                 (reference, "unpack_codes"), (dispatch, "_scatter")]
# (internal steps an implementation does not have are skipped: the same tests run against older code)
MERGE_STEPS = [(m, a) for m, a in MERGE_STEPS if hasattr(m, a)]
UNMERGE_STEPS = [(m, a) for m, a in UNMERGE_STEPS if hasattr(m, a)]
ARGS = ([1, 0], [0.5, -2.0])


def _count_calls(monkeypatch, steps, fn):
    """How many times ``fn()`` calls each step."""
    counts = {}
    for mod, attr in steps:
        orig = getattr(mod, attr)

        def wrap(*a, _o=orig, _k=(mod, attr), **k):
            counts[_k] = counts.get(_k, 0) + 1
            return _o(*a, **k)

        monkeypatch.setattr(mod, attr, wrap)
    try:
        fn()
    finally:
        monkeypatch.undo()
    return counts


def _failing(monkeypatch, mod, attr, k, fn) -> bool:
    """Run ``fn()`` with the k-th call of ``mod.attr`` raising Injected; True when it did raise."""
    orig = getattr(mod, attr)
    n = [0]

    def f(*a, **kw):
        n[0] += 1
        if n[0] == k:
            raise Injected(f"{attr} call {k}")
        return orig(*a, **kw)

    monkeypatch.setattr(mod, attr, f)
    try:
        fn()
    except Injected:
        return True
    finally:
        monkeypatch.undo()
    return False


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "approx"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_merge_many_failure_at_every_step_changes_nothing(monkeypatch, backend, exact):
    """The k-th call of every step raises (cold plan and warm plan): every W bit for bit and its version, the
    adapter storage and the plan cache are as before; a valid round trip is still bit-exact."""
    ws, W0 = _layers()
    Ws = [W.clone() for W in W0]  # persistent: the warm plan is keyed by their pointers

    def reset(cold):
        for W, W_ in zip(Ws, W0):
            W.copy_(W_)
        if cold:
            MP.clear()
        elif not MP._cache:
            M.unmerge_many_(Ws, M.merge_many_(Ws, ws, *ARGS, exact=exact))

    def merge():
        M.merge_many_(Ws, ws, *ARGS, exact=exact)

    tried = {}
    with lk.backends.use_backend(backend):
        for cold in (True, False):
            reset(cold)
            counts = _count_calls(monkeypatch, MERGE_STEPS, merge)
            for (mod, attr) in MERGE_STEPS:
                for k in range(1, counts.get((mod, attr), 0) + 1):
                    reset(cold)
                    before = _state(Ws, ws)
                    assert _failing(monkeypatch, mod, attr, k, merge), (attr, k)
                    _assert_state(before, _state(Ws, ws), f"{backend} {attr} call {k} ({'cold' if cold else 'warm'})")
                    tried[attr] = tried.get(attr, 0) + 1
        reset(True)
        _round_trip(Ws, ws, *ARGS, exact=exact)
    print(f"\n{backend} exact={exact}: {sum(tried.values())} injected merge failures, nothing changed: {tried}")
    assert sum(tried.values()) >= 12


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "approx"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_unmerge_many_failure_at_every_step_changes_nothing(monkeypatch, backend, exact):
    """A failed unmerge leaves every layer merged (bit for bit, same version), the records unused and usable:
    unmerging them afterwards restores W exactly."""
    ws, W0 = _layers()
    tried = {}
    with lk.backends.use_backend(backend):
        Ws = [W.clone() for W in W0]
        recs = M.merge_many_(Ws, ws, *ARGS, exact=exact)
        counts = _count_calls(monkeypatch, UNMERGE_STEPS, lambda: M.unmerge_many_(Ws, recs))
        for (mod, attr) in UNMERGE_STEPS:
            for k in range(1, counts.get((mod, attr), 0) + 1):
                Ws = [W.clone() for W in W0]
                recs = M.merge_many_(Ws, ws, *ARGS, exact=exact)
                before = _state(Ws, ws, recs)
                assert _failing(monkeypatch, mod, attr, k, lambda: M.unmerge_many_(Ws, recs)), (attr, k)  # noqa: B023
                _assert_state(before, _state(Ws, ws, recs), f"{backend} unmerge {attr} call {k}")
                tried[attr] = tried.get(attr, 0) + 1
                M.unmerge_many_(Ws, recs)  # the records still work
                if exact:
                    for W, W_ in zip(Ws, W0):
                        assert_bits_equal(W, W_, f"unmerge after injected {attr} #{k}")
    print(f"\n{backend} exact={exact}: {sum(tried.values())} injected unmerge failures, nothing changed: {tried}")
    assert sum(tried.values()) >= 2


def test_warning_turned_into_error_rolls_back():
    """merge_ warns when it makes finite weights non-finite; under ``warnings.simplefilter('error')`` the warning
    is an exception raised after the write (was: W merged, no record returned: unrecoverable)."""
    w = lk.LoRAWeights(16, 8, max_adapters=2, max_rank=2, dtype=torch.float16)
    g = torch.Generator().manual_seed(0)
    w.add(torch.randn(2, 16, generator=g).half() * 100, torch.randn(8, 2, generator=g).half() * 100, alpha=2.0)
    W = torch.full((8, 16), 6e4, dtype=torch.float16)  # near fp16's max: the delta overflows to inf
    before = _state([W], [w])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="became NaN/Inf"):
            M.merge_(W, w, 0, 100.0)
    _assert_state(before, _state([W], [w]))
    with pytest.warns(RuntimeWarning):
        rec = M.merge_(W, w, 0, 100.0)
    M.unmerge_(W, rec)
    assert torch.equal(bits(W), before["W"][0])


# ---- class 4: fuzz ------------------------------------------------------------------------------------------------
_BAD = {
    "W": [lambda w, W: w.a[0, :8], lambda w, W: W.t().contiguous().t(), lambda w, W: torch.zeros(8, 16,
                                                                                                dtype=torch.int32),
          lambda w, W: W[:4], lambda w, W: "W", lambda w, W: W.to(torch.float64)],
    "adapters": [1.0, True, "0", [], [0, 9], -1, 2**65, [0, None], torch.tensor([0.5]), np.array([[0]]), [3]],
    "lambdas": ["1", True, 1j, float("nan"), float("inf"), 1e300, 10**400, [1.0, 2.0, 3.0], torch.tensor(True),
                [None], np.float64("-inf")],
    "exact": ["yes", 1, None],
}


@settings(max_examples=50, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(culprit=st.sampled_from(["none", "W", "adapters", "lambdas", "exact"]), pick=st.integers(0, 10),
       lam=st.floats(-4, 4, allow_nan=False), ids=st.sampled_from([0, 1, [0, 1], [1, 0], [1, 1]]),
       exact=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_fuzz_merge_arguments(culprit, pick, lam, ids, exact, dtype):
    """One argument bad at a time (or none): the exception is a TypeError/ValueError whose message starts with
    that argument's name, nothing changed, and a valid merge + unmerge is still bit-exact."""
    w, W = _one(dtype, seed=pick)
    n = 1 if isinstance(ids, int) else len(ids)
    kw = dict(W=W, adapters=ids, lambdas=[lam] * n if n > 1 else lam, exact=exact)
    if culprit != "none":
        bad = _BAD[culprit][pick % len(_BAD[culprit])]
        kw[culprit] = bad(w, W) if culprit == "W" else bad
        if culprit == "adapters":
            kw["lambdas"] = None  # (a bad id list may have another length: the lambdas would be wrong too)
    before = _state([W], [w])
    if culprit == "none":
        W0 = W.clone()
        rec = M.merge_(kw["W"], w, kw["adapters"], kw["lambdas"], exact=kw["exact"])
        M.unmerge_(W, rec)
        if exact:
            assert_bits_equal(W, W0)
        return
    with pytest.raises((TypeError, ValueError)) as ei:
        M.merge_(kw["W"], w, kw["adapters"], kw["lambdas"], exact=kw["exact"])
    assert ei.value.args[0].split(":")[0] == culprit, (culprit, ei.value)
    _assert_state(before, _state([W], [w]))
    W0 = W.clone()
    M.unmerge_(W, M.merge_(W, w, [0, 1], [lam, 0.25]))
    assert_bits_equal(W, W0)
