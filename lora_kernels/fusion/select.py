"""Exact k-th largest magnitude of matrices seen only in chunks (TIES's per-task trim threshold).

Radix select on the bit patterns: a non-negative IEEE float orders like its bit pattern read as an integer, so
the k-th largest magnitude is found one 16-bit digit at a time, most significant first. Each level makes one
pass over the chunks and histograms (``bincount``) the current digit of the values whose higher digits match
the prefix chosen so far; the bucket holding the k-th largest value fixes the next digit. fp32 takes 2 passes,
fp64 4; the memory beyond one chunk is a 65536-bin int64 histogram per matrix. The result is exact: it is
the k-th largest of the values *as the chunks compute them* (bit for bit), whatever the chunking, provided
every pass yields the same values (the callers recompute each chunk with the same ops and shapes).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

__all__ = ["kth_largest_magnitude"]

_DIGIT_BITS = 16
_BINS = 1 << _DIGIT_BITS
_INT_OF = {torch.float32: (torch.int32, 32), torch.float64: (torch.int64, 64)}


def kth_largest_magnitude(
    chunks: Callable[[], Iterable[torch.Tensor]], k: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The k-th largest ``|v|`` of each of n matrices, streamed in chunks.

    Semantics:
        ``out[i] = sorted(|M_i|.flatten(), descending)[k[i] - 1]`` where ``M_i`` is the concatenation of
        ``c[i]`` over the chunks ``c`` of one pass. Ties count with multiplicity (``|v| >= out[i]`` holds for at
        least ``k[i]`` entries, ``|v| > out[i]`` for fewer). ``-0.0`` counts as ``0``.

    Args:
        chunks: called once per pass (``2`` passes for fp32, ``4`` for fp64); each call yields tensors
            ``[n, ...]`` of ``dtype`` (any trailing shape), the same values in the same order every call.
            Must not hold NaNs.
        k: int64 [n], ``1 <= k[i] <=`` the number of entries of ``M_i``.
        dtype: float32 or float64.

    Returns:
        ``dtype`` [n] on ``k``'s device.

    Raises:
        TypeError: ``dtype`` not float32/float64, ``k`` not an integer tensor, a chunk of another dtype.
        ValueError: ``k`` not 1-D, a chunk without n rows, ``k[i]`` outside ``[1, numel(M_i)]`` (one host sync).
    """
    if dtype not in _INT_OF:
        raise TypeError(f"dtype: expected torch.float32 or torch.float64, got {dtype!r}")
    if not isinstance(k, torch.Tensor) or k.is_floating_point() or k.is_complex() or k.dtype == torch.bool:
        raise TypeError(f"k: expected an integer tensor [n], got {getattr(k, 'dtype', type(k).__name__)}")
    if k.ndim != 1:
        raise ValueError(f"k: expected 1 dim [n], got shape {tuple(k.shape)}")
    int_dtype, nbits = _INT_OF[dtype]
    dev = k.device
    n = k.shape[0]
    prefix = torch.zeros(n, dtype=torch.int64, device=dev)  # the digits chosen so far
    remaining = k.to(torch.int64).clone()  # rank of the target inside the current bucket, from the top
    base = torch.arange(n, device=dev, dtype=torch.int64).view(n, 1) * _BINS
    for level in range(nbits // _DIGIT_BITS):
        shift = nbits - _DIGIT_BITS * (level + 1)
        hist = torch.zeros(n * _BINS, dtype=torch.int64, device=dev)
        for c in chunks():
            if c.dtype != dtype or c.ndim < 1 or c.shape[0] != n:  # .view(int) of another dtype reads garbage
                raise TypeError(f"chunks: expected tensors [{n}, ...] of {dtype}, got {c.dtype} {tuple(c.shape)}")
            bits = c.abs().reshape(n, -1).view(int_dtype).to(torch.int64)
            idx = ((bits >> shift) & (_BINS - 1)) + base
            if level:
                idx = idx[(bits >> (shift + _DIGIT_BITS)) == prefix.view(n, 1)]
            hist += torch.bincount(idx.reshape(-1), minlength=n * _BINS)
        # Counts of the buckets from the top: the first whose running total reaches `remaining` holds the target.
        top = hist.view(n, _BINS).flip(-1).cumsum(-1)
        if level == 0:  # top[:, -1] = numel(M_i): a k out of range would return an arbitrary value
            bad = (remaining < 1) | (remaining > top[:, -1])
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(f"k: expected 1 <= k[i] <= numel(M_i), got k[{i}] = {int(remaining[i])} with "
                                 f"numel {int(top[i, -1])}")
        j = torch.searchsorted(top, remaining.view(n, 1)).view(n).clamp_(max=_BINS - 1)
        above = torch.where(j > 0, top.gather(1, (j - 1).clamp(min=0).view(n, 1)).view(n), torch.zeros_like(j))
        remaining -= above
        prefix = (prefix << _DIGIT_BITS) | (_BINS - 1 - j)
    return prefix.to(int_dtype).view(dtype)
