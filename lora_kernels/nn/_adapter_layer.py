"""What the adapter layers (:class:`LoRALinear`, :class:`DualLoRALinear`) share: their storage checked against
``base``, their ``batch=`` argument, and the batch a forward reads."""

from __future__ import annotations

from typing import Optional, TypeVar

import torch
from torch import nn

from ..batch import LoRABatch
from ..context import current_batch

_W = TypeVar("_W")


def layer_storage(
    base: nn.Module,
    storage: Optional[_W],
    cls: type,
    arg: str,
    max_adapters: Optional[int],
    max_rank: Optional[int],
    default_dtype: torch.dtype,
) -> _W:
    """The adapter storage of a layer wrapping ``base``: ``storage`` checked, or a new empty ``cls``.

    Semantics:
        ``storage`` None: ``cls(base.in_features, base.out_features, max_adapters, max_rank)`` with the dtype of
        base's first parameter when floating (else ``default_dtype``) and its device (else the CPU). Then the
        storage must be a ``cls`` whose in/out features match base's where base declares them.

    Args:
        base: the wrapped module (``in_features`` / ``out_features`` read when present).
        storage: the caller's storage or None; ``arg`` is its argument name in the messages.
        cls: the storage class (``LoRAWeights``, ``DualLoRAWeights``), built as
            ``cls(in, out, max_adapters, max_rank, dtype=, device=)``.

    Raises:
        ValueError naming ``arg`` when storage is None and a size is missing, or the features differ from base's;
        TypeError naming ``arg`` when it is not a ``cls``.
    """
    in_f = getattr(base, "in_features", None)
    out_f = getattr(base, "out_features", None)
    name = cls.__name__
    if storage is None:
        if None in (in_f, out_f, max_adapters, max_rank):
            raise ValueError(f"{arg}: expected a {name}, or base with in/out_features plus max_adapters and "
                             f"max_rank, got {arg}=None, max_adapters={max_adapters}, max_rank={max_rank}")
        p = next(base.parameters(), None)
        storage = cls(in_f, out_f, max_adapters, max_rank,
                      dtype=p.dtype if p is not None and p.is_floating_point() else default_dtype,
                      device=p.device if p is not None else "cpu")
    if not isinstance(storage, cls):
        raise TypeError(f"{arg}: expected a {name}, got {type(storage).__name__}")
    if in_f is not None and in_f != storage.in_features:
        raise ValueError(f"{arg}: expected in_features {in_f} (base.in_features), got {storage.in_features}")
    if out_f is not None and out_f != storage.out_features:
        raise ValueError(f"{arg}: expected out_features {out_f} (base.out_features), got {storage.out_features}")
    return storage


def check_layer_batch(batch: Optional[LoRABatch]) -> None:
    """A layer's ``batch=`` argument: a LoRABatch or None (TypeError naming ``batch`` otherwise)."""
    if batch is not None and not isinstance(batch, LoRABatch):
        raise TypeError(f"batch: expected a LoRABatch or None, got {type(batch).__name__}")


def forward_batch(batch: Optional[LoRABatch], layer: str) -> LoRABatch:
    """The batch a forward of ``layer`` (its class name, for the message) reads: its own ``batch`` when attached,
    else :func:`lora_kernels.current_batch`. RuntimeError when there is neither."""
    if batch is None:
        batch = current_batch()
        if batch is None:
            raise RuntimeError(f"{layer}: no LoRABatch; pass batch= to the layer or run under lk.use_batch(batch) "
                               "(a batch of all -1 ids serves the base layer alone)")
    return batch
