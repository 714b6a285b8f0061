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

import weakref

from typing import Callable, Dict, Hashable, Optional, Sequence, Tuple

import torch

from ..weights import LoRAWeights

__all__ = ["StackCache", "tensor_key", "padded_weights", "slot_ranks"]


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
        self._cache: Dict[Hashable, tuple] = {}  # key -> (LoRAWeights, weak references to the source tensors)
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
        hit = self._cache.get(key)
        # The key holds addresses: a stack freed and another allocated at the same address with the same shape and
        # version would match it. The entry's weak references must still point at these very tensors.
        if hit is not None and all(r is None if t is None else r() is t for r, t in zip(hit[1], tensors)):
            return hit[0]
        if hit is None and len(self._cache) >= self.max_entries:
            self._cache.pop(next(iter(self._cache)))
        w = build()
        self.conversions += 1
        self._cache[key] = (w, [None if t is None else weakref.ref(t) for t in tensors])
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


def _live_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """bool: which rank rows of ``t`` hold a non-zero (reducing every dim after ``dim``)."""
    return t.ne(0).flatten(dim + 1).any(-1)


def slot_ranks(a_planes: Optional[torch.Tensor], b_t: Optional[torch.Tensor],
               slice_outs: Sequence[int]) -> torch.Tensor:
    """int32 [S, N]: each slot's true rank in padded stacks, ``1 +`` its last rank row that contributes.

    An engine copies an adapter of rank r into rows ``[:r]`` of a zeroed slot (vLLM's ``set_lora`` after
    ``reset_lora``), so the rows past r are zero. Row k of slot i contributes ``A[i, k]`` (outer) ``B[i, :, k]``:
    nothing when either side is zero, so the delta with ranks cut there is exactly the padded one. A side that is
    None (a shrink-only or expand-only conversion) does not constrain the rank.

    One pass over the stacks and one host sync (:meth:`LoRAWeights.from_padded` reads ranks on the host): call
    it once per conversion (a load event), never per step.

    Args:
        a_planes: [S, N, r, in] or [N, r, in] (one slice), or None.
        b_t: [N, r, sum(slice_outs)] (B transposed), or None.
    """
    S = len(slice_outs)
    ref = a_planes if a_planes is not None else b_t
    live = None
    if a_planes is not None:
        live = _live_rows(a_planes if a_planes.ndim == 4 else a_planes.unsqueeze(0), 2)  # [S, N, r]
    if b_t is not None:
        cols = torch.split(b_t, list(slice_outs), dim=2)
        b_live = torch.stack([_live_rows(c, 1) for c in cols])  # [S, N, r]
        live = b_live if live is None else live & b_live
    r = live.shape[-1]
    k = torch.arange(1, r + 1, device=ref.device, dtype=torch.int32)
    return (live.to(torch.int32) * k).amax(-1).to(torch.int32).reshape(S, -1)


def set_scales(w: LoRAWeights, scales: torch.Tensor) -> None:
    """``w.scales[s, i] = scales[i]`` for every slice (a device copy; no host sync, capturable)."""
    w.scales.copy_(scales.to(w.scales.dtype).reshape(1, -1)[:, : w.max_adapters].expand_as(w.scales))


def slice_bounds(offsets: Sequence[int]) -> Tuple[int, ...]:
    """Widths from cumulative offsets ``[0, o1, o2, ..., total]``."""
    return tuple(int(b) - int(a) for a, b in zip(offsets[:-1], offsets[1:]))
