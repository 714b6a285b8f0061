"""Dual-LoRA kernels in Triton: forward (one fused shrink + LayerNorm/ReLU-gate epilogue, then the SGMV expand)
and backward (SGMV shrink/expand launches, a sync-free torch elementwise step, and a segmented weight-gradient
kernel).

Forward, per segment tile of BLOCK_M tokens of adapter i (rank r, first row o; see
:mod:`lora_kernels.dual_weights` for the layout):

* ``_dual_lora_shrink_kernel``: one pass over ``x[t, :]`` against the stacked rows ``a[o : o + 2r]``: two fp32
  register accumulators ``u = x A^T`` and ``v = x T^T`` ([BLOCK_M, R_PAD] each). Epilogue in fp32: LayerNorm
  over the r columns (biased variance, masked past r), affine from the ``ln_*`` rows, times ``ReLU(v)``; the
  gated ``g`` [T, r_cap] is stored in fp32 (optionally ``[u, v]`` packed per token in ``uv`` [T, 2 r_cap] for
  the backward). Only the adapter's own 2r rows are read: heterogeneous ranks cost only their rows.
* the expand is :func:`lora_kernels.triton.sgmv.expand_` unchanged (``y += s * g @ B^T``, g rounded to y's
  dtype for the dot, y updated in fp32 and rounded once).

Backward (given dy and the saved ``uv``):

1. ``dg_raw = dy @ B`` per token: :func:`~lora_kernels.triton.sgmv.shrink` with ``b`` viewed as a [1, R, out]
   "A" (rank r).
2. LayerNorm/gate backward in torch, sync-free (per-token gathers of rank, offset, scale and LN rows; fp32 on
   [T, r_cap] tensors): ``dv = s dg l 1[v > 0]``, ``du`` the LayerNorm backward, LN weight/bias gradients by
   ``index_add_`` into their rows.
3. ``dx = [du, dv] @ [A; T]``: :func:`~lora_kernels.triton.sgmv.expand_` over a's 2r rows (scale 1).
4. ``grad_a[o : o + 2r] = [du, dv]^T x`` and ``grad_b[o : o + r] = (s g)^T dy`` over each segment's tokens:
   ``_dual_lora_wgrad_kernel`` (one program per (segment, column block, rank block), looping over the
   segment's tokens; each adapter's rows are written by exactly one program column: no atomics, deterministic).

CPU interpreter: bf16 dots are upcast after rounding (``UPCAST``), as in :mod:`lora_kernels.triton.sgmv`.
No launcher syncs with the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from . import sgmv
from .sgmv import _cdiv, _p2, _segment_info, _segment_tile, _segments, _tile_rows, _upcast

__all__ = ["dual_lora_", "dual_lora_backward"]


@triton.jit
def _dual_lora_shrink_kernel(
    x_ptr, a_ptr, lnw_ptr, lnb_ptr, g_ptr, uv_ptr, off_ptr, rank_ptr, meta_ptr,
    K, T, n_seg, m_tiles, eps,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_gm, stride_uvm,
    SORTED_OFF, ACT_OFF, SSTART_OFF, SLEN_OFF, NVALID_OFF,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    SEG_P2: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, SAVE_UV: tl.constexpr,
):
    pid = tl.program_id(0)
    seg, m = _segment_tile(meta_ptr, pid, n_seg, m_tiles, T, SLEN_OFF, NVALID_OFF, BLOCK_M, SEG_P2, 0)
    if seg >= n_seg:
        return
    seg_start, seg_len, adapter = _segment_info(meta_ptr, seg, n_seg, T, ACT_OFF, SSTART_OFF, SLEN_OFF,
                                                NVALID_OFF, 0)
    if m * BLOCK_M >= seg_len:
        return
    rank = tl.load(rank_ptr + adapter)
    if rank == 0:  # free slot: the expand skips it too
        return
    off = tl.load(off_ptr + adapter)  # int64 first row of [A; T]

    rows, row_mask = _tile_rows(meta_ptr, SORTED_OFF, seg_start, seg_len, m * BLOCK_M, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # A^T and T^T tiles [BLOCK_K, R_PAD]; T's rows follow A's
    at_ptrs = a_ptr + (off + offs_r)[None, :] * stride_ar + offs_k[:, None] * stride_ak
    tt_ptrs = at_ptrs + rank.to(tl.int64) * stride_ar
    acc_u = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    acc_v = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
            at = tl.load(at_ptrs, mask=r_mask[None, :], other=0.0)
            tt = tl.load(tt_ptrs, mask=r_mask[None, :], other=0.0)
        else:
            k_mask = (k0 + offs_k) < K
            xt = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(at_ptrs, mask=r_mask[None, :] & k_mask[:, None], other=0.0)
            tt = tl.load(tt_ptrs, mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        at = at.to(xt.dtype)
        tt = tt.to(xt.dtype)
        if UPCAST:
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
            tt = tt.to(tl.float32)
        acc_u = tl.dot(xt, at, acc_u, input_precision="ieee")
        acc_v = tl.dot(xt, tt, acc_v, input_precision="ieee")
        x_ptrs += BLOCK_K * stride_xk
        at_ptrs += BLOCK_K * stride_ak
        tt_ptrs += BLOCK_K * stride_ak

    # Epilogue, fp32: LayerNorm over the r valid columns (masked loads left columns >= r at 0), then the gate.
    rf = rank.to(tl.float32)
    mean = tl.sum(acc_u, 1) / rf
    diff = tl.where(r_mask[None, :], acc_u - mean[:, None], 0.0)
    var = tl.sum(diff * diff, 1) / rf
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(lnw_ptr + off + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    bb = tl.load(lnb_ptr + off + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    g = tl.maximum(acc_v, 0.0) * (diff * rstd[:, None] * w[None, :] + bb[None, :])
    mask = row_mask[:, None] & r_mask[None, :]
    tl.store(g_ptr + rows[:, None] * stride_gm + offs_r[None, :], g, mask=mask)
    if SAVE_UV:
        uv_rows = uv_ptr + rows[:, None] * stride_uvm
        tl.store(uv_rows + offs_r[None, :], acc_u, mask=mask)
        tl.store(uv_rows + (rank + offs_r)[None, :], acc_v, mask=mask)


@triton.jit
def _dual_lora_wgrad_kernel(
    h_ptr, x_ptr, out_ptr, off_ptr, rank_ptr, meta_ptr,
    N, rank_mult, scale,
    stride_hm, stride_xm, stride_om,
    SORTED_OFF, ACT_OFF, SSTART_OFF, SLEN_OFF,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr,
):
    """``out[o + rr, n] = scale * sum_{t in segment} h[t, rr] * x[t, n]`` for rr < rank_mult * r of the
    segment's adapter (h fp32, rounded to x's dtype for the dot as PyTorch in that dtype would; fp32 sums)."""
    seg = tl.program_id(0)
    pid_n = tl.program_id(1)
    rb = tl.program_id(2)
    seg_len = tl.load(meta_ptr + SLEN_OFF + seg)
    if seg_len == 0:  # past num_active
        return
    seg_start = tl.load(meta_ptr + SSTART_OFF + seg)
    adapter = tl.load(meta_ptr + ACT_OFF + seg)
    rank = tl.load(rank_ptr + adapter) * rank_mult
    if rb * BLOCK_R >= rank:
        return
    off = tl.load(off_ptr + adapter)
    offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, seg_len, BLOCK_M):
        rows, row_mask = _tile_rows(meta_ptr, SORTED_OFF, seg_start, seg_len, m0, BLOCK_M)
        ht = tl.load(h_ptr + rows[:, None] * stride_hm + offs_r[None, :], mask=row_mask[:, None] & r_mask[None, :],
                     other=0.0)
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_n[None, :], mask=row_mask[:, None] & n_mask[None, :],
                     other=0.0)
        ht = ht.to(xt.dtype)
        if UPCAST:
            ht = ht.to(tl.float32)
            xt = xt.to(tl.float32)
        acc = tl.dot(tl.trans(ht), xt, acc, input_precision="ieee")
    o_ptrs = out_ptr + (off + offs_r)[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, (acc * scale).to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & n_mask[None, :])


def _shrink_config(T: int, K: int):
    bm = 16 if T <= 64 else 64
    bk = 64 if K >= 64 else max(16, _p2(K))
    return bm, bk


def dual_lora_(y, x, a, b, ln_w, ln_b, offsets, ranks, scales, meta, max_tokens: int, slice_info, r_cap: int,
               eps: float, uv=None) -> None:
    """``y[t] += s_i * B_i (ReLU(T_i x[t]) * LN_r(A_i x[t]))`` in place for every token of a loaded adapter;
    rows of -1 tokens and rank-0 slots are untouched.

    Args:
        y: [T, out] fp16/bf16/fp32 (unit column stride). x: [T, in] (unit column stride).
        a: [1, R, in] stacked [A; T] rows; b: [R, out] (B transposed); ln_w, ln_b: [R].
        offsets int64 [N]; ranks int32 [1, N] (r); scales fp32 [1, N].
        meta, max_tokens: the :class:`~lora_kernels.LoRABatch` built for these T tokens.
        slice_info: int64 [1, 2] ``[[0, out]]``. r_cap: bound on r (``max_rank``). eps: LayerNorm epsilon.
        uv: optional fp32 [T, 2 r_cap], zeroed by the caller: receives ``[A x, T x]`` packed per token (cols
            ``[0, r)`` and ``[r, 2r)``) for the backward.

    Allocates the fp32 gate workspace g [T, r_cap]; no host sync. T == 0: returns without launching.
    """
    T, K = x.shape
    if T == 0:
        return
    bm, bk = _shrink_config(T, K)
    n_seg, m_tiles, n_tiles, seg_p2, (o_sorted, o_act, o_start, o_len, o_nv) = _segments(meta, max_tokens, T, bm)
    g = torch.empty((1, T, r_cap), dtype=torch.float32, device=x.device)
    a2 = a[0]
    rk = ranks.reshape(-1)
    save = uv is not None
    uvp = uv if save else g
    _dual_lora_shrink_kernel[(n_tiles,)](
        x, a2, ln_w, ln_b, g, uvp, offsets, rk, meta,
        K, T, n_seg, m_tiles, float(eps),
        x.stride(0), x.stride(1), a2.stride(0), a2.stride(1), g.stride(1), uvp.stride(0) if save else 0,
        o_sorted, o_act, o_start, o_len, o_nv,
        BLOCK_M=bm, BLOCK_K=bk, R_PAD=max(16, _p2(r_cap)),
        SEG_P2=seg_p2, EVEN_K=(K % bk == 0), UPCAST=_upcast(x.dtype), SAVE_UV=save,
        num_warps=4, num_stages=2,
    )
    sgmv.expand_(y, g, b, offsets, ranks.reshape(1, -1), scales.reshape(1, -1), meta, max_tokens, slice_info)


def _wgrad(h, X, out, offsets, ranks, meta, max_tokens: int, rank_mult: int, r_cols: int, scale: float = 1.0):
    T, N = X.shape
    lay = sgmv.MetaLayout.from_meta(meta, max_tokens)
    n_seg = min(lay.max_active, T)
    bn, br = 64, 32 if r_cols > 16 else 16
    grid = (n_seg, _cdiv(N, bn), _cdiv(r_cols, br))
    _dual_lora_wgrad_kernel[grid](
        h, X, out, offsets, ranks.reshape(-1), meta,
        N, rank_mult, float(scale),
        h.stride(0), X.stride(0), out.stride(0),
        lay.sorted_token_ids, lay.active_adapters, lay.seg_start, lay.seg_len,
        BLOCK_M=32, BLOCK_N=bn, BLOCK_R=br, UPCAST=_upcast(X.dtype),
        num_warps=4, num_stages=2,
    )


def dual_lora_backward(dy, x, a, b, ln_w, ln_b, uv, offsets, ranks, ranks2, scales, meta, max_tokens: int,
                       in_slice_info, r_cap: int, eps: float):
    """Gradients ``(dx, grad_a, grad_b, grad_ln_w, grad_ln_b)`` of ``delta = dual_lora(x)`` given ``dy`` [T, out]
    and the forward's saved ``uv`` (see the module docstring for the steps). Gradients of the storage tensors
    are dense over R rows (zero outside the batch's adapters), in their dtypes; dx in x's dtype."""
    T = x.shape[0]
    dx = torch.zeros_like(x)
    grad_a = torch.zeros_like(a)
    grad_b = torch.zeros_like(b)
    if T == 0:
        return dx, grad_a, grad_b, torch.zeros_like(ln_w), torch.zeros_like(ln_b)
    dy = dy.contiguous()
    x = x.contiguous()
    # 1. dg_raw[t, :r] = dy[t] @ B_i  (b rows as the shrink's "A" rows, rank r)
    dg = torch.empty((1, T, r_cap), dtype=torch.float32, device=x.device)
    sgmv.shrink(dy, b.unsqueeze(0), offsets, ranks.reshape(1, -1), meta, max_tokens, dg)
    dg = dg[0]
    # 2. LayerNorm / gate backward on [T, r_cap], sync-free torch
    duv, gs, gw, gb = reference.dual_lora_gate_backward(uv, dg, ln_w, ln_b, offsets, ranks, scales, meta[:T],
                                                        r_cap, eps)
    # 3. dx = [du, dv] @ [A; T]  (expand over the 2r stacked rows, scale 1)
    ones = torch.ones_like(scales).reshape(1, -1)
    sgmv.expand_(dx, duv.unsqueeze(0), a[0], offsets, ranks2.reshape(1, -1), ones, meta, max_tokens, in_slice_info)
    # 4. weight gradients per segment
    _wgrad(duv, x, grad_a[0], offsets, ranks, meta, max_tokens, 2, 2 * r_cap)
    _wgrad(gs, dy, grad_b, offsets, ranks, meta, max_tokens, 1, r_cap)
    return dx, grad_a, grad_b, gw.to(ln_w.dtype), gb.to(ln_b.dtype)
