"""LoRALinear: a base linear layer plus the batched multi-adapter LoRA delta."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..batch import LoRABatch
from ..context import current_batch
from ..ops.sgmv import add_lora_
from ..weights import LoRAWeights

__all__ = ["LoRALinear"]


class LoRALinear(nn.Module):
    """``y = base(x) + delta``, where token t gets adapter ``batch.token_adapter[t]``'s LoRA delta.

    Semantics:
        For x [..., in] flattened to T tokens: ``y[t] = base(x[t]) + s_i * (x[t] A_i^T) B_i^T`` with
        ``i`` the token's adapter id in the current batch (nothing added for ``-1``). With a fused group of
        weights (several slices), ``base`` produces the concatenated output and slice s adds into its columns.

    Args:
        base: any module mapping [..., in] -> [..., out] (an ``nn.Linear``, or a quantised linear with the same
            contract). Its parameters are used as they are (frozen or not).
        weights: the layer's :class:`~lora_kernels.LoRAWeights` (``in_features``/``out_features`` must match).
            Created empty from ``max_adapters``/``max_rank`` when omitted.
        batch: a :class:`~lora_kernels.LoRABatch` this layer always reads; when None (the usual case, one batch
            per model) the layer reads :func:`lora_kernels.current_batch`.

    The batch is a fixed-capacity object rebuilt in place each step, so ``torch.compile(model,
    fullgraph=True)`` traces the layer once (the batch and weights are guarded by identity) and CUDA graphs
    replay it with new adapter ids.

    Raises:
        RuntimeError from forward when no batch is attached or current.
    """

    def __init__(
        self,
        base: nn.Module,
        weights: Optional[LoRAWeights] = None,
        *,
        batch: Optional[LoRABatch] = None,
        max_adapters: Optional[int] = None,
        max_rank: Optional[int] = None,
    ):
        super().__init__()
        in_f = getattr(base, "in_features", None)
        out_f = getattr(base, "out_features", None)
        if weights is None:
            if None in (in_f, out_f, max_adapters, max_rank):
                raise ValueError("weights: expected a LoRAWeights, or base with in/out_features plus max_adapters and "
                                 f"max_rank, got weights=None, max_adapters={max_adapters}, max_rank={max_rank}")
            p = next(base.parameters(), None)
            weights = LoRAWeights(in_f, out_f, max_adapters, max_rank,
                                  dtype=p.dtype if p is not None and p.is_floating_point() else torch.float16,
                                  device=p.device if p is not None else "cpu")
        if not isinstance(weights, LoRAWeights):
            raise TypeError(f"weights: expected a LoRAWeights, got {type(weights).__name__}")
        if in_f is not None and in_f != weights.in_features:
            raise ValueError(f"weights: expected in_features {in_f} (base.in_features), got {weights.in_features}")
        if out_f is not None and out_f != weights.out_features:
            raise ValueError(f"weights: expected out_features {out_f} (base.out_features), got {weights.out_features}")
        if batch is not None and not isinstance(batch, LoRABatch):
            raise TypeError(f"batch: expected a LoRABatch or None, got {type(batch).__name__}")
        self.base = base
        self.weights = weights
        self.batch = batch

    @property
    def in_features(self) -> int:
        return self.weights.in_features

    @property
    def out_features(self) -> int:
        return self.weights.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.batch if self.batch is not None else current_batch()
        if batch is None:
            raise RuntimeError("LoRALinear: no LoRABatch; pass batch= to the layer or run under lk.use_batch(batch) "
                               "(a batch of all -1 ids serves the base layer alone)")
        y = self.base(x)
        x2 = x.reshape(-1, x.shape[-1])
        # reshape, not view: a base module may return a non-contiguous output; the delta is added to the
        # flattened (and, if its last dim is strided, compacted) tensor, which is returned in y's shape.
        y2 = y.reshape(-1, y.shape[-1])
        if y2.shape[-1] > 1 and y2.stride(-1) != 1:
            y2 = y2.contiguous()
        add_lora_(y2, x2, self.weights, batch)
        return y2.view(*y.shape)

    def extra_repr(self) -> str:
        return f"weights={self.weights!r}"
