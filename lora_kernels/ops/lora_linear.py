"""Differentiable batched LoRA: ``lora_delta`` and ``lora_linear`` with a segmented multi-adapter backward.

Semantics (token t with adapter ``i = adapter_ids[t]``, slice s, ``r = ranks[s, i]``, ``s_i = scales[s, i]``):

    lora_delta(x, w, batch)[t, cols_s]          = s_i * (x[t] A_{s,i}^T) B_{s,i}^T     (0 for i = -1)
    lora_linear(x, W0, bias, w, batch)[t]       = x[t] W0^T + bias + lora_delta(x, w, batch)[t]

Gradients, for the upstream gradient ``dy`` (``h = x A^T``, ``g = dy_s B``, per token):

    grad x[t]                          = dy[t] W0 + sum_s s_i * g[s, t] A_{s,i}
    grad A_{s,i} = grad a[s, off_i : off_i + r]        = s_i * sum_{t of i} g[s, t]^T x[t]
    grad B_{s,i}^T = grad b[off_i : off_i + r, cols_s] = s_i * sum_{t of i} h[s, t]^T dy[t, cols_s]

The adapter gradients land in the rank-paged storage itself: make ``w.a`` / ``w.b`` trainable leaves with
:meth:`LoRAWeights.requires_grad_ <lora_kernels.LoRAWeights.requires_grad_>` and ``w.a.grad`` [S, R, in] /
``w.b.grad`` [R, out] hold every adapter's gradient at once (rows of adapters absent from the batch, of free
slots and past a slice's rank are 0), so one optimiser step over ``w.parameters()`` updates every adapter.
W0 and bias get gradients only when they require grad (plain autograd of ``F.linear``: a frozen base weight
costs nothing).

Dispatch: when nothing requires grad (or grad mode is off) these are the serving path, exactly
:func:`lora_kernels.add_lora_` on a fresh output. Otherwise they call the custom op
``torch.ops.lora_kernels.lora_add`` (out of place ``y0 + delta``, fake impl for torch.compile) whose autograd
formula (``torch.library.register_autograd``) calls ``torch.ops.lora_kernels.lora_add_backward``: the
segmented Triton backward (:mod:`lora_kernels.triton.sgmv_backward`) on CUDA tensors, the reference
(:func:`lora_kernels.reference.lora_add_backward`) on CPU tensors. The backward recomputes ``h`` rather than
saving it; it saves x, the weights and the batch's ``meta``, so rebuilding the batch (or changing the weights
in place) between forward and backward raises autograd's in-place modification error instead of giving wrong
gradients. Double backward is not supported.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import backends, reference
from .._validation import FLOAT_DTYPES, check, check_tensor
from ..batch import LoRABatch
from ..profiling import nvtx_range
from ..weights import LoRAWeights
from .sgmv import _FLOATS, _check_common, _check_x, _common_ok, _inner_ok, add_lora_

__all__ = ["lora_delta", "lora_linear"]


def _triton_bwd():
    from ..triton import sgmv_backward  # imported on first use: importing lora_kernels never imports triton

    return sgmv_backward


def _triton_fwd():
    from ..triton import sgmv

    return sgmv


# ---- custom ops -----------------------------------------------------------------------------------------


@torch.library.custom_op("lora_kernels::lora_add", mutates_args=())
def _lora_add_op(
    y0: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor,
    ranks: torch.Tensor, scales: torch.Tensor, meta: torch.Tensor, slice_info: torch.Tensor,
    slice_cols: List[int], slice_outs: List[int], max_tokens: int, r_cap: int,
) -> torch.Tensor:
    T = x.shape[0]
    with nvtx_range("lora_kernels.lora_add"):
        if backends.select("sgmv", x.device.type) == "triton":
            out = y0.clone(memory_format=torch.contiguous_format)
            if T:
                _triton_fwd().add_lora_(out, x, a, b, offsets, ranks, scales, meta, max_tokens, slice_info, r_cap)
            return out
        return reference.lora_add(y0, x, a, b, offsets, ranks, scales, meta[:T], slice_cols,
                                  slice_outs).contiguous()


@_lora_add_op.register_fake
def _(y0, x, a, b, offsets, ranks, scales, meta, slice_info, slice_cols, slice_outs, max_tokens, r_cap):
    return torch.empty_like(y0, memory_format=torch.contiguous_format)


@torch.library.custom_op("lora_kernels::lora_add_backward", mutates_args=())
def _lora_add_backward_op(
    dy: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor,
    ranks: torch.Tensor, scales: torch.Tensor, meta: torch.Tensor, slice_info: torch.Tensor,
    slice_cols: List[int], slice_outs: List[int], max_tokens: int, r_cap: int,
    need_x: bool, need_a: bool, need_b: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = x.shape[0]
    with nvtx_range("lora_kernels.lora_add_backward"):
        if backends.select("sgmv", x.device.type) == "triton":
            return _triton_bwd().lora_backward(dy, x, a, b, offsets, ranks, scales, meta, max_tokens, slice_info,
                                               slice_cols, slice_outs, r_cap, need_x, need_a, need_b)
        return reference.lora_add_backward(dy, x, a, b, offsets, ranks, scales, meta[:T], slice_cols, slice_outs,
                                           need_x, need_a, need_b)


@_lora_add_backward_op.register_fake
def _(dy, x, a, b, offsets, ranks, scales, meta, slice_info, slice_cols, slice_outs, max_tokens, r_cap,
      need_x, need_a, need_b):
    return (x.new_empty(x.shape) if need_x else x.new_empty(0),
            a.new_empty(a.shape) if need_a else x.new_empty(0),
            b.new_empty(b.shape) if need_b else x.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    y0, x, a, b, offsets, ranks, scales, meta, slice_info, slice_cols, slice_outs, max_tokens, r_cap = inputs
    ctx.save_for_backward(x, a, b, offsets, ranks, scales, meta, slice_info)
    ctx.static = (list(slice_cols), list(slice_outs), max_tokens, r_cap)


def _backward(ctx, dy):
    x, a, b, offsets, ranks, scales, meta, slice_info = ctx.saved_tensors
    slice_cols, slice_outs, max_tokens, r_cap = ctx.static
    need_y0, need_x, need_a, need_b = ctx.needs_input_grad[:4]
    dx = da = db = None
    if need_x or need_a or need_b:
        # the kernels take strided rows but need unit column stride; contiguous() is free when it already is
        dx, da, db = torch.ops.lora_kernels.lora_add_backward(
            dy.contiguous(), x, a, b, offsets, ranks, scales, meta, slice_info, slice_cols, slice_outs, max_tokens,
            r_cap, need_x, need_a, need_b)
    return ((dy if need_y0 else None), (dx if need_x else None), (da if need_a else None), (db if need_b else None),
            None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("lora_kernels::lora_add", _backward, setup_context=_setup_context)


# ---- public API -----------------------------------------------------------------------------------------


def needs_grad(x: torch.Tensor, weights: LoRAWeights, *others: Optional[torch.Tensor]) -> bool:
    """True when autograd would record the delta: grad mode is on and x, ``weights.a`` / ``weights.b`` or one
    of ``others`` requires grad (the serving path is taken otherwise)."""
    if not torch.is_grad_enabled():
        return False
    return (x.requires_grad or weights.a.requires_grad or weights.b.requires_grad
            or any(t is not None and t.requires_grad for t in others))


def _add(y0: torch.Tensor, x: torch.Tensor, weights: LoRAWeights, batch: LoRABatch) -> torch.Tensor:
    """``y0 + delta`` (validated by the caller). Differentiable when something requires grad; otherwise y0 is
    a fresh tensor the serving op adds into in place."""
    if needs_grad(x, weights, y0):
        return torch.ops.lora_kernels.lora_add(
            y0, x, weights.a, weights.b, weights.offsets, weights.ranks, weights.scales, batch.meta,
            weights.slice_info, list(weights.slice_cols), list(weights.slice_outs), batch.max_tokens,
            weights.max_rank)
    return add_lora_(y0, x, weights, batch)


def lora_delta(x: torch.Tensor, weights: LoRAWeights, batch: LoRABatch) -> torch.Tensor:
    """The batched LoRA delta as a new tensor, differentiable in x, ``weights.a`` and ``weights.b``.

    Semantics: ``out[t, cols_s] = scales[s, i] * (x[t] A_{s,i}^T) B_{s,i}^T`` for token t of adapter i (0 for
    tokens with -1), formed in fp32 and rounded once into x's dtype; gradients as in the module docstring.

    Args:
        x: [T, in] fp16/bf16/fp32, rows may be strided, last dim unit-stride.
        weights: the layer's :class:`~lora_kernels.LoRAWeights` (``requires_grad_()`` to train the adapters).
        batch: a :class:`~lora_kernels.LoRABatch` built for these T tokens.

    Returns:
        [T, weights.out_features] in x's dtype.

    Raises:
        TypeError / ValueError naming the argument (as :func:`lora_kernels.add_lora_`), before anything runs.
    """
    _check_x(x, weights)
    _check_common(weights, batch, x.shape[0], x.device)
    y0 = torch.zeros(x.shape[0], weights.out_features, dtype=x.dtype, device=x.device)
    return _add(y0, x, weights, batch)


def _lora_linear_args_ok(x, W0, bias, weights, batch) -> bool:
    """True when every argument check of :func:`lora_linear` passes (one predicate over the same facts: the
    per-call host budget is 10 us); False sends the call through the detailed checks."""
    if not (isinstance(weights, LoRAWeights) and isinstance(x, torch.Tensor) and isinstance(W0, torch.Tensor)):
        return False
    dev, dt, in_f, out = x.device, x.dtype, weights.in_features, sum(weights.slice_outs)
    if not (dt in _FLOATS and x.ndim >= 1 and x.shape[-1] == in_f and _inner_ok(x) and W0.dtype == dt
            and W0.ndim == 2 and W0.shape[0] == out and W0.shape[1] == in_f and W0.device == dev):
        return False
    if bias is not None and not (isinstance(bias, torch.Tensor) and bias.dtype == dt and bias.ndim == 1
                                 and bias.shape[0] == out and bias.device == dev):
        return False
    return _common_ok(weights, batch, x.numel() // in_f, dev)


def lora_linear(
    x: torch.Tensor,
    W0: torch.Tensor,
    bias: Optional[torch.Tensor],
    weights: LoRAWeights,
    batch: LoRABatch,
) -> torch.Tensor:
    """``F.linear(x, W0, bias) + lora_delta(x, weights, batch)``: the base GEMM plus the multi-adapter delta,
    with autograd for x, the adapters (``weights.a`` / ``weights.b``), and W0 / bias when they require grad.

    Semantics: ``y[t] = x[t] W0^T + bias + s_i (x[t] A_i^T) B_i^T`` (delta added in fp32 to the base output and
    rounded once); x's leading dims are flattened to T tokens and restored on the output.

    Args:
        x: [..., in] fp16/bf16/fp32 (T = product of the leading dims, as the batch was built for).
        W0: [out, in], x's dtype and device (frozen unless it requires grad).
        bias: None or [out], x's dtype.
        weights: :class:`~lora_kernels.LoRAWeights` with ``in_features == in``, ``out_features == out``.
        batch: :class:`~lora_kernels.LoRABatch` built for the T tokens.

    Returns:
        [..., out] in x's dtype.

    Raises:
        TypeError / ValueError naming the argument before anything runs (wrong types, dtypes, shapes, devices;
        the checks of :func:`lora_delta`).
    """
    if not _lora_linear_args_ok(x, W0, bias, weights, batch):  # the detailed checks, which raise naming the argument
        check(isinstance(weights, LoRAWeights), "weights", "a LoRAWeights", type(weights).__name__, TypeError)
        check_tensor("x", x, dtypes=FLOAT_DTYPES, device=weights.device, inner_contiguous=True)
        check(x.ndim >= 1 and x.shape[-1] == weights.in_features, "x",
              f"shape (..., {weights.in_features}) (weights.in_features)", tuple(x.shape))
        check_tensor("W0", W0, shape=(weights.out_features, weights.in_features), dtypes=(x.dtype,), device=x.device)
        if bias is not None:
            check_tensor("bias", bias, shape=(weights.out_features,), dtypes=(x.dtype,), device=x.device)
        _check_common(weights, batch, x.reshape(-1, x.shape[-1]).shape[0], x.device)
    if x.ndim == 2:  # no flattening views on the common 2-D call (~1 us each)
        return _add(F.linear(x, W0, bias), x, weights, batch)
    x2 = x.reshape(-1, x.shape[-1])
    y0 = F.linear(x2, W0, bias)
    return _add(y0, x2, weights, batch).view(*x.shape[:-1], weights.out_features)
