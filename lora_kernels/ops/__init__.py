"""Op families: each module validates arguments, registers its ``torch.ops.lora_kernels.*`` custom ops (with
fake impls) and dispatches to a kernel backend."""

from .batch_ops import build_batch_
from .merge import MergeRecord, merge_, merge_many_, unmerge_, unmerge_many_
from .sgmv import add_lora_, expand_, shrink
from .dual_lora import dual_lora, dual_lora_
from .deform import deform_pool, deform_sample
from .lora_linear import lora_delta, lora_linear

__all__ = [
    "build_batch_", "shrink", "expand_", "add_lora_",
    "merge_", "unmerge_", "merge_many_", "unmerge_many_", "MergeRecord",
]
__all__ += ["deform_pool", "deform_sample"]
__all__ += ["dual_lora_", "dual_lora"]
__all__ += ["lora_delta", "lora_linear"]
