"""Dual-LoRA: storage, the fp32 reference against a direct per-token loop, the Triton kernels (CPU interpreter,
tiny shapes; the GPU under -m cuda) against the reference forward and backward, gradchecks, opcheck, bad
inputs, and DualLoRALinear (training step, torch.compile fullgraph)."""

from __future__ import annotations

import pytest
import torch
from helpers import DISTRIBUTIONS, assert_close_rule, make_ids

import lora_kernels as lk
from lora_kernels import reference

HAS_CUDA = torch.cuda.is_available()


def _triton_ok() -> bool:
    pytest.importorskip("triton")
    return lk.backends.interpreting() or HAS_CUDA


def make_dual(ranks=(3, 8, 1, 5), in_f=24, out_f=20, dtype=torch.float32, device="cpu", seed=0, max_rank=8,
              **kw) -> lk.DualLoRAWeights:
    """A DualLoRAWeights holding one adapter per rank (ids 0..), random A/T/B/LN (B nonzero so deltas are)."""
    g = torch.Generator().manual_seed(seed)
    w = lk.DualLoRAWeights(in_f, out_f, max(len(ranks), 1), max_rank, dtype=dtype, device=device, **kw)
    for r in ranks:
        A = torch.randn(r, in_f, generator=g) / in_f**0.5
        T = torch.randn(r, in_f, generator=g) / in_f**0.5
        B = torch.randn(out_f, r, generator=g) / r**0.5
        w.add(A, T, B, ln_weight=1 + 0.3 * torch.randn(r, generator=g), ln_bias=0.3 * torch.randn(r, generator=g),
              alpha=2.0 * r)
    return w


def loop_delta(x: torch.Tensor, w: lk.DualLoRAWeights, ids: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Independent spec: one token at a time, LayerNorm written out (fp64)."""
    out = torch.zeros(x.shape[0], w.out_features, dtype=torch.float64)
    for t, i in enumerate(ids.tolist()):
        if i < 0:
            continue
        ad = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in w.adapter(i).items()}
        u = ad["A"] @ x[t].double()
        v = ad["T"] @ x[t].double()
        n = (u - u.mean()) / torch.sqrt(((u - u.mean()) ** 2).mean() + eps)
        out[t] = ad["scale"] * ad["B"] @ (torch.clamp(v, min=0) * (n * ad["ln_weight"] + ad["ln_bias"]))
    return out


def lowp_delta(x, w, ids, dtype):
    """The same computation done by PyTorch in ``dtype`` (the numerics rule's baseline)."""
    out = torch.zeros(x.shape[0], w.out_features, dtype=dtype)
    for t, i in enumerate(ids.tolist()):
        if i < 0:
            continue
        ad = w.adapter(i)
        xl = x[t : t + 1].to(dtype)
        u = xl @ ad["A"].to(dtype).t()
        v = xl @ ad["T"].to(dtype).t()
        ln = torch.nn.functional.layer_norm(u.float(), (u.shape[1],), ad["ln_weight"].float(),
                                            ad["ln_bias"].float()).to(dtype)
        out[t] = (ad["scale"] * ((torch.relu(v) * ln) @ ad["B"].to(dtype).t()))[0]
    return out


def setup(T=13, ranks=(3, 8, 1, 5), dist="uniform", frac_none=0.2, dtype=torch.float32, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    w = make_dual(ranks, dtype=dtype, seed=seed, **kw)
    ids = make_ids(dist, T, len(ranks), frac_none=frac_none, generator=g)
    batch = lk.LoRABatch.from_ids(ids, w.max_adapters, ranks=w.ranks)
    x = torch.randn(T, w.in_features, generator=g).to(dtype)
    return w, batch, ids, x


# ---- storage ------------------------------------------------------------------------------------------------
def test_storage_layout_stacks_a_and_t_and_reuses_rows():
    w = make_dual((3, 8, 1), max_rank=8)
    assert w.rank_of(1) == 8 and w.ranks.tolist() == [[3, 8, 1]] and w.ranks2.tolist() == [[6, 16, 2]]
    # heterogeneous ranks cost only their own 2r rows, packed first fit
    assert w.offsets.tolist() == [0, 6, 22]
    ad = w.adapter(1)
    off = 6
    assert torch.equal(ad["A"], w.a[0, off : off + 8]) and torch.equal(ad["T"], w.a[0, off + 8 : off + 16])
    assert torch.equal(ad["B"].t(), w.b[off : off + 8]) and not w.b[off + 8 : off + 16].any()
    assert ad["scale"] == pytest.approx(2.0)
    w.remove(0)
    assert w.loaded == [1, 2] and w.ranks[0, 0] == 0
    i = w.add(torch.randn(2, 24), torch.randn(2, 24), torch.randn(20, 2))
    assert i == 0 and w.offsets[0] == 0 and w.adapter(0)["scale"] == 1.0  # freed rows reused; alpha defaults to r


def test_new_adapter_is_zero_delta_with_kaiming_a_and_t():
    w = lk.DualLoRAWeights(64, 16, 2, 8, dtype=torch.float32)
    i = w.new_adapter(8, alpha=16, generator=torch.Generator().manual_seed(1))
    ad = w.adapter(i)
    assert not ad["B"].any() and ad["scale"] == 2.0
    assert torch.equal(ad["ln_weight"], torch.ones(8)) and not ad["ln_bias"].any()
    bound = 1 / 64**0.5
    for k in ("A", "T"):
        assert ad[k].abs().max() <= bound and ad[k].std() > 0.3 * bound
    assert not torch.equal(ad["A"], ad["T"])


def test_storage_refusals_change_nothing():
    w = make_dual((3,), max_rank=4)
    before = (w.a.clone(), w.b.clone(), w.ln_weight.clone(), w.ranks.clone(), w.loaded)
    A, T, B = torch.randn(2, 24), torch.randn(2, 24), torch.randn(20, 2)
    with pytest.raises(ValueError, match="T: expected shape"):
        w.add(A, torch.randn(3, 24), B)
    with pytest.raises(ValueError, match="B: expected shape"):
        w.add(A, T, torch.randn(20, 3))
    with pytest.raises(ValueError, match="A: expected rank"):
        w.add(torch.randn(5, 24), torch.randn(5, 24), torch.randn(20, 5))
    with pytest.raises(ValueError, match="ln_weight"):
        w.add(A, T, B, ln_weight=torch.ones(3))
    with pytest.raises(TypeError, match="A: expected dtype"):
        w.add(A.int(), T, B)
    with pytest.raises(ValueError, match="alpha"):
        w.add(A, T, B, alpha=float("nan"))
    with pytest.raises(ValueError, match="adapter_id"):
        w.add(A, T, B)  # the only slot is in use
    after = (w.a, w.b, w.ln_weight, w.ranks, w.loaded)
    assert all(torch.equal(p, q) if isinstance(p, torch.Tensor) else p == q for p, q in zip(before, after))


# ---- reference ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_reference_matches_a_per_token_loop(dist):
    w, batch, ids, x = setup(T=17, dist=dist)
    got = reference.dual_lora_delta(x, w.a, w.b, w.ln_weight, w.ln_bias, w.offsets, w.ranks, w.scales, ids)
    torch.testing.assert_close(got.double(), loop_delta(x, w, ids), rtol=1e-5, atol=1e-5)
    assert not got[ids < 0].any()


def test_inplace_reference_leaves_unserved_rows_bit_identical():
    w, batch, ids, x = setup(T=11, frac_none=0.4)
    y = torch.randn(11, w.out_features)
    y[0] = -0.0
    got = lk.dual_lora_(y.clone(), x, w, batch)
    want = y + loop_delta(x, w, ids).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    none = ids < 0
    assert none.any() and torch.equal(got[none], y[none])
    assert torch.equal(got[none].view(torch.int32), y[none].view(torch.int32))


def test_reference_gradcheck_fp64():
    w, batch, ids, x = setup(T=7, ranks=(2, 4, 3), frac_none=0.2, in_f=8, out_f=6, max_rank=4)
    tensors = [t.detach().double().requires_grad_() for t in (x, w.a, w.b, w.ln_weight, w.ln_bias)]

    def f(x_, a_, b_, lw_, lb_):
        return reference.dual_lora_delta(x_, a_, b_, lw_, lb_, w.offsets, w.ranks, w.scales, ids)

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-6, fast_mode=True)


def _op_args(w, batch):
    return (w.offsets, w.ranks, w.ranks2, w.scales, batch.meta, w.slice_info, w.in_slice_info, batch.max_tokens,
            w.max_rank, w.eps)


def test_op_autograd_gradcheck_fp64():
    """The custom op's registered backward (reference backend on CPU) against finite differences."""
    w, batch, ids, x = setup(T=6, ranks=(2, 4, 3), frac_none=0.2, in_f=8, out_f=6, max_rank=4)
    tensors = [t.detach().double().requires_grad_() for t in (x, w.a, w.b, w.ln_weight, w.ln_bias)]

    def f(x_, a_, b_, lw_, lb_):
        return torch.ops.lora_kernels.dual_lora(x_, a_, b_, lw_, lb_, *_op_args(w, batch))[0]

    # the backward works from the forward's saved fp32 [A x, T x], hence atol 1e-4 rather than fp64's 1e-6
    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-4, rtol=1e-3, fast_mode=True)


def _grads(w, batch, x, backend, weight):
    params = [w.a, w.b, w.ln_weight, w.ln_bias]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    xs = x.clone().requires_grad_()
    try:
        with lk.backends.use_backend(backend):
            d = lk.dual_lora(xs, w, batch)
            (d.float() * weight).sum().backward()
        return [d.detach(), xs.grad] + [p.grad for p in params]
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


def test_functional_op_gradients_match_autograd_of_the_reference():
    w, batch, ids, x = setup(T=9, frac_none=0.3)
    weight = torch.randn(9, w.out_features)
    got = _grads(w, batch, x, "reference", weight)
    tensors = [t.detach().clone().requires_grad_() for t in (x, w.a, w.b, w.ln_weight, w.ln_bias)]
    d = reference.dual_lora_delta(*tensors, w.offsets, w.ranks, w.scales, ids)
    (d * weight).sum().backward()
    torch.testing.assert_close(got[0], d.detach())
    for g, t in zip(got[1:], tensors):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-5)


# ---- Triton (interpreter here, GPU under -m cuda) ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_triton_forward_matches_reference(dist, dtype):
    if not _triton_ok():
        pytest.skip("Triton needs TRITON_INTERPRET=1 or a GPU")
    w, batch, ids, x = setup(T=13, dist=dist, dtype=dtype, seed=3)
    y = torch.randn(13, w.out_features).to(dtype)
    with lk.backends.use_backend("triton"):
        got = lk.dual_lora_(y.clone(), x, w, batch)
    ref = y.float() + loop_delta(x, w, ids).float()
    assert_close_rule(got.float(), ref, y.float() + lowp_delta(x, w, ids, dtype).float(), dtype=dtype,
                      atol=1e-5 if dtype == torch.float32 else 1e-3)
    assert torch.equal(got[ids < 0], y[ids < 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_backward_matches_reference(dtype):
    if not _triton_ok():
        pytest.skip("Triton needs TRITON_INTERPRET=1 or a GPU")
    w, batch, ids, x = setup(T=21, dist="zipf", dtype=dtype, frac_none=0.25, seed=5)
    weight = torch.randn(21, w.out_features, generator=torch.Generator().manual_seed(2))
    want = _grads(w, batch, x, "reference", weight)
    got = _grads(w, batch, x, "triton", weight)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, g, r in zip(("delta", "dx", "grad_a", "grad_b", "grad_ln_w", "grad_ln_b"), got, want):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        err = (g.float() - r.float()).abs().max().item()
        assert err <= tol * (1 + r.float().abs().max().item()), (name, err)


def test_triton_rank_at_cap_and_empty_and_all_none_batches():
    if not _triton_ok():
        pytest.skip("Triton needs TRITON_INTERPRET=1 or a GPU")
    w = make_dual((16, 2), max_rank=16, in_f=40, out_f=33)
    x = torch.randn(5, 40)
    y = torch.randn(5, 33)
    with lk.backends.use_backend("triton"):
        ids = torch.tensor([1, 0, 0, -1, 1], dtype=torch.int32)
        got = lk.dual_lora_(y.clone(), x, w, lk.LoRABatch.from_ids(ids, 2, ranks=w.ranks))
        torch.testing.assert_close(got, y + loop_delta(x, w, ids).float(), rtol=1e-4, atol=1e-4)
        none = torch.full((5,), -1, dtype=torch.int32)
        assert torch.equal(lk.dual_lora_(y.clone(), x, w, lk.LoRABatch.from_ids(none, 2)), y)
        empty = lk.LoRABatch.from_ids(torch.zeros(0, dtype=torch.int32), 2)
        assert lk.dual_lora(torch.zeros(0, 40), w, empty).shape == (0, 33)



@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_strided_rows_and_mixed_dtypes(backend):
    """x and y with strided rows (views into wider buffers), x fp32 against fp16 storage, y fp16."""
    if backend == "triton" and not _triton_ok():
        pytest.skip("Triton needs TRITON_INTERPRET=1 or a GPU")
    w, batch, ids, _ = setup(T=9, dtype=torch.float16, seed=4)
    g = torch.Generator().manual_seed(8)
    xbuf = torch.randn(9, 40, generator=g)
    ybuf = torch.randn(9, 50, generator=g).half()
    x, y = xbuf[:, 3:27], ybuf[:, 5:25]
    ybefore = ybuf.clone()
    with lk.backends.use_backend(backend):
        lk.dual_lora_(y, x, w, batch)
    want = ybefore[:, 5:25].float() + loop_delta(x, w, ids).float()
    torch.testing.assert_close(y.float(), want, rtol=2e-3, atol=2e-3)
    assert torch.equal(ybuf[:, :5], ybefore[:, :5]) and torch.equal(ybuf[:, 25:], ybefore[:, 25:])


# ---- custom-op contract, refusals ---------------------------------------------------------------------------
def test_opcheck_every_dual_custom_op():
    w, batch, ids, x = setup(T=6, ranks=(2, 4), frac_none=0.2)
    y = torch.randn(6, w.out_features)
    ops = torch.ops.lora_kernels
    st = (w.a, w.b, w.ln_weight, w.ln_bias)
    torch.library.opcheck(ops.dual_lora_.default, (y, x, *st, w.offsets, w.ranks, w.scales, batch.meta, w.slice_info,
                                                   batch.max_tokens, w.max_rank, w.eps))
    leaves = [t.clone().requires_grad_() for t in (x, *st)]
    torch.library.opcheck(ops.dual_lora.default, (*leaves, *_op_args(w, batch)))
    delta, uv = ops.dual_lora(x, *st, *_op_args(w, batch))
    torch.library.opcheck(ops.dual_lora_backward.default,
                          (torch.randn_like(delta), x, *st, uv, w.offsets, w.ranks, w.ranks2, w.scales, batch.meta,
                           w.in_slice_info, batch.max_tokens, w.max_rank, w.eps))
    assert ops.dual_lora_.default._schema.arguments[0].alias_info.is_write


def test_refusals_name_the_argument_and_leave_y_untouched():
    w, batch, ids, x = setup(T=6, ranks=(2, 4))
    y = torch.randn(6, w.out_features)
    y0 = y.clone()
    cases = [
        (TypeError, "w_dual", lambda: lk.dual_lora_(y, x, object(), batch)),
        (TypeError, "batch", lambda: lk.dual_lora_(y, x, w, None)),
        (TypeError, "x: expected dtype", lambda: lk.dual_lora_(y, x.long(), w, batch)),
        (ValueError, "x: expected shape", lambda: lk.dual_lora_(y, torch.randn(6, 23), w, batch)),
        (ValueError, "x: expected 2 dims", lambda: lk.dual_lora_(y, x[None], w, batch)),
        (ValueError, "batch: expected a batch built for 5", lambda: lk.dual_lora_(y[:5], x[:5], w, batch)),
        (ValueError, "y: expected shape", lambda: lk.dual_lora_(y[:, :5], x, w, batch)),
        (ValueError, "x: expected unit stride", lambda: lk.dual_lora(torch.randn(24, 6).t(), w, batch)),
        (ValueError, "batch: expected max_adapters",
         lambda: lk.dual_lora_(y, x, w, lk.LoRABatch.from_ids(ids, 9))),
    ]
    for exc, msg, fn in cases:
        with pytest.raises(exc, match=msg):
            fn()
    buf = torch.randn(6, 44)
    with pytest.raises(ValueError, match="y: expected memory disjoint"):
        lk.dual_lora_(buf[:, :20], buf[:, 20:], w, batch)
    with pytest.raises(RuntimeError, match="dual_lora\\(x, w_dual, batch\\)"):
        lk.dual_lora_(y, x.clone().requires_grad_(), w, batch)
    assert torch.equal(y, y0)


# ---- DualLoRALinear -----------------------------------------------------------------------------------------
def _layer(seed=0, device="cpu"):
    torch.manual_seed(seed)
    base = torch.nn.Linear(24, 20, device=device)
    layer = lk.nn.DualLoRALinear(base, max_adapters=3, max_rank=8)
    for r in (4, 8):
        layer.new_adapter(r, alpha=2 * r)
    with torch.no_grad():
        layer.dual_b.normal_()
    return layer


def test_dual_lora_linear_forward_backward_and_a_training_step():
    layer = _layer()
    w = layer.w_dual
    assert w.a is layer.dual_a and w.b is layer.dual_b and w.ln_weight is layer.ln_weight
    ids = torch.tensor([0, 1, -1, 1, 0, 1], dtype=torch.int32)
    x = torch.randn(2, 3, 24)
    with lk.use_batch(lk.LoRABatch.from_ids(ids, 3, ranks=w.ranks)):
        y = layer(x)
        want = layer.base(x).detach() + loop_delta(x.reshape(6, 24), w, ids).float().view(2, 3, 20)
        torch.testing.assert_close(y.detach(), want, rtol=1e-4, atol=1e-4)
        target = torch.randn(2, 3, 20)
        opt = torch.optim.SGD([layer.dual_a, layer.dual_b, layer.ln_weight, layer.ln_bias], lr=0.05)
        losses = []
        for _ in range(4):
            opt.zero_grad()
            loss = ((layer(x) - target) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert layer.dual_a.grad is not None and layer.dual_a.grad.abs().sum() > 0
    # rows of the free slot (ids 2) and unused padding rows get zero gradient
    assert not layer.dual_a.grad[0, 24:].any() and not layer.ln_weight.grad[24:].any()
    assert losses[-1] < losses[0]


def test_dual_lora_linear_compiles_fullgraph():
    layer = _layer(1)
    ids = torch.tensor([1, -1, 0, 0, 1], dtype=torch.int32)
    batch = lk.LoRABatch.from_ids(ids, 3, ranks=layer.w_dual.ranks)
    layer.batch = batch
    x = torch.randn(5, 24, requires_grad=True)
    eager = layer(x)
    eager.sum().backward()
    gx, ga = x.grad.clone(), layer.dual_a.grad.clone()
    x.grad = None
    layer.dual_a.grad = None
    torch._dynamo.reset()
    comp = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = comp(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(layer.dual_a.grad, ga)


def test_dual_lora_linear_needs_a_batch_and_matching_weights():
    with pytest.raises(ValueError, match="w_dual"):
        lk.nn.DualLoRALinear(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="in_features"):
        lk.nn.DualLoRALinear(torch.nn.Linear(8, 20), lk.DualLoRAWeights(24, 20, 2, 4))
    layer = lk.nn.DualLoRALinear(torch.nn.Linear(8, 8), max_adapters=2, max_rank=4)
    with pytest.raises(RuntimeError, match="no LoRABatch"):
        layer(torch.randn(3, 8))


# ---- GPU (-m cuda) ------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dist", ["distinct", "zipf", "identical"])
def test_cuda_forward_matches_reference(dist, dtype):
    g = torch.Generator().manual_seed(7)
    ranks = (32, 8, 16, 1, 64, 32)
    w = make_dual(ranks, in_f=512, out_f=384, max_rank=64, dtype=dtype, device="cuda")
    T = 300
    ids = make_ids(dist, T, len(ranks), frac_none=0.1, generator=g)
    batch = lk.LoRABatch.from_ids(ids.cuda(), w.max_adapters, ranks=w.ranks)
    x = torch.randn(T, 512, generator=g).to("cuda", dtype)
    y = torch.randn(T, 384, generator=g).to("cuda", dtype)
    assert lk.backends.select("dual", x.device) == "triton"
    got = lk.dual_lora_(y.clone(), x, w, batch)
    wc = make_dual(ranks, in_f=512, out_f=384, max_rank=64, dtype=dtype)  # same seed: same adapters on the CPU
    ref = y.float().cpu() + loop_delta(x.cpu().float(), wc, ids).float()
    lowp = y.float().cpu() + lowp_delta(x.cpu(), wc, ids, dtype).float()
    assert_close_rule(got.float().cpu(), ref, lowp, dtype=dtype, atol=1e-3)
    assert torch.equal(got[ids.cuda() < 0], y[ids.cuda() < 0])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_backward_matches_reference(dtype):
    ranks = (32, 8, 16, 64)
    w = make_dual(ranks, in_f=256, out_f=192, max_rank=64, dtype=dtype, device="cuda")
    g = torch.Generator().manual_seed(9)
    ids = make_ids("zipf", 200, len(ranks), frac_none=0.1, generator=g).cuda()
    batch = lk.LoRABatch.from_ids(ids, w.max_adapters, ranks=w.ranks)
    x = torch.randn(200, 256, generator=g).to("cuda", dtype)
    weight = torch.randn(200, 192, generator=g).cuda()
    got = _grads(w, batch, x, None, weight)
    want = _grads(w, batch, x, "reference", weight)
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    for name, a, b in zip(("delta", "dx", "grad_a", "grad_b", "grad_ln_w", "grad_ln_b"), got, want):
        err = (a.float() - b.float()).abs().max().item()
        assert err <= tol * (1 + b.float().abs().max().item()), (name, err)


@pytest.mark.cuda
def test_cuda_dual_lora_linear_compiles_with_inductor():
    layer = _layer(2, device="cuda")
    ids = torch.tensor([1, -1, 0, 0, 1, 1, 0], dtype=torch.int32, device="cuda")
    layer.batch = lk.LoRABatch.from_ids(ids, 3, ranks=layer.w_dual.ranks)
    x = torch.randn(7, 24, device="cuda", requires_grad=True)
    eager = layer(x)
    torch._dynamo.reset()
    out = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bench_dual_cli_smoke(tmp_path):
    """``lora-bench dual`` runs, judges every implementation against the reference and writes its JSON."""
    from lora_kernels import cli

    out = tmp_path / "dual.json"
    rc = cli.main(["dual", "--cpu", "--tokens", "8", "--hidden-in", "32", "--rank", "4", "--reps", "1",
                   "--warmup", "0", "--impls", "lora_kernels,torch,reference", "--out", str(out), "--no-progress"])
    import json

    rec = json.loads(out.read_text())
    assert rc == 0 and rec["schema"] == "lora_kernels.bench.dual/1" and rec["label"].startswith("CPU smoke")
    assert {(r["impl"], r["mode"]) for r in rec["rows"]} == {(i, m) for i in ("lora_kernels", "torch", "reference")
                                                             for m in ("fwd", "fwd+bwd")}
    assert all(r["status"] == "ok" and r["rel_err"]["delta"] < 1e-4 for r in rec["rows"])


@pytest.mark.cuda
def test_cuda_graph_replays_dual_lora_with_new_ids():
    """The in-place op does no host sync: it captures in a CUDA graph and replays with a rebuilt batch."""
    w = make_dual((32, 8, 16), in_f=256, out_f=128, max_rank=32, dtype=torch.bfloat16, device="cuda")
    T = 64
    batch = lk.LoRABatch(T, w.max_adapters, device="cuda")
    ids0 = torch.randint(-1, 3, (T,), dtype=torch.int32, generator=torch.Generator().manual_seed(3)).cuda()
    batch.build(ids0, ranks=w.ranks, validate=False)
    x = torch.randn(T, 256, device="cuda", dtype=torch.bfloat16)
    y0 = torch.randn(T, 128, device="cuda", dtype=torch.bfloat16)
    y = y0.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        lk.dual_lora_(y, x, w, batch)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g), torch.no_grad():
        lk.dual_lora_(y, x, w, batch)
    ids1 = torch.randint(-1, 3, (T,), dtype=torch.int32, generator=torch.Generator().manual_seed(4)).cuda()
    batch.build(ids1, ranks=w.ranks, validate=False)
    y.copy_(y0)
    g.replay()
    with torch.no_grad(), lk.backends.use_backend("reference"):
        want = lk.dual_lora_(y0.cpu().clone(), x.cpu(), make_dual((32, 8, 16), in_f=256, out_f=128, max_rank=32,
                                                                  dtype=torch.bfloat16),
                             lk.LoRABatch.from_ids(ids1.cpu(), 3))
    torch.testing.assert_close(y.float().cpu(), want.float(), rtol=3e-2, atol=3e-2)
