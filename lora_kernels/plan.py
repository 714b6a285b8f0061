"""The work plan of a batch: exact token-tile lists for the persistent SGMV kernels, built on the device.

FlashInfer's idea: the per-step metadata already knows every segment's length, so it can also write, once per
step and with no host sync, the exact list of token tiles the kernels will serve. The persistent kernel
(:mod:`lora_kernels.triton.sgmv`, strategy ``"persistent"``) then runs a grid fixed by the GPU (never by the
batch) whose programs walk that list: no program scans all segments to find its work, and no program is
launched for a tile that does not exist.

Semantics (one *family* per tile height ``BM`` in :data:`PLAN_BLOCK_M`):
    Segment k of the batch (``seg_start[k]``, ``seg_len[k]``, adapter ``active_adapters[k]``) is cut into
    ``cdiv(seg_len[k], BM)`` tiles; tile j of segment k covers the sorted positions
    ``[seg_start[k] + j BM, seg_start[k] + min((j + 1) BM, seg_len[k]))``. Tiles are listed segment by segment
    (ascending adapter id), then the tiles of the *virtual* segment of the tokens with no adapter
    (``[num_valid, T)``, adapter -1; only mixed mode serves it). Per tile: ``pos0`` (first sorted position),
    ``len`` (1..BM) and ``adapter``. ``n_real`` counts the tiles of real segments, ``n_all`` adds the virtual
    ones. Entries past ``n_all`` hold ``len = 0``, ``adapter = -1``.

Layout of the int32 ``plan`` buffer (:class:`PlanLayout`, described once in :data:`lora_kernels.layouts.PLAN`,
from which the CUDA kernels' ``csrc/kernels/layouts.h`` is generated):
    ``[counters (n_cnt) | done (1) | per family: n_real, n_all, pos0[n_max], len[n_max], adapter[n_max] |
    decode counters (DECODE_COUNTERS) | fused counters (FUSED_COUNTERS)]``
    with ``n_max(BM) = (Tc + (Ac + 1)(BM - 1)) // BM`` (an upper bound on the tiles of any batch of capacity Tc
    with at most Ac active adapters, virtual segment included) and ``n_cnt = n_max(min(PLAN_BLOCK_M))``.
    The tail holds the compiled kernels' counters: ``DECODE_COUNTERS`` per-(token, slice) counters of the decode
    kernel (csrc/kernels/sgmv_decode.cuh: T <= 64 tokens x <= 8 slices; :func:`decode_counters`), then the last
    ``FUSED_COUNTERS`` for the fused LoRA linear (csrc/kernels/fused_lora_linear.cuh: one for the shrink and one per
    8 output features, so out <= 8 (FUSED_COUNTERS - 1); :func:`fused_counters`). The two kernels could share one
    region (ops on a batch are stream-ordered and each kernel leaves its counters at zero), but they index it
    differently (per (token, slice) vs per output tile) and the fused one needs far more entries; separate regions
    keep each kernel's "zero between calls" invariant checkable on its own, for 16 KiB per batch. These counters,
    the persistent kernel's and ``done`` are inter-program flags: zero between calls (each kernel's last program
    resets what it used), so one batch's ops must be ordered on one stream, as a model's layers are (use one
    batch per concurrent stream).

The builder is torch ops on the batch's device: no host sync, capturable in a CUDA graph together with
:meth:`~lora_kernels.LoRABatch.build`; it writes only into the plan buffer, but its torch ops allocate small
temporaries per build (per step, not per layer; from the caching allocator, so no cudaMalloc after warm-up).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layouts import DECODE_COUNTERS, FUSED_COUNTERS, PLAN, PLAN_BLOCK_M, PLAN_FAMILY, function, offsets_class

plan_n_max = function("plan_n_max")

__all__ = ["DECODE_COUNTERS", "FUSED_COUNTERS", "PLAN_BLOCK_M", "PlanLayout", "build_plan_", "decode_counters",
           "fused_counters"]

def _from_end(name: str) -> int:
    """Distance from the end of the plan of a tail field (its and the later fields' lengths are constants, so a
    kernel given only the plan tensor finds it)."""
    off = PLAN.offsets(max_tokens=0, max_active=0)
    later = [f for f in PLAN.fields[[f.name for f in PLAN.fields].index(name):]]
    if not all(f.length.isdigit() for f in later):
        raise AssertionError(f"plan field {name}: the fields from it to the end must have constant lengths")
    return off["size"] - off[name]


# A tile family's field offsets as compiled functions of n_max (build_plan_ runs per step, also under torch.compile).
_FAMILY_FIELDS = {f.name: PLAN_FAMILY.offsets_fn(f.name) for f in PLAN_FAMILY.fields}
_DECODE_FROM_END = _from_end("decode_counters")
_FUSED_FROM_END = _from_end("fused_counters")


@offsets_class(PLAN)
@dataclass(frozen=True)
class PlanLayout:
    """Offsets inside the plan buffer of a batch with capacities (Tc tokens, Ac active adapters): one property per
    field of :data:`lora_kernels.layouts.PLAN` (``counters``, ``done``, ``f16_n_real`` ... ``fused_counters``) and
    ``size``; :meth:`family` and :meth:`n_max` name a tile family's part."""

    max_tokens: int
    max_active: int

    def n_max(self, bm: int) -> int:
        """Upper bound on the tiles of height ``bm`` (virtual segment included)."""
        return plan_n_max(self.max_tokens, self.max_active, bm)

    @property
    def n_counters(self) -> int:
        return self.n_max(min(PLAN_BLOCK_M))

    def family(self, bm: int) -> int:
        """Offset of family ``bm`` (layout :data:`~lora_kernels.layouts.PLAN_FAMILY`: ``n_real, n_all`` then the
        ``pos0``, ``len``, ``adapter`` arrays of n_max(bm) entries)."""
        if bm not in PLAN_BLOCK_M:
            raise ValueError(f"BLOCK_M: expected one of {PLAN_BLOCK_M} for a planned kernel, got {bm!r}")
        return getattr(self, f"f{bm}_n_real")


def decode_counters(plan: torch.Tensor) -> torch.Tensor:
    """The compiled decode kernel's counters: the :data:`DECODE_COUNTERS` entries of a batch's plan before the
    fused kernel's."""
    start = plan.numel() - _DECODE_FROM_END
    return plan[start : start + DECODE_COUNTERS]


def fused_counters(plan: torch.Tensor) -> torch.Tensor:
    """The compiled fused LoRA linear's counters: the last :data:`FUSED_COUNTERS` entries of a batch's plan."""
    start = plan.numel() - _FUSED_FROM_END
    return plan[start : start + FUSED_COUNTERS]


def build_plan_(plan: torch.Tensor, meta: torch.Tensor, layout, T: int) -> None:
    """Write every family's tile list of the batch whose metadata is ``meta`` (layout :class:`MetaLayout`
    ``layout``, ``T`` tokens) into ``plan`` (:class:`PlanLayout` of the same capacities). Device ops only."""
    pl = PlanLayout(layout.max_tokens, layout.max_active)
    A = layout.max_active
    dev = meta.device
    sc = layout.scalars
    # segments: the A real ones, then the virtual one [num_valid, T)
    nv = meta[sc + 2 : sc + 3].to(torch.int64)
    starts = torch.cat([meta[layout.seg_start : layout.seg_start + A].to(torch.int64), nv])
    lens = torch.cat([meta[layout.seg_len : layout.seg_len + A].to(torch.int64), T - nv])
    adapters = torch.cat([meta[layout.active_adapters : layout.active_adapters + A],
                          torch.full((1,), -1, dtype=torch.int32, device=dev)])
    for bm in PLAN_BLOCK_M:
        n = pl.n_max(bm)
        off = pl.family(bm)
        tiles = (lens + (bm - 1)) // bm
        cum = torch.cumsum(tiles, 0)
        i = torch.arange(n, dtype=torch.int64, device=dev)
        seg = torch.searchsorted(cum, i, right=True)  # segment of tile i (A + 1 past the end)
        live = seg <= A
        seg_c = seg.clamp(max=A)
        j = i - (cum[seg_c] - tiles[seg_c])  # tile index within its segment
        m0 = j * bm
        pos0 = torch.where(live, starts[seg_c] + m0, torch.zeros_like(m0))
        ln = torch.where(live, (lens[seg_c] - m0).clamp(max=bm), torch.zeros_like(m0))
        ad = torch.where(live, adapters[seg_c], torch.full_like(adapters[seg_c], -1))
        f = {k: fn(n) for k, fn in _FAMILY_FIELDS.items()}
        plan[off + f["n_real"] : off + f["n_real"] + 1].copy_(cum[A - 1 : A] if A > 0 else cum[:1] * 0)
        plan[off + f["n_all"] : off + f["n_all"] + 1].copy_(cum[A : A + 1])
        plan[off + f["pos0"] : off + f["pos0"] + n].copy_(pos0)
        plan[off + f["len"] : off + f["len"] + n].copy_(ln)
        plan[off + f["adapter"] : off + f["adapter"] + n].copy_(ad)
