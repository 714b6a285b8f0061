"""The current per-request adapter ids: what a patched model reads when no ``adapter_ids=`` is passed.

``with lk.adapters(ids): model(input_ids)`` makes ``ids`` current for the block. ``ids`` is int [batch] (one
adapter per sequence; expanded to every token of [batch, seq] inputs) or int [batch, seq] (one per token);
``-1`` means no adapter. Adapter names are resolved by the caller (e.g. :class:`~.peft.PeftServing` maps
names to ids); this module holds tensors only.

The current ids are process-wide, like :func:`lora_kernels.use_batch` (not per thread): threads that run
forwards concurrently must pass ``model(input_ids, adapter_ids=ids)`` instead, or each would serve the other's
ids.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence, Union

import torch

from ..batch import check_ids_dtype

__all__ = ["adapters", "current_adapter_ids", "set_adapter_ids", "as_ids_tensor"]

_current: Optional[torch.Tensor] = None

IdsLike = Union[torch.Tensor, Sequence[int]]


def as_ids_tensor(ids: IdsLike, name: str = "ids") -> torch.Tensor:
    """``ids`` as an integer tensor (a list becomes int32 on the CPU, int64 when a value does not fit int32;
    tensors of any integer dtype are kept as they are: the batch builder range-checks them at full width).

    Raises:
        TypeError: not a tensor or sequence of ints, or a non-integer tensor.
        ValueError: more than 2 dims, or a listed id outside int64.
    """
    if isinstance(ids, torch.Tensor):
        t = ids
    elif isinstance(ids, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in ids):
        vals = list(ids)
        if not all(-(2**63) <= v < 2**63 for v in vals):
            raise ValueError(f"{name}: expected ids that fit int64, got {max(vals, key=abs)}")
        wide = any(not -(2**31) <= v < 2**31 for v in vals)  # never truncated into another adapter's id
        t = torch.tensor(vals, dtype=torch.int64 if wide else torch.int32)
    else:
        raise TypeError(f"{name}: expected an integer tensor or a list of ints, got {type(ids).__name__}")
    check_ids_dtype(name, t)
    if t.ndim not in (1, 2):
        raise ValueError(f"{name}: expected 1 dim [batch] or 2 dims [batch, seq], got shape {tuple(t.shape)}")
    return t


def set_adapter_ids(ids: Optional[IdsLike]) -> None:
    """Make ``ids`` current (None clears them). See :func:`adapters`."""
    global _current
    _current = None if ids is None else as_ids_tensor(ids)


def current_adapter_ids() -> Optional[torch.Tensor]:
    return _current


@contextlib.contextmanager
def adapters(ids: IdsLike) -> Iterator[torch.Tensor]:
    """``with lk.adapters(ids): model(...)``: per-request adapter ids for every forward inside the block.

    Args:
        ids: int [batch] (one adapter per sequence, -1 = none) or int [batch, seq] (one per token).

    Raises:
        TypeError / ValueError naming ``ids`` (see :func:`as_ids_tensor`); the previous ids are kept.
    """
    global _current
    t = as_ids_tensor(ids)
    prev = _current
    _current = t
    try:
        yield t
    finally:
        _current = prev
