"""The fused VCE sampling (deform_sample) where it is used: the VCE module's call site, the compiled CUDA kernels
(emulated on the CPU by tests/deform_pool_emu.cpp, and for real under ``-m cuda``), the tune verifier, the bench."""

import pytest
import torch

import lora_kernels as lk
from lora_kernels import backends, reference
from lora_kernels.nn import VisualCueEnhancement
from lora_kernels.nn import vce as vce_mod
from test_deform import _TOL, _emulate, _sample_problem, _smooth, emu_binary  # noqa: F401 (emu_binary is a fixture)
from test_deform import extension_op_or_skip

CUDA = torch.cuda.is_available()


def _levels(B, shapes, C, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h * w, C, generator=gen, dtype=torch.float64).to(dtype) for h, w in shapes]


# ---- the module's call site ---------------------------------------------------------------------------------------
def test_module_calls_the_fused_op(monkeypatch):
    """forward and backward go through deform_sample (fp32 reference points, the offsets unrounded), never through
    deform_pool with ready locations."""
    calls = []
    real = vce_mod.deform_sample

    def spy(value, shapes, starts, ref, offsets, logits, **kw):
        calls.append((value.dtype, ref.dtype, offsets.dtype, logits.dtype, tuple(logits.shape), kw))
        return real(value, shapes, starts, ref, offsets, logits, **kw)

    def no_pool(*a, **k):
        raise AssertionError("deform_pool called by the VCE module")

    monkeypatch.setattr(vce_mod, "deform_sample", spy)
    monkeypatch.setattr(lk.ops.deform, "deform_pool", no_pool)
    monkeypatch.setattr(lk, "deform_pool", no_pool)
    shapes = ((3, 4), (2, 2))
    m = VisualCueEnhancement(d_model=16, n_levels=2, n_heads=2, n_points=2, spatial_shapes=shapes)
    levels = [t.requires_grad_(True) for t in _levels(2, shapes, 16, torch.float32)]
    m(levels).sum().backward()
    assert len(calls) == 1
    vdt, rdt, odt, ldt, lshape, kw = calls[0]
    assert (vdt, rdt, odt, ldt) == (torch.float32,) * 4 and lshape == (2, 4, 2, 4) and kw == {"validate": False}
    assert m.cross_attn.sampling_offsets.weight.grad is not None and levels[0].grad is not None
    assert m.cross_attn.attention_weights.weight.grad.abs().sum() > 0

    calls.clear()  # a bf16 module: the offsets reach the op in their own dtype (exact in fp32), ref in fp32
    m.to(torch.bfloat16)(_levels(1, shapes, 16, torch.bfloat16))
    assert calls[0][:4] == (torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16)


def _old_sample(value, shapes, starts, ref, offsets, logits):
    """The module's previous call site: locations and weights in torch, rounded to value's dtype, deform_pool."""
    B, Q, H, L, P, _ = offsets.shape
    ct = torch.promote_types(offsets.dtype, torch.float32)
    wh = shapes.flip(-1).to(ct).view(1, 1, 1, L, 1, 2)
    loc = ref.to(ct).view(1, Q, 1, 1, 1, 2) + offsets.to(ct) / wh
    w = torch.softmax(logits.to(ct), -1).view(B, Q, H, L, P)
    return lk.deform_pool(value, shapes, starts, loc.to(value.dtype), w.to(value.dtype), validate=False)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bf16_value_fp32_locations_beat_rounded_locations(backend):
    """bf16 value, fp32 reference points: the fused op's output is closer to the fp64 result on the same bf16
    inputs than the old rounded-locations path (a bf16 location near 1 is off by up to 2^-9: 0.05 px at 24 wide).
    Both paths round the output to bf16, so their errors differ only by the location rounding."""
    shapes = ((24, 24),)
    gen = torch.Generator().manual_seed(5)
    B, Q, H, D, P = 1, 24, 1, 16, 4
    value = torch.randn(B, 576, H, D, generator=gen).to(torch.bfloat16)
    ref = torch.stack([torch.rand(Q, generator=gen) * 0.25 + 0.7, torch.rand(Q, generator=gen) * 0.25 + 0.7], -1)
    offsets = (torch.randn(B, Q, H, 1, P, 2, generator=gen) * 2).to(torch.bfloat16)
    logits = torch.randn(B, Q, H, P, generator=gen).to(torch.bfloat16)
    ss = torch.tensor(shapes)
    starts = torch.zeros(1, dtype=torch.int64)
    want = reference.deform_sample(value.double(), ss, None, ref.double(), offsets.double(), logits.double())
    with backends.use_backend(backend):
        fused = vce_mod._sample(value, ss, starts, ref, offsets, logits)
        old = _old_sample(value, ss, starts, ref, offsets, logits)
    e_fused = (fused.double() - want).abs().mean().item()
    e_old = (old.double() - want).abs().mean().item()
    assert fused.dtype == torch.bfloat16
    assert e_fused < 0.6 * e_old, (e_fused, e_old)


def test_module_fp64_through_fused_op_matches_composition():
    """fp64 module output equals the old composition (locations and softmax in torch, then deform_pool) to 1e-12."""
    shapes = ((3, 3), (2, 2), (1, 1))
    m = VisualCueEnhancement(d_model=8, n_levels=3, n_heads=2, n_points=2, spatial_shapes=shapes).double()
    torch.nn.init.normal_(m.cross_attn.sampling_offsets.weight, std=0.5)
    levels = _levels(2, shapes, 8, torch.float64)
    got = m(levels)
    try:
        vce_mod._sample, saved = _old_sample, vce_mod._sample
        want = m(levels)
    finally:
        vce_mod._sample = saved
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _spec_sample(value, spatial_shapes, level_start_index, ref, offsets, logits):
    """The module's call site with the spec instead of the op: autograd through reference.deform_sample."""
    return reference.deform_sample(value, spatial_shapes, level_start_index, ref, offsets, logits)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_module_gradients_through_fused_op_match_autograd_of_the_spec(backend):
    """Training through the fused op: the module's output and every gradient (levels, sampling offsets, attention
    weights, projections) equal those of the same module sampling with the spec under autograd. The other tests
    here check the forward, or only that gradients exist; without this one a fused backward returning zero grad
    value or zero grad offsets on the CPU paths passed this module (the mutation check's deform.grad_*_zero)."""
    if backend == "triton" and not (CUDA or backends.interpreting()):
        pytest.skip("Triton needs TRITON_INTERPRET=1 or a GPU")
    shapes = ((3, 4), (2, 2))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = VisualCueEnhancement(d_model=16, n_levels=2, n_heads=2, n_points=2, spatial_shapes=shapes)
        torch.nn.init.normal_(m.cross_attn.sampling_offsets.weight, std=0.5)  # samples across pixels and borders
        torch.nn.init.normal_(m.cross_attn.attention_weights.weight, std=0.5)

    def run():
        levels = [t.requires_grad_(True) for t in _levels(2, shapes, 16, torch.float32, seed=2)]
        m.zero_grad(set_to_none=True)
        out = m(levels)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)))
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        return out.detach(), [t.grad for t in levels], grads

    with backends.use_backend(backend):
        got = run()
    try:
        vce_mod._sample, saved = _spec_sample, vce_mod._sample
        want = run()
    finally:
        vce_mod._sample = saved
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    for k, (a, b) in enumerate(zip(got[1], want[1])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"grad of level {k}")
    assert got[2].keys() == want[2].keys() and "cross_attn.sampling_offsets.weight" in got[2]
    for name in want[2]:
        scale = 1.0 + float(want[2][name].abs().max())
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-4, atol=1e-5 * scale, msg=f"grad of {name}")
    assert float(want[2]["cross_attn.sampling_offsets.weight"].abs().max()) > 0


# ---- the compiled fused kernels, emulated on the CPU --------------------------------------------------------------
def _check_sample(got, value, ss, ref, offsets, logits, g, dtype, shapes):
    ref_in = [t.detach().cpu().double().requires_grad_(True) for t in (value, offsets, logits)]
    want = reference.deform_sample(ref_in[0], ss.cpu(), None, ref.cpu().double(), ref_in[1], ref_in[2])
    want.backward(g.cpu().double())
    wh = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64).view(1, 1, 1, len(shapes), 1, 2)
    loc = ref.cpu().double().view(1, -1, 1, 1, 1, 2) + offsets.cpu().double() / wh
    smooth = _smooth(loc, shapes, eps=1e-2) & torch.isfinite(loc)
    for name, a, b in zip(("out", "grad value", "grad offsets", "grad logits"), got,
                          [want.detach()] + [t.grad for t in ref_in]):
        a = a.detach().double().cpu()
        if name == "grad offsets":
            a, b = a[smooth], b[smooth]
        scale = max(1.0, float(b.abs().max()))
        err = float((a - b).abs().max())
        assert bool(torch.isfinite(a).all()) and err <= _TOL[dtype] * scale, (name, err, dtype)


SAMPLE_CASES = [  # (B, Q, H, D, shapes, P): the fast paths D = 64 / 32, the generic path D = 5
    (2, 4, 2, 64, ((4, 3), (2, 2), (1, 1)), 3),
    (1, 3, 3, 32, ((3, 3), (1, 1)), 2),
    (2, 3, 2, 5, ((4, 3), (1, 1)), 2),
]


@pytest.mark.parametrize("dtype, off_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                              (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_cuda_fused_kernel_source_emulated(emu_binary, tmp_path, case, dtype, off_dtype):  # noqa: F811
    """deform_sample_fwd_kernel / deform_sample_bwd_kernel (csrc/kernels/deform_pool.cuh) as the GPU would run them,
    emulated on the CPU, vs the fp64 reference: output, grad value, grad offsets, grad logits (softmax Jacobian)."""
    B, Q, H, D, shapes, P = case
    value, ss, ref, offsets, logits = _sample_problem(B=B, Q=Q, H=H, D=D, shapes=shapes, P=P, dtype=dtype,
                                                      off_dtype=off_dtype, seed=D + Q)
    sizes = ss[:, 0] * ss[:, 1]
    starts = torch.cumsum(sizes, 0) - sizes
    g = torch.randn(B, Q, H * D, generator=torch.Generator().manual_seed(40)).to(dtype)
    got = _emulate(emu_binary, tmp_path, value, ss, starts, offsets, logits, g, aligned=D != 5, ref=ref)
    _check_sample(got, value, ss, ref, offsets, logits, g, dtype, shapes)
    assert got[3].dtype == torch.float32
    torch.testing.assert_close(got[3].double().sum(-1), torch.zeros(B, Q, H, dtype=torch.float64), atol=1e-5,
                               rtol=0)  # softmax gradients sum to 0 per (b, q, h)


# ---- registration, routing, verification ---------------------------------------------------------------------------
def test_extension_registers_deform_sample_ops():
    ops, fwd = extension_op_or_skip("deform_sample_fwd_", "deform_sample")
    assert "Tensor(a!) out" in str(fwd.default._schema) and "Tensor ref" in str(fwd.default._schema)
    assert "Tensor(c!) grad_logits" in str(ops.deform_sample_bwd_.default._schema)


def test_fused_routes_like_deform_pool(monkeypatch):
    """deform_sample takes the cuda backend exactly when deform_pool would (verified "deform_cuda" and an
    extension that has the fused kernels), and Triton otherwise; CPU tensors always get the reference."""
    from lora_kernels import tuning
    from lora_kernels.ops import deform

    dev = torch.device("cuda", 0)
    monkeypatch.setattr(backends, "triton_can_run", lambda *_: None)
    monkeypatch.setattr(tuning, "verified_kernels", lambda d: {"deform_cuda"})
    monkeypatch.setattr(deform, "_cuda_ops", lambda fused=False: object())
    assert deform._select(dev, torch.bfloat16, fused=True) == "cuda"
    monkeypatch.setattr(deform, "_cuda_ops", lambda fused=False: None if fused else object())
    assert deform._select(dev, torch.bfloat16, fused=True) == "triton"  # an extension built before the fused kernels
    assert deform._select(dev, torch.bfloat16) == "cuda"
    monkeypatch.setattr(tuning, "verified_kernels", lambda d: set())
    assert deform._select(dev, torch.bfloat16, fused=True) == "triton"
    assert deform._select(torch.device("cpu"), torch.float32, fused=True) == "reference"


def test_lora_bench_vce_times_fused_vs_unfused(tmp_path):
    from lora_kernels import cli

    out = tmp_path / "vce.json"
    rc = cli.main(["vce", "--cpu", "--no-compile", "--impls", "grid_sample,lk-sample-triton,lk-unfused-triton",
                   "--reps", "1", "--warmup", "0", "--queries", "4", "--levels", "2", "--no-progress",
                   "--out", str(out)])
    assert rc == 0
    import json

    doc = json.loads(out.read_text())
    st = {(r["impl"], r["op"]): r["status"] for r in doc["rows"]}
    for impl in ("lk-sample-triton", "lk-unfused-triton"):
        assert st[(impl, "fwd")] == "PASS" and st[(impl, "fwd+bwd")] == "PASS", st


# ---- on a GPU ------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype, off_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                              (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("case", SAMPLE_CASES + [(2, 576, 16, 64, ((24, 24),) * 4, 4)])
def test_cuda_fused_kernels_match_reference(case, dtype, off_dtype, deterministic):
    from lora_kernels.ops import deform

    if deform._cuda_ops(fused=True) is None:
        pytest.fail("the compiled extension has no deform_sample kernels")
    B, Q, H, D, shapes, P = case
    value, ss, ref, offsets, logits = _sample_problem(B=B, Q=Q, H=H, D=D, shapes=shapes, P=P, dtype=dtype,
                                                      off_dtype=off_dtype, seed=41, device="cuda")
    ins = [t.clone().requires_grad_(True) for t in (value, offsets, logits)]
    with backends.use_backend("cuda"):
        out = lk.deform_sample(ins[0], ss, None, ref, ins[1], ins[2], deterministic=deterministic)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(42)).to("cuda", dtype)
    out.backward(g)
    _check_sample([out] + [t.grad for t in ins], value, ss, ref, offsets, logits, g, dtype, shapes)
