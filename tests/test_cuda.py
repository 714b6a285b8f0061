"""GPU tests (``-m cuda``; skipped without a GPU): bf16/fp16/fp32 on the default CUDA path vs the fp32
reference with the tolerance rule, and CUDA-graph capture of LoRABatch build + add_lora_ with no host sync."""

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference

pytestmark = pytest.mark.cuda


def _case(dtype, outs=(4096,), in_f=4096, ranks=(8, 16, 33, 64, 128), T=257, frac_none=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = len(outs)
    w = lk.LoRAWeights(in_f, list(outs) if S > 1 else outs[0], max_adapters=len(ranks), max_rank=max(ranks),
                       dtype=dtype, device="cuda")
    for r in ranks:
        A = [torch.randn(r, in_f, generator=g) / in_f**0.5 for _ in range(S)]
        B = [torch.randn(o, r, generator=g) / r**0.5 for o in outs]
        w.add(A if S > 1 else A[0], B if S > 1 else B[0], alpha=2.0 * r)
    ids = torch.randint(0, len(ranks), (T,), generator=g, dtype=torch.int32)
    ids[torch.rand(T, generator=g) < frac_none] = -1
    x = torch.randn(T, in_f, generator=g).to("cuda", dtype)
    y = torch.randn(T, sum(outs), generator=g).to("cuda", dtype)
    return w, ids, x, y


def _torch_lowp_delta(x, w, ids):
    """The same delta done by PyTorch in the low precision (the yardstick of the tolerance rule)."""
    out = torch.zeros(x.shape[0], w.out_features, dtype=x.dtype, device=x.device)
    for i in w.loaded:
        t = (ids.to(x.device) == i).nonzero().flatten()
        for s in range(w.num_slices):
            A, B, sc = w.adapter(i, s)
            c0 = w.slice_cols[s]
            out[t, c0 : c0 + w.slice_outs[s]] = sc * ((x[t] @ A.to(x.dtype).T) @ B.to(x.dtype).T)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("outs", [(4096,), (4096, 1024, 1024)])
@pytest.mark.parametrize("T", [1, 7, 257])
def test_add_lora_cuda_tolerance_rule(dtype, outs, T):
    w, ids, x, y = _case(dtype, outs, T=T)
    batch = lk.LoRABatch(1024, w.max_adapters, "cuda").build(ids.cuda(), ranks=w.ranks)
    got = y.clone()
    lk.add_lora_(got, x, w, batch)
    ref = y.double() + reference.lora_delta(x, w, ids.cuda()).double()
    lowp = y.double() + _torch_lowp_delta(x, w, ids).double()
    err = (got.double() - ref).abs().max().item()
    err_torch = (lowp - ref).abs().max().item()
    assert err <= 2 * err_torch + 1e-5, (err, err_torch)
    none = ids.cuda() < 0
    assert torch.equal(got[none], y[none])


def test_cuda_graph_capture_build_and_add_lora_without_host_sync():
    w, ids, x, y = _case(torch.bfloat16, T=64)
    batch = lk.LoRABatch(64, w.max_adapters, "cuda")
    ids_buf = ids.cuda()
    x_buf, y_buf = x.clone(), torch.zeros_like(y)
    # Warm up on a side stream (Triton compiles, the extension loads), as torch's graph docs require.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        batch.build(ids_buf, ranks=w.ranks, validate=False)
        lk.add_lora_(y_buf, x_buf, w, batch)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(g):
            y_buf.zero_()
            batch.build(ids_buf, ranks=w.ranks, validate=False)
            lk.add_lora_(y_buf, x_buf, w, batch)
        for seed in range(3):
            gen = torch.Generator().manual_seed(100 + seed)
            new_ids = torch.randint(-1, w.max_adapters, (64,), generator=gen, dtype=torch.int32)
            new_x = torch.randn(64, 4096, generator=gen).to("cuda", torch.bfloat16)
            ids_buf.copy_(new_ids.cuda())
            x_buf.copy_(new_x)
            g.replay()
            torch.cuda.set_sync_debug_mode(0)
            want = reference.lora_delta(new_x, w, new_ids.cuda())
            torch.testing.assert_close(y_buf.float(), want, rtol=2e-2, atol=2e-2)
            torch.cuda.set_sync_debug_mode("error")
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_batch_build_on_gpu_has_no_host_sync():
    batch = lk.LoRABatch(4096, 256, "cuda")
    ids = torch.randint(-1, 256, (4096,), dtype=torch.int32, device="cuda")
    ranks = torch.randint(1, 129, (1, 256), dtype=torch.int32, device="cuda")
    batch.build(ids, ranks=ranks, validate=False)  # warm-up (loads the extension)
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch.build(ids, ranks=ranks, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cpu = lk.LoRABatch(4096, 256).build(ids.cpu(), ranks=ranks.cpu())
    assert batch.to_dict() == cpu.to_dict()


@pytest.mark.parametrize("outs", [(4096,), (4096, 1024, 1024)])
@pytest.mark.parametrize("T", [7, 257])
def test_add_lora_mixed_mode_cuda_bf16(outs, T):
    """Mixed mode (merged=m) on the default CUDA path, bf16: base_merged(x) + mixed delta vs the unmerged truth
    base(x) + delta, with the rule's yardstick being PyTorch doing the mixed computation in bf16."""
    w, ids, x, y = _case(torch.bfloat16, outs, T=T, seed=3)
    m = 3  # rank 64
    ids[: T // 3] = m
    batch = lk.LoRABatch(1024, w.max_adapters, "cuda").build(ids.cuda(), ranks=w.ranks)
    ids_c = ids.cuda()
    d_all = reference.lora_delta(x, w, ids_c).double()  # the unmerged delta
    d_m = reference.lora_delta(x, w, torch.full_like(ids_c, m)).double()
    # y plays base_merged(x) = base(x) + delta_m(x): the truth is then y - delta_m + delta (m's tokens: y)
    truth = y.double() - torch.where((ids_c == m)[:, None], 0.0, d_m) + torch.where((ids_c == m)[:, None], 0.0, d_all)
    got = y.clone()
    lk.add_lora_(got, x, w, batch, merged=m)
    not_m = torch.where(ids_c == m, torch.full_like(ids_c, -1), ids_c)
    others = torch.where(ids_c == m, torch.full_like(ids_c, -1), torch.full_like(ids_c, m))
    lowp = (y.double() + _torch_lowp_delta(x, w, not_m.cpu()).double()
            - _torch_lowp_delta(x, w, others.cpu()).double()).to(torch.bfloat16).double()  # PyTorch rounds y too
    err = (got.double() - truth).abs().max().item()
    err_torch = (lowp - truth).abs().max().item()
    assert err <= 2 * err_torch + 1e-5, (err, err_torch)
    assert torch.equal(got[ids_c == m], y[ids_c == m])
