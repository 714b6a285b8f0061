"""Server-side aggregation of K clients' LoRA adapters with mixed ranks (FLoRA, FedMLLM).

Semantics (per layer; client k has factors ``A_k`` [r_k, in], ``B_k`` [out, r_k], scale ``s_k``; the weights
``w_k >= 0`` are normalised to ``p_k = w_k / sum(w)``; the target of every method is the exact weighted sum of
the clients' deltas ``D = sum_k p_k s_k B_k A_k``):

- :func:`stack` (exact): ``A = concat_k(p_k s_k A_k)``, ``B = concat_k(B_k)``, scale 1, so ``B A == D`` with
  rank ``R = sum_k r_k``. Costs a copy; nothing is approximated.
- :func:`stack_svd`: the best rank-``rank`` approximation of ``D`` (Eckart-Young), computed from the stacked
  factors: QR of ``A^T`` and of ``B``, SVD of the small core, no ``out x in`` matrix. When the stacked rank is
  at least about ``min(in, out)`` the dense SVD is cheaper and is used instead; :attr:`Aggregate.notes` says
  which layers took it.
- :func:`fedavg` (inexact baseline): zero-pad every client to the largest rank, then average A and B separately:
  ``A = sum_k p_k pad(A_k)``, ``B = sum_k p_k s_k pad(B_k)`` (the scale folded into B; with equal client
  scales this is the plain average times that scale). ``B A != D`` in general (``mean(B) mean(A) != mean(BA)``);
  the relative error ``||B A - D||_F / ||D||_F`` of every layer is in :attr:`Aggregate.rel_error`, always.
- :func:`redistribute`: each client's best approximation of the global adapter at its own rank and scale.

Layers with the same ``(in, out)`` and the same client ranks are processed together as one batch (stacked along
a leading dim), so a model with L same-shaped projections costs one QR/SVD call per group, not L.
The maths is done in fp64 when any client factor is fp64, else fp32 (``compute_dtype`` overrides); results are
returned in that dtype (cast when loading them into fp16/bf16 storage). Every argument is checked before any
arithmetic: a refused call computes nothing and changes nothing (inputs are never written).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping as _MappingABC
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .._validation import check, check_int
from ..profiling import nvtx_range as _nvtx_range
from .adapters import ClientAdapter, LoRAFactors, as_client, check_client_weights, check_clients
from .lowrank import lowrank_diff_norm, lowrank_norm, lowrank_svd, pad_rank, stack_factors, svd_method, truncate

__all__ = ["Aggregate", "fedavg", "stack", "stack_svd", "redistribute", "exact_delta"]


class Aggregate(_MappingABC):
    """The result of an aggregation: a mapping ``layer -> LoRAFactors`` (so it is itself a client adapter), plus

    Attributes:
        method: ``"fedavg"``, ``"stack"``, ``"stack_svd"`` or ``"redistribute"``.
        rel_error: ``{layer: ||result - D||_F / ||D||_F}`` for the approximating methods (fedavg, stack_svd,
            redistribute), measured from the factors; empty for ``stack`` (exact by construction).
        notes: human-readable remarks (e.g. which layers used the dense SVD and why).
    """

    def __init__(self, layers: Dict[str, LoRAFactors], method: str, rel_error: Optional[Dict[str, float]] = None,
                 notes: Optional[List[str]] = None):
        self.layers = layers
        self.method = method
        self.rel_error: Dict[str, float] = rel_error or {}
        self.notes: List[str] = notes or []

    def __getitem__(self, k: str) -> LoRAFactors:
        return self.layers[k]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def max_rel_error(self) -> float:
        return max(self.rel_error.values(), default=0.0)

    def __repr__(self) -> str:
        ranks = sorted({f.rank for f in self.layers.values()})
        err = f", max rel_error={self.max_rel_error:.3e}" if self.rel_error else ""
        return f"Aggregate({self.method}, {len(self.layers)} layers, ranks {ranks}{err})"


# ---- shared preparation -------------------------------------------------------------------------------------
def _compute_dtype(clients: Sequence[Dict[str, LoRAFactors]], compute_dtype: Optional[torch.dtype]) -> torch.dtype:
    if compute_dtype is not None:
        check(compute_dtype in (torch.float32, torch.float64), "compute_dtype", "torch.float32 or torch.float64",
              compute_dtype, TypeError)
        return compute_dtype
    any64 = any(f.A.dtype == torch.float64 or f.B.dtype == torch.float64 for c in clients for f in c.values())
    return torch.float64 if any64 else torch.float32


def _groups(clients: Sequence[Dict[str, LoRAFactors]]) -> Dict[Tuple[int, int, Tuple[int, ...]], List[str]]:
    """Layers of the same (in, out, client ranks), in client 0's layer order."""
    groups: Dict[Tuple[int, int, Tuple[int, ...]], List[str]] = {}
    for name, f0 in clients[0].items():
        key = (f0.A.shape[1], f0.B.shape[0], tuple(c[name].rank for c in clients))
        groups.setdefault(key, []).append(name)
    return groups


def _client_batch(clients, names: List[str], k: int, dt: torch.dtype):
    """Client k's factors of the group's layers as ``(A [L, r_k, in], B [L, out, r_k], scales [L])``."""
    A = torch.stack([clients[k][n].A for n in names]).to(dt)
    B = torch.stack([clients[k][n].B for n in names]).to(dt)
    return A, B, [clients[k][n].scale for n in names]


def _stacked(clients, p: List[float], names: List[str], dt: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """The exact stacked factors of a group: ``A [L, R, in]``, ``B [L, out, R]`` with ``B A = D`` per layer."""
    As, Bs, coefs = [], [], []
    for k in range(len(clients)):
        A, B, sc = _client_batch(clients, names, k, dt)
        As.append(A)
        Bs.append(B)
        coefs.append(torch.tensor([p[k] * s for s in sc], dtype=dt, device=A.device).view(-1, 1, 1))
    return stack_factors(As, Bs, coefs)


def _check_coefs(clients: Sequence[Dict[str, LoRAFactors]], p: Sequence[float], dt: torch.dtype,
                 name: str = "clients") -> None:
    """Each client's coefficient ``p_k * s_k`` (formed in float64) must be a finite value of the compute dtype:
    an fp32 aggregation of a layer with scale 1e39 would otherwise return inf factors. ValueError naming the
    client's scale (suggesting fp64 maths, which holds any finite float64)."""
    lim = torch.finfo(dt).max
    for k, c in enumerate(clients):
        for n, f in c.items():
            if not abs(p[k] * f.scale) <= lim:
                where = f"{name}[{k}]" if len(clients) > 1 or name == "clients" else name
                raise ValueError(f"{where}[{n!r}].scale: expected |weight * scale| <= {lim:.4g} (finite in "
                                 f"{dt}; pass compute_dtype=torch.float64 for larger ones), got "
                                 f"{p[k]!r} * {f.scale!r}")


def _check_method(method) -> None:
    check(isinstance(method, str) and method in ("auto", "qr", "dense"), "method", "'auto', 'qr' or 'dense'",
          repr(method)[:60])


def _prepare(clients, weights, compute_dtype):
    norm = check_clients(clients)
    p = check_client_weights(weights, len(norm))
    dt = _compute_dtype(norm, compute_dtype)
    _check_coefs(norm, p, dt)
    return norm, p, dt


def _rel(diff: torch.Tensor, ref: torch.Tensor) -> List[float]:
    out = []
    for d, r in zip(diff.tolist(), ref.tolist()):
        out.append(d / r if r > 0 else (0.0 if d == 0 else math.inf))
    return out


# ---- the aggregators ----------------------------------------------------------------------------------------
def exact_delta(clients: Sequence[ClientAdapter], weights: Optional[Sequence[float]] = None,
                compute_dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """The dense ``D = sum_k p_k s_k B_k A_k`` [out, in] of every layer (a reference for tests and examples;
    the aggregators never form it)."""
    norm, p, dt = _prepare(clients, weights, compute_dtype)
    out = {}
    for name in norm[0]:
        out[name] = sum(p[k] * c[name].scale * (c[name].B.to(dt) @ c[name].A.to(dt)) for k, c in enumerate(norm))
    return out


def stack(clients: Sequence[ClientAdapter], weights: Optional[Sequence[float]] = None, *,
          compute_dtype: Optional[torch.dtype] = None) -> Aggregate:
    """Exact aggregation by stacking: per layer ``A = concat_k(p_k s_k A_k)`` [R, in], ``B = concat_k(B_k)``
    [out, R], scale 1, ``R = sum_k r_k``; ``B A == sum_k p_k s_k B_k A_k``.

    Args:
        clients: K client adapters (see :mod:`lora_kernels.federated.adapters`), ranks may differ.
        weights: K non-negative aggregation weights (e.g. sample counts), normalised to sum 1; default uniform.
        compute_dtype: torch.float32 or torch.float64 (default: fp64 if any factor is fp64, else fp32).
    Raises:
        TypeError / ValueError: see :func:`~lora_kernels.federated.adapters.check_clients` and
        :func:`~lora_kernels.federated.adapters.check_client_weights`.
    """
    norm, p, dt = _prepare(clients, weights, compute_dtype)
    with _nvtx_range("federated.stack"):
        layers: Dict[str, LoRAFactors] = {}
        for names in _groups(norm).values():
            A, B = _stacked(norm, p, names, dt)
            for i, n in enumerate(names):
                layers[n] = LoRAFactors(A[i], B[i], 1.0)
    return Aggregate({n: layers[n] for n in norm[0]}, "stack",
                     notes=["exact: B A == sum_k p_k s_k B_k A_k (one rounding of p_k s_k A_k)"])


def fedavg(clients: Sequence[ClientAdapter], weights: Optional[Sequence[float]] = None, *,
           compute_dtype: Optional[torch.dtype] = None) -> Aggregate:
    """FedAvg of the factors, zero-padded to the largest client rank (per layer): the inexact baseline.

    Semantics:
        ``A = sum_k p_k pad(A_k)`` [r_max, in], ``B = sum_k p_k s_k pad(B_k)`` [out, r_max], scale 1.
        ``rel_error[layer] = ||B A - D||_F / ||D||_F`` is always computed (from the factors) and reported.
    Args and raises: as :func:`stack`.
    """
    norm, p, dt = _prepare(clients, weights, compute_dtype)
    layers: Dict[str, LoRAFactors] = {}
    rel: Dict[str, float] = {}
    with _nvtx_range("federated.fedavg"):
        for (_, _, ranks), names in _groups(norm).items():
            r_max = max(ranks)
            A_avg = B_avg = None
            for k in range(len(norm)):
                A, B, sc = _client_batch(norm, names, k, dt)
                A, B = pad_rank(A, B, r_max)
                cA = p[k]
                cB = torch.tensor([p[k] * s for s in sc], dtype=dt, device=A.device).view(-1, 1, 1)
                A_avg = A * cA if A_avg is None else A_avg.add_(A, alpha=cA)
                B_avg = B * cB if B_avg is None else B_avg.addcmul_(B, cB)
            A_st, B_st = _stacked(norm, p, names, dt)
            errs = _rel(lowrank_diff_norm(A_avg, B_avg, A_st, B_st), lowrank_norm(A_st, B_st))
            for i, n in enumerate(names):
                layers[n] = LoRAFactors(A_avg[i], B_avg[i], 1.0)
                rel[n] = errs[i]
    return Aggregate({n: layers[n] for n in norm[0]}, "fedavg", {n: rel[n] for n in norm[0]},
                     notes=["inexact baseline: mean(B) mean(A) != mean(B A); see rel_error"])


def stack_svd(clients: Sequence[ClientAdapter], rank: int, weights: Optional[Sequence[float]] = None, *,
              method: str = "auto", compute_dtype: Optional[torch.dtype] = None) -> Aggregate:
    """Exact stacking, then the best rank-``rank`` approximation of ``D`` per layer, from the factors.

    Semantics:
        ``B A = U_k S_k V_k^T``, the ``rank`` leading singular triplets of ``D = sum_k p_k s_k B_k A_k``, split
        ``B = U_k sqrt(S_k)``, ``A = sqrt(S_k) V_k^T``, scale 1 (see :func:`~.lowrank.truncate`). The SVD comes
        from QR of the stacked ``A^T`` and ``B`` and an SVD of the ``R x R`` core (no dense ``out x in``
        matrix), unless the stacked rank is large enough that the dense SVD is estimated cheaper
        (:func:`~.lowrank.svd_method`); such layers are listed in :attr:`Aggregate.notes`.
        ``rel_error[layer] = sqrt(sum_{i > rank} S_i^2 / sum_i S_i^2)`` (the truncation error; 0 when ``rank``
        reaches the rank of D).

    Args:
        rank: target rank, ``1 <= rank <= min(R, in, out)`` for every layer (``R`` = the stacked rank).
        method: ``"auto"``, ``"qr"`` (always from the factors) or ``"dense"`` (always the dense SVD).
        others: as :func:`stack`.
    Raises:
        ValueError: ``rank`` above the stacked rank or the layer's dims, bad ``method``; and as :func:`stack`.
    """
    norm, p, dt = _prepare(clients, weights, compute_dtype)
    _check_method(method)
    rank = check_int("rank", rank)  # (any integer type; TypeError for bool, float, str)
    check(rank >= 1, "rank", "an int >= 1", rank)
    groups = _groups(norm)
    for (in_f, out_f, ranks), names in groups.items():
        R = sum(ranks)
        check(rank <= min(R, in_f, out_f), "rank", f"<= min(stacked rank {R}, in {in_f}, out {out_f}) of layer "
              f"{names[0]!r}", rank)
    layers: Dict[str, LoRAFactors] = {}
    rel: Dict[str, float] = {}
    notes: List[str] = []
    with _nvtx_range("federated.stack_svd"):
        for (in_f, out_f, ranks), names in groups.items():
            A_st, B_st = _stacked(norm, p, names, dt)
            U, S, Vh, used = lowrank_svd(A_st, B_st, method)
            if used == "dense":
                _, qr_f, dense_f = svd_method(sum(ranks), in_f, out_f)
                why = (f"estimated {dense_f:.3g} flops vs {qr_f:.3g} from the factors" if method == "auto"
                       else "method='dense' requested")
                notes.append(f"dense SVD for {len(names)} layer(s) {names[:3]}{'...' if len(names) > 3 else ''} "
                             f"(stacked rank {sum(ranks)}, in {in_f}, out {out_f}): {why}")
            A, B = truncate(U, S, Vh, rank)
            s2 = S.double().square()
            tail = s2[..., rank:].sum(-1).sqrt()
            errs = _rel(tail, s2.sum(-1).sqrt())
            for i, n in enumerate(names):
                layers[n] = LoRAFactors(A[i], B[i], 1.0)
                rel[n] = errs[i]
    return Aggregate({n: layers[n] for n in norm[0]}, "stack_svd", {n: rel[n] for n in norm[0]}, notes)


def redistribute(global_adapter: ClientAdapter, targets: Sequence[Union[int, ClientAdapter]], *,
                 method: str = "auto", compute_dtype: Optional[torch.dtype] = None) -> List[Aggregate]:
    """Each client's best approximation of the global adapter at its own rank and scale.

    Semantics:
        For layer l with global delta ``G = g B_g A_g`` and target k with rank ``r_k`` and scale ``s_k``:
        ``s_k B_k A_k`` is the best rank-``r_k`` approximation of ``G`` (exact when ``r_k >= rank(G)``; the
        factors are then zero-padded to ``r_k``), with ``|G / s_k|``'s singular values split evenly between
        ``A_k`` and ``B_k``. The SVD of each layer is computed once (from the factors) for all targets.

    Args:
        global_adapter: a client adapter (e.g. the :class:`Aggregate` of :func:`stack`).
        targets: K entries, each an int (that rank for every layer, scale 1) or a client adapter whose layers
            give the rank and scale per layer (its factor values are not used).
        method, compute_dtype: as :func:`stack_svd` / :func:`stack`.
    Returns:
        K :class:`Aggregate` s (method ``"redistribute"``), ``rel_error`` = the truncation error vs ``G``.
    Raises:
        ValueError: a target rank < 1, a zero target scale, target layers that differ from the global's.
    """
    glob = as_client(global_adapter, "global_adapter")
    _check_method(method)
    if isinstance(targets, (_MappingABC, str)) or not isinstance(targets, Sequence):
        raise TypeError(f"targets: expected a sequence of ranks or client adapters, got {type(targets).__name__}")
    check(len(targets) >= 1, "targets", "at least one target", 0)
    plans: List[Dict[str, Tuple[int, float]]] = []
    for k, t in enumerate(targets):
        if isinstance(t, (numbers.Number, torch.Tensor)) or type(t).__name__ == "bool_":
            t = check_int(f"targets[{k}]", t)  # a rank: any integer type (TypeError for bool / float / str)
            check(t >= 1, f"targets[{k}]", "a rank >= 1", t)
            plans.append({n: (t, 1.0) for n in glob})
            continue
        c = as_client(t, f"targets[{k}]")
        check(set(c) == set(glob), f"targets[{k}]", f"the layers of global_adapter {sorted(glob)}", sorted(c))
        plan = {}
        for n, f in c.items():
            check(f.A.shape[1] == glob[n].A.shape[1] and f.B.shape[0] == glob[n].B.shape[0], f"targets[{k}][{n!r}]",
                  f"in={glob[n].A.shape[1]}, out={glob[n].B.shape[0]}", f"in={f.A.shape[1]}, out={f.B.shape[0]}")
            check(f.scale != 0.0, f"targets[{k}][{n!r}].scale", "a non-zero scale", f.scale)
            plan[n] = (f.rank, f.scale)
        plans.append(plan)
    dt = _compute_dtype([glob], compute_dtype)
    _check_coefs([glob], [1.0], dt, "global_adapter")
    groups: Dict[Tuple[int, int, int], List[str]] = {}
    for n, f in glob.items():
        groups.setdefault((f.A.shape[1], f.B.shape[0], f.rank), []).append(n)
    outs: List[Dict[str, LoRAFactors]] = [{} for _ in plans]
    errs: List[Dict[str, float]] = [{} for _ in plans]
    with _nvtx_range("federated.redistribute"):
        for names in groups.values():
            A = torch.stack([glob[n].A for n in names]).to(dt)
            B = torch.stack([glob[n].B.to(dt) * glob[n].scale for n in names])
            U, S, Vh, _ = lowrank_svd(A, B, method)
            s2 = S.double().square()
            total = s2.sum(-1).sqrt().tolist()
            for i, n in enumerate(names):
                for k, plan in enumerate(plans):
                    r, s = plan[n]
                    Ak, Bk = truncate(U[i], S[i] / abs(s), Vh[i], r)
                    outs[k][n] = LoRAFactors(Ak, Bk if s > 0 else -Bk, s)
                    tail = float(s2[i, r:].sum().sqrt())
                    errs[k][n] = tail / total[i] if total[i] > 0 else 0.0
    return [Aggregate({n: o[n] for n in glob}, "redistribute", {n: e[n] for n in glob}) for o, e in zip(outs, errs)]
