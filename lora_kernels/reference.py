"""Plain PyTorch versions of every op: the executable spec and the CPU path.

Everything is computed in fp32 (inputs upcast), then rounded once into the output's dtype. The functions
take raw tensors (what the custom ops receive) so the custom ops can use them directly as their CPU impl;
per-token adapter ids (``token_adapter``, ``-1`` = none) are the whole batch description here: the sorted
segments of :class:`~lora_kernels.LoRABatch` are an optimisation the spec does not need.

Shapes (S slices, N adapter slots, R storage rows, T tokens):
    x [T, in]; y [T, sum(out_s)]; a [S, R, in]; b [R, sum(out_s)]; offsets int64 [N]; ranks int32 [S, N];
    scales fp32 [S, N]; token_adapter int32 [T]; h fp32 [S, T, r_cap].
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["shrink", "expand_", "add_lora_", "lora_delta"]


def _adapter_groups(token_adapter: torch.Tensor):
    """Yield (adapter id, token index tensor) for every adapter present (host loop: this is the spec)."""
    ids = token_adapter.to("cpu", torch.int64)
    for i in torch.unique(ids).tolist():
        if i >= 0:
            yield i, (ids == i).nonzero().flatten().to(token_adapter.device)


def _adapter_slices(token_adapter, offsets, ranks, scales, slice_cols, slice_outs):
    """Yield ``(token index tensor, slices)`` for every adapter present, ``slices`` being its ``(s, first column,
    width, first storage row, rank, scale)`` in every slice s where its rank is nonzero (host loop: the spec)."""
    offs = offsets.to("cpu").tolist()
    rk = ranks.to("cpu").tolist()
    sc = scales.to("cpu").tolist()
    for i, toks in _adapter_groups(token_adapter):
        yield toks, [(s, c0, n, offs[i], rk[s][i], sc[s][i])
                     for s, (c0, n) in enumerate(zip(slice_cols, slice_outs)) if rk[s][i]]


def shrink(
    x: torch.Tensor, a: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor, token_adapter: torch.Tensor,
    r_cap: int,
) -> torch.Tensor:
    """``h[s, t, :r] = x[t] @ A_{s,i}^T`` with ``i = token_adapter[t]``, ``r = ranks[s, i]``; every other
    entry of h (columns past the rank, tokens with -1) is 0. Returns fp32 [S, T, r_cap]."""
    S, T = a.shape[0], x.shape[0]
    h = torch.zeros(S, T, r_cap, dtype=torch.float32, device=x.device)
    xf = x.float()
    offs = offsets.to("cpu").tolist()
    rk = ranks.to("cpu").tolist()
    for i, toks in _adapter_groups(token_adapter):
        for s in range(S):
            r = rk[s][i]
            if r:
                A = a[s, offs[i] : offs[i] + r].float()
                h[s, toks, :r] = xf[toks] @ A.t()
    return h


def expand_(
    y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor,
    token_adapter: torch.Tensor, slice_cols: Sequence[int], slice_outs: Sequence[int],
) -> torch.Tensor:
    """``y[t, col_s : col_s + out_s] += scales[s, i] * h[s, t, :r] @ B_{s,i}^T`` for every slice s, with
    ``i = token_adapter[t]`` and ``r = ranks[s, i]``; tokens with -1 and adapters of rank 0 are untouched.
    The sum is formed in fp32 and rounded once into y's dtype. Returns y."""
    for toks, slices in _adapter_slices(token_adapter, offsets, ranks, scales, slice_cols, slice_outs):
        for s, c0, n, o, r, scale in slices:
            d = scale * (h[s, toks, :r].float() @ b[o : o + r, c0 : c0 + n].float())
            y[toks, c0 : c0 + n] = (y[toks, c0 : c0 + n].float() + d).to(y.dtype)
    return y


def add_lora_(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor,
    scales: torch.Tensor, token_adapter: torch.Tensor, slice_cols: Sequence[int], slice_outs: Sequence[int],
) -> torch.Tensor:
    """``y[t, cols_s] += scales[s, i] * (x[t] @ A_{s,i}^T) @ B_{s,i}^T``: :func:`shrink` then :func:`expand_`
    with the intermediate kept in fp32. Returns y."""
    r_cap = int(ranks.max()) if ranks.numel() else 0
    h = shrink(x, a, offsets, ranks, token_adapter, max(r_cap, 1))
    return expand_(y, h, b, offsets, ranks, scales, token_adapter, slice_cols, slice_outs)


def lora_delta(x: torch.Tensor, weights, adapter_ids: torch.Tensor) -> torch.Tensor:
    """The fp32 delta ``[T, out]`` for a :class:`~lora_kernels.LoRAWeights` and per-token ids (tests, demo)."""
    y = torch.zeros(x.shape[0], weights.out_features, dtype=torch.float32, device=x.device)
    return add_lora_(y, x, weights.a, weights.b, weights.offsets, weights.ranks, weights.scales,
                     adapter_ids.to(torch.int32), weights.slice_cols, weights.slice_outs)


# ---- merge / unmerge (lora_kernels.ops.merge) ----------------------------------------------------------------
# A merge is described by ``terms`` int64 [n, 5], one row per (slice, adapter) with a nonzero rank:
# ``(s, row0, rows, off, r)`` (slice s writes W rows [row0, row0 + rows); its factors are a[s, off : off + r] and
# b[off : off + r, row0 : row0 + rows]) and ``coefs`` fp32 [n] (``fl32(lambda_j * scale_{s,j})``).
# Codes: 0 = W is R, 1 = W is one step above R, 2 = one step below, 3 = escape (R = fl(W' - delta) after the
# merge; a "step" is a neighbour in the total order of bit patterns, -0 and +0 being neighbours). Packed 4 per
# byte, element e in bits 2*(e % 4) .. 2*(e % 4) + 1 of byte e // 4 (flat row-major index).

_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def merge_delta(W_shape: Sequence[int], a: torch.Tensor, b: torch.Tensor, terms, coefs) -> torch.Tensor:
    """The fp32 delta ``[out, in]`` of a merge, in a fixed order: for every term (in order) and every rank
    index k = 0 .. r-1, ``d[rows] = fl(d[rows] + fl(fl(coef * B[:, k]) * A[k, :]))``, starting from +0. Plain
    elementwise fp32 ops (no matmul, no FMA), so the same inputs give bit-identical deltas on every call.
    ``terms`` / ``coefs`` may be tensors or host lists."""
    d = torch.zeros(tuple(W_shape), dtype=torch.float32, device=a.device)
    if isinstance(terms, torch.Tensor):
        terms = terms.to("cpu").tolist()
    if isinstance(coefs, torch.Tensor):
        coefs = coefs.to("cpu", torch.float32).tolist()
    for (s, row0, rows, off, r), c in zip(terms, coefs):
        cf = torch.tensor(c, dtype=torch.float32, device=a.device)
        Bs = b[off : off + r, row0 : row0 + rows].float().t() * cf  # [rows, r]
        A = a[s, off : off + r].float()  # [r, in]
        dv = d[row0 : row0 + rows]
        for k in range(r):
            dv += Bs[:, k : k + 1] * A[k : k + 1, :]
    return d


def float_key(x: torch.Tensor) -> torch.Tensor:
    """int64 position of each value's bit pattern in the total order of the format (-0 is -1, +0 is 0; the
    neighbours of a value are one step above/below; NaNs sit past the infinities)."""
    bits = x.view(_INT_VIEW[x.dtype]).to(torch.int64)
    w = 8 * x.element_size()
    mag = bits & ((1 << (w - 1)) - 1)
    return torch.where(bits < 0, -mag - 1, mag)


def float_from_key(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`float_key`."""
    w = 8 * torch.empty((), dtype=dtype).element_size()
    neg = k < 0
    mag = torch.where(neg, -k - 1, k)
    bits = torch.where(neg, mag - (1 << (w - 1)), mag)
    return bits.to(_INT_VIEW[dtype]).view(dtype)


def pack_codes(code: torch.Tensor) -> torch.Tensor:
    """uint8 codes (values 0..3, any shape) -> uint8 [ceil(numel / 4)], 4 codes per byte (element e in bits
    2*(e % 4) of byte e // 4)."""
    c = code.reshape(-1).to(torch.uint8)
    pad = (-c.numel()) % 4
    if pad:
        c = torch.cat([c, c.new_zeros(pad)])
    c = c.view(-1, 4)
    return c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)


def unpack_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 [numel] codes."""
    sh = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    return ((packed.view(-1, 1) >> sh) & 3).reshape(-1)[:numel]


def escape_indices(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """int64 flat indices of the escaped weights (code 3), ascending, from packed codes (a scan of the code
    bytes, then of the 4 fields of the bytes that hold an escape)."""
    hit = ((packed & (packed >> 1)) & 0x55) != 0
    nz = hit.nonzero().flatten()
    if nz.numel() == 0:
        return nz
    sh = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    fields = (packed[nz].view(-1, 1) >> sh) & 3
    idx = (nz.view(-1, 1) * 4 + torch.arange(4, device=packed.device)).reshape(-1)
    idx = idx[fields.reshape(-1) == 3]
    return idx[idx < numel]


def merge_codes(W: torch.Tensor, W_new: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """uint8 codes (W's shape) that restore W from ``W_new = fl(W + delta)``: see the module notes above."""
    R = (W_new.float() - delta).to(W.dtype)
    diff = float_key(W) - float_key(R)
    code = torch.full(W.shape, 3, dtype=torch.uint8, device=W.device)
    code[diff == 0] = 0
    code[diff == 1] = 1
    code[diff == -1] = 2
    return code


def unmerge_values(W_new: torch.Tensor, delta: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """``R = fl(W_new - delta)`` moved by the codes (0: stay, 1: one step up, 2: one step down; 3: R, to be
    overwritten from the escape list). ``code=None``: the approximate unmerge, R itself."""
    R = (W_new.float() - delta).to(W_new.dtype)
    if code is None:
        return R
    step = torch.tensor([0, 1, -1, 0], dtype=torch.int64, device=W_new.device)[code.long()]
    return float_from_key(float_key(R) + step, W_new.dtype)


def merge_(W: torch.Tensor, a: torch.Tensor, b: torch.Tensor, terms: torch.Tensor, coefs: torch.Tensor,
           exact: bool = True):
    """``W = fl(W + delta)`` in place (delta from :func:`merge_delta`, formed in fp32, rounded once).

    Returns ``(code, esc_idx, esc_val)``: packed codes uint8 [ceil(numel / 4)], the flat indices (int64,
    ascending) and original values (W's dtype) of the escaped weights; empty tensors when ``exact`` is false.
    W must be contiguous."""
    d = merge_delta(W.shape, a, b, terms, coefs)
    W_new = (W.float() + d).to(W.dtype)
    if exact:
        code = merge_codes(W, W_new, d).reshape(-1)
        esc_idx = (code == 3).nonzero().flatten()
        esc_val = W.reshape(-1)[esc_idx].clone()
        packed = pack_codes(code)
    else:
        packed = torch.empty(0, dtype=torch.uint8, device=W.device)
        esc_idx = torch.empty(0, dtype=torch.int64, device=W.device)
        esc_val = torch.empty(0, dtype=W.dtype, device=W.device)
    W.copy_(W_new)
    return packed, esc_idx, esc_val


def unmerge_(W: torch.Tensor, a: torch.Tensor, b: torch.Tensor, terms: torch.Tensor, coefs: torch.Tensor,
             code: torch.Tensor, esc_idx: torch.Tensor, esc_val: torch.Tensor) -> torch.Tensor:
    """Undo :func:`merge_` in place: bit-exact with the codes and escapes it returned, ``fl(W - delta)`` when
    ``code`` is empty (approximate). Returns W."""
    d = merge_delta(W.shape, a, b, terms, coefs)
    c = unpack_codes(code, W.numel()).view(W.shape) if code.numel() else None
    out = unmerge_values(W, d, c)
    if esc_idx.numel():
        out.view(-1)[esc_idx] = esc_val
    W.copy_(out)
    return W


__all__ += ["merge_delta", "merge_", "unmerge_", "merge_codes", "unmerge_values", "float_key", "float_from_key",
            "pack_codes", "unpack_codes", "escape_indices"]


# ---- deformable multi-scale pooling (VCE; lora_kernels.ops.deform) ------------------------------------------------
# Level metadata that points outside value (validate=False with inconsistent spatial_shapes / level_start_index):
# a bilinear corner whose value row ``start_l + y * W_l + x`` is outside [0, S) counts as outside the image (zero
# value, zero gradients), as in the kernels. A level whose rows all lie in [0, S) (the normal case) takes the
# grid_sample path; any other level the explicit per-corner path below (same result where both apply).
def _deform_meta(spatial_shapes, level_start_index):
    """(host list of (H_l, W_l), host list of start_l): level_start_index when given, else cumulative sizes."""
    shapes = spatial_shapes.tolist() if isinstance(spatial_shapes, torch.Tensor) else [tuple(s) for s in spatial_shapes]
    shapes = [(int(h), int(w)) for h, w in shapes]
    if level_start_index is None:
        starts = [sum(h * w for h, w in shapes[:i]) for i in range(len(shapes))]
    else:
        starts = [int(s) for s in (level_start_index.tolist() if isinstance(level_start_index, torch.Tensor)
                                   else level_start_index)]
    return shapes, starts


def _level_in_range(h_l: int, w_l: int, start: int, S: int) -> bool:
    return h_l >= 1 and w_l >= 1 and start >= 0 and start + h_l * w_l <= S


def _deform_corners(v, loc_l, h_l: int, w_l: int, start: int):
    """Explicit bilinear corners of one level: v [B, S, H, D], loc_l [B, Q, H, P, 2] -> (fx, fy, corners) with
    corners[k] = (mask, row, value [B, Q, H, P, D], weight) for k = 00, 01, 10, 11; rows outside [0, S) or
    corners outside the image are masked (value 0, never indexed out of range)."""
    B, S, H, D = v.shape
    x = loc_l[..., 0] * w_l - 0.5
    y = loc_l[..., 1] * h_l - 0.5
    ok = (x >= -1.0) & (x < w_l) & (y >= -1.0) & (y < h_l)  # False for NaN / Inf
    x = torch.where(ok, x, torch.zeros_like(x))
    y = torch.where(ok, y, torch.zeros_like(y))
    x0f, y0f = x.floor(), y.floor()
    fx, fy = x - x0f, y - y0f
    x0, y0 = x0f.long(), y0f.long()
    bi = torch.arange(B, device=v.device).view(B, 1, 1, 1)
    hi = torch.arange(H, device=v.device).view(1, 1, H, 1)
    corners = []
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            row = start + yi * w_l + xi
            m = ok & (xi >= 0) & (xi < w_l) & (yi >= 0) & (yi < h_l) & (row >= 0) & (row < S)
            row = torch.where(m, row, torch.zeros_like(row))
            if S > 0:
                val = torch.where(m[..., None], v[bi, row, hi], torch.zeros((), dtype=v.dtype, device=v.device))
            else:
                val = v.new_zeros(*m.shape, D)
            corners.append((m, row, val, (fx if dx else 1 - fx) * (fy if dy else 1 - fy)))
    return fx, fy, corners


def deform_pool(value: torch.Tensor, spatial_shapes, level_start_index: torch.Tensor,
                sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable pooling, the grid_sample formulation (the spec of :func:`lora_kernels.deform_pool`).

    ``out[b, q, h*D + d] = sum_{l, p} attention_weights[b, q, h, l, p] * bilinear_l(value[b, :, h, d], loc)``
    with ``loc = sampling_locations[b, q, h, l, p]`` in [0, 1] (x then y) and ``bilinear_l`` exactly
    ``grid_sample(align_corners=False, padding_mode="zeros")`` of level l (``value[:, start_l : start_l + H_l
    W_l]`` viewed as [H_l, W_l]) at ``2 * loc - 1``: zero outside the image. A sample whose location is not
    finite contributes 0 and gets zero gradients (locations are clamped to [-1, 2] first, where every sample is
    already entirely outside, so the clamp changes neither values nor gradients of finite locations).

    value [B, S, H, D]; spatial_shapes int64 [L, 2] (H_l, W_l) or a list of pairs; level_start_index [L]
    (None: the cumulative H_l * W_l); sampling_locations [B, Q, H, L, P, 2]; attention_weights
    [B, Q, H, L, P]. Computed in fp32 (fp64 for fp64 inputs), differentiable; returns [B, Q, H * D] in
    value's dtype.

    Metadata that points outside value contributes nothing; validate=True refuses it: a bilinear corner whose
    value row ``start_l + y * W_l + x`` is outside [0, S) counts as outside the image (zero value, zero
    gradients), and a level with H_l < 1 or W_l < 1 contributes nothing.
    """
    shapes, starts = _deform_meta(spatial_shapes, level_start_index)
    B, S, H, D = value.shape
    Q, P = sampling_locations.shape[1], sampling_locations.shape[4]
    ct = torch.float64 if value.dtype == torch.float64 else torch.float32
    v = value.to(ct)
    loc = sampling_locations.to(ct)
    loc = torch.where(torch.isfinite(loc).all(-1, keepdim=True), loc, torch.full_like(loc, -1.0)).clamp(-1.0, 2.0)
    aw = attention_weights.to(ct)
    grids = 2 * loc - 1
    out = torch.zeros(B * H, D, Q, dtype=ct, device=value.device)
    for lvl, ((h_l, w_l), start) in enumerate(zip(shapes, starts)):
        if not _level_in_range(h_l, w_l, start, S):
            _, _, corners = _deform_corners(v, loc[:, :, :, lvl], h_l, w_l, start)
            s_l = sum(wt[..., None] * val for _, _, val, wt in corners)  # [B, Q, H, P, D]
            o_l = (aw[:, :, :, lvl, :, None] * s_l).sum(3)  # [B, Q, H, D]
            out = out + o_l.permute(0, 2, 3, 1).reshape(B * H, D, Q)
            continue
        v_l = v[:, start : start + h_l * w_l].permute(0, 2, 3, 1).reshape(B * H, D, h_l, w_l)
        g_l = grids[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(B * H, Q, P, 2)
        s_l = torch.nn.functional.grid_sample(v_l, g_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        a_l = aw[:, :, :, lvl].permute(0, 2, 1, 3).reshape(B * H, 1, Q, P)
        out = out + (s_l * a_l).sum(-1)
    return out.view(B, H * D, Q).transpose(1, 2).contiguous().to(value.dtype)


__all__ += ["deform_pool"]


# ---- Dual-LoRA (lora_kernels.ops.dual_lora) --------------------------------------------------------------------
# Storage (lora_kernels.DualLoRAWeights): adapter i with rank r and first row o = offsets[i] has
# A_i = a[o : o + r], T_i = a[o + r : o + 2r] (a [1, R, in] or [R, in]), B_i = b[o : o + r].T (b [R, out]),
# LayerNorm weight/bias ln_w[o : o + r] / ln_b[o : o + r], scale scales[i]; ranks/scales are [N] or [1, N].


def dual_lora_delta(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, offsets: torch.Tensor,
    ranks: torch.Tensor, scales: torch.Tensor, token_adapter: torch.Tensor, eps: float = 1e-5,
) -> torch.Tensor:
    """Dual-LoRA delta, fp32 [T, out] (fp64 for fp64 x): ``d[t] = s_i * B_i (ReLU(T_i x[t]) * LN_r(A_i x[t]))``
    with ``i = token_adapter[t]`` (0 for -1 and rank-0 slots), ``LN_r`` the LayerNorm over the r features
    (biased variance, ``eps``) with affine ``ln_w``/``ln_b`` rows. Differentiable in x, a, b, ln_w and ln_b
    (autograd through plain torch ops; the host loop over adapters makes it the spec, not a fast path)."""
    a2 = a.reshape(-1, a.shape[-1])
    T = x.shape[0]
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32  # fp64 in: fp64 maths (gradcheck)
    out = torch.zeros(T, b.shape[1], dtype=ct, device=x.device)
    xf = x.to(ct)
    offs = offsets.to("cpu").tolist()
    rk = ranks.reshape(-1).to("cpu").tolist()
    sc = scales.reshape(-1).to("cpu").tolist()
    for i, toks in _adapter_groups(token_adapter):
        r = rk[i]
        if not r:
            continue
        o = offs[i]
        u = xf[toks] @ a2[o : o + r].to(ct).t()
        v = xf[toks] @ a2[o + r : o + 2 * r].to(ct).t()
        ln = torch.nn.functional.layer_norm(u, (r,), ln_w[o : o + r].to(ct), ln_b[o : o + r].to(ct), eps)
        g = torch.relu(v) * ln
        out = out.index_add(0, toks, sc[i] * (g @ b[o : o + r].to(ct)))
    return out


def dual_lora_(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor,
    offsets: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor, token_adapter: torch.Tensor, eps: float = 1e-5,
) -> torch.Tensor:
    """``y[t] += dual_lora_delta(...)[t]`` in place, formed in fp32 and rounded once; rows of tokens with -1 or a
    rank-0 adapter stay bit-identical. Returns y."""
    d = dual_lora_delta(x, a, b, ln_w, ln_b, offsets, ranks, scales, token_adapter, eps)
    tok = token_adapter.to(torch.int64)
    rk = ranks.reshape(-1).to(y.device)
    has = (tok >= 0) & (rk[tok.clamp(min=0)] > 0) if tok.numel() else tok.bool()
    y.copy_(torch.where(has[:, None], (y.float() + d).to(y.dtype), y))
    return y


__all__ += ["dual_lora_delta", "dual_lora_"]


# ---- autograd of the delta (lora_kernels.ops.lora_linear) ------------------------------------------------------
def _acc_dtype(*ts: torch.Tensor) -> torch.dtype:
    """fp64 when any input is fp64 (gradcheck), else fp32: the spec's accumulation dtype."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def lora_add(y0, x, a, b, offsets, ranks, scales, token_adapter, slice_cols, slice_outs) -> torch.Tensor:
    """Out of place ``y0 + delta``: ``out[t, cols_s] = y0[t, cols_s] + scales[s, i] * (x[t] A_{s,i}^T) B_{s,i}^T``
    (as :func:`add_lora_`, but returning a new tensor; fp64 inputs are computed in fp64). Entries with nothing
    to add (tokens with -1, rank-0 slices) are y0's values bit for bit."""
    acc = _acc_dtype(y0, x, a, b)
    out = y0.to(acc, copy=True)
    for toks, slices in _adapter_slices(token_adapter, offsets, ranks, scales, slice_cols, slice_outs):
        xs = x[toks].to(acc)
        for s, c0, n, o, r, scale in slices:
            A = a[s, o : o + r].to(acc)
            out[toks, c0 : c0 + n] += scale * ((xs @ A.t()) @ b[o : o + r, c0 : c0 + n].to(acc))
    return out.to(y0.dtype)


def lora_add_backward(dy, x, a, b, offsets, ranks, scales, token_adapter, slice_cols, slice_outs,
                      need_x: bool = True, need_a: bool = True, need_b: bool = True):
    """Gradients of :func:`lora_add` with respect to x, a and b for the upstream gradient ``dy`` [T, out_total]
    (the gradient with respect to y0 is dy itself). With ``h = x A^T`` and ``g = dy_s B`` per token:

        grad x[t]                          = sum_s scales[s, i] * g[s, t] @ A_{s,i}
        grad a[s, off_i : off_i + r]       = scales[s, i] * sum_{t of i} g[s, t]^T x[t]
        grad b[off_i : off_i + r, cols_s]  = scales[s, i] * sum_{t of i} h[s, t]^T dy[t, cols_s]

    Tokens with -1 get 0; rows that belong to no adapter of the batch (absent adapters, free slots, past a
    slice's rank) get 0. Formed in fp32 (fp64 for fp64 inputs), rounded once into x's / a's / b's dtype. A
    gradient that is not needed is returned as an empty tensor."""
    acc = _acc_dtype(dy, x, a, b)
    dx = torch.zeros(x.shape, dtype=acc, device=x.device) if need_x else None
    da = torch.zeros(a.shape, dtype=acc, device=a.device) if need_a else None
    db = torch.zeros(b.shape, dtype=acc, device=b.device) if need_b else None
    for toks, slices in _adapter_slices(token_adapter, offsets, ranks, scales, slice_cols, slice_outs):
        xs = x[toks].to(acc)
        for s, c0, n, o, r, scale in slices:
            A = a[s, o : o + r].to(acc)
            Bt = b[o : o + r, c0 : c0 + n].to(acc)
            g = dy[toks, c0 : c0 + n].to(acc)
            gh = g @ Bt.t()
            if need_x:
                dx[toks] += scale * (gh @ A)
            if need_a:
                da[s, o : o + r] += scale * (gh.t() @ xs)
            if need_b:
                db[o : o + r, c0 : c0 + n] += scale * ((xs @ A.t()).t() @ g)
    # distinct empty tensors: a custom op's outputs may not alias each other
    return (dx.to(x.dtype) if need_x else x.new_empty(0), da.to(a.dtype) if need_a else x.new_empty(0),
            db.to(b.dtype) if need_b else x.new_empty(0))


__all__ += ["lora_add", "lora_add_backward"]


def deform_pool_backward(grad_out: torch.Tensor, value: torch.Tensor, spatial_shapes, sampling_locations: torch.Tensor,
                         attention_weights: torch.Tensor, level_start_index=None):
    """Gradients of :func:`deform_pool` (value, sampling_locations, attention_weights), each in its input's
    dtype, written with ``aten.grid_sampler_2d_backward`` so that it runs without autograd (inside a custom
    op's implementation, below the autograd dispatch key). Equal to autograd through :func:`deform_pool`,
    including for metadata that points outside value (those corners get zero gradients)."""
    shapes, starts = _deform_meta(spatial_shapes, level_start_index)
    B, S, H, D = value.shape
    Q, L, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    ct = torch.float64 if value.dtype == torch.float64 else torch.float32
    v = value.to(ct)
    loc0 = sampling_locations.to(ct)
    finite = torch.isfinite(loc0).all(-1, keepdim=True)
    loc1 = torch.where(finite, loc0, torch.full_like(loc0, -1.0))
    pass_grad = finite & (loc1 >= -1.0) & (loc1 <= 2.0)  # clamp's gradient mask, then the finite mask
    grids = 2 * loc1.clamp(-1.0, 2.0) - 1
    aw = attention_weights.to(ct)
    g = grad_out.to(ct).view(B, Q, H, D).permute(0, 2, 3, 1).reshape(B * H, D, Q, 1)
    gv = torch.zeros(B, S, H, D, dtype=ct, device=value.device)
    ggrid = torch.zeros(B, Q, H, L, P, 2, dtype=ct, device=value.device)
    ga = torch.zeros(B, Q, H, L, P, dtype=ct, device=value.device)
    for lvl, ((h_l, w_l), start) in enumerate(zip(shapes, starts)):
        if not _level_in_range(h_l, w_l, start, S):
            _deform_level_backward_explicit(g, v, loc0[:, :, :, lvl], aw[:, :, :, lvl], h_l, w_l, start, gv,
                                            ggrid[:, :, :, lvl], ga[:, :, :, lvl])
            continue
        v_l = v[:, start : start + h_l * w_l].permute(0, 2, 3, 1).reshape(B * H, D, h_l, w_l)
        g_l = grids[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(B * H, Q, P, 2)
        a_l = aw[:, :, :, lvl].permute(0, 2, 1, 3).reshape(B * H, 1, Q, P)
        s_l = torch.nn.functional.grid_sample(v_l, g_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        ga[:, :, :, lvl] = (g * s_l).sum(1).view(B, H, Q, P).permute(0, 2, 1, 3)
        dv, dg = torch.ops.aten.grid_sampler_2d_backward(g * a_l, v_l, g_l, 0, 0, False, [True, True])
        gv[:, start : start + h_l * w_l] += dv.view(B, H, D, h_l * w_l).permute(0, 3, 1, 2)  # levels may alias
        ggrid[:, :, :, lvl] = dg.view(B, H, Q, P, 2).permute(0, 2, 1, 3, 4)
    gl = torch.where(pass_grad, 2 * ggrid, torch.zeros_like(ggrid))
    return gv.to(value.dtype), gl.to(sampling_locations.dtype), ga.to(attention_weights.dtype)


def _deform_level_backward_explicit(g, v, loc_l, aw_l, h_l, w_l, start, gv, ggrid_l, ga_l):
    """One out-of-range level of :func:`deform_pool_backward` by explicit corners (see _deform_corners): adds
    grad value into gv [B, S, H, D] and writes ga_l [B, Q, H, P] and ggrid_l [B, Q, H, P, 2] (in grid units,
    halved: the caller doubles it)."""
    B, S, H, D = v.shape
    Q, P = loc_l.shape[1], loc_l.shape[3]
    gq = g.view(B, H, D, Q).permute(0, 3, 1, 2)[:, :, :, None, :]  # [B, Q, H, 1, D]
    fx, fy, corners = _deform_corners(v, loc_l, h_l, w_l, start)
    v00, v01, v10, v11 = (c[2] for c in corners)
    val = sum(wt[..., None] * vk for _, _, vk, wt in corners)
    ga_l.copy_((gq * val).sum(-1))
    gx = (gq * ((1 - fy)[..., None] * (v01 - v00) + fy[..., None] * (v11 - v10))).sum(-1) * aw_l * w_l
    gy = (gq * ((1 - fx)[..., None] * (v10 - v00) + fx[..., None] * (v11 - v01))).sum(-1) * aw_l * h_l
    ggrid_l.copy_(torch.stack((gx, gy), -1) / 2)  # d loc = d grid / 2
    if S == 0:
        return
    bi = torch.arange(B, device=v.device).view(B, 1, 1, 1).expand(B, Q, H, P)
    hi = torch.arange(H, device=v.device).view(1, 1, H, 1).expand(B, Q, H, P)
    for m, row, _, wt in corners:
        contrib = torch.where(m[..., None], (aw_l * wt)[..., None] * gq, torch.zeros((), dtype=v.dtype,
                                                                                      device=v.device))
        gv.index_put_((bi, row, hi), contrib, accumulate=True)


__all__ += ["deform_pool_backward"]


def dual_lora_gate_backward(uv, dg, ln_w, ln_b, offsets, ranks, scales, token_adapter, r_cap: int, eps: float):
    """Backward of the LayerNorm + ReLU gate of Dual-LoRA on per-token tensors (plain torch, no host sync;
    shared by the reference and the Triton backward).

    Args: ``uv`` fp32 [T, 2 r_cap], ``[A x, T x]`` packed per token (cols ``[0, r)`` and ``[r, 2r)``);
    ``dg`` fp32 [T, r_cap], ``dy @ B_i`` (unscaled); storage/metadata as :func:`dual_lora_delta`.

    Returns ``(duv, gs, grad_ln_w, grad_ln_b)``: ``duv`` fp32 [T, 2 r_cap] = ``[dL/du, dL/dv]`` packed like uv;
    ``gs`` fp32 [T, r_cap] = ``s * g`` (the gated activations times the scale, for B's gradient); the LN
    gradients fp32 [R]. Entries past a token's rank and rows of -1 tokens are 0."""
    T = uv.shape[0]
    dev = uv.device
    R = ln_w.shape[0]
    tok = token_adapter.to(torch.int64)
    valid = tok >= 0
    tc = tok.clamp(min=0)
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    r_t = torch.where(valid, ranks.reshape(-1).to(dev)[tc].to(torch.int64), torch.zeros_like(tc))
    s_t = torch.where(valid, scales.reshape(-1).to(dev)[tc].float(), zero)
    k = torch.arange(r_cap, device=dev)
    mask = k[None, :] < r_t[:, None]
    rows = torch.where(mask, offsets.to(dev)[tc][:, None] + k[None, :], torch.full((T, r_cap), R, device=dev))
    w_t = torch.cat([ln_w.float(), torch.zeros(1, device=dev)])[rows]
    b_t = torch.cat([ln_b.float(), torch.zeros(1, device=dev)])[rows]
    idx_v = (r_t[:, None] + k[None, :]).clamp(max=2 * r_cap - 1)
    u = torch.where(mask, uv[:, :r_cap], zero)
    v = torch.where(mask, uv.gather(1, idx_v), zero)
    rf = r_t.clamp(min=1).to(torch.float32)[:, None]
    diff = torch.where(mask, u - u.sum(1, keepdim=True) / rf, zero)
    rstd = torch.rsqrt((diff * diff).sum(1, keepdim=True) / rf + eps)
    n = diff * rstd
    ln = torch.where(mask, n * w_t + b_t, zero)
    gate = torch.relu(v)
    dgs = torch.where(mask, dg * s_t[:, None], zero)
    dl = dgs * gate
    dv = torch.where(mask & (v > 0), dgs * ln, zero)
    gw = torch.zeros(R + 1, dtype=torch.float32, device=dev)
    gb = torch.zeros(R + 1, dtype=torch.float32, device=dev)
    gw.index_add_(0, rows.reshape(-1), (dl * n).reshape(-1))
    gb.index_add_(0, rows.reshape(-1), dl.reshape(-1))
    dn = dl * w_t
    du = torch.where(mask, rstd * (dn - dn.sum(1, keepdim=True) / rf - n * (dn * n).sum(1, keepdim=True) / rf), zero)
    duv = torch.zeros((T, 2 * r_cap), dtype=torch.float32, device=dev)
    duv[:, :r_cap] = du
    duv.scatter_add_(1, idx_v, dv)
    return duv, gate * ln * s_t[:, None], gw[:R], gb[:R]


def dual_lora_backward(dy, x, a, b, ln_w, ln_b, uv, offsets, ranks, ranks2, scales, token_adapter, r_cap: int,
                       eps: float):
    """Gradients ``(dx, grad_a, grad_b, grad_ln_w, grad_ln_b)`` of :func:`dual_lora_delta` for the upstream
    gradient ``dy`` [T, out], given the forward's ``uv`` (see :func:`dual_lora_gate_backward`); storage
    gradients dense over the R rows (0 outside the adapters present), every gradient in its input's dtype.
    Plain torch with a host loop over adapters (the backward of the reference path)."""
    T = x.shape[0]
    a2 = a.reshape(-1, a.shape[-1])
    tok = token_adapter.to(torch.int32)
    dg = shrink(dy, b.unsqueeze(0), offsets, ranks.reshape(1, -1), tok, r_cap)[0]
    duv, gs, gw, gb = dual_lora_gate_backward(uv, dg, ln_w, ln_b, offsets, ranks, scales, tok, r_cap, eps)
    dx = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    ga = torch.zeros(a2.shape, dtype=torch.float32, device=x.device)
    gbm = torch.zeros(b.shape, dtype=torch.float32, device=x.device)
    offs = offsets.to("cpu").tolist()
    rk = ranks.reshape(-1).to("cpu").tolist()
    xf, dyf = x.float(), dy.float()
    for i, toks in _adapter_groups(tok):
        r, o = rk[i], offs[i]
        if r:
            h = duv[toks, : 2 * r]
            dx[toks] += h @ a2[o : o + 2 * r].float()
            ga[o : o + 2 * r] = h.t() @ xf[toks]
            gbm[o : o + r] = gs[toks, :r].t() @ dyf[toks]
    return (dx.to(x.dtype), ga.view(a.shape).to(a.dtype), gbm.to(b.dtype), gw.to(ln_w.dtype), gb.to(ln_b.dtype))


__all__ += ["dual_lora_gate_backward", "dual_lora_backward"]


def _sample_loc_weights(spatial_shapes, ref, offsets, logits, ct):
    shapes = spatial_shapes.tolist() if isinstance(spatial_shapes, torch.Tensor) else [tuple(s) for s in spatial_shapes]
    B, Q, H, L, P, _ = offsets.shape
    wh = torch.tensor([[w, h] for h, w in shapes], dtype=ct, device=offsets.device).view(1, 1, 1, L, 1, 2)
    loc = ref.to(ct).view(1, Q, 1, 1, 1, 2) + offsets.to(ct) / wh
    w = torch.softmax(logits.to(ct).reshape(B, Q, H, L * P), -1).view(B, Q, H, L, P)
    return shapes, wh, loc, w


def deform_sample(value: torch.Tensor, spatial_shapes, level_start_index, ref: torch.Tensor, offsets: torch.Tensor,
                  logits: torch.Tensor) -> torch.Tensor:
    """VCE's sampling with the location and weight arithmetic folded in (the spec of
    :func:`lora_kernels.deform_sample`): ``deform_pool(value, ..., loc, w)`` with
    ``loc[b, q, h, l, p] = ref[q] + offsets[b, q, h, l, p] / (W_l, H_l)`` and ``w[b, q, h] = softmax over the
    L * P logits[b, q, h]``, both formed in fp32 (fp64 for fp64 value). ref [Q, 2] (x, y); offsets
    [B, Q, H, L, P, 2]; logits [B, Q, H, L * P]. Differentiable in value, offsets and logits. Metadata that
    points outside value contributes nothing; validate=True refuses it (see :func:`deform_pool`)."""
    ct = torch.float64 if value.dtype == torch.float64 else torch.float32
    shapes, _, loc, w = _sample_loc_weights(spatial_shapes, ref, offsets, logits, ct)
    return deform_pool(value, shapes, level_start_index, loc, w)


def deform_sample_backward(grad_out: torch.Tensor, value: torch.Tensor, spatial_shapes, ref: torch.Tensor,
                           offsets: torch.Tensor, logits: torch.Tensor, level_start_index=None):
    """Gradients of :func:`deform_sample` (value, offsets, logits), without autograd: grad offsets = grad loc /
    (W_l, H_l); grad logits = w * (grad w - sum(w * grad w)) over the L * P of each (b, q, h)."""
    ct = torch.float64 if value.dtype == torch.float64 else torch.float32
    shapes, wh, loc, w = _sample_loc_weights(spatial_shapes, ref, offsets, logits, ct)
    gv, gloc, gw = deform_pool_backward(grad_out, value, shapes, loc, w, level_start_index)
    goff = gloc / wh
    B, Q, H, L, P = w.shape
    gw = gw.reshape(B, Q, H, L * P)
    wf = w.reshape(B, Q, H, L * P)
    glog = wf * (gw - (wf * gw).sum(-1, keepdim=True))
    return gv, goff.to(offsets.dtype), glog.view(logits.shape).to(logits.dtype)


__all__ += ["deform_sample", "deform_sample_backward"]
