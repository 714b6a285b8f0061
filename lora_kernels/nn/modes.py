"""Whole-model serving modes: unmerged, merged and mixed (V-LoRA's swift mode switch), and the auto policy.

Three modes over every :class:`~lora_kernels.nn.LoRALinear` of a model:

* ``unmerged``: base weights clean; every token gets its own adapter's delta (the batched kernels).
* ``merged`` (adapter m): m is folded into every base weight; the layers run the base GEMM only (zero LoRA
  cost). Valid only for batches whose tokens all use m.
* ``mixed`` (adapter m, V-LoRA's "deLoRA"): m is folded into the base weights; tokens of adapter ``j != m`` get
  ``delta_j - delta_m``, tokens with no adapter (-1) get ``-delta_m``, tokens of m get nothing, in one launch
  of the batched kernel per layer.

A switch changes the base weights only when the merged adapter changes: ``mixed(m) <-> merged(m)`` is a flag
change; ``unmerged -> merged/mixed(m)`` is one :func:`~lora_kernels.ops.merge.merge_many_` over all layers;
``merged/mixed(m) -> unmerged`` one :func:`~lora_kernels.ops.merge.unmerge_many_` (bit-exact, from the kept
records); ``merged/mixed(m) -> merged/mixed(k)`` both. See docs/modes.md.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import numbers
import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._validation import check, check_real
from .lora_linear import LoRALinear

__all__ = ["ModeController", "VLoRAPolicy", "MODES", "Policy", "normalize_counts"]

MODES = ("unmerged", "merged", "mixed")

#: A policy: ``policy(adapter_counts, waiting_credit) -> (mode, adapter)``.
Policy = Callable[[Mapping[int, int], Optional[Sequence[float]]], Tuple[str, Optional[int]]]


def normalize_counts(adapter_counts: Union[Mapping[int, int], Sequence[int], torch.Tensor]) -> Dict[int, int]:
    """``{adapter id: count}`` (id -1 = tokens or requests with no adapter) from a mapping, or from a sequence
    indexed by adapter id (``counts[i]`` for adapter i; no -1 entry). Zero counts are dropped.

    Raises:
        TypeError: a tensor not on the CPU (the policy reads host-side counts only; see :class:`VLoRAPolicy`), or
            an id or count that is not an integral number (a str, a bool, 2.5).
        ValueError: a negative count or an adapter id below -1.
    """
    if isinstance(adapter_counts, torch.Tensor):
        if adapter_counts.device.type != "cpu":
            raise TypeError("adapter_counts: expected host-side counts (a dict, list or CPU tensor), got a "
                            f"{adapter_counts.device.type} tensor: the policy never reads the device")
        adapter_counts = adapter_counts.tolist()
    items = adapter_counts.items() if isinstance(adapter_counts, Mapping) else enumerate(adapter_counts)
    out: Dict[int, int] = {}
    for k, v in items:
        # int("3") or int(2.7) would guess: ids and counts must be integral numbers.
        for what, z in (("adapter ids", k), ("counts", v)):
            if isinstance(z, (str, bytes, bool)) or not isinstance(z, numbers.Real) or int(z) != z:
                raise TypeError(f"adapter_counts: expected integer {what}, got {z!r}")
        k, v = int(k), int(v)
        if k < -1:
            raise ValueError(f"adapter_counts: expected adapter ids >= -1, got {k}")
        if v < 0:
            raise ValueError(f"adapter_counts: expected counts >= 0, got {v} for adapter {k}")
        if v:
            out[k] = out.get(k, 0) + v
    return out


@dataclass
class VLoRAPolicy:
    """V-LoRA's mode rule (the default policy of :meth:`ModeController.auto`).

    Semantics:
        Let ``N = sum(counts)`` over the batch (adapter ids and -1), ``m = argmax_{i >= 0} counts[i]`` (ties:
        the smallest id), ``S = #{requests with waiting_credit > starving_credit}`` and ``R =
        len(waiting_credit)``. If ``counts[m] > dominant_fraction * N`` and ``S <= max_starving_fraction * R``
        (vacuous when no credit is given): ``("merged", m)`` when every token uses m, else ``("mixed", m)``.
        Otherwise ``("unmerged", None)``. An empty batch gives ``("unmerged", None)``
        (:meth:`ModeController.auto` keeps the current mode on an empty batch instead).

    Args:
        dominant_fraction: share of the batch above which the dominant adapter is merged (V-LoRA: 0.5).
        starving_credit: a request whose waiting credit is above this is starving (same unit as the scheduler's
            credit: e.g. steps or seconds waited, scaled by its SLO).
        max_starving_fraction: merging is allowed only while starving requests are at most this share of the
            requests (V-LoRA: 0.5).
        allow_mixed: when False the rule never answers ``mixed`` (a batch with a dominant adapter but other
            tokens stays unmerged): for stacks whose kernels lack mixed mode.

    Inputs are host-side: counts the scheduler already holds when it forms the batch, and per-request credits.
    The policy never reads the device (no sync): pass dicts, lists or CPU tensors.
    """

    dominant_fraction: float = 0.5
    starving_credit: float = 1.0
    max_starving_fraction: float = 0.5
    allow_mixed: bool = True

    def __post_init__(self):
        # Finite real numbers (never bool or str: TypeError); NaN would make every comparison False (no request
        # would ever count as starving), so it is a ValueError like any value out of range.
        self.dominant_fraction = check_real("dominant_fraction", self.dominant_fraction, lo=0.0)
        check(self.dominant_fraction < 1.0, "dominant_fraction", "a value in [0, 1)", self.dominant_fraction)
        self.max_starving_fraction = check_real("max_starving_fraction", self.max_starving_fraction, lo=0.0, hi=1.0)
        self.starving_credit = check_real("starving_credit", self.starving_credit)
        check(isinstance(self.allow_mixed, bool), "allow_mixed", "a bool", type(self.allow_mixed).__name__, TypeError)

    def __call__(
        self,
        adapter_counts: Union[Mapping[int, int], Sequence[int]],
        waiting_credit: Optional[Sequence[float]] = None,
    ) -> Tuple[str, Optional[int]]:
        counts = normalize_counts(adapter_counts)
        total = sum(counts.values())
        ids = [(c, -i) for i, c in counts.items() if i >= 0]
        if total == 0 or not ids:
            return "unmerged", None
        c_m, neg_m = max(ids)
        m = -neg_m
        if c_m <= self.dominant_fraction * total:
            return "unmerged", None
        if waiting_credit is not None:
            credits = waiting_credit.tolist() if isinstance(waiting_credit, torch.Tensor) else list(waiting_credit)
            if credits:
                if not all(isinstance(c, numbers.Real) and not isinstance(c, bool) and math.isfinite(c)
                           for c in credits):
                    raise ValueError(f"waiting_credit: expected finite numbers (NaN is never > the threshold), got "
                                     f"{credits[:8]!r}")
                starving = sum(1 for c in credits if float(c) > self.starving_credit)
                if starving > self.max_starving_fraction * len(credits):
                    return "unmerged", None
        if c_m == total:
            return "merged", m
        return ("mixed", m) if self.allow_mixed else ("unmerged", None)


def _merge_ops():
    return importlib.import_module("lora_kernels.ops.merge")


class ModeController:
    """Switches every :class:`LoRALinear` of a model between the unmerged, merged and mixed serving modes.

    Semantics:
        After ``set_mode("unmerged")`` every base weight is bit-identical to what it was when the controller
        was created (merges are undone from the kept records, bit-exact with ``exact=True``) and each layer
        computes ``base(x) + delta_{id(t)}``. After ``set_mode("merged", adapter=m)`` each base weight is
        ``W + s_m B_m A_m`` (rounded once to W's dtype) and the layers compute ``base(x)`` only; after
        ``set_mode("mixed", adapter=m)`` the weights are the same and the layers compute
        ``base(x) + delta_{id(t)} - delta_m`` (``delta_{-1} = 0``). Outputs of the three modes agree within the
        project's tolerance rule on any batch (merged: batches whose tokens all use m).

    Args:
        model: a module (its LoRALinear submodules are found with ``model.modules()``), a LoRALinear, or a
            sequence of LoRALinear. Each layer's base must expose ``weight`` [out_features, in_features]
            (an ``nn.Linear``; a fused q/k/v LoRAWeights maps its slices onto the fused weight's rows).
        exact: keep the side data that makes every unmerge bit-exact (default); False uses the approximate
            merge (no side data; unmerge leaves ~1 ulp differences that can accumulate).
        merge_ops: the module providing ``merge_many_`` and ``unmerge_many_`` (default
            :mod:`lora_kernels.ops.merge`); for tests and alternative backends.

    Every switch runs under ``torch.no_grad()``; merge_many_/unmerge_many_ update all layers in one grouped
    launch. The controller assumes it alone changes the base weights and the merged adapter's A/B while a
    merge is in place (do not remove or overwrite the merged adapter: switch to ``unmerged`` first).

    CUDA graphs: a graph captured in one mode bakes that mode's launches (and the merged weights) in. Register
    such graphs (:meth:`register_graph` or :meth:`capture`); :meth:`set_mode` raises RuntimeError while any is
    registered, and while a stream capture is in progress. Re-capture: ``release_graphs()``, ``set_mode(...)``,
    capture again.

    Raises:
        ValueError: no LoRALinear in ``model``, or a layer listed twice.
        TypeError: a layer whose base has no ``weight`` of shape [out, in], an item of a sequence that is not a
            LoRALinear, or ``exact`` not a bool.
    """

    def __init__(self, model: Union[nn.Module, Sequence[LoRALinear]], *, exact: bool = True,
                 merge_ops: Any = None):
        if isinstance(model, LoRALinear):
            layers = [model]
        elif isinstance(model, nn.Module):
            layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        else:
            layers = list(model)
            for i, m in enumerate(layers):
                if not isinstance(m, LoRALinear):
                    raise TypeError(f"model[{i}]: expected a LoRALinear, got {type(m).__name__}")
        if not layers:
            raise ValueError("model: expected a module containing LoRALinear layers, found none")
        if len({id(m) for m in layers}) != len(layers):  # each switch would merge the same weight twice
            raise ValueError("model: expected each LoRALinear once, got a layer listed twice")
        for i, layer in enumerate(layers):
            w = getattr(layer.base, "weight", None)
            shape = (layer.out_features, layer.in_features)
            if not isinstance(w, torch.Tensor) or tuple(w.shape) != shape:
                got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
                raise TypeError(f"layer {i}: expected base.weight of shape {shape} (a mergeable linear), got {got}")
        self.layers: List[LoRALinear] = layers
        check(isinstance(exact, bool), "exact", "a bool", type(exact).__name__, TypeError)  # (bool("no") is True)
        self.exact = exact
        self._ops = merge_ops
        self._mode = "unmerged"
        self._adapter: Optional[int] = None
        self._merged: Optional[int] = None  # adapter folded into the weights (None: clean)
        self._merged_layers: List[int] = []  # indices of the layers merged (those where the adapter is loaded)
        self._records: Optional[list] = None
        self._graphs: List[Tuple[Any, str, Optional[int]]] = []
        self._capturing = 0
        self.switches = 0  # weight-changing switches done (merge and/or unmerge passes)
        for layer in layers:
            self._set_layer(layer, "unmerged", None, check=False)

    # ---- state ---------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """The current mode: ``"unmerged"``, ``"merged"`` or ``"mixed"``."""
        return self._mode

    @property
    def adapter(self) -> Optional[int]:
        """The merged adapter (``None`` when unmerged)."""
        return self._adapter

    @property
    def records(self) -> Optional[list]:
        """The MergeRecords of the current merge (one per merged layer), or None."""
        return self._records

    @property
    def graphs(self) -> List[Any]:
        """The CUDA graphs registered (captured in the current mode)."""
        return [g for g, _, _ in self._graphs]

    def weights(self) -> List[torch.Tensor]:
        """Each layer's base weight [out, in] (the tensors the merges modify in place)."""
        return [layer.base.weight for layer in self.layers]

    def __repr__(self) -> str:
        return (f"ModeController(layers={len(self.layers)}, mode={self._mode!r}, adapter={self._adapter}, "
                f"exact={self.exact}, graphs={len(self._graphs)})")

    # ---- CUDA graph safety -----------------------------------------------------------------------------
    def register_graph(self, graph: Any) -> Any:
        """Record that ``graph`` was captured in the current mode: :meth:`set_mode` refuses to switch until
        :meth:`release_graphs`. Returns ``graph``."""
        self._graphs.append((graph, self._mode, self._adapter))
        return graph

    def release_graphs(self, graphs: Optional[Sequence[Any]] = None) -> int:
        """Forget ``graphs`` (default: all). The caller promises not to replay them after a switch (drop or
        re-capture them). Returns how many were released."""
        if graphs is None:
            n = len(self._graphs)
            self._graphs.clear()
            return n
        ids = {id(g) for g in graphs}
        keep = [e for e in self._graphs if id(e[0]) not in ids]
        n = len(self._graphs) - len(keep)
        self._graphs = keep
        return n

    @contextlib.contextmanager
    def capture(self, graph: Optional[Any] = None, **graph_kwargs) -> Iterator[Any]:
        """``with ctl.capture() as g: out = model(x)``: ``torch.cuda.graph(g, **graph_kwargs)`` that registers
        ``g`` (a new ``torch.cuda.CUDAGraph`` when omitted) once the capture succeeded. Switching inside is
        refused."""
        g = torch.cuda.CUDAGraph() if graph is None else graph
        self._capturing += 1
        try:
            with torch.cuda.graph(g, **graph_kwargs):
                yield g
        finally:
            self._capturing -= 1
        self.register_graph(g)

    def _check_switchable(self, mode: str, adapter: Optional[int]) -> None:
        if self._capturing or (torch.cuda.is_available() and torch.cuda.is_initialized()
                               and torch.cuda.is_current_stream_capturing()):
            raise RuntimeError(f"set_mode({mode!r}): a CUDA graph capture is in progress; switch before or after "
                               "capturing, never inside")
        if self._graphs:
            raise RuntimeError(
                f"set_mode({mode!r}, adapter={adapter}): {len(self._graphs)} CUDA graph(s) captured in mode "
                f"{self._mode!r} (adapter {self._adapter}) are registered and would replay the old mode's "
                "launches and weights; call release_graphs(), switch, then capture again")

    # ---- switching -------------------------------------------------------------------------------------
    def _set_layer(self, layer: LoRALinear, mode: str, adapter: Optional[int], check: bool = True) -> None:
        fn = getattr(layer, "set_serving_mode", None)
        if fn is not None:
            fn(mode, adapter)
        elif mode != "unmerged" and check:
            raise RuntimeError("LoRALinear has no set_serving_mode: this build cannot serve merged or mixed mode")

    def _loaded_layers(self, adapter: int) -> List[int]:
        return [i for i, layer in enumerate(self.layers) if adapter in layer.weights._alloc]  # (host dict)

    def _get_ops(self):
        return self._ops if self._ops is not None else _merge_ops()

    def set_mode(self, mode: str, adapter: Optional[int] = None) -> "ModeController":
        """Switch every layer to ``mode`` (``"unmerged"``; ``"merged"`` or ``"mixed"`` with ``adapter``).

        Merges and unmerges all affected layers in one grouped call each (the records are kept so every
        unmerge is bit-exact); a change between merged and mixed of the same adapter only sets flags. Layers
        where ``adapter`` is not loaded are not merged (their delta_m is 0): in mixed mode they serve as
        unmerged, in merged mode as base only. A no-op when already in that mode. Returns ``self``.

        Raises:
            ValueError: unknown mode; adapter missing for merged/mixed, given for unmerged, out of range, or
                loaded in no layer.
            RuntimeError: CUDA graphs captured in the current mode are registered (see :meth:`release_graphs`),
                a capture is in progress, or the layers cannot serve merged/mixed mode. The state is unchanged
                unless the merge itself failed after the old adapter was unmerged (then the mode is
                ``unmerged``).
        """
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r:.60}")
        if mode == "unmerged":
            if adapter is not None:
                raise ValueError(f"adapter: expected None for mode 'unmerged', got {adapter}")
        else:
            try:
                if adapter is None or isinstance(adapter, bool):
                    raise TypeError
                adapter = operator.index(adapter)
            except TypeError:
                raise ValueError(f"adapter: expected an adapter id (int) for mode {mode!r}, got {adapter!r}") from None
            n = self.layers[0].weights.max_adapters
            if not 0 <= adapter < n:
                raise ValueError(f"adapter: expected an id in [0, {n}), got {adapter}")
        if mode == self._mode and adapter == self._adapter:
            return self
        self._check_switchable(mode, adapter)
        if mode != "unmerged" and any(getattr(layer, "set_serving_mode", None) is None for layer in self.layers):
            raise RuntimeError("LoRALinear has no set_serving_mode: this build cannot serve merged or mixed mode")
        target = None if mode == "unmerged" else adapter
        target_layers: List[int] = []
        if target is not None and target != self._merged:
            target_layers = self._loaded_layers(target)
            if not target_layers:
                raise ValueError(f"adapter: {target} is loaded in no LoRALinear layer of the model")
        with torch.no_grad():
            if target != self._merged:
                ops = self._get_ops()
                unmerged_now = False
                if self._merged is not None:
                    ws = [self.layers[i].base.weight for i in self._merged_layers]
                    ops.unmerge_many_(ws, self._records)
                    self._merged, self._merged_layers, self._records = None, [], None
                    self.switches += 1
                    self._mode, self._adapter = "unmerged", None
                    unmerged_now = True
                if target is not None:
                    ws = [self.layers[i].base.weight for i in target_layers]
                    wl = [self.layers[i].weights for i in target_layers]
                    try:
                        recs = ops.merge_many_(ws, wl, [target], None, exact=self.exact)
                    except BaseException:
                        if unmerged_now:  # the weights are clean now: so must the flags be
                            for layer in self.layers:
                                self._set_layer(layer, "unmerged", None)
                        raise
                    self._merged, self._merged_layers, self._records = target, target_layers, list(recs)
                    self.switches += 1
            merged_set = set(self._merged_layers)
            for i, layer in enumerate(self.layers):
                m, a = (("unmerged", None) if mode == "mixed" and i not in merged_set  # delta_m is 0 here
                        else (mode, adapter))
                # (setting an nn.Module attribute costs microseconds: skip layers already in that state)
                if getattr(layer, "mode", None) != m or getattr(layer, "merged_adapter", None) != a:
                    self._set_layer(layer, m, a)
        self._mode, self._adapter = mode, adapter
        return self

    # ---- the auto policy -------------------------------------------------------------------------------
    def decide(
        self,
        adapter_counts: Union[Mapping[int, int], Sequence[int]],
        waiting_credit: Optional[Sequence[float]] = None,
        policy: Optional[Policy] = None,
    ) -> Tuple[str, Optional[int]]:
        """The ``(mode, adapter)`` ``policy`` (default :attr:`policy`) picks for this batch, without switching. An
        empty batch keeps the current mode. Host-side inputs only (no device read). Raises as
        :func:`normalize_counts`, and TypeError / ValueError when the policy returns no ``(mode, adapter)`` pair
        or an unknown mode."""
        counts = normalize_counts(adapter_counts)
        if sum(counts.values()) == 0:
            return self._mode, self._adapter
        pol = policy if policy is not None else self.policy
        res = pol(counts, waiting_credit)
        if not isinstance(res, (tuple, list)) or len(res) != 2:
            raise TypeError(f"policy: expected it to return a (mode, adapter) tuple, got {res!r:.80}")
        mode, adapter = res
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"policy: returned mode {mode!r:.60}, expected one of {MODES}")
        return mode, (None if mode == "unmerged" else adapter)

    def auto(
        self,
        adapter_counts: Union[Mapping[int, int], Sequence[int]],
        waiting_credit: Optional[Sequence[float]] = None,
        policy: Optional[Policy] = None,
    ) -> Tuple[str, Optional[int]]:
        """:meth:`decide`, then :meth:`set_mode` to it. Returns the ``(mode, adapter)`` now in force.

        Args:
            adapter_counts: tokens (or requests) per adapter id in the next batch, id -1 for tokens with no
                adapter: a dict, or a list indexed by adapter id. Host data the scheduler already has.
            waiting_credit: per-request waiting credit (host floats), or None.
            policy: overrides :attr:`policy` for this call: any callable ``(counts, credit) -> (mode, adapter)``.
        """
        mode, adapter = self.decide(adapter_counts, waiting_credit, policy)
        self.set_mode(mode, adapter)
        return self._mode, self._adapter

    @property
    def policy(self) -> Policy:
        """The policy :meth:`auto` uses (default :class:`VLoRAPolicy` with V-LoRA's thresholds); assignable."""
        p = getattr(self, "_policy", None)
        if p is None:
            p = self._policy = VLoRAPolicy()
        return p

    @policy.setter
    def policy(self, value: Policy) -> None:
        if not callable(value):
            raise TypeError(f"policy: expected a callable (counts, credit) -> (mode, adapter), got {value!r}")
        self._policy = value
