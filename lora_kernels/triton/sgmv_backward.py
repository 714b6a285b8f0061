"""Segmented backward of the batched LoRA delta, in Triton.

For ``y[t, cols_s] += scale_{s,i} * (x[t] A_{s,i}^T) B_{s,i}^T`` (token t of adapter i, slice s, rank r) and an
upstream gradient ``dy``, with ``h = x A^T`` and ``g = dy_s B`` (both [T, r], fp32):

    grad x[t]                   = sum_s scale * g[s, t] @ A_{s,i}
    grad a[s, off_i : off_i + r] = scale * sum_{t of i} g[s, t]^T x[t]          # grad A_i   [r, in]
    grad b[off_i : off_i + r, cols_s] = scale * sum_{t of i} h[s, t]^T dy[t, cols_s]   # grad B_i^T [r, out_s]

Launches (:func:`lora_backward`), no per-adapter Python loop, no host sync:

* ``h`` (when grad b is needed): the forward's segmented shrink (:func:`lora_kernels.triton.sgmv.shrink`),
  recomputed rather than saved, so the forward keeps its fused single launch and stores nothing extra.
* ``g`` (grad x or grad a): the same shrink kernel run on ``dy``'s slice columns against ``b``'s rows (``B^T dy``
  is a shrink with B in the role of A); one launch per slice.
* grad x: the segmented expand kernel with ``a[s]`` in the role of B; one launch per slice, accumulating in place.
* grad a and grad b: :func:`_sgmv_outer_kernel`, a segmented outer-product reduction. Grid axis 0 enumerates
  (segment, token split), axis 1 column blocks (of ``in`` for grad a, flat over the slices' columns for grad b),
  axis 2 rank blocks. A program owns a [BLOCK_R, BLOCK_N] tile of one adapter's gradient rows and walks its
  segment's sorted tokens in BLOCK_M chunks (``acc += H_chunk^T @ X_chunk``, fp32 accumulation), so each adapter
  writes only its own rows: rank blocks past its rank exit at once (heterogeneous ranks cost their own rows),
  adapters absent from the batch and free rows are never written (the caller zeroes the gradient buffers), and
  tokens with -1 are in no segment. With ``SPLIT_M > 1`` the tokens of a segment are split over that many
  programs that add their partial tiles with fp32 atomics (for batches dominated by one long segment); the sum
  order then varies between runs.

Numerics: the fp32 operand (h or g) is rounded to the activation dtype before ``tl.dot`` (what PyTorch in that
dtype does; tensor cores for fp16/bf16), ``input_precision="ieee"`` for fp32, accumulation in fp32, gradients
formed in fp32 buffers and rounded once into the parameters' dtype. As in :mod:`lora_kernels.triton.sgmv`,
``UPCAST`` widens bf16 tiles to fp32 after that rounding in the CPU interpreter only (its bf16 ``tl.dot`` is
broken); never set on a GPU.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..backends import interpreting
from ..batch import MetaLayout
from . import sgmv as _fwd
from .sgmv import _cdiv, _dot, _p2, _slice_of_block

__all__ = ["lora_backward", "outer_", "default_outer_config"]


@triton.jit
def _sgmv_outer_kernel(
    g_ptr, h_ptr, x_ptr, off_ptr, rank_ptr, scale_ptr, meta_ptr, sinfo_ptr,
    n_in, n_seg,
    stride_gs, stride_gr, stride_gn,
    stride_hs, stride_hm, stride_hr,
    stride_xm, stride_xn,
    stride_rs, stride_ss, stride_si,
    SORTED_OFF, ACT_OFF, SSTART_OFF, SLEN_OFF,
    NUM_SLICES: tl.constexpr, PER_SLICE_G: tl.constexpr, N_CB: tl.constexpr,
    SPLIT_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``G[s?, off + r, col0 + n] (+)= scale_{s,i} * sum_{t in seg} H[s, t, r] * X[t, col0 + n]`` for the
    segment's adapter i. PER_SLICE_G (grad a): G has one plane per slice (stride_gs), every slice spans
    columns [0, n_in) and axis 1 is ``s * N_CB + column block``. Otherwise (grad b): one G shared by the
    slices, axis 1 is a flat column block over the slices (``_slice_of_block`` on ``sinfo``)."""
    pid0 = tl.program_id(0)
    pid_n = tl.program_id(1)
    rb = tl.program_id(2)
    seg = pid0 // SPLIT_M
    part = pid0 % SPLIT_M
    if seg >= n_seg:
        return
    length = tl.load(meta_ptr + SLEN_OFF + seg)
    if part * BLOCK_M >= length:  # inactive segments have length 0
        return
    start = tl.load(meta_ptr + SSTART_OFF + seg)
    adapter = tl.load(meta_ptr + ACT_OFF + seg)
    if PER_SLICE_G:
        s = pid_n // N_CB
        blk = pid_n % N_CB
        col0 = pid_n * 0
        width = n_in
    else:
        s, col0, width, blk = _slice_of_block(sinfo_ptr, stride_si, pid_n, NUM_SLICES, BLOCK_N)
        if s < 0:
            return
    rank = tl.load(rank_ptr + s * stride_rs + adapter)
    if rb * BLOCK_R >= rank:  # this adapter's rank ends before this block: its rows are not here
        return
    off = tl.load(off_ptr + adapter)  # int64 first storage row
    scale = tl.load(scale_ptr + s * stride_ss + adapter)

    offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < width
    offs_m = tl.arange(0, BLOCK_M)
    h_base = h_ptr + s.to(tl.int64) * stride_hs + offs_r[:, None] * stride_hr
    # int64 before the stride: every offset added to a data tensor's base is 64-bit (tests/test_triton_compile.py)
    x_cols = x_ptr + (col0 + offs_n).to(tl.int64)[None, :] * stride_xn
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for m0 in range(part * BLOCK_M, length, SPLIT_M * BLOCK_M):
        m_mask = (m0 + offs_m) < length
        rows = tl.load(meta_ptr + SORTED_OFF + start + m0 + offs_m, mask=m_mask, other=0).to(tl.int64)
        # H^T tile [BLOCK_R, BLOCK_M], gathered by the segment's sorted token ids
        ht = tl.load(h_base + rows[None, :] * stride_hm, mask=r_mask[:, None] & m_mask[None, :], other=0.0)
        xt = tl.load(x_cols + rows[:, None] * stride_xm, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _dot(ht.to(x_ptr.dtype.element_ty), xt, acc, UPCAST)
    acc = acc * scale

    if PER_SLICE_G:
        g_ptr += s.to(tl.int64) * stride_gs
    g_ptrs = g_ptr + (off + offs_r)[:, None] * stride_gr + (col0 + offs_n)[None, :] * stride_gn
    mask = r_mask[:, None] & n_mask[None, :]
    if SPLIT_M == 1:
        tl.store(g_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(g_ptrs, acc, mask=mask, sem="relaxed")


def default_outer_config(T: int, n_seg: int, r_cap: int) -> dict[str, Any]:
    """Untuned default for :func:`outer_`. BLOCK_R follows the largest rank (16..64: a rank-8 adapter wastes at
    most one masked 16-row block); SPLIT_M splits a segment's tokens when the batch has few segments for its
    size (no host read: ``n_seg`` is the shape bound ``min(max_active, T)``)."""
    split = max(1, min(8, T // max(1, 512 * n_seg)))
    return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_R": min(64, max(16, _p2(r_cap))), "SPLIT_M": split,
            "num_warps": 4, "num_stages": 2}


def outer_(
    g: torch.Tensor, h: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
    meta: torch.Tensor, max_tokens: int, slice_info: Optional[torch.Tensor], config: Optional[dict[str, Any]] = None,
) -> None:
    """Segmented outer-product reduction into a zeroed fp32 gradient buffer ``g`` (see the module docstring).

    Args:
        g: fp32, either [S, R, in] (grad a: ``slice_info`` None, every slice over x's columns) or [R, out_total]
            (grad b: slice s writes and reads columns ``slice_info[s]``). Rows not owned by an adapter of the
            batch are not written.
        h: fp32 [S, T, >= max rank] (h for grad b, g = dy B for grad a).
        x: [T, in] (grad a) or [T, out_total] (grad b: dy), fp16/bf16/fp32, unit column stride.
        offsets int64 [N]; ranks int32 [S, N]; scales fp32 [S, N]; meta / max_tokens: the batch.
    """
    T = x.shape[0]
    S = h.shape[0]
    if T == 0:
        return
    lay = MetaLayout.from_meta(meta, max_tokens)
    n_seg = min(lay.max_active, T)
    cfg = {**default_outer_config(T, n_seg, h.shape[2]), **(config or {})}
    for k in ("BLOCK_M", "BLOCK_N", "BLOCK_R"):
        # tl.dot needs every dimension >= 16 on a GPU (the CPU interpreter accepts smaller ones)
        if cfg[k] not in (16, 32, 64, 128, 256):
            raise ValueError(f"config[{k!r}]: expected a power of two in [16, 256], got {cfg[k]!r}")
    bm, bn, br, split = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_R"], cfg["SPLIT_M"]
    per_slice = slice_info is None
    if per_slice:
        n_cb = _cdiv(x.shape[1], bn)
        n_col = S * n_cb
        sinfo = ranks  # unused by the kernel in this mode; any int tensor
        stride_gs, stride_gr, stride_gn = g.stride(0), g.stride(1), g.stride(2)
        stride_si = 0
    else:
        n_cb = 1
        n_col = (g.shape[1] + S * (bn - 1)) // bn
        sinfo = slice_info
        stride_gs, stride_gr, stride_gn = 0, g.stride(0), g.stride(1)
        stride_si = slice_info.stride(0)
    grid = (n_seg * split, n_col, _cdiv(h.shape[2], br))
    _sgmv_outer_kernel[grid](
        g, h, x, offsets, ranks, scales, meta, sinfo,
        x.shape[1], n_seg,
        stride_gs, stride_gr, stride_gn,
        h.stride(0), h.stride(1), h.stride(2),
        x.stride(0), x.stride(1),
        ranks.stride(0), scales.stride(0), stride_si,
        lay.sorted_token_ids, lay.active_adapters, lay.seg_start, lay.seg_len,
        NUM_SLICES=S, PER_SLICE_G=per_slice, N_CB=n_cb,
        SPLIT_M=split, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br,
        UPCAST=(x.dtype == torch.bfloat16 and interpreting()),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


_FULL_WIDTH_INFO: dict = {}


def _full_width_info(width: int, device: torch.device) -> torch.Tensor:
    """int64 [1, 2] ``[[0, width]]`` on the device (cached: the expand kernel reads slice info from memory)."""
    key = (width, str(device))
    t = _FULL_WIDTH_INFO.get(key)
    if t is None:
        t = torch.tensor([[0, width]], dtype=torch.int64).to(device)
        _FULL_WIDTH_INFO[key] = t
    return t


def lora_backward(
    dy: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor,
    scales: torch.Tensor, meta: torch.Tensor, max_tokens: int, slice_info: torch.Tensor, slice_cols: Sequence[int],
    slice_outs: Sequence[int], r_cap: int, need_x: bool = True, need_a: bool = True, need_b: bool = True,
    config: Optional[dict[str, Any]] = None,
):
    """Gradients of the batched LoRA delta (module docstring): ``(dx [T, in] x.dtype, da [S, R, in] a.dtype,
    db [R, out_total] b.dtype)``; a gradient that is not needed comes back as an empty tensor. Tokens with -1
    get dx = 0; rows of adapters absent from the batch, of free slots and past each slice's rank get 0.

    ``dy`` [T, out_total] (unit column stride); the rest as :func:`lora_kernels.triton.sgmv.add_lora_`;
    ``slice_cols`` / ``slice_outs`` are the host copy of ``slice_info``. ``config`` overrides
    :func:`default_outer_config` for the outer-product kernel.
    """
    T, K = x.shape
    S = a.shape[0]
    dev = x.device
    # distinct empty tensors for unneeded gradients: a custom op's outputs may not alias each other
    dx, da, db = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if need_a:
        da = torch.zeros(a.shape, dtype=torch.float32, device=dev)
    if need_b:
        db = torch.zeros(b.shape, dtype=torch.float32, device=dev)
    if need_x:
        # one slice: accumulate straight into x's dtype (the expand rounds once); several: fp32, rounded at the end
        dx = torch.zeros(T, K, dtype=x.dtype if S == 1 else torch.float32, device=dev)
    if T > 0 and (need_x or need_a or need_b):
        if need_x or need_a:
            gh = torch.empty(S, T, r_cap, dtype=torch.float32, device=dev)
            for s in range(S):
                c0, n = slice_cols[s], slice_outs[s]
                # g = dy_s B: the shrink with b's rows (columns of slice s) in the role of A
                _fwd.shrink(dy[:, c0 : c0 + n], b[:, c0 : c0 + n].unsqueeze(0), offsets, ranks[s : s + 1], meta,
                            max_tokens, gh[s : s + 1])
            if need_x:
                info = _full_width_info(K, dev)
                for s in range(S):
                    _fwd.expand_(dx, gh[s : s + 1], a[s], offsets, ranks[s : s + 1], scales[s : s + 1], meta,
                                 max_tokens, info)
            if need_a:
                outer_(da, gh, x, offsets, ranks, scales, meta, max_tokens, None, config)
        if need_b:
            h = torch.empty(S, T, r_cap, dtype=torch.float32, device=dev)
            _fwd.shrink(x, a, offsets, ranks, meta, max_tokens, h)
            outer_(db, h, dy, offsets, ranks, scales, meta, max_tokens, slice_info, config)
    if need_x:
        dx = dx.to(x.dtype)
    if need_a:
        da = da.to(a.dtype)
    if need_b:
        db = db.to(b.dtype)
    return dx, da, db
