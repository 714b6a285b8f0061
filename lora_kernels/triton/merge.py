"""Grouped merge / unmerge of LoRA deltas into base weights, in Triton (``_merge_grouped_kernel``).

One launch covers every *job* of a list of layers: a job is one slice of one layer (rows ``[row0, row0 +
rows)`` of W, a plain layer has one). The job table (int64 ``[n_jobs, JOB_COLS]``, built by
:func:`lora_kernels.ops.merge.build_tables`, device pointers included) is the device-side list of layer
descriptors; programs find their job by a binary search of ``tile_start`` (the first tile of each job), so the
grid is exactly the number of tiles of all layers, whatever their shapes.

Per tile of W (BLOCK_M rows x BLOCK_N columns):

    delta = sum over the job's terms j (in order) of (coef_j * B_j[rows, :r_j]) @ A_j[:r_j, cols]
            (fp32 operands, ``tl.dot(..., input_precision="ieee")``, fp32 accumulation, BLOCK_R ranks a step)
    merge:   W' = rnd(W + delta); with ``EXACT`` also R = rnd(W' - delta) and the code of W against R
             (0 same bits, 1 one step above R, 2 one step below, 3 escape), packed 4 per byte in the same pass.
             Escaped weights are *not written* (they keep their original value) and are counted per layer
             (``counter[layer]``, one atomic per tile that has any): the wrapper collects them after the launch.
    unmerge: R = rnd(W' - delta), moved one step up/down by the codes (``EXACT``); escapes are left for the
             wrapper, which scatters the saved originals.

Merge and unmerge run the same kernel (``UNMERGE`` constexpr) with the same tile shapes, so the delta of a
weight is the same sequence of fp32 operations in both: R is bit-identical, and so is the restored W. Deltas
of this backend differ from the reference's (summation order), never within it.

Codes: packed in-kernel when the job's ``in`` is a multiple of 4 (a group of 4 columns is one byte); otherwise
the kernel writes one code byte per weight into a scratch buffer and the wrapper packs it (column ``PACKED``).

No host sync and no allocation here; the merge wrapper syncs once to read the escape counters.

CPU interpreter: fp32 -> bf16 casts truncate there (triton 3.8; the GPU rounds to nearest even), so interpreted
bf16 merges can differ by one step from GPU ones; exactness of the restore does not depend on the rounding. The
tiles are widened to fp32 before ``tl.dot``, so the interpreter's broken bf16 dot is never used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Columns of the job table (J_W ... J_PACKED: the kernel's loads below read them at these positions; defined in
# lora_kernels.ops.merge.tables, mirrored by csrc/kernels/merge.cuh).
from ..ops.merge.tables import (J_A, J_B, J_CODE, J_IN, J_LAYER, J_NT, J_NTN, J_PACKED, J_ROW0, J_ROWS,  # noqa: F401
                                J_SA, J_SB, J_T0, J_TILE0, J_W, JOB_COLS)

__all__ = ["launch_merge_grouped", "TILE_M", "TILE_N"]

# Tile shape of the launcher (the wrapper needs it to build tile_start). BLOCK_N must be a multiple of 4.
TILE_M = 32
TILE_N = 64
BLOCK_R = 16

_KIND = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


@triton.jit
def _as_ptr(addr, KIND: tl.constexpr):
    if KIND == 0:
        p = addr.to(tl.pointer_type(tl.float16))
    elif KIND == 1:
        p = addr.to(tl.pointer_type(tl.bfloat16))
    else:
        p = addr.to(tl.pointer_type(tl.float32))
    return p


@triton.jit
def _key(x, KIND: tl.constexpr):
    """Position of x's bit pattern in the format's total order (-0 -> -1, +0 -> 0)."""
    if KIND == 2:
        bits = x.to(tl.int32, bitcast=True).to(tl.int64)
        mag = bits & 0x7FFFFFFF
    else:
        bits = x.to(tl.int16, bitcast=True).to(tl.int32)
        mag = bits & 0x7FFF
    return tl.where(bits < 0, -mag - 1, mag)


@triton.jit
def _from_key(k, KIND: tl.constexpr):
    neg = k < 0
    mag = tl.where(neg, -k - 1, k)
    if KIND == 2:
        bits = tl.where(neg, mag - 2147483648, mag).to(tl.int32)
        out = bits.to(tl.float32, bitcast=True)
    else:
        bits = tl.where(neg, mag - 32768, mag).to(tl.int16)
        if KIND == 0:
            out = bits.to(tl.float16, bitcast=True)
        else:
            out = bits.to(tl.bfloat16, bitcast=True)
    return out


@triton.jit
def _merge_grouped_kernel(
    jobs_ptr, tile_start_ptr, terms_ptr, coefs_ptr, counter_ptr, n_jobs,
    W_KIND: tl.constexpr, AB_KIND: tl.constexpr, UNMERGE: tl.constexpr, EXACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, LOG_JOBS: tl.constexpr,
    JOB_COLS: tl.constexpr,
):
    pid = tl.program_id(0)
    # Binary search: the job whose first tile is the largest <= pid (tile_start[0] == 0, ascending).
    lo = pid * 0
    hi = lo + n_jobs
    for _ in tl.static_range(LOG_JOBS):
        mid = (lo + hi) // 2
        go = tl.load(tile_start_ptr + mid) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    job = jobs_ptr + lo.to(tl.int64) * JOB_COLS
    w_addr = tl.load(job + 0)
    code_addr = tl.load(job + 1)
    row0 = tl.load(job + 2)
    rows = tl.load(job + 3)
    in_f = tl.load(job + 4)
    a_addr = tl.load(job + 5)
    sa = tl.load(job + 6)
    b_addr = tl.load(job + 7)
    sb = tl.load(job + 8)
    t0 = tl.load(job + 9)
    nt = tl.load(job + 10)
    tile0 = tl.load(job + 11)
    layer = tl.load(job + 12)
    ntn = tl.load(job + 13)
    packed = tl.load(job + 14)

    t = pid - tile0
    tm = t // ntn
    tn = t - tm * ntn
    rm = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = rm < rows
    mn = rn < in_f
    wp = _as_ptr(w_addr, W_KIND)
    ap = _as_ptr(a_addr, AB_KIND)
    bp = _as_ptr(b_addr, AB_KIND)
    rk0 = tl.arange(0, BLOCK_R)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, nt):
        off = tl.load(terms_ptr + 2 * (t0 + i))
        r = tl.load(terms_ptr + 2 * (t0 + i) + 1)
        c = tl.load(coefs_ptr + t0 + i)
        for k0 in range(0, r, BLOCK_R):
            rk = k0 + rk0
            mk = rk < r
            bt = tl.load(bp + (off + rk)[None, :] * sb + rm[:, None], mask=mm[:, None] & mk[None, :], other=0.0)
            at = tl.load(ap + (off + rk)[:, None] * sa + rn[None, :], mask=mk[:, None] & mn[None, :], other=0.0)
            bs = bt.to(tl.float32) * c
            acc = tl.dot(bs, at.to(tl.float32), acc, input_precision="ieee")

    mask = mm[:, None] & mn[None, :]
    flat = (row0 + rm).to(tl.int64)[:, None] * in_f + rn[None, :]
    w = tl.load(wp + flat, mask=mask, other=0.0)
    if UNMERGE:
        back = (w.to(tl.float32) - acc).to(w.dtype)
        if EXACT:
            cp = code_addr.to(tl.pointer_type(tl.uint8))
            byte = tl.load(cp + flat // 4, mask=mask, other=0).to(tl.int32)
            code = (byte >> ((flat % 4) * 2).to(tl.int32)) & 3
            step = tl.where(code == 1, 1, tl.where(code == 2, -1, 0))
            back = _from_key(_key(back, W_KIND) + step, W_KIND)
            tl.store(wp + flat, back, mask=mask & (code != 3))
        else:
            tl.store(wp + flat, back, mask=mask)
    else:
        new = (w.to(tl.float32) + acc).to(w.dtype)
        if EXACT:
            back = (new.to(tl.float32) - acc).to(w.dtype)
            diff = _key(w, W_KIND) - _key(back, W_KIND)
            code = tl.where(diff == 0, 0, tl.where(diff == 1, 1, tl.where(diff == -1, 2, 3))).to(tl.int32)
            esc = (code == 3) & mask
            tl.store(wp + flat, new, mask=mask & (code != 3))
            n_esc = tl.sum(tl.sum(esc.to(tl.int32), axis=1), axis=0)
            if n_esc > 0:
                tl.atomic_add(counter_ptr + layer, n_esc)
            cp = code_addr.to(tl.pointer_type(tl.uint8))
            if packed != 0:
                # 4 consecutive columns (same row, in_f % 4 == 0) are one byte: e = 4q + j -> bits 2j of byte q.
                c3 = tl.reshape(code, (BLOCK_M, BLOCK_N // 4, 4))
                sh = tl.arange(0, 4) * 2
                byte = tl.sum(c3 << sh[None, None, :], axis=2)
                q = tl.arange(0, BLOCK_N // 4)
                qcol = tn * BLOCK_N + 4 * q
                qflat = (row0 + rm).to(tl.int64)[:, None] * (in_f // 4) + (qcol // 4)[None, :]
                tl.store(cp + qflat, byte.to(tl.uint8), mask=mm[:, None] & (qcol < in_f)[None, :])
            else:
                tl.store(cp + flat, code.to(tl.uint8), mask=mask)
        else:
            tl.store(wp + flat, new, mask=mask)


def launch_merge_grouped(
    jobs: torch.Tensor, tile_start: torch.Tensor, terms: torch.Tensor, coefs: torch.Tensor, counter: torch.Tensor,
    total_tiles: int, w_dtype: torch.dtype, ab_dtype: torch.dtype, unmerge: bool, exact: bool,
) -> None:
    """Launch one grouped merge (or unmerge) over every job of ``jobs`` (see the module docstring).

    Args:
        jobs: int64 [n_jobs, JOB_COLS] job table (device pointers of W, codes, A and B included).
        tile_start: int64 [n_jobs], ascending, ``tile_start[0] == 0``: first tile of each job (tiles of
            TILE_M x TILE_N, row-major within a job).
        terms: int64 [n_terms, 2] (row offset, rank); coefs: fp32 [n_terms].
        counter: int32 [n_layers], zeroed: escapes per layer (merge with ``exact``).
        total_tiles: the grid (sum of the jobs' tiles).
    """
    # (internal: lora_kernels.ops.merge validated everything; these two guards turn a KeyError or a negative
    # grid deep in Triton into a message, should another caller get it wrong)
    if w_dtype not in _KIND or ab_dtype not in _KIND:
        raise TypeError(f"launch_merge_grouped: expected W / adapter dtypes in {[str(d) for d in _KIND]}, got "
                        f"{w_dtype} / {ab_dtype}")
    if isinstance(total_tiles, bool) or not isinstance(total_tiles, int) or total_tiles < 0:
        raise ValueError(f"total_tiles: expected an int >= 0, got {total_tiles!r}")
    n_jobs = jobs.shape[0]
    if n_jobs == 0 or total_tiles == 0:
        return
    log_jobs = max(1, (n_jobs - 1).bit_length())
    _merge_grouped_kernel[(total_tiles,)](
        jobs, tile_start, terms, coefs, counter, n_jobs,
        W_KIND=_KIND[w_dtype], AB_KIND=_KIND[ab_dtype], UNMERGE=bool(unmerge), EXACT=bool(exact),
        BLOCK_M=TILE_M, BLOCK_N=TILE_N, BLOCK_R=BLOCK_R, LOG_JOBS=log_jobs, JOB_COLS=JOB_COLS,
        num_warps=4,
    )
