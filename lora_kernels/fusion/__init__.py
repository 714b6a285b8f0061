"""Adapter fusion: task arithmetic and TIES over many LoRA adapters (chunked, on the adapters' device, dense or
low-rank output), L-LoRA's linearisation as a rank-2r adapter, and V-LoRA's accuracy-aware grouping of tasks
into few fused adapters. See docs/fusion.md."""

from ..federated.adapters import LoRAFactors
from .grouping import TaskGrouping, group_tasks
from .linearize import linearize
from .select import kth_largest_magnitude
from .task_vectors import task_arithmetic, ties, ties_keep_count

__all__ = ["LoRAFactors", "TaskGrouping", "group_tasks", "kth_largest_magnitude", "linearize", "task_arithmetic",
           "ties", "ties_keep_count"]
