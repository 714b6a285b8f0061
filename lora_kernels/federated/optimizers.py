"""Server optimisers of "Adaptive Federated Optimization" (Reddi et al., ICLR 2021) and FedAvgM (Hsu et al. 2019),
as fused multi-tensor updates, plus FedProx's proximal term for the client loss.

Semantics (per tensor x of the global model, elementwise; the pseudo-gradient of round t is
``delta_t = aggregate_t - x_t``, e.g. the FedAvg of the clients' factors minus the current global factors):

- FedAvgM:    ``m = beta * m + delta``;  ``x += lr * m``
- FedAdagrad: ``m = b1 m + (1 - b1) delta``;  ``v = v + delta^2``;  ``x += lr m / (sqrt(v) + tau)``
- FedYogi:    ``m = b1 m + (1 - b1) delta``;  ``v = v - (1 - b2) delta^2 sign(v - delta^2)``;  same update of x
- FedAdam:    ``m = b1 m + (1 - b1) delta``;  ``v = b2 v + (1 - b2) delta^2``;  same update of x

``m`` starts at 0 and ``v`` at ``tau^2`` (the paper's ``v_{-1} >= tau^2``); no bias correction (as in the
paper). With FedAvgM ``beta = 0, lr = 1`` the update is plain FedAvg (``x = aggregate``).

Every update is a handful of ``torch._foreach_*`` calls over all tensors at once (one kernel per op per device
and dtype, not one per tensor); the state (``m``, ``v``) is kept per tensor in ``state``. The global tensors are
updated in place (under ``torch.no_grad``), so they can be the storage a server serves from.

Which tensors: the factors of a fixed-shape global adapter (FedMLLM's setting: every client at one rank, FedAvg
of A and B), or dense per-layer deltas. Factors of ``stack`` / ``stack_svd`` aggregates change shape (stack) or
basis (SVD) every round, so a pseudo-gradient between two rounds' factors is meaningless there: apply the server
optimiser to their dense deltas or to a fixed-rank FedAvg.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, Sequence, Union

import torch

from .._validation import check

__all__ = ["ServerOptimizer", "FedAvgM", "FedAdagrad", "FedYogi", "FedAdam", "fedprox_term", "factor_tensors"]

Params = Union[Sequence[torch.Tensor], Mapping[str, torch.Tensor]]


def factor_tensors(adapter: Mapping[str, object]) -> Dict[str, torch.Tensor]:
    """``{"layer.A": A, "layer.B": B}`` of a ``{layer: LoRAFactors}`` mapping: the tensors a server optimiser
    updates (the same tensor objects, so in-place updates change the adapter)."""
    out: Dict[str, torch.Tensor] = {}
    for name, f in adapter.items():
        out[f"{name}.A"] = f[0]
        out[f"{name}.B"] = f[1]
    return out


def _as_list(params: Params, name: str):
    if isinstance(params, Mapping):
        return list(params.keys()), list(params.values())
    if isinstance(params, torch.Tensor) or not isinstance(params, Iterable):
        raise TypeError(f"{name}: expected a sequence or mapping of tensors, got {type(params).__name__}")
    ts = list(params)
    return list(range(len(ts))), ts


class ServerOptimizer:
    """Base class: holds the global tensors and per-tensor state; :meth:`step` applies one round.

    Args:
        params: the global model's tensors (a sequence, or a mapping name -> tensor); floating point, updated in
            place.
        lr: server learning rate ``eta`` (> 0).
    """

    def __init__(self, params: Params, lr: float):
        self.keys, self.params = _as_list(params, "params")
        check(len(self.params) >= 1, "params", "at least one tensor", 0)
        for k, p in zip(self.keys, self.params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{k!r}]: expected a torch.Tensor, got {type(p).__name__}")
            if not p.is_floating_point():
                raise TypeError(f"params[{k!r}]: expected a floating-point tensor, got {p.dtype}")
        # The same tensor (or views of one buffer) listed twice would be stepped twice per round.
        spans = sorted((p.data_ptr(), p.data_ptr() + (sum((n - 1) * st for n, st in zip(p.shape, p.stride())) + 1)
                        * p.element_size(), k) for k, p in zip(self.keys, self.params)
                       if p.numel() and p.device.type != "meta")
        for (_, e0, k0), (s1, _, k1) in zip(spans, spans[1:]):
            check(s1 >= e0, "params", "distinct tensors with disjoint memory", f"params[{k0!r}] and params[{k1!r}] "
                  "overlapping (the same tensor twice, or views of one buffer)")
        check(isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0, "lr", "a finite float > 0", lr)
        self.lr = float(lr)
        self.state: Dict[str, List[torch.Tensor]] = {}
        self.rounds = 0

    def _check_like(self, tensors: Params, name: str) -> List[torch.Tensor]:
        keys, ts = _as_list(tensors, name)
        check(len(ts) == len(self.params), name, f"{len(self.params)} tensors (one per param)", len(ts))
        if isinstance(tensors, Mapping):
            check(keys == self.keys, name, f"the keys of params {self.keys[:4]}...", keys[:4])
        for k, t, p in zip(self.keys, ts, self.params):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{k!r}]: expected a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name}[{k!r}]: expected a floating-point tensor, got {t.dtype}")
            check(t.shape == p.shape, f"{name}[{k!r}]", f"shape {tuple(p.shape)}", tuple(t.shape))
            check(t.device == p.device, f"{name}[{k!r}]", f"device {p.device}", t.device)
        return [t if t.dtype == p.dtype else t.to(p.dtype) for t, p in zip(ts, self.params)]

    @torch.no_grad()
    def step(self, pseudo_grad: Params) -> None:
        """One server round with ``pseudo_grad`` (``aggregate - params``, same shapes; not modified)."""
        d = self._check_like(pseudo_grad, "pseudo_grad")
        self._update(d)
        self.rounds += 1

    @torch.no_grad()
    def step_towards(self, aggregate: Params) -> None:
        """One server round whose pseudo-gradient is ``aggregate - params``."""
        a = self._check_like(aggregate, "aggregate")
        self._update(torch._foreach_sub(a, self.params))
        self.rounds += 1

    def _update(self, d: List[torch.Tensor]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_dict(self) -> Dict[str, object]:
        return {"rounds": self.rounds, "state": {k: [t.clone() for t in v] for k, v in self.state.items()}}


def _check_beta(name: str, b: float) -> float:
    check(isinstance(b, (int, float)) and 0.0 <= b < 1.0, name, "a float in [0, 1)", b)
    return float(b)


class FedAvgM(ServerOptimizer):
    """Server momentum: ``m = beta m + delta``, ``x += lr m`` (``beta = 0``, ``lr = 1``: FedAvg)."""

    def __init__(self, params: Params, lr: float = 1.0, beta: float = 0.9):
        super().__init__(params, lr)
        self.beta = _check_beta("beta", beta)
        self.state["m"] = [torch.zeros_like(p) for p in self.params]

    def _update(self, d):
        m = self.state["m"]
        torch._foreach_mul_(m, self.beta)
        torch._foreach_add_(m, d)
        torch._foreach_add_(self.params, m, alpha=self.lr)


class _Adaptive(ServerOptimizer):
    def __init__(self, params: Params, lr: float = 1e-2, betas=(0.9, 0.99), tau: float = 1e-3):
        super().__init__(params, lr)
        check(isinstance(betas, (tuple, list)) and len(betas) == 2, "betas", "(beta1, beta2)", betas)
        self.beta1 = _check_beta("betas[0]", betas[0])
        self.beta2 = _check_beta("betas[1]", betas[1])
        check(isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0, "tau", "a finite float > 0", tau)
        self.tau = float(tau)
        self.state["m"] = [torch.zeros_like(p) for p in self.params]
        self.state["v"] = [torch.full_like(p, self.tau**2) for p in self.params]

    def _second_moment(self, v: List[torch.Tensor], d2: List[torch.Tensor]) -> None:  # pragma: no cover
        raise NotImplementedError

    def _update(self, d):
        m, v = self.state["m"], self.state["v"]
        torch._foreach_mul_(m, self.beta1)
        torch._foreach_add_(m, d, alpha=1.0 - self.beta1)
        d2 = torch._foreach_mul(d, d)
        self._second_moment(v, d2)
        den = torch._foreach_sqrt(v)
        torch._foreach_add_(den, self.tau)
        torch._foreach_addcdiv_(self.params, m, den, value=self.lr)


class FedAdagrad(_Adaptive):
    """``v += delta^2``; ``x += lr m / (sqrt(v) + tau)``."""

    def _second_moment(self, v, d2):
        torch._foreach_add_(v, d2)


class FedYogi(_Adaptive):
    """``v -= (1 - b2) delta^2 sign(v - delta^2)``; ``x += lr m / (sqrt(v) + tau)``."""

    def _second_moment(self, v, d2):
        sgn = torch._foreach_sub(v, d2)
        sgn = [t.sign_() for t in sgn] if not hasattr(torch, "_foreach_sign") else torch._foreach_sign(sgn)
        torch._foreach_mul_(sgn, d2)
        torch._foreach_add_(v, sgn, alpha=-(1.0 - self.beta2))


class FedAdam(_Adaptive):
    """``v = b2 v + (1 - b2) delta^2``; ``x += lr m / (sqrt(v) + tau)``."""

    def _second_moment(self, v, d2):
        torch._foreach_mul_(v, self.beta2)
        torch._foreach_add_(v, d2, alpha=1.0 - self.beta2)


def fedprox_term(params: Params, global_params: Params, mu: float) -> torch.Tensor:
    """FedProx's proximal term ``mu / 2 * sum_i ||w_i - w_i^global||^2`` for the client loss (Li et al. 2020).

    Differentiable in ``params`` (``global_params`` are treated as constants). Both are sequences (matched by
    position) or mappings (matched by key) of tensors of equal shapes. Returns a 0-dim tensor in fp32 (fp64 when
    a param is fp64). Raises TypeError/ValueError for mismatched inputs or ``mu < 0``.
    """
    check(isinstance(mu, (int, float)) and math.isfinite(mu) and mu >= 0, "mu", "a finite float >= 0", mu)
    keys, ps = _as_list(params, "params")
    gkeys, gs = _as_list(global_params, "global_params")
    check(len(ps) == len(gs) and len(ps) >= 1, "global_params", f"{len(ps)} tensors (as params)", len(gs))
    if isinstance(params, Mapping) and isinstance(global_params, Mapping):
        check(set(keys) == set(gkeys), "global_params", "the keys of params", sorted(gkeys)[:4])
        gs = [global_params[k] for k in keys]
    acc_dt = torch.float64 if any(p.dtype == torch.float64 for p in ps) else torch.float32
    total = None
    for k, p, g in zip(keys, ps, gs):
        if not isinstance(p, torch.Tensor) or not isinstance(g, torch.Tensor):
            raise TypeError(f"params/global_params[{k!r}]: expected tensors, got {type(p).__name__}, "
                            f"{type(g).__name__}")
        check(p.shape == g.shape, f"global_params[{k!r}]", f"shape {tuple(p.shape)}", tuple(g.shape))
        term = (p.to(acc_dt) - g.detach().to(p.device, acc_dt)).square().sum()
        total = term if total is None else total + term
    return total * (0.5 * float(mu))
