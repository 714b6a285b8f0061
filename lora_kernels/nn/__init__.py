"""Modules built on the ops: :class:`LoRALinear`, and the serving-mode controller :class:`ModeController` with
its default policy :class:`VLoRAPolicy`."""

from .lora_linear import LoRALinear
from .modes import ModeController, VLoRAPolicy
from .dual_lora import DualLoRALinear

__all__ = ["LoRALinear", "ModeController", "VLoRAPolicy"]
__all__ += ["DualLoRALinear"]

from .vce import VisualCueEnhancement  # noqa: E402

__all__ += ["VisualCueEnhancement"]
