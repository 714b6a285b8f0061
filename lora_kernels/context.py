"""The current batch: which LoRABatch the LoRA modules of a model read when none is attached to them.

A serving loop builds one :class:`~lora_kernels.LoRABatch` per step (in place, so CUDA graphs and compiled
graphs keep seeing the same buffers) and makes it current with :func:`set_batch` or :func:`use_batch`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from .batch import LoRABatch

_current: Optional[LoRABatch] = None


def set_batch(batch: Optional[LoRABatch]) -> None:
    """Make ``batch`` current for every LoRA module without a batch of its own (None clears it)."""
    global _current
    if batch is not None and not isinstance(batch, LoRABatch):
        raise TypeError(f"batch: expected a LoRABatch or None, got {type(batch).__name__}")
    _current = batch


def current_batch() -> Optional[LoRABatch]:
    return _current


@contextlib.contextmanager
def use_batch(batch: LoRABatch) -> Iterator[LoRABatch]:
    """``with lk.use_batch(batch): model(x)``: the batch is current inside the block."""
    prev = _current
    set_batch(batch)
    try:
        yield batch
    finally:
        set_batch(prev)
