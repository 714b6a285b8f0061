"""vLLM- and SGLang-style backends vs a plain loop over their own metadata and weight layouts (fp32, CPU)."""

import pytest
import torch

from lora_kernels.integrations.sglang import SGLangLoRABackend
from lora_kernels.integrations.vllm import LoRAMapping, PunicaWrapperLK, convert_mapping

TOL = dict(atol=2e-5, rtol=1e-5)


# ---- vLLM ------------------------------------------------------------------------------------------------------
N, R, IN = 4, 8, 16
OUTS = (12, 6, 6)
LORA_IDS = [5, None, 7, 9]  # slot 1 empty
EFF_RANK = [3, 0, 8, 5]  # vLLM pads every slot to R with zero rows; slot 1 is all zeros


def _vllm_stacks(g):
    a = [torch.zeros(N, 1, R, IN) for _ in OUTS]
    b = [torch.zeros(N, 1, o, R) for o in OUTS]
    for s, o in enumerate(OUTS):
        for i, r in enumerate(EFF_RANK):
            a[s][i, 0, :r] = torch.randn(r, IN, generator=g) / 4
            b[s][i, 0, :, :r] = torch.randn(o, r, generator=g) / 2
    return a, b


def _vllm_setup(T=11, rows=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = _vllm_stacks(g)
    choices = torch.tensor([0, 5, 7, 9])
    index_mapping = tuple(int(v) for v in choices[torch.randint(0, 4, (T,), generator=g)])
    prompt_mapping = tuple(int(v) for v in choices[torch.randint(0, 4, (rows,), generator=g)])
    pw = PunicaWrapperLK(64, 8, "cpu", max_loras=N)
    pw.update_metadata(LoRAMapping(index_mapping, prompt_mapping), LORA_IDS, N, 100)
    slots = convert_mapping(index_mapping, LORA_IDS)
    return g, a, b, pw, slots, convert_mapping(prompt_mapping, LORA_IDS)


def _ref_linear(y, x, a, b, slots, scale, offset=0):
    y = y.clone()
    col = offset
    for s in range(len(b)):
        o = b[s].shape[2]
        for t, i in enumerate(slots):
            if i >= 0:
                y[t, col : col + o] += scale * (x[t] @ a[s][i, 0].T) @ b[s][i, 0].T
        col += o
    return y


def test_vllm_convert_mapping():
    assert convert_mapping([0, 7, 5, 9, -1], LORA_IDS) == [-1, 2, 0, 3, -1]
    with pytest.raises(ValueError, match="mapping"):
        convert_mapping([3], LORA_IDS)


def test_vllm_add_lora_linear_matches_loop():
    g, a, b, pw, slots, _ = _vllm_setup()
    T = len(slots)
    x = torch.randn(T, IN, generator=g)
    y0 = torch.randn(T, sum(OUTS), generator=g)
    y = y0.clone()
    pw.add_lora_linear(y, x, tuple(a), tuple(b), 0.5, OUTS)
    torch.testing.assert_close(y, _ref_linear(y0, x, a, b, slots, 0.5), **TOL)
    # tokens with no LoRA (-1) are untouched bit for bit
    none = torch.tensor([s < 0 for s in slots])
    assert torch.equal(y[none], y0[none])
    assert pw.token_lora_indices.tolist() == slots


def test_vllm_shrink_expand_and_offsets():
    g, a, b, pw, slots, _ = _vllm_setup(seed=1)
    T = len(slots)
    x = torch.randn(T, IN, generator=g)
    buf = torch.full((len(OUTS), T, R), 7.0)  # garbage: add_shrink overwrites (vLLM's GPU semantics)
    pw.add_shrink(buf, x, tuple(a), 2.0)
    for s in range(len(OUTS)):
        for t, i in enumerate(slots):
            want = 2.0 * x[t] @ a[s][i, 0].T if i >= 0 else torch.zeros(R)
            torch.testing.assert_close(buf[s, t], want, **TOL)
    pad = 5
    y0 = torch.randn(T, pad + sum(OUTS), generator=g)
    y = y0.clone()
    pw.add_expand(y, buf, tuple(b), OUTS, offset_start=pad)
    torch.testing.assert_close(y, _ref_linear(y0, x, a, b, slots, 2.0, offset=pad), **TOL)
    assert torch.equal(y[:, :pad], y0[:, :pad])
    # add_inputs=False overwrites the slice columns
    y2 = y0.clone()
    pw.add_expand(y2, buf, tuple(b), OUTS, offset_start=pad, add_inputs=False)
    torch.testing.assert_close(y2[:, pad:], _ref_linear(torch.zeros_like(y0), x, a, b, slots, 2.0, pad)[:, pad:], **TOL)


def test_vllm_embedding_and_logits():
    g, a, b, pw, slots, rows = _vllm_setup(seed=2)
    T = len(slots)
    emb = torch.randn(T, R, generator=g)
    y0 = torch.randn(T, OUTS[0], generator=g)
    y = y0.clone()
    pw.add_lora_embedding(y, emb, b[0])
    want = y0.clone()
    for t, i in enumerate(slots):
        if i >= 0:
            want[t] += emb[t] @ b[0][i, 0].T
    torch.testing.assert_close(y, want, **TOL)
    # logits: rows follow the sampler mapping (prompt_mapping), not the token mapping
    xs = torch.randn(len(rows), IN, generator=g)
    ys0 = torch.randn(len(rows), OUTS[0], generator=g)
    ys = ys0.clone()
    pw.add_lora_logits(ys, xs, a[0], b[0], 0.25)
    torch.testing.assert_close(ys, _ref_linear(ys0, xs, a[:1], b[:1], rows, 0.25), **TOL)


def test_vllm_stack_rewrite_is_seen_and_cached():
    g, a, b, pw, slots, _ = _vllm_setup(seed=3)
    T = len(slots)
    x = torch.randn(T, IN, generator=g)
    y0 = torch.zeros(T, sum(OUTS))
    y = y0.clone()
    pw.add_lora_linear(y, x, tuple(a), tuple(b), 1.0, OUTS)
    n = pw._cache.conversions
    y = y0.clone()
    pw.add_lora_linear(y, x, tuple(a), tuple(b), 1.0, OUTS)
    assert pw._cache.conversions == n  # unchanged stacks: no reconversion
    with torch.no_grad():  # the engine loads a new adapter into slot 2 in place
        for s in range(len(OUTS)):
            a[s][2].copy_(torch.randn(1, R, IN, generator=g))
    y = y0.clone()
    pw.add_lora_linear(y, x, tuple(a), tuple(b), 1.0, OUTS)
    assert pw._cache.conversions == n + 1
    torch.testing.assert_close(y, _ref_linear(y0, x, a, b, slots, 1.0), **TOL)


def test_vllm_refusals():
    _, a, b, pw, slots, _ = _vllm_setup()
    x = torch.randn(len(slots), IN)
    y = torch.zeros(len(slots), sum(OUTS))
    with pytest.raises(ValueError, match="output_slices"):
        pw.add_lora_linear(y, x, tuple(a), tuple(b), 1.0, (12, 12))
    with pytest.raises(ValueError, match="max_loras"):
        PunicaWrapperLK(8, 8, "cpu")
    with pytest.raises(ValueError, match="index_mapping"):
        pw.update_metadata(LoRAMapping((5,) * 65, ()), LORA_IDS, N, 100)
    assert pw.token_lora_indices.tolist() == slots  # refused update kept the old metadata


# ---- SGLang ------------------------------------------------------------------------------------------------------
SN, SR, SIN = 3, 8, 16
RANKS = [4, 0, 8]  # slot 1: rank 0 = no LoRA
SCAL = [0.5, 3.0, 2.0]


def _sgl_setup(c, outs, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Garbage everywhere past each slot's packed rows/columns: the layout must be respected, not zero-filled.
    A = torch.randn(SN, c * SR, SIN, generator=g)
    B = torch.randn(SN, sum(outs), SR, generator=g)
    be = SGLangLoRABackend(SN, "cpu", max_num_tokens=32)
    lens, wi = [3, 1, 2, 1, 2], [0, 2, 1, -1, 2]
    be.prepare_lora_batch(lens, wi, RANKS, SCAL)
    tok = [w for n, w in zip(lens, wi) for _ in range(n)]
    return g, A, B, be, tok


def _sgl_ref(x, A, B, tok, outs, base):
    out = base.clone()
    c = len(outs)
    for t, i in enumerate(tok):
        if i < 0 or RANKS[i] == 0:
            continue
        r = RANKS[i]
        col = 0
        for s, o in enumerate(outs):
            a_s = A[i, s * r : (s + 1) * r]
            b_s = B[i, col : col + o, :r]
            out[t, col : col + o] += SCAL[i] * (x[t] @ a_s.T) @ b_s.T
            col += o
        assert col == sum(outs) and c == len(outs)
    return out


def test_sglang_batch_info():
    _, _, _, be, tok = _sgl_setup(1, (10,))
    info = be.batch_info
    assert info.bs == 5 and info.seg_lens.tolist() == [3, 1, 2, 1, 2]
    assert info.seg_indptr.tolist() == [0, 3, 4, 6, 7, 9]
    assert be.batch.token_adapter.tolist() == [t if t >= 0 and RANKS[t] else -1 for t in tok]


def test_sglang_lora_a_layout_and_lora_b():
    g, A, B, be, tok = _sgl_setup(3, (10,), seed=1)
    T = len(tok)
    x = torch.randn(T, SIN, generator=g)
    h = be.run_lora_a_sgemm(x, A, stack_num=3)
    assert h.shape == (T, 3 * SR)
    for t, i in enumerate(tok):
        r = RANKS[i] if i >= 0 else 0
        want = torch.zeros(3 * SR)
        for s in range(3):
            if r:
                want[s * r : (s + 1) * r] = x[t] @ A[i, s * r : (s + 1) * r].T
        torch.testing.assert_close(h[t], want, **TOL)
    # lora_b on one slice (stack_num=1): scaling applied here, base_output accumulated in place
    A1 = torch.randn(SN, SR, SIN, generator=g)
    B1 = torch.randn(SN, 10, SR, generator=g)
    h1 = be.run_lora_a_sgemm(x, A1)
    base = torch.randn(T, 10, generator=g)
    want = _sgl_ref(x, A1, B1, tok, (10,), base)
    out = be.run_lora_b_sgemm(h1, B1, base_output=base)
    assert out is base
    torch.testing.assert_close(out, want, **TOL)
    out0 = be.run_lora_b_sgemm(h1, B1)
    torch.testing.assert_close(out0, _sgl_ref(x, A1, B1, tok, (10,), torch.zeros(T, 10)), **TOL)


@pytest.mark.parametrize("as_tuple", [False, True])
def test_sglang_qkv_and_gate_up(as_tuple):
    outs = (12, 4, 4)
    g, A, B, be, tok = _sgl_setup(3, outs, seed=2)
    T = len(tok)
    x = torch.randn(T, SIN, generator=g)
    base = torch.randn(T, sum(outs), generator=g)
    want = _sgl_ref(x, A, B, tok, outs, base)
    off = torch.tensor([0, 12, 16, 20], dtype=torch.int32)
    if as_tuple:
        qb = B[:, :12].unsqueeze(0)
        kvb = torch.stack([B[:, 12:16], B[:, 16:20]])
        out = be.run_qkv_lora(x, A, (qb, kvb), base_output=base.clone())
    else:
        out = be.run_qkv_lora(x, A, B, off, 12, base_output=base.clone())
    torch.testing.assert_close(out, want, **TOL)

    gu = (6, 6)
    A2 = torch.randn(SN, 2 * SR, SIN, generator=g)
    B2 = torch.randn(SN, 12, SR, generator=g)
    base2 = torch.randn(T, 12, generator=g)
    want2 = _sgl_ref(x, A2, B2, tok, gu, base2)
    b_arg = (B2[:, :6], B2[:, 6:]) if as_tuple else B2
    torch.testing.assert_close(be.run_gate_up_lora(x, A2, b_arg, base_output=base2.clone()), want2, **TOL)


def test_sglang_refusals():
    g, A, B, be, tok = _sgl_setup(1, (10,))
    with pytest.raises(ValueError, match="weight_indices"):
        be.prepare_lora_batch([1, 1], [0, 3], RANKS, SCAL)
    with pytest.raises(ValueError, match="lora_ranks"):
        be.prepare_lora_batch([1], [0], RANKS[:2], SCAL)
    assert be.batch_info.bs == 5  # refused: the previous batch is kept
    with pytest.raises(ValueError, match="x"):
        be.run_lora_a_sgemm(torch.randn(3, SIN), A)


# ---- the same on the GPU (Triton kernels, bf16) ----------------------------------------------------------------
def _close_bf16(got, want):
    err = (got.float().cpu() - want).abs().max().item()
    assert err <= 2e-2 * want.abs().max().item() + 1e-2, f"max error {err:.3e} (max|ref| {want.abs().max():.3e})"


@pytest.mark.cuda
def test_vllm_and_sglang_backends_cuda_bf16():
    g, a, b, _, slots, _ = _vllm_setup(seed=7)
    T = len(slots)
    x = torch.randn(T, IN, generator=g)
    y0 = torch.randn(T, sum(OUTS), generator=g)
    pw = PunicaWrapperLK(64, 8, "cuda", max_loras=N)
    ids = torch.tensor([0, 5, 7, 9])[torch.randint(0, 4, (T,), generator=g)]
    mapping = LoRAMapping(tuple(int(v) for v in ids), (5,))
    pw.update_metadata(mapping, LORA_IDS, N, 100)
    slots = convert_mapping(mapping.index_mapping, LORA_IDS)
    bf = torch.bfloat16
    y = y0.to("cuda", bf)
    pw.add_lora_linear(y, x.to("cuda", bf), tuple(t.to("cuda", bf) for t in a), tuple(t.to("cuda", bf) for t in b),
                       0.5, OUTS)
    _close_bf16(y, _ref_linear(y0.to(bf).float(), x.to(bf).float(), [t.to(bf).float() for t in a],
                                [t.to(bf).float() for t in b], slots, 0.5))

    outs = (12, 4, 4)
    g2, A, B, _, tok = _sgl_setup(3, outs, seed=8)
    be = SGLangLoRABackend(SN, "cuda", max_num_tokens=32)
    be.prepare_lora_batch([3, 1, 2, 1, 2], [0, 2, 1, -1, 2], RANKS, SCAL)
    xs = torch.randn(len(tok), SIN, generator=g2)
    base = torch.randn(len(tok), sum(outs), generator=g2)
    ref = _sgl_ref(xs.to(bf).float(), A.to(bf).float(), B.to(bf).float(), tok, outs, base.to(bf).float())
    out = be.run_qkv_lora(xs.to("cuda", bf), A.to("cuda", bf), B.to("cuda", bf), None, 12,
                          base_output=base.to("cuda", bf), output_offset_cpu=[0, 12, 16, 20])
    _close_bf16(out, ref)


def test_stack_cache_refreshes_in_place_and_holds_sources_weakly():
    """A refresh (load event) or a version bump rebuilds into the same LoRAWeights and storage (what a captured CUDA
    graph keeps reading); an entry does not keep its source stacks alive (the build gets them as arguments)."""
    import gc
    import weakref

    from lora_kernels.integrations._stacked import StackCache, padded_weights

    cache = StackCache()
    cache.freeze()

    def build(a, b):
        return padded_weights(a.clone(), b.transpose(1, 2).contiguous(), [b.shape[1]])

    with torch.inference_mode():  # no version counter: only refresh() can tell
        a, b = torch.randn(3, 4, 8), torch.randn(3, 6, 4)
    w = cache.get([a, b], "x", build)
    ptrs = (w.a.data_ptr(), w.b.data_ptr(), w.ranks.data_ptr())
    with torch.inference_mode():
        a[1].fill_(2.0)
        b[1].fill_(-1.0)
    assert cache.get([a, b], "x", build) is w and w.a.view(3, 4, 8)[1].ne(2.0).any()  # not seen yet
    cache.refresh()
    assert cache.get([a, b], "x", build) is w and (w.a.data_ptr(), w.b.data_ptr(), w.ranks.data_ptr()) == ptrs
    assert w.a.view(3, 4, 8)[1].eq(2.0).all() and w.b.view(3, 4, 6)[1].eq(-1.0).all()
    u, v = torch.randn(3, 4, 8), torch.randn(3, 6, 4)  # with version counters: a write is seen at the next use
    w2 = cache.get([u, v], "x", build)
    n = cache.conversions
    u[0].zero_()
    assert cache.get([u, v], "x", build) is w2 and cache.conversions == n + 1 and not w2.a.view(3, 4, 8)[0].any()
    ref = weakref.ref(a)
    del a, b
    gc.collect()
    assert ref() is None, "the cache kept a source stack alive"
    cache.refresh()  # drops the dead entry, refreshes the live one
    assert len(cache._entries) == 1


def test_stack_cache_does_not_serve_a_freed_stacks_address():
    """The cache keys hold addresses and versions: a new stack at a freed stack's address, same shape and version,
    must be converted again, not served the old conversion (the ABA case)."""
    from lora_kernels.integrations._stacked import StackCache

    cache = StackCache()
    built = []

    def build(*sources):
        built.append(1)
        return object()

    t = torch.zeros(4, 8)
    first = cache.get([t], "x", build)
    assert cache.get([t], "x", build) is first and len(built) == 1  # same tensor: a hit
    u = t.view(4, 8)  # another tensor object at the same address, shape, stride and version
    assert cache.get([u], "x", build) is not first and len(built) == 2
