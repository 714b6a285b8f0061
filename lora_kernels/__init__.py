"""lora_kernels: GPU kernels for batched heterogeneous LoRA.

``import lora_kernels`` registers the custom ops ``torch.ops.lora_kernels.*`` and never initialises CUDA,
imports Triton or builds the extension: those happen on first use on a CUDA tensor.

Quick tour::

    import torch, lora_kernels as lk
    w = lk.LoRAWeights(4096, 4096, max_adapters=64, max_rank=64, dtype=torch.bfloat16, device="cuda")
    i = w.add(A, B, alpha=32)                                # A [r, 4096], B [4096, r]
    batch = lk.LoRABatch(max_tokens=8192, max_adapters=64, device="cuda")
    batch.build(adapter_ids, ranks=w.ranks)                 # int32 [T], -1 = no adapter
    lk.add_lora_(y, x, w, batch)                            # y[t] += s_i * (x[t] A_i^T) B_i^T
"""

from . import backends, reference
from .batch import LoRABatch
from .context import current_batch, set_batch, use_batch
from .ops import MergeRecord, add_lora_, build_batch_, expand_, merge_, merge_many_, shrink, unmerge_, unmerge_many_
from .ops import deform_pool, deform_sample
from .ops import lora_delta, lora_linear
from .ops import dual_lora, dual_lora_
from .dual_weights import DualLoRAWeights
from .profiling import nvtx, set_nvtx
from .weights import LoRAWeights
from .pool import AdapterFormatError, AdapterPool, UnsupportedAdapterError  # issue 7: PEFT adapters, LRU pool
from . import nn  # noqa: E402  (after the ops it uses)
from .integrations.ids import adapters  # issue 7: `with lk.adapters(ids): model(...)`

__version__ = "0.1.0"

__all__ = [
    "LoRABatch", "LoRAWeights", "add_lora_", "shrink", "expand_", "build_batch_",
    "merge_", "unmerge_", "merge_many_", "unmerge_many_", "MergeRecord",
    "set_batch", "use_batch", "current_batch", "backends", "reference", "nn", "nvtx", "set_nvtx", "tuning",
    "__version__", "AdapterPool", "AdapterFormatError", "UnsupportedAdapterError",
]
__all__ += ["dual_lora_", "dual_lora", "DualLoRAWeights"]
__all__ += ["deform_pool", "deform_sample"]
__all__ += ["lora_delta", "lora_linear"]
__all__ += ["adapters", "integrations"]
from .pool import AdapterInUseError, PoolFullError  # noqa: E402  (the pool's other two errors, as documented)

__all__ += ["AdapterInUseError", "PoolFullError", "fusion", "federated"]


def __getattr__(name):
    # Submodules that pull heavier dependencies load on first access.
    if name in ("tuning", "triton", "cli", "federated") or name == "fusion":  # fusion: issue 8, `lk.fusion.ties(...)`
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'lora_kernels' has no attribute {name!r}")
from . import tensor_parallel  # noqa: E402  (issue 17: lk.tensor_parallel.shard_weights and its ops)
__all__ += ["tensor_parallel"]
