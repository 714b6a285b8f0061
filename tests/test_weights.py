"""LoRAWeights: rank-paged allocation, reuse of freed rows, scales, padded views, slices, refusals."""

import math

import pytest
import torch

import lora_kernels as lk


def _ab(r, in_f=8, out=6, seed=0):
    g = torch.Generator().manual_seed(seed + r)
    return torch.randn(r, in_f, generator=g), torch.randn(out, r, generator=g)


def test_add_stores_transposed_b_and_own_rank_rows():
    w = lk.LoRAWeights(8, 6, max_adapters=4, max_rank=16, capacity_rows=24, dtype=torch.float32)
    A, B = _ab(3)
    i = w.add(A, B, alpha=6.0)
    j = w.add(*_ab(16))
    assert (i, j) == (0, 1)
    assert w.offsets.tolist()[:2] == [0, 3]  # no padding: adapter 1 starts right after adapter 0's 3 rows
    assert w.ranks[0, :2].tolist() == [3, 16]
    assert w.scales[0, 0].item() == pytest.approx(2.0)
    A2, B2, s = w.adapter(0)
    assert torch.equal(A2, A) and torch.equal(B2, B) and s == pytest.approx(2.0)
    assert w.free_rows == 24 - 19


def test_rslora_and_explicit_scale():
    w = lk.LoRAWeights(8, 6, max_adapters=3, max_rank=16, dtype=torch.float32)
    i = w.add(*_ab(16), alpha=8.0, use_rslora=True)
    j = w.add(*_ab(4), scale=0.25)
    k = w.add(*_ab(4))
    assert w.scales[0, i].item() == pytest.approx(8 / math.sqrt(16))
    assert w.scales[0, j].item() == pytest.approx(0.25)
    assert w.scales[0, k].item() == pytest.approx(1.0)


def test_remove_frees_rows_for_reuse_and_coalesces():
    w = lk.LoRAWeights(8, 6, max_adapters=4, max_rank=8, capacity_rows=16, dtype=torch.float32)
    a0 = w.add(*_ab(8))
    a1 = w.add(*_ab(4))
    a2 = w.add(*_ab(4))
    with pytest.raises(ValueError, match="capacity_rows"):
        w.add(*_ab(1))
    w.remove(a1)
    w.remove(a2)
    assert w.free_rows == 8
    a3 = w.add(*_ab(8))  # needs the two freed 4-row ranges coalesced
    assert w.offsets[a3].item() == 8 and w.ranks[0, a1].item() in (0, 8)
    assert a0 in w.loaded and a3 in w.loaded


def test_refusals_leave_state_unchanged():
    w = lk.LoRAWeights(8, 6, max_adapters=2, max_rank=4, dtype=torch.float32)
    w.add(*_ab(2))
    before = (w.a.clone(), w.b.clone(), w.offsets.clone(), w.ranks.clone(), w.scales.clone(), w.free_rows)
    bad = [
        dict(A=torch.randn(5, 8), B=torch.randn(6, 5)),  # rank above max_rank
        dict(A=torch.randn(2, 7), B=torch.randn(6, 2)),  # wrong in_features
        dict(A=torch.randn(2, 8), B=torch.randn(5, 2)),  # wrong out
        dict(A=torch.randn(2, 8), B=torch.randn(6, 3)),  # rank mismatch
        dict(A=torch.randn(0, 8), B=torch.randn(6, 0)),  # rank 0
        dict(A=torch.randn(2, 8), B=torch.randn(6, 2), adapter_id=0),  # slot in use
        dict(A=torch.randn(2, 8), B=torch.randn(6, 2), adapter_id=5),  # slot out of range
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            w.add(**kw)
    with pytest.raises(TypeError):
        w.add(torch.randint(0, 3, (2, 8)), torch.randn(6, 2))
    after = (w.a, w.b, w.offsets, w.ranks, w.scales, w.free_rows)
    for x, y in zip(before[:5], after[:5]):
        assert torch.equal(x, y)
    assert before[5] == after[5]
    with pytest.raises(ValueError, match="adapter_id"):
        w.remove(1)


def test_slices_share_rows_and_write_their_columns():
    w = lk.LoRAWeights(8, [6, 2, 2], max_adapters=2, max_rank=4, dtype=torch.float32)
    As = [torch.randn(r, 8) for r in (4, 2, 4)]
    Bs = [torch.randn(o, r) for o, r in zip((6, 2, 2), (4, 2, 4))]
    i = w.add(As, Bs)
    assert w.ranks[:, i].tolist() == [4, 2, 4]
    assert w.slice_info.tolist() == [[0, 6], [6, 2], [8, 2]]
    for s in range(3):
        A, B, _ = w.adapter(i, s)
        assert torch.equal(A, As[s]) and torch.equal(B, Bs[s])
    with pytest.raises(ValueError, match="A"):
        w.add(As[0], Bs[0])  # one tensor for a 3-slice group


def test_from_padded_is_zero_copy_and_padded_view_roundtrips():
    N, r, in_f, out = 3, 4, 8, 6
    a = torch.randn(N, r, in_f)
    b = torch.randn(N, r, out)
    w = lk.LoRAWeights.from_padded(a, b, ranks=torch.tensor([4, 2, 0], dtype=torch.int32))
    assert w.a.data_ptr() == a.data_ptr() and w.b.data_ptr() == b.data_ptr()
    assert w.loaded == [0, 1]
    a[1, 0, 0] = 123.0
    assert w.adapter(1)[0][0, 0].item() == 123.0
    av, bv = w.padded_view()
    assert av.data_ptr() == a.data_ptr() and av.shape == (1, N, r, in_f) and bv.shape == (N, r, out)
    j = w.add(torch.randn(3, in_f), torch.randn(out, 3))  # slot 2's rows are free
    assert j == 2 and w.offsets[j].item() == 8
    ap, bp = w.to_padded()
    assert torch.equal(ap[0, 1, :2], a[1, :2]) and torch.all(ap[0, 1, 2:] == 0)


def test_padded_view_refused_for_paged_layout():
    w = lk.LoRAWeights(8, 6, max_adapters=2, max_rank=4, dtype=torch.float32)
    w.add(*_ab(2))
    w.add(*_ab(4))  # starts at row 2, not 4
    with pytest.raises(ValueError, match="padded layout"):
        w.padded_view()
    a, b = w.to_padded()
    assert a.shape == (1, 2, 4, 8)


def test_constructor_refusals():
    with pytest.raises(ValueError, match="max_rank"):
        lk.LoRAWeights(8, 6, max_adapters=2, max_rank=0)
    with pytest.raises(ValueError, match="out_features"):
        lk.LoRAWeights(8, [6, 0], max_adapters=2, max_rank=2)
    with pytest.raises(TypeError, match="dtype"):
        lk.LoRAWeights(8, 6, max_adapters=2, max_rank=2, dtype=torch.int32)


@pytest.mark.parametrize("in_f,out,pad_in,pad_out", [(16, 8, 0, 0), (16, 8, 4, 0), (16, 8, 0, 4), (12, 8, 4, 0),
                                                     (16, 12, 0, 0), (24, 16, 8, 8)])
def test_vector_aligned_is_the_launchers_contract(in_f, out, pad_in, pad_out):
    """``vector_aligned`` (recorded at creation, read by the eager path) equals what the launchers derive from the
    raw tensors (the custom-op path), row strides included: both paths must pick the same kernel variant."""
    sgmv = pytest.importorskip("lora_kernels.triton.sgmv")
    N, r = 3, 8
    a = torch.zeros(N, r, in_f + pad_in, dtype=torch.float16)[:, :, :in_f]  # row stride in_f + pad_in
    b = torch.zeros(N, r, out + pad_out, dtype=torch.float16)[:, :, :out]
    w = lk.LoRAWeights.from_padded(a, b, ranks=torch.tensor([8, 4, 0], dtype=torch.int32))
    derived = w.in_features % 8 == 0 and sgmv._weights_aligned(w.a, w.b, w.slice_outs)
    assert w.vector_aligned == derived
    assert w.vector_aligned == (in_f % 8 == 0 and out % 8 == 0 and pad_in % 8 == 0 and pad_out % 8 == 0)
