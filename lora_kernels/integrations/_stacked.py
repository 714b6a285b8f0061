"""Engine-layout adapter stacks -> :class:`~lora_kernels.LoRAWeights`, cached until the engine rewrites them.

vLLM and SGLang keep every adapter slot of a layer in padded stacks (A: [N, r_max, in] per slice, B: [N, out,
r_max], B not transposed). The library's kernels read the rank-paged layout (``b`` holds B transposed, one
``a`` plane per slice), so each distinct stack is converted once (one gather + one transpose on the device)
and reused while it is unchanged.

"Unchanged" is read from the tensors' version counters (every in-place write, e.g. an engine's ``copy_`` of a
new adapter into a slot, bumps it): a later call with a bumped counter converts again. Tensors created under
``torch.inference_mode`` have no version counter: those are converted on every call (correct, not free);
call :meth:`StackCache.freeze` to promise they only change through :meth:`StackCache.invalidate`.
"""

from __future__ import annotations

from typing import Callable, Dict, Hashable, Optional, Sequence, Tuple

import torch

from ..weights import LoRAWeights

__all__ = ["StackCache", "tensor_key", "padded_weights"]


def tensor_key(t: torch.Tensor) -> Optional[Hashable]:
    """Identity + version of a tensor, or None when it has no version counter (inference tensors)."""
    try:
        v = t._version
    except RuntimeError:
        return None
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, v)


class StackCache:
    """``get(tensors, extra, build)``: the LoRAWeights built from ``tensors`` (re)built only when needed."""

    def __init__(self, max_entries: int = 256):
        self._cache: Dict[Hashable, LoRAWeights] = {}
        self.max_entries = max_entries
        self.frozen = False
        self.conversions = 0  # how many times a stack was converted (tests and stats)

    def freeze(self, frozen: bool = True) -> None:
        """Cache stacks without version counters too (they then change only with :meth:`invalidate`)."""
        self.frozen = frozen

    def invalidate(self) -> None:
        self._cache.clear()

    def get(self, tensors: Sequence[Optional[torch.Tensor]], extra: Hashable,
            build: Callable[[], LoRAWeights]) -> LoRAWeights:
        keys = []
        for t in tensors:
            if t is None:
                keys.append(None)
                continue
            k = tensor_key(t)
            if k is None:
                if not self.frozen:
                    self.conversions += 1
                    return build()
                k = (t.data_ptr(), tuple(t.shape), t.dtype)
            keys.append(k)
        key = (tuple(keys), extra)
        w = self._cache.get(key)
        if w is None:
            if len(self._cache) >= self.max_entries:
                self._cache.pop(next(iter(self._cache)))
            w = build()
            self.conversions += 1
            self._cache[key] = w
        return w


def padded_weights(
    a_planes: Optional[torch.Tensor],
    b_t: torch.Tensor,
    slice_outs: Sequence[int],
    ranks: Optional[torch.Tensor] = None,
) -> LoRAWeights:
    """Wrap padded planes as LoRAWeights (zero-copy over the given tensors).

    Args:
        a_planes: [S, N, r_max, in] (or [N, r_max, in] for one slice); None when only B is used (expand-only
            callers): a zero stand-in with in = 1 is used.
        b_t: [N, r_max, sum(slice_outs)], B transposed, unit stride in the last dim.
        ranks: int32 [S, N] or [N] (default r_max everywhere: padded rows are zero, so the delta is exact).
    """
    N, r, S = b_t.shape[0], b_t.shape[1], len(slice_outs)
    if a_planes is None:
        shape = (N, r, 1) if S == 1 else (S, N, r, 1)
        a_planes = torch.zeros(shape, dtype=b_t.dtype, device=b_t.device)
    return LoRAWeights.from_padded(a_planes, b_t, ranks=ranks, slice_outs=list(slice_outs))


def set_scales(w: LoRAWeights, scales: torch.Tensor) -> None:
    """``w.scales[s, i] = scales[i]`` for every slice (a device copy; no host sync, capturable)."""
    w.scales.copy_(scales.to(w.scales.dtype).reshape(1, -1)[:, : w.max_adapters].expand_as(w.scales))


def slice_bounds(offsets: Sequence[int]) -> Tuple[int, ...]:
    """Widths from cumulative offsets ``[0, o1, o2, ..., total]``."""
    return tuple(int(b) - int(a) for a, b in zip(offsets[:-1], offsets[1:]))
