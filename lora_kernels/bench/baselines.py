"""The two PyTorch baselines ``lora-bench sgmv`` compares the library with.

Both compute the op of :func:`lora_kernels.add_lora_`, ``y[t, cols_s] += s_i * (x[t] A_{s,i}^T) B_{s,i}^T``
with ``i = adapter_ids[t]`` (nothing for -1), in the activations' dtype with PyTorch's own kernels (cuBLAS
on a GPU). Everything that depends only on the weights and the ids (index tensors, padded copies, host
scalars) is prepared once in the constructor and is **not** timed, which flatters the baselines: a real
server pays that per step (BENCHMARKS.md: 0.3-0.6 ms of host metadata work without CUDA graphs).

* :class:`NaiveLoop`: for every active adapter, gather its tokens, two matmuls, ``index_add_`` into y (what a
  straightforward multi-adapter implementation does; 4 launches per adapter and slice).
* :class:`BmmGather`: the vLLM / S-LoRA-style baseline: every adapter padded to the layer's largest rank
  ``r_max``, per-token gathered ``A [T, r_max, in]`` and ``B [T, r_max, out]``, two batched matmuls, one add.
  Tokens with no adapter gather a zero slot (so ``y += 0`` leaves them bit-identical). It moves
  ``T * r_max * (in + out)`` weight elements: :meth:`BmmGather.workspace_bytes` says how much memory that is.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

__all__ = ["NaiveLoop", "BmmGather", "BASELINES"]


class NaiveLoop:
    """Per-adapter loop: ``h = x[idx] @ A^T * s``; ``y.index_add_(0, idx, h @ B^T)`` per adapter and slice.

    Args:
        weights: a :class:`~lora_kernels.LoRAWeights`.
        adapter_ids: int32/int64 [T] ids (-1 = none), any device (read once, on the host).

    Call as ``baseline(y, x)``: y [T, out] is updated in place and returned; x [T, in]. Ids of free slots
    and ids out of range are skipped (no delta), like the library.
    """

    name = "torch.naive_loop"

    def __init__(self, weights, adapter_ids: torch.Tensor):
        ids = adapter_ids.to("cpu", torch.int64)
        dev = weights.device
        loaded = set(weights.loaded)
        self.groups: List[Tuple[torch.Tensor, List[Tuple[int, int, torch.Tensor, torch.Tensor, float]]]] = []
        for i in torch.unique(ids).tolist():
            if i < 0 or i not in loaded:
                continue
            idx = (ids == i).nonzero().flatten().to(dev)
            slices = []
            for s in range(weights.num_slices):
                A, B, scale = weights.adapter(i, s)  # A [r, in], B [out_s, r] (views)
                slices.append((weights.slice_cols[s], weights.slice_outs[s], A, B.t(), scale))
            self.groups.append((idx, slices))
        self.full_width = weights.num_slices == 1

    def __call__(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for idx, slices in self.groups:
            xi = x.index_select(0, idx)
            for c0, n, A, Bt, scale in slices:
                h = (xi @ A.t()).mul_(scale)
                d = h @ Bt
                (y if self.full_width else y[:, c0 : c0 + n]).index_add_(0, idx, d)
        return y


class BmmGather:
    """Per-token gather of padded A/B, then ``bmm``: ``y += bmm(bmm(A[ids], x) * s[ids], B[ids])``.

    Args:
        weights: a :class:`~lora_kernels.LoRAWeights` (copied once into padded stacks ``[N + 1, r_max, .]``,
            the extra slot all zeros for tokens with no adapter).
        adapter_ids: int32/int64 [T] ids (-1 = none) on the weights' device.

    Call as ``baseline(y, x)`` (in place, returns y).
    """

    name = "torch.bmm_gather"

    def __init__(self, weights, adapter_ids: torch.Tensor):
        a_pad, b_pad = weights.to_padded()  # [S, N, r, in], [N, r, out]
        S, N, r, in_f = a_pad.shape
        dev, dt = weights.device, weights.dtype
        self.a = torch.cat([a_pad, torch.zeros(S, 1, r, in_f, dtype=dt, device=dev)], dim=1)
        self.b = torch.cat([b_pad, torch.zeros(1, r, b_pad.shape[2], dtype=dt, device=dev)], dim=0)
        self.scales = torch.cat([weights.scales, torch.zeros(S, 1, device=dev)], dim=1).to(dt)  # [S, N + 1]
        ids = adapter_ids.to(dev, torch.int64)
        self.idx = torch.where((ids >= 0) & (ids < N), ids, torch.full_like(ids, N))
        # Per-slice B stacks are contiguous so the per-token gather reads whole rows (as vLLM's stacks do).
        self.cols = list(zip(weights.slice_cols, weights.slice_outs))
        self.b_slices = [self.b[:, :, c0 : c0 + n].contiguous() for c0, n in self.cols]
        self.full_width = S == 1

    @staticmethod
    def workspace_bytes(weights, T: int) -> int:
        """Bytes of the per-token gathered A and B (what makes this baseline run out of memory first)."""
        es = torch.empty(0, dtype=weights.dtype).element_size()
        return T * weights.max_rank * (weights.num_slices * weights.in_features + weights.out_features) * es

    def __call__(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        xv = x.unsqueeze(-1)
        for s, (c0, n) in enumerate(self.cols):
            At = self.a[s].index_select(0, self.idx)  # [T, r, in]
            h = torch.bmm(At, xv)  # [T, r, 1]
            h = h * self.scales[s].index_select(0, self.idx).view(T, 1, 1)
            Bt = self.b_slices[s].index_select(0, self.idx)  # [T, r, n]
            d = torch.bmm(h.transpose(1, 2), Bt).squeeze(1)  # [T, n]
            if self.full_width:
                y += d
            else:
                y[:, c0 : c0 + n] += d
        return y


BASELINES = (NaiveLoop, BmmGather)
