"""The reference (the spec) against a per-token naive loop written from the op semantics alone."""

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference


def naive_delta(x, w, ids):
    """y[t, cols_s] = s * (x[t] @ A^T) @ B^T, one token and one slice at a time, in fp64."""
    y = torch.zeros(x.shape[0], w.out_features, dtype=torch.float64)
    for t, i in enumerate(ids.tolist()):
        if i < 0 or i not in w.loaded:  # -1 and free slots (rank 0) get nothing
            continue
        for s in range(w.num_slices):
            A, B, sc = w.adapter(i, s)
            c0 = w.slice_cols[s]
            y[t, c0 : c0 + w.slice_outs[s]] = sc * (x[t].double() @ A.double().T) @ B.double().T
    return y


def _weights(outs, ranks, in_f=24, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = lk.LoRAWeights(in_f, outs, max_adapters=len(ranks) + 1, max_rank=max(ranks), dtype=dtype)
    S = len(outs) if isinstance(outs, (list, tuple)) else 1
    for r in ranks:
        A = [torch.randn(r, in_f, generator=g) for _ in range(S)]
        B = [torch.randn(o, r, generator=g) for o in (outs if S > 1 else [outs])]
        w.add(A if S > 1 else A[0], B if S > 1 else B[0], alpha=float(r) * 2)
    return w


@pytest.mark.parametrize("outs", [20, [16, 8, 8]])
def test_reference_matches_naive_loop(outs):
    w = _weights(outs, ranks=[1, 8, 5, 16])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(-1, 4, (33,), generator=g, dtype=torch.int32)
    x = torch.randn(33, 24, generator=g)
    got = reference.lora_delta(x, w, ids)
    torch.testing.assert_close(got.double(), naive_delta(x, w, ids), rtol=1e-5, atol=1e-4)


def test_reference_shrink_zero_outside_rank_and_for_none():
    w = _weights(20, ranks=[2, 8])
    ids = torch.tensor([0, -1, 1, 0], dtype=torch.int32)
    x = torch.randn(4, 24)
    h = reference.shrink(x, w.a, w.offsets, w.ranks, ids, w.max_rank)
    assert h.shape == (1, 4, 8) and h.dtype == torch.float32
    assert torch.all(h[0, 1] == 0) and torch.all(h[0, 0, 2:] == 0) and torch.all(h[0, 3, 2:] == 0)
    A, _, _ = w.adapter(0)
    torch.testing.assert_close(h[0, 0, :2], x[0] @ A.T)


def test_reference_rounds_once_into_low_precision_y():
    w = _weights(20, ranks=[4], dtype=torch.float16)
    ids = torch.zeros(5, dtype=torch.int32)
    x = torch.randn(5, 24).half()
    y0 = torch.randn(5, 20).half()
    y = y0.clone()
    reference.add_lora_(y, x, w.a, w.b, w.offsets, w.ranks, w.scales, ids, w.slice_cols, w.slice_outs)
    exact = (y0.double() + naive_delta(x, w, ids)).half()
    # One rounding of the exact sum: equal to it, or one fp16 ulp away where fp32 accumulation order differs.
    ulp = 2.0**-10 * exact.double().abs().max()
    assert torch.equal(y, exact) or (y.double() - exact.double()).abs().max() <= ulp
