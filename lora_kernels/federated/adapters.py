"""A client's adapter as the federated code sees it: per layer, the factors ``(A [r, in], B [out, r])`` and a scale.

Semantics:
    A client adapter is a mapping ``layer name -> layer``; the layer's delta is ``scale * B @ A``
    (``A`` [r, in] is PEFT's ``lora_A.weight``, ``B`` [out, r] is ``lora_B.weight``, ``scale`` = alpha / r
    or alpha / sqrt(r) with rsLoRA). A layer may be given as

    - :class:`LoRAFactors` ``(A, B, scale)``, or a plain tuple ``(A, B)`` (scale 1) or ``(A, B, scale)``;
    - a :class:`~lora_kernels.LoRAWeights` slot ``(weights, adapter_id)`` or ``(weights, adapter_id, slice)``
      (the slice index is required for fused projections with several slices). The factors are read as views.

    Ranks may differ per client and per layer; every client must have the same layer names, and each layer the
    same ``in`` and ``out`` in every client. :func:`from_weights` turns a model's ``{layer: LoRAWeights}`` and
    one adapter id into a client adapter (one entry per slice, named ``"layer[s]"`` for fused projections).
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .._validation import check, check_int, check_real
from ..weights import LoRAWeights

__all__ = ["LoRAFactors", "ClientAdapter", "as_client", "from_weights", "check_clients", "check_client_weights",
           "client_weight_values"]

FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class LoRAFactors(NamedTuple):
    """One layer of one adapter: delta = ``scale * B @ A``; ``A`` [r, in], ``B`` [out, r]."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense ``[out, in]`` delta (for tests and small layers; the federated code never needs it)."""
        dt = dtype or self.A.dtype
        return self.scale * (self.B.to(dt) @ self.A.to(dt))


ClientAdapter = Mapping[str, Union[LoRAFactors, Tuple[Any, ...]]]


def from_weights(weights: Union[LoRAWeights, Mapping[str, LoRAWeights]], adapter_id: int,
                 name: str = "layer") -> Dict[str, LoRAFactors]:
    """``{layer: LoRAFactors}`` of one loaded adapter of every layer's :class:`LoRAWeights` (views, no copy).

    A single ``LoRAWeights`` is named ``name``; a slice ``s`` of a fused group is named ``"layer[s]"``.
    """
    if not isinstance(weights, (LoRAWeights, Mapping)):
        raise TypeError(f"weights: expected a LoRAWeights or a mapping layer name -> LoRAWeights, got "
                        f"{type(weights).__name__}")
    layers = {name: weights} if isinstance(weights, LoRAWeights) else dict(weights)
    out: Dict[str, LoRAFactors] = {}
    for lname, w in layers.items():
        check(isinstance(w, LoRAWeights), f"weights[{lname!r}]", "a LoRAWeights", type(w).__name__, TypeError)
        for s in range(w.num_slices):
            A, B, sc = w.adapter(adapter_id, s)
            out[lname if w.num_slices == 1 else f"{lname}[{s}]"] = LoRAFactors(A, B, sc)
    return out


def _as_layer(v: Any, where: str) -> LoRAFactors:
    if isinstance(v, LoRAFactors):
        A, B, sc = v
    elif isinstance(v, tuple) and len(v) in (2, 3) and isinstance(v[0], LoRAWeights):
        w, aid = v[0], v[1]
        sl = v[2] if len(v) == 3 else None
        check(sl is not None or w.num_slices == 1, where, "(weights, adapter_id, slice_index) for a fused group "
              f"of {w.num_slices} slices", "no slice index")
        aid = check_int(f"{where}.adapter_id", aid)
        check(aid in w.loaded, where, f"a loaded adapter id of the LoRAWeights (loaded: {w.loaded})", aid)
        if sl is not None:
            sl = check_int(f"{where}.slice_index", sl, lo=0, hi=w.num_slices - 1)
        A, B, sc = w.adapter(aid, 0 if sl is None else sl)
    elif isinstance(v, (tuple, list)) and len(v) in (2, 3):
        A, B = v[0], v[1]
        sc = v[2] if len(v) == 3 else 1.0
    else:
        raise TypeError(f"{where}: expected LoRAFactors, (A, B), (A, B, scale) or (LoRAWeights, adapter_id[, "
                        f"slice]), got {type(v).__name__}")
    for nm, t in (("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}.{nm}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FACTOR_DTYPES:
            raise TypeError(f"{where}.{nm}: expected dtype in {[str(d) for d in FACTOR_DTYPES]}, got {t.dtype}")
        check(t.ndim == 2, f"{where}.{nm}", "2 dims", f"shape {tuple(t.shape)}")
    check(A.shape[0] >= 1 and B.shape[1] == A.shape[0], where, "A [r, in] and B [out, r] with the same r >= 1",
          f"A {tuple(A.shape)}, B {tuple(B.shape)}")
    check(A.device == B.device, where, "A and B on one device", f"{A.device} and {B.device}")
    # a finite real number: int, float, numpy scalar or 0-dim tensor; never bool (True was read as 1.0), str
    # or complex (TypeError), nor NaN / inf / a Python int beyond float64 (ValueError)
    return LoRAFactors(A, B, check_real(f"{where}.scale", sc))


def as_client(adapter: ClientAdapter, where: str = "client") -> Dict[str, LoRAFactors]:
    """Normalise one client adapter to ``{layer: LoRAFactors}`` (no copies). Raises TypeError/ValueError."""
    if not isinstance(adapter, Mapping):
        raise TypeError(f"{where}: expected a mapping layer name -> (A, B[, scale]), got {type(adapter).__name__}")
    check(len(adapter) >= 1, where, "at least one layer", "an empty mapping")
    return {k: _as_layer(v, f"{where}[{k!r}]") for k, v in adapter.items()}


def check_clients(clients: Sequence[ClientAdapter], name: str = "clients") -> List[Dict[str, LoRAFactors]]:
    """Normalise and cross-check K client adapters: same layer names, same (in, out) per layer, one device.

    Returns the normalised list. Raises TypeError/ValueError naming the client and layer; reads no tensor data.
    """
    if isinstance(clients, Mapping) or not isinstance(clients, Sequence):
        raise TypeError(f"{name}: expected a sequence of client adapters, got {type(clients).__name__}")
    check(len(clients) >= 1, name, "at least one client", 0)
    norm = [as_client(c, f"{name}[{k}]") for k, c in enumerate(clients)]
    ref = norm[0]
    dev = next(iter(ref.values())).A.device
    for k, c in enumerate(norm):
        if set(c) != set(ref):
            missing, extra = sorted(set(ref) - set(c)), sorted(set(c) - set(ref))
            raise ValueError(f"{name}[{k}]: expected the layers of {name}[0], got missing {missing}, extra {extra}")
        for lname, f in c.items():
            f0 = ref[lname]
            check(f.A.shape[1] == f0.A.shape[1] and f.B.shape[0] == f0.B.shape[0], f"{name}[{k}][{lname!r}]",
                  f"in={f0.A.shape[1]}, out={f0.B.shape[0]} (as {name}[0])",
                  f"in={f.A.shape[1]}, out={f.B.shape[0]}")
            check(f.A.device == dev, f"{name}[{k}][{lname!r}]", f"device {dev}", f.A.device)
    return norm


def client_weight_values(weights: Any, K: int, name: str = "weights") -> List[Fraction]:
    """The K raw weights as exact rationals, checked (see :func:`check_client_weights`; the sum is not checked
    here: one process of a distributed aggregation may hold only zero weights)."""
    if isinstance(weights, torch.Tensor):
        if weights.dtype == torch.bool or weights.is_complex() or weights.device.type == "meta" or weights.ndim > 1:
            raise TypeError(f"{name}: expected None or a sequence of numbers (one per client), got a tensor of "
                            f"dtype {weights.dtype}, shape {tuple(weights.shape)} on {weights.device}")
        weights = weights.detach().reshape(-1).tolist()  # (exact: every float dtype widens to float64)
    if isinstance(weights, (str, bytes, Mapping)) or not isinstance(weights, Iterable):
        raise TypeError(f"{name}: expected None or a sequence of numbers (one per client), got {weights!r:.80}")
    weights = list(weights)
    if not all(isinstance(w, numbers.Real) and not isinstance(w, (bool,)) and type(w).__name__ != "bool_"
               for w in weights):
        raise TypeError(f"{name}: expected None or a sequence of numbers (one per client), got {weights!r:.80}")
    check(len(weights) == K, name, f"{K} weights (one per client)", len(weights))
    exact: List[Fraction] = []
    for w in weights:
        if isinstance(w, numbers.Integral):
            exact.append(Fraction(int(w)))
            continue
        f = float(w)  # (a numpy float widens exactly)
        if not math.isfinite(f):
            raise ValueError(f"{name}: expected finite values, got {_show(weights)}")
        exact.append(Fraction(f))
    if not all(w >= 0 for w in exact):
        raise ValueError(f"{name}: expected non-negative values, got {_show(weights)}")
    return exact


def _show(weights: Sequence[Any]) -> str:
    """The first weights for a message (huge ints abbreviated: float() of them would overflow)."""
    out = [f"~1e{len(str(abs(int(w)))) - 1}" if isinstance(w, numbers.Integral) and abs(int(w)) > 10**15 else repr(w)
           for w in weights[:8]]
    return "[" + ", ".join(out) + (", ...]" if len(weights) > 8 else "]")


def check_client_weights(weights: Optional[Sequence[float]], K: int, name: str = "weights") -> List[float]:
    """Normalised aggregation weights ``p_k = w_k / sum(w)`` (uniform when None).

    Semantics: ``w`` are K finite real numbers >= 0 with a positive sum: ints (sample counts, any size), floats,
    numpy scalars, or a 1-D real tensor / array. The sum and the quotients are computed exactly (rational
    arithmetic) and each ``p_k`` is the correctly rounded float64 of ``w_k / sum(w)``: weights as large as
    ``1e308`` each (whose float64 sum overflows), integers beyond float64, or as small as subnormals all
    normalise, and scaling every weight by a power of two never changes the result.

    Raises TypeError naming ``name`` for anything but real numbers (bool, str, complex, None; bool / complex
    tensors; a meta tensor), ValueError for a wrong length, a negative, NaN or infinite weight, or weights summing
    to zero. Reads a tensor's values to the host (one sync for a CUDA tensor).
    """
    if weights is None:
        return [1.0 / K] * K
    exact = client_weight_values(weights, K, name)
    total = sum(exact)
    if not total > 0:
        raise ValueError(f"{name}: expected a positive sum (not all zero), got {_show([float(w) for w in exact])}")
    return [float(w / total) for w in exact]
