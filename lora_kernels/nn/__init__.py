"""Modules built on the ops: :class:`LoRALinear`."""

from .lora_linear import LoRALinear

__all__ = ["LoRALinear"]
