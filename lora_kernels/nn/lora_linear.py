"""LoRALinear: a base linear layer plus the batched multi-adapter LoRA delta."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import backends
from ..batch import LoRABatch
from ..ops import sgmv as _sgmv
from ..ops.lora_linear import _add, needs_grad
from ..ops.sgmv import _check_common, _check_x, add_lora_
from ..plan import FUSED_COUNTERS, fused_counters
from ..weights import LoRAWeights
from ._adapter_layer import check_layer_batch, forward_batch, layer_storage

__all__ = ["LoRALinear", "SERVING_MODES"]

SERVING_MODES = ("unmerged", "merged", "mixed")


# ---- the compiled fused LoRA linear (csrc/fused_lora_linear.cu) ---------------------------------------------
# A decode step (T <= 64 tokens) of a layer whose base is a plain nn.Linear runs y = x W0^T (+ bias) + delta in ONE
# launch (the base GEMV and the multi-LoRA delta fused, y written and rounded once) instead of base(x) + add_lora_,
# but only where `lora-bench tune` verified it on this GPU model ("fused_linear_cuda" in tuning.verified_kernels),
# in plain eager calls (lora_kernels.ops.sgmv._eager: torch.compile / export / fake tensors trace the unfused path)
# with nothing needing grad, no autocast (it would change base(x)'s dtype), the backend automatic, x, W0, bias and
# the adapters of one dtype (the instantiations built), no hooks on the base (the fused path never calls it), and
# the weights within the kernel's limits.
# Otherwise nothing changes. Its workspace: fp32 partial sums, h and the base copy in the batch's workspace
# (contents irrelevant) and int32 counters that must be zero between calls (the kernel resets them): the batch's
# plan (lora_kernels.plan.fused_counters), so one batch per stream, as for the decode kernel.
_FUSED_KERNEL = "fused_linear_cuda"
_FUSED_MAX_T, _FUSED_MAX_S, _FUSED_MAX_RANK, _FUSED_CHUNK, _FUSED_TILE = 64, 8, 256, 256, 8  # kernel's limits
_FUSED_DEVICE_TYPE = "cuda"  # the device type the gate accepts (a CPU test points it at "cpu" to prove the gate)


def _base_is_plain_linear(base: nn.Module) -> bool:
    """True when ``base(x)`` is exactly ``x W^T + b`` of an ``nn.Linear`` (not a subclass, e.g. a quantised one)
    whose call runs no hooks: the fused path computes it without calling the module."""
    mm = nn.modules.module
    return (type(base) is nn.Linear and not base._forward_hooks and not base._forward_pre_hooks
            and not mm._global_forward_hooks and not mm._global_forward_pre_hooks)


def _fused_op(layer: "LoRALinear", x2: torch.Tensor, batch):
    """``torch.ops.lora_kernels_C.fused_lora_linear_`` when it may serve this forward (see above), else None.
    Cheap checks first: this runs on every call."""
    T, w = x2.shape[0], layer.weights
    if x2.device.type != _FUSED_DEVICE_TYPE or not 1 <= T <= _FUSED_MAX_T or not _base_is_plain_linear(layer.base):
        return None
    from .. import _ext, tuning

    if _FUSED_KERNEL not in tuning.verified_kernels(x2.device):  # (a cached set: until tune verifies it, stop here)
        return None
    w0, bias = layer.base.weight, layer.base.bias
    if (x2.dtype != w0.dtype or w.a.dtype != w0.dtype or (bias is not None and bias.dtype != w0.dtype)
            or w0.device != x2.device or w.num_slices > _FUSED_MAX_S or w.max_rank > _FUSED_MAX_RANK
            or tuple(w0.shape) != (w.out_features, w.in_features) or (w.in_features > 1 and w0.stride(1) != 1)
            or 1 + -(-w.out_features // _FUSED_TILE) > FUSED_COUNTERS or backends.forced() is not None
            or needs_grad(x2, w, w0, bias) or torch.is_autocast_enabled(x2.device.type)
            or not _sgmv._eager(x2, w0, w.a, w.b)
            or not (_sgmv._x_ok(x2, w) and _sgmv._common_ok(w, batch, T, x2.device))):
        return None
    ext = _ext.get()
    return getattr(ext, "fused_lora_linear_", None) if ext is not None else None


def _fused_ws_floats(T: int, in_f: int, out_f: int, num_slices: int, r_cap: int, merged: int) -> int:
    """fp32 elements of the fused kernel's workspace: partial sums T * S * ceil(in / 256) * rows, h T * S * rows
    and the base copy T * out, with rows = r_cap (2 r_cap in mixed mode)."""
    rows = r_cap * (2 if merged >= 0 else 1)
    return T * num_slices * rows * (-(-in_f // _FUSED_CHUNK) + 1) + T * out_f


def _fused_(op, layer: "LoRALinear", x2: torch.Tensor, batch, merged: int) -> torch.Tensor:
    """One launch of the fused kernel: a fresh y [T, out] = base(x2) + delta (``merged``: mixed mode's id or -1)."""
    w, base = layer.weights, layer.base
    T = x2.shape[0]
    y = torch.empty(T, w.out_features, dtype=x2.dtype, device=x2.device)
    n = _fused_ws_floats(T, w.in_features, w.out_features, w.num_slices, w.max_rank, merged)
    ws = batch.workspace(4 * n)[: 4 * n].view(torch.float32)
    op(y, x2, base.weight, base.bias, w.a, w.b, w.offsets, w.ranks, w.scales, batch.meta[:T], list(w.slice_outs),
       w.max_rank, merged, ws, fused_counters(batch.plan))
    return y


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
        if mode == "merged":  # base holds W0 + delta_m; every token is taken to use m
            return self.base(x)
        x2 = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])  # (a 2-D x needs no view: ~1 us per call saved)
        op = _fused_op(self, x2, batch)  # a decode step may take the compiled fused kernel (GEMV + delta, 1 launch)
        if op is not None:
            y = _fused_(op, self, x2, batch, self.merged_adapter if mode == "mixed" else -1)
            return y if x.ndim == 2 else y.view(*x.shape[:-1], y.shape[-1])
        y = self.base(x)
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
