"""Low-rank maths on LoRA factors, batched over leading dims: stacking, SVD of ``B @ A`` from the factors,
truncation, Frobenius norms. Used by the federated aggregation and by adapter fusion.

Conventions: ``A`` is [..., r, in], ``B`` is [..., out, r]; the matrix they stand for is ``B @ A`` [..., out, in].
Leading dims batch independent layers (one launch per op for a whole group of same-shaped layers). Nothing here
validates arguments (callers do) and nothing forms the dense ``out x in`` matrix unless the function says so.
Do the maths in fp32 or fp64: QR and SVD are not offered in half precision.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

__all__ = [
    "stack_factors", "pad_rank", "svd_method", "lowrank_svd", "truncate", "lowrank_norm", "lowrank_diff_norm",
]


def stack_factors(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
                  coefs: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact stacking of K low-rank terms.

    Semantics:
        ``A = concat_k(c_k A_k)`` along the rank dim, ``B = concat_k(B_k)`` along the rank dim, so that
        ``B @ A == sum_k c_k B_k @ A_k`` (up to the rounding of ``c_k A_k``; exact when ``c_k == 1``). The
        coefficient goes on A whole (no sqrt split): one rounding per element, and B stays the clients' own.

    Args:
        As: K tensors [..., r_k, in]; Bs: K tensors [..., out, r_k]; coefs: K floats, or K tensors that
            broadcast against ``A_k`` (e.g. [L, 1, 1]: one coefficient per batched layer).
    Returns:
        ``(A [..., sum r_k, in], B [..., out, sum r_k])``.
    """
    A = torch.cat([a if isinstance(c, (int, float)) and c == 1.0 else a * c for a, c in zip(As, coefs)], dim=-2)
    B = torch.cat(list(Bs), dim=-1)
    return A, B


def pad_rank(A: torch.Tensor, B: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``(A [..., r, in], B [..., out, r])`` to rank ``rank >= r`` (the product is unchanged)."""
    r = A.shape[-2]
    if r == rank:
        return A, B
    A2 = A.new_zeros(*A.shape[:-2], rank, A.shape[-1])
    B2 = B.new_zeros(*B.shape[:-1], rank)
    A2[..., :r, :] = A
    B2[..., :r] = B
    return A2, B2


def _qr_flops(m: int, n: int) -> float:
    lo, hi = min(m, n), max(m, n)
    return 4.0 * hi * lo * lo - 4.0 / 3.0 * lo**3  # Householder QR plus forming the thin Q


def _svd_flops(m: int, n: int) -> float:
    lo, hi = min(m, n), max(m, n)
    return 6.0 * hi * lo * lo + 20.0 * lo**3  # Golub & Van Loan, R-SVD with thin U and V


def svd_method(rank: int, in_features: int, out_features: int) -> Tuple[str, float, float]:
    """Which way :func:`lowrank_svd` computes the SVD of ``B @ A`` for a stacked rank ``rank``.

    Returns ``(method, qr_flops, dense_flops)``: ``"qr"`` (from the factors: QR of ``A^T`` and ``B``, SVD of the
    small core) unless forming the dense ``out x in`` matrix and taking its SVD is estimated cheaper, which only
    happens when ``rank`` is at least about ``min(in, out)`` (``"dense"``).
    """
    ma, mb = min(in_features, rank), min(out_features, rank)
    m = min(ma, mb)
    qr = (_qr_flops(in_features, rank) + _qr_flops(out_features, rank) + 2.0 * ma * mb * rank
          + _svd_flops(ma, mb) + 2.0 * (in_features * ma + out_features * mb) * m)
    dense = 2.0 * out_features * in_features * rank + _svd_flops(out_features, in_features)
    return ("dense" if dense < qr else "qr"), qr, dense


def lowrank_svd(A: torch.Tensor, B: torch.Tensor, method: str = "auto"
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Thin SVD of ``B @ A`` [..., out, in] computed from the factors.

    Semantics:
        ``B @ A == U @ diag(S) @ Vh`` with orthonormal columns of ``U`` [..., out, m] and rows of ``Vh``
        [..., m, in], ``S`` [..., m] descending. With ``method="qr"``: ``A^T = Q_A R_A``, ``B = Q_B R_B``
        (reduced QR), ``R_B R_A^T = U_c S V_c^T`` (a small ``min(out, r) x min(in, r)`` core), ``U = Q_B U_c``,
        ``Vh = V_c^T Q_A^T``, so ``m = min(in, out, r)`` and no ``out x in`` matrix exists at any point.
        With ``method="dense"``: SVD of the formed product (``m = min(in, out)``). ``"auto"`` picks the one
        :func:`svd_method` estimates cheaper.

    Returns:
        ``(U, S, Vh, method_used)``.
    """
    r, in_f, out_f = A.shape[-2], A.shape[-1], B.shape[-2]
    if method == "auto":
        method = svd_method(r, in_f, out_f)[0]
    if method == "dense":
        U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
        return U, S, Vh, "dense"
    if method != "qr":
        raise ValueError(f"method: expected 'auto', 'qr' or 'dense', got {method!r}")
    Qa, Ra = torch.linalg.qr(A.transpose(-1, -2))  # [.., in, ma], [.., ma, r]
    Qb, Rb = torch.linalg.qr(B)  # [.., out, mb], [.., mb, r]
    Uc, S, Vhc = torch.linalg.svd(Rb @ Ra.transpose(-1, -2), full_matrices=False)
    return Qb @ Uc, S, Vhc @ Qa.transpose(-1, -2), "qr"


def truncate(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int,
             pad: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors ``(A [..., rank, in], B [..., out, rank])`` from an SVD (Eckart-Young).

    Semantics:
        ``B @ A = U_k diag(S_k) Vh_k`` with the ``k = min(rank, m)`` largest singular values, split evenly:
        ``B = U_k diag(sqrt(S_k))``, ``A = diag(sqrt(S_k)) Vh_k`` (balanced factors, as LoRA training expects
        neither factor to dominate). With ``pad`` and ``rank > m`` the factors are zero-padded to ``rank``.
    """
    k = min(rank, S.shape[-1])
    sq = S[..., :k].clamp_min(0).sqrt()
    B = U[..., :, :k] * sq.unsqueeze(-2)
    A = sq.unsqueeze(-1) * Vh[..., :k, :]
    if pad and k < rank:
        A, B = pad_rank(A, B, rank)
    return A, B


def lowrank_norm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of ``B @ A`` from the factors, [...].

    ``||B A||_F = ||R_B R_A^T||_F`` with ``A^T = Q_A R_A``, ``B = Q_B R_B``: backward stable (a Gram-matrix trace
    would lose half the digits when the product is a small difference), ``O((in + out) r^2)``.
    """
    _, Ra = torch.linalg.qr(A.transpose(-1, -2))
    _, Rb = torch.linalg.qr(B)
    return torch.linalg.matrix_norm(Rb @ Ra.transpose(-1, -2))


def lowrank_diff_norm(A1: torch.Tensor, B1: torch.Tensor, A2: torch.Tensor, B2: torch.Tensor) -> torch.Tensor:
    """``||B1 A1 - B2 A2||_F`` from the factors (the difference is the rank ``r1 + r2`` product
    ``[B1, -B2] @ [A1; A2]``), [...]."""
    return lowrank_norm(torch.cat([A1, A2], dim=-2), torch.cat([B1, -B2], dim=-1))
