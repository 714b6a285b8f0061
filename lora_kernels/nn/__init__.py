"""Modules built on the ops: :class:`LoRALinear`, and the serving-mode controller :class:`ModeController` with
its default policy :class:`VLoRAPolicy`."""

from .lora_linear import LoRALinear
from .modes import ModeController, VLoRAPolicy

__all__ = ["LoRALinear", "ModeController", "VLoRAPolicy"]
