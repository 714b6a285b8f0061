"""Custom op ``lora_kernels::build_batch_``: fill a LoRABatch's meta buffer from per-token adapter ids.

CUDA: the compiled builder (``csrc/kernels/lora_batch.cuh``: one launch, one CTA, no host sync) when the
extension is present and verified on this GPU model (see :mod:`lora_kernels.backends`), or when forced with
``LORA_KERNELS_BACKEND=cuda``; the torch builder otherwise (also sync-free). CPU: the torch builder.

Ids of any integer dtype reach both builders through :func:`lora_kernels.batch.ids_to_int32`: the compiled builder
reads int32, so wider ids are range-masked in int64 on the device (``clamp``, no host sync, capturable) before the
cast; an out-of-range id is then still out of range in int32 and is served as -1 and counted in ``num_invalid``,
as the torch builder does. Inputs that share memory with ``meta`` (rebuilding from the batch's own
``token_adapter``) are copied first: both builders write ``meta`` while reading them.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from .._validation import overlaps
from ..batch import build_batch_torch_, ids_to_int32
from ..profiling import nvtx_range

__all__ = ["build_batch_"]


@torch.library.custom_op("lora_kernels::build_batch_", mutates_args=("meta",))
def _build_batch_op(
    meta: torch.Tensor, adapter_ids: torch.Tensor, ranks: Optional[torch.Tensor], max_tokens: int, max_adapters: int
) -> None:
    with nvtx_range("lora_kernels.build_batch_"):
        if backends.select("batch", meta.device) == "cuda":
            from .. import _ext

            # never adapter_ids.to(torch.int32): that truncates int64 ids (2**32 + 1 -> 1, another adapter)
            _ext.get().build_batch_(meta, ids_to_int32(adapter_ids, max_adapters), ranks, max_tokens, max_adapters)
        else:
            build_batch_torch_(meta, adapter_ids, ranks, max_tokens, max_adapters)


@_build_batch_op.register_fake
def _(meta, adapter_ids, ranks, max_tokens, max_adapters):
    return None


def build_batch_(
    meta: torch.Tensor, adapter_ids: torch.Tensor, ranks: Optional[torch.Tensor], max_tokens: int, max_adapters: int
) -> None:
    """Fill ``meta`` (layout :class:`~lora_kernels.batch.MetaLayout`) from ``adapter_ids``. Callers use
    :meth:`LoRABatch.build`, which validates first."""
    if adapter_ids.device != meta.device:
        adapter_ids = adapter_ids.to(meta.device, non_blocking=True)
    if ranks is not None and ranks.device != meta.device:
        ranks = ranks.to(meta.device, non_blocking=True)
    if not torch.compiler.is_compiling():  # (fake tensors have no storage to compare)
        if overlaps(adapter_ids, meta):
            adapter_ids = adapter_ids.clone()
        if ranks is not None and overlaps(ranks, meta):
            ranks = ranks.clone()
    torch.ops.lora_kernels.build_batch_(meta, adapter_ids, ranks, max_tokens, max_adapters)
