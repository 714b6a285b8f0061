"""deform_pool / deform_sample with level metadata that points outside value (validate=False).

Defined result (every backend): a bilinear corner whose value row ``start_l + y * W_l + x`` is outside [0, S)
counts as outside the image (zero value, zero gradients); a level with H_l < 1 or W_l < 1 contributes nothing.
validate=True refuses such metadata. Checked here against an independent scalar loop, for the reference, the
Triton kernels (interpreter on the CPU; value inside a NaN-filled buffer so that any read outside it shows) and
the CUDA kernel source (CPU emulator, which aborts on any value read or atomicAdd outside its buffers).
"""


import pytest
import torch

import lora_kernels as lk
from lora_kernels import backends, reference
from test_deform import _direct as _direct_spec
from test_deform import _emulate, emu_binary  # noqa: F401 (emu_binary: the fixture building the emulator)

# (nominal shapes, value rows S, spatial_shapes passed, level_start_index passed)
BAD_META = [
    # level 0 starts before row 0, level 1 runs past row S - 1; level 0 is also taller than value
    ("negative_start_and_overrun", 16, ((5, 4), (2, 2)), (-3, 14)),
    # a level far past the end, a zero-width level, a 1x1 level at row -1, a level inside the others' rows
    ("far_zero_width_and_aliased", 16, ((3, 4), (2, 2), (2, 0), (1, 1), (2, 2)), (0, 100, 0, -1, 5)),
]
_IDS = [m[0] for m in BAD_META]


def _direct(value, shapes, starts, loc, attn):
    """out by scalar loops (float64) from the definition: corners outside the image or outside rows [0, S) are 0
    (test_deform's spec loop, given these starts)."""
    return _direct_spec(value, shapes, loc, attn, starts=starts)


def _bad_problem(meta, B=2, Q=3, H=2, D=4, P=2, dtype=torch.float64, seed=0):
    _, S, shapes, starts = meta
    gen = torch.Generator().manual_seed(seed)
    L = len(shapes)
    value = torch.randn(B, S, H, D, generator=gen, dtype=torch.float64).to(dtype)
    loc = (torch.rand(B, Q, H, L, P, 2, generator=gen, dtype=torch.float64) * 1.2 - 0.1).to(dtype)
    attn = torch.rand(B, Q, H, L, P, generator=gen, dtype=torch.float64).to(dtype)
    return value, torch.tensor(shapes, dtype=torch.int64), torch.tensor(starts, dtype=torch.int64), loc, attn


def _in_nan_buffer(t, pad=4096):
    """A contiguous view of ``t`` inside a NaN-filled buffer (a leaf requiring grad): any read outside ``t``'s
    elements yields NaN. Returns (leaf buffer, view)."""
    buf = torch.full((t.numel() + 2 * pad,), float("nan"), dtype=t.dtype)
    buf[pad : pad + t.numel()] = t.reshape(-1)
    buf.requires_grad_(True)
    return buf, buf[pad : pad + t.numel()].view(t.shape)


def _pad_grad(buf, t, pad=4096):
    """(grad of the view, grad outside it) of a _in_nan_buffer leaf."""
    g = buf.grad
    return g[pad : pad + t.numel()].view(t.shape), torch.cat([g[:pad], g[pad + t.numel() :]])


# ---- the reference ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("meta", BAD_META, ids=_IDS)
def test_reference_defines_out_of_range_metadata(meta):
    value, ss, starts, loc, attn = _bad_problem(meta)
    loc[0, 0, 0, 0, 0] = torch.tensor([float("nan"), 0.5], dtype=loc.dtype)
    want = _direct(value, meta[2], meta[3], loc, attn)
    got = reference.deform_pool(value, ss, starts, loc, attn)  # no IndexError / shape error
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got.abs().sum() > 0  # in-range corners still contribute


@pytest.mark.parametrize("meta", BAD_META, ids=_IDS)
def test_reference_backward_matches_autograd_and_gradcheck(meta):
    value, ss, starts, loc, attn = _bad_problem(meta, B=1, Q=2, H=2, D=3, seed=1)
    g = torch.randn(1, 2, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ins = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    reference.deform_pool(ins[0], ss, starts, ins[1], ins[2]).backward(g)
    gv, gl, ga = reference.deform_pool_backward(g, value, ss, loc, attn, starts)
    for got, want in zip((gv, gl, ga), (t.grad for t in ins)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda v, sl, a: reference.deform_pool(v, ss, starts, sl, a),
                                    [t.clone().requires_grad_(True) for t in (value, loc, attn)])


def test_reference_explicit_path_equals_grid_sample_path(monkeypatch):
    """On consistent metadata the explicit per-corner path (used for out-of-range levels) is the grid_sample one."""
    from test_deform import _problem

    value, ss, starts, loc, attn = [t.double() if t.is_floating_point() else t for t in _problem(seed=3)]
    g = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    want = [reference.deform_pool(value, ss, starts, loc, attn)] + list(
        reference.deform_pool_backward(g, value, ss, loc, attn, starts))
    monkeypatch.setattr(reference, "_level_in_range", lambda *a: False)
    got = [reference.deform_pool(value, ss, starts, loc, attn)] + list(
        reference.deform_pool_backward(g, value, ss, loc, attn, starts))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("meta", BAD_META, ids=_IDS)
def test_op_validate_refuses_and_unvalidated_is_defined(meta):
    value, ss, starts, loc, attn = _bad_problem(meta, dtype=torch.float32)
    with pytest.raises(ValueError):
        lk.deform_pool(value, ss, starts, loc, attn)
    out = lk.deform_pool(value, ss, starts, loc, attn, validate=False)
    torch.testing.assert_close(out.double(), _direct(value, meta[2], meta[3], loc, attn), rtol=1e-5, atol=1e-5)


# ---- Triton (interpreter on the CPU) -----------------------------------------------------------------------------
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("meta", BAD_META, ids=_IDS)
def test_triton_unvalidated_metadata_stays_in_range(meta, deterministic):
    value, ss, starts, loc, attn = _bad_problem(meta, dtype=torch.float32, seed=5)
    buf, v = _in_nan_buffer(value)
    ins = [t.clone().requires_grad_(True) for t in (loc, attn)]
    with backends.use_backend("triton"):
        out = lk.deform_pool(v, ss, starts, ins[0], ins[1], validate=False, deterministic=deterministic)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    out.backward(g)
    ref_in = [t.double().requires_grad_(True) for t in (value, loc, attn)]
    reference.deform_pool(ref_in[0], ss, starts, ref_in[1], ref_in[2]).backward(g.double())
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double(), _direct(value, meta[2], meta[3], loc, attn), **tol)
    gv, outside = _pad_grad(buf, value)
    assert torch.isfinite(out).all() and torch.isfinite(gv).all() and bool((outside == 0).all())
    torch.testing.assert_close(gv.double(), ref_in[0].grad, **tol)
    torch.testing.assert_close(ins[1].grad.double(), ref_in[2].grad, **tol)
    # pixel coordinates off the grid lines: location gradients are two-sided there
    size = ss.flip(-1).double().clamp(min=1)[None, None, None, :, None, :]
    pix = loc.double() * size - 0.5
    smooth = (pix - pix.round()).abs() > 1e-3
    torch.testing.assert_close(ins[0].grad.double()[smooth], ref_in[1].grad[smooth], **tol)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("meta", BAD_META, ids=_IDS)
def test_deform_sample_unvalidated_metadata(meta, backend):
    _, S, shapes, starts_l = meta
    B, Q, H, D, P = 1, 3, 2, 4, 2
    L = len(shapes)
    gen = torch.Generator().manual_seed(7)
    value = torch.randn(B, S, H, D, generator=gen)
    ref = torch.rand(Q, 2, generator=gen)
    off = torch.randn(B, Q, H, L, P, 2, generator=gen) * 1.5
    logits = torch.randn(B, Q, H, L * P, generator=gen)
    ss, starts = torch.tensor(shapes, dtype=torch.int64), torch.tensor(starts_l, dtype=torch.int64)
    with pytest.raises(ValueError):
        lk.deform_sample(value, ss, starts, ref, off, logits)
    buf, v = _in_nan_buffer(value)
    ins = [t.clone().requires_grad_(True) for t in (off, logits)]
    with backends.use_backend(backend):
        out = lk.deform_sample(v, ss, starts, ref, ins[0], ins[1], validate=False)
    g = torch.randn(out.shape, generator=gen)
    out.backward(g)
    # the definition: deform_pool's scalar loop on the locations and weights the fused op forms (fp64)
    wh = ss.flip(-1).double().view(1, 1, 1, L, 1, 2)
    loc = ref.double().view(1, Q, 1, 1, 1, 2) + off.double() / wh
    w = torch.softmax(logits.double().view(B, Q, H, L * P), -1).view(B, Q, H, L, P)
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double(), _direct(value, shapes, starts_l, loc, w), **tol)
    ref_in = [t.double().requires_grad_(True) for t in (value, off, logits)]
    reference.deform_sample(ref_in[0], ss, starts, ref.double(), ref_in[1], ref_in[2]).backward(g.double())
    gv, outside = _pad_grad(buf, value)
    assert torch.isfinite(gv).all() and bool((outside == 0).all())
    torch.testing.assert_close(gv.double(), ref_in[0].grad, **tol)
    torch.testing.assert_close(ins[1].grad.double(), ref_in[2].grad, **tol)
    pix = loc * wh.clamp(min=1) - 0.5
    smooth = ((pix - pix.round()).abs() > 1e-3) & torch.isfinite(pix)
    torch.testing.assert_close(ins[0].grad.double()[smooth], ref_in[1].grad[smooth], **tol)


# ---- the CUDA kernel source (CPU emulator: aborts on any out-of-range value read or atomicAdd) -------------------
@pytest.mark.parametrize("mode", ["fast_fp32", "fast_fp16", "generic", "baseline", "fused"])
@pytest.mark.parametrize("meta", BAD_META, ids=_IDS)
def test_cuda_kernel_source_emulated_unvalidated_metadata(emu_binary, tmp_path, meta, mode):  # noqa: F811
    D = 5 if mode == "generic" else 32
    dtype = torch.float16 if mode == "fast_fp16" else torch.float32
    value, ss, starts, loc, attn = _bad_problem(meta, B=1, Q=3, H=2, D=D, P=2, dtype=torch.float32, seed=8)
    B, S, H, _ = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    g = torch.randn(B, Q, H * D, generator=torch.Generator().manual_seed(9))
    if mode == "fused":
        gen = torch.Generator().manual_seed(10)
        ref = torch.rand(Q, 2, generator=gen)
        off = torch.randn(B, Q, H, L, P, 2, generator=gen) * 1.5
        logits = torch.randn(B, Q, H, L, P, generator=gen)
        out, gv, goff, glog = _emulate(emu_binary, tmp_path, value, ss, starts, off, logits, g, ref=ref)
        ref_in = [t.double().requires_grad_(True) for t in (value, off, logits)]
        want = reference.deform_sample(ref_in[0], ss, starts, ref.double(), ref_in[1],
                                       ref_in[2].view(B, Q, H, L * P))
        want.backward(g.double())
        wh = ss.flip(-1).double().view(1, 1, 1, L, 1, 2)
        loc = ref.double().view(1, Q, 1, 1, 1, 2) + off.double() / wh
        got_l, want_l, got_a, want_a = goff, ref_in[1].grad, glog, ref_in[2].grad
    else:
        value, loc, attn, g = value.to(dtype), loc.to(dtype), attn.to(dtype), g.to(dtype)
        out, gv, got_l, got_a = _emulate(emu_binary, tmp_path, value, ss, starts, loc, attn, g,
                                         baseline=mode == "baseline", aligned=mode != "generic")
        ref_in = [t.double().requires_grad_(True) for t in (value, loc, attn)]
        want = reference.deform_pool(ref_in[0], ss, starts, ref_in[1], ref_in[2])
        want.backward(g.double())
        torch.testing.assert_close(want.detach(), _direct(value, meta[2], meta[3], loc, attn), rtol=1e-9, atol=1e-9)
        want_l, want_a = ref_in[1].grad, ref_in[2].grad
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.float16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double(), want.detach(), **tol)
    torch.testing.assert_close(gv.double(), ref_in[0].grad, **tol)
    torch.testing.assert_close(got_a.double(), want_a, **tol)
    pix = loc.double() * ss.flip(-1).double().clamp(min=1)[None, None, None, :, None, :] - 0.5
    smooth = ((pix - pix.round()).abs() > 1e-2) & torch.isfinite(pix)
    torch.testing.assert_close(got_l.double()[smooth], want_l[smooth], **tol)


# ---- GPU (the compiled kernels and Triton on the device; the sanitize step runs them under compute-sanitizer) -----
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("meta", BAD_META, ids=_IDS)
def test_gpu_unvalidated_metadata(meta, backend, deterministic, dtype):
    from lora_kernels.ops import deform

    if backend == "cuda" and deform._cuda_ops(fused=True) is None:
        pytest.skip("the extension has no deform kernels")
    value, ss, starts, loc, attn = _bad_problem(meta, B=2, Q=9, H=2, D=32, P=3, dtype=torch.float32, seed=11)
    value, loc, attn = value.to(dtype), loc.to(dtype), attn.to(dtype)
    g = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(12)).to(dtype)
    ins = [t.cuda().requires_grad_(True) for t in (value, loc, attn)]
    with backends.use_backend(backend):
        out = lk.deform_pool(ins[0], ss.cuda(), starts.cuda(), ins[1], ins[2], validate=False,
                             deterministic=deterministic)
    out.backward(g.cuda())
    torch.cuda.synchronize()
    ref_in = [t.double().requires_grad_(True) for t in (value, loc, attn)]
    reference.deform_pool(ref_in[0], ss, starts, ref_in[1], ref_in[2]).backward(g.double())
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=6e-2, atol=6e-2)
    torch.testing.assert_close(out.detach().double().cpu(), _direct(value, meta[2], meta[3], loc, attn), **tol)
    torch.testing.assert_close(ins[0].grad.double().cpu(), ref_in[0].grad, **tol)
    torch.testing.assert_close(ins[2].grad.double().cpu(), ref_in[2].grad, **tol)
    # the fused kernels on the same metadata
    gen = torch.Generator().manual_seed(13)
    L = len(meta[2])
    ref = torch.rand(9, 2, generator=gen)
    off = torch.randn(2, 9, 2, L, 3, 2, generator=gen)
    logits = torch.randn(2, 9, 2, L * 3, generator=gen)
    with backends.use_backend(backend):
        got = lk.deform_sample(value.cuda(), ss.cuda(), starts.cuda(), ref.cuda(), off.cuda(), logits.cuda(),
                               validate=False, deterministic=deterministic)
    want = reference.deform_sample(value.double(), ss, starts, ref.double(), off.double(), logits.double())
    torch.testing.assert_close(got.double().cpu(), want, **tol)
