"""LoRABatch: the builder's fields against a plain-Python construction, capacities, refusals."""

import pytest
import torch

import lora_kernels as lk


def expected(ids, N, ranks=None):
    valid = [(t, i) for t, i in enumerate(ids) if 0 <= i < N]
    none = [t for t, i in enumerate(ids) if not 0 <= i < N]
    order = [t for t, _ in sorted(valid, key=lambda p: (p[1], p[0]))] + none
    active = sorted({i for _, i in valid})
    starts, lens, pos = [], [], 0
    for a in active:
        n = sum(1 for _, i in valid if i == a)
        starts.append(pos)
        lens.append(n)
        pos += n
    mr = max((max(r[a] for r in ranks) for a in active), default=0) if ranks is not None else 0
    return {
        "token_adapter": [i if 0 <= i < N else -1 for i in ids],
        "sorted_token_ids": order,
        "active_adapters": active,
        "seg_start": starts,
        "seg_len": lens,
        "num_active": len(active),
        "max_rank": mr,
        "num_valid": len(valid),
        "num_invalid": sum(1 for i in ids if i < -1 or i >= N),
    }


@pytest.mark.parametrize("T,N", [(1, 1), (7, 3), (33, 64), (257, 5), (100, 1000)])
def test_build_matches_spec(T, N):
    g = torch.Generator().manual_seed(T * 7 + N)
    ids = torch.randint(-1, N, (T,), generator=g, dtype=torch.int32)
    ranks = torch.randint(1, 65, (2, N), generator=g, dtype=torch.int32)
    b = lk.LoRABatch(max_tokens=T + 3, max_adapters=N).build(ids, ranks=ranks)
    assert b.to_dict() == expected(ids.tolist(), N, ranks.tolist())


def test_empty_and_all_none():
    b = lk.LoRABatch(8, 4)
    b.build(torch.empty(0, dtype=torch.int32))
    assert b.to_dict() == expected([], 4)
    b.build(torch.full((5,), -1, dtype=torch.int32))
    d = b.to_dict()
    assert d["num_active"] == 0 and d["num_valid"] == 0 and d["sorted_token_ids"] == [0, 1, 2, 3, 4]


def test_rebuild_in_place_keeps_buffers():
    b = lk.LoRABatch(16, 8)
    ptr = b.meta.data_ptr()
    b.build(torch.tensor([3, 3, 1], dtype=torch.int32))
    b.build(torch.tensor([0, 7, -1, 0, 2], dtype=torch.int64))
    assert b.meta.data_ptr() == ptr
    assert b.to_dict() == expected([0, 7, -1, 0, 2], 8)


def test_out_of_range_ids_refused_or_counted():
    b = lk.LoRABatch(8, 4)
    with pytest.raises(ValueError, match=r"adapter_ids: expected ids in \[-1, 4\).*got 4 at token 1"):
        b.build(torch.tensor([0, 4, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="got -2"):
        b.build(torch.tensor([-2], dtype=torch.int32))
    b.build(torch.tensor([0, 4, -5, 1], dtype=torch.int32), validate=False)
    d = b.to_dict()
    assert d["num_invalid"] == 2 and d["token_adapter"] == [0, -1, -1, 1]
    with pytest.raises(ValueError, match="2 id"):
        b.check()


def test_capacity_and_type_refusals():
    b = lk.LoRABatch(4, 4)
    with pytest.raises(ValueError, match="max_tokens=4"):
        b.build(torch.zeros(5, dtype=torch.int32))
    with pytest.raises(TypeError, match="adapter_ids"):
        b.build(torch.zeros(3))
    with pytest.raises(ValueError, match="adapter_ids"):
        b.build(torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="ranks"):
        b.build(torch.zeros(2, dtype=torch.int32), ranks=torch.ones(1, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="max_tokens"):
        lk.LoRABatch(0, 4)


def test_from_segments():
    lens = torch.tensor([2, 0, 3, 1], dtype=torch.int32)
    ads = torch.tensor([5, 1, -1, 5], dtype=torch.int32)
    b = lk.LoRABatch.from_segments(lens, ads, max_adapters=8)
    ids = [5, 5, -1, -1, -1, 5]
    assert b.num_tokens == 6 and b.to_dict() == expected(ids, 8)
    with pytest.raises(ValueError, match="seg_lens"):
        lk.LoRABatch.from_segments(torch.tensor([-1]), torch.tensor([0]), max_adapters=2)
    with pytest.raises(ValueError, match="seg_adapters"):
        lk.LoRABatch.from_segments(torch.tensor([1, 1]), torch.tensor([0]), max_adapters=2)


def test_meta_layout_roundtrip():
    b = lk.LoRABatch(10, 3)
    lay = lk.batch.MetaLayout.from_meta(b.meta, 10)
    assert lay == b.layout and b.max_active == 3


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.integers(-3, n + 2), max_size=70))))
def test_build_property(case):
    N, ids = case
    b = lk.LoRABatch(max(len(ids), 1), N).build(torch.tensor(ids, dtype=torch.int32), validate=False)
    assert b.to_dict() == expected(ids, N)
