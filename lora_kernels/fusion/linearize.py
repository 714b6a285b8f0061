"""L-LoRA's linearised adapter as an ordinary LoRA adapter of twice the rank, servable by the same kernels."""

from __future__ import annotations

import torch

from .._validation import check, check_real, check_tensor
from ._inputs import LoRAFactors

__all__ = ["linearize"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def linearize(A0: torch.Tensor, B0: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              scale: float = 1.0) -> LoRAFactors:
    """The rank-2r adapter of the LoRA delta linearised around its initial factors (L-LoRA).

    Semantics:
        L-LoRA fine-tunes the first-order Taylor expansion of the model in the LoRA parameters around their
        initial values ``(A0, B0)``. For a LoRA layer ``W0 + s B A`` that expansion is

            ``W0 + s (B0 A0 + (B - B0) A0 + B0 (A - A0)) = W0 + s (B A0 + B0 A - B0 A0) = W0 + s B' A'``

        with ``A' = [A0; A]`` [2r, in] and ``B' = [B - B0, B0]`` [out, 2r]: ``B' A' = (B - B0) A0 + B0 A``
        exactly (an algebraic identity, not an approximation), so the linearised model is served by
        :func:`~lora_kernels.add_lora_` like any adapter, and fused with :func:`task_arithmetic` / :func:`ties`.

    Scale: the result carries the *original* adapter's scale ``s`` (``alpha / r`` for the rank-r adapter, or
    ``alpha / sqrt(r)`` with rsLoRA). Load it with ``weights.add(f.A, f.B, scale=f.scale)``; never with
    ``alpha=``: ``LoRAWeights`` would divide by the new rank 2r and serve half the delta (``1/sqrt(2)`` of it
    with rsLoRA).

    Args:
        A0, A: [r, in], the initial and the fine-tuned ``lora_A.weight``.
        B0, B: [out, r], the initial and the fine-tuned ``lora_B.weight`` (PEFT initialises ``B0 = 0``, which
            makes ``B'``'s second half zero: the linearised delta is then ``s B A0``).
        scale: the adapter's scale ``s`` (a finite float).

    Returns:
        ``LoRAFactors(A' [2r, in], B' [out, 2r], scale)`` in the promoted dtype of the four tensors (``B - B0`` is
        rounded once in that dtype), on their device. New tensors: the inputs are not modified.

    Raises:
        TypeError for non-tensors or non-float dtypes; ValueError naming the argument for shapes that do not
        match ``A0`` [r, in] / ``B0`` [out, r], differing devices, or a non-finite scale.
    """
    check_tensor("A0", A0, ndim=2, dtypes=_DTYPES)
    r, in_f = A0.shape
    check(r >= 1 and in_f >= 1, "A0", "shape (r, in) with r, in >= 1", tuple(A0.shape))
    check_tensor("B0", B0, ndim=2, dtypes=_DTYPES, device=A0.device)
    check(B0.shape[1] == r and B0.shape[0] >= 1, "B0", f"shape (out, {r})", tuple(B0.shape))
    check_tensor("A", A, shape=(r, in_f), dtypes=_DTYPES, device=A0.device)
    check_tensor("B", B, shape=tuple(B0.shape), dtypes=_DTYPES, device=A0.device)
    scale = check_real("scale", scale)  # (int, float, numpy scalar, 0-dim tensor; finite; not bool / str)
    dt = A0.dtype
    for t in (B0, A, B):
        dt = torch.promote_types(dt, t.dtype)
    A_lin = torch.cat([A0.to(dt), A.to(dt)], dim=0)
    B_lin = torch.cat([B.to(dt) - B0.to(dt), B0.to(dt)], dim=1)
    return LoRAFactors(A_lin, B_lin, float(scale))
