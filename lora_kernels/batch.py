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
    preallocated int32 buffer (``meta``), so building a batch allocates nothing, never syncs with the host and
    can be captured in a CUDA graph; ops receive the single ``meta`` tensor.

The builder is a CUDA kernel (``csrc/kernels/lora_batch.cuh``) when the compiled extension is present, and the
torch implementation below otherwise (same outputs, also sync-free). Both are exposed through the custom op
``torch.ops.lora_kernels.build_batch_``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ._validation import check, check_tensor

__all__ = ["LoRABatch", "MetaLayout", "build_batch_torch_"]


@dataclass(frozen=True)
class MetaLayout:
    """Offsets of each field inside the int32 ``meta`` buffer of a batch with capacities (Tc, Ac).

    The layout is shared with the CUDA builder and the Triton kernels: change both if it changes.
    """

    max_tokens: int
    max_active: int

    @property
    def token_adapter(self) -> int:
        return 0

    @property
    def sorted_token_ids(self) -> int:
        return self.max_tokens

    @property
    def active_adapters(self) -> int:
        return 2 * self.max_tokens

    @property
    def seg_start(self) -> int:
        return 2 * self.max_tokens + self.max_active

    @property
    def seg_len(self) -> int:
        return 2 * self.max_tokens + 2 * self.max_active

    @property
    def scalars(self) -> int:
        """num_active, max_rank, num_valid, num_invalid, in that order."""
        return 2 * self.max_tokens + 3 * self.max_active

    @property
    def size(self) -> int:
        return self.scalars + 4

    @staticmethod
    def from_meta(meta: torch.Tensor, max_tokens: int) -> "MetaLayout":
        """Recover the layout from a meta buffer and its token capacity (ops receive only these)."""
        max_active = (meta.numel() - 4 - 2 * max_tokens) // 3
        return MetaLayout(max_tokens, max_active)


def build_batch_torch_(
    meta: torch.Tensor,
    adapter_ids: torch.Tensor,
    ranks: Optional[torch.Tensor],
    max_tokens: int,
    max_adapters: int,
) -> None:
    """Torch implementation of the batch builder (CPU, or CUDA without the extension). No host sync.

    Writes every field of ``meta`` (layout :class:`MetaLayout`) for ``adapter_ids`` int32 [T]. ``ranks`` is
    int32 [S, N] or [N] (N >= max_adapters) or None.
    """
    lay = MetaLayout.from_meta(meta, max_tokens)
    T = adapter_ids.shape[0]
    N = max_adapters
    A = lay.max_active
    dev = meta.device
    ids = adapter_ids.to(device=dev, dtype=torch.int32)
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
        check(isinstance(max_tokens, int) and max_tokens >= 1, "max_tokens", "an int >= 1", max_tokens)
        check(isinstance(max_adapters, int) and max_adapters >= 1, "max_adapters", "an int >= 1", max_adapters)
        self.max_tokens = max_tokens
        self.max_adapters = max_adapters
        self.device = torch.device(device)
        self.layout = MetaLayout(max_tokens, min(max_tokens, max_adapters))
        self.meta = torch.zeros(self.layout.size, dtype=torch.int32, device=self.device)
        self.meta[self.layout.active_adapters : self.layout.seg_start].fill_(-1)
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
        """Rebuild this batch in place from ``adapter_ids`` int32 [T] (T <= max_tokens; T = 0 is allowed).

        ``ranks`` (int32 [N] or [S, N], e.g. ``LoRAWeights.ranks``) fills ``max_rank``. With ``validate``
        (the default) ids outside ``[-1, max_adapters)`` raise ``ValueError``: free when the ids are on the
        CPU, one host sync when they are on the GPU; skipped while a CUDA graph is being captured. Without it,
        such ids are served as ``-1`` and counted in ``num_invalid`` (check later with :meth:`check`).

        Raises:
            TypeError: ``adapter_ids`` is not an integer tensor.
            ValueError: wrong ndim, T > max_tokens, or ids out of range (with ``validate``).
        """
        from .ops.batch_ops import build_batch_

        check_tensor("adapter_ids", adapter_ids, ndim=1, dtypes=(torch.int32, torch.int64))
        T = adapter_ids.shape[0]
        check(T <= self.max_tokens, "adapter_ids", f"at most max_tokens={self.max_tokens} tokens", f"{T} tokens")
        if ranks is not None:
            check_tensor("ranks", ranks, dtypes=(torch.int32,))
            check(ranks.shape[-1] >= self.max_adapters, "ranks", f"last dim >= max_adapters={self.max_adapters}",
                  tuple(ranks.shape))
        if validate and adapter_ids.device.type == "cpu" and T > 0:
            self._check_range(adapter_ids)
        self.num_tokens = T
        build_batch_(self.meta, adapter_ids, ranks, self.max_tokens, self.max_adapters)
        if validate and adapter_ids.device.type != "cpu" and not _capturing():
            self.check()
        return self

    def _check_range(self, adapter_ids: torch.Tensor) -> None:
        bad = (adapter_ids < -1) | (adapter_ids >= self.max_adapters)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"adapter_ids: expected ids in [-1, {self.max_adapters}) (max_adapters), got {int(adapter_ids[i])} "
                f"at token {i}"
            )

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
        """Allocate a batch sized for ``adapter_ids`` (or ``max_tokens``) on its device and build it."""
        T = adapter_ids.shape[0] if adapter_ids.ndim == 1 else 0
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

        The per-token ids are expanded on the device (``repeat_interleave`` with a static output size, so no
        sync), then built as usual; ``max_tokens`` defaults to ``seg_lens.sum()`` (one sync if on the GPU).
        """
        check_tensor("seg_lens", seg_lens, ndim=1, dtypes=(torch.int32, torch.int64))
        check_tensor("seg_adapters", seg_adapters, ndim=1, dtypes=(torch.int32, torch.int64), device=seg_lens.device)
        check(seg_lens.shape == seg_adapters.shape, "seg_adapters", f"shape {tuple(seg_lens.shape)} (as seg_lens)",
              tuple(seg_adapters.shape))
        if seg_lens.device.type == "cpu" and seg_lens.numel():
            check(bool((seg_lens >= 0).all()), "seg_lens", "non-negative lengths", seg_lens.tolist())
        total = int(seg_lens.sum()) if max_tokens is None else max_tokens
        ids = torch.repeat_interleave(seg_adapters.to(torch.int32), seg_lens.to(torch.int64), output_size=total)
        return cls.from_ids(ids, max_adapters, ranks=ranks, max_tokens=max(total, 1), validate=validate)

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
