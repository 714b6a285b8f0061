"""Federated aggregation of LoRA adapters with mixed client ranks (FLoRA, FedMLLM).

- :mod:`.adapters`: the data model (per layer ``(A [r, in], B [out, r], scale)``, or a LoRAWeights slot).
- :mod:`.aggregate`: :func:`fedavg` (inexact baseline, error reported), :func:`stack` (exact),
  :func:`stack_svd` (exact stack, truncated SVD from the factors), :func:`redistribute` (back to client ranks).
- :mod:`.lowrank`: the batched low-rank maths (stacking, QR-based SVD of ``B @ A``, truncation, norms).
- :mod:`.optimizers`: FedAvgM, FedAdagrad, FedYogi, FedAdam as fused multi-tensor updates; ``fedprox_term``.
- :mod:`.distributed`: the same aggregation across processes with torch.distributed (imported on access).

See docs/federated.md.
"""

from . import lowrank
from .adapters import ClientAdapter, LoRAFactors, as_client, from_weights
from .aggregate import Aggregate, exact_delta, fedavg, redistribute, stack, stack_svd
from .optimizers import FedAdagrad, FedAdam, FedAvgM, FedYogi, ServerOptimizer, factor_tensors, fedprox_term

__all__ = [
    "LoRAFactors", "ClientAdapter", "as_client", "from_weights", "Aggregate", "fedavg", "stack", "stack_svd",
    "redistribute", "exact_delta", "ServerOptimizer", "FedAvgM", "FedAdagrad", "FedYogi", "FedAdam", "fedprox_term",
    "factor_tensors", "lowrank", "distributed",
]


def __getattr__(name):
    if name == "distributed":  # torch.distributed is only imported when asked for
        import importlib

        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module 'lora_kernels.federated' has no attribute {name!r}")
