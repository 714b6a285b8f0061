"""Input contract of the federated aggregation, the server optimisers and adapter fusion (issue 13): numeric
arguments are finite real numbers in documented ranges (any real type; never bool, str or complex), integers
where integers, valid but large aggregation weights work (exact normalisation), refusals name the argument and
change nothing, and a failing optimiser step (refused, or raising half-way) leaves params, moments and the round
counter as they were. Bounded hypothesis fuzz (deterministic) over weights and optimiser arguments."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_kernels.federated as fed
from lora_kernels import fusion

F64 = torch.float64


def clients(ranks=(2, 3), dtype=torch.float32, scales=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, r in enumerate(ranks):
        s = 0.5 if scales is None else scales[k]
        out.append({"q": (torch.randn(r, 6, generator=g).to(dtype), torch.randn(5, r, generator=g).to(dtype), s),
                    "o": (torch.randn(r, 4, generator=g).to(dtype), torch.randn(3, r, generator=g).to(dtype), s)})
    return out


def snapshot(cl):
    return [{n: (v[0].clone(), v[1].clone()) for n, v in c.items()} for c in cl]


def unchanged(cl, snap):
    return all(torch.equal(c[n][0], s[n][0]) and torch.equal(c[n][1], s[n][1]) for c, s in zip(cl, snap) for n in c)


def same_aggregate(a, b):
    return all(torch.equal(a[n].A, b[n].A) and torch.equal(a[n].B, b[n].B) and a[n].scale == b[n].scale for n in a)


AGGS = {
    "stack": lambda c, w, **k: fed.stack(c, w, **k),
    "fedavg": lambda c, w, **k: fed.fedavg(c, w, **k),
    "stack_svd": lambda c, w, **k: fed.stack_svd(c, 2, w, **k),
}


# ---- class: valid but large (or tiny) weights ---------------------------------------------------------------------
LARGE = [
    ("1e308_each", [1e308, 1e308], [1.0, 1.0]),  # the float64 sum overflows (was: OverflowError in fsum)
    ("np_1e308", np.array([1e308, 1e308]), [1.0, 1.0]),
    ("ints_beyond_float64", [10**400, 10**400], [1, 1]),  # sample counts as Python ints (was: OverflowError)
    ("int_mix", [2**80, 2**81], [1, 2]),
    ("fp32_tensor_3e38", torch.tensor([3e38, 3e38]), [1.0, 1.0]),
    ("subnormal", [5e-324, 1e-323], [1.0, 2.0]),
    ("1e30_and_3e38", [1e30 * 2.0**10, 1e30 * 2.0**11], [1.0, 2.0]),
]


@pytest.mark.parametrize("agg", sorted(AGGS))
@pytest.mark.parametrize("name,big,small", LARGE, ids=[c[0] for c in LARGE])
def test_valid_large_weights_work_exactly(name, big, small, agg):
    """Weights scaled by a common factor give the same aggregate bit for bit (p_k is the correctly rounded
    w_k / sum(w), computed exactly), however large or small the weights."""
    cl = clients()
    snap = snapshot(cl)
    got, want = AGGS[agg](cl, big), AGGS[agg](cl, small)
    assert same_aggregate(got, want), name
    assert unchanged(cl, snap)


def test_client_weights_are_correctly_rounded_quotients():
    w = [1, 2, 3, 2**60 + 1, 0.1, np.float32(0.3)]
    exact = [Fraction(int(x)) if isinstance(x, int) else Fraction(float(x)) for x in w]
    want = [float(x / sum(exact)) for x in exact]
    assert fed.adapters.check_client_weights(w, len(w)) == want
    assert fed.adapters.check_client_weights(torch.tensor([1.0, 3.0], dtype=torch.float16), 2) == [0.25, 0.75]


# ---- class: bad weights, named -----------------------------------------------------------------------------------
BAD_WEIGHTS = [
    ("bool", [True, 1.0], TypeError), ("str", ["1", 1.0], TypeError), ("complex", [1j, 1.0], TypeError),
    ("none", [None, 1.0], TypeError), ("nan", [float("nan"), 1.0], ValueError), ("inf", [float("inf"), 1.0],
                                                                               ValueError),
    ("negative", [-1.0, 2.0], ValueError), ("zero_sum", [0, 0.0], ValueError), ("length", [1.0], ValueError),
    ("bool_tensor", torch.tensor([True, True]), TypeError), ("complex_tensor", torch.tensor([1j, 1j]), TypeError),
    ("meta_tensor", torch.ones(2, device="meta"), TypeError), ("2d_tensor", torch.ones(1, 2), TypeError),
    ("dict", {0: 1.0, 1: 1.0}, TypeError), ("str_whole", "11", TypeError), ("np_nan", np.array([np.nan, 1.0]),
                                                                              ValueError),
    ("neg_huge_int", [-(10**400), 1], ValueError),
]


@pytest.mark.parametrize("agg", sorted(AGGS))
@pytest.mark.parametrize("name,w,exc", BAD_WEIGHTS, ids=[c[0] for c in BAD_WEIGHTS])
def test_bad_weights_are_refused_naming_weights(name, w, exc, agg):
    cl = clients()
    snap = snapshot(cl)
    with pytest.raises(exc, match=r"^weights: expected"):
        AGGS[agg](cl, w)
    assert unchanged(cl, snap)
    AGGS[agg](cl, [1.0, 2.0])  # still works


# ---- class: scales, ranks, targets, methods ----------------------------------------------------------------------
@pytest.mark.parametrize("scale,exc", [(True, TypeError), ("2", TypeError), (1j, TypeError), (None, TypeError),
                                       (float("nan"), ValueError), (10**400, ValueError)],
                         ids=["bool", "str", "complex", "none", "nan", "huge_int"])
def test_bad_scales_are_refused_naming_the_scale(scale, exc):
    cl = clients()
    cl[1]["o"] = (cl[1]["o"][0], cl[1]["o"][1], scale)  # (True used to be read as 1.0)
    with pytest.raises(exc, match=r"^clients\[1\]\['o'\]\.scale: expected"):
        fed.stack(cl)


@pytest.mark.parametrize("scale", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), 1])
def test_real_scales_of_any_type(scale):
    cl = clients()
    ref = fed.stack(cl)
    cl = clients()
    for c in cl:
        for n in c:
            c[n] = (c[n][0], c[n][1], scale)
    got = fed.stack(cl)
    if float(scale) == 0.5:
        assert same_aggregate(got, ref)


def test_coefficient_overflowing_fp32_is_refused_and_fp64_works():
    """A scale of 1e39 with fp32 factors would give inf factors (was accepted: inf in the aggregate)."""
    cl = clients(scales=[0.5, 1e39])
    snap = snapshot(cl)
    for agg in AGGS:
        with pytest.raises(ValueError, match=r"^clients\[1\]\['(q|o)'\]\.scale: expected \|weight \* scale\|"):
            AGGS[agg](cl, None)
    assert unchanged(cl, snap)
    out = fed.stack(cl, compute_dtype=F64)
    assert all(bool(torch.isfinite(out[n].A).all()) for n in out)
    glob = fed.stack(clients(), compute_dtype=torch.float32)
    glob = {n: (f.A, f.B, 1e39) for n, f in glob.items()}
    with pytest.raises(ValueError, match=r"^global_adapter\['(q|o)'\]\.scale"):
        fed.redistribute(glob, [2])


@pytest.mark.parametrize("rank,exc", [(True, TypeError), (2.0, TypeError), ("2", TypeError), (0, ValueError),
                                      (None, TypeError)], ids=["bool", "float", "str", "zero", "none"])
def test_stack_svd_rank_is_an_integer(rank, exc):
    with pytest.raises(exc, match=r"^rank: expected"):
        fed.stack_svd(clients(), rank)


def test_integer_ranks_and_targets_of_any_integer_type():
    cl = clients()
    a, b = fed.stack_svd(cl, np.int64(2)), fed.stack_svd(cl, 2)  # (np.int64 was refused)
    assert same_aggregate(a, b)
    glob = fed.stack(cl)
    r1, r2 = fed.redistribute(glob, [np.int32(2), torch.tensor(1)]), fed.redistribute(glob, [2, 1])
    assert all(same_aggregate(x, y) for x, y in zip(r1, r2))


@pytest.mark.parametrize("t,exc", [(1.0, TypeError), (True, TypeError), (0, ValueError), ("2", TypeError)],
                         ids=["float", "bool", "zero", "str"])
def test_redistribute_targets_named(t, exc):
    glob = fed.stack(clients())
    with pytest.raises(exc, match=r"^targets\[1\]"):
        fed.redistribute(glob, [2, t])


@pytest.mark.parametrize("method", [["qr"], None, 3, "QR"])
def test_method_must_be_a_known_string(method):
    with pytest.raises(ValueError, match=r"^method: expected"):
        fed.stack_svd(clients(), 2, method=method)
    with pytest.raises(ValueError, match=r"^method: expected"):
        fed.redistribute(fed.stack(clients()), [2], method=method)


def test_distributed_single_process_large_and_bad_weights(tmp_path):
    """fed.distributed.aggregate in a world of one (gloo): 1e308 weights normalise (was: OverflowError in fsum
    on the dense route), an int beyond float64 is a ValueError naming weights raised through the header
    protocol (was: OverflowError on one process before the collective: the others would hang)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cl = clients(dtype=F64)
        for route in ("dense", "factors"):
            got = fed.distributed.aggregate(cl, "stack", weights=[1e308, 1e308], route=route)
            want = fed.distributed.aggregate(cl, "stack", weights=[1.0, 1.0], route=route)
            for n in got:
                assert torch.equal(got[n].B @ got[n].A, want[n].B @ want[n].A), (route, n)
        with pytest.raises(ValueError, match=r"^weights: expected values that float64 holds"):
            fed.distributed.aggregate(cl, "stack", weights=[10**400, 1])
        with pytest.raises(TypeError, match=r"^weights: expected None or a sequence of numbers"):
            fed.distributed.aggregate(cl, "stack", weights=[True, 1])
    finally:
        dist.destroy_process_group()


# ---- class: optimiser hyperparameters -------------------------------------------------------------------------
HYPER = [
    ("FedAvgM", dict(lr=True), TypeError, "lr"), ("FedAvgM", dict(lr="1"), TypeError, "lr"),
    ("FedAvgM", dict(lr=float("nan")), ValueError, "lr"), ("FedAvgM", dict(lr=0.0), ValueError, "lr"),
    ("FedAvgM", dict(lr=-1), ValueError, "lr"), ("FedAvgM", dict(beta=1.0), ValueError, "beta"),
    ("FedAvgM", dict(beta="0.5"), TypeError, "beta"), ("FedAvgM", dict(beta=True), TypeError, "beta"),
    ("FedAvgM", dict(beta=float("nan")), ValueError, "beta"),
    ("FedAdam", dict(betas=("0.9", 0.9)), TypeError, r"betas\[0\]"),
    ("FedAdam", dict(betas=(0.9, float("nan"))), ValueError, r"betas\[1\]"),
    ("FedAdam", dict(betas=(True, 0.5)), TypeError, r"betas\[0\]"), ("FedAdam", dict(betas=(0.9,)), TypeError, "betas"),
    ("FedAdam", dict(betas="ab"), TypeError, "betas"), ("FedYogi", dict(tau=True), TypeError, "tau"),
    ("FedYogi", dict(tau=0.0), ValueError, "tau"), ("FedAdagrad", dict(tau=float("inf")), ValueError, "tau"),
    ("FedAdagrad", dict(tau=1e200), ValueError, "tau"),  # tau**2 overflows (was: OverflowError, unnamed)
    ("FedAdam", dict(tau=1e20), ValueError, "tau"),  # tau**2 = 1e40: inf in the fp32 v (was: accepted)
]


@pytest.mark.parametrize("kind,kw,exc,name", HYPER, ids=[f"{k}-{list(kw)[0]}-{i}" for i, (k, kw, _, _) in
                                                          enumerate(HYPER)])
def test_optimizer_hyperparameters_are_checked(kind, kw, exc, name):
    p = [torch.zeros(3)]
    with pytest.raises(exc, match=rf"^{name}: expected"):
        getattr(fed, kind)(p, **kw)
    assert not p[0].any()


@pytest.mark.parametrize("kind", ["FedAvgM", "FedAdam"])
def test_optimizer_hyperparameters_of_any_real_type(kind):
    a = getattr(fed, kind)([torch.zeros(3)], lr=np.float32(0.5))
    b = getattr(fed, kind)([torch.zeros(3)], lr=0.5)
    d = [torch.tensor([1.0, -2.0, 3.0])]
    a.step(d)
    b.step(d)
    assert torch.equal(a.params[0], b.params[0])


# ---- class: optimiser state after a refused or failed step -------------------------------------------------------
def _opt_state(opt):
    return ([p.clone() for p in opt.params], {k: [t.clone() for t in v] for k, v in opt.state.items()}, opt.rounds)


def _assert_opt_state(opt, before, what=""):
    ps, st_, rounds = before
    assert opt.rounds == rounds, what
    for p, q in zip(opt.params, ps):
        assert torch.equal(p, q), f"{what}: params changed"
    assert sorted(opt.state) == sorted(st_), what
    for k in st_:
        for t, u in zip(opt.state[k], st_[k]):
            assert torch.equal(t, u), f"{what}: state {k} changed"


KINDS = ["FedAvgM", "FedAdagrad", "FedYogi", "FedAdam"]


def _warm(kind, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    params = {"a": torch.randn(4, 3, generator=g).to(dtype), "b": torch.randn(5, generator=g).to(dtype)}
    opt = getattr(fed, kind)(params, lr=0.1)
    opt.step({k: torch.randn(v.shape, generator=g).to(dtype) * 0.1 for k, v in params.items()})  # non-trivial state
    return opt, g


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["nan", "inf", "fp64_overflow", "fp16_square_overflow", "wrong_shape",
                                  "int_tensor", "missing_key"])
def test_refused_step_changes_nothing(kind, case):
    dtype = torch.float16 if case == "fp16_square_overflow" else torch.float32
    opt, g = _warm(kind, dtype)
    d = {k: torch.randn(v.shape, generator=g).to(dtype) * 0.1 for k, v in zip(opt.keys, opt.params)}
    exc, pat = ValueError, r"^pseudo_grad"
    if case == "nan":
        d["b"][1] = float("nan")  # (was: accepted, the params became NaN)
    elif case == "inf":
        d["a"][0, 0] = float("inf")
    elif case == "fp64_overflow":
        d["a"] = d["a"].double()
        d["a"][0, 0] = 1e300  # inf once cast to the params' fp32
    elif case == "fp16_square_overflow":
        d["a"][0, 0] = 300.0  # delta**2 = 9e4 > fp16 max: v would be inf (FedAvgM has no v: lr*m is fine)
    elif case == "wrong_shape":
        d["a"] = d["a"][:2]
    elif case == "int_tensor":
        d["b"], exc = d["b"].long(), TypeError
    elif case == "missing_key":
        del d["b"]
    before = _opt_state(opt)
    if case == "fp16_square_overflow" and kind == "FedAvgM":
        opt.step(d)
        assert opt.rounds == before[2] + 1
        return
    with pytest.raises(exc, match=pat):
        opt.step(d)
    _assert_opt_state(opt, before, case)
    ok = {k: torch.full(v.shape, 0.01, dtype=dtype) for k, v in zip(opt.keys, opt.params)}
    opt.step(ok)  # still works
    assert opt.rounds == before[2] + 1


_FOREACH = ["_foreach_mul", "_foreach_mul_", "_foreach_add", "_foreach_add_", "_foreach_sub", "_foreach_sqrt",
            "_foreach_addcdiv", "_foreach_addcdiv_", "_foreach_sign", "_foreach_copy_"]


class Injected(Exception):
    pass


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("towards", [False, True], ids=["step", "step_towards"])
def test_step_failing_at_every_operation_changes_nothing(monkeypatch, kind, towards):
    """The k-th torch._foreach_* call of a step raises: params, m, v and rounds stay as they were (was: m
    updated in place before v, v before the params), and the next step gives what an untroubled one gives."""
    opt, g = _warm(kind)
    d = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in zip(opt.keys, opt.params)}

    def run(o):
        if towards:
            o.step_towards({k: p + d[k] for k, p in zip(o.keys, o.params)})
        else:
            o.step(d)

    ref, _ = _warm(kind)  # (the same state as opt: the same seed)
    counts = {}
    for name in _FOREACH:
        if hasattr(torch, name):
            orig = getattr(torch, name)
            monkeypatch.setattr(torch, name, lambda *a, _o=orig, _n=name, **k: (counts.__setitem__(
                _n, counts.get(_n, 0) + 1), _o(*a, **k))[1])
    run(ref)
    monkeypatch.undo()
    tried = 0
    for name, n in counts.items():
        for k in range(1, n + 1):
            before = _opt_state(opt)
            orig = getattr(torch, name)
            calls = [0]

            def f(*a, _o=orig, _k=k, **kw):
                calls[0] += 1  # noqa: B023 (called within this iteration)
                if calls[0] == _k:  # noqa: B023
                    raise Injected(name)  # noqa: B023
                return _o(*a, **kw)

            monkeypatch.setattr(torch, name, f)
            with pytest.raises(Injected):
                run(opt)
            monkeypatch.undo()
            _assert_opt_state(opt, before, f"{kind} {name} call {k}")
            tried += 1
    run(opt)
    for p, q in zip(opt.params, ref.params):
        assert torch.equal(p, q)
    assert tried >= 4 and opt.rounds == 2
    print(f"\n{kind} {'step_towards' if towards else 'step'}: {tried} injected failures, state unchanged: {counts}")


def test_step_with_pseudo_grad_aliasing_params():
    a = fed.FedAdam([torch.ones(3)], lr=0.1)
    b = fed.FedAdam([torch.ones(3)], lr=0.1)
    a.step(a.params)  # read whole before the params are written
    b.step([torch.ones(3)])
    assert torch.equal(a.params[0], b.params[0]) and torch.equal(a.state["v"][0], b.state["v"][0])


# ---- fedprox -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mu,exc", [(True, TypeError), ("1", TypeError), (float("nan"), ValueError), (-1, ValueError),
                                    (1j, TypeError)], ids=["bool", "str", "nan", "negative", "complex"])
def test_fedprox_mu(mu, exc):
    with pytest.raises(exc, match=r"^mu: expected"):
        fed.fedprox_term([torch.zeros(2)], [torch.zeros(2)], mu)


def test_fedprox_tensors_named():
    with pytest.raises(TypeError, match=r"^params\[0\]: expected a floating-point tensor"):
        fed.fedprox_term([torch.zeros(2, dtype=torch.int64)], [torch.zeros(2)], 1.0)  # (was: accepted)
    with pytest.raises(TypeError, match=r"^global_params\[0\]: expected a tensor with data"):
        fed.fedprox_term([torch.zeros(2)], [torch.zeros(2, device="meta")], 1.0)  # (was: NotImplementedError)
    assert float(fed.fedprox_term([torch.ones(2)], [torch.zeros(2)], np.float32(2.0))) == 2.0


# ---- fusion ------------------------------------------------------------------------------------------------------
def _ads():
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(r, 6, generator=g), torch.randn(5, r, generator=g), 0.5) for r in (2, 3)]


FUSION_BAD = [
    ("ta_lambda_str", lambda a: fusion.task_arithmetic(a, "1"), TypeError, "lambdas"),
    ("ta_lambda_bool_tensor", lambda a: fusion.task_arithmetic(a, torch.tensor(True)), TypeError, "lambdas"),
    ("ta_lambda_bool", lambda a: fusion.task_arithmetic(a, [True, 1.0]), TypeError, "lambdas"),
    ("ta_lambda_overflow", lambda a: fusion.task_arithmetic(a, 1e300), ValueError, "lambdas"),
    ("ta_lambda_nan", lambda a: fusion.task_arithmetic(a, [1.0, float("nan")]), ValueError, "lambdas"),
    ("ta_rank_float", lambda a: fusion.task_arithmetic(a, 1.0, rank=2.0), TypeError, "rank"),
    ("ta_rank_bool", lambda a: fusion.task_arithmetic(a, 1.0, rank=True), TypeError, "rank"),
    ("ta_rank_str", lambda a: fusion.task_arithmetic(a, 1.0, rank="full"), ValueError, "rank"),
    ("ta_chunk_float", lambda a: fusion.task_arithmetic(a, 1.0, chunk_rows=2.5), TypeError, "chunk_rows"),
    ("ties_density_str", lambda a: fusion.ties(a, "0.5"), TypeError, "density"),
    ("ties_density_bool", lambda a: fusion.ties(a, True), TypeError, "density"),
    ("ties_density_nan", lambda a: fusion.ties(a, float("nan")), ValueError, "density"),
    ("ties_lambda_overflow", lambda a: fusion.ties(a, 0.5, [1.0, 1e300]), ValueError, "lambdas"),
    ("keep_count_float_numel", lambda a: fusion.ties_keep_count(0.5, 10.0), ValueError, "numel"),
    ("linearize_scale_str", lambda a: fusion.linearize(a[0][0], a[0][1], a[0][0], a[0][1], "1"), TypeError, "scale"),
    ("linearize_scale_huge", lambda a: fusion.linearize(a[0][0], a[0][1], a[0][0], a[0][1], 10**400), ValueError,
     "scale"),
    ("group_floors_str", lambda a: fusion.group_tasks(a, lambda f, t: [1.0] * len(t), ["0.5", 0.5]), TypeError,
     "floors"),
    ("group_floors_bool", lambda a: fusion.group_tasks(a, lambda f, t: [1.0] * len(t), [True, 0.5]), TypeError,
     "floors"),
    ("group_evaluate_str", lambda a: fusion.group_tasks(a, lambda f, t: ["1"] * len(t), 0.5), TypeError,
     "evaluate"),
    ("group_order_floats", lambda a: fusion.group_tasks(a, lambda f, t: [1.0] * len(t), 0.5, order=[1.0, 0.0]),
     TypeError, "order"),
]


@pytest.mark.parametrize("name,fn,exc,arg", FUSION_BAD, ids=[c[0] for c in FUSION_BAD])
def test_fusion_arguments_named_and_inputs_unchanged(name, fn, exc, arg):
    ads = _ads()
    before = [(A.clone(), B.clone()) for A, B, _ in ads]
    with pytest.raises(exc, match=rf"^{arg}: expected"):
        fn(ads)
    assert all(torch.equal(A, A0) and torch.equal(B, B0) for (A, B, _), (A0, B0) in zip(ads, before))


def test_fusion_real_and_integer_arguments_of_any_type():
    ads = _ads()
    ref = fusion.task_arithmetic(ads, [0.5, 2.0], rank=2, chunk_rows=2)
    got = fusion.task_arithmetic(ads, np.array([0.5, 2.0]), rank=np.int64(2), chunk_rows=torch.tensor(2))
    assert torch.equal(ref.A, got.A) and torch.equal(ref.B, got.B)
    assert torch.equal(fusion.ties(ads, 0.5), fusion.ties(ads, np.float32(0.5)))
    assert torch.equal(fusion.ties(ads, 0.5), fusion.ties(ads, torch.tensor(0.5, dtype=F64)))
    big = fusion.task_arithmetic([(A.double(), B.double(), s) for A, B, s in ads], 1e300)  # fp64 holds 1e300 * 0.5
    assert bool(torch.isfinite(big).all())


# ---- fuzz ------------------------------------------------------------------------------------------------------
_weight_item = st.one_of(
    st.floats(min_value=0, max_value=1.7e308, allow_nan=False), st.integers(0, 10**400),
    st.sampled_from([float("nan"), float("inf"), -1.0, -(10**30), True, "1", None, 1j, np.float32(2.5),
                     np.int64(7)]))


def _valid_weight(w):
    if isinstance(w, (bool, str, complex)) or w is None:
        return False
    return (isinstance(w, (int, np.integer)) or math.isfinite(float(w))) and w >= 0


@settings(max_examples=50, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(ws=st.lists(_weight_item, min_size=2, max_size=2), agg=st.sampled_from(sorted(AGGS)))
def test_fuzz_weights(ws, agg):
    """Any weights: either the exact normalisation is used (the aggregate equals the one with the rounded
    quotients given directly) or the exception names ``weights``; the clients never change."""
    cl = clients(dtype=F64)
    snap = snapshot(cl)
    valid = all(_valid_weight(w) for w in ws) and sum(
        Fraction(int(w)) if isinstance(w, (int, np.integer)) else Fraction(float(w)) for w in ws) > 0
    if valid:
        exact = [Fraction(int(w)) if isinstance(w, (int, np.integer)) else Fraction(float(w)) for w in ws]
        p = [float(x / sum(exact)) for x in exact]
        assert same_aggregate(AGGS[agg](cl, ws), AGGS[agg](cl, p))
    else:
        with pytest.raises((TypeError, ValueError)) as ei:
            AGGS[agg](cl, ws)
        assert str(ei.value).startswith("weights: expected"), ei.value
    assert unchanged(cl, snap)


_hyper = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64), st.integers(-3, 3),
                   st.sampled_from([True, "0.5", None, 1j, np.float32(0.5), 1e200]))


@settings(max_examples=50, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(KINDS), lr=_hyper, b1=_hyper, tau=_hyper, bad=st.integers(0, 3))
def test_fuzz_optimizer(kind, lr, b1, tau, bad):
    """Random hyperparameters: either accepted (then a step with a NaN in the pseudo-gradient is refused without
    changing anything, and a good step works) or refused naming the hyperparameter."""
    p = {"x": torch.zeros(3)}

    def real(v):
        return not isinstance(v, (bool, str, complex)) and v is not None

    kw = dict(lr=lr, beta=b1) if kind == "FedAvgM" else dict(lr=lr, betas=(b1, 0.5), tau=tau)
    ok_lr = real(lr) and math.isfinite(float(lr)) and lr > 0
    ok_b = real(b1) and math.isfinite(float(b1)) and 0 <= b1 < 1
    ok_tau = kind == "FedAvgM" or (real(tau) and math.isfinite(float(tau)) and 0 < tau
                                   and float(tau) * float(tau) <= torch.finfo(torch.float32).max)
    try:
        opt = getattr(fed, kind)(p, **kw)
    except (TypeError, ValueError) as e:
        assert not (ok_lr and ok_b and ok_tau), e
        first = "lr" if not ok_lr else ("beta" if kind == "FedAvgM" else "betas[0]") if not ok_b else "tau"
        assert str(e).startswith(first + ":"), (first, e)
        assert not p["x"].any()
        return
    assert ok_lr and ok_b and ok_tau
    opt.step({"x": torch.full((3,), 0.25)})
    before = _opt_state(opt)
    d = torch.full((3,), 0.5)
    d[bad % 3] = [float("nan"), float("inf"), -float("inf"), float("nan")][bad]
    with pytest.raises(ValueError, match=r"^pseudo_grad\['x'\]: expected finite"):
        opt.step({"x": d})
    _assert_opt_state(opt, before)
    try:
        opt.step({"x": torch.full((3,), 0.5)})
    except ValueError as e:  # an accepted but extreme lr (1e308) may overflow the params: refused, unchanged
        assert str(e).startswith("pseudo_grad: expected a round whose result is finite"), e
        _assert_opt_state(opt, before)
