"""Multi-scale deformable pooling (VCE) in Triton: ``_deform_pool_fwd_kernel`` and ``_deform_pool_bwd_kernel``.

Semantics: :func:`lora_kernels.reference.deform_pool` (grid_sample, align_corners=False, zero padding).

Grid: (query tiles of BLOCK_Q x B * H,), flat. A program holds a [BLOCK_Q, BLOCK_D] tile of one head's channels
(BLOCK_D = D rounded up to a power of two) and loops over levels and points; the location, weight and the four
bilinear corner weights are computed once per (query, level, point) as [BLOCK_Q] vectors and broadcast over
the channels, and each corner is one gather of BLOCK_Q rows of D contiguous channels. fp32 accumulation;
pixel coordinates ``x = loc_x * W_l - 0.5``. A sample is skipped (zero value, zero gradients) unless
``-1 <= x < W_l`` and ``-1 <= y < H_l``: every sample outside that box is entirely in the zero padding, and
NaN/Inf locations fail the test, so they contribute nothing (the reference's documented behaviour). A corner
whose value row ``start_l + y * W_l + x`` is outside [0, S) is masked too (inconsistent level metadata passed
with validate=False contributes nothing and is never read or written out of range).

Backward: grad_out tile loaded once; per (level, point): grad of the attention weight and of the location are
reductions over the channel axis (``tl.sum``), written once by the program that owns the query (no atomics);
grad of value is scattered with fp32 ``tl.atomic_add`` into a zeroed fp32 buffer [B, S, H, D] (the caller
casts it), so its last bits depend on the order of the atomics (not bit-reproducible run to run); or, in the
deterministic mode, computed by keys + a stable sort + a segmented gather (see below), bit-reproducible.

The fused form (``_deform_sample_*_kernel``, VCE: softmax over L*P and ``loc = ref + offset / (W_l, H_l)`` formed
in the kernel) runs the same tile bodies (``_fwd_tile`` / ``_bwd_tile`` with ``FUSED``), which differ only in where
a sample's location and weight come from (``_sample_point``) and in the softmax pass closing the backward.

No intermediate of size B*Q*H*L*P*D and no host sync. Allocations: the outputs; in the backward, the fp32 grad
value (and the fused form's fp32 grad logits) and their casts to the inputs' dtypes; in the deterministic mode,
its keys, weights and sort (and the fused form's fp32 locations and weights, :func:`sample_locations_weights`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["deform_pool_fwd", "deform_pool_bwd", "deform_pool_grad_value_deterministic", "deform_sample_fwd",
           "deform_sample_bwd", "sample_locations_weights"]


# ---- shared sampling code: deform_pool reads locations and weights; deform_sample (FUSED) forms them -------------
@triton.jit
def _softmax_stats(logits, lrow, qm, LP):
    """Running max and sum of exp over the L*P logits of each query row (fp32)."""
    m = tl.load(logits + lrow * LP, mask=qm, other=0.0).to(tl.float32)
    for i in range(1, LP):
        m = tl.maximum(m, tl.load(logits + lrow * LP + i, mask=qm, other=0.0).to(tl.float32))
    ssum = tl.zeros_like(m)
    for i in range(LP):
        ssum += tl.exp(tl.load(logits + lrow * LP + i, mask=qm, other=0.0).to(tl.float32) - m)
    return m, ssum


@triton.jit
def _row_source(ref, attn, qs, row, qm, LP, FUSED: tl.constexpr):
    """Per query row: (ref x, ref y, softmax max, softmax sum) for FUSED (attn holds the logits), else neutral."""
    if FUSED:
        m, ssum = _softmax_stats(attn, row, qm, LP)
        rx = tl.load(ref + 2 * qs, mask=qm, other=0.0).to(tl.float32)
        ry = tl.load(ref + 2 * qs + 1, mask=qm, other=0.0).to(tl.float32)
    else:
        m = tl.zeros_like(qs).to(tl.float32)
        ssum = m + 1.0
        rx = m
        ry = m
    return rx, ry, m, ssum


@triton.jit
def _sample_point(loc, attn, idx, qm, rx, ry, m, ssum, wf, hf, FUSED: tl.constexpr):
    """(loc_x, loc_y, weight) of samples ``idx``: read, or (FUSED) ``ref + offset / (W_l, H_l)`` and the softmax."""
    lx = tl.load(loc + 2 * idx, mask=qm, other=0.0).to(tl.float32)
    ly = tl.load(loc + 2 * idx + 1, mask=qm, other=0.0).to(tl.float32)
    a = tl.load(attn + idx, mask=qm, other=0.0).to(tl.float32)
    if FUSED:
        lx = rx + tl.math.div_rn(lx, wf)
        ly = ry + tl.math.div_rn(ly, hf)
        a = tl.exp(a - m) / ssum
    return lx, ly, a


@triton.jit
def _bilinear_geometry(lx, ly, wf, hf, qm):
    """(ok, fx, fy, x0, y0): ok is False outside the box where any corner can be in the image (and for NaN/Inf)."""
    x = lx * wf - 0.5
    y = ly * hf - 0.5
    ok = qm & (x >= -1.0) & (x < wf) & (y >= -1.0) & (y < hf)
    x = tl.where(ok, x, 0.0)
    y = tl.where(ok, y, 0.0)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    return ok, x - x0f, y - y0f, x0f.to(tl.int64), y0f.to(tl.int64)


@triton.jit
def _corner(ok, fx, fy, x0, y0, st, wl, hl, S, corner: tl.constexpr):
    """(vrow, inb, wx, wy) of one bilinear corner (0 = (y0, x0), 1 = (y0, x0 + 1), 2 = (y0 + 1, x0), 3 = (y0 + 1,
    x0 + 1)): its value row, whether it is read (inside the level's image and, so that metadata pointing outside
    value can never be read, inside [0, S)), and its bilinear weight factors."""
    dy = corner // 2
    dx = corner % 2
    xi = x0 + dx
    yi = y0 + dy
    vrow = st + yi * wl + xi
    inb = ok & (xi >= 0) & (xi < wl) & (yi >= 0) & (yi < hl) & (vrow >= 0) & (vrow < S)
    wx = fx if dx == 1 else 1.0 - fx
    wy = fy if dy == 1 else 1.0 - fy
    return vrow, inb, wx, wy


@triton.jit
def _tile(Q, H, D, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (b, h), its BLOCK_Q queries and BLOCK_D channels, their masks, and the index of each
    (b, q, h) in [B, Q, H] (grid: (query tiles * B*H,), query tile fastest). One flat axis: grid axis 1 is limited
    to 65535 on CUDA, which B*H (e.g. 4096 images x 16 heads) can exceed; axis 0 is not."""
    n_qt = (Q + (BLOCK_Q - 1)) // BLOCK_Q
    pid = tl.program_id(0)
    bh = pid // n_qt
    qs = (pid - bh * n_qt) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ds = tl.arange(0, BLOCK_D)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    return b, h, qs, ds, qs < Q, ds < D, (b * Q + qs.to(tl.int64)) * H + h


@triton.jit
def _level(shapes, starts, lvl):
    """(H_l, W_l, start_l) and H_l, W_l as fp32."""
    hl = tl.load(shapes + 2 * lvl)
    wl = tl.load(shapes + 2 * lvl + 1)
    return hl, wl, tl.load(starts + lvl), hl.to(tl.float32), wl.to(tl.float32)


@triton.jit
def _sample_geometry(loc, attn, idx, qm, rx, ry, m, ssum, wf, hf, FUSED: tl.constexpr):
    """(weight, ok, fx, fy, x0, y0) of samples ``idx``: the weight of :func:`_sample_point` and the bilinear
    geometry (:func:`_bilinear_geometry`) of its location."""
    lx, ly, a = _sample_point(loc, attn, idx, qm, rx, ry, m, ssum, wf, hf, FUSED)
    ok, fx, fy, x0, y0 = _bilinear_geometry(lx, ly, wf, hf, qm)
    return a, ok, fx, fy, x0, y0


@triton.jit
def _fwd_tile(value, shapes, starts, loc, attn, ref, out, S, Q, H, D, L, P, BLOCK_Q: tl.constexpr,
              BLOCK_D: tl.constexpr, FUSED: tl.constexpr):
    b, h, qs, ds, qm, dm, row = _tile(Q, H, D, BLOCK_Q, BLOCK_D)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    vbase = value + b * S * H * D + h * D
    rx, ry, m, ssum = _row_source(ref, attn, qs, row, qm, L * P, FUSED)
    for lvl in range(L):
        hl, wl, st, hf, wf = _level(shapes, starts, lvl)
        for pt in range(P):
            idx = (row * L + lvl) * P + pt
            a, ok, fx, fy, x0, y0 = _sample_geometry(loc, attn, idx, qm, rx, ry, m, ssum, wf, hf, FUSED)
            for corner in tl.static_range(4):
                vrow, inb, wx, wy = _corner(ok, fx, fy, x0, y0, st, wl, hl, S, corner)
                off = vrow * H * D
                v = tl.load(vbase + off[:, None] + ds[None, :], mask=inb[:, None] & dm[None, :], other=0.0)
                acc += (a * wx * wy)[:, None] * v.to(tl.float32)
    tl.store(out + row[:, None] * D + ds[None, :], acc.to(out.dtype.element_ty), mask=qm[:, None] & dm[None, :])


@triton.jit
def _bwd_tile(grad_out, value, shapes, starts, loc, attn, ref, grad_value, grad_loc, grad_attn, S, Q, H, D, L, P,
              BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_GV: tl.constexpr, FUSED: tl.constexpr):
    """FUSED: grad_loc / grad_attn are grad offsets / grad logits (an fp32 buffer: it holds dL/dw_j until the
    softmax pass at the end turns it into dL/dlogit_j)."""
    b, h, qs, ds, qm, dm, row = _tile(Q, H, D, BLOCK_Q, BLOCK_D)
    g = tl.load(grad_out + row[:, None] * D + ds[None, :], mask=qm[:, None] & dm[None, :], other=0.0).to(tl.float32)
    vbase = value + b * S * H * D + h * D
    gvbase = grad_value + b * S * H * D + h * D
    rx, ry, m, ssum = _row_source(ref, attn, qs, row, qm, L * P, FUSED)
    dot = tl.zeros([BLOCK_Q], dtype=tl.float32)  # FUSED: sum_j w_j * dL/dw_j, for the softmax backward
    for lvl in range(L):
        hl, wl, st, hf, wf = _level(shapes, starts, lvl)
        for pt in range(P):
            idx = (row * L + lvl) * P + pt
            a, ok, fx, fy, x0, y0 = _sample_geometry(loc, attn, idx, qm, rx, ry, m, ssum, wf, hf, FUSED)
            # corners: 00 = (y0, x0), 01 = (y0, x0 + 1), 10 = (y0 + 1, x0), 11 = (y0 + 1, x0 + 1)
            in_x0 = (x0 >= 0) & (x0 < wl)
            in_x1 = (x0 + 1 >= 0) & (x0 + 1 < wl)
            in_y0 = (y0 >= 0) & (y0 < hl)
            in_y1 = (y0 + 1 >= 0) & (y0 + 1 < hl)
            r00 = st + y0 * wl + x0  # value rows of the corners: outside [0, S) counts as outside the image
            m00 = ok & in_y0 & in_x0 & (r00 >= 0) & (r00 < S)
            m01 = ok & in_y0 & in_x1 & (r00 + 1 >= 0) & (r00 + 1 < S)
            m10 = ok & in_y1 & in_x0 & (r00 + wl >= 0) & (r00 + wl < S)
            m11 = ok & in_y1 & in_x1 & (r00 + wl + 1 >= 0) & (r00 + wl + 1 < S)
            o00 = r00 * H * D
            o01 = o00 + H * D
            o10 = o00 + wl * H * D
            o11 = o10 + H * D
            dd = ds[None, :]
            v00 = tl.load(vbase + o00[:, None] + dd, mask=m00[:, None] & dm[None, :], other=0.0).to(tl.float32)
            v01 = tl.load(vbase + o01[:, None] + dd, mask=m01[:, None] & dm[None, :], other=0.0).to(tl.float32)
            v10 = tl.load(vbase + o10[:, None] + dd, mask=m10[:, None] & dm[None, :], other=0.0).to(tl.float32)
            v11 = tl.load(vbase + o11[:, None] + dd, mask=m11[:, None] & dm[None, :], other=0.0).to(tl.float32)
            w00 = (1.0 - fx) * (1.0 - fy)
            w01 = fx * (1.0 - fy)
            w10 = (1.0 - fx) * fy
            w11 = fx * fy
            val = w00[:, None] * v00 + w01[:, None] * v01 + w10[:, None] * v10 + w11[:, None] * v11
            ga = tl.sum(g * val, axis=1)
            gx = tl.sum(g * ((1.0 - fy)[:, None] * (v01 - v00) + fy[:, None] * (v11 - v10)), axis=1) * a
            gy = tl.sum(g * ((1.0 - fx)[:, None] * (v10 - v00) + fx[:, None] * (v11 - v01)), axis=1) * a
            if FUSED:  # d loc / d offset = 1 / W_l (1 / H_l) cancels the W_l (H_l) of d x / d loc
                dot += a * ga
            else:
                gx = gx * wf
                gy = gy * hf
            tl.store(grad_attn + idx, ga.to(grad_attn.dtype.element_ty), mask=qm)
            tl.store(grad_loc + 2 * idx, gx.to(grad_loc.dtype.element_ty), mask=qm)
            tl.store(grad_loc + 2 * idx + 1, gy.to(grad_loc.dtype.element_ty), mask=qm)
            if WRITE_GV:
                ag = a[:, None] * g
                tl.atomic_add(gvbase + o00[:, None] + dd, w00[:, None] * ag, mask=m00[:, None] & dm[None, :])
                tl.atomic_add(gvbase + o01[:, None] + dd, w01[:, None] * ag, mask=m01[:, None] & dm[None, :])
                tl.atomic_add(gvbase + o10[:, None] + dd, w10[:, None] * ag, mask=m10[:, None] & dm[None, :])
                tl.atomic_add(gvbase + o11[:, None] + dd, w11[:, None] * ag, mask=m11[:, None] & dm[None, :])
    if FUSED:
        tl.debug_barrier()
        for i in range(L * P):
            j = row * (L * P) + i
            w = tl.exp(tl.load(attn + j, mask=qm, other=0.0).to(tl.float32) - m) / ssum
            gw = tl.load(grad_attn + j, mask=qm, other=0.0)
            tl.store(grad_attn + j, w * (gw - dot), mask=qm)


@triton.jit
def _deform_pool_fwd_kernel(value, shapes, starts, loc, attn, out, S, Q, H, D, L, P,
                            BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    _fwd_tile(value, shapes, starts, loc, attn, loc, out, S, Q, H, D, L, P, BLOCK_Q, BLOCK_D, False)


@triton.jit
def _deform_pool_bwd_kernel(grad_out, value, shapes, starts, loc, attn, grad_value, grad_loc, grad_attn,
                            S, Q, H, D, L, P, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
                            WRITE_GV: tl.constexpr):
    _bwd_tile(grad_out, value, shapes, starts, loc, attn, loc, grad_value, grad_loc, grad_attn, S, Q, H, D, L, P,
              BLOCK_Q, BLOCK_D, WRITE_GV, False)


def _blocks(Q: int, D: int):
    block_d = max(16, triton.next_power_of_2(D))
    # Keep the per-program tile near 2K elements: 32 queries x 64 channels.
    block_q = max(1, min(triton.next_power_of_2(max(Q, 1)), max(1, 2048 // block_d)))
    return block_q, block_d


def _launch_tiles(kernel, value, samples, *args, **constexprs) -> bool:
    """Launch a tile kernel (``_fwd_tile`` / ``_bwd_tile`` body) as ``kernel(*args, S, Q, H, D, L, P, BLOCK_Q=,
    BLOCK_D=, **constexprs)`` over (query tiles x B*H,) programs, the sizes read from ``value`` [B, S, H, D] and
    ``samples`` [B, Q, H, L, P, 2] (locations or offsets). Returns False, launching nothing, when there is no
    sample or no channel (B*Q*H*D, L or P zero): the caller's outputs are then all zeros (or empty)."""
    B, S, H, D = value.shape
    Q, L, P = samples.shape[1], samples.shape[3], samples.shape[4]
    if not (B * Q * H * D and L and P):
        return False
    bq, bd = _blocks(Q, D)
    kernel[(triton.cdiv(Q, bq) * B * H,)](*args, S, Q, H, D, L, P, BLOCK_Q=bq, BLOCK_D=bd, num_warps=4,
                                          **constexprs)
    return True


def _forward(kernel, value, samples, *inputs) -> torch.Tensor:
    """A fresh [B, Q, H * D] output in value's dtype, written by ``kernel(value, *inputs, out, ...)`` (zeros when
    there is nothing to sample)."""
    B, _, H, D = value.shape
    out = torch.empty(B, samples.shape[1], H * D, dtype=value.dtype, device=value.device)
    if not _launch_tiles(kernel, value, samples, value, *inputs, out):
        out.zero_()
    return out


def deform_pool_fwd(value, shapes, starts, loc, attn) -> torch.Tensor:
    """Launch the forward on contiguous inputs (validated by the caller). Returns [B, Q, H * D] in value's dtype."""
    return _forward(_deform_pool_fwd_kernel, value, loc, shapes, starts, loc, attn)


def deform_pool_bwd(grad_out, value, shapes, starts, loc, attn, deterministic: bool = False):
    """Launch the backward. Returns (grad_value, grad_loc, grad_attn) in the inputs' dtypes. ``deterministic``:
    grad value by :func:`deform_pool_grad_value_deterministic` instead of atomics (bit-reproducible)."""
    gv = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
    gl = torch.zeros(loc.shape, dtype=loc.dtype, device=loc.device)
    ga = torch.zeros(attn.shape, dtype=attn.dtype, device=attn.device)
    launched = _launch_tiles(_deform_pool_bwd_kernel, value, loc, grad_out, value, shapes, starts, loc, attn, gv, gl,
                             ga, WRITE_GV=not deterministic)
    if launched and deterministic:  # the kernel skipped grad value's atomics
        gv = deform_pool_grad_value_deterministic(grad_out, value, shapes, starts, loc, attn)
    return gv.to(value.dtype), gl, ga


# ---- deterministic grad value: keys + stable sort + segmented gather ----------------------------------------------
# Instead of scattering with atomics, every (sample, corner) pair gets a key (the flat index (b, s, h) of the value
# row it touches, or a sentinel past the end when it touches none) and its weight a * w_corner; a stable sort by key
# groups the pairs of each value row in a fixed order, and a gather kernel sums each row's pairs in that order
# (fp32). Same bits on every run and for every launch configuration. Extra memory: about 28 bytes per (sample,
# corner) pair (keys, weights, the sort's permutation), nothing of size B*Q*H*L*P*D.
@triton.jit
def _deform_pool_keys_kernel(shapes, starts, loc, attn, keys, wts, N, S, Q, H, L, P, SENTINEL,
                             BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    nm = n < N
    bqh = n // (L * P)
    lvl = (n // P) % L
    b = bqh // (Q * H)
    h = bqh % H
    hl = tl.load(shapes + 2 * lvl, mask=nm, other=1)
    wl = tl.load(shapes + 2 * lvl + 1, mask=nm, other=1)
    st = tl.load(starts + lvl, mask=nm, other=0)
    hf = hl.to(tl.float32)
    wf = wl.to(tl.float32)
    lx = tl.load(loc + 2 * n, mask=nm, other=0.0).to(tl.float32)
    ly = tl.load(loc + 2 * n + 1, mask=nm, other=0.0).to(tl.float32)
    a = tl.load(attn + n, mask=nm, other=0.0).to(tl.float32)
    ok, fx, fy, x0, y0 = _bilinear_geometry(lx, ly, wf, hf, nm)
    for corner in tl.static_range(4):
        vrow, inb, wx, wy = _corner(ok, fx, fy, x0, y0, st, wl, hl, S, corner)
        key = (b * S + vrow) * H + h
        tl.store(keys + 4 * n + corner, tl.where(inb, key, SENTINEL), mask=nm)
        tl.store(wts + 4 * n + corner, tl.where(inb, a * wx * wy, 0.0), mask=nm)


@triton.jit
def _deform_pool_gather_kernel(grad_out, perm, wts, seg, grad_value, R, D, LP, BLOCK_R: tl.constexpr,
                               BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ds = tl.arange(0, BLOCK_D)
    rm = r < R
    dm = ds < D
    lo = tl.load(seg + r, mask=rm, other=0)
    hi = tl.load(seg + r + 1, mask=rm, other=0)
    cnt = hi - lo
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    n_max = tl.max(cnt, axis=0)
    for j in range(0, n_max):
        m = rm & (j < cnt)
        e = tl.load(perm + lo + j, mask=m, other=0)
        w = tl.load(wts + e, mask=m, other=0.0)
        bqh = (e // 4) // LP
        g = tl.load(grad_out + bqh[:, None] * D + ds[None, :], mask=m[:, None] & dm[None, :], other=0.0)
        acc += w[:, None] * g.to(tl.float32)
    tl.store(grad_value + r[:, None] * D + ds[None, :], acc, mask=rm[:, None] & dm[None, :])


def deform_pool_grad_value_deterministic(grad_out, value, shapes, starts, loc, attn) -> torch.Tensor:
    """grad value (fp32 [B, S, H, D]) summed in a fixed order: bit-reproducible. See the comment above."""
    B, S, H, D = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    N = B * Q * H * L * P
    R = B * S * H
    gv = torch.zeros(B, S, H, D, dtype=torch.float32, device=value.device)
    if N == 0 or R == 0 or D == 0:
        return gv
    keys = torch.empty(4 * N, dtype=torch.int64, device=value.device)
    wts = torch.empty(4 * N, dtype=torch.float32, device=value.device)
    blk = 256
    _deform_pool_keys_kernel[(triton.cdiv(N, blk),)](shapes, starts, loc, attn, keys, wts, N, S, Q, H, L, P, R,
                                                     BLOCK=blk, num_warps=4)
    sorted_keys, perm = torch.sort(keys, stable=True)
    seg = torch.searchsorted(sorted_keys, torch.arange(R + 1, dtype=torch.int64, device=value.device))
    bd = max(16, triton.next_power_of_2(D))
    br = max(1, min(64, 4096 // bd))
    _deform_pool_gather_kernel[(triton.cdiv(R, br),)](grad_out, perm, wts, seg, gv, R, D, L * P, BLOCK_R=br,
                                                      BLOCK_D=bd, num_warps=4)
    return gv


# ---- fused sampling (VCE): softmax over levels x points and loc = ref + offset / (W_l, H_l) inside the kernel -----
@triton.jit
def _deform_sample_fwd_kernel(value, shapes, starts, ref, offsets, logits, out, S, Q, H, D, L, P,
                              BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    _fwd_tile(value, shapes, starts, offsets, logits, ref, out, S, Q, H, D, L, P, BLOCK_Q, BLOCK_D, True)


@triton.jit
def _deform_sample_bwd_kernel(grad_out, value, shapes, starts, ref, offsets, logits, grad_value, grad_off,
                              grad_logits, S, Q, H, D, L, P, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
                              WRITE_GV: tl.constexpr):
    _bwd_tile(grad_out, value, shapes, starts, offsets, logits, ref, grad_value, grad_off, grad_logits, S, Q, H, D,
              L, P, BLOCK_Q, BLOCK_D, WRITE_GV, True)


def sample_locations_weights(shapes, ref, offsets, logits):
    """(loc, w) in fp32 as the fused kernels form them: loc = ref + offset / (W_l, H_l), w = softmax over L*P.
    (The deterministic grad value path uses these with the keys kernel.)"""
    B, Q, H, L, P, _ = offsets.shape
    wh = shapes.flip(-1).to(torch.float32).view(1, 1, 1, L, 1, 2)
    loc = ref.to(torch.float32).view(1, Q, 1, 1, 1, 2) + offsets.to(torch.float32) / wh
    w = torch.softmax(logits.to(torch.float32).view(B, Q, H, L * P), -1).view(B, Q, H, L, P)
    return loc, w


def deform_sample_fwd(value, shapes, starts, ref, offsets, logits) -> torch.Tensor:
    """Fused forward on contiguous inputs. Returns [B, Q, H * D] in value's dtype."""
    return _forward(_deform_sample_fwd_kernel, value, offsets, shapes, starts, ref, offsets, logits)


def deform_sample_bwd(grad_out, value, shapes, starts, ref, offsets, logits, deterministic: bool = False):
    """Fused backward. Returns (grad_value, grad_offsets, grad_logits) in value's / offsets' / logits' dtypes."""
    gv = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
    go = torch.zeros(offsets.shape, dtype=offsets.dtype, device=offsets.device)
    gl = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    launched = _launch_tiles(_deform_sample_bwd_kernel, value, offsets, grad_out, value, shapes, starts, ref, offsets,
                             logits, gv, go, gl, WRITE_GV=not deterministic)
    if launched and deterministic:  # the kernel skipped grad value's atomics
        loc, w = sample_locations_weights(shapes, ref, offsets, logits)
        gv = deform_pool_grad_value_deterministic(grad_out, value, shapes, starts, loc, w)
    return gv.to(value.dtype), go, gl.to(logits.dtype)
