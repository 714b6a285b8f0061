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


def shrink(
    x: torch.Tensor,
    a: torch.Tensor,
    offsets: torch.Tensor,
    ranks: torch.Tensor,
    token_adapter: torch.Tensor,
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
    y: torch.Tensor,
    h: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    token_adapter: torch.Tensor,
    slice_cols: Sequence[int],
    slice_outs: Sequence[int],
) -> torch.Tensor:
    """``y[t, col_s : col_s + out_s] += scales[s, i] * h[s, t, :r] @ B_{s,i}^T`` for every slice s, with
    ``i = token_adapter[t]`` and ``r = ranks[s, i]``; tokens with -1 and adapters of rank 0 are untouched.
    The sum is formed in fp32 and rounded once into y's dtype. Returns y."""
    offs = offsets.to("cpu").tolist()
    rk = ranks.to("cpu").tolist()
    sc = scales.to("cpu").tolist()
    for i, toks in _adapter_groups(token_adapter):
        for s, (c0, n) in enumerate(zip(slice_cols, slice_outs)):
            r = rk[s][i]
            if r:
                B = b[offs[i] : offs[i] + r, c0 : c0 + n].float()
                d = sc[s][i] * (h[s, toks, :r].float() @ B)
                y[toks, c0 : c0 + n] = (y[toks, c0 : c0 + n].float() + d).to(y.dtype)
    return y


def add_lora_(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    token_adapter: torch.Tensor,
    slice_cols: Sequence[int],
    slice_outs: Sequence[int],
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
