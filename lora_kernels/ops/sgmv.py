"""The batched LoRA delta (SGMV family): ``shrink``, ``expand_`` and the fused ``add_lora_``.

Semantics (per token t with adapter ``i = adapter_ids[t]``, every slice s of the weights):

    shrink:    h[s, t, :r]   = x[t] @ A_{s,i}^T                    (fp32; 0 past the rank and for i = -1)
    expand_:   y[t, cols_s] += scales[s, i] * h[s, t, :r] @ B_{s,i}^T
    add_lora_: y[t, cols_s] += scales[s, i] * (x[t] @ A_{s,i}^T) @ B_{s,i}^T

with ``r = ranks[s, i]``; tokens with ``i = -1`` (and adapters of rank 0) leave y untouched. Sums are formed in
fp32 and rounded once into y's dtype. See :mod:`lora_kernels.reference` for the executable spec.

Each public function validates its arguments in Python (no device reads), then calls a custom op
``torch.ops.lora_kernels.<name>`` (declared mutating where it writes in place, with a fake impl for
torch.compile) whose implementation is chosen by :mod:`lora_kernels.backends`: Triton on CUDA tensors, the
reference on CPU tensors (or Triton under ``TRITON_INTERPRET=1`` when forced).
"""

from __future__ import annotations

import torch

from .. import backends, reference
from .._validation import FLOAT_DTYPES, check, check_tensor
from ..batch import LoRABatch
from ..profiling import nvtx_range
from ..weights import LoRAWeights

__all__ = ["shrink", "expand_", "add_lora_"]


def _triton():
    from ..triton import sgmv  # imported on first use: importing lora_kernels never imports triton

    return sgmv


# ---- custom ops -----------------------------------------------------------------------------------------


@torch.library.custom_op("lora_kernels::shrink", mutates_args=())
def _shrink_op(
    x: torch.Tensor, a: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor, meta: torch.Tensor,
    max_tokens: int, r_cap: int,
) -> torch.Tensor:
    S, T = a.shape[0], x.shape[0]
    with nvtx_range("lora_kernels.shrink"):
        if backends.select("sgmv", x.device.type) == "triton":
            h = torch.empty(S, T, r_cap, dtype=torch.float32, device=x.device)
            _triton().shrink(x, a, offsets, ranks, meta, max_tokens, h)
            return h
        return reference.shrink(x, a, offsets, ranks, meta[:T], r_cap)


@_shrink_op.register_fake
def _(x, a, offsets, ranks, meta, max_tokens, r_cap):
    return x.new_empty((a.shape[0], x.shape[0], r_cap), dtype=torch.float32)


@torch.library.custom_op("lora_kernels::expand_", mutates_args=("y",))
def _expand_op(
    y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor,
    scales: torch.Tensor, meta: torch.Tensor, slice_info: torch.Tensor, max_tokens: int,
) -> None:
    with nvtx_range("lora_kernels.expand_"):
        if backends.select("sgmv", y.device.type) == "triton":
            _triton().expand_(y, h, b, offsets, ranks, scales, meta, max_tokens, slice_info)
        else:
            cols, outs = slice_info.to("cpu").t().tolist()
            reference.expand_(y, h, b, offsets, ranks, scales, meta[: y.shape[0]], cols, outs)


@_expand_op.register_fake
def _(y, h, b, offsets, ranks, scales, meta, slice_info, max_tokens):
    return None


@torch.library.custom_op("lora_kernels::add_lora_", mutates_args=("y",))
def _add_lora_op(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor,
    ranks: torch.Tensor, scales: torch.Tensor, meta: torch.Tensor, slice_info: torch.Tensor,
    max_tokens: int, r_cap: int,
) -> None:
    with nvtx_range("lora_kernels.add_lora_"):
        if backends.select("sgmv", y.device.type) == "triton":
            _triton().add_lora_(y, x, a, b, offsets, ranks, scales, meta, max_tokens, slice_info, r_cap)
        else:
            cols, outs = slice_info.to("cpu").t().tolist()
            reference.add_lora_(y, x, a, b, offsets, ranks, scales, meta[: x.shape[0]], cols, outs)


@_add_lora_op.register_fake
def _(y, x, a, b, offsets, ranks, scales, meta, slice_info, max_tokens, r_cap):
    return None


# ---- validation -----------------------------------------------------------------------------------------


def _check_common(weights: LoRAWeights, batch: LoRABatch, T: int, dev: torch.device) -> None:
    check(isinstance(weights, LoRAWeights), "weights", "a LoRAWeights", type(weights).__name__, TypeError)
    check(isinstance(batch, LoRABatch), "batch", "a LoRABatch", type(batch).__name__, TypeError)
    check(batch.num_tokens == T, "batch", f"a batch built for {T} tokens (x/y have {T} rows)",
          f"{batch.num_tokens} tokens")
    check(batch.max_adapters <= weights.max_adapters, "batch",
          f"max_adapters <= weights.max_adapters={weights.max_adapters} (ids must name slots of the weights)",
          batch.max_adapters)
    check(batch.device == dev or (batch.device.type == dev.type == "cuda" and
                                  (batch.device.index or 0) == (dev.index or 0)),
          "batch", f"metadata on {dev}", batch.device)
    check(weights.device.type == dev.type and (dev.type != "cuda" or (weights.device.index or 0) == (dev.index or 0)),
          "weights", f"storage on {dev}", weights.device)


def _check_x(x: torch.Tensor, weights: LoRAWeights) -> None:
    check(isinstance(weights, LoRAWeights), "weights", "a LoRAWeights", type(weights).__name__, TypeError)
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, device=weights.device, inner_contiguous=True)
    check(x.shape[1] == weights.in_features, "x", f"shape (T, {weights.in_features}) (weights.in_features)",
          tuple(x.shape))


def _check_y(y: torch.Tensor, weights: LoRAWeights, T: int, dev: torch.device) -> None:
    check_tensor("y", y, ndim=2, dtypes=FLOAT_DTYPES, device=dev, inner_contiguous=True)
    check(tuple(y.shape) == (T, weights.out_features), "y",
          f"shape ({T}, {weights.out_features}) (T, sum of the slices' out_features {list(weights.slice_outs)})",
          tuple(y.shape))


def _check_no_overlap(y: torch.Tensor, other: torch.Tensor, name: str) -> None:
    if torch.compiler.is_compiling():  # fake tensors have no storage; eager calls are checked
        return
    if y.numel() == 0 or other.numel() == 0 or y.device != other.device:
        return
    ys, ye = y.data_ptr(), y.data_ptr() + _span(y)
    os_, oe = other.data_ptr(), other.data_ptr() + _span(other)
    check(ye <= os_ or oe <= ys, "y", f"memory disjoint from {name} (the op writes y while reading {name})",
          "overlapping storage")


def _check_no_grad(*tensors: torch.Tensor) -> None:
    # The ops have no autograd formula yet (the segmented backward is planned with lora_linear): rather than
    # return gradients that silently miss the LoRA term, refuse to run where autograd would record them.
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            "x/y: expected tensors that do not require grad (the LoRA ops have no backward yet); run under "
            "torch.no_grad() or torch.inference_mode(), or detach the inputs"
        )


def _span(t: torch.Tensor) -> int:
    return (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) * t.element_size()


# ---- public API -----------------------------------------------------------------------------------------


def shrink(x: torch.Tensor, weights: LoRAWeights, batch: LoRABatch) -> torch.Tensor:
    """``h = shrink(x, weights, batch)``: the first SGMV half (see the module docstring).

    Args:
        x: [T, in] fp16/bf16/fp32, rows may be strided, last dim unit-stride.
        weights: :class:`~lora_kernels.LoRAWeights` with ``in_features == in``.
        batch: :class:`~lora_kernels.LoRABatch` built for these T tokens.

    Returns:
        h: fp32 [S, T, weights.max_rank]; zero past each token's rank and for tokens with no adapter.

    Raises:
        TypeError / ValueError naming the argument, before anything runs.
    """
    _check_x(x, weights)
    _check_common(weights, batch, x.shape[0], x.device)
    _check_no_grad(x)
    return torch.ops.lora_kernels.shrink(x, weights.a, weights.offsets, weights.ranks, batch.meta,
                                         batch.max_tokens, weights.max_rank)


def expand_(y: torch.Tensor, h: torch.Tensor, weights: LoRAWeights, batch: LoRABatch) -> torch.Tensor:
    """``expand_(y, h, weights, batch)``: ``y[t, cols_s] += s * h[s, t, :r] @ B^T`` in place; returns y.

    Args:
        y: [T, sum(out_s)] fp16/bf16/fp32 (rows may be strided).
        h: fp32 [S, T, weights.max_rank], e.g. from :func:`shrink`.
    """
    check(isinstance(weights, LoRAWeights), "weights", "a LoRAWeights", type(weights).__name__, TypeError)
    check_tensor("y", y, ndim=2, dtypes=FLOAT_DTYPES, device=weights.device)
    T = y.shape[0]
    _check_y(y, weights, T, y.device)
    _check_common(weights, batch, T, y.device)
    check_tensor("h", h, shape=(weights.num_slices, T, weights.max_rank), dtypes=(torch.float32,), device=y.device)
    check(h.is_contiguous(), "h", "a contiguous tensor", f"strides {h.stride()}")
    _check_no_overlap(y, h, "h")
    _check_no_grad(y, h)
    if T == 0:
        return y
    torch.ops.lora_kernels.expand_(y, h, weights.b, weights.offsets, weights.ranks, weights.scales, batch.meta,
                                   weights.slice_info, batch.max_tokens)
    return y


def add_lora_(y: torch.Tensor, x: torch.Tensor, weights: LoRAWeights, batch: LoRABatch) -> torch.Tensor:
    """``add_lora_(y, x, weights, batch)``: ``y[t, cols_s] += s_i * (x[t] @ A_i^T) @ B_i^T`` in place.

    Args:
        y: [T, sum(out_s)] fp16/bf16/fp32, e.g. the base layer's output (rows may be strided).
        x: [T, in], same device; dtype may differ from y and from the weights (all accumulate in fp32).
        weights: the layer's :class:`~lora_kernels.LoRAWeights` (one or several slices).
        batch: :class:`~lora_kernels.LoRABatch` built for these T tokens.

    Returns:
        y. An empty batch (T = 0) is a no-op.

    Raises:
        TypeError / ValueError naming the argument (wrong type, dtype, device, shape, strides, a batch built for
        another T or for more adapter slots than the weights have, y overlapping x); RuntimeError when x or y
        requires grad under grad mode (no backward yet). y is unchanged when it raises.
    """
    _check_x(x, weights)
    T = x.shape[0]
    _check_y(y, weights, T, x.device)
    _check_common(weights, batch, T, x.device)
    _check_no_overlap(y, x, "x")
    _check_no_grad(x, y)
    if T == 0:
        return y
    torch.ops.lora_kernels.add_lora_(y, x, weights.a, weights.b, weights.offsets, weights.ranks, weights.scales,
                                     batch.meta, weights.slice_info, batch.max_tokens, weights.max_rank)
    return y
