"""LoRABatch: per-token adapter ids -> device metadata for the segmented kernels.

Semantics:
    Given ``adapter_ids`` int32 [T] (``-1`` = no adapter), the batch holds, on the device:

    * ``token_adapter`` [T]: the ids as the kernels see them (an id outside ``[-1, max_adapters)`` becomes
      ``-1`` and is counted in ``num_invalid``: kernels never index out of bounds).
    * ``sorted_token_ids`` [T]: a stable permutation of the tokens sorted by adapter id; tokens with ``-1``
      come last, in their original order.
    * ``active_adapters`` [A]: the adapter ids present in the batch, ascending, ``-1`` after ``num_active``.
    * ``seg_start`` / ``seg_len`` [A]: segment ``k`` is ``sorted_token_ids[seg_start[k] : seg_start[k] +
      seg_len[k]]``, all tokens of adapter ``active_adapters[k]``; ``seg_len`` is 0 after ``num_active``.
    * ``num_active``, ``max_rank`` (max rank over active adapters and slices, 0 when no ranks were given),
      ``num_valid`` (tokens with an adapter) and ``num_invalid`` (ids out of range), as 1-element views.

    ``A = min(max_adapters, max_tokens)`` bounds the number of active adapters. Every field is a view into one
    preallocated int32 buffer (``meta``); the work plan (``plan``, :mod:`lora_kernels.plan`) is another. A rebuild
    writes both in place (they are never reallocated), the builders never sync with the host, and it can be
    captured in a CUDA graph; the ops receive ``meta`` (and the kernels that use it, ``plan``). A rebuild is not
    allocation-free: the torch builder and the plan's builder allocate device temporaries on every call (from
    the caching allocator, or the graph's pool under capture), and ids that are not int32 are narrowed into a new
    tensor. (:meth:`LoRABatch.build`'s id validation, on by default, syncs once for ids on a GPU.)

The builder is a CUDA kernel (``csrc/kernels/lora_batch.cuh``) when the compiled extension is present and verified
on this GPU model (or forced; :mod:`lora_kernels.backends`), and the torch implementation below otherwise (same
outputs, also sync-free). Both are exposed through the custom op ``torch.ops.lora_kernels.build_batch_``.

Ids of any integer dtype (int8/16/32/64, uint8/16/32/64) are accepted. Both builders read int32, so wider ids
are first narrowed by :func:`ids_to_int32`, which saturates instead of truncating (a device op, no host sync):
an int64 id such as ``2**32 + 1`` stays out of range (served as -1 and counted in ``num_invalid``) instead of
becoming id 1, another adapter. Floating, complex and bool ids are refused (TypeError naming adapter_ids).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from ._validation import check, check_int, check_tensor
from .layouts import META, offsets_class
from .plan import PlanLayout, build_plan_

__all__ = ["LoRABatch", "MetaLayout", "build_batch_torch_", "ids_to_int32", "check_ids_range", "check_ids_dtype",
           "INT_DTYPES"]

#: Integer dtypes accepted for adapter ids and segment tensors (bool is not an integer here).
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64)
# Lossless in int32, so no range masking is needed before the cast.
_FITS_INT32 = frozenset((torch.int8, torch.int16, torch.int32, torch.uint8, torch.uint16))
_INT64_MAX = 2**63 - 1
#: Largest meta buffer the builders and kernels index with int32 (also the CUDA builder's limit).
MAX_META_ELEMENTS = 2**31 - 1
# The metadata's size is linear in its capacities (lora_kernels.layouts.META): size = _C0 + _CT Tc + _CA Ac.
_C0 = META.offsets(max_tokens=0, max_active=0)["size"]
_CT = META.offsets(max_tokens=1, max_active=0)["size"] - _C0
_CA = META.offsets(max_tokens=0, max_active=1)["size"] - _C0
_SIZE_TEXT = META.offset_expr("size").replace("max_active", "min(max_tokens, max_adapters)")
#: Largest token capacity whose metadata fits MAX_META_ELEMENTS (Ac = Tc at worst).
MAX_TOKENS = (MAX_META_ELEMENTS - _C0) // (_CT + _CA)


def max_capacity(max_adapters: int) -> int:
    """Largest ``max_tokens`` of a batch with ``max_adapters`` slots: its metadata (``META.size`` with
    ``max_active = min(Tc, N)`` int32 entries) must fit :data:`MAX_META_ELEMENTS`."""
    c1 = (MAX_META_ELEMENTS - _C0 - _CA * max_adapters) // _CT  # Tc >= N
    return c1 if c1 >= max_adapters else min(MAX_TOKENS, max_adapters)


def check_ids_dtype(name: str, t: torch.Tensor) -> None:
    """TypeError naming ``name`` unless ``t`` has an integer dtype (:data:`INT_DTYPES`; bool, floating and
    complex ids are refused: a float id 1.9 has no meaning, and would be truncated to 1)."""
    if t.dtype not in INT_DTYPES:
        raise TypeError(f"{name}: expected an integer dtype (int8/16/32/64 or uint8/16/32/64), got {t.dtype}")


def _as_int64(t: torch.Tensor) -> torch.Tensor:
    """``t`` as int64 without wrap-around: uint64 values >= 2**63 (negative when reinterpreted) saturate to
    2**63 - 1 (they are out of every range the library accepts). Device ops only, no host sync."""
    if t.dtype == torch.int64:
        return t
    if t.dtype == torch.uint64:  # torch implements almost no op on uint64: reinterpret, then saturate
        v = t.view(torch.int64)
        return torch.where(v < 0, torch.full_like(v, _INT64_MAX), v)
    return t.to(torch.int64)


def ids_to_int32(adapter_ids: torch.Tensor, max_adapters: int) -> torch.Tensor:
    """Adapter ids of any integer dtype as the int32 ids the builders read, **without aliasing** (no id ever
    becomes another adapter's).

    Semantics: an id in ``[-1, max_adapters)`` is kept; any other id (whatever its width) becomes a value that is
    still out of range in int32 (``-2`` below, ``max_adapters`` above), so the builders serve it as ``-1`` and count
    it in ``num_invalid``. int32 ids are returned as they are (the same tensor) and the other dtypes that fit
    int32 are only cast; wider ones are range-masked in int64 *before* narrowing (``clamp`` then cast: device ops,
    no host sync, capturable). ``max_adapters`` must be < 2**31 - 1 (:class:`LoRABatch` checks it).

    Raises:
        TypeError naming adapter_ids for a non-integer dtype.
    """
    dt = adapter_ids.dtype
    if dt == torch.int32:
        return adapter_ids
    check_ids_dtype("adapter_ids", adapter_ids)
    if dt in _FITS_INT32:
        return adapter_ids.to(torch.int32)
    return _as_int64(adapter_ids).clamp(-2, max_adapters).to(torch.int32)


@offsets_class(META)
@dataclass(frozen=True)
class MetaLayout:
    """Offsets of each field inside the int32 ``meta`` buffer of a batch with capacities (Tc, Ac).

    One property per field of :data:`lora_kernels.layouts.META` (``token_adapter``, ``sorted_token_ids``,
    ``active_adapters``, ``seg_start``, ``seg_len``, ``num_active``, ``max_rank``, ``num_valid``, ``num_invalid``)
    and ``size``: the layout is described there once; the CUDA builder reads the generated
    ``csrc/kernels/layouts.h`` and the Triton kernels receive these offsets as arguments.
    """

    max_tokens: int
    max_active: int

    @property
    def scalars(self) -> int:
        """Offset of the four scalars: num_active, max_rank, num_valid, num_invalid, in that order."""
        return self.num_active

    @staticmethod
    def from_meta(meta: torch.Tensor, max_tokens: int) -> "MetaLayout":
        """Recover the layout from a meta buffer and its token capacity (ops receive only these)."""
        return _layout_of(meta.numel(), max_tokens)


@functools.lru_cache(maxsize=256)
def _layout_of(numel: int, max_tokens: int) -> MetaLayout:
    """The layout of a meta buffer of ``numel`` entries: META's size is linear in max_active, so invert it (cached:
    launchers ask per call)."""
    base = MetaLayout(max_tokens, 0).size
    per = MetaLayout(max_tokens, 1).size - base
    return MetaLayout(max_tokens, (numel - base) // per)


def check_ids_range(adapter_ids: torch.Tensor, max_adapters: int, name: str = "adapter_ids") -> None:
    """ValueError naming ``name`` when an id (any integer dtype, compared at its full width: ``2**32 + 1`` is out
    of range, not 1) is outside ``[-1, max_adapters)``; the message gives the first such id and its index. Reads
    the ids (one host sync when they are on a GPU)."""
    check_ids_dtype(name, adapter_ids)
    ids = ids_to_int32(adapter_ids, max_adapters)  # keeps every id's in/out-of-range class
    bad = (ids < -1) | (ids >= max_adapters)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        got = adapter_ids[i : i + 1].tolist()[0]  # (tolist: uint64 values above 2**63 too)
        where = "token" if name == "adapter_ids" else "index"
        raise ValueError(f"{name}: expected ids in [-1, {max_adapters}) (max_adapters), got {got} at {where} {i}")


def build_batch_torch_(
    meta: torch.Tensor,
    adapter_ids: torch.Tensor,
    ranks: Optional[torch.Tensor],
    max_tokens: int,
    max_adapters: int,
) -> None:
    """Torch implementation of the batch builder (CPU, or CUDA without the verified extension). No host sync.

    Writes every field of ``meta`` (layout :class:`MetaLayout`) for ``adapter_ids`` [T] of any integer dtype
    (narrowed by :func:`ids_to_int32`: no id becomes another adapter's). ``ranks`` is int32 [S, N] or [N]
    (N >= max_adapters) or None. Device ops only, but not allocation-free: every call allocates temporaries of
    O(T + max_adapters) elements (masks and sort keys, the sort's permutation, per-adapter counts, the compaction
    buffers), plus copies of the ids / ranks when they are on another device or of another dtype.
    """
    lay = MetaLayout.from_meta(meta, max_tokens)
    T = adapter_ids.shape[0]
    N = max_adapters
    A = lay.max_active
    dev = meta.device
    ids = ids_to_int32(adapter_ids.to(device=dev), N)
    valid = (ids >= 0) & (ids < N)
    invalid = (ids < -1) | (ids >= N)
    tok = torch.where(valid, ids, torch.full_like(ids, -1))
    meta[lay.token_adapter : lay.token_adapter + T].copy_(tok)
    # key N sorts "no adapter" last; a stable sort keeps token order inside each segment.
    key = torch.where(valid, ids, torch.full_like(ids, N)).to(torch.int64)
    order = torch.sort(key, stable=True).indices
    meta[lay.sorted_token_ids : lay.sorted_token_ids + T].copy_(order.to(torch.int32))
    counts = torch.zeros(N + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:N]
    starts = torch.cumsum(counts, 0) - counts
    active = counts > 0
    # Compaction without nonzero() (which would sync): inactive adapters scatter into a dump slot A.
    pos = torch.cumsum(active.to(torch.int64), 0) - 1
    dst = torch.where(active, pos, torch.full_like(pos, A))
    arange_n = torch.arange(N, dtype=torch.int32, device=dev)
    act = torch.full((A + 1,), -1, dtype=torch.int32, device=dev)
    act.scatter_(0, dst, arange_n)
    sst = torch.zeros(A + 1, dtype=torch.int32, device=dev)
    sst.scatter_(0, dst, starts.to(torch.int32))
    sln = torch.zeros(A + 1, dtype=torch.int32, device=dev)
    sln.scatter_(0, dst, counts.to(torch.int32))
    meta[lay.active_adapters : lay.active_adapters + A].copy_(act[:A])
    meta[lay.seg_start : lay.seg_start + A].copy_(sst[:A])
    meta[lay.seg_len : lay.seg_len + A].copy_(sln[:A])
    s = lay.scalars
    meta[s].copy_(active.sum())
    if ranks is not None and N > 0:
        r = ranks.reshape(-1, ranks.shape[-1])[:, :N].to(device=dev, dtype=torch.int32)
        masked = torch.where(active.unsqueeze(0), r, torch.zeros_like(r))
        meta[s + 1].copy_(masked.max())
    else:
        meta[s + 1].zero_()
    meta[s + 2].copy_(valid.sum())
    meta[s + 3].copy_(invalid.sum())


class LoRABatch:
    """Device metadata for one batch of tokens that each use (at most) one adapter.

    Args:
        max_tokens: capacity in tokens (T of any batch built into this object must be <= it).
        max_adapters: number of adapter slots ids may refer to (ids in ``[0, max_adapters)``; ``-1`` = none).
        device: where the metadata lives (the device of the activations).

    Build with :meth:`build` (in place, capturable) or :meth:`from_ids` / :meth:`from_segments`.
    """

    def __init__(self, max_tokens: int, max_adapters: int, device: torch.device | str = "cpu"):
        max_tokens = check_int("max_tokens", max_tokens, lo=1)
        # N + 1 sort keys and the "out of range" marker N must fit int32 (ids_to_int32, both builders)
        max_adapters = check_int("max_adapters", max_adapters, lo=1, hi=2**31 - 2)
        layout = MetaLayout(max_tokens, min(max_tokens, max_adapters))
        check(layout.size <= MAX_META_ELEMENTS, "max_tokens",
              f"at most {max_capacity(max_adapters)} tokens for max_adapters={max_adapters} (the metadata, "
              f"{_SIZE_TEXT} int32 entries, must fit {MAX_META_ELEMENTS})",
              max_tokens)
        self.max_tokens = max_tokens
        self.max_adapters = max_adapters
        self.device = torch.device(device)
        self.layout = layout
        self.meta = torch.zeros(self.layout.size, dtype=torch.int32, device=self.device)
        self.meta[self.layout.active_adapters : self.layout.seg_start].fill_(-1)
        # the work plan (exact tile lists + the persistent kernel's counters, zero between calls): lora_kernels.plan
        self.plan_layout = PlanLayout(max_tokens, self.layout.max_active)
        self.plan = torch.zeros(self.plan_layout.size, dtype=torch.int32, device=self.device)
        self._workspace = torch.empty(0, dtype=torch.uint8, device=self.device)
        self.num_tokens = 0

    # ---- field views -------------------------------------------------------------------------------
    def _view(self, start: int, n: int) -> torch.Tensor:
        return self.meta[start : start + n]

    @property
    def max_active(self) -> int:
        return self.layout.max_active

    @property
    def token_adapter(self) -> torch.Tensor:
        return self._view(self.layout.token_adapter, self.num_tokens)

    @property
    def sorted_token_ids(self) -> torch.Tensor:
        return self._view(self.layout.sorted_token_ids, self.num_tokens)

    @property
    def active_adapters(self) -> torch.Tensor:
        return self._view(self.layout.active_adapters, self.max_active)

    @property
    def seg_start(self) -> torch.Tensor:
        return self._view(self.layout.seg_start, self.max_active)

    @property
    def seg_len(self) -> torch.Tensor:
        return self._view(self.layout.seg_len, self.max_active)

    @property
    def num_active(self) -> torch.Tensor:
        return self._view(self.layout.scalars, 1)

    @property
    def max_rank(self) -> torch.Tensor:
        return self._view(self.layout.scalars + 1, 1)

    @property
    def num_valid(self) -> torch.Tensor:
        return self._view(self.layout.scalars + 2, 1)

    @property
    def num_invalid(self) -> torch.Tensor:
        return self._view(self.layout.scalars + 3, 1)

    # ---- building ----------------------------------------------------------------------------------
    def build(
        self, adapter_ids: torch.Tensor, ranks: Optional[torch.Tensor] = None, validate: bool = True
    ) -> "LoRABatch":
        """Rebuild this batch in place from ``adapter_ids`` [T] (T <= max_tokens; T = 0 is allowed).

        ``adapter_ids`` may have any integer dtype (int8/16/32/64, uint8/16/32/64); it is range-checked at its
        full width before being narrowed to int32 (:func:`ids_to_int32`), so no id is ever served by another
        adapter. ``ranks`` (int32 [N] or [S, N] with N >= max_adapters, e.g. ``LoRAWeights.ranks``) fills
        ``max_rank``. Rewrites ``meta`` and (except for a batch on the meta device) the work plan ``plan`` in
        place; the module docstring says what a rebuild allocates.

        With ``validate`` (the default) ids outside ``[-1, max_adapters)`` raise ``ValueError`` and the batch is
        left unchanged: free when the ids are on the CPU, one host sync when they are on the GPU; skipped while a
        CUDA graph is being captured, under torch.compile, and for meta tensors. Without it, such ids are served
        as ``-1`` and counted in ``num_invalid`` (device work only, no sync; check later with :meth:`check`).

        Raises:
            TypeError: ``adapter_ids`` is not a tensor of an integer dtype (floating, bool, complex ids), or
                ``ranks`` is not int32.
            ValueError: wrong ndim, T > max_tokens, ids or ranks on the meta device for a batch that is not,
                ``ranks`` with a last dim < max_adapters, or ids out of range (with ``validate``). Nothing is
                changed when it raises.
        """
        from .ops.batch_ops import build_batch_

        check_tensor("adapter_ids", adapter_ids, ndim=1)
        check_ids_dtype("adapter_ids", adapter_ids)
        T = adapter_ids.shape[0]
        check(T <= self.max_tokens, "adapter_ids", f"at most max_tokens={self.max_tokens} tokens", f"{T} tokens")
        check(adapter_ids.device.type != "meta" or self.device.type == "meta", "adapter_ids",
              f"ids with data (on {self.device} or the CPU)", "a tensor on the meta device")
        if ranks is not None:
            check_tensor("ranks", ranks, dtypes=(torch.int32,))
            check(ranks.ndim >= 1 and ranks.shape[-1] >= self.max_adapters, "ranks",
                  f"last dim >= max_adapters={self.max_adapters}", tuple(ranks.shape))
            check(ranks.device.type != "meta" or self.device.type == "meta", "ranks",
                  f"ranks with data (on {self.device} or the CPU)", "a tensor on the meta device")
        if validate and T > 0 and adapter_ids.device.type != "meta" and not _capturing() \
                and not torch.compiler.is_compiling():
            self._check_range(adapter_ids)  # before any write: a refusal leaves the batch as it was
        build_batch_(self.meta, adapter_ids, ranks, self.max_tokens, self.max_adapters)
        if self.device.type != "meta":
            build_plan_(self.plan, self.meta, self.layout, T)
        self.num_tokens = T
        return self

    def workspace(self, nbytes: int) -> torch.Tensor:
        """A byte buffer of at least ``nbytes`` on the batch's device, owned by the batch and reused by every
        op on it (the partial sums and h of the Triton persistent kernel and the CUDA decode kernel, the fused LoRA
        linear's workspace; contents irrelevant between calls). Grows (one allocation) only when a larger one is
        asked for, e.g. on the first call with wider weights: warm up once before capturing a CUDA graph."""
        if self._workspace.numel() < nbytes:
            self._workspace = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self._workspace

    def _check_range(self, adapter_ids: torch.Tensor, name: str = "adapter_ids") -> None:
        """:func:`check_ids_range` against this batch's ``max_adapters``."""
        check_ids_range(adapter_ids, self.max_adapters, name)

    def check(self) -> None:
        """Raise ``ValueError`` if the last build saw ids out of range (one host sync)."""
        n = int(self.num_invalid.item())
        if n:
            raise ValueError(
                f"adapter_ids: expected ids in [-1, {self.max_adapters}) (max_adapters), got {n} id(s) out of range; "
                "those tokens were served with no adapter"
            )

    @classmethod
    def from_ids(
        cls,
        adapter_ids: torch.Tensor,
        max_adapters: int,
        ranks: Optional[torch.Tensor] = None,
        max_tokens: Optional[int] = None,
        validate: bool = True,
    ) -> "LoRABatch":
        """Allocate a batch sized for ``adapter_ids`` (or ``max_tokens`` >= T) on its device and build it
        (:meth:`build`: same dtypes, rules and errors)."""
        check_tensor("adapter_ids", adapter_ids, ndim=1)
        check_ids_dtype("adapter_ids", adapter_ids)
        T = adapter_ids.shape[0]
        if max_tokens is not None:
            max_tokens = check_int("max_tokens", max_tokens, lo=0)
            check(max_tokens >= T, "max_tokens", f"a capacity >= the {T} tokens of adapter_ids", max_tokens)
        b = cls(max(1, max_tokens if max_tokens is not None else T), max_adapters, adapter_ids.device)
        return b.build(adapter_ids, ranks, validate=validate)

    @classmethod
    def from_segments(
        cls,
        seg_lens: torch.Tensor,
        seg_adapters: torch.Tensor,
        max_adapters: int,
        ranks: Optional[torch.Tensor] = None,
        max_tokens: Optional[int] = None,
        validate: bool = True,
    ) -> "LoRABatch":
        """Batch for tokens already grouped: segment k is ``seg_lens[k]`` consecutive tokens of adapter
        ``seg_adapters[k]`` (``-1`` allowed). Segments of the same adapter need not be adjacent.

        ``T = seg_lens.sum()`` is read on the host (two reads: the lengths' range with the count of bad ids,
        then the sum; each a sync when the lengths are on a GPU); the per-token ids are then expanded on the
        device (``repeat_interleave`` with that static size) and built as usual. ``max_tokens`` is the capacity
        (default T; any value >= T works, for a batch later rebuilt with more tokens). ``seg_adapters`` follow the
        rules of :meth:`build`'s ids: any integer dtype, checked at full width; with ``validate`` an id outside
        ``[-1, max_adapters)`` raises (zero-length segments too), without it the tokens of such a segment are
        served as -1 and counted in ``num_invalid``.

        Raises:
            TypeError: non-tensor or non-integer seg_lens / seg_adapters, non-integer max_tokens / max_adapters.
            ValueError naming the argument: shapes, devices, a negative length, a total above max_tokens (or
                above the largest capacity), seg_adapters out of range (with ``validate``).
        """
        check_tensor("seg_lens", seg_lens, ndim=1)
        check_ids_dtype("seg_lens", seg_lens)
        check_tensor("seg_adapters", seg_adapters, ndim=1, device=seg_lens.device)
        check_ids_dtype("seg_adapters", seg_adapters)
        check(seg_lens.shape == seg_adapters.shape, "seg_adapters", f"shape {tuple(seg_lens.shape)} (as seg_lens)",
              tuple(seg_adapters.shape))
        check(seg_lens.device.type != "meta", "seg_lens", "lengths with data (T is read from them)",
              "a tensor on the meta device")
        max_adapters = check_int("max_adapters", max_adapters, lo=1, hi=2**31 - 2)
        limit = max_capacity(max_adapters)
        if max_tokens is not None:
            max_tokens = check_int("max_tokens", max_tokens, lo=0, hi=limit)
        # The lengths' range and total in one host read. Each length is bounded before summing (in int64) so the
        # total cannot overflow whatever the dtype or count; the capacity is checked before anything of that
        # size is allocated.
        cap = limit if max_tokens is None else max_tokens
        lens = _as_int64(seg_lens)
        if lens.numel():
            ids_chk = ids_to_int32(seg_adapters, max_adapters)
            n_bad = ((ids_chk < -1) | (ids_chk >= max_adapters)).sum() if validate else lens.new_zeros(())
            lo, hi, n_bad = torch.stack([lens.min(), lens.max(), n_bad.to(torch.int64)]).tolist()
        else:
            lo = hi = n_bad = 0
        if lo < 0:
            i = int((lens < 0).nonzero()[0, 0])
            raise ValueError(f"seg_lens: expected non-negative lengths, got {int(lens[i])} at index {i}")
        where = "max_tokens" if max_tokens is not None else f"the largest capacity for max_adapters={max_adapters}"
        check(hi <= cap, "seg_lens", f"lengths <= {cap} ({where})", f"a length of {hi}")
        total = int(lens.sum()) if lens.numel() else 0
        if max_tokens is not None:
            check(total <= max_tokens, "max_tokens", f"a capacity >= the {total} tokens of seg_lens (their sum)",
                  max_tokens)
        else:
            check(total <= limit, "seg_lens", f"a total of at most {limit} tokens ({where})", total)
        if n_bad:
            check_ids_range(seg_adapters, max_adapters, "seg_adapters")
        ids = torch.repeat_interleave(ids_to_int32(seg_adapters, max_adapters), lens, output_size=total)
        b = cls(max(1, max_tokens if max_tokens is not None else total), max_adapters, seg_lens.device)
        # already range-checked above (validate=False only skips a second read of the ids)
        return b.build(ids, ranks, validate=False)

    def to_dict(self) -> dict:
        """Host copy of every field (syncs; for debugging and tests)."""
        n = int(self.num_active.item())
        return {
            "token_adapter": self.token_adapter.tolist(),
            "sorted_token_ids": self.sorted_token_ids.tolist(),
            "active_adapters": self.active_adapters[:n].tolist(),
            "seg_start": self.seg_start[:n].tolist(),
            "seg_len": self.seg_len[:n].tolist(),
            "num_active": n,
            "max_rank": int(self.max_rank.item()),
            "num_valid": int(self.num_valid.item()),
            "num_invalid": int(self.num_invalid.item()),
        }

    def __repr__(self) -> str:
        return (
            f"LoRABatch(num_tokens={self.num_tokens}, max_tokens={self.max_tokens}, "
            f"max_adapters={self.max_adapters}, device={self.device})"
        )


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
