"""Autograd of the batched LoRA delta: lora_delta / lora_linear / LoRALinear training, the reference backward,
the segmented Triton backward (CPU interpreter here, GPU under ``cuda``), optimiser steps over the paged storage.

The independent spec for gradients is torch autograd through a per-adapter loop (``_loop_delta``), in fp64 for
exactness checks and in the low precision dtype for the numerics rule's PyTorch baseline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lora_kernels as lk
from helpers import assert_close_rule, make_weights
from lora_kernels import backends

# Small shapes: the Triton tests run in the CPU interpreter.
IN, OUTS = 32, (16, 24)
RANKS = [(4, 2), (16, 8), (1, 16), (8, 8)]  # per-slice ranks; slot 3 stays absent from the batches below
IDS = [0, 1, 2, -1, 1, 1, 0, 2, 2, 2, -1, 0, 1, 1, 1, 1, 0, 0, 2, 1]


def _setup(dtype=torch.float32, outs=OUTS, ranks=RANKS, ids=IDS, seed=0, churn=True, device="cpu", extra_slots=1):
    g = torch.Generator().manual_seed(seed)
    w = make_weights(IN, outs, ranks, dtype=dtype, generator=g, max_adapters=len(ranks) + extra_slots, churn=churn)
    if device != "cpu":
        w = _to(w, device)
    t_ids = torch.tensor(ids, dtype=torch.int32)
    batch = lk.LoRABatch.from_ids(t_ids.to(device), w.max_adapters, ranks=w.ranks)
    x = torch.randn(len(ids), IN, generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(len(ids), sum(outs), generator=g).to(device=device, dtype=dtype)
    return w, batch, t_ids, x, dy


def _to(w, device):
    """A copy of LoRAWeights on another device (same allocation)."""
    import copy

    w2 = copy.copy(w)
    w2.a, w2.b = w.a.to(device), w.b.to(device)
    w2.offsets, w2.ranks, w2.scales = w.offsets.to(device), w.ranks.to(device), w.scales.to(device)
    w2.slice_info = w.slice_info.to(device)
    return w2


def _loop_delta(x, a, b, w, ids, dtype):
    """Per-adapter PyTorch loop in ``dtype`` on the paged tensors a/b (autograd gives paged gradients)."""
    out = torch.zeros(x.shape[0], w.out_features, dtype=dtype, device=x.device)
    xd, ad, bd = x.to(dtype), a.to(dtype), b.to(dtype)
    idc = ids.cpu()
    for i in torch.unique(idc).tolist():
        if i < 0:
            continue
        toks = (idc == i).nonzero().flatten().to(x.device)
        off = int(w.offsets[i])
        for s, (c0, n) in enumerate(zip(w.slice_cols, w.slice_outs)):
            r = int(w.ranks[s, i])
            if r:
                sc = float(w.scales[s, i])
                h = xd[toks] @ ad[s, off : off + r].t()
                out[toks, c0 : c0 + n] = sc * (h @ bd[off : off + r, c0 : c0 + n])
    return out


def _loop_grads(w, ids, x, dy, dtype):
    """(dx, da, db) by autograd of :func:`_loop_delta` in ``dtype``."""
    xl = x.detach().to(dtype).requires_grad_()
    al = w.a.detach().to(dtype).requires_grad_()
    bl = w.b.detach().to(dtype).requires_grad_()
    _loop_delta(xl, al, bl, w, ids, dtype).backward(dy.to(dtype))
    return xl.grad, al.grad, bl.grad


def _op_args(w, batch):
    return (w.offsets, w.ranks, w.scales, batch.meta, w.slice_info, list(w.slice_cols), list(w.slice_outs),
            batch.max_tokens, w.max_rank)


def _owned_rows(w, ids):
    """bool [S, R]: rows owned by an adapter present in ``ids`` (per slice, up to that slice's rank)."""
    own = torch.zeros(w.num_slices, w.capacity_rows, dtype=torch.bool)
    for i in set(int(v) for v in ids if v >= 0):
        off = int(w.offsets[i])
        for s in range(w.num_slices):
            own[s, off : off + int(w.ranks[s, i])] = True
    return own


# ---- the reference path (CPU), exact checks in fp64 ---------------------------------------------------------
def test_gradcheck_op_fp64():
    w, batch, ids, _, _ = _setup(outs=(3, 4), ranks=[(2, 1), (3, 3), (1, 2)], ids=[0, 1, -1, 1, 2, 0], churn=False)
    g = torch.Generator().manual_seed(1)
    T = 6
    a = torch.randn(*w.a.shape[:2], 5, generator=g, dtype=torch.float64)
    b = torch.randn(w.b.shape, generator=g, dtype=torch.float64)
    x = torch.randn(T, 5, generator=g, dtype=torch.float64)
    y0 = torch.randn(T, 7, generator=g, dtype=torch.float64)
    args = _op_args(w, batch)

    def f(y0, x, a, b):
        return torch.ops.lora_kernels.lora_add(y0, x, a, b, *args)

    inputs = tuple(t.requires_grad_() for t in (y0, x, a, b))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8)


def test_reference_backward_matches_autograd_fp64():
    """The op's gradients (reference backward) equal autograd through the per-adapter loop, in fp64: mixed
    per-slice ranks, -1 tokens, an absent adapter and free rows (zero grad), rank-paged rows out of id order."""
    w, batch, ids, x, dy = _setup()
    x64, dy64 = x.double(), dy.double()
    a = w.a.detach().double().requires_grad_()
    b = w.b.detach().double().requires_grad_()
    xg = x64.clone().requires_grad_()
    y0 = torch.zeros(len(IDS), w.out_features, dtype=torch.float64)
    out = torch.ops.lora_kernels.lora_add(y0, xg, a, b, *_op_args(w, batch))
    out.backward(dy64)
    dx, da, db = _loop_grads(w, ids, x64, dy64, torch.float64)
    torch.testing.assert_close(out, _loop_delta(x64, w.a.double(), w.b.double(), w, ids, torch.float64))
    torch.testing.assert_close(xg.grad, dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.grad, da, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.grad, db, rtol=1e-12, atol=1e-12)
    own = _owned_rows(w, IDS)
    assert own.any() and not own.all()
    assert (a.grad[~own] == 0).all()  # absent adapter 3, free rows, rows past each slice's rank
    assert (b.grad.abs().sum(1)[~own.any(0)] == 0).all()
    assert (xg.grad[torch.tensor(IDS) < 0] == 0).all()  # -1 tokens: no LoRA gradient


def test_opcheck_lora_add():
    w, batch, ids, x, dy = _setup(outs=(8,), ranks=[3, 5], ids=[0, 1, -1, 1, 0], churn=False)
    y0 = torch.randn(5, 8)
    a, b = w.a.detach().clone().requires_grad_(), w.b.detach().clone().requires_grad_()
    torch.library.opcheck(torch.ops.lora_kernels.lora_add.default,
                          (y0.requires_grad_(), x.clone().requires_grad_(), a, b, *_op_args(w, batch)))


# ---- public API ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base_grad", [False, True])
def test_lora_linear_grads(base_grad):
    """lora_linear = F.linear + delta: grad x includes dy W0; W0/bias get a grad only when they require it; the
    paged a/b grads equal the per-adapter loop's; x with leading dims."""
    w, batch, ids, x, dy = _setup()
    w.requires_grad_()
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(w.out_features, IN, generator=g).requires_grad_(base_grad)
    bias = torch.randn(w.out_features, generator=g).requires_grad_(base_grad)
    x3 = x.view(4, 5, IN).clone().requires_grad_()
    y = lk.lora_linear(x3, W0, bias, w, batch)
    assert y.shape == (4, 5, w.out_features)
    y.backward(dy.view(4, 5, -1))
    dx, da, db = _loop_grads(w, ids, x, dy, torch.float64)
    dx = dx + dy.double() @ W0.detach().double()
    torch.testing.assert_close(x3.grad.view(len(IDS), IN).double(), dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.a.grad.double(), da, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.b.grad.double(), db, rtol=1e-5, atol=1e-5)
    if base_grad:
        torch.testing.assert_close(W0.grad, dy.t() @ x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bias.grad, dy.sum(0), rtol=1e-5, atol=1e-5)
    else:
        assert W0.grad is None and bias.grad is None
    with torch.no_grad():
        want = F.linear(x, W0, bias)
        lk.add_lora_(want, x, w, batch)
    assert torch.equal(y.detach().view_as(want), want)  # same forward as the serving path


def test_lora_delta_x_only_and_serving_path():
    """Frozen adapters with x requiring grad: only dx. Under no_grad (or nothing requiring grad) the serving
    path: bit-identical to add_lora_ on zeros, and no graph."""
    w, batch, ids, x, dy = _setup()
    xg = x.clone().requires_grad_()
    d = lk.lora_delta(xg, w, batch)
    d.backward(dy)
    dx, _, _ = _loop_grads(w, ids, x, dy, torch.float64)
    torch.testing.assert_close(xg.grad.double(), dx, rtol=1e-5, atol=1e-5)
    assert w.a.grad is None and w.b.grad is None
    w.requires_grad_()
    with torch.no_grad():
        d0 = lk.lora_delta(x, w, batch)
    want = torch.zeros_like(d0)
    with torch.no_grad():
        lk.add_lora_(want, x, w, batch)
    assert d0.grad_fn is None and torch.equal(d0, want) and torch.equal(d.detach(), want)


def test_all_tokens_none_and_empty_batch():
    w, _, _, x, dy = _setup()
    w.requires_grad_()
    batch = lk.LoRABatch.from_ids(torch.full((len(IDS),), -1, dtype=torch.int32), w.max_adapters)
    xg = x.clone().requires_grad_()
    d = lk.lora_delta(xg, w, batch)
    d.backward(dy)
    assert (d == 0).all() and (xg.grad == 0).all() and (w.a.grad == 0).all() and (w.b.grad == 0).all()
    empty = lk.LoRABatch(4, w.max_adapters).build(torch.zeros(0, dtype=torch.int32))
    x0 = torch.zeros(0, IN).requires_grad_()
    d0 = lk.lora_delta(x0, w, empty)
    d0.sum().backward()
    assert d0.shape == (0, w.out_features) and x0.grad.shape == (0, IN)


def test_lora_linear_module_training_and_serving():
    """LoRALinear trains when its weights require grad (grads of a frozen base stay None) and serves as before
    under no_grad; mixed/merged modes refuse to train."""
    w, batch, ids, x, dy = _setup()
    base = torch.nn.Linear(IN, w.out_features)
    base.requires_grad_(False)
    layer = lk.nn.LoRALinear(base, w, batch=batch)
    with torch.no_grad():
        y_serve = layer(x)
    w.requires_grad_()
    y = layer(x)
    torch.testing.assert_close(y, y_serve, rtol=0, atol=0)
    y.backward(dy)
    _, da, db = _loop_grads(w, ids, x, dy, torch.float64)
    torch.testing.assert_close(w.a.grad.double(), da, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.b.grad.double(), db, rtol=1e-5, atol=1e-5)
    assert base.weight.grad is None and layer.lora_parameters() == [w.a, w.b]
    layer.set_serving_mode("mixed", 0)
    with pytest.raises(RuntimeError, match="unmerged"):
        layer(x)
    with torch.no_grad():
        layer(x)  # serving in mixed mode still works


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_optimizer_step_over_paged_equals_per_adapter(opt_name):
    """One optimiser over the paged a/b equals separate optimisers over each adapter's own A_i, B_i (two steps;
    rows of absent adapters and free rows untouched by SGD)."""
    w, batch, ids, x, dy = _setup()
    own_ids = sorted(set(i for i in IDS if i >= 0))
    per = {}
    for i in range(len(RANKS)):
        off = int(w.offsets[i])
        for s in range(w.num_slices):
            r = int(w.ranks[s, i])
            c0, n = w.slice_cols[s], w.slice_outs[s]
            per[(i, s)] = (w.a[s, off : off + r].detach().clone().requires_grad_(),
                           w.b[off : off + r, c0 : c0 + n].detach().clone().requires_grad_())
    a0 = w.a.detach().clone()

    def make(params):
        if opt_name == "sgd":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9)
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.0)

    w.requires_grad_()
    opt = make(w.parameters())
    opt_per = make([p for ab in per.values() for p in ab])
    for _ in range(2):
        opt.zero_grad()
        (lk.lora_delta(x, w, batch) * dy).sum().backward()
        opt.step()
        opt_per.zero_grad()
        loss = 0
        idc = ids
        for (i, s), (A, Bt) in per.items():
            toks = (idc == i).nonzero().flatten()
            if len(toks):
                c0, n = w.slice_cols[s], w.slice_outs[s]
                loss = loss + (float(w.scales[s, i]) * (x[toks] @ A.t()) @ Bt * dy[toks, c0 : c0 + n]).sum()
        loss.backward()
        opt_per.step()
    for (i, s), (A, Bt) in per.items():
        off, r = int(w.offsets[i]), A.shape[0]
        c0, n = w.slice_cols[s], w.slice_outs[s]
        torch.testing.assert_close(w.a[s, off : off + r].detach(), A.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w.b[off : off + r, c0 : c0 + n].detach(), Bt.detach(), rtol=1e-5, atol=1e-6)
        if i not in own_ids:
            assert torch.equal(A.detach(), a0[s, off : off + r])
    own = _owned_rows(w, IDS)
    assert torch.equal(w.a.detach()[~own], a0[~own])


def test_rebuilding_batch_before_backward_raises():
    """The backward saves the batch's meta: rebuilding the batch in place in between is caught by autograd."""
    w, batch, ids, x, dy = _setup()
    w.requires_grad_()
    d = lk.lora_delta(x, w, batch)
    batch.build(torch.zeros(len(IDS), dtype=torch.int32), ranks=w.ranks)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        d.backward(dy)


def test_bad_inputs_refused_before_anything_runs():
    w, batch, ids, x, dy = _setup()
    w.requires_grad_()
    W0 = torch.randn(w.out_features, IN)
    with pytest.raises(ValueError, match="x: expected shape"):
        lk.lora_delta(x[:, :-1].contiguous(), w, batch)
    with pytest.raises(TypeError, match="x: expected dtype"):
        lk.lora_delta(x.double(), w, batch)
    with pytest.raises(ValueError, match="batch: expected a batch built for"):
        lk.lora_delta(x[:-1], w, batch)
    with pytest.raises(TypeError, match="weights: expected a LoRAWeights"):
        lk.lora_delta(x, "w", batch)
    with pytest.raises(ValueError, match="W0: expected shape"):
        lk.lora_linear(x, W0.t().contiguous(), None, w, batch)
    with pytest.raises(TypeError, match="W0: expected dtype"):
        lk.lora_linear(x, W0.half(), None, w, batch)
    with pytest.raises(ValueError, match="bias: expected shape"):
        lk.lora_linear(x, W0, torch.zeros(3), w, batch)
    with pytest.raises(TypeError, match="requires_grad: expected a bool"):
        w.requires_grad_(1)
    assert w.a.grad is None and w.b.grad is None  # nothing ran


def test_compile_aot_eager_fwd_bwd():
    """torch.compile (aot_eager: fake impls, functionalisation, the registered autograd; no C++ compile here)
    over lora_linear matches eager, forward and grads."""
    w, batch, ids, x, dy = _setup()
    w.requires_grad_()
    W0 = torch.randn(w.out_features, IN, generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    _check_compiled_lora_linear(w, batch, x, dy, W0, backend="aot_eager")


def _check_compiled_lora_linear(w, batch, x, dy, W0, **compile_kw) -> None:
    """``torch.compile(**compile_kw)`` (fullgraph) over lora_linear(x, W0, None, w, batch) matches eager: the
    output and the grads of x, w.a and w.b for the upstream gradient ``dy`` (``w`` requires grad)."""

    def f(x):
        return lk.lora_linear(x, W0, None, w, batch)

    xe = x.clone().requires_grad_()
    ye = f(xe)
    ye.backward(dy)
    ge = (xe.grad.clone(), w.a.grad.clone(), w.b.grad.clone())
    w.a.grad = w.b.grad = None
    xc = x.clone().requires_grad_()
    yc = torch.compile(f, fullgraph=True, **compile_kw)(xc)
    yc.backward(dy)
    torch.testing.assert_close(yc, ye)
    for got, want in zip((xc.grad, w.a.grad, w.b.grad), ge):
        torch.testing.assert_close(got, want)


# ---- the Triton backward (CPU interpreter) ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_backward_interpreter(dtype):
    """Forced Triton, through lora_delta's autograd: grads vs the fp32 reference within 2x PyTorch's error in
    ``dtype`` (the per-adapter loop's autograd), multi-slice, mixed ranks, -1 tokens, an absent adapter."""
    pytest.importorskip("triton")
    if not backends.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
    w, batch, ids, x, dy = _setup(dtype)
    w.requires_grad_()
    xg = x.clone().requires_grad_()
    with backends.use_backend("triton"):
        d = lk.lora_delta(xg, w, batch)
        d.backward(dy)
    ref = _loop_grads(w, ids, x.float(), dy.float(), torch.float64)
    lowp = _loop_grads(w, ids, x, dy, dtype)
    for name, got, r, lp in zip(("dx", "da", "db"), (xg.grad, w.a.grad, w.b.grad), ref, lowp):
        assert got.dtype == dtype
        assert_close_rule(got, r.float(), lp, dtype=dtype, name=name)
    own = _owned_rows(w, IDS)
    assert (w.a.grad[~own] == 0).all()


def test_triton_outer_split_and_padded_layout():
    """The outer-product kernel with token splits (fp32 atomics) and small blocks, on a padded layout, fp32."""
    pytest.importorskip("triton")
    if not backends.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
    from lora_kernels.triton import sgmv_backward as SB

    w, batch, ids, x, dy = _setup(outs=(24,), ranks=[5, 16, 3], ids=[1] * 14 + [0, -1, 2, 0], churn=False)
    ref = lk.reference.lora_add_backward(dy, x, w.a, w.b, w.offsets, w.ranks, w.scales, ids, w.slice_cols,
                                         w.slice_outs)
    for cfg in ({"SPLIT_M": 3, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_R": 16}, {"SPLIT_M": 1, "BLOCK_R": 32}):
        got = SB.lora_backward(dy, x, w.a, w.b, w.offsets, w.ranks, w.scales, batch.meta, batch.max_tokens,
                               w.slice_info, w.slice_cols, w.slice_outs, w.max_rank, config=cfg)
        for name, gt, r in zip("xab", got, ref):
            torch.testing.assert_close(gt, r, rtol=1e-5, atol=1e-5, msg=f"grad {name} {cfg}")
    dx, da, db = SB.lora_backward(dy, x, w.a, w.b, w.offsets, w.ranks, w.scales, batch.meta, batch.max_tokens,
                                  w.slice_info, w.slice_cols, w.slice_outs, w.max_rank, need_x=False, need_b=False)
    assert dx.numel() == 0 and db.numel() == 0 and torch.allclose(da, ref[1], rtol=1e-5, atol=1e-5)


def test_bench_backward_cpu_smoke(tmp_path):
    """``lora-bench backward`` on tiny CPU shapes: both implementations run, pass the gradient check, and the
    JSON says it is a CPU smoke run."""
    import json

    from lora_kernels import cli

    out = tmp_path / "bw.json"
    rc = cli.main(["backward", "--tokens", "12", "--hidden", "16", "--adapters", "3", "--reps", "1", "--warmup",
                   "0", "--out", str(out), "--no-progress"])
    doc = json.loads(out.read_text())
    assert rc == 0 and doc["kind"] == "cpu-smoke" and doc["complete"]
    assert sorted(r["impl"] for r in doc["rows"]) == ["lk", "loop"]
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in doc["rows"])


# ---- GPU ----------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_backward_rule(dtype):
    """On the GPU (Triton by default): lora_linear's grads vs the fp32 reference within the numerics rule,
    a larger batch (64 adapters of mixed ranks, -1 tokens, one absent adapter)."""
    g = torch.Generator().manual_seed(5)
    ranks = [(8, 16, 32, 64)[i % 4] for i in range(64)]
    ids = torch.randint(0, 64, (777,), generator=g, dtype=torch.int32)
    ids[ids == 7] = -1
    ids[torch.rand(777, generator=g) < 0.1] = -1
    w, batch, ids_t, x, dy = _setup(dtype, outs=(96, 160), ranks=ranks, ids=ids.tolist(), device="cuda")
    W0 = torch.randn(w.out_features, IN, generator=g).to("cuda", dtype)
    w.requires_grad_()
    xg = x.clone().requires_grad_()
    y = lk.lora_linear(xg, W0, None, w, batch)
    y.backward(dy)
    torch.cuda.synchronize()
    wc = _to(w, "cpu")
    ref = _loop_grads(wc, ids_t, x.float().cpu(), dy.float().cpu(), torch.float64)
    lowp = _loop_grads(w, ids_t, x, dy, dtype)
    base_dx = (dy.float() @ W0.float()).cpu().double()
    base_dx_lowp = dy @ W0
    for name, got, r, lp in zip(("dx", "da", "db"), (xg.grad, w.a.grad, w.b.grad), ref, lowp):
        if name == "dx":
            r, lp = r + base_dx, lp + base_dx_lowp
        assert_close_rule(got.cpu(), r.float(), lp.cpu(), dtype=dtype, name=name)


@pytest.mark.cuda
def test_cuda_lora_linear_compile_fwd_bwd():
    """torch.compile over lora_linear (fake impls + registered autograd) matches eager, forward and grads."""
    w, batch, ids, x, dy = _setup(torch.float16, device="cuda")
    w.requires_grad_()
    W0 = torch.randn(w.out_features, IN, device="cuda", dtype=torch.float16)
    _check_compiled_lora_linear(w, batch, x, dy, W0)
