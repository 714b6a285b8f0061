"""DualLoRALinear: a base linear layer plus the batched multi-adapter Dual-LoRA delta (trainable)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..batch import LoRABatch
from ..dual_weights import DualLoRAWeights
from ..ops.dual_lora import dual_lora
from ._adapter_layer import check_layer_batch, forward_batch, layer_storage

__all__ = ["DualLoRALinear"]


class DualLoRALinear(nn.Module):
    """``y = base(x) + s_i * B_i (ReLU(T_i x) * LN_r(A_i x))`` per token, ``i`` its adapter in the current batch.

    Args:
        base: a module mapping [..., in] -> [..., out] (an ``nn.Linear`` usually, frozen or not).
        w_dual: the layer's :class:`~lora_kernels.DualLoRAWeights`; created empty (base's dtype and device)
            from ``max_adapters`` / ``max_rank`` when omitted.
        batch: a fixed :class:`~lora_kernels.LoRABatch` to read; None (usual) reads
            :func:`lora_kernels.current_batch`.
        trainable: ``requires_grad`` of the adapter storage, which is always registered as parameters
            (``dual_a`` = stacked A/T rows, ``dual_b``, ``ln_weight``, ``ln_bias``); they share memory with
            ``w_dual``'s tensors (which are replaced by these Parameter objects, or kept when ``w_dual`` already
            holds Parameters of another DualLoRALinear), so gradients land in the paged layout and optimiser
            steps are seen by the kernels. Rows of free slots get zero gradients.

    Adapters: ``layer.new_adapter(rank, alpha)`` (A/T Kaiming-uniform, B = 0, LN weight 1 / bias 0, scale
    ``alpha / rank``) or ``layer.w_dual.add(A, T, B, ...)``. Tokens with id -1 get ``base(x)`` alone.

    Example::

        layer = DualLoRALinear(nn.Linear(64, 64), max_adapters=4, max_rank=8)
        i = layer.new_adapter(8, alpha=16)
        with lk.use_batch(lk.LoRABatch.from_ids(ids, 4, ranks=layer.w_dual.ranks)):
            y = layer(x)                   # y.sum().backward() fills layer.dual_a.grad, ...

    The forward is custom ops only (shape checks in Python), so ``torch.compile(model, fullgraph=True)``
    traces it; the batch and the weights are guarded by identity.

    Raises:
        TypeError / ValueError for mismatched arguments (ValueError also for a ``trainable`` that differs from the
        ``requires_grad`` of Parameters ``w_dual`` already holds); RuntimeError from forward when no batch is
        attached or current.
    """

    def __init__(
        self,
        base: nn.Module,
        w_dual: Optional[DualLoRAWeights] = None,
        *,
        batch: Optional[LoRABatch] = None,
        max_adapters: Optional[int] = None,
        max_rank: Optional[int] = None,
        trainable: bool = True,
    ):
        super().__init__()
        w_dual = layer_storage(base, w_dual, DualLoRAWeights, "w_dual", max_adapters, max_rank, torch.float32)
        check_layer_batch(batch)
        self.base = base
        self.w_dual = w_dual
        self.batch = batch
        # Parameters sharing the storage; the weights object then holds these very tensors.
        # A w_dual already wrapped by another DualLoRALinear keeps its Parameter objects (shared, like tied
        # weights): new ones would leave the first module's parameters out of the kernels' reads (no grads).
        def param(t: torch.Tensor, name: str) -> nn.Parameter:
            if isinstance(t, nn.Parameter):
                if t.requires_grad != bool(trainable):
                    raise ValueError(f"trainable: expected {t.requires_grad} (w_dual.{name} is already a Parameter of "
                                     f"another module with requires_grad={t.requires_grad}), got {trainable}")
                return t
            return nn.Parameter(t, requires_grad=trainable)

        self.dual_a = param(w_dual.a, "a")
        self.dual_b = param(w_dual.b, "b")
        self.ln_weight = param(w_dual.ln_weight, "ln_weight")
        self.ln_bias = param(w_dual.ln_bias, "ln_bias")
        w_dual.a, w_dual.b = self.dual_a, self.dual_b
        w_dual.ln_weight, w_dual.ln_bias = self.ln_weight, self.ln_bias

    def new_adapter(self, rank: int, alpha: Optional[float] = None, *, adapter_id: Optional[int] = None,
                    generator: Optional[torch.Generator] = None) -> int:
        """Create a fresh adapter (see :meth:`DualLoRAWeights.new_adapter`); returns its id."""
        return self.w_dual.new_adapter(rank, alpha, adapter_id=adapter_id, generator=generator)

    @property
    def in_features(self) -> int:
        return self.w_dual.in_features

    @property
    def out_features(self) -> int:
        return self.w_dual.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = forward_batch(self.batch, "DualLoRALinear")
        # The delta first: its checks name x (a wrong width would otherwise fail inside base with torch's text).
        delta = dual_lora(x.reshape(-1, x.shape[-1]), self.w_dual, batch)
        y = self.base(x)
        return y + delta.view(*y.shape[:-1], delta.shape[-1]).to(y.dtype)

    def extra_repr(self) -> str:
        return f"w_dual={self.w_dual!r}"
