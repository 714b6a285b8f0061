"""Engine-layout adapter stacks -> :class:`~lora_kernels.LoRAWeights`, converted once and refreshed in place.

vLLM and SGLang keep every adapter slot of a layer in padded stacks (A: [N, r_max, in] per slice, B: [N, out,
r_max], B not transposed). The library's kernels read the rank-paged layout (``b`` holds B transposed, one
``a`` plane per slice), so each distinct stack is converted once (one gather + one transpose on the device)
and reused while it is unchanged.

A conversion is refreshed **in place**: the same LoRAWeights object and storage get the new contents (and ranks),
so a CUDA graph that captured kernels reading them replays with the new weights (a new conversion at another
address would leave the graph reading the old one, or freed memory). A refresh happens when
:meth:`StackCache.refresh` is called (the engines' load events: vLLM's ``lora_index_to_id`` change, SGLang's slot
update hook) and, at a use, when a source tensor's version counter moved (an in-place write, e.g. an engine's
``copy_`` of a new adapter into a slot). Tensors created under ``torch.inference_mode`` have no version counter:
those are converted on every call (correct, not free) unless :meth:`StackCache.freeze` promises they only change
through :meth:`StackCache.refresh` (or :meth:`StackCache.invalidate`).
"""

from __future__ import annotations

import weakref

from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from ..weights import LoRAWeights

__all__ = ["StackCache", "padded_weights", "slot_ranks"]


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _copy_into(w: LoRAWeights, new: LoRAWeights) -> bool:
    """Copy ``new``'s contents, offsets and ranks into ``w`` (same layout); False when the layouts differ."""
    same = (w.a.shape == new.a.shape and w.b.shape == new.b.shape and w.ranks.shape == new.ranks.shape
            and w.a.dtype == new.a.dtype and w.slice_outs == new.slice_outs)
    if not same:
        return False
    with torch.no_grad():
        for dst, src in ((w.a, new.a), (w.b, new.b)):
            if dst.data_ptr() != src.data_ptr() or dst.stride() != src.stride():  # a view of the source: as is
                dst.copy_(src)
        w.offsets.copy_(new.offsets)
        w.ranks.copy_(new.ranks)
    return True


class StackCache:
    """``get(tensors, extra, build)``: the LoRAWeights ``build(*tensors)`` makes, built once per source tensors and
    ``extra`` and refreshed in place (the module docstring says when).

    ``build`` is kept for the refreshes and called with the live source tensors: it must not hold them itself (the
    entry references them weakly, so a freed stack's entry is dropped, not kept alive)."""

    def __init__(self, max_entries: int = 256):
        # key -> [LoRAWeights, weak references to the source tensors, build, the sources' versions]
        self._entries: Dict[Hashable, list] = {}
        self.max_entries = max_entries
        self.frozen = False
        self.conversions = 0  # how many times a stack was converted or refreshed (tests and stats)

    def freeze(self, frozen: bool = True) -> None:
        """Cache stacks without version counters too (they then change only with :meth:`refresh`)."""
        self.frozen = frozen

    def invalidate(self) -> None:
        """Forget every conversion (the next use converts again, into new storage; not for captured graphs)."""
        self._entries.clear()

    def refresh(self) -> None:
        """Rebuild every conversion whose source tensors are alive, in place; drop the others."""
        for key in list(self._entries):
            e = self._entries[key]
            if any(r is not None and r() is None for r in e[1]):
                del self._entries[key]
            else:
                self._refresh(e)

    def rank_capacity(self) -> Optional[int]:
        """The smallest r_max among the cached conversions (the largest rank a refresh can hold), None if none."""
        return min((e[0].max_rank for e in self._entries.values()), default=None)

    def _refresh(self, e: list) -> None:
        new = e[2](*[None if r is None else r() for r in e[1]])
        if not _copy_into(e[0], new):  # the build changed layout (not for the same sources): a new object
            e[0] = new
        e[3] = [None if r is None else _version(r()) for r in e[1]]
        self.conversions += 1

    def get(self, tensors: Sequence[Optional[torch.Tensor]], extra: Hashable,
            build: Callable[..., LoRAWeights]) -> LoRAWeights:
        versions: List[Optional[int]] = [None if t is None else _version(t) for t in tensors]
        if not self.frozen and any(t is not None and v is None for t, v in zip(tensors, versions)):
            self.conversions += 1
            return build(*tensors)
        key = (tuple(None if t is None else (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
                     for t in tensors), extra)
        e = self._entries.get(key)
        # The key holds addresses: a stack freed and another allocated at the same address with the same shape
        # would match it. The entry's weak references must still point at these very tensors.
        if e is not None and all(r is None if t is None else r() is t for r, t in zip(e[1], tensors)):
            if e[3] != versions:
                self._refresh(e)
            return e[0]
        if e is None and len(self._entries) >= self.max_entries:
            self._entries.pop(next(iter(self._entries)))
        w = build(*tensors)
        self.conversions += 1
        self._entries[key] = [w, [None if t is None else weakref.ref(t) for t in tensors], build, versions]
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
