"""Task arithmetic and TIES over many LoRA adapters, layer by layer, in chunks of output rows.

A task vector is an adapter's delta ``tau_i = scale_i * B_i @ A_i`` [out, in]. Both routines work on the
adapters' device and never hold more than one chunk of ``chunk_rows`` output rows of every task's dense delta
(task arithmetic holds none: it multiplies the stacked factors). Results are dense deltas, or LoRA factors
(:class:`~lora_kernels.federated.adapters.LoRAFactors`, scale 1) at a chosen rank, computed with the low-rank
maths of :mod:`lora_kernels.federated.lowrank`. These are offline steps (fusing adapters before serving), plain
torch ops driven from the host, not custom ops: TIES's exact threshold takes a few host syncs.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch

from .._validation import check, check_int, check_real
from ..federated.lowrank import lowrank_svd, stack_factors, truncate
from ..profiling import nvtx_range
from ._inputs import LoRAFactors, check_coefficients, check_finite, compute_dtype, resolve_lambdas, resolve_tasks
from .select import kth_largest_magnitude

__all__ = ["task_arithmetic", "ties", "ties_keep_count"]

Result = Union[torch.Tensor, LoRAFactors]
_CHUNK_ELEMS = 1 << 24  # default chunk: about this many elements of dense task vectors at once


def _positive_int(name: str, value: Any, want: str, show_value: bool) -> int:
    """``check_int(name, value, lo=1)`` with its errors reworded to list everything ``name`` accepts (``want``);
    ``show_value``: a TypeError also shows the value (a ValueError always does)."""
    try:
        return check_int(name, value, lo=1)
    except TypeError:
        got = f"{type(value).__name__} {value!r:.40}" if show_value else type(value).__name__
        raise TypeError(f"{name}: expected {want}, got {got}") from None
    except ValueError:
        raise ValueError(f"{name}: expected {want}, got {value!r:.40}") from None


def _check_rank(rank: Any, allow_exact: bool) -> Any:
    """None, ``"exact"`` (when allowed) or an integer >= 1 of any integer type (returned as a Python int)."""
    if rank is None or (allow_exact and isinstance(rank, str) and rank == "exact"):
        return rank
    want = "None (dense), an int >= 1" + (" or 'exact'" if allow_exact else "")
    if isinstance(rank, str):  # (a str is a rank's type when it is 'exact': another one is a bad value)
        raise ValueError(f"rank: expected {want}, got {rank!r:.40}")
    return _positive_int("rank", rank, want, show_value=True)


def _check_chunk_rows(chunk_rows: Any) -> Any:
    if chunk_rows is None:
        return None
    return _positive_int("chunk_rows", chunk_rows, "None or an int >= 1", show_value=False)


def _check_density(density: Any) -> float:
    """A real number in (0, 1] (int, float, numpy scalar, 0-dim tensor; never bool or str)."""
    try:
        d = check_real("density", density)
    except TypeError:
        raise TypeError(f"density: expected a float in (0, 1], got {type(density).__name__}") from None
    check(0.0 < d <= 1.0, "density", "a float in (0, 1]", d)
    return d


def _chunk(chunk_rows: Optional[int], n_tasks: int, out: int, in_f: int) -> int:
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_ELEMS // max(1, n_tasks * in_f))
    return min(chunk_rows, out)


def _per_layer(keys, results: List[Result]) -> Union[Result, Dict[str, Result]]:
    return results[0] if keys is None else dict(zip(keys, results))


def task_arithmetic(
    adapters: Sequence[Any],
    lambdas: Union[float, Sequence[float]],
    *,
    rank: Union[None, int, str] = None,
    chunk_rows: Optional[int] = None,
) -> Union[Result, Dict[str, Result]]:
    """Task arithmetic: the weighted sum of the task vectors of every layer.

    Semantics:
        per layer, ``delta = sum_i lambda_i * scale_i * B_i @ A_i``. Its exact low-rank form is the stack
        ``A = [lambda_1 s_1 A_1; ...; lambda_n s_n A_n]`` [R, in], ``B = [B_1, ..., B_n]`` [out, R] with
        ``R = sum_i r_i`` (:func:`lora_kernels.federated.lowrank.stack_factors`).

        - ``rank=None``: the dense ``delta`` [out, in], formed ``chunk_rows`` output rows at a time as
          ``B[rows] @ A`` (no per-task dense delta is ever formed).
        - ``rank="exact"``: ``LoRAFactors(A, B, 1.0)`` of rank R, the stack itself.
        - ``rank=k``: the best rank-``min(k, R, in, out)`` approximation of ``delta`` (truncated SVD, balanced
          factors ``B = U sqrt(S)``, ``A = sqrt(S) V^T``), computed from the stacked factors (QR of ``A^T`` and
          ``B``, SVD of the small core) without forming ``delta`` unless that is cheaper
          (:func:`lora_kernels.federated.lowrank.lowrank_svd`); ``k >= R`` returns the exact stack.

        Everything is computed in fp32 (fp64 when any factor is fp64) on the adapters' device, and returned in
        that dtype.

    Args:
        adapters: one adapter per task (``(A, B, scale)``, ``LoRAFactors``, a ``LoRAWeights`` slot
            ``(weights, id[, slice])``), or one dict ``{layer: adapter}`` per task (same keys) for many layers.
        lambdas: one float for every task, or one per task.
        rank: None, ``"exact"`` or an int >= 1 (see above).
        chunk_rows: output rows per chunk of the dense result (default: about 16M elements).

    Returns:
        a tensor or ``LoRAFactors`` (plain adapters), or ``{layer: result}`` (dicts).

    Raises:
        TypeError / ValueError naming the argument: empty ``adapters``, tasks whose layers or layer shapes
        disagree, NaN/inf in a factor, wrong number of lambdas or non-finite lambdas, bad ``rank`` or
        ``chunk_rows``. Everything is checked before any layer is computed.
    """
    keys, layers = resolve_tasks(adapters)
    lams = resolve_lambdas("lambdas", lambdas, len(layers[0]))
    rank = _check_rank(rank, allow_exact=True)
    chunk_rows = _check_chunk_rows(chunk_rows)
    check_coefficients("lambdas", keys, layers, lams)
    check_finite(keys, layers)
    with nvtx_range("lora_kernels.fusion.task_arithmetic"):
        return _per_layer(keys, [_task_arithmetic_layer(layer, lams, rank, chunk_rows) for layer in layers])


def _task_arithmetic_layer(layer: List[LoRAFactors], lams: List[float], rank, chunk_rows) -> Result:
    dt = compute_dtype(layer)
    A, B = stack_factors([f.A.to(dt) for f in layer], [f.B.to(dt) for f in layer],
                         [lam * f.scale for lam, f in zip(lams, layer)])
    R, out, in_f = A.shape[0], B.shape[0], A.shape[1]
    if rank is None:
        delta = torch.empty(out, in_f, dtype=dt, device=A.device)
        c = _chunk(chunk_rows, 1, out, in_f)
        for r0 in range(0, out, c):
            torch.mm(B[r0 : r0 + c], A, out=delta[r0 : r0 + c])
        return delta
    if rank == "exact" or rank >= R:
        return LoRAFactors(A, B, 1.0)
    U, S, Vh, _ = lowrank_svd(A, B, "auto")
    A_k, B_k = truncate(U, S, Vh, rank, pad=False)
    return LoRAFactors(A_k.contiguous(), B_k.contiguous(), 1.0)


def ties_keep_count(density: float, numel: int) -> int:
    """Entries TIES keeps per task (before ties at the threshold): ``max(1, round(density * numel))``.

    ``density``: a real number in (0, 1] (int, float, numpy scalar or 0-dim tensor); ``numel``: an integer >= 1
    of any integer type. Raises TypeError for a non-number density (bool, str), ValueError for ``density`` outside
    (0, 1] or NaN, or ``numel`` not an integer >= 1."""
    density = _check_density(density)
    try:
        numel = check_int("numel", numel, lo=1)
    except (TypeError, ValueError):
        raise ValueError(f"numel: expected an int >= 1, got {numel!r:.40}") from None
    return max(1, min(numel, round(density * numel)))


def ties(
    adapters: Sequence[Any],
    density: float,
    lambdas: Union[float, Sequence[float]] = 1.0,
    *,
    rank: Optional[int] = None,
    chunk_rows: Optional[int] = None,
) -> Union[Result, Dict[str, Result]]:
    """TIES merging (trim, elect sign, disjoint mean) of the task vectors of every layer.

    Semantics:
        per layer, with ``tau_i = lambda_i * scale_i * B_i @ A_i`` [out, in] and
        ``k = ties_keep_count(density, out * in)``:

        1. trim: ``t_i`` = the k-th largest ``|tau_i|`` (exact, see below); ``tau_i' = tau_i * [|tau_i| >= t_i]``.
           Magnitudes tied at ``t_i`` are all kept, so a task keeps at least k entries (more only on ties).
        2. elect: ``g = sign(sum_i tau_i')``, the sign with the larger total magnitude (0 where the two balance
           exactly: such entries merge to 0).
        3. disjoint mean: ``merged = sum_i tau_i' [sign(tau_i') = g] / max(1, #{i: sign(tau_i') = g != 0})``.

        A single ``lambda`` gives standard TIES scaled by it (``lambda * TIES(tau)``: the trim is per task and
        scale-free, and the sign election and mean commute with a common factor); per-task lambdas weight the
        tasks before the election and the mean.

        Memory and exactness: the task vectors are formed ``chunk_rows`` output rows at a time for all tasks at
        once (one batched matmul of the zero-padded factors), never whole. The thresholds ``t_i`` are global
        per-task quantiles: a radix select over the chunks (:mod:`lora_kernels.fusion.select`: 2 passes in fp32,
        4 in fp64, each recomputing the chunks), exact for the values the chunks compute, independent of the
        chunk size. A last pass applies steps 1-3 chunk by chunk. A dense implementation agrees up to the
        rounding of ``B_i @ A_i`` (bit for bit when the products are exact).

    Args:
        adapters: as for :func:`task_arithmetic` (one per task, or one dict of layers per task).
        density: fraction of each task vector kept, in (0, 1] (top-k% with k = 100 * density).
        lambdas: one float for every task, or one per task (default 1).
        rank: None for the dense merged delta [out, in]; an int k for ``LoRAFactors(A, B, 1.0)`` of rank
            ``min(k, in, out)``, the truncated SVD of the merged delta (TIES output has no low-rank form of its
            own, so the dense merged delta of one layer is formed, then factored).
        chunk_rows: output rows per chunk (default: about 16M elements of task vectors per chunk).

    Returns:
        a tensor or ``LoRAFactors`` (plain adapters), or ``{layer: result}`` (dicts); fp32 (fp64 when any
        factor is fp64).

    Raises:
        TypeError / ValueError naming the argument: as :func:`task_arithmetic`, and ``density`` outside (0, 1].
    """
    keys, layers = resolve_tasks(adapters)
    density = _check_density(density)
    lams = resolve_lambdas("lambdas", lambdas, len(layers[0]))
    rank = _check_rank(rank, allow_exact=False)
    chunk_rows = _check_chunk_rows(chunk_rows)
    check_coefficients("lambdas", keys, layers, lams)
    check_finite(keys, layers)
    with nvtx_range("lora_kernels.fusion.ties"):
        return _per_layer(keys, [_ties_layer(layer, float(density), lams, rank, chunk_rows) for layer in layers])


def _ties_layer(layer: List[LoRAFactors], density: float, lams: List[float], rank, chunk_rows) -> Result:
    dt = compute_dtype(layer)
    n, dev = len(layer), layer[0].A.device
    out, in_f = layer[0].B.shape[0], layer[0].A.shape[1]
    r_max = max(f.rank for f in layer)
    # Zero-padded factors: one batched matmul forms a chunk of every task vector (padding adds exact zeros).
    Ap = torch.zeros(n, r_max, in_f, dtype=dt, device=dev)
    Bp = torch.zeros(n, out, r_max, dtype=dt, device=dev)
    for i, (f, lam) in enumerate(zip(layer, lams)):
        Ap[i, : f.rank] = f.A
        Bp[i, :, : f.rank] = f.B.to(dt) * (lam * f.scale)
    c = _chunk(chunk_rows, n, out, in_f)

    def chunks() -> Iterator[torch.Tensor]:
        for r0 in range(0, out, c):
            yield torch.bmm(Bp[:, r0 : r0 + c], Ap)  # [n, rows, in]

    k = torch.full((n,), ties_keep_count(density, out * in_f), dtype=torch.int64, device=dev)
    thr = kth_largest_magnitude(chunks, k, dt).view(n, 1, 1)
    merged = torch.empty(out, in_f, dtype=dt, device=dev)
    for r0, tau in zip(range(0, out, c), chunks()):
        tau = torch.where(tau.abs() >= thr, tau, torch.zeros((), dtype=dt, device=dev))
        g = torch.sign(tau.sum(0))
        agree = (torch.sign(tau) == g) & (g != 0)
        num = torch.where(agree, tau, torch.zeros((), dtype=dt, device=dev)).sum(0)
        merged[r0 : r0 + c] = num / agree.sum(0).clamp_(min=1).to(dt)
    if rank is None:
        return merged
    U, S, Vh = torch.linalg.svd(merged, full_matrices=False)
    A_k, B_k = truncate(U, S, Vh, min(rank, S.shape[0]), pad=False)
    return LoRAFactors(A_k.contiguous(), B_k.contiguous(), 1.0)
