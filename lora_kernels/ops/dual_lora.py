"""Dual-LoRA delta, multi-adapter: ``dual_lora_`` (in place, inference) and ``dual_lora`` (functional, autograd).

Semantics (per token t with adapter ``i = adapter_ids[t]``, rank r, scale ``s = alpha / r``):

    y[t] += s * B_i ( ReLU(T_i x[t]) * LN_r(A_i x[t]) )

with ``LN_r`` the LayerNorm over the r features (biased variance, ``w_dual.eps``, affine ``ln_weight`` /
``ln_bias`` of the adapter). Tokens with -1 (and rank-0 slots) get nothing. Sums are formed in fp32 and
rounded once into y's dtype. The storage is :class:`~lora_kernels.DualLoRAWeights`; the spec is
:func:`lora_kernels.reference.dual_lora_delta`.

Dispatch (:mod:`lora_kernels.backends`, family ``"dual"``): Triton on CUDA tensors (a fused shrink over the
stacked [A; T] rows with the LayerNorm + ReLU gate as an epilogue, then the SGMV expand; see
:mod:`lora_kernels.triton.dual_lora`), the reference on CPU tensors (Triton under ``TRITON_INTERPRET=1`` when
forced). The backward follows the same backend: Triton/SGMV kernels plus a sync-free torch elementwise step,
or autograd through the reference.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .. import backends, reference
from .._validation import FLOAT_DTYPES, check, check_tensor
from ..batch import LoRABatch
from ..dual_weights import DualLoRAWeights
from ..profiling import nvtx_range
from .sgmv import _check_out_disjoint

__all__ = ["dual_lora_", "dual_lora"]


def _triton():
    from ..triton import dual_lora  # imported on first use: importing lora_kernels never imports triton

    return dual_lora


# ---- custom ops -----------------------------------------------------------------------------------------


@torch.library.custom_op("lora_kernels::dual_lora_", mutates_args=("y",))
def _dual_lora_inplace_op(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor,
    offsets: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor, meta: torch.Tensor, slice_info: torch.Tensor,
    max_tokens: int, r_cap: int, eps: float,
) -> None:
    with nvtx_range("lora_kernels.dual_lora_"):
        if backends.select("dual", y.device) == "triton":
            _triton().dual_lora_(y, x, a, b, ln_w, ln_b, offsets, ranks, scales, meta, max_tokens, slice_info,
                                 r_cap, eps)
        else:
            reference.dual_lora_(y, x, a, b, ln_w, ln_b, offsets, ranks, scales, meta[: x.shape[0]], eps)


@_dual_lora_inplace_op.register_fake
def _(y, x, a, b, ln_w, ln_b, offsets, ranks, scales, meta, slice_info, max_tokens, r_cap, eps):
    return None


@torch.library.custom_op("lora_kernels::dual_lora", mutates_args=())
def _dual_lora_op(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor,
    offsets: torch.Tensor, ranks: torch.Tensor, ranks2: torch.Tensor, scales: torch.Tensor, meta: torch.Tensor,
    slice_info: torch.Tensor, in_slice_info: torch.Tensor, max_tokens: int, r_cap: int, eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(delta [T, out] in x's dtype, uv fp32 [T, 2 r_cap])``; uv (``[A x, T x]`` packed per token)
    is saved for the backward."""
    T = x.shape[0]
    with nvtx_range("lora_kernels.dual_lora"):
        uv = torch.zeros(T, 2 * r_cap, dtype=torch.float32, device=x.device)
        if backends.select("dual", x.device) == "triton":
            delta = torch.zeros(T, b.shape[1], dtype=x.dtype, device=x.device)
            _triton().dual_lora_(delta, x, a, b, ln_w, ln_b, offsets, ranks, scales, meta, max_tokens, slice_info,
                                 r_cap, eps, uv=uv)
            return delta, uv
        tok = meta[:T]
        delta = reference.dual_lora_delta(x, a, b, ln_w, ln_b, offsets, ranks, scales, tok, eps).to(x.dtype)
        uv.copy_(reference.shrink(x, a, offsets, ranks2, tok, 2 * r_cap)[0])
        return delta, uv


@_dual_lora_op.register_fake
def _(x, a, b, ln_w, ln_b, offsets, ranks, ranks2, scales, meta, slice_info, in_slice_info, max_tokens, r_cap, eps):
    T = x.shape[0]
    return x.new_empty((T, b.shape[1])), x.new_empty((T, 2 * r_cap), dtype=torch.float32)


@torch.library.custom_op("lora_kernels::dual_lora_backward", mutates_args=())
def _dual_lora_backward_op(
    dy: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor,
    uv: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor, ranks2: torch.Tensor, scales: torch.Tensor,
    meta: torch.Tensor, in_slice_info: torch.Tensor, max_tokens: int, r_cap: int, eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, grad_a, grad_b, grad_ln_w, grad_ln_b)``: dense over the storage rows (0 outside the batch's
    adapters), each in its input's dtype."""
    with nvtx_range("lora_kernels.dual_lora_backward"):
        if backends.select("dual", x.device) == "triton":
            return _triton().dual_lora_backward(dy, x, a, b, ln_w, ln_b, uv, offsets, ranks, ranks2, scales, meta,
                                                max_tokens, in_slice_info, r_cap, eps)
        return reference.dual_lora_backward(dy, x, a, b, ln_w, ln_b, uv, offsets, ranks, ranks2, scales,
                                            meta[: x.shape[0]], r_cap, eps)


@_dual_lora_backward_op.register_fake
def _(dy, x, a, b, ln_w, ln_b, uv, offsets, ranks, ranks2, scales, meta, in_slice_info, max_tokens, r_cap, eps):
    return (torch.empty_like(x), torch.empty_like(a), torch.empty_like(b), torch.empty_like(ln_w),
            torch.empty_like(ln_b))


def _setup_context(ctx, inputs, output):
    x, a, b, ln_w, ln_b, offsets, ranks, ranks2, scales, meta, _, in_slice_info, max_tokens, r_cap, eps = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, a, b, ln_w, ln_b, output[1], offsets, ranks, ranks2, scales, meta, in_slice_info)
    ctx.max_tokens, ctx.r_cap, ctx.eps = max_tokens, r_cap, eps


def _backward(ctx, grad_delta, grad_uv):
    x, a, b, ln_w, ln_b, uv, offsets, ranks, ranks2, scales, meta, in_slice_info = ctx.saved_tensors
    dx, ga, gb, gw, gbias = torch.ops.lora_kernels.dual_lora_backward(
        grad_delta, x, a, b, ln_w, ln_b, uv, offsets, ranks, ranks2, scales, meta, in_slice_info, ctx.max_tokens,
        ctx.r_cap, ctx.eps)
    return dx, ga, gb, gw, gbias, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("lora_kernels::dual_lora", _backward, setup_context=_setup_context)


# ---- validation -----------------------------------------------------------------------------------------


def _check_args(x: torch.Tensor, w_dual: DualLoRAWeights, batch: LoRABatch) -> None:
    check(isinstance(w_dual, DualLoRAWeights), "w_dual", "a DualLoRAWeights", type(w_dual).__name__, TypeError)
    check(isinstance(batch, LoRABatch), "batch", "a LoRABatch", type(batch).__name__, TypeError)
    # x is checked against w_dual's device (not the reverse): the storage is fixed, x is this call's argument
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, inner_contiguous=True, device=w_dual.device)
    check(x.shape[1] == w_dual.in_features, "x", f"shape (T, {w_dual.in_features}) (w_dual.in_features)",
          tuple(x.shape))
    dev = x.device
    check(w_dual.device.type == dev.type and (dev.type != "cuda" or (w_dual.device.index or 0) == (dev.index or 0)),
          "w_dual", f"storage on {dev} (x's device)", w_dual.device)
    T = x.shape[0]
    check(batch.num_tokens == T, "batch", f"a batch built for {T} tokens (x has {T} rows)",
          f"{batch.num_tokens} tokens")
    check(batch.max_adapters <= w_dual.max_adapters, "batch",
          f"max_adapters <= w_dual.max_adapters={w_dual.max_adapters} (ids must name slots of the weights)",
          batch.max_adapters)
    check(batch.device.type == dev.type and (dev.type != "cuda" or (batch.device.index or 0) == (dev.index or 0)),
          "batch", f"metadata on {dev}", batch.device)


def _storage(w: DualLoRAWeights):
    return w.a, w.b, w.ln_weight, w.ln_bias, w.offsets


# ---- public API -----------------------------------------------------------------------------------------


def dual_lora_(y: torch.Tensor, x: torch.Tensor, w_dual: DualLoRAWeights, batch: LoRABatch) -> torch.Tensor:
    """``dual_lora_(y, x, w_dual, batch)``: ``y[t] += s_i * B_i (ReLU(T_i x[t]) * LN_r(A_i x[t]))`` in place.

    Args:
        y: [T, out] fp16/bf16/fp32 (rows may be strided, last dim unit-stride), e.g. the base layer's output.
        x: [T, in], same device; its dtype may differ from y's and the weights' (all accumulate in fp32).
        w_dual: the layer's :class:`~lora_kernels.DualLoRAWeights`.
        batch: a :class:`~lora_kernels.LoRABatch` built for these T tokens (ids -1 = no adapter).

    Returns:
        y. T = 0 is a no-op.

    Raises:
        TypeError / ValueError naming the argument (type, dtype, device, shape, strides, a batch for another T
        or more adapter slots, y sharing memory with x or with the library's storage: w_dual's tensors or the
        batch's metadata); RuntimeError when x or y requires grad under grad mode (use
        :func:`dual_lora` to train). y is unchanged when it raises.
    """
    _check_args(x, w_dual, batch)
    T = x.shape[0]
    check_tensor("y", y, ndim=2, dtypes=FLOAT_DTYPES, device=x.device, inner_contiguous=True)
    check(tuple(y.shape) == (T, w_dual.out_features), "y", f"shape ({T}, {w_dual.out_features})", tuple(y.shape))
    check(T <= 1 or y.stride(0) >= y.shape[1], "y", f"rows that do not overlap (row stride >= {y.shape[1]}; "
          "e.g. not an expand())", f"strides {y.stride()}")
    _check_out_disjoint(y, {"x": x}, w_dual, batch, "w_dual")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, y, w_dual.a, w_dual.b, w_dual.ln_weight,
                                                                  w_dual.ln_bias)):
        raise RuntimeError("x/y/w_dual: expected tensors that do not require grad (dual_lora_ is the in-place "
                           "inference op); use lora_kernels.dual_lora(x, w_dual, batch) for autograd, or run under "
                           "torch.no_grad()")
    if T == 0:
        return y
    a, b, lw, lb, offs = _storage(w_dual)
    torch.ops.lora_kernels.dual_lora_(y, x, a, b, lw, lb, offs, w_dual.ranks, w_dual.scales, batch.meta,
                                      w_dual.slice_info, batch.max_tokens, w_dual.max_rank, w_dual.eps)
    return y


def dual_lora(x: torch.Tensor, w_dual: DualLoRAWeights, batch: LoRABatch) -> torch.Tensor:
    """``delta = dual_lora(x, w_dual, batch)``: the Dual-LoRA delta [T, out] in x's dtype (0 rows for -1
    tokens), differentiable.

    Gradients flow to x and to the storage tensors ``w_dual.a`` (A and T rows), ``w_dual.b``, ``w_dual.ln_weight``
    and ``w_dual.ln_bias`` when they require grad; storage gradients are dense [R, ...] tensors, zero outside
    the rows of the batch's adapters (paged like the storage). Backward: the backend of the forward (Triton
    kernels on CUDA, autograd through the reference on CPU).

    Args / Raises: as :func:`dual_lora_` (without y).
    """
    _check_args(x, w_dual, batch)
    a, b, lw, lb, offs = _storage(w_dual)
    delta, _ = torch.ops.lora_kernels.dual_lora(x, a, b, lw, lb, offs, w_dual.ranks, w_dual.ranks2, w_dual.scales,
                                                batch.meta, w_dual.slice_info, w_dual.in_slice_info, batch.max_tokens,
                                                w_dual.max_rank, w_dual.eps)
    return delta
