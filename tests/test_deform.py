"""deform_pool (VCE's multi-scale deformable pooling): the grid_sample reference against a direct bilinear loop,
gradients, the custom op, the Triton kernels (interpreter on CPU) and, under ``-m cuda``, the CUDA kernels."""

import math

import pytest
import torch

import lora_kernels as lk
from lora_kernels import backends, reference

CUDA = torch.cuda.is_available()


# ---- an independent spec: scalar bilinear sampling, written from the definition ---------------------------------
def _direct(value, shapes, loc, attn, starts=None):
    """out[b, q, h*D + d] by explicit loops (float64 scalars). A pixel (i, j) of level l covers
    [j/W, (j+1)/W) x [i/H, (i+1)/H); its centre is ((j + 0.5)/W, (i + 0.5)/H); zero outside the image.
    Level l's rows start at ``starts[l]`` (default: the levels packed in order, computed here from ``shapes``);
    a corner whose row falls outside [0, S) counts as outside the image (test_deform_guard's metadata)."""
    B, S, H, D = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    if starts is None:
        starts = [sum(hl * wl for hl, wl in shapes[:lvl]) for lvl in range(L)]
    v = value.double()
    out = torch.zeros(B, Q, H * D, dtype=torch.float64)
    for b in range(B):
        for q in range(Q):
            for h in range(H):
                for lvl in range(L):
                    hl, wl = shapes[lvl]
                    for p in range(P):
                        lx, ly = (float(t) for t in loc[b, q, h, lvl, p])
                        a = float(attn[b, q, h, lvl, p])
                        if not (math.isfinite(lx) and math.isfinite(ly)):
                            continue
                        x, y = lx * wl - 0.5, ly * hl - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                row = starts[lvl] + yi * wl + xi
                                if 0 <= xi < wl and 0 <= yi < hl and 0 <= row < S:
                                    out[b, q, h * D : (h + 1) * D] += a * wx * wy * v[b, row, h]
    return out


def _edge_locations(B, Q, H, shapes, P, gen, dtype=torch.float32):
    """Random locations in [-0.2, 1.2] with edge cases planted: pixel centres, exact borders (0 and 1), corners,
    far outside, and just outside the last pixel."""
    L = len(shapes)
    loc = torch.rand(B, Q, H, L, P, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    for lvl, (hl, wl) in enumerate(shapes):
        pts = [((0.5) / wl, (0.5) / hl), ((wl - 0.5) / wl, (hl - 0.5) / hl), (0.0, 0.5), (1.0, 0.5), (0.5, 0.0),
               (0.5, 1.0), (0.0, 0.0), (1.0, 1.0), (-3.0, 0.5), (0.5, 7.0), (1.0 + 0.25 / wl, 0.5),
               ((1.5) / wl, (0.5) / hl)]
        for k, (x, y) in enumerate(pts):
            idx = k % (B * Q * H * P)
            b, rest = divmod(idx, Q * H * P)
            q, rest = divmod(rest, H * P)
            h, p = divmod(rest, P)
            loc[b, q, h, lvl, p] = torch.tensor([x, y], dtype=torch.float64)
    return loc.to(dtype)


def _problem(B=2, Q=5, H=2, D=4, shapes=((3, 4), (2, 2), (1, 1)), P=3, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, H, D, generator=gen, dtype=torch.float64).to(dtype)
    loc = _edge_locations(B, Q, H, shapes, P, gen, dtype)
    attn = torch.rand(B, Q, H, len(shapes), P, generator=gen, dtype=torch.float64).to(dtype)
    ss = torch.tensor(shapes, dtype=torch.int64)
    sizes = ss[:, 0] * ss[:, 1]
    starts = torch.cumsum(sizes, 0) - sizes
    return [t.to(device) for t in (value, ss, starts, loc, attn)]


# ---- the reference ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shapes", [((3, 4), (2, 2), (1, 1)), ((1, 1),), ((5, 3), (1, 7))])
def test_reference_matches_direct_loop(shapes):
    value, ss, starts, loc, attn = _problem(shapes=shapes, D=3, seed=len(shapes))
    got = reference.deform_pool(value.double(), ss, starts, loc.double(), attn.double())
    want = _direct(value, [tuple(s) for s in ss.tolist()], loc, attn)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # fp32 inputs: fp32 compute (grid_sample's 2*loc-1 round trip costs a few ulps of the location)
    torch.testing.assert_close(reference.deform_pool(value, ss, starts, loc, attn).double(), want, rtol=1e-5,
                               atol=1e-5)


def test_reference_nonfinite_locations_contribute_nothing():
    value, ss, starts, loc, attn = _problem(Q=3, seed=3)
    bad = loc.clone()
    bad[0, 0, 0, 0, 0] = torch.tensor([float("nan"), 0.5])
    bad[0, 1, 1, 1, 2] = torch.tensor([0.5, float("inf")])
    bad[1, 2, 0, 2, 1] = torch.tensor([-float("inf"), 1e30])
    masked = attn.clone()
    masked[0, 0, 0, 0, 0] = 0
    masked[0, 1, 1, 1, 2] = 0
    masked[1, 2, 0, 2, 1] = 0
    v = value.double().requires_grad_(True)
    sl = bad.double().requires_grad_(True)
    out = reference.deform_pool(v, ss, starts, sl, attn.double())
    torch.testing.assert_close(out, reference.deform_pool(value.double(), ss, starts, loc.double(), masked.double()))
    out.sum().backward()
    assert torch.isfinite(sl.grad).all() and torch.isfinite(v.grad).all()
    assert sl.grad[0, 0, 0, 0, 0].abs().sum() == 0 and sl.grad[0, 1, 1, 1, 2].abs().sum() == 0


def test_reference_gradcheck_fp64():
    value, ss, starts, loc, attn = _problem(B=1, Q=3, H=2, D=2, shapes=((3, 2), (1, 1)), P=2, seed=4)
    # keep samples off the pixel grid lines, where bilinear sampling is not differentiable
    loc = (torch.rand(loc.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 1.2 - 0.1)
    inputs = (value.double().requires_grad_(True), loc.requires_grad_(True), attn.double().requires_grad_(True))
    assert torch.autograd.gradcheck(lambda v, sl, a: reference.deform_pool(v, ss, starts, sl, a), inputs)


# ---- the public op and the custom op ------------------------------------------------------------------------------
def test_op_matches_reference_and_gradients():
    value, ss, starts, loc, attn = _problem(seed=6)
    ins = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    out = lk.deform_pool(ins[0], ss, starts, ins[1], ins[2])
    want_in = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    want = reference.deform_pool(want_in[0], ss, starts, want_in[1], want_in[2])
    torch.testing.assert_close(out, want)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    out.backward(g)
    want.backward(g)
    for a, b in zip(ins, want_in):
        torch.testing.assert_close(a.grad, b.grad)
    # shapes as a host list, starts computed
    torch.testing.assert_close(lk.deform_pool(value, [(3, 4), (2, 2), (1, 1)], None, loc, attn), want.detach())


def test_host_shape_list_is_copied_once():
    from lora_kernels.ops import deform

    value, ss, starts, loc, attn = _problem(B=1, Q=2, shapes=((2, 3), (1, 2)), seed=25)
    pairs = [(2, 3), (1, 2)]
    want = reference.deform_pool(value, ss, starts, loc, attn)
    torch.testing.assert_close(lk.deform_pool(value, pairs, None, loc, attn), want)
    hit = deform._SHAPES_CACHE[(((2, 3), (1, 2)), "cpu")]
    torch.testing.assert_close(lk.deform_pool(value, pairs, None, loc, attn), want)
    assert deform._SHAPES_CACHE[(((2, 3), (1, 2)), "cpu")] is hit
    assert hit[1].tolist() == [0, 6]


def test_empty_shapes():
    value, ss, starts, loc, attn = _problem(B=1, Q=2, seed=26)
    for q in (0,):
        sl = loc[:, :q].clone().requires_grad_(True)
        a = attn[:, :q].clone().requires_grad_(True)
        v = value.clone().requires_grad_(True)
        for be in ("reference", "triton"):
            with backends.use_backend(be):
                out = lk.deform_pool(v, ss, starts, sl, a)
            assert out.shape == (1, q, 8)
            out.sum().backward()
            assert v.grad.abs().sum() == 0
            v.grad = None


def test_opcheck():
    value, ss, starts, loc, attn = _problem(B=1, Q=3, seed=8)
    args = (value.requires_grad_(True), ss, starts, loc.requires_grad_(True), attn.requires_grad_(True), "reference",
            False)
    torch.library.opcheck(torch.ops.lora_kernels.deform_pool.default, args)
    g = torch.randn(1, 3, 8)
    torch.library.opcheck(torch.ops.lora_kernels.deform_pool_backward.default,
                          (g, value.detach(), ss, starts, loc.detach(), attn.detach(), "reference", False))


def test_torch_compile_fwd_bwd():
    value, ss, starts, loc, attn = _problem(B=1, Q=4, seed=9)
    ins = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    f = torch.compile(lambda v, sl, a: lk.deform_pool(v, ss, starts, sl, a, validate=False), backend="aot_eager",
                      fullgraph=True)
    out = f(*ins)
    out.square().sum().backward()
    ref_in = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    ref = reference.deform_pool(ref_in[0], ss, starts, ref_in[1], ref_in[2])
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for a, b in zip(ins, ref_in):
        torch.testing.assert_close(a.grad, b.grad)


def _bad(**kw):
    value, ss, starts, loc, attn = _problem(B=1, Q=2, seed=10)
    args = dict(value=value, spatial_shapes=ss, level_start_index=starts, sampling_locations=loc,
                attention_weights=attn)
    args.update(kw)
    return args


@pytest.mark.parametrize("kw, exc, name", [
    (dict(value=torch.zeros(1, 16, 2, 4)), ValueError, "value"),  # S != sum(H_l W_l) = 17
    (dict(value=torch.zeros(1, 17, 2)), ValueError, "value"),
    (dict(value=torch.zeros(1, 17, 2, 4, dtype=torch.int32)), TypeError, "value"),
    (dict(level_start_index=torch.tensor([0, 12, 15])), ValueError, "level_start_index"),
    (dict(level_start_index=torch.tensor([0, 12])), ValueError, "level_start_index"),
    (dict(level_start_index=torch.tensor([0, 12, 16], dtype=torch.int32)), TypeError, "level_start_index"),
    (dict(spatial_shapes=torch.tensor([[3, 4], [2, 2], [1, 1]], dtype=torch.int32)), TypeError, "spatial_shapes"),
    (dict(spatial_shapes=torch.tensor([3, 4, 2, 2, 1, 1])), ValueError, "spatial_shapes"),
    (dict(spatial_shapes=[(3, 4), (2, 2), (1, 1), (1, 0)], level_start_index=None), ValueError, None),
    (dict(spatial_shapes=[(3, 4), (2, 2), (0, 1)], level_start_index=None), ValueError, "spatial_shapes"),
    (dict(spatial_shapes="abc"), TypeError, "spatial_shapes"),
    (dict(sampling_locations=torch.zeros(1, 2, 2, 3, 3, 3)), ValueError, "sampling_locations"),
    (dict(sampling_locations=torch.zeros(1, 2, 3, 3, 3, 2)), ValueError, "sampling_locations"),  # heads
    (dict(sampling_locations=torch.zeros(1, 2, 2, 2, 3, 2)), ValueError, "sampling_locations"),  # levels
    (dict(sampling_locations=torch.zeros(1, 2, 2, 3, 3, 2, dtype=torch.float16)), TypeError, "sampling_locations"),
    (dict(attention_weights=torch.zeros(1, 2, 2, 3, 3, dtype=torch.float16)), TypeError, "attention_weights"),
    (dict(attention_weights=torch.zeros(1, 2, 2, 3, 4)), ValueError, "attention_weights"),  # points
    (dict(attention_weights=torch.zeros(1, 2, 2, 3, 3, dtype=torch.float64)), TypeError, "attention_weights"),
    (dict(attention_weights=[0.0]), TypeError, "attention_weights"),
])
def test_bad_inputs_raise_naming_the_argument(kw, exc, name):
    args = _bad(**kw)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(exc) as ei:
        lk.deform_pool(**args)
    if name is not None:
        assert str(ei.value).startswith(name), str(ei.value)
    for k, v in before.items():
        assert torch.equal(args[k], v)


def test_forced_cuda_backend_on_cpu_raises():
    value, ss, starts, loc, attn = _problem(B=1, Q=2, seed=11)
    with backends.use_backend("cuda"), pytest.raises(RuntimeError):
        lk.deform_pool(value, ss, starts, loc, attn)


# ---- Triton (interpreter on the CPU, compiled on a GPU) -----------------------------------------------------------
DEV = "cuda" if CUDA else "cpu"


def _smooth(loc, shapes, eps=1e-3):
    """True where a location component is off the pixel grid lines (pixel coordinate not within ``eps`` of an
    integer): there the derivative along that axis is one-sided and rounding picks the side, so location
    gradients are compared only where this is True (value and weight gradients are continuous everywhere)."""
    size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64, device=loc.device)  # [L, 2] (W_l, H_l)
    pix = loc.double() * size[None, None, None, :, None, :] - 0.5
    return (pix - pix.round()).abs() > eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D, shapes, P", [(4, ((3, 4), (2, 2), (1, 1)), 3), (5, ((2, 3),), 1)])
def test_triton_matches_reference(dtype, D, shapes, P):
    value, ss, starts, loc, attn = _problem(B=2, Q=3, H=2, D=D, shapes=shapes, P=P, dtype=dtype, seed=D + P,
                                            device=DEV)
    ins = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    with backends.use_backend("triton"):
        out = lk.deform_pool(ins[0], ss, starts, ins[1], ins[2])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEV, dtype)
    out.backward(g)
    ref_in = [t.detach().double().requires_grad_(True) for t in (value, loc, attn)]
    ref = reference.deform_pool(ref_in[0], ss, starts, ref_in[1], ref_in[2])
    ref.backward(g.double())
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.double(), ref, **tol)
    smooth = _smooth(loc, shapes)
    torch.testing.assert_close(ins[0].grad.double(), ref_in[0].grad, **tol)
    torch.testing.assert_close(ins[2].grad.double(), ref_in[2].grad, **tol)
    torch.testing.assert_close(ins[1].grad.double()[smooth], ref_in[1].grad[smooth], **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_deterministic_grad_value(dtype):
    """The sort + gather grad value equals the atomic one and the reference, and repeats bit for bit."""
    value, ss, starts, loc, attn = _problem(B=2, Q=4, H=2, D=6, P=2, dtype=dtype, seed=13, device=DEV)
    loc[0, :, :, 0] = 0.5  # many samples on the same pixels: long segments
    g = torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(14)).to(DEV, dtype)
    runs = []
    for det in (True, True, False):
        ins = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
        with backends.use_backend("triton"):
            lk.deform_pool(ins[0], ss, starts, ins[1], ins[2], deterministic=det).backward(g)
        runs.append([t.grad for t in ins])
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(runs[0][0].float(), runs[2][0].float(), **tol)
    ref_in = [t.detach().double().requires_grad_(True) for t in (value, loc, attn)]
    reference.deform_pool(ref_in[0], ss, starts, ref_in[1], ref_in[2]).backward(g.double())
    torch.testing.assert_close(runs[0][0].double(), ref_in[0].grad, **tol)


def test_deterministic_follows_torch_flag(monkeypatch):
    from lora_kernels.ops import deform

    seen = []
    real = deform._deform_pool_op

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(deform, "_deform_pool_op", spy)
    value, ss, starts, loc, attn = _problem(B=1, Q=2, seed=15)
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        lk.deform_pool(value, ss, starts, loc, attn)
        torch.use_deterministic_algorithms(False)
        lk.deform_pool(value, ss, starts, loc, attn)
        lk.deform_pool(value, ss, starts, loc, attn, deterministic=True)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert seen == [True, False, True]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fp32_locations_with_fp16_value(backend):
    """Locations and weights may stay in fp32 with a 16-bit value; their gradients come back in fp32."""
    value, ss, starts, loc, attn = _problem(B=1, Q=3, H=2, D=4, dtype=torch.float32, seed=19, device=DEV)
    v16 = value.half()
    ins = [v16.clone().requires_grad_(True), loc.clone().requires_grad_(True), attn.clone().requires_grad_(True)]
    with backends.use_backend(backend):
        out = lk.deform_pool(ins[0], ss, starts, ins[1], ins[2])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(20)).to(DEV, torch.float16)
    out.backward(g)
    assert out.dtype == torch.float16 and ins[0].grad.dtype == torch.float16
    assert ins[1].grad.dtype == torch.float32 and ins[2].grad.dtype == torch.float32
    ref_in = [t.detach().double().requires_grad_(True) for t in (v16, loc, attn)]
    ref = reference.deform_pool(ref_in[0], ss, starts, ref_in[1], ref_in[2])
    ref.backward(g.double())
    smooth = _smooth(loc, ((3, 4), (2, 2), (1, 1)))
    torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(ins[0].grad.double(), ref_in[0].grad, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(ins[1].grad.double()[smooth], ref_in[1].grad[smooth], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ins[2].grad.double(), ref_in[2].grad, rtol=1e-4, atol=1e-4)


# ---- deform_sample: softmax and location arithmetic fused ---------------------------------------------------------
def _sample_problem(B=2, Q=4, H=2, D=5, shapes=((3, 4), (2, 2), (1, 1)), P=3, dtype=torch.float32,
                    off_dtype=None, seed=30, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    L = len(shapes)
    value = torch.randn(B, S, H, D, generator=gen, dtype=torch.float64).to(device, dtype)
    ref = torch.rand(Q, 2, generator=gen).to(device)
    offsets = (torch.randn(B, Q, H, L, P, 2, generator=gen) * 1.5).to(device, off_dtype or dtype)
    logits = torch.randn(B, Q, H, L * P, generator=gen).to(device, off_dtype or dtype)
    ss = torch.tensor(shapes, dtype=torch.int64, device=device)
    return value, ss, ref, offsets, logits


def test_deform_sample_reference_is_the_composition():
    value, ss, ref, offsets, logits = _sample_problem(seed=31)
    wh = ss.flip(-1).double().view(1, 1, 1, 3, 1, 2)
    loc = ref.double().view(1, 4, 1, 1, 1, 2) + offsets.double() / wh
    w = torch.softmax(logits.double(), -1).view(2, 4, 2, 3, 3)
    want = reference.deform_pool(value.double(), ss, None, loc, w)
    got = reference.deform_sample(value.double(), ss, None, ref.double(), offsets.double(), logits.double())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    ins = [t.double().requires_grad_(True) for t in (value, offsets, logits)]
    assert torch.autograd.gradcheck(lambda v, o, lg: reference.deform_sample(v, ss, None, ref.double(), o, lg), ins)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype, off_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                              (torch.float16, torch.float32)])
def test_deform_sample_matches_reference(backend, dtype, off_dtype):
    value, ss, ref, offsets, logits = _sample_problem(dtype=dtype, off_dtype=off_dtype, seed=32, device=DEV)
    ins = [t.clone().requires_grad_(True) for t in (value, offsets, logits)]
    with backends.use_backend(backend):
        out = lk.deform_sample(ins[0], ss, None, ref, ins[1], ins[2])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(33)).to(DEV, dtype)
    out.backward(g)
    ref_in = [t.detach().double().requires_grad_(True) for t in (value, offsets, logits)]
    want = reference.deform_sample(ref_in[0], ss, None, ref.double(), ref_in[1], ref_in[2])
    want.backward(g.double())
    assert out.dtype == dtype and ins[1].grad.dtype == off_dtype and ins[2].grad.dtype == off_dtype
    lowp = dtype == torch.float16
    tol = dict(rtol=1e-2, atol=1e-2) if lowp else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double(), want, **tol)
    torch.testing.assert_close(ins[0].grad.double(), ref_in[0].grad, **tol)
    torch.testing.assert_close(ins[2].grad.double(), ref_in[2].grad, **tol)
    loc = ref.double().view(1, 4, 1, 1, 1, 2) + offsets.double() / ss.flip(-1).double().view(1, 1, 1, 3, 1, 2)
    smooth = _smooth(loc, ((3, 4), (2, 2), (1, 1)), eps=1e-2)
    torch.testing.assert_close(ins[1].grad.double()[smooth], ref_in[1].grad[smooth], **tol)


def test_deform_sample_deterministic_and_opcheck():
    value, ss, ref, offsets, logits = _sample_problem(B=1, Q=3, seed=34, device=DEV)
    g = torch.randn(1, 3, 10, generator=torch.Generator().manual_seed(35)).to(DEV)
    grads = []
    for det in (True, True, False):
        ins = [t.clone().requires_grad_(True) for t in (value, offsets, logits)]
        with backends.use_backend("triton"):
            lk.deform_sample(ins[0], ss, None, ref, ins[1], ins[2], deterministic=det).backward(g)
        grads.append([t.grad for t in ins])
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1]))
    torch.testing.assert_close(grads[0][0], grads[2][0], rtol=1e-5, atol=1e-5)
    if DEV == "cpu":
        sizes = ss[:, 0] * ss[:, 1]
        args = (value.clone().requires_grad_(True), ss, torch.cumsum(sizes, 0) - sizes, ref,
                offsets.clone().requires_grad_(True), logits.clone().requires_grad_(True), "reference", False)
        torch.library.opcheck(torch.ops.lora_kernels.deform_sample.default, args)


def test_deform_sample_bad_inputs():
    value, ss, ref, offsets, logits = _sample_problem(B=1, Q=2, seed=36)
    with pytest.raises(ValueError, match="^ref"):
        lk.deform_sample(value, ss, None, ref.clone().requires_grad_(True), offsets, logits)
    with pytest.raises(ValueError, match="^ref"):
        lk.deform_sample(value, ss, None, ref[:1], offsets, logits)
    with pytest.raises(ValueError, match="^logits"):
        lk.deform_sample(value, ss, None, ref, offsets, logits[..., :-1])
    with pytest.raises(TypeError, match="^logits"):
        lk.deform_sample(value, ss, None, ref, offsets, logits.double())
    with pytest.raises(ValueError, match="^offsets"):
        lk.deform_sample(value, ss, None, ref, offsets[..., :1], logits)
    with pytest.raises(ValueError, match="^value"):
        lk.deform_sample(value[:, 1:], ss, None, ref, offsets, logits)
    with backends.use_backend("cuda"), pytest.raises(RuntimeError):
        lk.deform_sample(value, ss, None, ref, offsets, logits)


def test_nonfinite_locations_same_on_every_cpu_backend():
    value, ss, starts, loc, attn = _problem(B=1, Q=4, seed=12)
    loc[0, 0, 0, 0, 0, 0] = float("nan")
    loc[0, 1, 1, 2, 1, 1] = float("inf")
    loc[0, 2, 0, 1, 2] = torch.tensor([-float("inf"), 1e30])
    outs = {}
    for be in ("reference", "triton"):
        ins = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
        with backends.use_backend(be):
            out = lk.deform_pool(ins[0], ss, starts, ins[1], ins[2])
        out.sum().backward()
        outs[be] = [out.detach()] + [t.grad for t in ins]
        assert all(bool(torch.isfinite(t).all()) for t in outs[be]), be
        assert outs[be][2][0, 0, 0, 0, 0].abs().sum() == 0 and outs[be][3][0, 0, 0, 0, 0] == 0
    for a, b in zip(outs["reference"], outs["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def extension_op_or_skip(name: str, kernels: str):
    """``(ops, ops.<name>)`` of the compiled extension (not built here); skips when there is none or when it
    predates the ``kernels`` kernels. Shared with test_vce_fused."""
    from lora_kernels import _ext

    ops = _ext.get(build=False)
    if ops is None:
        pytest.skip(f"compiled extension not available: {_ext.status()}")
    try:
        return ops, getattr(ops, name)
    except (AttributeError, RuntimeError):
        pytest.skip(f"the installed extension predates the {kernels} kernels (rebuild it)")


def test_extension_registers_deform_ops():
    ops, fwd = extension_op_or_skip("deform_pool_fwd_", "deform_pool")
    schema = str(fwd.default._schema)
    assert "Tensor(a!) out" in schema and "bool baseline" in schema
    assert "Tensor(c!) grad_attn" in str(ops.deform_pool_bwd_.default._schema)


# The Triton deform kernels are compiled ahead of time for sm_90 / sm_80 by tests/test_triton_compile.py, from
# the launches deform_pool_fwd / _bwd / deform_sample_fwd / _bwd really make (tests/triton_aot_driver.py
# deform_scenarios), with the specialisation Triton applies at launch. (A hand-written signature here compiled a
# variant no launch uses, without the divisibility attributes, and was removed: issue 13.)


# ---- the CUDA kernel source, emulated on the CPU (tests/deform_pool_emu.cpp) ---------------------------------------
_KIND = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


@pytest.fixture(scope="module")
def emu_binary(tmp_path_factory):
    """The CUDA kernels of csrc/kernels/deform_pool.cuh compiled by the host compiler with an emulation of
    threads, warps and shuffles (see the .cpp); skipped without g++ or the CUDA headers."""
    import os
    import shutil
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    inc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None or not os.path.exists(os.path.join(inc, "cuda_fp16.h")):
        pytest.skip("needs g++ and the CUDA headers")
    exe = str(tmp_path_factory.mktemp("emu") / "deform_pool_emu")
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-w", "-I", os.path.join(root, "csrc"), "-I", inc,
           os.path.join(root, "tests", "deform_pool_emu.cpp"), "-o", exe]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return exe


def _emulate(exe, tmp_path, value, ss, starts, loc, attn, g, baseline=False, aligned=True, ref=None):
    """(out, grad value fp32, grad loc, grad attn). With ``ref`` the fused deform_sample kernels (emulator mode 2):
    loc / attn are the offsets / logits and grad attn (grad logits) is fp32."""
    import subprocess

    B, S, H, D = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    mode = 2 if ref is not None else int(baseline)
    hdr = torch.tensor([_KIND[value.dtype], int(loc.dtype == torch.float32 and value.dtype != torch.float32), B, S,
                        Q, H, D, L, P, mode, int(aligned)], dtype=torch.int64)
    parts = [hdr, ss.contiguous(), starts.contiguous(), value, loc, attn, g] + ([ref.float()] if mode == 2 else [])
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in parts))
    r = subprocess.run([exe, str(src), str(dst)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    raw = bytearray(dst.read_bytes())
    outs, pos = [], 0
    for shape, dt in (((B, Q, H * D), value.dtype), (value.shape, torch.float32), (loc.shape, loc.dtype),
                      (attn.shape, torch.float32 if mode == 2 else attn.dtype)):
        n = math.prod(shape) * torch.tensor([], dtype=dt).element_size()
        outs.append(torch.frombuffer(raw[pos : pos + n], dtype=torch.uint8).view(dt).view(shape).clone())
        pos += n
    assert pos == len(raw)
    return outs


EMU_CASES = [  # (B, Q, H, D, shapes, P): D = 64 / 32 / 128 take the 128-bit fast paths; 5 and 40 the generic one
    (2, 5, 2, 64, ((4, 3), (2, 2), (1, 1)), 3),
    (1, 4, 3, 32, ((3, 3), (1, 1)), 2),
    (1, 3, 2, 128, ((2, 3),), 2),
    (2, 4, 2, 5, ((4, 3), (1, 1)), 2),
    (1, 3, 1, 40, ((2, 5), (3, 1)), 2),
]


@pytest.mark.parametrize("dtype, loc_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                              (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("case", EMU_CASES)
def test_cuda_kernel_source_emulated(emu_binary, tmp_path, case, dtype, loc_dtype):
    """The CUDA kernels (forward and every gradient) as the GPU would run them, emulated on the CPU, vs the fp64
    reference, with the edge-case locations of _problem and a NaN location."""
    B, Q, H, D, shapes, P = case
    value, ss, starts, loc, attn = _problem(B=B, Q=Q, H=H, D=D, shapes=shapes, P=P, seed=D + Q)
    loc[0, 0, 0, 0, 0, 0] = float("nan")
    value, loc, attn = value.to(dtype), loc.to(loc_dtype), attn.to(loc_dtype)
    g = torch.randn(B, Q, H * D, generator=torch.Generator().manual_seed(22)).to(dtype)
    out, gv, gl, ga = _emulate(emu_binary, tmp_path, value, ss, starts, loc, attn, g)
    _check_vs_reference([out, gv, gl, ga], value, ss, starts, loc, attn, g, dtype, shapes)
    assert gl[0, 0, 0, 0, 0].abs().sum() == 0 and ga[0, 0, 0, 0, 0] == 0


@pytest.mark.parametrize("baseline", [False, True])
def test_cuda_kernel_source_emulated_generic_and_baseline(emu_binary, tmp_path, baseline):
    """D = 64 forced onto the generic path (an unaligned pointer on the GPU), and the fp32 DETR-style baseline."""
    B, Q, H, D, shapes, P = 1, 4, 2, 64, ((3, 4), (1, 1)), 2
    value, ss, starts, loc, attn = _problem(B=B, Q=Q, H=H, D=D, shapes=shapes, P=P, seed=23)
    g = torch.randn(B, Q, H * D, generator=torch.Generator().manual_seed(24))
    got = _emulate(emu_binary, tmp_path, value, ss, starts, loc, attn, g, baseline=baseline, aligned=False)
    _check_vs_reference(got, value, ss, starts, loc, attn, g, torch.float32, shapes)


# ---- the CUDA kernels (GPU only) ----------------------------------------------------------------------------------
CUDA_CASES = [  # (B, Q, H, D, shapes, P): fast paths D = 32/64/128, generic D, 1x1 levels, one point
    (2, 9, 2, 64, ((6, 5), (3, 3), (1, 1)), 4),
    (1, 7, 3, 32, ((4, 4), (1, 1)), 2),
    (1, 5, 2, 128, ((3, 6),), 3),
    (2, 6, 2, 5, ((4, 3), (1, 1)), 1),
    (1, 4, 1, 40, ((2, 7), (5, 1)), 2),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def _run(backend, value, ss, starts, loc, attn, g):
    ins = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    with backends.use_backend(backend):
        out = lk.deform_pool(ins[0], ss, starts, ins[1], ins[2])
    out.backward(g)
    return [out.detach()] + [t.grad for t in ins]


def _check_vs_reference(got, value, ss, starts, loc, attn, g, dtype, shapes):
    ref_in = [t.detach().cpu().double().requires_grad_(True) for t in (value, loc, attn)]
    ref = reference.deform_pool(ref_in[0], ss.cpu(), None, ref_in[1], ref_in[2])
    ref.backward(g.cpu().double())
    want = [ref.detach()] + [t.grad for t in ref_in]
    smooth = _smooth(loc.cpu(), shapes, eps=1e-2) & torch.isfinite(loc.cpu())
    for name, a, b in zip(("out", "grad value", "grad loc", "grad weights"), got, want):
        a = a.double().cpu()
        if name == "grad loc":
            a, b = a[smooth], b[smooth]
        scale = max(1.0, float(b.abs().max()))
        err = float((a - b).abs().max())
        assert bool(torch.isfinite(a).all()) and err <= _TOL[dtype] * scale, (name, err, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CUDA_CASES)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_kernels_match_reference(backend, case, dtype):
    B, Q, H, D, shapes, P = case
    if backend == "cuda":
        from lora_kernels.ops import deform

        if deform._cuda_ops() is None:
            pytest.fail("the compiled extension has no deform_pool kernel")
    value, ss, starts, loc, attn = _problem(B=B, Q=Q, H=H, D=D, shapes=shapes, P=P, dtype=dtype, seed=D + Q,
                                            device="cuda")
    loc[0, 0, 0, 0, 0, 0] = float("nan")  # non-finite: no contribution, zero gradients
    g = torch.randn(B, Q, H * D, generator=torch.Generator().manual_seed(3)).to("cuda", dtype)
    got = _run(backend, value, ss, starts, loc, attn, g)
    _check_vs_reference(got, value, ss, starts, loc, attn, g, dtype, shapes)
    assert got[2][0, 0, 0, 0, 0].abs().sum() == 0 and got[3][0, 0, 0, 0, 0] == 0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CUDA_CASES[:2] + CUDA_CASES[3:4])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_kernels_fp32_locations(backend, case, dtype):
    """16-bit value with fp32 locations and weights (the VCE module's choice): fp32 gradients for those."""
    B, Q, H, D, shapes, P = case
    value, ss, starts, loc, attn = _problem(B=B, Q=Q, H=H, D=D, shapes=shapes, P=P, seed=D + 1, device="cuda")
    value = value.to(dtype)
    g = torch.randn(B, Q, H * D, generator=torch.Generator().manual_seed(21)).to("cuda", dtype)
    got = _run(backend, value, ss, starts, loc, attn, g)
    assert got[0].dtype == dtype and got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    _check_vs_reference(got, value, ss, starts, loc, attn, g, dtype, shapes)


@pytest.mark.cuda
def test_cuda_unaligned_value_takes_the_generic_path():
    B, Q, H, D, shapes, P = 1, 5, 2, 64, ((4, 4), (2, 2)), 2
    value, ss, starts, loc, attn = _problem(B=B, Q=Q, H=H, D=D, shapes=shapes, P=P, dtype=torch.float16, seed=4,
                                            device="cuda")
    buf = torch.empty(value.numel() + 1, dtype=value.dtype, device="cuda")
    shifted = buf[1:].view(value.shape)  # 2-byte offset: no 128-bit loads possible
    shifted.copy_(value)
    assert shifted.data_ptr() % 16 != 0 and shifted.is_contiguous()
    shifted.requires_grad_(True)  # a leaf view: no copy on the way to the kernel
    ins = [t.clone().requires_grad_(True) for t in (loc, attn)]
    g = torch.randn(B, Q, H * D, generator=torch.Generator().manual_seed(5)).to("cuda", torch.float16)
    with backends.use_backend("cuda"):
        out = lk.deform_pool(shifted, ss, starts, ins[0], ins[1])
    out.backward(g)
    got = [out.detach(), shifted.grad, ins[0].grad, ins[1].grad]
    _check_vs_reference(got, value, ss, starts, loc, attn, g, torch.float16, shapes)


@pytest.mark.cuda
def test_cuda_reproducibility():
    """Forward, grad locations and grad weights are bit-reproducible (no atomics); grad value uses fp32 atomics,
    so only its last bits may differ between runs (documented: no deterministic mode yet)."""
    B, Q, H, D, shapes, P = 2, 64, 4, 64, ((12, 12), (6, 6)), 4
    value, ss, starts, loc, attn = _problem(B=B, Q=Q, H=H, D=D, shapes=shapes, P=P, seed=6, device="cuda")
    loc = torch.rand(loc.shape, generator=torch.Generator().manual_seed(7)).cuda() * 0.2 + 0.4  # collisions
    g = torch.randn(B, Q, H * D, generator=torch.Generator().manual_seed(8)).cuda()
    a = _run("cuda", value, ss, starts, loc, attn, g)
    b = _run("cuda", value, ss, starts, loc, attn, g)
    for i in (0, 2, 3):
        assert torch.equal(a[i], b[i])
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_deterministic_mode_reproducible(backend, dtype):
    """deterministic=True: every gradient bit-identical across runs, and still correct."""
    B, Q, H, D, shapes, P = 2, 64, 4, 64, ((12, 12), (6, 6), (1, 1)), 4
    value, ss, starts, loc, attn = _problem(B=B, Q=Q, H=H, D=D, shapes=shapes, P=P, dtype=dtype, seed=16,
                                            device="cuda")
    loc = (torch.rand(loc.shape, generator=torch.Generator().manual_seed(17)) * 0.2 + 0.4).to("cuda", dtype)
    g = torch.randn(B, Q, H * D, generator=torch.Generator().manual_seed(18)).to("cuda", dtype)
    runs = []
    for _ in range(3):
        ins = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
        with backends.use_backend(backend):
            out = lk.deform_pool(ins[0], ss, starts, ins[1], ins[2], deterministic=True)
        out.backward(g)
        runs.append([out.detach()] + [t.grad for t in ins])
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert torch.equal(a, b)
    _check_vs_reference(runs[0], value, ss, starts, loc, attn, g, dtype, shapes)


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_deform_sample_vce_shape(deterministic):
    """The fused sampling (Triton) at the VCE shape, bf16 value with fp32 offsets and logits."""
    value, ss, ref, offsets, logits = _sample_problem(B=2, Q=576, H=16, D=64, shapes=((24, 24),) * 4, P=4,
                                                      dtype=torch.bfloat16, off_dtype=torch.float32, seed=37,
                                                      device="cuda")
    ins = [t.clone().requires_grad_(True) for t in (value, offsets, logits)]
    out = lk.deform_sample(ins[0], ss, None, ref, ins[1], ins[2], deterministic=deterministic)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(38)).to("cuda", torch.bfloat16)
    out.backward(g)
    ref_in = [t.detach().cpu().double().requires_grad_(True) for t in (value, offsets, logits)]
    want = reference.deform_sample(ref_in[0], ss.cpu(), None, ref.cpu().double(), ref_in[1], ref_in[2])
    want.backward(g.cpu().double())
    loc = ref.cpu().double().view(1, -1, 1, 1, 1, 2) + offsets.cpu().double() / 24
    smooth = _smooth(loc, ((24, 24),) * 4, eps=1e-2)
    for name, a, b, mask in (("out", out, want, None), ("grad value", ins[0].grad, ref_in[0].grad, None),
                             ("grad offsets", ins[1].grad, ref_in[1].grad, smooth),
                             ("grad logits", ins[2].grad, ref_in[2].grad, None)):
        a = a.detach().double().cpu()
        b = b.detach()
        if mask is not None:
            a, b = a[mask], b[mask]
        err = float((a - b).abs().max())
        assert err <= 6e-2 * max(1.0, float(b.abs().max())), (name, err)


@pytest.mark.cuda
def test_cuda_baseline_kernel_matches_reference():
    from lora_kernels.bench import vce

    B, Q, H, D, shapes, P = 1, 9, 2, 64, ((6, 5), (1, 1)), 3
    value, ss, starts, loc, attn = _problem(B=B, Q=Q, H=H, D=D, shapes=shapes, P=P, seed=9, device="cuda")
    g = torch.randn(B, Q, H * D, generator=torch.Generator().manual_seed(10)).cuda()
    out = vce.baseline_fwd(value, ss, starts, loc, attn)
    gv, gl, ga = vce.baseline_bwd(g, value, ss, starts, loc, attn)
    _check_vs_reference([out, gv, gl, ga], value, ss, starts, loc, attn, g, torch.float32, shapes)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_vce_shape_bf16(backend):
    """The VCE shape (4 levels of 24x24, 16 heads x 64, 576 queries, 4 points) in bf16, through torch.compile."""
    B, Q, H, D, shapes, P = 1, 576, 16, 64, ((24, 24),) * 4, 4
    value, ss, starts, loc, attn = _problem(B=B, Q=Q, H=H, D=D, shapes=shapes, P=P, dtype=torch.bfloat16, seed=11,
                                            device="cuda")
    attn = torch.softmax(attn.float().view(B, Q, H, -1), -1).view(attn.shape).to(torch.bfloat16)
    g = torch.randn(B, Q, H * D, generator=torch.Generator().manual_seed(12)).to("cuda", torch.bfloat16)
    with backends.use_backend(backend):
        f = torch.compile(lambda v, sl, a: lk.deform_pool(v, ss, starts, sl, a, validate=False), backend="aot_eager",
                          fullgraph=True)
        ins = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
        out = f(*ins)
        out.backward(g)
    got = [out.detach()] + [t.grad for t in ins]
    _check_vs_reference(got, value, ss, starts, loc, attn, g, torch.bfloat16, shapes)


def test_lora_bench_vce_cpu_smoke(tmp_path):
    from lora_kernels import cli

    out = tmp_path / "vce.json"
    rc = cli.main(["vce", "--cpu", "--no-compile", "--impls", "grid_sample,lk-triton,lk-cuda", "--reps", "1",
                   "--warmup", "0", "--queries", "4", "--levels", "2", "--no-progress", "--out", str(out)])
    assert rc == 0
    import json

    doc = json.loads(out.read_text())
    assert doc["schema"] == "lora_kernels.bench.vce/1" and doc["kind"] == "cpu-smoke" and doc["complete"]
    st = {(r["impl"], r["op"]): r["status"] for r in doc["rows"]}
    assert st[("grid_sample", "fwd+bwd")] == "PASS" and st[("lk-triton", "fwd+bwd")] == "PASS"
    assert st[("lk-cuda", "fwd")] == "SKIP"
