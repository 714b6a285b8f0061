"""Custom op ``lora_kernels::build_batch_``: fill a LoRABatch's meta buffer from per-token adapter ids.

CUDA: the compiled builder (``csrc/kernels/lora_batch.cuh``: one launch, one CTA, no host sync) when the
extension is present and verified on this GPU model (see :mod:`lora_kernels.backends`), or when forced with
``LORA_KERNELS_BACKEND=cuda``; the torch builder otherwise (also sync-free). CPU: the torch builder.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from ..batch import build_batch_torch_
from ..profiling import nvtx_range

__all__ = ["build_batch_"]


@torch.library.custom_op("lora_kernels::build_batch_", mutates_args=("meta",))
def _build_batch_op(
    meta: torch.Tensor, adapter_ids: torch.Tensor, ranks: Optional[torch.Tensor], max_tokens: int, max_adapters: int
) -> None:
    with nvtx_range("lora_kernels.build_batch_"):
        if backends.select("batch", meta.device) == "cuda":
            from .. import _ext

            _ext.get().build_batch_(meta, adapter_ids.to(torch.int32), ranks, max_tokens, max_adapters)
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
    torch.ops.lora_kernels.build_batch_(meta, adapter_ids, ranks, max_tokens, max_adapters)
