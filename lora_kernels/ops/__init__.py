"""Op families: each module validates arguments, registers its ``torch.ops.lora_kernels.*`` custom ops (with
fake impls) and dispatches to a kernel backend."""

from .batch_ops import build_batch_
from .sgmv import add_lora_, expand_, shrink

__all__ = ["build_batch_", "shrink", "expand_", "add_lora_"]
