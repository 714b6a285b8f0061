"""CUDA-graph decode with per-request adapters: :class:`DecodeGraph`.

Semantics:
    A decode step is ``out = step(adapter_ids=ids, **inputs)`` over static buffers: ``ids`` int32 [batch] (new ids
    of any integer dtype are narrowed without aliasing: :func:`lora_kernels.batch.ids_to_int32`) and
    each named input (default: ``input_ids`` int64 [batch, 1]). For a patched model the step's forward
    pre-hook expands ``ids`` to the step's tokens and rebuilds the model's :class:`~lora_kernels.LoRABatch` in
    place (fixed capacity, device-only work), then every patched layer runs its LoRA delta. :meth:`capture`
    records all of it (batch build included) once; :meth:`replay` copies new ids and inputs into the static
    buffers (device-to-device when they are on the GPU) and replays: no re-capture, no host sync, no Python per
    layer. ``output`` is the static output tensor the replays overwrite.

    :meth:`run_eager` runs the same step function on the same static buffers without a graph (any device):
    what a replay computes, used to check the static-buffer logic on the CPU.

:meth:`DecodeGraph.with_static_cache` makes the step a real decode step over a transformers ``StaticCache``
(static ``input_ids`` and ``cache_position`` buffers; :meth:`DecodeGraph.prefill` fills the cache). An engine
with its own cache passes its buffers as ``static_inputs`` and a ``step`` that uses them. The plain default
step runs the model on one new token per sequence without a cache (the projections and LoRA of a decode step,
attention over the new token only).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from .._validation import check, check_tensor
from ..batch import check_ids_dtype, check_ids_range, ids_to_int32
from .transformers import LoRAPatch

__all__ = ["DecodeGraph"]

Step = Callable[..., torch.Tensor]


def _default_step(model) -> Step:
    def step(adapter_ids: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, adapter_ids=adapter_ids, use_cache=False).logits

    return step


class DecodeGraph:
    """One decode step of a patched model, captured once and replayed with new adapter ids and tokens.

    Args:
        patch: the :class:`~lora_kernels.integrations.transformers.LoRAPatch` of the model.
        batch_size: sequences per step (the graph's fixed shape).
        step: ``step(adapter_ids=..., **static_inputs) -> Tensor``; default: the model's logits for one token
            per sequence (see the module docstring).
        static_inputs: ``{name: tensor}`` buffers the step reads (default ``{"input_ids": zeros int64 [batch,
            1]}`` on the model's device); the graph reads them in place.
        warmup: eager runs on a side stream before capture (lazy initialisation, Triton compilation).

    Raises:
        TypeError / ValueError naming the argument.
    """

    def __init__(self, patch: LoRAPatch, batch_size: int, *, step: Optional[Step] = None,
                 static_inputs: Optional[Dict[str, torch.Tensor]] = None, warmup: int = 2):
        check(isinstance(patch, LoRAPatch), "patch", "a LoRAPatch (from patch_model)", type(patch).__name__,
              TypeError)
        check(isinstance(batch_size, int) and batch_size >= 1, "batch_size", "an int >= 1", batch_size)
        self.patch = patch
        self.batch_size = batch_size
        self.device = patch.batch.device
        self.step = step or _default_step(patch.model)
        if static_inputs is None:
            static_inputs = {"input_ids": torch.zeros(batch_size, 1, dtype=torch.int64, device=self.device)}
        for k, v in static_inputs.items():
            check_tensor(f"static_inputs[{k!r}]", v, device=self.device)
        self.static_inputs = dict(static_inputs)
        self.adapter_ids = torch.full((batch_size,), -1, dtype=torch.int32, device=self.device)
        self.warmup = warmup
        self.graph = None
        self.output: Optional[torch.Tensor] = None
        self.captures = 0

    @classmethod
    def with_static_cache(cls, patch: LoRAPatch, batch_size: int, max_cache_len: int,
                          **kwargs) -> "DecodeGraph":
        """A decode step over a transformers ``StaticCache`` (KV cache of fixed size, updated in place).

        Static inputs: ``input_ids`` int64 [batch, 1] and ``cache_position`` int64 [1] (the position written
        by the step; every sequence is at the same position). Fill the cache with :meth:`prefill` first; then
        each :meth:`replay` (or :meth:`run_eager`) takes the new token and its position. ``self.cache`` is the
        cache. Needs transformers (``StaticCache(config=..., max_cache_len=...)``).
        """
        from transformers import StaticCache

        model = patch.model
        dev = patch.batch.device
        cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        inputs = {"input_ids": torch.zeros(batch_size, 1, dtype=torch.int64, device=dev),
                  "cache_position": torch.zeros(1, dtype=torch.int64, device=dev)}

        def step(adapter_ids: torch.Tensor, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
            pos = cache_position.view(1, 1).expand(input_ids.shape[0], 1)
            return model(input_ids=input_ids, adapter_ids=adapter_ids, past_key_values=cache,
                         cache_position=cache_position, position_ids=pos, use_cache=True).logits

        dg = cls(patch, batch_size, step=step, static_inputs=inputs, **kwargs)
        dg.cache = cache
        dg.max_cache_len = max_cache_len
        return dg

    def prefill(self, input_ids: torch.Tensor, adapter_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ([batch, P] tokens) eagerly into the static cache (positions ``0 .. P-1``); returns
        its logits and sets the static ``cache_position`` to P (so a capture's warm-up writes only the slot the
        first replay overwrites). Only for :meth:`with_static_cache` graphs."""
        cache = getattr(self, "cache", None)
        check(cache is not None, "prefill", "a DecodeGraph made by with_static_cache()", "no static cache",
              RuntimeError)
        check_tensor("input_ids", input_ids, ndim=2, device=self.device)
        B, P = input_ids.shape
        check(B == self.batch_size and P + 1 <= self.max_cache_len, "input_ids",
              f"[{self.batch_size}, P] with P < max_cache_len={self.max_cache_len}", tuple(input_ids.shape))
        pos = torch.arange(P, device=self.device)
        with torch.inference_mode():
            out = self.patch.model(input_ids=input_ids, adapter_ids=adapter_ids, past_key_values=cache,
                                   cache_position=pos, position_ids=pos.view(1, P).expand(B, P),
                                   use_cache=True).logits
        self.static_inputs["cache_position"].fill_(P)
        return out

    def _load(self, adapter_ids: torch.Tensor, inputs: Dict[str, torch.Tensor]) -> None:
        """Check everything, then copy into the static buffers (a refusal changes nothing). The int32 ids buffer
        receives :func:`~lora_kernels.batch.ids_to_int32` of the ids: a wide id out of range stays out of range
        (served as -1 and counted in ``batch.num_invalid``) instead of being truncated into another adapter's id;
        CPU ids are range-checked first when the patch validates."""
        check_tensor("adapter_ids", adapter_ids, shape=(self.batch_size,))
        check_ids_dtype("adapter_ids", adapter_ids)
        unknown = sorted(set(inputs) - set(self.static_inputs))
        check(not unknown, "inputs", f"names among {sorted(self.static_inputs)}", unknown)
        for k, v in inputs.items():
            check_tensor(k, v, shape=tuple(self.static_inputs[k].shape))
        n = self.patch.max_adapters
        if self.patch.validate and adapter_ids.device.type == "cpu":
            check_ids_range(adapter_ids, n)
        self.adapter_ids.copy_(ids_to_int32(adapter_ids, n), non_blocking=True)
        for k, v in inputs.items():
            self.static_inputs[k].copy_(v, non_blocking=True)

    def _run(self) -> torch.Tensor:
        with torch.inference_mode():
            return self.step(adapter_ids=self.adapter_ids, **self.static_inputs)

    def run_eager(self, adapter_ids: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """Copy into the static buffers and run the step without a graph (any device); returns its output."""
        self._load(adapter_ids, inputs)
        return self._run()

    def capture(self) -> "DecodeGraph":
        """Record the step (batch build + model) in a CUDA graph over the static buffers.

        Raises:
            RuntimeError: not on a CUDA device.
        """
        if self.device.type != "cuda":
            raise RuntimeError(f"DecodeGraph.capture: expected a model on a CUDA device, got {self.device} "
                               "(use run_eager on the CPU)")
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.output = self._run()
        self.graph = g
        self.captures += 1
        return self

    def replay(self, adapter_ids: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """New ids (int [batch]) and inputs copied in, graph replayed; returns :attr:`output` (overwritten by the
        next replay: clone what you keep). Captures on first use."""
        if self.graph is None:
            self.capture()
        self._load(adapter_ids, inputs)
        self.graph.replay()
        return self.output
