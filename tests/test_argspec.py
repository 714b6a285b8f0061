"""Argument specs (lora_kernels/_argspec.py) and the SGMV ops' specs built from them (ops/sgmv.py).

* The generated fast predicate (``spec.ok``) and detailed checks (``spec.check``) agree with an interpreter of the
  spec (each rule evaluated on its own with ``eval``): ``ok`` is never True where a rule fails, and ``check``
  raises the first failing rule's error; every rule of every op is exercised by the corpus below.
* The refusals of shrink / expand_ / add_lora_ are the pinned exceptions and messages (those of the hand-written
  checks the specs replaced), on the eager fast path and on the dispatcher path.
* The fast path runs no detailed check; its overlap predicate reads every tensor of ``library_storage``.
* ``tensor()`` gives the rules and messages of ``check_tensor``; duplicate rules are dropped, conflicting or
  unbound names are refused when the spec is built.
"""

from __future__ import annotations

import pytest
import torch

import lora_kernels as lk
from lora_kernels._argspec import ArgSpec, Exact, Let, Rule, _args_of, tensor
from lora_kernels._validation import check_tensor
from lora_kernels.ops import sgmv as ops_sgmv

T, IN, OUT, N, R = 5, 24, 20, 4, 8

# ---- the corpus: calls of the ops and of the parts lora_linear uses ----------------------------------------------


def _make(outs=(OUT,)):
    g = torch.Generator().manual_seed(0)
    S = len(outs)
    w = lk.LoRAWeights(IN, list(outs) if S > 1 else outs[0], max_adapters=N, max_rank=R, dtype=torch.float32)
    for r in (R, 3):
        A = [torch.randn(r, IN, generator=g) for _ in range(S)]
        B = [torch.randn(o, r, generator=g) for o in outs]
        w.add(A if S > 1 else A[0], B if S > 1 else B[0], alpha=2.0 * r)
    batch = lk.LoRABatch(T + 3, N).build(torch.tensor([0, 1, -1, 0, 1], dtype=torch.int32), ranks=w.ranks)
    x = torch.randn(T, IN, generator=g)
    y = torch.randn(T, sum(outs), generator=g)
    return w, batch, x, y, torch.zeros(S, T, R)


def corpus(outs=(OUT,)) -> dict:
    """``{label: (function, args, kwargs)}``; function: an op of lora_kernels or a ``_check_*`` part of ops.sgmv."""
    w, batch, x, y, h = _make(outs)
    out, S = y.shape[1], len(outs)

    def meta(t):
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    def inner(t):  # last dim strided
        return t.t().contiguous().t()

    other_T = lk.LoRABatch(T + 1, N).build(torch.zeros(T + 1, dtype=torch.int32))
    big = lk.LoRABatch(T, N + 1).build(torch.zeros(T, dtype=torch.int32))
    empty = lk.LoRABatch(4, N).build(torch.zeros(0, dtype=torch.int32))
    wmeta = lk.LoRAWeights(IN, out, max_adapters=N, max_rank=R, dtype=torch.float32, device="meta")
    buf = torch.randn(T, out + IN)
    hbuf = torch.zeros(T * out + S * T * R)
    a_rows = w.a.view(-1)[: T * out].view(T, out)
    cpu, mdev = x.device, torch.device("meta")
    c = {
        "add/weights-type": ("add_lora_", (y, x, w.a, batch)),
        "add/weights-none": ("add_lora_", (y, x, None, batch)),
        "add/x-list": ("add_lora_", (y, x.tolist(), w, batch)),
        "add/x-int": ("add_lora_", (y, x.to(torch.int32), w, batch)),
        "add/x-f64": ("add_lora_", (y, x.double(), w, batch)),
        "add/x-3d": ("add_lora_", (y, x.unsqueeze(0), w, batch)),
        "add/x-1d": ("add_lora_", (y, x[0], w, batch)),
        "add/x-meta": ("add_lora_", (y, meta(x), w, batch)),
        "add/x-inner": ("add_lora_", (y, inner(x), w, batch)),
        "add/x-in": ("add_lora_", (y, x[:, :-1], w, batch)),
        "add/y-list": ("add_lora_", (y.tolist(), x, w, batch)),
        "add/y-f64": ("add_lora_", (y.double(), x, w, batch)),
        "add/y-1d": ("add_lora_", (y[0], x, w, batch)),
        "add/y-meta": ("add_lora_", (meta(y), x, w, batch)),
        "add/y-inner": ("add_lora_", (inner(y), x, w, batch)),
        "add/y-cols": ("add_lora_", (y[:, :-1], x, w, batch)),
        "add/y-rows": ("add_lora_", (y[:-1], x, w, batch)),
        "add/y-expand": ("add_lora_", (y[:1].expand(T, out), x, w, batch)),
        "add/y-rowstride": ("add_lora_", (torch.zeros(T * out).as_strided((T, out), (3, 1)), x, w, batch)),
        "add/batch-type": ("add_lora_", (y, x, w, batch.meta)),
        "add/batch-T": ("add_lora_", (y[:-1], x[:-1], w, batch)),
        "add/batch-other-T": ("add_lora_", (y, x, w, other_T)),
        "add/batch-capacity": ("add_lora_", (y, x, w, big)),
        "add/batch-device": ("add_lora_", (meta(y), meta(x), wmeta, batch)),
        "add/weights-device": ("add_lora_", (y, x, wmeta, batch)),
        "add/y-over-x": ("add_lora_", (buf[:, IN - 4: IN - 4 + out], buf[:, :IN], w, batch)),
        "add/y-in-a": ("add_lora_", (a_rows, x, w, batch)),
        "add/x-grad": ("add_lora_", (y, x.clone().requires_grad_(), w, batch)),
        "add/merged-free": ("add_lora_", (y, x, w, batch), {"merged": 3}),
        "add/merged-bool": ("add_lora_", (y, x, w, batch), {"merged": True}),
        "add/ok": ("add_lora_", (y.clone(), x, w, batch)),
        "add/ok-merged": ("add_lora_", (y.clone(), x, w, batch), {"merged": 1}),
        "add/ok-empty": ("add_lora_", (torch.zeros(0, out), torch.zeros(0, IN), w, empty)),
        "add/ok-strided-rows": ("add_lora_", (torch.zeros(T, out + 3)[:, :out], torch.zeros(T, IN + 5)[:, :IN], w,
                                              batch)),
        "shrink/weights-type": ("shrink", (x, w.a, batch)),
        "shrink/x-list": ("shrink", (x.tolist(), w, batch)),
        "shrink/x-f64": ("shrink", (x.double(), w, batch)),
        "shrink/x-3d": ("shrink", (x.unsqueeze(0), w, batch)),
        "shrink/x-meta": ("shrink", (meta(x), w, batch)),
        "shrink/x-inner": ("shrink", (inner(x), w, batch)),
        "shrink/x-in": ("shrink", (x[:, :-1], w, batch)),
        "shrink/batch-type": ("shrink", (x, w, batch.meta)),
        "shrink/batch-T": ("shrink", (x[:-1], w, batch)),
        "shrink/batch-capacity": ("shrink", (x, w, big)),
        "shrink/batch-device": ("shrink", (meta(x), wmeta, batch)),
        "shrink/weights-device": ("shrink", (x, wmeta, batch)),
        "shrink/merged": ("shrink", (x, w, batch), {"merged": 0}),
        "shrink/ok": ("shrink", (x, w, batch)),
        "shrink/ok-empty": ("shrink", (torch.zeros(0, IN), w, empty)),
        "expand/weights-type": ("expand_", (y, h, w.a, batch)),
        "expand/y-list": ("expand_", (y.tolist(), h, w, batch)),
        "expand/y-f64": ("expand_", (y.double(), h, w, batch)),
        "expand/y-1d": ("expand_", (y[0], h, w, batch)),
        "expand/y-meta": ("expand_", (meta(y), h, w, batch)),
        "expand/y-inner": ("expand_", (inner(y), h, w, batch)),
        "expand/y-cols": ("expand_", (y[:, :-1], h, w, batch)),
        "expand/y-expand": ("expand_", (y[:1].expand(T, out), h, w, batch)),
        "expand/batch-type": ("expand_", (y, h, w, None)),
        "expand/batch-T": ("expand_", (y[:-1], h[:, :-1], w, batch)),
        "expand/batch-capacity": ("expand_", (y, h, w, big)),
        "expand/batch-device": ("expand_", (meta(y), meta(h), wmeta, batch)),
        "expand/h-list": ("expand_", (y, h.tolist(), w, batch)),
        "expand/h-f16": ("expand_", (y, h.half(), w, batch)),
        "expand/h-2d": ("expand_", (y, h[0], w, batch)),
        "expand/h-slices": ("expand_", (y, torch.zeros(S + 1, T, R), w, batch)),
        "expand/h-T": ("expand_", (y, torch.zeros(S, T + 1, R), w, batch)),
        "expand/h-rank": ("expand_", (y, torch.zeros(S, T, R + 1), w, batch)),
        "expand/h-meta": ("expand_", (y, meta(h), w, batch)),
        "expand/h-strided": ("expand_", (y, torch.zeros(S, T, 2 * R)[..., ::2], w, batch)),
        "expand/y-over-h": ("expand_", (hbuf[: T * out].view(T, out), hbuf[T * out - 5:][: S * T * R].view(S, T, R),
                                        w, batch)),
        "expand/y-in-a": ("expand_", (a_rows, h, w, batch)),
        "expand/h-grad": ("expand_", (y, h.clone().requires_grad_(), w, batch)),
        "expand/merged": ("expand_", (y, h, w, batch), {"merged": 1}),
        "expand/ok": ("expand_", (y.clone(), h, w, batch)),
        "expand/ok-empty": ("expand_", (torch.zeros(0, out), torch.zeros(S, 0, R), w, empty)),
        "x/weights": ("_check_x", (x, None)),
        "x/list": ("_check_x", (x.tolist(), w)),
        "x/int": ("_check_x", (x.int(), w)),
        "x/3d": ("_check_x", (x[None], w)),
        "x/meta": ("_check_x", (meta(x), w)),
        "x/inner": ("_check_x", (inner(x), w)),
        "x/in": ("_check_x", (x[:, 1:], w)),
        "x/ok": ("_check_x", (x.half(), w)),
        "y/list": ("_check_y", (y.tolist(), w, T, cpu)),
        "y/f64": ("_check_y", (y.double(), w, T, cpu)),
        "y/1d": ("_check_y", (y[0], w, T, cpu)),
        "y/device": ("_check_y", (y, w, T, mdev)),
        "y/inner": ("_check_y", (inner(y), w, T, cpu)),
        "y/shape": ("_check_y", (y, w, T + 1, cpu)),
        "y/expand": ("_check_y", (y[:1].expand(T, out), w, T, cpu)),
        "y/ok": ("_check_y", (y, w, T, cpu)),
        "common/weights": ("_check_common", (None, batch, T, cpu)),
        "common/batch": ("_check_common", (w, 3, T, cpu)),
        "common/T": ("_check_common", (w, batch, T + 1, cpu)),
        "common/capacity": ("_check_common", (w, big, T, cpu)),
        "common/batch-device": ("_check_common", (w, batch, T, mdev)),
        "common/weights-device": ("_check_common", (wmeta, batch, T, cpu)),
        "common/ok": ("_check_common", (w, batch, T, cpu)),
    }
    return {k: v if len(v) == 3 else (*v, {}) for k, v in c.items()}


SPECS = {"add_lora_": "_ADD_LORA", "shrink": "_SHRINK", "expand_": "_EXPAND", "_check_x": "_X", "_check_y": "_Y",
         "_check_common": "_COMMON"}
_GRAD = ("RuntimeError: x/y: expected tensors that do not require grad (the in-place serving ops have no backward; "
         "train with lk.lora_delta / lk.lora_linear, which do); run under torch.no_grad() or "
         "torch.inference_mode(), or detach the inputs")
_FL = "['torch.float16', 'torch.bfloat16', 'torch.float32']"
_Y_SHAPE = "y: expected shape (5, 20) (T, sum of the slices' out_features [20]), got"
_ROWS = "y: expected rows that do not overlap (row stride >= 20; e.g. not an expand()), got strides"
_DISJOINT = ("y: expected memory disjoint from {0} (the op writes y while reading {0}, or {0} is storage the library "
             "owns)")

# The outcome of each call of corpus() (outs (20,), grad mode on): the messages of the hand-written checks that the
# specs replaced (generated with the previous ops/sgmv.py), kept as the contract.
PINNED = {
    "add/weights-type": "TypeError: weights: expected a LoRAWeights, got Tensor",
    "add/weights-none": "TypeError: weights: expected a LoRAWeights, got NoneType",
    "add/x-list": "TypeError: x: expected a torch.Tensor, got list",
    "add/x-int": f"TypeError: x: expected dtype in {_FL}, got torch.int32",
    "add/x-f64": f"TypeError: x: expected dtype in {_FL}, got torch.float64",
    "add/x-3d": "ValueError: x: expected 2 dims, got 3 dims (shape (1, 5, 24))",
    "add/x-1d": "ValueError: x: expected 2 dims, got 1 dims (shape (24,))",
    "add/x-meta": "ValueError: x: expected device cpu, got meta",
    "add/x-inner": "ValueError: x: expected unit stride in the last dim (rows may be strided), got strides (1, 5)",
    "add/x-in": "ValueError: x: expected shape (T, 24) (weights.in_features), got (5, 23)",
    "add/y-list": "TypeError: y: expected a torch.Tensor, got list",
    "add/y-f64": f"TypeError: y: expected dtype in {_FL}, got torch.float64",
    "add/y-1d": "ValueError: y: expected 2 dims, got 1 dims (shape (20,))",
    "add/y-meta": "ValueError: y: expected device cpu, got meta",
    "add/y-inner": "ValueError: y: expected unit stride in the last dim (rows may be strided), got strides (1, 5)",
    "add/y-cols": f"ValueError: {_Y_SHAPE} (5, 19)",
    "add/y-rows": f"ValueError: {_Y_SHAPE} (4, 20)",
    "add/y-expand": f"ValueError: {_ROWS} (0, 1)",
    "add/y-rowstride": f"ValueError: {_ROWS} (3, 1)",
    "add/batch-type": "TypeError: batch: expected a LoRABatch, got Tensor",
    "add/batch-T": "ValueError: batch: expected a batch built for 4 tokens (x/y have 4 rows), got 5 tokens",
    "add/batch-other-T": "ValueError: batch: expected a batch built for 5 tokens (x/y have 5 rows), got 6 tokens",
    "add/batch-capacity": "ValueError: batch: expected max_adapters <= weights.max_adapters=4 (ids must name slots of "
                          "the weights), got 5",
    "add/batch-device": "ValueError: batch: expected metadata on meta, got cpu",
    "add/weights-device": "ValueError: x: expected device meta, got cpu",
    "add/y-over-x": "ValueError: " + _DISJOINT.format("x") + ", got overlapping storage",
    "add/y-in-a": "ValueError: " + _DISJOINT.format("weights.a") + ", got overlapping storage",
    "add/x-grad": _GRAD,
    "add/merged-free": "ValueError: merged: expected a loaded adapter (the one merged into the base weight), got 3 "
                       "(free slot)",
    "add/merged-bool": "ValueError: merged: expected None or an adapter id in [0, 4), got True",
    "add/ok": "ok",
    "add/ok-merged": "ok",
    "add/ok-empty": "ok",
    "add/ok-strided-rows": "ok",
    "shrink/weights-type": "TypeError: weights: expected a LoRAWeights, got Tensor",
    "shrink/x-list": "TypeError: x: expected a torch.Tensor, got list",
    "shrink/x-f64": f"TypeError: x: expected dtype in {_FL}, got torch.float64",
    "shrink/x-3d": "ValueError: x: expected 2 dims, got 3 dims (shape (1, 5, 24))",
    "shrink/x-meta": "ValueError: x: expected device cpu, got meta",
    "shrink/x-inner": "ValueError: x: expected unit stride in the last dim (rows may be strided), got strides (1, 5)",
    "shrink/x-in": "ValueError: x: expected shape (T, 24) (weights.in_features), got (5, 23)",
    "shrink/batch-type": "TypeError: batch: expected a LoRABatch, got Tensor",
    "shrink/batch-T": "ValueError: batch: expected a batch built for 4 tokens (x/y have 4 rows), got 5 tokens",
    "shrink/batch-capacity": "ValueError: batch: expected max_adapters <= weights.max_adapters=4 (ids must name "
                             "slots of the weights), got 5",
    "shrink/batch-device": "ValueError: batch: expected metadata on meta, got cpu",
    "shrink/weights-device": "ValueError: x: expected device meta, got cpu",
    "shrink/merged": "ValueError: merged: expected None (shrink has no mixed mode: use add_lora_(..., merged=m), "
                     "which runs it in the same launch(es)), got 0",
    "shrink/ok": "ok",
    "shrink/ok-empty": "ok",
    "expand/weights-type": "TypeError: weights: expected a LoRAWeights, got Tensor",
    "expand/y-list": "TypeError: y: expected a torch.Tensor, got list",
    "expand/y-f64": f"TypeError: y: expected dtype in {_FL}, got torch.float64",
    "expand/y-1d": "ValueError: y: expected 2 dims, got 1 dims (shape (20,))",
    "expand/y-meta": "ValueError: y: expected device cpu, got meta",
    "expand/y-inner": "ValueError: y: expected unit stride in the last dim (rows may be strided), got strides (1, 5)",
    "expand/y-cols": f"ValueError: {_Y_SHAPE} (5, 19)",
    "expand/y-expand": f"ValueError: {_ROWS} (0, 1)",
    "expand/batch-type": "TypeError: batch: expected a LoRABatch, got NoneType",
    "expand/batch-T": "ValueError: batch: expected a batch built for 4 tokens (x/y have 4 rows), got 5 tokens",
    "expand/batch-capacity": "ValueError: batch: expected max_adapters <= weights.max_adapters=4 (ids must name "
                             "slots of the weights), got 5",
    "expand/batch-device": "ValueError: batch: expected metadata on meta, got cpu",
    "expand/h-list": "TypeError: h: expected a torch.Tensor, got list",
    "expand/h-f16": "TypeError: h: expected dtype in ['torch.float32'], got torch.float16",
    "expand/h-2d": "ValueError: h: expected 3 dims, got 2 dims (shape (5, 8))",
    "expand/h-slices": "ValueError: h: expected shape (1, 5, 8), got (2, 5, 8)",
    "expand/h-T": "ValueError: h: expected shape (1, 5, 8), got (1, 6, 8)",
    "expand/h-rank": "ValueError: h: expected shape (1, 5, 8), got (1, 5, 9)",
    "expand/h-meta": "ValueError: h: expected device cpu, got meta",
    "expand/h-strided": "ValueError: h: expected a contiguous tensor, got strides (80, 16, 2)",
    "expand/y-over-h": "ValueError: " + _DISJOINT.format("h") + ", got overlapping storage",
    "expand/y-in-a": "ValueError: " + _DISJOINT.format("weights.a") + ", got overlapping storage",
    "expand/h-grad": _GRAD,
    "expand/merged": "ValueError: merged: expected None (expand_ has no mixed mode: use add_lora_(..., merged=m), "
                     "which runs it in the same launch(es)), got 1",
    "expand/ok": "ok",
    "expand/ok-empty": "ok",
    "x/weights": "TypeError: weights: expected a LoRAWeights, got NoneType",
    "x/list": "TypeError: x: expected a torch.Tensor, got list",
    "x/int": f"TypeError: x: expected dtype in {_FL}, got torch.int32",
    "x/3d": "ValueError: x: expected 2 dims, got 3 dims (shape (1, 5, 24))",
    "x/meta": "ValueError: x: expected device cpu, got meta",
    "x/inner": "ValueError: x: expected unit stride in the last dim (rows may be strided), got strides (1, 5)",
    "x/in": "ValueError: x: expected shape (T, 24) (weights.in_features), got (5, 23)",
    "x/ok": "ok",
    "y/list": "TypeError: y: expected a torch.Tensor, got list",
    "y/f64": f"TypeError: y: expected dtype in {_FL}, got torch.float64",
    "y/1d": "ValueError: y: expected 2 dims, got 1 dims (shape (20,))",
    "y/device": "ValueError: y: expected device meta, got cpu",
    "y/inner": "ValueError: y: expected unit stride in the last dim (rows may be strided), got strides (1, 5)",
    "y/shape": "ValueError: y: expected shape (6, 20) (T, sum of the slices' out_features [20]), got (5, 20)",
    "y/expand": f"ValueError: {_ROWS} (0, 1)",
    "y/ok": "ok",
    "common/weights": "TypeError: weights: expected a LoRAWeights, got NoneType",
    "common/batch": "TypeError: batch: expected a LoRABatch, got int",
    "common/T": "ValueError: batch: expected a batch built for 6 tokens (x/y have 6 rows), got 5 tokens",
    "common/capacity": "ValueError: batch: expected max_adapters <= weights.max_adapters=4 (ids must name slots of "
                       "the weights), got 5",
    "common/batch-device": "ValueError: batch: expected metadata on meta, got cpu",
    "common/weights-device": "ValueError: weights: expected storage on cpu, got meta",
    "common/ok": "ok",
}


def _call(fn: str, args, kwargs):
    return (getattr(ops_sgmv, fn) if fn.startswith("_") else getattr(lk, fn))(*args, **kwargs)


def _outcome(thunk) -> str:
    try:
        thunk()
    except (TypeError, ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "ok"


def _tensors(args) -> dict:
    return {i: a.clone() for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.device.type != "meta"}


@pytest.mark.parametrize("fast", [True, False])
def test_refusals_are_the_pinned_exceptions_and_messages(fast, monkeypatch):
    monkeypatch.setattr(ops_sgmv, "fast_path", fast)
    cases = corpus()
    assert set(cases) == set(PINNED)
    for label, (fn, args, kwargs) in cases.items():
        before = _tensors(args)
        got = _outcome(lambda: _call(fn, args, kwargs))
        assert got == PINNED[label], label
        if got != "ok":  # a refusal changes nothing
            assert all(torch.equal(args[i], t) for i, t in before.items()), label


# ---- the generated functions vs an interpreter of the spec ---------------------------------------------------------


def _scope_env(spec: ArgSpec) -> dict:
    env = dict(vars(ops_sgmv))
    for it in spec.items:
        env.update(getattr(it, "consts", ()))
    return env


def first_failure(spec: ArgSpec, args):
    """``(index of the first rule the arguments break, its exception)``, or None when every rule holds: the
    spec's items evaluated one at a time with ``eval`` (independent of the generated code)."""
    env, scope = _scope_env(spec), dict(zip(spec.params, args))
    k = 0
    for it in spec.items:
        if isinstance(it, Let):
            exec(f"{it.name} = {it.expr}", env, scope)
            continue
        values = eval(f"({_args_of(it)},)", env, scope)
        if isinstance(it, Exact):
            try:
                it.decide(*values)
            except ValueError as e:
                return k, e
        elif not eval(it.ok, env, scope):
            expected, actual = it.message(*values)
            return k, it.exc(f"{it.name}: expected {expected}, got {actual}")
        k += 1
    return None


def _spec_cases(outs):
    for label, (fn, args, _) in corpus(outs).items():
        yield label, SPECS[fn], args


@pytest.mark.parametrize("outs", [(OUT,), (16, 8, 8)])
def test_fast_predicate_and_detailed_checks_agree_with_the_spec(outs):
    for label, name, args in _spec_cases(outs):
        spec = getattr(ops_sgmv, name)
        want = first_failure(spec, args)
        # (an Exact rule may refuse conservatively; none does on the corpus, where equality must hold)
        assert spec.ok(*args) is (want is None), label
        if want is None:
            assert spec.check(*args) is None, label
        else:
            with pytest.raises(type(want[1])) as ei:
                spec.check(*args)
            assert str(ei.value) == str(want[1]), label


def test_every_rule_of_every_spec_is_exercised():
    hit = {name: set() for name in SPECS.values()}
    for outs in ((OUT,), (16, 8, 8)):
        for label, name, args in _spec_cases(outs):
            want = first_failure(getattr(ops_sgmv, name), args)
            if want is not None:
                hit[name].add(want[0])
    for name, seen in hit.items():
        rules = getattr(ops_sgmv, name).rules
        missing = [r.ok for k, r in enumerate(rules) if k not in seen]
        assert not missing, (name, missing)


# ---- the fast path ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_the_fast_path_runs_no_detailed_check(monkeypatch):
    w, batch, x, y, h = _make()
    calls = []
    for name in ("_ADD_LORA", "_SHRINK", "_EXPAND"):
        spec = getattr(ops_sgmv, name)
        monkeypatch.setattr(spec, "check", lambda *a, _c=spec.check, _n=name: (calls.append(_n), _c(*a))[1])
    lk.add_lora_(y, x, w, batch)
    lk.expand_(y, lk.shrink(x, w, batch), w, batch)
    assert calls == []
    monkeypatch.setattr(ops_sgmv, "fast_path", False)
    lk.add_lora_(y, x, w, batch)
    lk.expand_(y, lk.shrink(x, w, batch), w, batch)
    assert calls == ["_ADD_LORA", "_SHRINK", "_EXPAND"]


@pytest.mark.parametrize("spec_name,second", [("_ADD_LORA", "x"), ("_EXPAND", "h")])
def test_the_overlap_predicate_reads_all_library_storage(spec_name, second, monkeypatch):
    """The fast overlap test lists the library's tensors itself (no dict per call): it must be library_storage's
    list, else the fast path would let y alias a tensor the detailed path refuses."""
    w, batch, x, y, h = _make((16, 8, 8))
    seen = []
    monkeypatch.setattr(ops_sgmv, "_clear_of", lambda y_, *others: (seen.extend(others), True)[1])
    other = x if second == "x" else h
    assert getattr(ops_sgmv, spec_name).ok(y, other, w, batch)
    want = [other, *ops_sgmv.library_storage(w, batch).values()]
    assert sorted(map(id, seen)) == sorted(map(id, want))


# ---- the machinery -------------------------------------------------------------------------------------------------


def _tensor_spec(**kw):
    return ArgSpec("t", "t, d", tensor("t", device="d", **kw), {"__name__": __name__})


@pytest.mark.parametrize("kw", [
    dict(ndim=2, dtypes=(torch.float32, torch.float16), inner_contiguous=True),
    dict(shape=(3, None, "4"), dtypes=(torch.float32,)),
    dict(inner_contiguous=True),
])
def test_tensor_rules_are_check_tensors(kw):
    spec = _tensor_spec(**kw)
    check_kw = dict(kw)
    if "shape" in kw:
        check_kw["shape"] = [None if s is None else int(s) for s in kw["shape"]]
    base = torch.zeros(3, 5, 4)
    values = [[1.0], base, base.double(), base[0], base[..., 0], base.transpose(1, 2), base[:, :, :2],
              torch.zeros(2, 5, 4), torch.zeros(3, 1, 4, dtype=torch.float16), torch.zeros(3, 4), torch.zeros(()),
              torch.zeros(0, 3)]
    for v in values:  # (cpu:0 is not cpu, but the same device to check_tensor: the rule is not ==)
        for d in (torch.device("cpu"), torch.device("cpu", 0), torch.device("meta")):
            want = _outcome(lambda: check_tensor("t", v, device=d, **check_kw))
            assert _outcome(lambda: spec.check(v, d)) == want, (kw, v, d)
            assert spec.ok(v, d) is (want == "ok"), (kw, v, d)


def test_duplicate_rules_are_dropped_and_names_checked():
    r = Rule("a > 0", "a", lambda a: ("a positive a", a))
    spec = ArgSpec("s", "a, b", (r, Let("c", "a + b"), r, Let("c", "a + b"),
                                 Rule("c > 1", "b", lambda c: ("a + b > 1", c))), {})
    assert len(spec.rules) == 2 and spec.ok(1, 1) and not spec.ok(1, 0) and not spec.ok(0, 5)
    with pytest.raises(ValueError, match="^a: expected a positive a, got 0$"):
        spec.check(0, 5)
    with pytest.raises(ValueError, match=r"^b: expected a \+ b > 1, got 1$"):
        spec.check(1, 0)
    with pytest.raises(ValueError, match="bound twice"):
        ArgSpec("s", "a", (Let("c", "a"), Let("c", "a + 1")), {})
    with pytest.raises(NameError, match="'q'"):
        ArgSpec("s", "a", (Rule("q > a", "a", lambda a: ("", a)),), {})
    with pytest.raises(NameError, match="'c'"):  # used before its Let
        ArgSpec("s", "a", (Rule("c > 0", "a", lambda a: ("", a)), Let("c", "a")), {})


def test_exact_rules_decide_on_the_detailed_path():
    decided = []

    def decide(a):
        decided.append(a)
        if a < 0:
            raise ValueError("a: expected >= 0")

    spec = ArgSpec("s", "a", (Exact("a > 10", decide),), {})
    assert spec.ok(11) and not spec.ok(5) and not decided
    assert spec.check(5) is None and decided == [5]  # conservative no: the exact test accepts
    with pytest.raises(ValueError, match="a: expected >= 0"):
        spec.check(-1)
    # check never evaluates an Exact condition: it may not work where the detailed path runs (fake tensors have
    # no data pointer; torch.compile traces the checks)
    spec = ArgSpec("s", "a", (Exact("1 / a > 0", decide),), {})
    assert spec.check(0) is None and decided[-1] == 0
