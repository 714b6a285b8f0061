"""VisualCueEnhancement against an independent, literal port of the official VCE_Module / MSDeformAttn maths
(pengkun-jiao/FHTC ms_cross_attn.py + Deformable-DETR's ms_deform_attn_core_pytorch), written here with
grid_sample and driven by a state dict of the official parameter names. Tiny configs only (CPU)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lora_kernels.nn import VisualCueEnhancement
from lora_kernels.nn.vce import CLIP_VIT_L14_336_LAYERS

EPS = 1e-6  # the official norm_layer = partial(nn.LayerNorm, eps=1e-6)


# ---- the official maths, ported literally ---------------------------------------------------------------------
def official_state_dict(C, L, H, P, *, projector_dim=None, seed=0, dtype=torch.float64):
    """Random weights under the official names (VCE_Module keys; mm_projector_llava for the mlp2x_gelu projector).
    Offsets are large enough (several patches) that many samples fall between pixels, on borders and outside."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    sd = {
        "cross_attn.sampling_offsets.weight": rnd(H * L * P * 2, C, scale=0.5),
        "cross_attn.sampling_offsets.bias": rnd(H * L * P * 2, scale=2.0),
        "cross_attn.attention_weights.weight": rnd(H * L * P, C, scale=0.5),
        "cross_attn.attention_weights.bias": rnd(H * L * P),
        "cross_attn.value_proj.weight": rnd(C, C, scale=C**-0.5),
        "cross_attn.value_proj.bias": rnd(C, scale=0.1),
        "cross_attn.output_proj.weight": rnd(C, C, scale=C**-0.5),
        "cross_attn.output_proj.bias": rnd(C, scale=0.1),
    }
    for n in ("query_norm", "feat_norm", "norm"):
        sd[f"{n}.weight"] = 1 + rnd(C, scale=0.1)
        sd[f"{n}.bias"] = rnd(C, scale=0.1)
    if projector_dim is not None:
        sd["mm_projector_llava.0.weight"] = rnd(projector_dim, C, scale=C**-0.5)
        sd["mm_projector_llava.0.bias"] = rnd(projector_dim, scale=0.1)
        sd["mm_projector_llava.2.weight"] = rnd(projector_dim, projector_dim, scale=projector_dim**-0.5)
        sd["mm_projector_llava.2.bias"] = rnd(projector_dim, scale=0.1)
    return sd


def official_reference_points(spatial_shapes, device):
    reference_points_list = []
    for H_, W_ in spatial_shapes:
        ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, H_ - 0.5, H_, dtype=torch.float32, device=device),
                                      torch.linspace(0.5, W_ - 0.5, W_, dtype=torch.float32, device=device),
                                      indexing="ij")
        ref_y = ref_y.reshape(-1)[None] / H_
        ref_x = ref_x.reshape(-1)[None] / W_
        reference_points_list.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(reference_points_list, 1)[:, :, None]


def ms_deform_attn_core(value, value_spatial_shapes, sampling_locations, attention_weights):
    N_, S_, M_, D_ = value.shape
    _, Lq_, M_, L_, P_, _ = sampling_locations.shape
    value_list = value.split([H_ * W_ for H_, W_ in value_spatial_shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1
    sampling_value_list = []
    for lid_, (H_, W_) in enumerate(value_spatial_shapes):
        value_l_ = value_list[lid_].flatten(2).transpose(1, 2).reshape(N_ * M_, D_, H_, W_)
        sampling_grid_l_ = sampling_grids[:, :, :, lid_].transpose(1, 2).flatten(0, 1)
        sampling_value_l_ = F.grid_sample(value_l_, sampling_grid_l_, mode="bilinear", padding_mode="zeros",
                                          align_corners=False)
        sampling_value_list.append(sampling_value_l_)
    attention_weights = attention_weights.transpose(1, 2).reshape(N_ * M_, 1, Lq_, L_ * P_)
    output = (torch.stack(sampling_value_list, dim=-2).flatten(-2) * attention_weights).sum(-1).view(N_, M_ * D_, Lq_)
    return output.transpose(1, 2).contiguous()


def official_vce(sd, srcs, n_heads, n_points, spatial_shapes=None, query_layer=-1, projector=False):
    """VCE_Module.forward (+ MMProjector's mm_projector_llava) on a list of levels [B, N_l, C]."""
    n_levels = len(srcs)
    if spatial_shapes is None:  # the official rule: square levels
        spatial_shapes = [(int(math.sqrt(s.shape[1])),) * 2 for s in srcs]
    feat = torch.cat(list(srcs), 1)
    ss = torch.as_tensor(spatial_shapes, dtype=torch.long)
    query = srcs[query_layer]
    C = query.shape[-1]
    reference_points = official_reference_points([spatial_shapes[query_layer]], query.device).to(query.dtype)

    def ln(x, name):
        return F.layer_norm(x, (C,), sd[f"{name}.weight"], sd[f"{name}.bias"], EPS)

    def lin(x, name):
        return F.linear(x, sd[f"cross_attn.{name}.weight"], sd[f"cross_attn.{name}.bias"])

    q, input_flatten = ln(query, "query_norm"), ln(feat, "feat_norm")
    N, Len_q, _ = q.shape
    Len_in = input_flatten.shape[1]
    value = lin(input_flatten, "value_proj").view(N, Len_in, n_heads, C // n_heads)
    sampling_offsets = lin(q, "sampling_offsets").view(N, Len_q, n_heads, n_levels, n_points, 2)
    attention_weights = lin(q, "attention_weights").view(N, Len_q, n_heads, n_levels * n_points)
    attention_weights = F.softmax(attention_weights, -1).view(N, Len_q, n_heads, n_levels, n_points)
    offset_normalizer = torch.stack([ss[..., 1], ss[..., 0]], -1)
    sampling_locations = reference_points[:, :, None, :, None, :] \
        + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
    out = ms_deform_attn_core(value, spatial_shapes, sampling_locations, attention_weights)
    x = query + lin(out, "output_proj")
    ln(x, "norm")  # computed and discarded, as in the official code
    if projector:
        h = F.gelu(F.linear(x, sd["mm_projector_llava.0.weight"], sd["mm_projector_llava.0.bias"]))
        x = F.linear(h, sd["mm_projector_llava.2.weight"], sd["mm_projector_llava.2.bias"])
    return x


def _levels(B, shapes, C, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h * w, C, generator=g, dtype=torch.float64).to(dtype) for h, w in shapes]


# ---- forward equals the official maths --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_forward_matches_official_port_stacked(dtype, tol):
    # The official layout: 4 levels of one square grid, stacked [L, B, N, C]; the anchor is the last level.
    C, L, H, P, B = 32, 4, 4, 3, 2
    sd = official_state_dict(C, L, H, P, dtype=dtype)
    m = VisualCueEnhancement(C, L, H, P, dtype=dtype)
    m.load_state_dict(sd)  # VCE_Module's names are this module's names
    srcs = torch.stack(_levels(B, [(5, 5)] * L, C, dtype))
    got = m(srcs)
    want = official_vce(sd, list(srcs.unbind(0)), H, P)
    assert got.shape == (B, 25, C) and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(m(list(srcs.unbind(0))), got, rtol=0, atol=0)  # list == stacked


@pytest.mark.parametrize("shapes,query_level", [
    ([(4, 4)], -1),                                # one level
    ([(6, 6), (3, 3)], 0),                         # anchor = the finer level
    ([(4, 6), (2, 3), (1, 1)], -1),                # non-square grids, a 1x1 level, anchor 1x1
    ([(3, 5), (7, 2), (2, 2), (5, 5), (1, 3)], 2), # five levels, mixed sizes
])
def test_forward_any_levels_and_grids(shapes, query_level):
    C, H, P, B = 16, 2, 2, 2
    L = len(shapes)
    sd = official_state_dict(C, L, H, P, seed=L)
    m = VisualCueEnhancement(C, L, H, P, query_level=query_level, dtype=torch.float64)
    m.load_official_state_dict(sd)
    srcs = _levels(B, shapes, C, seed=L + 7)
    got = m(srcs, spatial_shapes=shapes)
    hq, wq = shapes[query_level]
    assert got.shape == (B, hq * wq, C)
    torch.testing.assert_close(got, official_vce(sd, srcs, H, P, shapes, query_level), rtol=1e-10, atol=1e-10)
    # The constructor's shapes are the default for forward.
    m2 = VisualCueEnhancement(C, L, H, P, query_level=query_level, spatial_shapes=shapes, dtype=torch.float64)
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m2(srcs), got, rtol=0, atol=0)


def test_projector_and_final_norm():
    C, L, H, P, B, Pd = 16, 2, 2, 2, 1, 24
    sd = official_state_dict(C, L, H, P, projector_dim=Pd)
    m = VisualCueEnhancement(C, L, H, P, projector_dim=Pd, dtype=torch.float64)
    m.load_official_state_dict({f"VCE_module.{k}" if not k.startswith("mm_") else k: v for k, v in sd.items()})
    srcs = _levels(B, [(4, 4), (2, 2)], C)
    out = m(srcs)
    assert out.shape == (B, 4, Pd)
    torch.testing.assert_close(out, official_vce(sd, srcs, H, P, projector=True), rtol=1e-10, atol=1e-10)
    # apply_final_norm (not the official behaviour) returns norm(x) before the projector.
    m.projector = None
    x = m(srcs)
    m.apply_final_norm = True
    torch.testing.assert_close(m(srcs), F.layer_norm(x, (C,), sd["norm.weight"], sd["norm.bias"], EPS))


def test_default_config_is_clip_vit_l14_336():
    m = VisualCueEnhancement()
    assert (m.d_model, m.n_levels, m.n_heads, m.n_points, m.query_level) == (1024, 4, 16, 4, 3)
    assert CLIP_VIT_L14_336_LAYERS == (-2, -8, -14, -20)
    sd = m.state_dict()
    assert sd["cross_attn.sampling_offsets.weight"].shape == (16 * 4 * 4 * 2, 1024)
    assert sd["cross_attn.attention_weights.weight"].shape == (16 * 4 * 4, 1024)
    assert set(sd) == set(official_state_dict(8, 1, 1, 1))  # exactly the official names
    # Deformable-DETR's init: ring of head directions scaled by point index, zero weights.
    th = torch.arange(16, dtype=torch.float32) * (2 * math.pi / 16)
    d = torch.stack([th.cos(), th.sin()], -1)
    d = d / d.abs().max(-1, keepdim=True)[0]
    want = d[:, None, None, :] * torch.arange(1, 5, dtype=torch.float32)[None, None, :, None]
    torch.testing.assert_close(sd["cross_attn.sampling_offsets.bias"].view(16, 4, 4, 2), want.expand(16, 4, 4, 2))
    assert not sd["cross_attn.sampling_offsets.weight"].any() and not sd["cross_attn.attention_weights.weight"].any()
    # One forward at the real shapes (576 queries, 4 x 24 x 24 values), against the port.
    srcs = _levels(1, [(24, 24)] * 4, 1024, torch.float32)
    sdo = {k: v.clone() for k, v in sd.items()}
    out = m(srcs)
    assert out.shape == (1, 576, 1024)
    torch.testing.assert_close(out, official_vce(sdo, srcs, 16, 4), rtol=1e-4, atol=1e-4)


def test_select_features_official_order():
    hs = [torch.full((1, 5, 2), float(i)) for i in range(25)]  # embeddings + 24 layers, CLS first
    levels = VisualCueEnhancement.select_features(hs)
    assert [int(t[0, 0, 0]) for t in levels] == [23, 17, 11, 5] and all(t.shape == (1, 4, 2) for t in levels)


# ---- gradients --------------------------------------------------------------------------------------------------
def test_gradients_match_port():
    C, L, H, P, B = 16, 3, 2, 2, 2
    shapes = [(4, 4), (3, 2), (2, 2)]
    sd = official_state_dict(C, L, H, P, projector_dim=8)
    m = VisualCueEnhancement(C, L, H, P, projector_dim=8, dtype=torch.float64)
    m.load_official_state_dict(sd)
    srcs = [t.requires_grad_(True) for t in _levels(B, shapes, C)]
    srcs2 = [t.detach().clone().requires_grad_(True) for t in srcs]
    sd2 = {k: v.clone().requires_grad_(True) for k, v in sd.items()}
    w = torch.randn(B, 4, 8, dtype=torch.float64)
    (m(srcs, spatial_shapes=shapes) * w).sum().backward()
    (official_vce(sd2, srcs2, H, P, shapes, projector=True) * w).sum().backward()
    for a, b in zip(srcs, srcs2):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10)
    names = dict(m.named_parameters())
    for k, v in sd2.items():
        mine = names[k.replace("mm_projector_llava.", "projector.")].grad
        if k.startswith("norm."):  # the discarded final norm gets no gradient, as in the official code
            assert mine is None and v.grad is None
            continue
        assert mine is not None and torch.isfinite(mine).all() and mine.abs().sum() > 0, k
        torch.testing.assert_close(mine, v.grad, rtol=1e-9, atol=1e-10, msg=k)


def test_gradients_flow_fp32_default_init():
    # The official init (zero offset/attention weights) must still train every projection.
    m = VisualCueEnhancement(16, 2, 2, 2, projector_dim=8)
    srcs = [torch.randn(2, 9, 16, requires_grad=True), torch.randn(2, 4, 16, requires_grad=True)]
    m(srcs).square().mean().backward()
    for n, p in m.named_parameters():
        if n.startswith("norm."):
            continue
        if n.startswith("query_norm."):  # feeds only the zero-initialised offset/attention weights
            assert p.grad is not None and not p.grad.any(), n
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in srcs)


# ---- state dicts with official names ----------------------------------------------------------------------------
def test_official_checkpoint_layouts_load():
    C, L, H, P = 8, 2, 2, 1
    sd = official_state_dict(C, L, H, P, projector_dim=6, dtype=torch.float32)
    vce_keys = {k: v for k, v in sd.items() if not k.startswith("mm_")}
    # 1. a VCE_Module state dict: plain load_state_dict
    m = VisualCueEnhancement(C, L, H, P)
    assert m.load_state_dict(vce_keys) is not None
    torch.testing.assert_close(m.cross_attn.value_proj.weight, sd["cross_attn.value_proj.weight"], rtol=0, atol=0)
    # 2. a whole LLaVA checkpoint: model.mm_projector.{VCE_module,mm_projector_llava}.*, other keys ignored
    ckpt = {f"model.mm_projector.{'' if k.startswith('mm_') else 'VCE_module.'}{k}": v for k, v in sd.items()}
    ckpt["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    mp = VisualCueEnhancement(C, L, H, P, projector_dim=6)
    res = mp.load_official_state_dict(ckpt)
    assert not res.missing_keys and not res.unexpected_keys
    torch.testing.assert_close(mp.projector[2].weight, sd["mm_projector_llava.2.weight"], rtol=0, atol=0)
    torch.testing.assert_close(mp.norm.bias, sd["norm.bias"], rtol=0, atol=0)
    # 3. projector keys into a module without a projector: strict refuses, strict=False loads the VCE part
    with pytest.raises(RuntimeError, match="projector"):
        VisualCueEnhancement(C, L, H, P).load_official_state_dict(ckpt)
    m3 = VisualCueEnhancement(C, L, H, P)
    m3.load_official_state_dict(ckpt, strict=False)
    torch.testing.assert_close(m3.query_norm.weight, sd["query_norm.weight"], rtol=0, atol=0)
    # 4. a missing key or a wrong config (heads) refuses under strict
    with pytest.raises(RuntimeError, match="feat_norm"):
        VisualCueEnhancement(C, L, H, P).load_official_state_dict({k: v for k, v in vce_keys.items()
                                                                   if "feat_norm" not in k})
    with pytest.raises(RuntimeError, match="size mismatch"):
        VisualCueEnhancement(C, L, 4, P).load_official_state_dict(vce_keys)
    with pytest.raises(TypeError, match="state_dict"):
        m.load_official_state_dict([1, 2])


# ---- bad inputs -------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clearly():
    C, L, H, P = 8, 2, 2, 1
    m = VisualCueEnhancement(C, L, H, P)
    good = [torch.randn(1, 16, C), torch.randn(1, 4, C)]
    with pytest.raises(ValueError, match=r"features: expected 2 levels \(n_levels\), got 3"):
        m(good + [torch.randn(1, 4, C)])
    with pytest.raises(ValueError, match="features: expected 2 levels"):
        m(torch.randn(3, 1, 4, C))
    with pytest.raises(ValueError, match=r"spatial_shapes\[1\]: expected H\*W == features\[1\].shape\[1\] = 4"):
        m(good, spatial_shapes=[(4, 4), (2, 3)])
    with pytest.raises(ValueError, match="spatial_shapes: expected 2"):
        m(good, spatial_shapes=[(4, 4)])
    with pytest.raises(ValueError, match=r"spatial_shapes\[0\]: expected positive"):
        m(good, spatial_shapes=[(0, 4), (2, 2)])
    with pytest.raises(TypeError, match="spatial_shapes"):
        m(good, spatial_shapes=[(4, 4), (2, 2.5)])
    with pytest.raises(ValueError, match=r"features\[1\]: expected a square number of tokens"):
        m([good[0], torch.randn(1, 6, C)])
    with pytest.raises(ValueError, match=r"features\[1\]: expected shape \(1, N, 8\)"):
        m([good[0], torch.randn(1, 4, C + 1)])
    with pytest.raises(ValueError, match=r"features\[1\]: expected shape \(1, N, 8\)"):
        m([good[0], torch.randn(2, 4, C)])
    with pytest.raises(ValueError, match=r"features\[0\]: expected 3 dims"):
        m([good[0][0], good[1]])
    with pytest.raises(TypeError, match=r"features\[1\]: expected dtype torch.float32"):
        m([good[0], good[1].double()])
    with pytest.raises(TypeError, match=r"features\[1\]: expected a torch.Tensor"):
        m([good[0], "x"])
    with pytest.raises(TypeError, match="features: expected a tensor or a list"):
        m({"a": good[0]})
    with pytest.raises(ValueError, match="n_heads: expected a divisor of d_model=8"):
        VisualCueEnhancement(8, 2, 3, 1)
    with pytest.raises(ValueError, match="query_level"):
        VisualCueEnhancement(8, 2, 2, 1, query_level=2)
    with pytest.raises(ValueError, match="n_levels: expected a positive int"):
        VisualCueEnhancement(8, 0, 2, 1)
    with pytest.raises(ValueError, match="spatial_shapes: expected 2"):
        VisualCueEnhancement(8, 2, 2, 1, spatial_shapes=[(2, 2)])
    # refusals leave the inputs as they were
    before = [t.clone() for t in good]
    with pytest.raises(ValueError):
        m(good, spatial_shapes=[(4, 4), (1, 3)])
    assert all(torch.equal(a, b) for a, b in zip(good, before))
    assert m(good).shape == (1, 4, C)


def test_torch_compile_fullgraph():
    # No graph breaks: the metadata cache, the validation and the sampling op all trace (aot_eager: no C++ build).
    m = VisualCueEnhancement(16, 2, 2, 2, projector_dim=8)
    srcs = [torch.randn(2, 9, 16), torch.randn(2, 4, 16)]
    want = m(srcs)
    got = torch.compile(m, backend="aot_eager", fullgraph=True)(srcs)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert m.cross_attn.value_proj.weight.grad.abs().sum() > 0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_forward_backward_vs_port(dtype):
    # The module on the GPU (deform_pool's GPU backend) against the fp64 port on the CPU, at VCE-like shapes.
    # Numerics rule: error at most 2x that of the port run in the same dtype on the GPU, plus a small floor.
    C, L, H, P, B = 128, 4, 4, 4, 2
    shapes = [(12, 12)] * 3 + [(6, 6)]
    sd64 = official_state_dict(C, L, H, P, projector_dim=64)
    srcs64 = _levels(B, shapes, C)
    w = torch.randn(B, 144, 64, dtype=torch.float64)

    def run_port(device, dt):
        sd = {k: v.to(device, dt, copy=True).requires_grad_(True) for k, v in sd64.items()}
        srcs = [s.to(device, dt, copy=True).requires_grad_(True) for s in srcs64]
        out = official_vce(sd, srcs, H, P, shapes, query_layer=0, projector=True)
        (out.double() * w.to(device)).sum().backward()
        return out.double().cpu(), [s.grad.double().cpu() for s in srcs], sd["cross_attn.sampling_offsets.weight"]

    want, want_g, want_off = run_port("cpu", torch.float64)
    base, base_g, base_off = run_port("cuda", dtype)
    m = VisualCueEnhancement(C, L, H, P, query_level=0, projector_dim=64, device="cuda", dtype=dtype)
    m.load_official_state_dict({k: v.to(dtype) for k, v in sd64.items()})
    srcs = [s.to("cuda", dtype).requires_grad_(True) for s in srcs64]
    out = m(srcs, spatial_shapes=shapes)
    (out.double() * w.cuda()).sum().backward()

    def check(got, ref, port, what):
        err = (got.double().cpu() - ref).abs().max().item()
        floor = 1e-4 if dtype == torch.float32 else 2e-2
        bound = 2 * (port.double().cpu() - ref).abs().max().item() + floor * max(1.0, ref.abs().max().item())
        assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g}"

    check(out, want, base, "output")
    for i, (g, r, pg) in enumerate(zip(srcs, want_g, base_g)):
        check(g.grad, r, pg, f"grad features[{i}]")
    check(m.cross_attn.sampling_offsets.weight.grad, want_off.grad.cpu(), base_off.grad, "grad sampling_offsets")
