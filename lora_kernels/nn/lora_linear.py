"""LoRALinear: a base linear layer plus the batched multi-adapter LoRA delta."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..batch import LoRABatch
from ..ops.lora_linear import _add, needs_grad
from ..ops.sgmv import _check_common, _check_x, add_lora_
from ..weights import LoRAWeights
from ._adapter_layer import check_layer_batch, forward_batch, layer_storage

__all__ = ["LoRALinear", "SERVING_MODES"]

SERVING_MODES = ("unmerged", "merged", "mixed")


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

    Serving modes (``self.mode``, ``self.merged_adapter``; set by :meth:`set_serving_mode`, normally through
    the mode controller in :mod:`lora_kernels.nn.modes`, which also merges/unmerges ``base``'s weight):

    * ``"unmerged"`` (default): ``base(x) + delta_{i_t}`` as above; ``base`` holds ``W0``.
    * ``"merged"``: ``base(x)`` only; ``base`` holds ``W0 + delta_m``. Right for batches whose tokens all use m
      (or, on a layer where m is not loaded, for batches of -1 tokens).
    * ``"mixed"``: ``base(x) + delta_{i_t} - delta_m`` (nothing for tokens of m) in the same launch(es) as
      unmerged (:func:`lora_kernels.add_lora_` with ``merged=m``); ``base`` holds ``W0 + delta_m``.

    Both are plain Python attributes: ``torch.compile`` guards on them, so a mode change recompiles the layer
    (once per distinct (mode, adapter); ``torch._dynamo.config.cache_size_limit`` bounds how many variants stay
    cached). CUDA graphs captured in one mode replay that mode: re-capture after a switch.

    Training: after ``layer.weights.requires_grad_()`` (or when x or the base output requires grad), forward in
    grad mode runs the differentiable :func:`lora_kernels.lora_linear` path: the segmented multi-adapter
    backward puts every adapter's gradient into ``weights.a.grad`` / ``weights.b.grad`` (rank-paged), so
    ``torch.optim.AdamW(layer.lora_parameters())`` steps all adapters at once; ``base`` is trained only if its
    parameters require grad. Without anything requiring grad (or under no_grad) it is the serving path above,
    unchanged. Training needs mode ``"unmerged"``.

    Raises:
        RuntimeError from forward when no batch is attached or current, or when the adapters require grad in
        grad mode while the layer is in mode ``"merged"`` / ``"mixed"``.
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
        weights = layer_storage(base, weights, LoRAWeights, "weights", max_adapters, max_rank, torch.float16)
        check_layer_batch(batch)
        self.base = base
        self.weights = weights
        self.batch = batch
        self.mode: str = "unmerged"
        self.merged_adapter: Optional[int] = None

    def set_serving_mode(self, mode: str, adapter: Optional[int] = None) -> None:
        """Set the flags forward reads (``self.mode``, ``self.merged_adapter``); touches no weight.

        Args:
            mode: ``"unmerged"`` (``adapter`` must be None), ``"merged"`` or ``"mixed"`` (``adapter`` required:
                the id merged into ``base``'s weight by the caller; for ``"mixed"`` it must be loaded in
                ``self.weights``, for ``"merged"`` any slot id, since a layer where it is not loaded has
                ``delta_m = 0``).

        Raises:
            ValueError naming ``mode`` or ``adapter``; the flags are unchanged when it raises.
        """
        if mode not in SERVING_MODES:
            raise ValueError(f"mode: expected one of {SERVING_MODES}, got {mode!r}")
        if mode == "unmerged":
            if adapter is not None:
                raise ValueError(f"adapter: expected None for mode 'unmerged', got {adapter!r}")
        else:
            n = self.weights.max_adapters
            if not isinstance(adapter, int) or isinstance(adapter, bool) or not 0 <= adapter < n:
                raise ValueError(f"adapter: expected an adapter id in [0, {n}) for mode {mode!r}, got {adapter!r}")
            if mode == "mixed" and adapter not in self.weights.loaded:
                raise ValueError(f"adapter: expected a loaded adapter for mode 'mixed', got {adapter} (free slot)")
        self.mode, self.merged_adapter = mode, adapter

    def lora_parameters(self):
        """``[weights.a, weights.b]``: the paged adapter tensors to hand to an optimiser (not registered as module
        parameters, so ``state_dict`` and ``parameters()`` are those of ``base``)."""
        return self.weights.parameters()

    @property
    def in_features(self) -> int:
        return self.weights.in_features

    @property
    def out_features(self) -> int:
        return self.weights.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = forward_batch(self.batch, "LoRALinear")
        grad = torch.is_grad_enabled()
        mode = self.mode
        if grad and mode != "unmerged" and self.weights.requires_grad:
            raise RuntimeError(f"LoRALinear: expected mode 'unmerged' to train the adapters (weights require grad), "
                               f"got {mode!r}; unmerge first, or freeze them with weights.requires_grad_(False)")
        y = self.base(x)
        if mode == "merged":  # base holds W0 + delta_m; every token is taken to use m
            return y
        x2 = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])  # (a 2-D x needs no view: ~1 us per call saved)
        if grad and mode == "unmerged" and needs_grad(x2, self.weights, y):  # (no_grad: skip the test, hot path)
            # training: the differentiable out-of-place op (segmented backward); the serving path below is
            # unchanged when nothing requires grad
            y2 = y.reshape(-1, y.shape[-1])
            _check_x(x2, self.weights)
            _check_common(self.weights, batch, x2.shape[0], x2.device)
            return _add(y2, x2, self.weights, batch).view(*y.shape)
        # reshape, not view: a base module may return a non-contiguous output; the delta is added to the
        # flattened (and, if its last dim is strided, compacted) tensor, which is returned in y's shape.
        y2 = y if y.ndim == 2 else y.reshape(-1, y.shape[-1])
        if y2.shape[-1] > 1 and y2.stride(-1) != 1:
            y2 = y2.contiguous()
        add_lora_(y2, x2, self.weights, batch, merged=self.merged_adapter if mode == "mixed" else None)
        return y2 if y2.ndim == y.ndim else y2.view(*y.shape)

    def extra_repr(self) -> str:
        mode = self.mode if self.mode == "unmerged" else f"{self.mode}, adapter={self.merged_adapter}"
        return f"weights={self.weights!r}, mode={mode}"
