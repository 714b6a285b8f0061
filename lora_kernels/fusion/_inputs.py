"""Adapter arguments of the fusion routines: normalisation and validation, all before any computation.

An *adapter* (one task, one layer) is anything :mod:`lora_kernels.federated.adapters` accepts for a layer:
``LoRAFactors(A, B, scale)``, ``(A, B)`` (scale 1), ``(A, B, scale)`` with ``A`` [r, in] and ``B`` [out, r]
(PEFT's ``lora_A.weight`` / ``lora_B.weight``), or a :class:`~lora_kernels.LoRAWeights` slot
``(weights, adapter_id[, slice_index])``. Its task vector is ``scale * B @ A``. Many layers at once: every task
is a dict ``{layer name: adapter}`` with the same keys. The same normalisation as the federated code, so a
client adapter and a task adapter are the same object (and fusion results, :class:`LoRAFactors`, feed back in).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

from .._validation import check, check_each, check_real
from ..federated.adapters import LoRAFactors, check_clients

__all__ = ["LoRAFactors", "PLAIN_KEY", "resolve_tasks", "resolve_lambdas", "compute_dtype", "check_finite",
           "check_coefficients", "real_values"]

PLAIN_KEY = "layer"  # the layer name errors use when the tasks are plain adapters, not dicts


def resolve_tasks(adapters: Any) -> Tuple[Optional[List[str]], List[List[LoRAFactors]]]:
    """Normalise ``adapters`` (a sequence over tasks of adapters, or of dicts of adapters).

    Returns ``(keys, layers)``: ``keys`` is None for plain adapters (one layer) or the layer names;
    ``layers[l][i]`` is task i's adapter in layer l. Raises ValueError/TypeError naming ``adapters[i][layer]``
    for an empty list, mixed dicts and adapters, differing layer names, unknown item types, and adapters of one
    layer whose (out, in) shapes or devices disagree. Reads no tensor data."""
    if isinstance(adapters, (torch.Tensor, Mapping, str)) or not isinstance(adapters, Sequence):
        raise TypeError(f"adapters: expected a sequence (one entry per task), got {type(adapters).__name__}")
    check(len(adapters) >= 1, "adapters", "at least one task", "an empty sequence")
    plain = not any(isinstance(a, Mapping) for a in adapters)
    tasks = check_clients([{PLAIN_KEY: a} for a in adapters] if plain else list(adapters), "adapters")
    keys = [PLAIN_KEY] if plain else list(tasks[0].keys())
    return (None if plain else keys), [[t[k] for t in tasks] for k in keys]


def real_values(name: str, values: Any, n: int, what: str = "floats") -> List[float]:
    """One real number for all n entries, or n of them (a sequence, or a 1-D tensor / numpy array); each a finite
    real number (int, float, numpy scalar, 0-dim tensor; never bool, str, complex or None: TypeError), NaN and
    +-inf refused (ValueError). Errors name ``name`` and the index. Returns n Python floats."""
    if isinstance(values, torch.Tensor) or (type(values).__module__ == "numpy" and hasattr(values, "ndim")):
        if values.ndim > 1:
            raise ValueError(f"{name}: expected one value or {n} values, got shape {tuple(values.shape)}")
        if isinstance(values, torch.Tensor) and values.device.type == "meta":
            raise TypeError(f"{name}: expected values, got a meta tensor")
        values = values.tolist()  # (bool / complex elements are refused below)
    if isinstance(values, (numbers.Number, bool)):
        return [check_real(name, values)] * n
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise TypeError(f"{name}: expected a float or a sequence of {n} {what}, got {type(values).__name__}")
    values = list(values)
    check(len(values) == n, name, f"one float or {n} {what} (one per task)", f"{len(values)} values")
    return check_each(name, values, check_real)


def resolve_lambdas(name: str, lambdas: Union[float, Sequence[float]], n: int) -> List[float]:
    """One float for every task, or one per task; finite real numbers (see :func:`real_values`). Returns n
    floats."""
    return real_values(name, lambdas, n)


def check_coefficients(name: str, keys: Optional[List[str]], layers: List[List[LoRAFactors]],
                       lams: Sequence[float]) -> None:
    """Every task's coefficient ``lambda_i * scale_i`` (formed in float64) must be finite in its layer's compute
    dtype (:func:`compute_dtype`): a lambda of 1e300 would otherwise give inf factors / NaN deltas in fp32.
    ValueError naming ``name`` (the lambdas), the task and the layer."""
    for li, layer in enumerate(layers):
        lim = torch.finfo(compute_dtype(layer)).max
        for i, (f, lam) in enumerate(zip(layer, lams)):
            if not abs(lam * f.scale) <= lim:
                raise ValueError(f"{name}: expected lambda * scale finite in {compute_dtype(layer)} (|x| <= "
                                 f"{lim:.4g}; fp64 factors allow more), got {lam!r} * {f.scale!r} for "
                                 f"{where(keys, li, i)}")


def compute_dtype(layer: Sequence[LoRAFactors]) -> torch.dtype:
    """fp64 when any factor is fp64, else fp32 (fp16/bf16 factors are upcast: sums over tasks and ranks are
    formed in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for f in layer for t in (f.A, f.B)) else torch.float32


def where(keys: Optional[List[str]], layer: int, task: int) -> str:
    """How errors name task ``task`` of layer ``layer``."""
    return f"adapters[{task}]" + ("" if keys is None else f"[{keys[layer]!r}]")


def check_finite(keys: Optional[List[str]], layers: List[List[LoRAFactors]]) -> None:
    """ValueError naming the first adapter with a NaN or an infinity in A or B (reads device data: one sync
    per factor; fusion is an offline step)."""
    for li, layer in enumerate(layers):
        for i, f in enumerate(layer):
            for n, t in (("A", f.A), ("B", f.B)):
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{where(keys, li, i)}.{n}: expected finite values, got NaN or inf")
