"""The input contract of the batch builder and the SGMV / Dual-LoRA / deform ops (issue 13, item 2).

* Adapter ids of every integer dtype are range-checked at full width on every path that builds a batch (the torch
  builder, the compiled builder's Python side and its kernel on the CPU emulator, ``from_ids``, ``from_segments``,
  the transformers patch and the decode graph), validate on or off: an id outside ``[-1, max_adapters)`` is
  refused (validate) or served as -1 and counted in ``num_invalid``, never truncated into another adapter's id.
* ``from_segments``: any capacity >= T works; bad lengths / adapters are refused naming the argument.
* Outputs never share memory with an input or with storage the library owns (adapter rows, offsets, ranks,
  scales, slice info, the batch's metadata): refused naming ``y``, on the eager fast path and the dispatcher path.
* Numeric and shape arguments (``merged``, ``spatial_shapes``, ``level_start_index``, VCE's ``eps``) are refused
  with TypeError / ValueError naming them; nothing the caller owns changes on a refusal.
"""

# ruff: noqa: B023  (the lambdas handed to refused() are called at once, inside the loop that defines them)
from __future__ import annotations

import contextlib
import subprocess

import numpy as np
import pytest
import torch

import lora_kernels as lk
from lora_kernels import backends
from lora_kernels.batch import INT_DTYPES, MetaLayout, build_batch_torch_, ids_to_int32
from lora_kernels.ops import sgmv as ops_sgmv

from test_batch import expected
from test_reference import naive_delta

N = 5  # adapter slots of the id tests

# ---- helpers ---------------------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A bit-exact, NaN-safe copy of ``t``'s elements (as raw bytes)."""
    t = t.detach()
    if t.device.type == "meta":
        return torch.empty(0, dtype=torch.uint8)
    return t.contiguous().view(-1).view(torch.uint8).clone() if t.numel() else torch.empty(0, dtype=torch.uint8)


def snapshot(**tensors: torch.Tensor) -> dict:
    return {k: _bits(v) for k, v in tensors.items()}


def assert_unchanged(before: dict, **tensors: torch.Tensor) -> None:
    for k, v in tensors.items():
        assert torch.equal(before[k], _bits(v)), f"{k} changed"


def refused(call, exc, name: str, **owned: torch.Tensor) -> str:
    """``call()`` raises ``exc`` whose message starts with ``name`` and leaves every tensor of ``owned``
    bit-identical; returns the message."""
    before = snapshot(**owned)
    with pytest.raises(exc) as ei:
        call()
    msg = str(ei.value)
    assert msg.startswith(name), f"expected a message naming {name!r}, got {msg!r}"
    assert_unchanged(before, **owned)
    return msg


@contextlib.contextmanager
def fast_path(on: bool):
    prev = ops_sgmv.fast_path
    ops_sgmv.fast_path = on
    try:
        yield
    finally:
        ops_sgmv.fast_path = prev


def _tensor(vals, dtype) -> torch.Tensor:
    """Python ints -> a tensor of ``dtype`` (uint64 values >= 2**63 through their int64 bit pattern)."""
    if dtype == torch.uint64:
        return torch.tensor([v - 2**64 if v >= 2**63 else v for v in vals], dtype=torch.int64).view(torch.uint64)
    return torch.tensor(vals, dtype=torch.int64).to(dtype) if dtype in (torch.uint16, torch.uint32) \
        else torch.tensor(vals, dtype=dtype)


# Classes of id values (issue 13): each keeps the values its dtype can hold.
ID_CLASSES = {
    "in_range": [0, 2, 4],
    "minus_one": [-1],
    "negative": [-2, -(2**7), -(2**15), -(2**31), -(2**63)],
    "ge_max_adapters": [N, 2**7 - 1, 2**8 - 1, 2**15 - 1, 2**16 - 1],
    "ge_2_31": [2**31, 2**31 + 1, 2**32 - 1],
    "2_32_plus_k": [2**32 + 1, 2**32 + 3],  # truncated to int32 these are the ids 1 and 3: other tenants' adapters
    "ge_2_63": [2**63, 2**64 - 1],  # uint64 only (2**64 - 1 reinterpreted as int64 is -1)
}


def _class_values(dtype, cls):
    info = torch.iinfo(dtype)
    return [v for v in ID_CLASSES[cls] if info.min <= v <= info.max]


def _cases():
    for dtype in INT_DTYPES:
        for cls in ID_CLASSES:
            if _class_values(dtype, cls):
                yield dtype, cls


CASES = list(_cases())
BAD = ("negative", "ge_max_adapters", "ge_2_31", "2_32_plus_k", "ge_2_63")


def _ids_for(dtype, cls):
    vals = _class_values(dtype, cls)
    # surround the class's values with in-range ids (and -1 where the dtype has it)
    ids = [1]
    for v in vals:
        ids += [v, 3]
    if torch.iinfo(dtype).min < 0:
        ids.append(-1)
    return ids


def _check_meta(b: lk.LoRABatch, ids: list) -> None:
    got = b.to_dict()
    assert got == expected(ids, b.max_adapters), (ids, got)


# ---- ids: every integer dtype x validate x value class, on every path -------------------------------------------


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("path", ["build", "from_ids", "from_segments", "patch_prepare", "decode_graph"])
@pytest.mark.parametrize("dtype,cls", CASES, ids=[f"{str(d)[6:]}-{c}" for d, c in CASES])
def test_ids_of_every_dtype_are_range_checked_before_narrowing(dtype, cls, path, validate):
    ids = _ids_for(dtype, cls)
    t = _tensor(ids, dtype)
    assert t.tolist() == ids  # the dtype holds every value exactly
    bad = cls in BAD
    name = "seg_adapters" if path == "from_segments" else "adapter_ids"
    first_bad = next((v for v in ids if v < -1 or v >= N), None)
    if path == "build":
        b = lk.LoRABatch(16, N).build(torch.tensor([2, 2, 0], dtype=torch.int32))
        if bad and validate:
            msg = refused(lambda: b.build(t), ValueError, name, meta=b.meta, ids=t)
            assert f"got {first_bad} at token" in msg and b.num_tokens == 3
            return
        b.build(t, validate=validate)
    elif path == "from_ids":
        if bad and validate:
            refused(lambda: lk.LoRABatch.from_ids(t, N), ValueError, name, ids=t)
            return
        b = lk.LoRABatch.from_ids(t, N, validate=validate)
    elif path == "from_segments":
        lens = torch.tensor([(k % 3) + 1 for k in range(len(ids))], dtype=torch.int64)
        if bad and validate:
            msg = refused(lambda: lk.LoRABatch.from_segments(lens, t, N), ValueError, name, ids=t, lens=lens)
            assert f"got {first_bad} at index" in msg
            return
        b = lk.LoRABatch.from_segments(lens, t, N, max_tokens=int(lens.sum()) + 7, validate=validate)
        ids = [v for v, n in zip(ids, lens.tolist()) for _ in range(n)]
    else:
        from lora_kernels.integrations.graphs import DecodeGraph
        from lora_kernels.integrations.transformers import LoRAPatch

        batch = lk.LoRABatch(32, N)
        patch = LoRAPatch(torch.nn.Identity(), {}, {}, batch, validate)
        T = len(ids)
        if path == "patch_prepare":
            call = lambda: patch.prepare(t, (T,))  # noqa: E731
            owned = dict(meta=batch.meta, ids=t)
        else:
            dg = DecodeGraph(patch, T, step=lambda adapter_ids, input_ids: patch.prepare(adapter_ids, (T,)).meta)
            call = lambda: dg.run_eager(t)  # noqa: E731
            owned = dict(meta=batch.meta, ids=t, static=dg.adapter_ids)
        if bad and validate:
            refused(call, ValueError, name, **owned)
            return
        call()
        b = batch
        if path == "decode_graph":  # the static int32 buffer holds no aliased id either
            assert [v if -1 <= v < N else -1 for v in ids] == \
                [v if -1 <= v < N else -1 for v in dg.adapter_ids.tolist()]
    _check_meta(b, ids)
    if bad:
        assert int(b.num_invalid) == sum(1 for v in ids if v < -1 or v >= N) > 0
        if validate is False and path in ("build", "from_ids"):
            with pytest.raises(ValueError, match=r"^adapter_ids: .*out of range"):
                b.check()


def test_float_bool_complex_ids_are_refused_naming_adapter_ids():
    b = lk.LoRABatch(8, N)
    meta0 = b.meta.clone()
    for t in (torch.tensor([0.0, 1.0]), torch.tensor([1.9]), torch.tensor([True, False]), torch.tensor([1 + 0j]),
              torch.tensor([1.0], dtype=torch.float16), torch.tensor([1.0], dtype=torch.bfloat16)):
        for v in (True, False):
            refused(lambda: b.build(t, validate=v), TypeError, "adapter_ids", meta=b.meta)
            refused(lambda: lk.LoRABatch.from_ids(t, N, validate=v), TypeError, "adapter_ids")
            refused(lambda: lk.LoRABatch.from_segments(torch.ones(t.shape[0], dtype=torch.int32), t, N,
                                                       validate=v), TypeError, "seg_adapters")
            refused(lambda: lk.LoRABatch.from_segments(t, torch.zeros(t.shape[0], dtype=torch.int32), N,
                                                       validate=v), TypeError, "seg_lens")
    assert torch.equal(b.meta, meta0)
    with pytest.raises(TypeError, match="^adapter_ids"):
        lk.LoRABatch.from_ids([0, 1], N)  # not a tensor
    with pytest.raises(ValueError, match="^adapter_ids"):
        b.build(torch.zeros(2, device="meta", dtype=torch.int32))  # no data to serve


def test_ids_to_int32_saturates_and_keeps_int32_as_is():
    t = torch.tensor([0, -1, 4, 5, -2, 2**32 + 1, -(2**40), 2**40 + 2], dtype=torch.int64)
    assert ids_to_int32(t, N).tolist() == [0, -1, 4, N, -2, N, -2, N]
    i32 = torch.tensor([7, -9], dtype=torch.int32)
    assert ids_to_int32(i32, N) is i32  # no copy on the common path
    u64 = _tensor([2**64 - 1, 2**63, 3], torch.uint64)
    assert ids_to_int32(u64, N).tolist() == [N, N, 3]
    assert ids_to_int32(torch.empty(3, dtype=torch.int64, device="meta"), N).dtype == torch.int32  # no data read


class _NoHostReads(torch.overrides.TorchFunctionMode):
    """Fails on every tensor -> host read (what would be a device sync on a GPU)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.nonzero, torch.nonzero,
             torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__float__}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        assert func not in self.READS, f"host read: {func}"
        return func(*args, **(kwargs or {}))


def test_unvalidated_build_of_wide_ids_reads_nothing_on_the_host():
    """validate=False masks wide ids with device ops only (no sync on a GPU): the wrapper, the narrowing and the
    torch builder, each traced by a TorchFunctionMode that refuses host reads."""
    ids = _tensor([0, 2**32 + 1, -1, 3, 2**40, -7], torch.int64)
    u64 = _tensor([2**64 - 1, 1, 2**63], torch.uint64)
    b = lk.LoRABatch(8, N)
    with _NoHostReads():
        b.build(ids, validate=False)
        ids_to_int32(ids, N)
        ids_to_int32(u64, N)
        build_batch_torch_(torch.zeros_like(b.meta), ids, None, 8, N)
    _check_meta(b, ids.tolist())
    with pytest.raises(AssertionError, match="host read"), _NoHostReads():  # the mode does see reads
        b.build(ids, validate=True)


# ---- the compiled builder's path: what the extension receives, and the real kernel on the CPU emulator ------------


class _RecordingExt:
    """Stands for ``_ext.get()``: checks what the C++ launcher checks (int32 ids, meta's device), records the ids it
    is handed, and fills meta with the spec (the emulator test below runs the real kernel on the recorded ids)."""

    def __init__(self):
        self.calls = []

    def build_batch_(self, meta, ids, ranks, max_tokens, max_adapters):
        assert ids.dtype == torch.int32 and ids.device == meta.device, (ids.dtype, ids.device)
        self.calls.append((ids.clone(), max_tokens, max_adapters, meta.clone()))
        build_batch_torch_(meta, ids, ranks, max_tokens, max_adapters)


@pytest.fixture
def cuda_builder_path(monkeypatch):
    """Route ``build_batch_`` to the compiled builder's branch of ops/batch_ops.py with a recording extension."""
    from lora_kernels import _ext
    from lora_kernels.ops import batch_ops

    rec = _RecordingExt()
    real_select = backends.select
    monkeypatch.setattr(batch_ops.backends, "select",
                        lambda family, dev: "cuda" if family == "batch" else real_select(family, dev))
    monkeypatch.setattr(_ext, "get", lambda build=True: rec)
    return rec


@pytest.mark.parametrize("validate", [True, False])
def test_compiled_builder_path_never_receives_an_aliased_id(cuda_builder_path, validate):
    n = 0
    for dtype, cls in CASES:
        ids = _ids_for(dtype, cls)
        b = lk.LoRABatch(16, N)
        if validate and cls in BAD:
            refused(lambda: b.build(_tensor(ids, dtype)), ValueError, "adapter_ids", meta=b.meta)
            continue
        b.build(_tensor(ids, dtype), validate=validate)
        handed = cuda_builder_path.calls[-1][0].tolist()
        # every id keeps its class: in range ids and -1 unchanged, any other id still out of range in int32
        assert [v if -1 <= v < N else "bad" for v in ids] == [v if -1 <= v < N else "bad" for v in handed]
        _check_meta(b, ids)
        n += 1
    assert n == sum(1 for _, c in CASES if not (validate and c in BAD)) and len(cuda_builder_path.calls) == n


def test_compiled_builder_kernel_on_emulator_counts_wide_ids(cuda_builder_path, tmp_path):
    """The real kernel source (csrc/kernels/lora_batch.cuh, CPU emulator of test_extension.py, in a subprocess
    with a timeout) on the int32 ids the library hands to the extension for wide ids: same meta as the spec, every
    out-of-range id counted, none aliased."""
    from test_extension import _build_emulator

    cases = []
    for dtype in (torch.int64, torch.uint64, torch.uint32):  # the dtypes wider than int32: one batch each, every
        ids = [v for cls in BAD if _class_values(dtype, cls) for v in _ids_for(dtype, cls)]  # bad class in it
        lk.LoRABatch(64, N).build(_tensor(ids, dtype), validate=False)
        cases.append(ids)
    calls = cuda_builder_path.calls
    assert len(calls) == len(cases) == 3
    exe = _build_emulator(tmp_path)
    lines = []
    for ids32, Tc, n, init in calls:
        T = ids32.numel()
        lines += [f"{T} {Tc} {n} -1 {227 * 1024} 1 0 0 0", " ".join(map(str, ids32.tolist())), "",
                  " ".join(map(str, init.tolist()))]
    out = subprocess.run([exe], input="\n".join(lines) + "\n", check=True, capture_output=True, text=True,
                         timeout=120).stdout.splitlines()
    assert len(out) == 2 * len(calls)
    for k, ((ids32, Tc, n, init), ids) in enumerate(zip(calls, cases)):
        got = torch.tensor(list(map(int, out[2 * k + 1].split())), dtype=torch.int32)
        want = init.clone()
        build_batch_torch_(want, ids32, None, Tc, n)
        assert torch.equal(got, want), ids
        lay = MetaLayout(Tc, min(Tc, n))
        T = len(ids)
        assert got[:T].tolist() == [v if 0 <= v < N else -1 for v in ids]
        assert int(got[lay.scalars + 3]) == sum(1 for v in ids if v < -1 or v >= N) > 0


# ---- from_segments ---------------------------------------------------------------------------------------------


def test_from_segments_capacity_above_T_works():
    lens = torch.tensor([2, 0, 3], dtype=torch.int32)
    ads = torch.tensor([1, 4, -1], dtype=torch.int64)
    for cap in (5, 6, 64):
        b = lk.LoRABatch.from_segments(lens, ads, N, max_tokens=cap)
        assert (b.num_tokens, b.max_tokens) == (5, cap)
        _check_meta(b, [1, 1, -1, -1, -1])
    refused(lambda: lk.LoRABatch.from_segments(lens, ads, N, max_tokens=4), ValueError, "max_tokens",
            lens=lens, ads=ads)
    for bad in (-1, 2.0, True, "8"):
        refused(lambda: lk.LoRABatch.from_segments(lens, ads, N, max_tokens=bad),
                ValueError if bad == -1 else TypeError, "max_tokens")
    b = lk.LoRABatch.from_segments(torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), N,
                                   max_tokens=3)
    assert (b.num_tokens, b.max_tokens) == (0, 3)


@pytest.mark.parametrize("validate", [True, False])
def test_from_segments_refuses_bad_lengths_naming_seg_lens(validate):
    ads = torch.tensor([0, 1], dtype=torch.int32)
    for lens, what in (([2, -3], "non-negative"), ([2, -(2**40)], "non-negative"), ([1, 2**40], "lengths <="),
                       ([2**62, 2**62], "lengths <="), ([2**31, 2**31], "lengths <=")):
        t = torch.tensor(lens, dtype=torch.int64)
        msg = refused(lambda: lk.LoRABatch.from_segments(t, ads, N, validate=validate), ValueError, "seg_lens",
                      lens=t, ads=ads)
        assert what in msg
    u = _tensor([1, 2**64 - 1], torch.uint64)  # would be -1 reinterpreted as int64
    refused(lambda: lk.LoRABatch.from_segments(u, ads, N), ValueError, "seg_lens", lens=u)
    refused(lambda: lk.LoRABatch.from_segments(torch.tensor([1, 1]), ads[:1], N), ValueError, "seg_adapters")
    refused(lambda: lk.LoRABatch.from_segments(torch.tensor([[1]]), ads, N), ValueError, "seg_lens")
    refused(lambda: lk.LoRABatch.from_segments(torch.tensor([1, 1], device="meta"), ads.to("meta"), N),
            ValueError, "seg_lens")


def test_batch_capacities_are_integers_in_range():
    for bad, exc in ((0, ValueError), (True, TypeError), (2.0, TypeError), ("4", TypeError), (2**40, ValueError)):
        refused(lambda: lk.LoRABatch(bad, 4), exc, "max_tokens")
    for bad, exc in ((0, ValueError), (False, TypeError), (4.0, TypeError), (2**31 - 1, ValueError)):
        refused(lambda: lk.LoRABatch(4, bad), exc, "max_adapters")
    assert lk.LoRABatch(np.int64(4), np.int32(3)).max_tokens == 4


def test_rebuild_from_its_own_token_adapter():
    """Inputs aliasing the batch's meta are read before anything is written (copied first)."""
    b = lk.LoRABatch(8, N).build(torch.tensor([3, 0, 3, -1, 7], dtype=torch.int32), validate=False)
    b.build(b.token_adapter[:4])
    _check_meta(b, [3, 0, 3, -1])
    b.build(b.meta[1:4])  # shifted view of token_adapter: [0, 3, -1]
    _check_meta(b, [0, 3, -1])


# ---- outputs vs inputs and library-owned storage -------------------------------------------------------------


def _small_weights(dtype=torch.float32):
    """Tiny widths so that y can be a view of even the smallest library tensor (offsets, ranks, slice_info)."""
    g = torch.Generator().manual_seed(3)
    w = lk.LoRAWeights(4, 2, max_adapters=16, max_rank=2, dtype=dtype)
    for r in (1, 2):
        w.add(torch.randn(r, 4, generator=g), torch.randn(2, r, generator=g), alpha=2.0)
    return w


def _view_as_y(t: torch.Tensor, T: int, out: int, offset: int = 0) -> torch.Tensor:
    """[T, out] float32 view of ``t``'s storage (from ``offset`` float32 elements in)."""
    flat = t.detach().view(-1).view(torch.float32) if t.dtype != torch.float32 else t.detach().view(-1)
    return flat[offset: offset + T * out].view(T, out)


def _owned_sgmv(w, batch, **extra):
    return dict(a=w.a, b=w.b, offsets=w.offsets, ranks=w.ranks, scales=w.scales, slice_info=w.slice_info,
                meta=batch.meta, **extra)


LIB_STORAGE = ["a", "b", "offsets", "ranks", "scales", "slice_info", "meta"]


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("target", LIB_STORAGE)
@torch.no_grad()
def test_add_lora_and_expand_refuse_y_in_library_storage(target, fast):
    w = _small_weights()
    batch = lk.LoRABatch.from_ids(torch.tensor([0], dtype=torch.int32), w.max_adapters, max_tokens=16)
    x = torch.randn(1, 4)
    store = {"meta": batch.meta}.get(target) if target == "meta" else getattr(w, target)
    y = _view_as_y(store, 1, 2)
    h = lk.shrink(x, w, batch)
    owned = _owned_sgmv(w, batch, x=x, h=h)
    with fast_path(fast):
        msg = refused(lambda: lk.add_lora_(y, x, w, batch), ValueError, "y", **owned)
        label = "batch.meta" if target == "meta" else f"weights.{target}"
        assert label in msg, msg
        refused(lambda: lk.expand_(y, h, w, batch), ValueError, "y", **owned)
        refused(lambda: lk.add_lora_(y, x, w, batch, merged=1), ValueError, "y", **owned)
        # and the same weights and batch still serve a valid call correctly
        y_ok = torch.zeros(1, 2)
        lk.add_lora_(y_ok, x, w, batch)
    torch.testing.assert_close(y_ok.double(), naive_delta(x, w, torch.tensor([0])), rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_add_lora_with_y_a_view_of_b_is_refused_not_wrong():
    """The issue's case: y a view of B's rows used to return wrong values (B changed while being read)."""
    g = torch.Generator().manual_seed(0)
    w = lk.LoRAWeights(8, 8, max_adapters=2, max_rank=4, dtype=torch.float32)
    w.add(torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g))
    batch = lk.LoRABatch.from_ids(torch.zeros(4, dtype=torch.int32), 2)
    x = torch.randn(4, 8, generator=g)
    for fast in (True, False):
        with fast_path(fast):
            refused(lambda: lk.add_lora_(w.b[:4], x, w, batch), ValueError, "y", **_owned_sgmv(w, batch, x=x))
            refused(lambda: lk.add_lora_(w.b[2:6], x, w, batch), ValueError, "y", **_owned_sgmv(w, batch, x=x))


@pytest.mark.parametrize("fast", [True, False])
@torch.no_grad()
def test_y_overlapping_x_or_h_is_refused(fast):
    w = _small_weights()
    batch = lk.LoRABatch.from_ids(torch.tensor([0, 1, -1], dtype=torch.int32), w.max_adapters)
    buf = torch.randn(40)
    x = buf[:12].view(3, 4)
    with fast_path(fast):
        refused(lambda: lk.add_lora_(buf[10:16].view(3, 2), x, w, batch), ValueError, "y", buf=buf)
        h = lk.shrink(x, w, batch)
        refused(lambda: lk.expand_(h.view(-1)[:6].view(3, 2), h, w, batch), ValueError, "y", h=h)
        ok = buf[20:26].view(3, 2)
        lk.add_lora_(ok, x, w, batch)  # disjoint views of one buffer are fine


@torch.no_grad()
def test_dual_lora_refuses_y_in_its_storage():
    g = torch.Generator().manual_seed(1)
    wd = lk.DualLoRAWeights(4, 2, max_adapters=16, max_rank=2, dtype=torch.float32)
    wd.new_adapter(2, 4.0, generator=g)
    batch = lk.LoRABatch.from_ids(torch.tensor([0], dtype=torch.int32), 16, max_tokens=16)
    x = torch.randn(1, 4, generator=g)
    owned = dict(a=wd.a, b=wd.b, lw=wd.ln_weight, lb=wd.ln_bias, offsets=wd.offsets, ranks=wd.ranks,
                 ranks2=wd.ranks2, scales=wd.scales, slice_info=wd.slice_info, in_slice_info=wd.in_slice_info,
                 meta=batch.meta, x=x)
    for name in ("a", "b", "ln_weight", "ln_bias", "offsets", "ranks", "scales", "slice_info", "in_slice_info"):
        y = _view_as_y(getattr(wd, name), 1, 2)
        msg = refused(lambda: lk.dual_lora_(y, x, wd, batch), ValueError, "y", **owned)
        assert f"w_dual.{name}" in msg or (name == "scales" and "w_dual." in msg), msg
    refused(lambda: lk.dual_lora_(_view_as_y(batch.meta, 1, 2), x, wd, batch), ValueError, "y", **owned)
    y = torch.zeros(1, 2)
    lk.dual_lora_(y, x, wd, batch)
    want = lk.reference.dual_lora_delta(x, wd.a, wd.b, wd.ln_weight, wd.ln_bias, wd.offsets, wd.ranks, wd.scales,
                                        torch.tensor([0]), wd.eps)
    torch.testing.assert_close(y, want)


# ---- numeric and shape arguments ----------------------------------------------------------------------------------


@torch.no_grad()
def test_merged_accepts_integers_only():
    w = _small_weights()
    batch = lk.LoRABatch.from_ids(torch.tensor([0, 1, -1], dtype=torch.int32), w.max_adapters)
    x, y = torch.randn(3, 4), torch.randn(3, 2)
    want = lk.add_lora_(y.clone(), x, w, batch, merged=1)
    for m in (np.int64(1), np.int8(1), torch.tensor(1)):
        assert torch.equal(lk.add_lora_(y.clone(), x, w, batch, merged=m), want)
    for bad in (True, 1.0, "1", 1 + 0j, torch.tensor(1.0), -1, 16, 2**70, 5, torch.tensor([1, 2])):
        refused(lambda: lk.add_lora_(y, x, w, batch, merged=bad), ValueError, "merged", y=y, x=x,
                **_owned_sgmv(w, batch))
    refused(lambda: lk.add_lora_(y, x, w.a, batch, merged=1), TypeError, "weights", y=y)


def _deform_inputs(shapes=((3, 4), (2, 2)), B=1, Q=2, H=2, D=3, P=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, H, D, generator=g, dtype=dtype)
    loc = torch.rand(B, Q, H, len(shapes), P, 2, generator=g, dtype=dtype)
    attn = torch.rand(B, Q, H, len(shapes), P, generator=g, dtype=dtype)
    return value, loc, attn


@pytest.mark.parametrize("validate", [True, False])
def test_deform_spatial_shapes_must_be_integers(validate):
    value, loc, attn = _deform_inputs()
    owned = dict(value=value, loc=loc, attn=attn)
    call = lambda s, ls=None: lk.deform_pool(value, s, ls, loc, attn, validate=validate)  # noqa: E731
    want = call([(3, 4), (2, 2)])
    assert torch.equal(call(np.array([[3, 4], [2, 2]])), want)
    assert torch.equal(call([(torch.tensor(3), 4), (2, np.int16(2))]), want)
    for bad in ([(3, 4.0), (2, 2)], [(3, 4), (2.5, 2)], [(3, 4), (2, True)], [(3, "4"), (2, 2)],
                np.array([[3.0, 4.0], [2.0, 2.0]]), [(3, 4, 1), (2, 2)], [3, 4], "34",
                torch.tensor([[3, 4], [2, 2]], dtype=torch.float32), torch.tensor([[3, 4], [2, 2]], dtype=torch.int32)):
        refused(lambda: call(bad), TypeError, "spatial_shapes", **owned)
    starts = torch.tensor([0, 12])
    for bad_starts in (starts.float(), starts.int()):
        refused(lambda: call([(3, 4), (2, 2)], bad_starts), TypeError, "level_start_index", **owned)


def test_deform_huge_or_inconsistent_shapes_are_refused_naming_the_argument():
    value, loc, attn = _deform_inputs()
    owned = dict(value=value, loc=loc, attn=attn)
    huge = [(2**40, 2**40), (2, 2)]  # H*W = 2**80: past int64
    for v in (True, False):
        msg = refused(lambda: lk.deform_pool(value, huge, None, loc, attn, validate=v), ValueError,
                      "spatial_shapes", **owned)
        assert "2**63" in msg
        refused(lambda: lk.deform_pool(value, [(2**64, 1), (2, 2)], None, loc, attn, validate=v), ValueError,
                "spatial_shapes", **owned)
    for shapes in ([(2**31, 2**31), (2, 2)], [(2**20, 2**20), (1, 1)], [(2**62, 3), (2, 2)], [(3, 4), (-2, -8)]):
        for as_tensor in (False, True):
            s = torch.tensor(shapes) if as_tensor else shapes
            refused(lambda: lk.deform_pool(value, s, None, loc, attn), ValueError, "spatial_shapes", **owned)
    refused(lambda: lk.deform_pool(value, [(3, 4), (2, 3)], None, loc, attn), ValueError, "value", **owned)
    bad_starts = torch.tensor([0, 11])
    refused(lambda: lk.deform_pool(value, torch.tensor([[3, 4], [2, 2]]), bad_starts, loc, attn), ValueError,
            "level_start_index", **owned, starts=bad_starts)
    # the fused op shares the checks
    ref = torch.rand(2, 2)
    off = torch.randn(1, 2, 2, 2, 2, 2)
    logits = torch.randn(1, 2, 2, 4)
    refused(lambda: lk.deform_sample(value, huge, None, ref, off, logits), ValueError, "spatial_shapes",
            off=off, logits=logits, value=value)
    refused(lambda: lk.deform_sample(value, [(3, 4.0), (2, 2)], None, ref, off, logits), TypeError,
            "spatial_shapes", off=off)


def test_vce_module_arguments():
    from lora_kernels.nn.vce import VisualCueEnhancement

    m = VisualCueEnhancement(8, 2, 2, 1)
    for bad in ([(2, 2.0), (1, 1)], [(2.5, 2), (1, 1)], [(True, 2), (1, 1)]):
        with pytest.raises(TypeError, match=r"^spatial_shapes"):
            VisualCueEnhancement(8, 2, 2, 1, spatial_shapes=bad)
        with pytest.raises(TypeError, match=r"^spatial_shapes"):
            m([torch.randn(1, 4, 8), torch.randn(1, 1, 8)], spatial_shapes=bad)
    for bad, exc in ((float("nan"), ValueError), (0.0, ValueError), (-1e-6, ValueError), ("1e-6", TypeError)):
        with pytest.raises(exc, match=r"^eps"):
            VisualCueEnhancement(8, 2, 2, 1, eps=bad)
    with pytest.raises(ValueError, match=r"^query_level"):
        VisualCueEnhancement(8, 2, 2, 1, query_level=True)


# ---- engine integrations: numeric arguments --------------------------------------------------------------------


def test_engine_integrations_refuse_non_numeric_scales_and_ids():
    from test_integrations_engines import OUTS, _sgl_setup, _vllm_setup, RANKS, SCAL

    g, a, b, pw, slots, _ = _vllm_setup()
    T = len(slots)
    x = torch.randn(T, a[0].shape[-1], generator=g)
    y = torch.randn(T, sum(OUTS), generator=g)
    h = torch.zeros(len(OUTS), T, a[0].shape[2])
    for bad, exc in (("2", TypeError), (True, TypeError), (1 + 1j, TypeError), (float("nan"), ValueError),
                     (float("inf"), ValueError), (1e39, ValueError)):
        refused(lambda: pw.add_lora_linear(y, x, tuple(a), tuple(b), bad, OUTS), exc, "scale", y=y, x=x)
        refused(lambda: pw.add_shrink(h, x, tuple(a), bad), exc, "scale", h=h, x=x)
    pw.add_lora_linear(y, x, tuple(a), tuple(b), np.float32(0.5), OUTS)  # numpy reals are real numbers

    _, _, _, be, _ = _sgl_setup(1, (10,))
    info = be.batch_info
    for kw, name in ((dict(scalings=["0.5", 3.0, 2.0]), "scalings[0]"), (dict(scalings=[0.5, float("nan"), 2.0]),
                                                                         "scalings[1]"),
                     (dict(weight_indices=[0, 1.0]), "weight_indices[1]"), (dict(weight_indices=["0", 1]),
                                                                            "weight_indices[0]"),
                     (dict(lora_ranks=[4, 0, 8.5]), "lora_ranks[2]"), (dict(lora_ranks=[4, -1, 8]), "lora_ranks[1]")):
        args = dict(forward_batch=[1, 1], weight_indices=[0, 2], lora_ranks=RANKS, scalings=SCAL)
        args.update(kw)
        exc = ValueError if "nan" in repr(kw) or "-1" in repr(kw) else TypeError
        refused(lambda: be.prepare_lora_batch(**args), exc, name, meta=be.batch.meta)
        assert be.batch_info is info and be.batch_info.bs == 5  # the previous batch is kept
