"""Adapter arguments of the fusion routines: normalisation and validation, all before any computation.

An *adapter* (one task, one layer) is anything :mod:`lora_kernels.federated.adapters` accepts for a layer:
``LoRAFactors(A, B, scale)``, ``(A, B)`` (scale 1), ``(A, B, scale)`` with ``A`` [r, in] and ``B`` [out, r]
(PEFT's ``lora_A.weight`` / ``lora_B.weight``), or a :class:`~lora_kernels.LoRAWeights` slot
``(weights, adapter_id[, slice_index])``. Its task vector is ``scale * B @ A``. Many layers at once: every task
is a dict ``{layer name: adapter}`` with the same keys. The same normalisation as the federated code, so a
client adapter and a task adapter are the same object (and fusion results, :class:`LoRAFactors`, feed back in).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

from .._validation import check
from ..federated.adapters import LoRAFactors, check_clients

__all__ = ["LoRAFactors", "PLAIN_KEY", "resolve_tasks", "resolve_lambdas", "compute_dtype", "check_finite"]

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


def resolve_lambdas(name: str, lambdas: Union[float, Sequence[float]], n: int) -> List[float]:
    """One float for every task, or one per task; finite. Returns n floats."""
    if isinstance(lambdas, torch.Tensor):
        lambdas = lambdas.reshape(-1).tolist() if lambdas.numel() != 1 else float(lambdas)
    if isinstance(lambdas, (int, float)) and not isinstance(lambdas, bool):
        vals = [float(lambdas)] * n
    elif isinstance(lambdas, Sequence) and not isinstance(lambdas, str):
        check(len(lambdas) == n, name, f"one float or {n} floats (one per task)", f"{len(lambdas)} values")
        check(all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in lambdas), name, "floats",
              lambdas, TypeError)
        vals = [float(v) for v in lambdas]
    else:
        raise TypeError(f"{name}: expected a float or a sequence of {n} floats, got {type(lambdas).__name__}")
    check(all(math.isfinite(v) for v in vals), name, "finite values", vals)
    return vals


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
