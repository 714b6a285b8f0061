"""GPU tests (``-m cuda``; skipped without a GPU): bf16/fp16/fp32 on the default CUDA path vs the fp32
reference with the tolerance rule, CUDA-graph capture of LoRABatch build + add_lora_ with no host sync, and the
compiled CUDA batch builder against the torch builder (the spec). One CPU test checks that the builder test
really drives the compiled extension, so a regression to the torch builder on both sides fails without a GPU."""

import pytest
import torch
from helpers import assert_compiled_cuda_op, require_compiled_extension

import lora_kernels as lk
from lora_kernels import _ext, reference
from lora_kernels.batch import MetaLayout, build_batch_torch_
from lora_kernels.plan import decode_counters, fused_counters
from lora_kernels.ops import batch_ops


def _case(dtype, outs=(4096,), in_f=4096, ranks=(8, 16, 33, 64, 128), T=257, frac_none=0.2, seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    S = len(outs)
    w = lk.LoRAWeights(in_f, list(outs) if S > 1 else outs[0], max_adapters=len(ranks), max_rank=max(ranks),
                       dtype=dtype, device=device)
    for r in ranks:
        A = [torch.randn(r, in_f, generator=g) / in_f**0.5 for _ in range(S)]
        B = [torch.randn(o, r, generator=g) / r**0.5 for o in outs]
        w.add(A if S > 1 else A[0], B if S > 1 else B[0], alpha=2.0 * r)
    ids = torch.randint(0, len(ranks), (T,), generator=g, dtype=torch.int32)
    none = torch.rand(T, generator=g) < frac_none
    if bool(none.all()):
        none[0] = False  # every case serves a token (T = 1 with seed 0 drew -1: it only tested the early exit)
    ids[none] = -1
    assert bool((ids >= 0).any()), f"T={T} seed={seed}: no token has an adapter"
    x = torch.randn(T, in_f, generator=g).to(device, dtype)
    y = torch.randn(T, sum(outs), generator=g).to(device, dtype)
    return w, ids, x, y


TOLERANCE_CASES = [(outs, T) for outs in [(4096,), (4096, 1024, 1024)] for T in (1, 7, 257)]


def test_every_tolerance_case_serves_tokens():
    """CPU replay of the GPU cases' draws (same generator, same order): each has tokens with an adapter, so the
    tolerance test checks a delta, not only the early exit (_case asserts it)."""
    for outs, T in TOLERANCE_CASES:
        _case(torch.float32, outs, T=T, device="cpu")


def _torch_lowp_delta(x, w, ids):
    """The same delta done by PyTorch in the low precision (the yardstick of the tolerance rule)."""
    out = torch.zeros(x.shape[0], w.out_features, dtype=x.dtype, device=x.device)
    for i in w.loaded:
        t = (ids.to(x.device) == i).nonzero().flatten()
        for s in range(w.num_slices):
            A, B, sc = w.adapter(i, s)
            c0 = w.slice_cols[s]
            out[t, c0 : c0 + w.slice_outs[s]] = sc * ((x[t] @ A.to(x.dtype).T) @ B.to(x.dtype).T)
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("outs,T", TOLERANCE_CASES)
def test_add_lora_cuda_tolerance_rule(dtype, outs, T):
    w, ids, x, y = _case(dtype, outs, T=T)
    batch = lk.LoRABatch(1024, w.max_adapters, "cuda").build(ids.cuda(), ranks=w.ranks)
    got = y.clone()
    lk.add_lora_(got, x, w, batch)
    ref = y.double() + reference.lora_delta(x, w, ids.cuda()).double()
    lowp = y.double() + _torch_lowp_delta(x, w, ids).double()
    err = (got.double() - ref).abs().max().item()
    err_torch = (lowp - ref).abs().max().item()
    assert err <= 2 * err_torch + 1e-5, (err, err_torch)
    none = ids.cuda() < 0
    assert torch.equal(got[none], y[none])


@pytest.mark.cuda
def test_cuda_graph_capture_build_and_add_lora_without_host_sync():
    w, ids, x, y = _case(torch.bfloat16, T=64)
    batch = lk.LoRABatch(64, w.max_adapters, "cuda")
    ids_buf = ids.cuda()
    x_buf, y_buf = x.clone(), torch.zeros_like(y)
    # Warm up on a side stream (Triton compiles, the extension loads), as torch's graph docs require.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        batch.build(ids_buf, ranks=w.ranks, validate=False)
        lk.add_lora_(y_buf, x_buf, w, batch)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(g):
            y_buf.zero_()
            batch.build(ids_buf, ranks=w.ranks, validate=False)
            lk.add_lora_(y_buf, x_buf, w, batch)
        for seed in range(3):
            gen = torch.Generator().manual_seed(100 + seed)
            new_ids = torch.randint(-1, w.max_adapters, (64,), generator=gen, dtype=torch.int32)
            new_x = torch.randn(64, 4096, generator=gen).to("cuda", torch.bfloat16)
            ids_buf.copy_(new_ids.cuda())
            x_buf.copy_(new_x)
            g.replay()
            torch.cuda.set_sync_debug_mode(0)
            want = reference.lora_delta(new_x, w, new_ids.cuda())
            torch.testing.assert_close(y_buf.float(), want, rtol=2e-2, atol=2e-2)
            torch.cuda.set_sync_debug_mode("error")
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ---- the compiled batch builder against the torch builder ------------------------------------------------
def _torch_builder_forbidden(monkeypatch) -> None:
    """Make the torch builder raise wherever the library would call it: the side under test must not use it."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the torch builder ran on the side that must use the compiled CUDA builder")

    monkeypatch.setattr(batch_ops, "build_batch_torch_", forbidden)


def _build_compiled(batch: lk.LoRABatch, ids: torch.Tensor, ranks: torch.Tensor) -> lk.LoRABatch:
    """The side under test: ``LoRABatch.build`` with the compiled builder forced (``lora_kernels_C::build_batch_``
    from the extension). The default on a GPU is the torch builder unless the tuning table lists the compiled
    one as verified, which would make the comparison below torch against torch."""
    with lk.backends.use_backend("cuda"):
        assert lk.backends.select("batch", batch.meta.device) == "cuda"
        batch.build(ids, ranks=ranks, validate=False)
    return batch


def _spec_meta(ids: torch.Tensor, ranks: torch.Tensor, max_tokens: int, max_adapters: int) -> torch.Tensor:
    """The spec side: the torch builder, called directly on CPU tensors (garbage-filled: every field rewritten)."""
    lay = MetaLayout(max_tokens, min(max_tokens, max_adapters))
    meta = torch.full((lay.size,), -7, dtype=torch.int32)
    build_batch_torch_(meta, ids.cpu(), ranks.cpu(), max_tokens, max_adapters)
    return meta


@pytest.mark.cuda
def test_compiled_batch_builder_matches_torch_builder_without_host_sync(monkeypatch):
    T, N = 4096, 256
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(-1, N, (T,), generator=gen, dtype=torch.int32).cuda()
    ranks = torch.randint(1, 129, (1, N), generator=gen, dtype=torch.int32).cuda()
    batch = lk.LoRABatch(T, N, "cuda")
    batch.meta.fill_(-7)
    _torch_builder_forbidden(monkeypatch)
    _build_compiled(batch, ids, ranks)  # warm-up (loads the extension)
    torch.cuda.set_sync_debug_mode("error")
    try:
        _build_compiled(batch, ids, ranks)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    monkeypatch.undo()
    spec = _spec_meta(ids, ranks, T, N)
    assert torch.equal(batch.meta.cpu(), spec), "compiled builder differs from the torch builder"
    cpu = lk.LoRABatch(T, N)
    cpu.meta.copy_(spec)
    cpu.num_tokens = T
    assert batch.to_dict() == cpu.to_dict()


def test_builder_test_drives_the_compiled_extension(monkeypatch):
    """CPU side of the test above: the builder it calls is the extension's C++ op with a CUDA kernel, and
    ``_build_compiled`` reaches it (the device work stubbed, CPU tensors standing in for CUDA ones), never the
    torch builder. So a change that makes both sides the torch builder fails here, without a GPU."""
    assert_compiled_cuda_op(require_compiled_extension().build_batch_, "lora_kernels_C::build_batch_")

    calls = []

    class StubExtension:  # records the call the real extension would get
        @staticmethod
        def build_batch_(meta, adapter_ids, ranks, max_tokens, max_adapters):
            calls.append((meta, max_tokens, max_adapters))

    real_select = lk.backends.select
    monkeypatch.setattr(_ext, "get", lambda *a, **k: StubExtension)
    monkeypatch.setattr(lk.backends, "select", lambda family, device: real_select(family, "cuda"))
    _torch_builder_forbidden(monkeypatch)
    batch = lk.LoRABatch(8, 4)
    ids = torch.tensor([0, 3, -1, 1, 1, 2, -1, 0], dtype=torch.int32)
    _build_compiled(batch, ids, torch.full((1, 4), 8, dtype=torch.int32))
    assert len(calls) == 1 and calls[0][0] is batch.meta and calls[0][1:] == (8, 4)


@pytest.mark.cuda
@pytest.mark.parametrize("outs", [(4096,), (4096, 1024, 1024)])
@pytest.mark.parametrize("T", [7, 257])
def test_add_lora_mixed_mode_cuda_bf16(outs, T):
    """Mixed mode (merged=m) on the default CUDA path, bf16: base_merged(x) + mixed delta vs the unmerged truth
    base(x) + delta, with the rule's yardstick being PyTorch doing the mixed computation in bf16."""
    w, ids, x, y = _case(torch.bfloat16, outs, T=T, seed=3)
    m = 3  # rank 64
    ids[: T // 3] = m
    batch = lk.LoRABatch(1024, w.max_adapters, "cuda").build(ids.cuda(), ranks=w.ranks)
    ids_c = ids.cuda()
    d_all = reference.lora_delta(x, w, ids_c).double()  # the unmerged delta
    d_m = reference.lora_delta(x, w, torch.full_like(ids_c, m)).double()
    # y plays base_merged(x) = base(x) + delta_m(x): the truth is then y - delta_m + delta (m's tokens: y)
    truth = y.double() - torch.where((ids_c == m)[:, None], 0.0, d_m) + torch.where((ids_c == m)[:, None], 0.0, d_all)
    got = y.clone()
    lk.add_lora_(got, x, w, batch, merged=m)
    not_m = torch.where(ids_c == m, torch.full_like(ids_c, -1), ids_c)
    others = torch.where(ids_c == m, torch.full_like(ids_c, -1), torch.full_like(ids_c, m))
    lowp = (y.double() + _torch_lowp_delta(x, w, not_m.cpu()).double()
            - _torch_lowp_delta(x, w, others.cpu()).double()).to(torch.bfloat16).double()  # PyTorch rounds y too
    err = (got.double() - truth).abs().max().item()
    err_torch = (lowp - truth).abs().max().item()
    assert err <= 2 * err_torch + 1e-5, (err, err_torch)
    assert torch.equal(got[ids_c == m], y[ids_c == m])


# ---- the compiled decode kernel (csrc/sgmv_decode.cu) ----------------------------------------------------
def _decode_gate(monkeypatch, ext, device_type="cuda", verified=True):
    """Let add_lora_'s dispatch choose the decode kernel: the name verified on this GPU, ``_ext.get`` returning
    ``ext`` (the extension, or a recording stand-in), and the gate's device type (a CPU test sets "cpu")."""
    from lora_kernels import tuning
    from lora_kernels.ops import sgmv

    names = frozenset({sgmv._DECODE_KERNEL}) if verified else frozenset()
    monkeypatch.setattr(tuning, "verified_kernels", lambda device: names)
    monkeypatch.setattr(_ext, "get", lambda *a, **k: ext)
    monkeypatch.setattr(sgmv, "_DECODE_DEVICE_TYPE", device_type)


class _RecordingDecode:
    """Stands in for the extension: ``sgmv_decode_`` records its arguments, then runs ``inner`` (the real op) or,
    when None, the reference (so add_lora_'s result stays right and the test can compare it)."""

    def __init__(self, inner=None):
        self.calls, self.inner = [], inner

    def sgmv_decode_(self, y, x, a, b, offsets, ranks, scales, tok, outs, r_cap, merged, partial, counters):
        from lora_kernels.ops.sgmv import _reference_mixed_

        self.calls.append({"T": x.shape[0], "tok": tok.clone(), "outs": list(outs), "r_cap": r_cap,
                           "merged": merged, "partial": partial.numel(), "counters": counters,
                           "counters_before": counters.clone()})  # no host sync: the GPU test forbids one
        if self.inner is not None:
            return self.inner(y, x, a, b, offsets, ranks, scales, tok, outs, r_cap, merged, partial, counters)
        cols = [sum(outs[:i]) for i in range(len(outs))]
        acc = y.float()
        if merged < 0:
            reference.add_lora_(acc, x, a, b, offsets, ranks, scales, tok, cols, outs)
        else:
            _reference_mixed_(acc, x, a, b, offsets, ranks, scales, tok, cols, outs, merged)
        y.copy_(acc.to(y.dtype))


def test_add_lora_routes_decode_batches_to_the_compiled_kernel_when_verified(monkeypatch):
    """CPU proof of the dispatch gate (CPU tensors stand in for CUDA ones; the extension is a recording stub):
    add_lora_ with T <= 64 calls ``sgmv_decode_`` with the batch's token ids, the slices' widths, a workspace big
    enough for the partial sums and zeroed counters owned by the batch, on the eager fast path and through the
    custom op alike, in normal and mixed mode; and it does not when the kernel is not verified, T > 64, a backend
    is forced, x and y differ in dtype or max_rank > 256, nor (with the real gate) for CPU tensors."""
    from lora_kernels.ops import sgmv

    stub = _RecordingDecode()
    w, ids, x, y = _case(torch.float32, (48, 16, 16), in_f=300, ranks=(4, 8, 16), T=9, device="cpu")
    batch = lk.LoRABatch(128, w.max_adapters).build(ids, ranks=w.ranks)

    def run(merged=None, xx=x, yy=y, bb=batch, ww=w):
        got = yy.clone()
        lk.add_lora_(got, xx, ww, bb, merged=merged)
        return got

    want, want_mixed = run(), run(merged=1)  # the reference path (the gate is closed)
    _decode_gate(monkeypatch, stub, device_type="cuda")  # real gate: CPU tensors never take it
    run()
    assert stub.calls == []
    _decode_gate(monkeypatch, stub, device_type="cpu", verified=False)
    run()
    assert stub.calls == []
    _decode_gate(monkeypatch, stub, device_type="cpu")
    for fast in (True, False):
        monkeypatch.setattr(sgmv, "fast_path", fast)
        stub.calls.clear()
        assert torch.equal(run(), want) and torch.equal(run(merged=1), want_mixed)
        assert [c["merged"] for c in stub.calls] == [-1, 1], f"fast_path={fast}"
        for c in stub.calls:
            assert c["T"] == 9 and torch.equal(c["tok"], ids) and c["outs"] == [48, 16, 16] and c["r_cap"] == 16
            # the same zeroed counters every call: the batch's (the end of its plan)
            assert not c["counters_before"].any()
            assert c["counters"].data_ptr() == stub.calls[0]["counters"].data_ptr()
            assert c["counters"].dtype == torch.int32 and c["counters"].numel() >= 9 * 3
        assert stub.calls[0]["partial"] >= 9 * 3 * 2 * 16 and stub.calls[1]["partial"] >= 9 * 3 * 2 * 32
    stub.calls.clear()
    with lk.backends.use_backend("reference"):
        run()
    big = lk.LoRABatch(128, w.max_adapters).build(torch.zeros(65, dtype=torch.int32), ranks=w.ranks)
    run(xx=torch.randn(65, 300), yy=torch.zeros(65, 80), bb=big)
    run(yy=y.to(torch.bfloat16))
    w_big = lk.LoRAWeights(300, [48, 16, 16], max_adapters=3, max_rank=257)
    run(ww=w_big)
    assert stub.calls == []


def _decode_case(dtype, wdtype, outs, in_f, ranks, T, seed, device="cuda"):
    """``_case``, with the weights stored in ``wdtype`` (the same adapters and scales)."""
    w, ids, x, y = _case(dtype, outs, in_f=in_f, ranks=ranks, T=T, seed=seed, device=device)
    if wdtype != dtype:
        w2 = lk.LoRAWeights(in_f, list(outs), max_adapters=len(ranks), max_rank=max(ranks), dtype=wdtype,
                            device=device)
        for i in w.loaded:
            parts = [w.adapter(i, s) for s in range(len(outs))]
            w2.add([p[0] for p in parts], [p[1] for p in parts], scale=[p[2] for p in parts], adapter_id=i)
        w = w2
    return w, ids, x, y


DECODE_CASES = [  # (outs, in, ranks, T, weights dtype (None: x's), merged)
    ((4096,), 4096, (8, 16, 33, 64, 128), 1, None, None),
    ((4096, 1024, 1024), 4096, (8, 16, 33, 64, 128), 7, None, 3),
    ((512,), 1000, (5, 256), 64, None, None),
    ((72, 13), 264, (4, 9, 2), 33, None, 0),
    ((2048, 512), 2048, (16, 32), 16, torch.float32, None),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=[f"outs{c[0]}-in{c[1]}-T{c[3]}-m{c[5]}" for c in DECODE_CASES])
def test_decode_kernel_matches_reference(monkeypatch, dtype, case):
    """add_lora_ through the compiled decode kernel (the gate opened, every call recorded) vs the fp64 truth,
    with the tolerance rule's yardstick (PyTorch in the low precision); rows it must not touch keep their bits;
    two runs are bit-identical (deterministic) and the counters are back to zero; no host sync."""
    from lora_kernels.ops import sgmv

    outs, in_f, ranks, T, wdt, m = case
    rec = _RecordingDecode(inner=require_compiled_extension().sgmv_decode_)
    _decode_gate(monkeypatch, rec)
    w, ids, x, y = _decode_case(dtype, wdt or dtype, outs, in_f, ranks, T, seed=11)
    ids_c = ids.cuda()
    batch = lk.LoRABatch(64, w.max_adapters, "cuda").build(ids_c, ranks=w.ranks)
    got = [y.clone(), y.clone()]
    lk.add_lora_(got[0], x, w, batch, merged=m)  # warm-up: allocates the workspace and counters
    torch.cuda.set_sync_debug_mode("error")
    try:
        lk.add_lora_(got[1], x, w, batch, merged=m)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(rec.calls) == 2
    assert torch.equal(got[0], got[1]), "two runs differ"
    assert bool((decode_counters(batch.plan) == 0).all()), "counters not reset"
    keep = ids_c == (m if m is not None else -1)
    assert torch.equal(got[0][keep], y[keep])
    if m is None:
        truth = y.double() + reference.lora_delta(x, w, ids_c).double()
        lowp = y.double() + _torch_lowp_delta(x, w, ids).double()
    else:
        not_m = torch.where(ids_c == m, torch.full_like(ids_c, -1), ids_c)
        others = torch.where(ids_c == m, torch.full_like(ids_c, -1), torch.full_like(ids_c, m))
        truth = y.double() + reference.lora_delta(x, w, not_m).double() - reference.lora_delta(x, w, others).double()
        lowp = y.double() + _torch_lowp_delta(x, w, not_m.cpu()).double() - _torch_lowp_delta(
            x, w, others.cpu()).double()
    lowp = lowp.to(dtype).double()  # PyTorch rounds y too
    err = (got[0].double() - truth).abs().max().item()
    err_torch = (lowp - truth).abs().max().item()
    assert err <= 2 * err_torch + 1e-5, (err, err_torch)


@pytest.mark.cuda
def test_decode_kernel_checks_arguments():
    """The launcher's host checks: clear errors, nothing launched."""
    ext = require_compiled_extension()
    w, ids, x, y = _case(torch.bfloat16, (256,), in_f=256, ranks=(8, 16), T=4)
    batch = lk.LoRABatch(64, w.max_adapters, "cuda").build(ids.cuda(), ranks=w.ranks)
    part = torch.empty(4 * 16, dtype=torch.float32, device="cuda")
    cnt = torch.zeros(64, dtype=torch.int32, device="cuda")
    tok = batch.meta[:4]

    def call(**kw):
        args = dict(y=y, x=x, a=w.a, b=w.b, offsets=w.offsets, ranks=w.ranks, scales=w.scales, tok=tok, outs=[256],
                    r=16, m=-1, part=part, cnt=cnt)
        args.update(kw)
        ext.sgmv_decode_(*args.values())

    call()
    for kw, msg in [({"x": x.half()}, "x: expected y's dtype"), ({"r": 257}, "max_rank"), ({"outs": [255]}, "y: "),
                    ({"part": part[:10]}, "partial"), ({"cnt": cnt[:3]}, "counters"), ({"m": 2}, "merged"),
                    ({"tok": batch.meta[:5]}, "token_adapter"), ({"offsets": w.offsets.int()}, "offsets"),
                    ({"y": torch.zeros(65, 256, dtype=torch.bfloat16, device="cuda")}, "at most 64")]:
        with pytest.raises(RuntimeError, match=msg):
            call(**kw)


def test_decode_kernel_op_is_the_compiled_one():
    """The op the decode dispatch calls is the extension's C++ op with a CUDA kernel from bindings.cpp."""
    assert_compiled_cuda_op(require_compiled_extension().sgmv_decode_, "lora_kernels_C::sgmv_decode_")


# ---- the compiled fused LoRA linear (csrc/fused_lora_linear.cu) ---------------------------------------------
def _fused_gate(monkeypatch, ext, device_type="cuda", verified=True):
    """Let LoRALinear's dispatch choose the fused kernel: the name verified on this GPU, ``_ext.get`` returning
    ``ext`` (the extension, or a recording stand-in), and the gate's device type (a CPU test sets "cpu")."""
    from lora_kernels import tuning
    from lora_kernels.nn import lora_linear

    names = frozenset({lora_linear._FUSED_KERNEL}) if verified else frozenset()
    monkeypatch.setattr(tuning, "verified_kernels", lambda device: names)
    monkeypatch.setattr(_ext, "get", lambda *a, **k: ext)
    monkeypatch.setattr(lora_linear, "_FUSED_DEVICE_TYPE", device_type)


class _RecordingFused:
    """Stands in for the extension: ``fused_lora_linear_`` records its arguments, then runs ``inner`` (the real
    op) or, when None, the reference (x W0^T + bias + delta in fp32, rounded once)."""

    def __init__(self, inner=None):
        self.calls, self.inner = [], inner

    def fused_lora_linear_(self, y, x, w0, bias, a, b, offsets, ranks, scales, tok, outs, r_cap, merged, ws, cnt):
        from lora_kernels.ops.sgmv import _reference_mixed_

        self.calls.append({"T": x.shape[0], "tok": tok.clone(), "outs": list(outs), "r_cap": r_cap, "merged": merged,
                           "w0": w0, "bias": bias, "ws": ws.numel(), "ws_dtype": ws.dtype, "counters": cnt,
                           "counters_before": cnt.clone()})  # no host sync: the GPU test forbids one
        if self.inner is not None:
            return self.inner(y, x, w0, bias, a, b, offsets, ranks, scales, tok, outs, r_cap, merged, ws, cnt)
        cols = [sum(outs[:i]) for i in range(len(outs))]
        acc = x.float() @ w0.float().T + (bias.float() if bias is not None else 0.0)
        if merged < 0:
            reference.add_lora_(acc, x, a, b, offsets, ranks, scales, tok, cols, outs)
        else:
            _reference_mixed_(acc, x, a, b, offsets, ranks, scales, tok, cols, outs, merged)
        y.copy_(acc.to(y.dtype))


def _fused_base(dtype, out, in_f, bias, seed, device):
    """A frozen nn.Linear(in_f, out) with random W0 (and bias) in ``dtype`` on ``device``."""
    g = torch.Generator().manual_seed(seed + 1)
    base = torch.nn.Linear(in_f, out, bias=bias).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out, in_f, generator=g) / in_f**0.5)
        if bias:
            base.bias.copy_(torch.randn(out, generator=g))
    return base.to(device, dtype)


def test_lora_linear_routes_decode_steps_to_the_fused_kernel_when_verified(monkeypatch):
    """CPU proof of LoRALinear's fused gate (CPU tensors stand in for CUDA ones; the extension is a recording stub):
    a forward with T <= 64 over a plain nn.Linear calls ``fused_lora_linear_`` with W0 and the bias, the batch's
    token ids, the slices' widths, an fp32 workspace big enough and zeroed counters owned by the batch, in unmerged
    and mixed mode, for 2-D and 3-D x, with the unfused result; and it does not when the kernel is not verified,
    for CUDA-only gates (CPU tensors), T > 64, T = 0, grad needed, a forced backend, mode "merged", an nn.Linear
    subclass or a hooked base, dtypes that differ, max_rank > 256, under autocast, or outside plain eager."""
    from lora_kernels.nn import lora_linear

    stub = _RecordingFused()
    w, ids, x, _ = _case(torch.float32, (48, 16, 16), in_f=300, ranks=(4, 8, 16), T=9, device="cpu")
    batch = lk.LoRABatch(128, w.max_adapters).build(ids, ranks=w.ranks)
    layer = lk.nn.LoRALinear(_fused_base(torch.float32, 80, 300, True, 0, "cpu"), w,
                          batch=batch)

    def run(mode="unmerged", xx=x, ll=layer):
        ll.set_serving_mode(mode, None if mode == "unmerged" else 1)
        with torch.no_grad():
            return ll(xx)

    want, want_mixed, want3 = run(), run("mixed"), run(xx=x.view(3, 3, 300))  # unfused (the gate is closed)
    assert stub.calls == []
    _fused_gate(monkeypatch, stub, device_type="cuda")  # real gate: CPU tensors never take it
    run()
    assert stub.calls == []
    _fused_gate(monkeypatch, stub, device_type="cpu", verified=False)
    run()
    assert stub.calls == []
    _fused_gate(monkeypatch, stub, device_type="cpu")
    got, got_mixed, got3 = run(), run("mixed"), run(xx=x.view(3, 3, 300))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_mixed, want_mixed)
    assert got3.shape == (3, 3, 80)
    torch.testing.assert_close(got3, want3)
    assert [c["merged"] for c in stub.calls] == [-1, 1, -1]
    for c in stub.calls:
        assert c["T"] == 9 and torch.equal(c["tok"], ids) and c["outs"] == [48, 16, 16] and c["r_cap"] == 16
        assert c["w0"] is layer.base.weight and c["bias"] is layer.base.bias
        # the same zeroed counters every call: the batch's (the end of its plan), 1 + one per 8 features
        assert not c["counters_before"].any() and c["counters"].dtype == torch.int32
        assert c["counters"].data_ptr() == fused_counters(batch.plan).data_ptr() and c["counters"].numel() >= 11
        assert c["ws_dtype"] == torch.float32
    chunks = -(-300 // 256)
    assert stub.calls[0]["ws"] >= 9 * 3 * 16 * (chunks + 1) + 9 * 80
    assert stub.calls[1]["ws"] >= 9 * 3 * 32 * (chunks + 1) + 9 * 80
    # the decode kernel's counters are a separate region of the plan
    assert fused_counters(batch.plan).data_ptr() >= decode_counters(batch.plan)[-1:].data_ptr() + 4

    stub.calls.clear()
    run("merged")  # base only
    with lk.backends.use_backend("reference"):
        run()
    with torch.device("cpu"):  # a TorchFunctionMode: not plain eager
        run()
    w_bf = lk.LoRAWeights(300, [48, 16, 16], max_adapters=3, max_rank=16, dtype=torch.bfloat16)
    bf = lk.nn.LoRALinear(_fused_base(torch.bfloat16, 80, 300, True, 0, "cpu"), w_bf, batch=batch)
    run(ll=bf, xx=x.bfloat16())  # all bf16: routed (the control of the autocast case below)
    assert len(stub.calls) == 1
    stub.calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast may change base(x)'s dtype: never routed
        run(ll=bf, xx=x.bfloat16())
    layer.base.weight.requires_grad_(True)  # grad mode with a trainable base: the autograd path
    layer.set_serving_mode("unmerged")
    assert layer(x).requires_grad
    layer.base.weight.requires_grad_(False)
    big = lk.LoRABatch(128, w.max_adapters).build(torch.zeros(65, dtype=torch.int32), ranks=w.ranks)
    run(ll=lk.nn.LoRALinear(layer.base, w, batch=big), xx=torch.randn(65, 300))
    empty = lk.LoRABatch(128, w.max_adapters).build(torch.zeros(0, dtype=torch.int32), ranks=w.ranks)
    run(ll=lk.nn.LoRALinear(layer.base, w, batch=empty), xx=torch.randn(0, 300))

    class MyLinear(torch.nn.Linear):
        pass

    sub = MyLinear(300, 80)
    sub.load_state_dict(layer.base.state_dict())
    run(ll=lk.nn.LoRALinear(sub, w, batch=batch))
    hooked = _fused_base(torch.float32, 80, 300, True, 0, "cpu")
    hooked.register_forward_hook(lambda mod, inp, out: None)
    run(ll=lk.nn.LoRALinear(hooked, w, batch=batch))
    run(ll=lk.nn.LoRALinear(layer.base, w_bf, batch=batch))  # fp32 W0, bf16 adapters
    w_big = lk.LoRAWeights(300, [48, 16, 16], max_adapters=3, max_rank=257, dtype=torch.float32)
    run(ll=lk.nn.LoRALinear(layer.base, w_big, batch=batch))
    assert stub.calls == []


FUSED_CASES = [  # (outs, in, ranks, T, merged, bias)
    ((4096,), 4096, (8, 16, 33, 64, 128), 1, None, False),
    ((4096, 1024, 1024), 4096, (8, 16, 33, 64, 128), 7, 3, True),
    ((512,), 1000, (5, 256), 64, None, True),
    ((72, 13), 264, (4, 9, 2), 33, 0, False),
    ((2048, 512), 2048, (16, 32), 16, None, True),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=[f"outs{c[0]}-in{c[1]}-T{c[3]}-m{c[4]}-b{int(c[5])}"
                                                   for c in FUSED_CASES])
def test_fused_kernel_matches_reference(monkeypatch, dtype, case):
    """LoRALinear through the compiled fused kernel (the gate opened, every call recorded) vs the fp64 truth (x W0^T
    + bias + delta), with the yardstick of the unfused path PyTorch would run in the low precision (base(x), then
    the delta added: two roundings); two runs are bit-identical (deterministic), the counters are back to zero, and
    the second call does not sync with the host."""
    outs, in_f, ranks, T, m, has_bias = case
    rec = _RecordingFused(inner=require_compiled_extension().fused_lora_linear_)
    _fused_gate(monkeypatch, rec)
    w, ids, x, _ = _decode_case(dtype, dtype, outs, in_f, ranks, T, seed=11)
    ids_c = ids.cuda()
    batch = lk.LoRABatch(64, w.max_adapters, "cuda").build(ids_c, ranks=w.ranks)
    layer = lk.nn.LoRALinear(_fused_base(dtype, sum(outs), in_f, has_bias, 11, "cuda"), w, batch=batch)
    if m is not None:
        layer.set_serving_mode("mixed", m)
    with torch.no_grad():
        got = [layer(x)]  # warm-up: allocates the workspace
        torch.cuda.set_sync_debug_mode("error")
        try:
            got.append(layer(x))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert len(rec.calls) == 2
    assert torch.equal(got[0], got[1]), "two runs differ"
    assert bool((fused_counters(batch.plan) == 0).all()), "counters not reset"
    W0, bias = layer.base.weight, layer.base.bias
    base64 = x.double() @ W0.double().T + (bias.double() if has_bias else 0.0)
    base_lowp = layer.base(x).double()
    if m is None:
        truth = base64 + reference.lora_delta(x, w, ids_c).double()
        lowp = base_lowp + _torch_lowp_delta(x, w, ids).double()
    else:
        not_m = torch.where(ids_c == m, torch.full_like(ids_c, -1), ids_c)
        others = torch.where(ids_c == m, torch.full_like(ids_c, -1), torch.full_like(ids_c, m))
        truth = base64 + reference.lora_delta(x, w, not_m).double() - reference.lora_delta(x, w, others).double()
        lowp = base_lowp + _torch_lowp_delta(x, w, not_m.cpu()).double() - _torch_lowp_delta(
            x, w, others.cpu()).double()
    lowp = lowp.to(dtype).double()  # PyTorch rounds y again
    err = (got[0].double() - truth).abs().max().item()
    err_torch = (lowp - truth).abs().max().item()
    assert err <= 2 * err_torch + 1e-5, (err, err_torch)


@pytest.mark.cuda
def test_fused_kernel_checks_arguments():
    """The launcher's host checks: clear errors, nothing launched."""
    ext = require_compiled_extension()
    w, ids, x, y = _case(torch.bfloat16, (256,), in_f=256, ranks=(8, 16), T=4)
    batch = lk.LoRABatch(64, w.max_adapters, "cuda").build(ids.cuda(), ranks=w.ranks)
    base = _fused_base(torch.bfloat16, 256, 256, True, 0, "cuda")
    ws = torch.empty(4 * 16 * 2 + 4 * 256, dtype=torch.float32, device="cuda")
    cnt = torch.zeros(1 + 32, dtype=torch.int32, device="cuda")
    tok = batch.meta[:4]

    def call(**kw):
        args = dict(y=y, x=x, w0=base.weight, bias=base.bias, a=w.a, b=w.b, offsets=w.offsets, ranks=w.ranks,
                    scales=w.scales, tok=tok, outs=[256], r=16, m=-1, ws=ws, cnt=cnt)
        args.update(kw)
        ext.fused_lora_linear_(*args.values())

    call()
    call(bias=None)
    for kw, msg in [({"x": x.half()}, "x: expected y's dtype"), ({"w0": base.weight.float()}, "w0: expected y's"),
                    ({"w0": base.weight[:128]}, "w0: expected shape"), ({"bias": base.bias[:5]}, "bias: expected"),
                    ({"r": 257}, "max_rank"), ({"outs": [255]}, "y: "), ({"ws": ws[:10]}, "workspace"),
                    ({"cnt": cnt[:3]}, "counters"), ({"m": 2}, "merged"), ({"tok": batch.meta[:5]}, "token_adapter"),
                    ({"offsets": w.offsets.int()}, "offsets"), ({"y": x}, "overlap x"),
                    ({"y": torch.zeros(65, 256, dtype=torch.bfloat16, device="cuda")}, "at most 64")]:
        with pytest.raises(RuntimeError, match=msg):
            call(**kw)


def test_fused_kernel_op_is_the_compiled_one():
    """The op the fused dispatch calls is the extension's C++ op with a CUDA kernel from bindings.cpp."""
    assert_compiled_cuda_op(require_compiled_extension().fused_lora_linear_, "lora_kernels_C::fused_lora_linear_")
