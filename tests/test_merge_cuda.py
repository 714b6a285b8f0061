"""merge_ / unmerge_ on a GPU: Triton (the default) and the compiled CUDA kernel (forced), bit-exact cycles at 7B
shapes, merge_many_ vs per-layer merges. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from test_merge import adversarial_W, assert_bits_equal, bits, check_merge_many_equals_per_layer, make_weights

import lora_kernels as lk
from lora_kernels import reference as ref
from lora_kernels.ops import merge as M
from lora_kernels.ops.merge import dispatch

pytestmark = pytest.mark.cuda
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cuda_backend_or_skip():
    if dispatch._cuda_ops() is None:
        pytest.skip("the compiled extension has no merge kernel (rebuild it)")


def _to_cuda(w):
    """A CUDA copy of a CPU LoRAWeights (same slots, offsets, ranks and scales)."""
    a, b = w.to_padded()
    g = lk.LoRAWeights.from_padded(a.cuda(), b.cuda(), ranks=w.ranks.cuda(), scales=w.scales.cuda(),
                                   slice_outs=list(w.slice_outs))
    return g


def test_bf16_4096_100_cycles_bit_exact():
    torch.manual_seed(0)
    dt = torch.bfloat16
    w = lk.LoRAWeights(4096, 4096, max_adapters=2, max_rank=16, dtype=dt, device="cuda")
    w.add((torch.randn(16, 4096, device="cuda") / 64).to(dt), (torch.randn(4096, 16, device="cuda") * 0.01).to(dt),
          alpha=32)
    W0 = (torch.randn(4096, 4096, device="cuda") * 0.02).to(dt)
    W = W0.clone()
    esc = 0
    for i in range(100):
        rec = M.merge_(W, w, 0, 1.0 + 0.01 * i)
        assert rec.backend == "triton" and rec.code.numel() == 4096 * 4096 // 4
        esc += rec.escapes
        if i == 0:
            A, B, s = w.adapter(0)
            truth = W0.float() + s * (B.float() @ A.float())
            assert (W.float() - truth).abs().max() <= 2 * torch.finfo(dt).eps * truth.abs().max()
        M.unmerge_(W, rec)
        assert torch.equal(bits(W), bits(W0)), f"cycle {i}"
    print(f"\nbf16 4096x4096 r=16: escapes {esc / (100 * W.numel()):.5%} of weights per merge")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_adversarial_cycles(backend, dtype):
    if backend == "cuda":
        _cuda_backend_or_skip()
    w = _to_cuda(make_weights(72, (40, 24, 24), [(4, 3, 8), (16, 1, 2), 5], dtype, seed=10, scale_b=0.3))
    W0 = adversarial_W(dtype, (88, 72), seed=11).cuda()
    W = W0.clone()
    with lk.backends.use_backend(backend):
        for i in range(30):
            ads = [[0], [1, 2], [2, 0, 1]][i % 3]
            rec = M.merge_(W, w, ads, [(-1.0) ** i * (0.25 + 0.5 * (i % 5))] * len(ads))
            assert rec.backend == backend
            M.unmerge_(W, rec)
            assert_bits_equal(W, W0, f"{backend} cycle {i}")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_backend_vs_reference(backend):
    if backend == "cuda":
        _cuda_backend_or_skip()
    dt = torch.bfloat16
    wc = make_weights(256, (192, 64), [(16, 8), (4, 4)], dt, seed=3, scale_b=0.05)
    W0 = (torch.randn(256, 256) * 0.02).to(dt)
    Wr = W0.clone()
    M.merge_(Wr, wc, [0, 1], [0.5, 1.0])
    W = W0.cuda()
    with lk.backends.use_backend(backend):
        rec = M.merge_(W, _to_cuda(wc), [0, 1], [0.5, 1.0])
    steps = (ref.float_key(W.cpu()) - ref.float_key(Wr)).abs()
    assert int(steps.max()) <= 1  # the same fp32 delta up to summation order, rounded once
    with lk.backends.use_backend(backend):
        M.unmerge_(W, rec)
    assert_bits_equal(W.cpu(), W0)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_merge_many_equals_per_layer(backend):
    if backend == "cuda":
        _cuda_backend_or_skip()
    dt = torch.bfloat16
    shapes = [(512, (256, 128, 128)), (512, (1376,)), (1376, (512,)), (100, (33,))]
    ws = [_to_cuda(make_weights(i, o, [(8,) * len(o), (16,) * len(o)], dt, seed=20 + k, scale_b=0.02))
          for k, (i, o) in enumerate(shapes)]
    W0s = [(torch.randn(w.out_features, w.in_features, device="cuda") * 0.02).to(dt) for w in ws]
    check_merge_many_equals_per_layer(W0s, ws, backend)
