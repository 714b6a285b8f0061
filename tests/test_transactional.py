"""All-or-nothing mutation of the adapter storage (issue 13, item 2): every mutating method of LoRAWeights,
DualLoRAWeights and AdapterPool validates and converts everything first, then writes, so a refusal or an
exception at ANY step changes nothing.

How it is checked:

* :func:`snapshot` captures the whole state of an object graph: the bytes, dtype, shape, strides, device and
  grad flags of every tensor (storage rows, offsets, ranks, scales, LayerNorm rows, the pool's host copies)
  and every Python field (allocation maps, free lists, version counters, the pool's name -> slot map,
  reference counts, LRU order, counters). Two snapshots compare with ``==``.
* :class:`FaultInjector` counts every torch call (a TorchFunctionMode: tensor writes, ``copy_``, ``zero_``,
  indexing writes, allocations, conversions, value reads; not shape/stride/pointer metadata reads) and every
  call of the library's internal helpers (the private methods of the three classes and of the transaction
  journal, and the file reader), and raises :class:`InjectedFault` at the k-th one. A sweep runs a call once
  clean to count its n events, then for EVERY k in 0..n-1 on a fresh object: the fault propagates and the
  snapshot equals the one before the call. For every k (every 16th for the pool, whose states are then
  bit-identical anyway) the same call retried clean leaves exactly the state a clean call leaves, and every
  adapter's delta (``add_lora_`` / ``dual_lora_`` on the CPU, the reference) equals the dense fp64 model.
* Hypothesis drives sequences of calls (valid and invalid); each step is first tried with a fault at a drawn
  fraction of its events (counted on a deep copy, so the fault always fires), then retried: the result must
  equal the copy's clean call, and the object must serve the model.
* Explicit refusals, one per class of bad input (the review's cases: a scale or alpha that overflows fp32,
  NaN/Inf, str/bool/complex scales, meta tensors, NaN weights, bad ids, a config with a huge lora_alpha).

Tensor ``_version`` counters are not part of the snapshot: a rolled-back write bumps them, which only makes
caches keyed on them recompute.
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import json
import math
import pathlib
import shutil
import tempfile
import threading
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

import lora_kernels as lk
import lora_kernels.pool as pool_mod
from lora_kernels.peft_format import CONFIG_NAME, save_peft_adapter
from lora_kernels.pool import AdapterInUseError, AdapterPool, PoolFullError

SETTINGS = dict(max_examples=40, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- snapshot ---------------------------------------------------------------------------------------------------
_OPAQUE = (type(threading.RLock()), type(threading.Lock()), threading.local)


def _tensor_state(t: torch.Tensor, storages: dict):
    meta = (str(t.dtype), tuple(t.shape), t.stride(), t.storage_offset(), str(t.device), t.requires_grad, t.is_leaf,
            t.layout)
    if t.device.type == "meta":
        return ("tensor",) + meta
    # Which storage (numbered in order of first appearance: comparable across objects), and the bytes.
    key = (t.device, t.untyped_storage().data_ptr())
    where = storages.setdefault(key, len(storages))
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    grad = _tensor_state(t.grad, storages) if t.is_leaf and t.grad is not None else None
    return ("tensor",) + meta + (where, raw, grad)


def snapshot(obj):
    """A comparable image of everything reachable from ``obj``'s fields (see the module docstring). Objects
    seen twice are recorded as references to their first occurrence, so shared storage and aliasing (the
    Dual-LoRA views of its inner LoRAWeights) are part of the image; events and streams by identity; locks
    and thread-locals are skipped."""
    memo, storages = {}, {}

    def walk(x):
        if x is None or isinstance(x, (bool, int, str, bytes, torch.dtype, torch.device, torch.layout)):
            return x
        if isinstance(x, float):
            return ("float", x.hex() if math.isfinite(x) else repr(x))
        if isinstance(x, _OPAQUE):
            return ("opaque", type(x).__name__)
        if id(x) in memo:
            return ("ref", memo[id(x)])
        memo[id(x)] = len(memo)
        if isinstance(x, torch.Tensor):
            return _tensor_state(x, storages)
        if isinstance(x, (list, tuple)):
            return (type(x).__name__, [walk(v) for v in x])
        if isinstance(x, (dict, OrderedDict)):  # insertion order kept: the LRU order is state
            return (type(x).__name__, [(walk(k), walk(v)) for k, v in x.items()])
        if isinstance(x, (set, frozenset)):
            return (type(x).__name__, sorted(repr(v) for v in x))
        mod = type(x).__module__ or ""
        if mod.startswith("torch.cuda") or "Event" in type(x).__name__ or "Stream" in type(x).__name__:
            return ("identity", type(x).__name__, id(x))
        if dataclasses.is_dataclass(x) or hasattr(x, "__dict__") or hasattr(type(x), "__slots__"):
            fields = dict(vars(x)) if hasattr(x, "__dict__") else {}
            for cls in type(x).__mro__:
                for s in getattr(cls, "__slots__", ()):
                    if hasattr(x, s):
                        fields[s] = getattr(x, s)
            return (type(x).__qualname__, [(k, walk(v)) for k, v in sorted(fields.items())])
        return ("repr", repr(x))

    return walk(obj)


def assert_same_state(before, after, what=""):
    if before != after:
        raise AssertionError(f"{what}: state changed\n{_first_diff(before, after)}")


def _first_diff(a, b, path="obj"):
    if type(a) is not type(b):
        return f"{path}: {a!r:.200} != {b!r:.200}"
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} != {len(b)}: {a!r:.300} vs {b!r:.300}"
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                label = x[0] if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) else i
                return _first_diff(x, y, f"{path}.{label}")
    return f"{path}: {a!r:.300} != {b!r:.300}"


# ---- fault injection ------------------------------------------------------------------------------------------
class InjectedFault(RuntimeError):
    """The error a :class:`FaultInjector` raises (a RuntimeError, like an out-of-memory or a failed copy)."""


# Not counted: attribute reads (shape, dtype), grad-mode switches, and reads of host-side tensor metadata: they
# cannot fail, and counting them (overlap checks read strides and pointers) would only slow the sweeps down.
_IGNORED = {"__get__", "_set_grad_enabled", "numel", "stride", "element_size", "data_ptr", "dim", "size",
            "storage_offset", "is_contiguous", "untyped_storage", "is_floating_point", "is_complex", "__len__"}


class FaultInjector(TorchFunctionMode):
    """Count events (torch calls, internal helper calls) and raise :class:`InjectedFault` at the ``fail_at``-th.
    Use as a context manager; ``count`` is the number of events seen, ``fired`` what raised."""

    active = None

    def __init__(self, fail_at=None):
        super().__init__()
        self.fail_at, self.count, self.fired = fail_at, 0, None

    def tick(self, what):
        k = self.count
        self.count += 1
        if k == self.fail_at:
            self.fired = what
            raise InjectedFault(f"injected fault #{k} at {what}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name not in _IGNORED:
            self.tick(getattr(func, "__qualname__", name))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        FaultInjector.active = self
        return super().__enter__()

    def __exit__(self, *exc):
        FaultInjector.active = None
        return super().__exit__(*exc)


def _helper_targets():
    """The library's internal helpers: every private method of the storage classes and of the transaction
    journal (whatever this version of the code has), and the file reader as the pool calls it."""
    classes = [lk.LoRAWeights, lk.DualLoRAWeights, AdapterPool]
    try:
        from lora_kernels._transaction import Transaction

        classes.append(Transaction)
    except ImportError:  # the code before issue 13
        pass
    out = []
    for cls in classes:
        for name, fn in list(vars(cls).items()):
            if name.startswith("_") and not name.startswith("__") and callable(fn) \
                    and not isinstance(fn, (staticmethod, classmethod, type)):
                out.append((cls, name, fn))
    return out


def _wrap(fn, label):
    def wrapper(*args, **kwargs):
        inj = FaultInjector.active
        if inj is not None:
            inj.tick(label)
        return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn
    return wrapper


@pytest.fixture(scope="module", autouse=True)
def _instrument_helpers():
    """Install the helper wrappers for this module's tests (inert unless a FaultInjector is active)."""
    saved = [(cls, name, fn) for cls, name, fn in _helper_targets()]
    for cls, name, fn in saved:
        setattr(cls, name, _wrap(fn, f"{cls.__name__}.{name}"))
    reader = pool_mod.read_peft_adapter
    pool_mod.read_peft_adapter = _wrap(reader, "read_peft_adapter")
    yield
    for cls, name, fn in saved:
        setattr(cls, name, fn)
    pool_mod.read_peft_adapter = reader


def _is_injected(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, InjectedFault):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def count_events(call, refusals=()) -> int:
    """Events of ``call()`` (up to a refusal among ``refusals``, when it raises one)."""
    with FaultInjector() as inj:
        try:
            call()
        except refusals:
            pass
    return inj.count


def fault_index(obj, call, frac, refusals=(ValueError, TypeError, KeyError, RuntimeError)):
    """Run ``call`` on a deep copy of ``obj`` (the same state: the same events); return ``(k, twin)`` with
    ``k = int(frac * n)`` for its n events (None when it has none), so that a fault drawn as a fraction always
    fires, and ``twin`` the copy after the clean call (what the object must look like once the call is done)."""
    memo = {id(v): type(v)() for v in vars(obj).values() if isinstance(v, _OPAQUE)}
    twin = copy.deepcopy(obj, memo)
    n = count_events(lambda: call(twin), refusals)
    return (min(int(frac * n), n - 1) if n else None), twin


def fault_sweep(make, call, check, *, what, check_every=1):
    """For every event k of ``call(obj)``, on a fresh ``obj = make()`` with a fault at k:

    * the fault propagates and the state is the one before the call (bit for bit);
    * or the code absorbed the fault and finished: the state is the one a clean call leaves.

    For every ``check_every``-th k and the last one, also: the call retried clean leaves exactly the state a
    clean call leaves (nothing leaked: rows, slots, names, counters; no stale transaction), and ``check(obj)``
    (the object serves what the model says). For the other k the bit-identical state implies both. ``make``
    must build the same state every time. Returns n."""
    ref = make()
    before = snapshot(ref)
    n = count_events(lambda: call(ref))
    clean_after = snapshot(ref)
    assert n > 0
    for k in range(n):
        obj = make()
        inj = FaultInjector(fail_at=k)
        deep = k % check_every == 0 or k == n - 1
        try:
            with inj:
                call(obj)
        except BaseException as e:  # noqa: BLE001 - anything but the injected fault is a failure
            if not _is_injected(e):
                raise
            assert_same_state(before, snapshot(obj), f"{what}: fault #{k} at {inj.fired}")
            if deep:
                call(obj)
                assert_same_state(clean_after, snapshot(obj), f"{what}: retry after fault #{k} at {inj.fired}")
        else:
            assert_same_state(clean_after, snapshot(obj), f"{what}: fault #{k} absorbed at {inj.fired}")
        if deep:
            check(obj)
    return n


# ---- LoRAWeights: a dense fp64 model ------------------------------------------------------------------------------
IN = 8
OUTS2 = (6, 3)


def _factors(seed, ranks, outs):
    g = torch.Generator().manual_seed(seed)
    As = [torch.randn(r, IN, generator=g) / IN ** 0.5 for r in ranks]
    Bs = [torch.randn(o, r, generator=g) / r ** 0.5 for o, r in zip(outs, ranks)]
    return As, Bs


class WeightsModel:
    """{adapter id: [(scale * B @ A) per slice]} in fp64: what LoRAWeights must serve."""

    def __init__(self, outs):
        self.outs = outs
        self.dense = {}

    def add(self, i, As, Bs, scales):
        self.dense[i] = [float(np.float32(s)) * B.double() @ A.double() for A, B, s in zip(As, Bs, scales)]

    def remove(self, i):
        del self.dense[i]


def serve_weights(w: lk.LoRAWeights, model: WeightsModel, seed=0):
    """Every loaded adapter, a free slot and -1 in one batch through add_lora_ (the CPU reference), against the
    model; also the allocator's invariants (rows of loaded adapters and free rows tile the storage)."""
    free_slots = [i for i in range(w.max_adapters) if i not in model.dense]
    ids = sorted(model.dense) + free_slots[:1] + [-1] + sorted(model.dense)[:1]
    x = torch.randn(len(ids), IN, generator=torch.Generator().manual_seed(seed))
    batch = lk.LoRABatch.from_ids(torch.tensor(ids, dtype=torch.int32), w.max_adapters)
    y = torch.zeros(len(ids), w.out_features, dtype=w.dtype)
    with torch.no_grad():
        lk.add_lora_(y, x.to(w.dtype), w, batch)
    want = torch.zeros(len(ids), w.out_features, dtype=torch.float64)
    for t, i in enumerate(ids):
        if i in model.dense:
            want[t] = torch.cat([d @ x[t].double() for d in model.dense[i]])
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert w.loaded == sorted(model.dense)
    spans = sorted([w.rows_of(i) for i in w.loaded] + w.free_ranges)
    assert sum(n for _, n in spans) == w.capacity_rows and all(
        a0 + n0 <= a1 for (a0, n0), (a1, _) in zip(spans, spans[1:]))


def make_weights(outs=(6,), dtype=torch.float32):
    """Adapters 0 (rank 2), 1 (rank 4), 2 (rank 3); 1 removed: a hole of 4 stale rows in the free list."""
    w = lk.LoRAWeights(IN, list(outs) if len(outs) > 1 else outs[0], 4, 4, capacity_rows=12, dtype=dtype)
    model = WeightsModel(outs)
    for i, r in enumerate((2, 4, 3)):
        As, Bs = _factors(10 + i, [r] * len(outs), outs)
        w.add(As if len(outs) > 1 else As[0], Bs if len(outs) > 1 else Bs[0], alpha=1.5 * r)
        model.add(i, As, Bs, [1.5] * len(outs))
    w.remove(1)
    model.remove(1)
    return w, model


def _weights_cases():
    A3, B3 = _factors(20, [3, 2], OUTS2)
    A1, B1 = _factors(21, [3], (6,))
    one = lambda: make_weights((6,))  # noqa: E731
    two = lambda: make_weights(OUTS2)  # noqa: E731
    return {
        # into the stale hole, explicit slot, alpha (1 slice)
        "add": (one, lambda w: w.add(A1[0], B1[0], alpha=6.0, adapter_id=3),
                lambda m: m.add(3, A1, B1, [2.0])),
        # two slices of different ranks, rsLoRA with a tensor alpha, lowest free slot
        "add_slices_rslora": (two, lambda w: w.add(A3, B3, alpha=torch.tensor(3.0), use_rslora=True),
                              lambda m: m.add(1, A3, B3, [3 / math.sqrt(3), 3 / math.sqrt(2)])),
        # explicit per-slice scales, a numpy id, fp16 inputs converted to the fp32 storage
        "add_scales": (two, lambda w: w.add([a.half() for a in A3], [b.half() for b in B3], scale=[0.5, -2.0],
                                            adapter_id=np.int64(1)),
                       lambda m: m.add(1, [a.half() for a in A3], [b.half() for b in B3], [0.5, -2.0])),
        "remove": (one, lambda w: w.remove(2), lambda m: m.remove(2)),
        "requires_grad_": (one, lambda w: w.requires_grad_(True), lambda m: None),
    }


@pytest.mark.parametrize("case", sorted(_weights_cases()))
def test_weights_fault_at_every_step_changes_nothing(case):
    make, call, update = _weights_cases()[case]
    models = {}

    def build():
        w, m = make()
        models[id(w)] = m
        return w

    def check(w):
        m = models.pop(id(w))
        update(m)
        serve_weights(w, m)

    n = fault_sweep(build, call, check, what=f"LoRAWeights.{case}")
    assert n >= 2
    print(f"[sweep] LoRAWeights.{case}: {n} fault points")


# ---- LoRAWeights: refusals, one per class of bad input ---------------------------------------------------------
_A, _B = _factors(30, [2], (6,))
_A, _B = _A[0], _B[0]
BIG = 1e39  # finite in fp64, above fp32's 3.4028235e38

REFUSALS = {
    # scales and alphas: finite real numbers whose fp32 value is finite
    "alpha_overflows_fp32": (dict(alpha=BIG), ValueError, "alpha"),
    "alpha_over_r_overflows": (dict(alpha=3.0e38 * 2 * 1.2), ValueError, "alpha"),  # alpha/2 = 3.6e38
    # 6e38 / 2 = 3e38 fits fp32, 6e38 / sqrt(2) = 4.2e38 does not
    "alpha_over_sqrt_r_rslora": (dict(alpha=6.0e38, use_rslora=True), ValueError, "alpha"),
    "alpha_huge_int": (dict(alpha=10 ** 400), ValueError, "alpha"),
    "alpha_nan": (dict(alpha=float("nan")), ValueError, "alpha"),
    "alpha_inf": (dict(alpha=float("inf")), ValueError, "alpha"),
    "alpha_str": (dict(alpha="2"), TypeError, "alpha"),
    "alpha_bool": (dict(alpha=True), TypeError, "alpha"),
    "scale_overflows_fp32": (dict(scale=BIG), ValueError, "scale"),
    "scale_neg_overflow": (dict(scale=-BIG), ValueError, "scale"),
    "scale_nan": (dict(scale=float("nan")), ValueError, "scale"),
    "scale_inf": (dict(scale=float("-inf")), ValueError, "scale"),
    "scale_str": (dict(scale="0.5"), TypeError, "scale"),
    "scale_bytes": (dict(scale=b"1"), TypeError, "scale"),
    "scale_bool": (dict(scale=True), TypeError, "scale"),
    "scale_complex": (dict(scale=1 + 2j), TypeError, "scale"),
    "scale_complex_tensor": (dict(scale=torch.tensor(1 + 0j)), TypeError, "scale"),
    "scale_list_str": (dict(scale=["0.5"]), TypeError, "scale"),
    "scale_wrong_count": (dict(scale=[1.0, 2.0]), ValueError, "scale"),
    "scale_none_type": (dict(scale=object()), TypeError, "scale"),
    # tensors: shapes, dtypes, devices, values
    "A_meta": (dict(A=torch.empty(2, IN, device="meta")), ValueError, "A"),
    "B_meta": (dict(B=torch.empty(6, 2, device="meta")), ValueError, "B"),
    "A_sparse": (dict(A=_A.to_sparse()), ValueError, "A"),
    "A_nan": (dict(A=_A.clone().index_fill_(1, torch.tensor([3]), float("nan"))), ValueError, "A"),
    "B_inf": (dict(B=_B.clone().index_fill_(0, torch.tensor([1]), float("inf"))), ValueError, "B"),
    "A_int": (dict(A=_A.long()), TypeError, "A"),
    "A_fp64": (dict(A=_A.double()), TypeError, "A"),
    "A_nested_list": (dict(A=[[1.0] * IN]), TypeError, "A"),
    "A_numpy": (dict(A=np.ones((2, IN), dtype=np.float32)), TypeError, "A"),
    "A_str": (dict(A="A"), TypeError, "A"),
    "rank_above_max": (dict(A=torch.randn(5, IN), B=torch.randn(6, 5)), ValueError, "A"),
    "rank_0": (dict(A=torch.randn(0, IN), B=torch.randn(6, 0)), ValueError, "A"),
    "rank_mismatch": (dict(B=torch.randn(6, 3)), ValueError, "B"),
    "wrong_in": (dict(A=torch.randn(2, IN + 1)), ValueError, "A"),
    "A_3d": (dict(A=_A[None]), ValueError, "A"),
    # ids, flags, capacity
    "id_in_use": (dict(adapter_id=0), ValueError, "adapter_id"),
    "id_out_of_range": (dict(adapter_id=4), ValueError, "adapter_id"),
    "id_negative": (dict(adapter_id=-1), ValueError, "adapter_id"),
    "id_bool": (dict(adapter_id=True), TypeError, "adapter_id"),
    "id_float": (dict(adapter_id=3.0), TypeError, "adapter_id"),
    "id_str": (dict(adapter_id="3"), TypeError, "adapter_id"),
    "id_huge": (dict(adapter_id=2 ** 70), ValueError, "adapter_id"),
    "use_rslora_str": (dict(use_rslora="yes"), TypeError, "use_rslora"),
    "non_blocking_int": (dict(non_blocking=1), TypeError, "non_blocking"),
    "no_room": (dict(A=torch.randn(4, IN), B=torch.randn(6, 4), adapter_id=3, _fill=True), ValueError, "A"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_weights_add_refusals_name_the_argument_and_change_nothing(case):
    kw, exc, name = REFUSALS[case]
    kw = dict(kw)
    w, model = make_weights()
    if kw.pop("_fill", False):  # a rank-4 adapter in the 4-row hole: 3 free rows left, no room for rank 4
        A, B = _factors(31, [4], (6,))
        w.add(A[0], B[0], adapter_id=1)
        model.add(1, A, B, [1.0])
    A, B = kw.pop("A", _A), kw.pop("B", _B)
    before = snapshot(w)
    with pytest.raises(exc, match=rf"^{name}(\[\d\])?: expected") as ei:
        w.add(A, B, **kw)
    assert not _is_injected(ei.value)
    assert_same_state(before, snapshot(w), case)
    serve_weights(w, model)
    i = w.add(_A, _B, alpha=4.0)  # still serving new adapters: nothing leaked
    model.add(i, [_A], [_B], [2.0])
    serve_weights(w, model)


def test_weights_remove_and_accessor_refusals():
    w, model = make_weights()
    before = snapshot(w)
    for bad, exc in ((1, ValueError), (4, ValueError), (-1, ValueError), (True, TypeError), (0.0, TypeError),
                     ("0", TypeError), (None, TypeError), (torch.tensor(0.5), TypeError)):
        with pytest.raises(exc, match="^adapter_id: expected"):
            w.remove(bad)
        with pytest.raises(exc, match="^adapter_id: expected"):
            w.rows_of(bad)
    with pytest.raises(TypeError, match="^requires_grad: expected a bool"):
        w.requires_grad_(1)
    with pytest.raises(TypeError, match="^slice_index"):
        w.adapter(0, True)
    assert_same_state(before, snapshot(w), "remove refusals")
    w.remove(torch.tensor(0))  # a 0-dim integer tensor is an id
    model.remove(0)
    serve_weights(w, model)


def test_weights_scale_range_limits_accepted_exactly():
    """The documented range's edges: fp32's largest finite value and -0.0 are accepted (the stored scale is the
    fp32 value of the float64 computation), alpha 0 gives an exact zero delta, a negative scale subtracts."""
    fmax = torch.finfo(torch.float32).max
    w = lk.LoRAWeights(IN, 6, 4, 4, dtype=torch.float32)
    i = w.add(_A, _B, scale=fmax)
    j = w.add(_A, _B, alpha=2 * fmax)  # alpha / r = fmax exactly
    k = w.add(_A, _B, alpha=0)
    m = w.add(_A, _B, scale=np.float32(-0.25))
    assert w.scales[0, i].item() == fmax and w.scales[0, j].item() == fmax
    assert w.scales[0, k].item() == 0.0 and w.scales[0, m].item() == -0.25


def test_weights_source_aliasing_storage_is_copied_first():
    """An adapter copied from another slot's rows, or from the free rows it is written into, lands intact."""
    w, model = make_weights()
    A, B, _ = w.adapter(2)
    want = [A.clone()], [B.clone()]
    i = w.add(A, B, scale=0.5)  # rows of adapter 2 (loaded) as the source
    model.add(i, *want, [0.5])
    dest = next(start for start, n in w.free_ranges if n >= 3)  # where the next rank-2 add goes (first fit)
    src_a = w.a[0, dest : dest + 2]  # the very rows it writes, as its own source
    src_b = w.b[dest + 1 : dest + 3, :].t()  # rows shifted by one: a partial overlap copy_ refuses
    a0, b0 = src_a.clone(), src_b.clone()
    j = w.add(src_a, src_b, scale=1.0)
    assert w.rows_of(j) == (dest, 2)
    model.add(j, [a0], [b0], [1.0])
    serve_weights(w, model)


def test_weights_from_padded_refusals():
    a, b = torch.randn(2, 4, IN), torch.randn(2, 4, 6)
    with pytest.raises(TypeError, match="^ranks"):
        lk.LoRAWeights.from_padded(a, b, ranks=torch.tensor([1.5, 2.0]))
    with pytest.raises(ValueError, match="^ranks"):
        lk.LoRAWeights.from_padded(a, b, ranks=torch.tensor([1, 2, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="^scales"):
        lk.LoRAWeights.from_padded(a, b, scales=torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="^scales"):
        lk.LoRAWeights.from_padded(a, b, scales=torch.tensor([1.0, 1e39], dtype=torch.float64))
    with pytest.raises(TypeError, match="^ranks"):
        lk.LoRAWeights.from_padded(a, b, ranks=[1, 2])
    with pytest.raises(ValueError, match="^a"):
        lk.LoRAWeights.from_padded(a.to("meta"), b.to("meta"))
    w = lk.LoRAWeights.from_padded(a, b, ranks=torch.tensor([4, 0], dtype=torch.int64))
    assert w.loaded == [0]


def test_weights_requires_grad_refused_on_non_leaf_views():
    """from_padded over a tensor that requires grad gives non-leaf views: freezing them is refused up front
    (before: the second requires_grad_ raised after the first had changed a)."""
    a = torch.randn(2, 4, IN, requires_grad=True)
    b = torch.randn(2, 4, 6)
    w = lk.LoRAWeights.from_padded(a, b)
    before = snapshot(w)
    with pytest.raises(ValueError, match="^requires_grad"):
        w.requires_grad_(False)
    assert_same_state(before, snapshot(w), "requires_grad_")


# ---- LoRAWeights: hypothesis sequences with a fault per step ----------------------------------------------------
STEP = st.tuples(
    st.sampled_from(["add", "add", "add_bad", "remove", "remove_bad", "grad"]),
    st.integers(1, 4),  # rank
    st.integers(0, 4),  # slot (4 = let add choose)
    st.one_of(st.none(), st.floats(0, 1, exclude_max=True)),  # where the fault fires (None: no fault)
)
BAD_KW = [dict(scale=BIG), dict(alpha=float("nan")), dict(scale="1"), dict(A=torch.empty(1, IN, device="meta")),
          dict(adapter_id=1.0), dict(alpha=BIG, use_rslora=True)]


@settings(**SETTINGS)
@given(st.sampled_from([(6,), OUTS2]), st.lists(STEP, min_size=1, max_size=12))
def test_weights_sequences_with_faults_match_the_model(outs, steps):
    w, model = make_weights(outs)
    S = len(outs)
    for n, (op, r, slot, fault) in enumerate(steps):
        As, Bs = _factors(100 + n, [r] * S, outs)
        A, B = (As, Bs) if S > 1 else (As[0], Bs[0])
        free = [i for i in range(4) if i not in model.dense]
        kw, target = {}, None
        if op == "add":
            kw = dict(alpha=float(r + n), adapter_id=slot) if slot != 4 else dict(scale=[0.5 + n] * S)
            ok = (slot in free or slot == 4 and bool(free)) and any(ln >= r for _, ln in w.free_ranges)
        elif op == "add_bad":
            kw = dict(BAD_KW[n % len(BAD_KW)])
            A, B = kw.pop("A", A), kw.pop("B", B)
            ok = False
        elif op in ("remove", "remove_bad"):
            target = slot if op == "remove" else [True, 1.5, 9][n % 3]
            ok = op == "remove" and target in model.dense
        else:
            ok = True

        def call(w, op=op, A=A, B=B, kw=kw, target=target, n=n):
            if op in ("add", "add_bad"):
                return w.add(A, B, **kw)
            if op in ("remove", "remove_bad"):
                return w.remove(target)
            return w.requires_grad_(bool(n % 2))

        before = snapshot(w)
        k, twin = fault_index(w, call, 0.0 if fault is None else fault)
        if fault is not None and k is not None:
            with pytest.raises(BaseException) as ei:
                with FaultInjector(k):
                    call(w)
            assert _is_injected(ei.value) or not ok and isinstance(ei.value, (ValueError, TypeError)), ei.value
            assert_same_state(before, snapshot(w), f"step {n} {op} fault #{k}")
        if not ok:
            with pytest.raises((ValueError, TypeError)):
                call(w)
            assert_same_state(before, snapshot(w), f"step {n} {op} refused")
            continue
        res = call(w)
        assert_same_state(snapshot(twin), snapshot(w), f"step {n} {op}: retried after fault #{k}")
        if op == "add":
            model.add(res, As, Bs, kw.get("scale") or [kw["alpha"] / r] * S)
        elif op == "remove":
            model.remove(target)
        assert w.loaded == sorted(model.dense)
    serve_weights(w, model)


# ---- DualLoRAWeights ----------------------------------------------------------------------------------------------
DOUT = 6


def _dual_factors(seed, r):
    g = torch.Generator().manual_seed(seed)
    return dict(A=torch.randn(r, IN, generator=g) / IN ** 0.5, T=torch.randn(r, IN, generator=g) / IN ** 0.5,
                B=torch.randn(DOUT, r, generator=g) / r ** 0.5, ln_weight=1 + 0.1 * torch.randn(r, generator=g),
                ln_bias=0.1 * torch.randn(r, generator=g))


def _dual_dense(f, s, eps):
    """x -> s * B (ReLU(T x) * LN_r(A x)) in fp64, for one adapter."""
    A, T, B, lw, lb = (f[k].double() for k in ("A", "T", "B", "ln_weight", "ln_bias"))

    def delta(x):
        u = A @ x
        ln = (u - u.mean()) / torch.sqrt(u.var(unbiased=False) + eps) * lw + lb
        return float(np.float32(s)) * B @ (torch.relu(T @ x) * ln)

    return delta


def make_dual():
    """Adapters 0 (rank 2), 1 (rank 3), 2 (rank 1); 1 removed: a hole of 6 stale rows."""
    w = lk.DualLoRAWeights(IN, DOUT, 4, 3, capacity_rows=14, dtype=torch.float32)
    model = {}
    for i, r in enumerate((2, 3, 1)):
        f = _dual_factors(40 + i, r)
        w.add(**f, alpha=2.0 * r)
        model[i] = _dual_dense(f, 2.0, w.eps)
    w.remove(1)
    del model[1]
    return w, model


def serve_dual(w, model, seed=1):
    ids = sorted(model) + [i for i in range(w.max_adapters) if i not in model][:1] + [-1]
    x = torch.randn(len(ids), IN, generator=torch.Generator().manual_seed(seed))
    y = torch.zeros(len(ids), DOUT)
    with torch.no_grad():
        lk.dual_lora_(y, x, w, lk.LoRABatch.from_ids(torch.tensor(ids, dtype=torch.int32), w.max_adapters))
    want = torch.stack([model[i](x[t].double()) if i in model else torch.zeros(DOUT, dtype=torch.float64)
                        for t, i in enumerate(ids)])
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    assert w.loaded == sorted(model) == sorted(w._host_ranks)


def _dual_cases():
    f3, f2 = _dual_factors(50, 3), _dual_factors(51, 2)
    eps = 1e-5
    return {
        "add": (lambda w: w.add(**f3, alpha=1.5), lambda m: m.__setitem__(1, _dual_dense(f3, 0.5, eps))),
        "add_scale_id_fp16": (lambda w: w.add(**{k: v.half() for k, v in f2.items()}, scale=-0.75, adapter_id=3),
                              lambda m: m.__setitem__(3, _dual_dense({k: v.half() for k, v in f2.items()}, -0.75,
                                                                     eps))),
        "new_adapter": (lambda w: w.new_adapter(3, generator=torch.Generator().manual_seed(0)),
                        lambda m: m.__setitem__(1, lambda x: torch.zeros(DOUT, dtype=torch.float64))),  # B = 0
        "remove": (lambda w: w.remove(2), lambda m: m.pop(2)),
    }


@pytest.mark.parametrize("case", sorted(_dual_cases()))
def test_dual_fault_at_every_step_changes_nothing(case):
    call, update = _dual_cases()[case]
    models = {}

    def build():
        w, m = make_dual()
        models[id(w)] = m
        return w

    def check(w):
        m = models.pop(id(w))
        update(m)
        serve_dual(w, m)

    n = fault_sweep(build, call, check, what=f"DualLoRAWeights.{case}")
    print(f"[sweep] DualLoRAWeights.{case}: {n} fault points")


_F2 = _dual_factors(60, 2)
DUAL_REFUSALS = {
    "alpha_overflows_fp32": (dict(alpha=BIG), ValueError, "alpha"),  # 1e39 / 2 = 5e38
    "alpha_huge_int": (dict(alpha=10 ** 400), ValueError, "alpha"),
    "alpha_str": (dict(alpha="2"), TypeError, "alpha"),
    "scale_overflows_fp32": (dict(scale=-BIG), ValueError, "scale"),
    "scale_nan": (dict(scale=float("nan")), ValueError, "scale"),
    "scale_complex": (dict(scale=1j), TypeError, "scale"),
    "A_meta": (dict(A=_F2["A"].to("meta")), ValueError, "A"),
    "T_meta": (dict(T=_F2["T"].to("meta")), ValueError, "T"),
    "B_meta": (dict(B=_F2["B"].to("meta")), ValueError, "B"),
    "ln_weight_meta": (dict(ln_weight=_F2["ln_weight"].to("meta")), ValueError, "ln_weight"),
    "ln_bias_meta": (dict(ln_bias=_F2["ln_bias"].to("meta")), ValueError, "ln_bias"),
    "A_nan": (dict(A=_F2["A"].clone().fill_(float("nan"))), ValueError, "A"),
    "T_inf": (dict(T=_F2["T"] * float("inf")), ValueError, "T"),
    "ln_bias_nan": (dict(ln_bias=torch.full((2,), float("nan"))), ValueError, "ln_bias"),
    "ln_weight_overflows_fp16": (dict(ln_weight=torch.full((2,), 1e6), _fp16=True), ValueError, "ln_weight"),
    "ln_weight_shape": (dict(ln_weight=torch.ones(3)), ValueError, "ln_weight"),
    "rank_above_max": (dict(A=torch.randn(4, IN), T=torch.randn(4, IN), B=torch.randn(DOUT, 4)), ValueError, "A"),
    "id_in_use": (dict(adapter_id=0), ValueError, "adapter_id"),
    "id_bool": (dict(adapter_id=False), TypeError, "adapter_id"),
    "id_out_of_range": (dict(adapter_id=7), ValueError, "adapter_id"),
}


@pytest.mark.parametrize("case", sorted(DUAL_REFUSALS))
def test_dual_add_refusals_name_the_argument_and_change_nothing(case):
    """Before: a scale or alpha overflowing fp32, or LayerNorm parameters on the meta device, failed after the
    inner LoRAWeights had stored the adapter: an orphan adapter (rows, slot) with no Dual-LoRA rank."""
    kw = dict(DUAL_REFUSALS[case][0])
    exc, name = DUAL_REFUSALS[case][1:]
    if kw.pop("_fp16", False):
        w = lk.DualLoRAWeights(IN, DOUT, 4, 3, dtype=torch.float16)
        model = {}
    else:
        w, model = make_dual()
    args = {k: kw.pop(k, _F2[k]) for k in ("A", "T", "B", "ln_weight", "ln_bias")}
    before = snapshot(w)
    with pytest.raises(exc, match=rf"^{name}: expected"):
        w.add(**args, **kw)
    assert_same_state(before, snapshot(w), case)
    if w.dtype == torch.float32:
        serve_dual(w, model)
        i = w.add(**_F2, scale=0.5)
        model[i] = _dual_dense(_F2, 0.5, w.eps)
        serve_dual(w, model)


def test_dual_remove_and_new_adapter_refusals():
    w, model = make_dual()
    before = snapshot(w)
    for bad, exc in ((1, ValueError), (9, ValueError), (True, TypeError), ("0", TypeError)):
        with pytest.raises(exc, match="^adapter_id"):
            w.remove(bad)
    for kw, exc, name in ((dict(rank=4), ValueError, "rank"), (dict(rank=2.0), TypeError, "rank"),
                          (dict(rank=2, alpha=BIG), ValueError, "alpha"), (dict(rank=2, generator=0), TypeError,
                                                                           "generator")):
        with pytest.raises(exc, match=f"^{name}"):
            w.new_adapter(**kw)
    assert_same_state(before, snapshot(w), "dual refusals")
    serve_dual(w, model)


# ---- AdapterPool --------------------------------------------------------------------------------------------------
PIN = 16
POUTS = {
    "model.layers.0.self_attn.q_proj": 16,
    "model.layers.1.self_attn.q_proj": 16,
    "model.layers.1.self_attn.k_proj": 8,
    "model.layers.1.self_attn.v_proj": 8,
}
FUSED = tuple(p for p in POUTS if p.startswith("model.layers.1"))
SUBSET = ["model.layers.0.self_attn.q_proj", FUSED[0], FUSED[2]]
# name -> (rank, modules, config changes): b targets a subset (rank 0 / zero slices elsewhere)
ADAPTERS = {"a": (4, None, {}), "b": (6, SUBSET, dict(target_modules=["q_proj", "v_proj"])), "c": (2, None, {}),
            "d": (5, None, {}), "e": (3, SUBSET, dict(target_modules=["q_proj", "v_proj"])),
            "f": (4, None, dict(use_rslora=True))}
_FILES = {}


def pool_files():
    """Adapter directories written once per process: {name: (dir, {module path: dense fp64 delta})}."""
    if not _FILES:
        root = pathlib.Path(tempfile.mkdtemp(prefix="lk_txn_"))
        atexit.register(shutil.rmtree, root, True)
        for k, (name, (r, mods, cfg)) in enumerate(ADAPTERS.items()):
            g = torch.Generator().manual_seed(200 + k)
            mods = list(POUTS) if mods is None else mods
            facs = {p: (torch.randn(r, PIN, generator=g) / PIN ** 0.5, torch.randn(POUTS[p], r, generator=g) / r ** 0.5)
                    for p in mods}
            alpha = 1.5 * r
            save_peft_adapter(root / name, facs, r=r, lora_alpha=alpha, **cfg)
            s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            _FILES[name] = (root / name, {p: float(np.float32(s)) * B.double() @ A.double()
                                          for p, (A, B) in facs.items()})
        # A config whose alpha makes alpha / r overflow fp32 on one module only (in the second layer), and one
        # where only rsLoRA's alpha / sqrt(r) overflows: a pool that copied layer 0 first used to keep it.
        for name, changes in (("huge_alpha", {"alpha_pattern": {"v_proj": 2e39}}),
                              ("huge_alpha_rslora", {"lora_alpha": 6e38, "use_rslora": True}),
                              ("huge_lora_alpha", {"lora_alpha": 1e300})):
            d = root / name
            shutil.copytree(root / "c", d)
            cfg = json.loads((d / CONFIG_NAME).read_text())
            cfg.update(changes)
            (d / CONFIG_NAME).write_text(json.dumps(cfg))
            _FILES[name] = (d, None)
    return _FILES


def pool_dense():
    """{adapter name: {module path: dense delta}}; "e2" is e's file under another name."""
    dense = {n: d for n, (_, d) in pool_files().items()}
    dense["e2"] = dense["e"]
    return dense


def make_pool():
    """3 slots, 16 rows per layer: a, b, c resident (LRU order b, c, a: a referenced), d and e registered only."""
    files = pool_files()
    kw = dict(capacity_rows=16, dtype=torch.float32)
    layers = {"model.layers.0.self_attn.q_proj": lk.LoRAWeights(PIN, 16, 3, 8, **kw),
              FUSED: lk.LoRAWeights(PIN, [16, 8, 8], 3, 8, **kw)}
    pool = AdapterPool(layers)
    for n in "abc":
        pool.load(n, files[n][0])
    for n in "de":
        pool.register(n, files[n][0])
    pool.acquire(["a"])
    return pool


def serve_pool(pool, seed=2):
    """Every resident adapter, None, and a repeat through add_lora_ on every layer (the CPU reference), against
    the dense model; then the bookkeeping invariants (no leaked rows or slots). Changes only counters/LRU."""
    dense = pool_dense()
    names = list(pool.resident) + [None] + list(pool.resident)[:1]
    x = torch.randn(len(names), PIN, generator=torch.Generator().manual_seed(seed))
    for _, w in pool.layers:
        assert w.free_rows + sum(w.rows_of(s)[1] for s in w.loaded) == w.capacity_rows
        assert set(w.loaded) <= set(pool.resident.values())
    refs = {n: pool.refcount(n) for n in pool.names}
    with pool.use(names) as ids:
        batch = lk.LoRABatch.from_ids(torch.tensor(ids, dtype=torch.int32), pool.num_slots)
        for paths, w in pool.layers:
            y = torch.zeros(len(names), w.out_features)
            with torch.no_grad():
                lk.add_lora_(y, x, w, batch)
            for p, c0, n in zip(paths, w.slice_cols, w.slice_outs):
                want = torch.stack([dense[nm][p] @ x[t].double() if nm is not None and p in dense[nm]
                                    else torch.zeros(n, dtype=torch.float64) for t, nm in enumerate(names)])
                torch.testing.assert_close(y[:, c0 : c0 + n].double(), want, rtol=1e-5, atol=1e-5,
                                           msg=lambda m, p=p: f"{p}: {m}")
    assert {n: pool.refcount(n) for n in pool.names} == refs  # use() released what it acquired


def _pool_cases():
    f = pool_files()
    return {
        "load_new_file": lambda p: p.load("f", f["f"][0]),  # reads, registers, evicts b (LRU), copies 3 layers
        "load_registered": lambda p: p.load("d"),  # d (rank 5) needs rows: evicts b and c
        "acquire_misses": lambda p: p.acquire(["e", "a", None, "d", "e"]),  # two misses, evictions
        "acquire_hit": lambda p: p.acquire(["c", "a"]),
        "release": lambda p: p.release(["a"]),
        "evict": lambda p: p.evict("c"),
        "unload": lambda p: p.unload("b"),
        "unload_not_resident": lambda p: p.unload("e"),
        "prefetch": lambda p: p.prefetch("e"),
        "register": lambda p: p.register("f", f["f"][0]),
        "load_many_resident": lambda p: p.load_many({"f": f["f"][0], "e2": f["e"][0]}, resident=True,
                                                    progress=False),
    }


_TEMPLATE = []


def clone_pool():
    """A deep copy of one :func:`make_pool` (fresh locks): the same state, without re-reading five files."""
    if not _TEMPLATE:
        _TEMPLATE.append(make_pool())
    pool = _TEMPLATE[0]
    memo = {id(v): type(v)() for v in vars(pool).values() if isinstance(v, _OPAQUE)}
    return copy.deepcopy(pool, memo)


def test_pool_clone_is_faithful():
    assert_same_state(snapshot(make_pool()), snapshot(clone_pool()), "clone")
    serve_pool(clone_pool())


@pytest.mark.parametrize("case", sorted(_pool_cases()))
def test_pool_fault_at_every_step_changes_nothing(case):
    """A fault at any torch call or helper of a pool method (file reading, conversion, pinning, each layer's row
    writes, evictions, bookkeeping) leaves every layer and the pool bit-identical; the retried call then leaves
    exactly what a clean call leaves, and the pool serves the dense model."""
    n = fault_sweep(clone_pool, _pool_cases()[case], serve_pool, what=f"AdapterPool.{case}", check_every=16)
    print(f"[sweep] AdapterPool.{case}: {n} fault points")


@pytest.mark.parametrize("name, match", [("huge_alpha", "v_proj"), ("huge_alpha_rslora", "alpha"),
                                         ("huge_lora_alpha", "alpha")])
def test_pool_load_config_with_huge_alpha_refused_pool_unchanged(name, match):
    """Before: alpha 2e39 on v_proj made the second layer's add fail after writing rows: the pool rolled back
    layer 0, but layer 1 kept the rows, offset and ranks written before the failing scale (rows leaked)."""
    pool = make_pool()
    before = snapshot(pool)
    with pytest.raises(lk.AdapterFormatError, match=match) as ei:
        pool.load("bad", pool_files()[name][0])
    assert str(pool_files()[name][0]) in str(ei.value)  # names the file
    assert_same_state(before, snapshot(pool), name)
    assert "bad" not in pool
    serve_pool(pool)
    assert pool.load("f", pool_files()["f"][0]) in range(3)
    serve_pool(pool)


def test_pool_refusals_change_nothing():
    """Refusals of every pool method (the pool full of referenced adapters, in use, unknown or wrong-typed names,
    duplicate names in load_many, too many releases): the whole pool state is unchanged."""
    pool = make_pool()
    pool.acquire(["b", "c"])  # every slot referenced
    files = pool_files()
    before = snapshot(pool)
    bad = [
        (lambda: pool.acquire(["d"]), PoolFullError),
        (lambda: pool.acquire(["a", "d"]), PoolFullError),  # the first name's reference is not kept
        (lambda: pool.load("d"), PoolFullError),
        (lambda: pool.load("f", files["f"][0]), PoolFullError),  # the registration is undone
        (lambda: pool.prefetch("e"), PoolFullError),
        (lambda: pool.load_many({"f": files["f"][0]}, resident=True, progress=False) or pool.acquire(["f"]),
         PoolFullError),
        (lambda: pool.evict("a"), AdapterInUseError),
        (lambda: pool.unload("b"), AdapterInUseError),
        (lambda: pool.release(["d"]), ValueError),
        (lambda: pool.release(["a", "a"]), ValueError),
        (lambda: pool.acquire(["a", "zzz"]), KeyError),
        (lambda: pool.acquire(["a", 3]), TypeError),
        (lambda: pool.register("a", files["a"][0]), ValueError),
        (lambda: pool.load_many([("f", files["f"][0]), ("f", files["c"][0])], progress=False), ValueError),
        (lambda: pool.load_many({"f": files["f"][0], "a": files["a"][0]}, progress=False), ValueError),
        (lambda: pool.load_many({"f": files["f"][0], "x": files["huge_alpha"][0]}, progress=False),
         lk.AdapterFormatError),
        (lambda: pool.load("x", files["f"][0] / "missing"), lk.AdapterFormatError),
        (lambda: pool.register(3, files["f"][0]), TypeError),
    ]
    for k, (call, exc) in enumerate(bad):
        s0 = snapshot(pool)
        with pytest.raises(exc):
            call()
        if k == 5:  # load_many itself succeeded (registered f, no slot); the acquire was refused
            assert pool.slot_of("f") is None
            pool.unload("f")
        assert_same_state(s0, snapshot(pool), f"refusal {k}")
    assert_same_state(before, snapshot(pool), "refusals")
    pool.release(["b", "c"])
    serve_pool(pool)


def test_pool_use_fault_at_every_step():
    """use() is acquire, the block, release; each phase is all-or-nothing. A fault while acquiring (d is a miss:
    evictions, copies) leaves the pool as it was and the block does not run; a fault while releasing leaves
    exactly the acquired state (references held, nothing else moved; the release can be retried); an error in
    the block releases."""
    names = ["d", None, "a"]
    pool = clone_pool()
    before = snapshot(pool)
    with pytest.raises(KeyboardInterrupt):  # a BaseException too
        with pool.use(names):
            raise KeyboardInterrupt
    ref = clone_pool()
    ref.acquire(names)
    acquired = snapshot(ref)
    ref.release(names)
    assert_same_state(snapshot(pool), snapshot(ref), "use with an error in the block")
    ran = []

    def block(p):
        with p.use(names) as ids:
            assert ids[1] == -1
            ran.append(True)

    p = clone_pool()
    n = count_events(lambda: block(p))
    phases = {"acquire": 0, "release": 0}
    for k in range(n):
        p = clone_pool()
        ran.clear()
        with pytest.raises(InjectedFault):
            with FaultInjector(k):
                block(p)
        if ran:  # the fault hit the release
            phases["release"] += 1
            assert_same_state(acquired, snapshot(p), f"use: release fault #{k}")
            p.release(names)
        else:
            phases["acquire"] += 1
            assert_same_state(before, snapshot(p), f"use: acquire fault #{k}")
        if k % 16 == 0:
            serve_pool(p)
    assert phases["acquire"] > 10 and phases["release"] >= 1, phases
    print(f"[sweep] AdapterPool.use: {n} fault points {phases}")


# ---- AdapterPool: hypothesis sequences with a fault per step ------------------------------------------------------
POOL_OPS = st.lists(st.tuples(st.sampled_from(["load", "acquire", "release", "prefetch", "evict", "unload",
                                               "load_many", "register"]),
                              st.sampled_from(list("abcdef")), st.sampled_from(list("abcdef")),
                              st.one_of(st.none(), st.floats(0, 1, exclude_max=True))),
                    min_size=1, max_size=8)


@settings(**{**SETTINGS, "max_examples": 25})
@given(POOL_OPS)
def test_pool_sequences_with_faults_stay_consistent(ops):
    """Random pool calls, each first tried with a fault at a drawn event: a failed call (fault or refusal)
    changes nothing; the call retried clean then behaves as if the fault never happened; at the end (and on the
    way) the pool serves the dense model and its bookkeeping matches the layers'."""
    files = pool_files()
    pool = make_pool()
    held = ["a"]
    expected = (KeyError, ValueError, TypeError, PoolFullError, AdapterInUseError)
    for step, (op, n1, n2, fault) in enumerate(ops):
        rel = [n1] if n1 in held else held[-1:]

        def call(p, op=op, n1=n1, n2=n2, rel=rel):
            if op == "load":
                return p.load(n1, None if n1 in p else files[n1][0])
            if op == "acquire":
                return p.acquire([n1, n2])
            if op == "release":
                return p.release(rel)
            if op in ("prefetch", "evict", "unload"):
                return getattr(p, op)(n1)
            if op == "register":
                return p.register(n1, files[n1][0])
            return p.load_many({n: files[n][0] for n in dict.fromkeys([n1, n2]) if n not in p}, resident=True,
                               progress=False)

        before = snapshot(pool)
        k, twin = fault_index(pool, call, 0.0 if fault is None else fault, expected)
        what = f"step {step} {op}({n1}, {n2})"
        if fault is not None and k is not None:
            with pytest.raises(expected + (InjectedFault,)):
                with FaultInjector(k):
                    call(pool)
            assert_same_state(before, snapshot(pool), f"{what} fault #{k}")
        try:
            call(pool)
        except expected:
            assert_same_state(before, snapshot(pool), f"{what} refused")
        else:
            if op == "acquire":
                held.extend([n1, n2])
            elif op == "release":
                for nm in rel:
                    held.remove(nm)
        assert_same_state(snapshot(twin), snapshot(pool), f"{what}: retried after fault #{k}")
        if step % 3 == 2:
            _serve_keeping_refs(pool, held)
    _serve_keeping_refs(pool, held)


def _serve_keeping_refs(pool, held):
    names = list(pool.resident)
    x = torch.randn(len(names) + 1, PIN, generator=torch.Generator().manual_seed(5))
    dense = pool_dense()
    for _, w in pool.layers:
        assert w.free_rows + sum(w.rows_of(s)[1] for s in w.loaded) == w.capacity_rows
        assert set(w.loaded) <= set(pool.resident.values())
    for n in set(held):
        assert pool.refcount(n) == held.count(n) and pool.slot_of(n) is not None
    with pool.use(names + [None]) as ids:
        batch = lk.LoRABatch.from_ids(torch.tensor(ids, dtype=torch.int32), pool.num_slots)
        for paths, w in pool.layers:
            y = torch.zeros(len(ids), w.out_features)
            with torch.no_grad():
                lk.add_lora_(y, x, w, batch)
            for p, c0, n in zip(paths, w.slice_cols, w.slice_outs):
                want = torch.stack([dense[nm][p] @ x[t].double() if nm is not None and p in dense[nm]
                                    else torch.zeros(n, dtype=torch.float64) for t, nm in enumerate(names + [None])])
                torch.testing.assert_close(y[:, c0 : c0 + n].double(), want, rtol=1e-5, atol=1e-5)
