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
and dtype, not one per tensor); the state (``m``, ``v``) is kept per tensor in ``state``, in each param's dtype.
The global tensors are updated in place (under ``torch.no_grad``), so they can be the storage a server serves
from.

Transactional steps: a step computes the new params and state out of place, checks them, then commits them (one
``_foreach_copy_`` into the params, then the state lists and the round counter are swapped in). A refused step
(bad arguments; a NaN/inf pseudo-gradient, naming its tensor; a result that would be non-finite in the params'
dtype, e.g. an fp16 ``delta**2`` overflow) or a step that raises before the commit leaves the params, ``m``,
``v`` and ``rounds`` exactly as they were. Costs one extra copy of the params and state per step, and one host
sync per tensor for the finiteness checks (once per round).

Hyperparameters are finite real numbers (int, float, numpy scalar, 0-dim tensor; never bool or str):
``lr > 0``; ``beta``, ``betas[0]``, ``betas[1]`` in ``[0, 1)``; ``tau > 0`` with ``tau**2`` finite in every
param's dtype (``v`` starts at ``tau**2``). ``fedprox_term``: ``mu >= 0``.

Which tensors: the factors of a fixed-shape global adapter (FedMLLM's setting: every client at one rank, FedAvg
of A and B), or dense per-layer deltas. Factors of ``stack`` / ``stack_svd`` aggregates change shape (stack) or
basis (SVD) every round, so a pseudo-gradient between two rounds' factors is meaningless there: apply the server
optimiser to their dense deltas or to a fixed-rank FedAvg.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Sequence, Tuple, Union

import torch

from .._validation import check, check_real, tensor_span

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
        params: the global model's tensors (a sequence, or a mapping name -> tensor); floating point, distinct
            and with disjoint memory, updated in place.
        lr: server learning rate ``eta``: a finite real number > 0.
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
        # (sorted by start: if any two spans of a device overlap, two neighbours do)
        spans = sorted((str(p.device),) + tensor_span(p, k) for k, p in zip(self.keys, self.params))
        for (d0, _, e0, k0), (d1, s1, e1, k1) in zip(spans, spans[1:]):
            check(d0 != d1 or e1 <= s1 or s1 >= e0, "params", "distinct tensors with disjoint memory",
                  f"params[{k0!r}] and params[{k1!r}] overlapping (the same tensor twice, or views of one buffer)")
        self.lr = check_real("lr", lr, lo=0.0, lo_open=True)
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
        out = [t if t.dtype == p.dtype else t.to(p.dtype) for t, p in zip(ts, self.params)]
        for k, t, p in zip(self.keys, out, self.params):  # (after the cast: 1e300 in fp64 is inf in fp32)
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}[{k!r}]: expected finite values in {p.dtype} (the param's dtype), got NaN "
                                 "or inf")
        return out

    @torch.no_grad()
    def step(self, pseudo_grad: Params) -> None:
        """One server round with ``pseudo_grad`` (``aggregate - params``, same shapes; not modified, may alias
        the params: the step reads it whole before writing). Transactional (module docstring)."""
        d = self._check_like(pseudo_grad, "pseudo_grad")
        self._commit(*self._propose(d), "pseudo_grad")

    @torch.no_grad()
    def step_towards(self, aggregate: Params) -> None:
        """One server round whose pseudo-gradient is ``aggregate - params``. Transactional."""
        a = self._check_like(aggregate, "aggregate")
        d = torch._foreach_sub(a, self.params)
        for k, t, p in zip(self.keys, d, self.params):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"aggregate[{k!r}]: expected aggregate - params finite in {p.dtype}, got NaN or inf")
        self._commit(*self._propose(d), "aggregate")

    def _propose(self, d: List[torch.Tensor]) -> Tuple[List[torch.Tensor], Dict[str, List[torch.Tensor]]]:
        """The params and state after this round, as new tensors (nothing is written)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _commit(self, params: List[torch.Tensor], state: Dict[str, List[torch.Tensor]], name: str) -> None:
        for what, ts in [("params", params)] + sorted(state.items()):
            for k, t in zip(self.keys, ts):
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{name}: expected a round whose result is finite, got a step that makes "
                                     f"{what}[{k!r}] NaN or inf in {t.dtype} (nothing was changed)")
        if hasattr(torch, "_foreach_copy_"):
            torch._foreach_copy_(self.params, params)
        else:  # pragma: no cover - older torch
            for p, q in zip(self.params, params):
                p.copy_(q)
        self.state = state  # (a swap: the old lists are never written)
        self.rounds += 1

    def state_dict(self) -> Dict[str, object]:
        return {"rounds": self.rounds, "state": {k: [t.clone() for t in v] for k, v in self.state.items()}}


def _check_beta(name: str, b: float) -> float:
    v = check_real(name, b, lo=0.0)
    check(v < 1.0, name, "a float in [0, 1)", v)
    return v


class FedAvgM(ServerOptimizer):
    """Server momentum: ``m = beta m + delta``, ``x += lr m`` (``beta = 0``, ``lr = 1``: FedAvg).
    ``beta`` in ``[0, 1)``."""

    def __init__(self, params: Params, lr: float = 1.0, beta: float = 0.9):
        super().__init__(params, lr)
        self.beta = _check_beta("beta", beta)
        self.state["m"] = [torch.zeros_like(p) for p in self.params]

    def _propose(self, d):
        m = torch._foreach_mul(self.state["m"], self.beta)
        torch._foreach_add_(m, d)
        return torch._foreach_add(self.params, m, alpha=self.lr), {"m": m}


class _Adaptive(ServerOptimizer):
    def __init__(self, params: Params, lr: float = 1e-2, betas=(0.9, 0.99), tau: float = 1e-3):
        super().__init__(params, lr)
        if isinstance(betas, (str, bytes, Mapping)) or not isinstance(betas, (Sequence, torch.Tensor)) \
                or len(betas) != 2:
            raise TypeError(f"betas: expected (beta1, beta2), got {betas!r:.60}")
        self.beta1 = _check_beta("betas[0]", betas[0])
        self.beta2 = _check_beta("betas[1]", betas[1])
        self.tau = check_real("tau", tau, lo=0.0, lo_open=True)
        t2 = self.tau * self.tau  # (a Python float: tau <= 1.3e154 keeps it finite)
        for k, p in zip(self.keys, self.params):
            check(t2 <= torch.finfo(p.dtype).max, "tau", f"tau**2 finite in params[{k!r}]'s dtype {p.dtype} (v starts "
                  f"at tau**2: tau <= {torch.finfo(p.dtype).max ** 0.5:.4g})", self.tau)
        self.state["m"] = [torch.zeros_like(p) for p in self.params]
        self.state["v"] = [torch.full_like(p, t2) for p in self.params]

    def _second_moment(self, v: List[torch.Tensor], d2: List[torch.Tensor]) -> List[torch.Tensor]:
        raise NotImplementedError  # pragma: no cover - abstract

    def _propose(self, d):
        m = torch._foreach_mul(self.state["m"], self.beta1)
        torch._foreach_add_(m, d, alpha=1.0 - self.beta1)
        d2 = torch._foreach_mul(d, d)
        v = self._second_moment(self.state["v"], d2)
        den = torch._foreach_sqrt(v)
        torch._foreach_add_(den, self.tau)
        return torch._foreach_addcdiv(self.params, m, den, value=self.lr), {"m": m, "v": v}


class FedAdagrad(_Adaptive):
    """``v += delta^2``; ``x += lr m / (sqrt(v) + tau)``."""

    def _second_moment(self, v, d2):
        return torch._foreach_add(v, d2)


class FedYogi(_Adaptive):
    """``v -= (1 - b2) delta^2 sign(v - delta^2)``; ``x += lr m / (sqrt(v) + tau)``."""

    def _second_moment(self, v, d2):
        sgn = torch._foreach_sub(v, d2)
        sgn = [t.sign_() for t in sgn] if not hasattr(torch, "_foreach_sign") else torch._foreach_sign(sgn)
        torch._foreach_mul_(sgn, d2)
        return torch._foreach_add(v, sgn, alpha=-(1.0 - self.beta2))


class FedAdam(_Adaptive):
    """``v = b2 v + (1 - b2) delta^2``; ``x += lr m / (sqrt(v) + tau)``."""

    def _second_moment(self, v, d2):
        v = torch._foreach_mul(v, self.beta2)
        torch._foreach_add_(v, d2, alpha=1.0 - self.beta2)
        return v


def fedprox_term(params: Params, global_params: Params, mu: float) -> torch.Tensor:
    """FedProx's proximal term ``mu / 2 * sum_i ||w_i - w_i^global||^2`` for the client loss (Li et al. 2020).

    Differentiable in ``params`` (``global_params`` are treated as constants). Both are sequences (matched by
    position) or mappings (matched by key) of floating-point tensors of equal shapes. ``mu``: a finite real
    number >= 0 (not bool or str). Returns a 0-dim tensor in fp32 (fp64 when a param is fp64). Raises
    TypeError/ValueError naming the argument for mismatched or non-float inputs, meta tensors or a bad ``mu``.
    """
    mu = check_real("mu", mu, lo=0.0)
    keys, ps = _as_list(params, "params")
    gkeys, gs = _as_list(global_params, "global_params")
    check(len(ps) == len(gs) and len(ps) >= 1, "global_params", f"{len(ps)} tensors (as params)", len(gs))
    if isinstance(params, Mapping) and isinstance(global_params, Mapping):
        check(set(keys) == set(gkeys), "global_params", "the keys of params", sorted(gkeys)[:4])
        gs = [global_params[k] for k in keys]
    for what, k, t in [("params", k, p) for k, p in zip(keys, ps)] + [("global_params", k, g)
                                                                      for k, g in zip(keys, gs)]:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{k!r}]: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{what}[{k!r}]: expected a floating-point tensor, got {t.dtype}")
        if t.device.type == "meta":
            raise TypeError(f"{what}[{k!r}]: expected a tensor with data, got a meta tensor")
    acc_dt = torch.float64 if any(p.dtype == torch.float64 for p in ps) else torch.float32
    total = None
    for k, p, g in zip(keys, ps, gs):
        check(p.shape == g.shape, f"global_params[{k!r}]", f"shape {tuple(p.shape)}", tuple(g.shape))
        term = (p.to(acc_dt) - g.detach().to(p.device, acc_dt)).square().sum()
        total = term if total is None else total + term
    return total * (0.5 * float(mu))
