"""LoRAWeights: rank-paged storage of every adapter of one linear layer (or one fused group of layers).

Semantics:
    For slice ``s`` (one output projection of a fused group; a plain layer has one slice) and adapter slot
    ``i`` with rank ``r = ranks[s, i]`` and first row ``o = offsets[i]``:

        A_{s,i} = a[s, o : o + r, :]          # [r, in]
        B_{s,i} = b[o : o + r, col_s : col_s + out_s].T   # [out_s, r]  (b holds B transposed)
        delta_{s,i}(x) = scales[s, i] * (x @ A_{s,i}.T) @ B_{s,i}.T

    ``a`` is [S, R, in] and ``b`` is [R, sum(out_s)]: the slices of a fused projection (q/k/v, gate/up) share
    one row allocation per adapter (``offsets`` [N]) and write disjoint column ranges of one output, so one
    launch serves all of them. Ranks may differ per adapter (and per slice); an adapter occupies only
    ``max_s ranks[s, i]`` rows: no padding to the largest rank. Rows freed by :meth:`remove` are reused.
    The padded layout ``[N, r_max, in]`` is the special case ``offsets[i] = i * r_max``; :meth:`from_padded`
    wraps such tensors without a copy.

    ``scales[s, i]`` is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), or the value given explicitly.
    A free slot has rank 0: tokens that name it get no delta.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ._validation import FLOAT_DTYPES, check, check_tensor

__all__ = ["LoRAWeights"]

TensorOrSeq = Union[torch.Tensor, Sequence[torch.Tensor]]


class LoRAWeights:
    """Rank-paged LoRA A/B storage for one layer (or one fused group of ``S`` slices).

    Args:
        in_features: input width of the layer.
        out_features: output width, or a sequence of widths (one per slice of a fused projection).
        max_adapters: number of adapter slots N (adapter ids are ``0 .. N-1``).
        max_rank: the largest rank one adapter may have (sizes the shrink output and kernel tiles).
        capacity_rows: total rows R of storage; defaults to ``max_adapters * max_rank`` (room for every slot
            at full rank). A smaller R holds more adapters of small rank than a padded stack could.
        dtype: storage dtype (fp16, bf16 or fp32).
        device: storage device.
    """

    def __init__(
        self,
        in_features: int,
        out_features: Union[int, Sequence[int]],
        max_adapters: int,
        max_rank: int,
        *,
        capacity_rows: Optional[int] = None,
        dtype: torch.dtype = torch.float16,
        device: Union[torch.device, str] = "cpu",
    ):
        outs = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        check(isinstance(in_features, int) and in_features >= 1, "in_features", "an int >= 1", in_features)
        check(len(outs) >= 1 and all(isinstance(o, int) and o >= 1 for o in outs), "out_features", "ints >= 1",
              out_features)
        check(isinstance(max_adapters, int) and max_adapters >= 1, "max_adapters", "an int >= 1", max_adapters)
        check(isinstance(max_rank, int) and max_rank >= 1, "max_rank", "an int >= 1", max_rank)
        check(dtype in FLOAT_DTYPES, "dtype", "float16, bfloat16 or float32", dtype, TypeError)
        R = capacity_rows if capacity_rows is not None else max_adapters * max_rank
        check(isinstance(R, int) and R >= 1, "capacity_rows", "an int >= 1", R)
        device = torch.device(device)
        S = len(outs)
        a = torch.zeros(S, R, in_features, dtype=dtype, device=device)
        b = torch.zeros(R, sum(outs), dtype=dtype, device=device)
        self._init_storage(a, b, in_features, outs, max_adapters, max_rank)
        self._free: List[Tuple[int, int]] = [(0, R)]  # sorted, coalesced (start, length) row ranges

    def _init_storage(self, a, b, in_features, outs, max_adapters, max_rank) -> None:
        self.a = a
        self.b = b
        self.in_features = in_features
        self.slice_outs: Tuple[int, ...] = tuple(outs)
        cols, c = [], 0
        for o in outs:
            cols.append(c)
            c += o
        self.slice_cols: Tuple[int, ...] = tuple(cols)
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        dev = a.device
        self.offsets = torch.zeros(max_adapters, dtype=torch.int64, device=dev)
        self.ranks = torch.zeros(len(outs), max_adapters, dtype=torch.int32, device=dev)
        self.scales = torch.zeros(len(outs), max_adapters, dtype=torch.float32, device=dev)
        # Host mirror of the allocation, so that adding/removing never reads the device.
        # [S, 2] int64 (first column, width) of each slice, on the device: kernels read it, so a fused group
        # needs no per-call host->device copy.
        self.slice_info = torch.tensor([[c, o] for c, o in zip(self.slice_cols, self.slice_outs)],
                                       dtype=torch.int64).to(dev)
        self._alloc: Dict[int, Tuple[int, int]] = {}
        self._host_ranks: Dict[int, Tuple[int, ...]] = {}
        # Bumped by every add/remove: lets host-side caches (ops.merge_plan) detect a changed allocation.
        self._version = 0

    # ---- shape facts ---------------------------------------------------------------------------------
    @property
    def num_slices(self) -> int:
        return len(self.slice_outs)

    @property
    def out_features(self) -> int:
        return sum(self.slice_outs)

    @property
    def capacity_rows(self) -> int:
        return self.a.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def device(self) -> torch.device:
        return self.a.device

    @property
    def loaded(self) -> List[int]:
        """Adapter ids that currently hold an adapter, ascending."""
        return sorted(self._alloc)

    @property
    def version(self) -> int:
        """A counter bumped by every :meth:`add` and :meth:`remove` (host data): caches of per-adapter plans
        compare it to detect a changed allocation."""
        return self._version

    @property
    def free_rows(self) -> int:
        return sum(n for _, n in self._free)

    @property
    def free_ranges(self) -> List[Tuple[int, int]]:
        """Free ``(first row, length)`` ranges, sorted and coalesced (a copy; :meth:`add` allocates first-fit)."""
        return list(self._free)

    def rows_of(self, adapter_id: int) -> Tuple[int, int]:
        """``(first row, number of rows)`` allocated to a loaded adapter (host data, no sync)."""
        self._check_id(adapter_id, loaded=True)
        return self._alloc[adapter_id]

    def rank_of(self, adapter_id: int) -> Tuple[int, ...]:
        """Per-slice ranks of a loaded adapter (host data, no sync)."""
        self._check_id(adapter_id, loaded=True)
        return self._host_ranks[adapter_id]

    # ---- adding and removing -------------------------------------------------------------------------
    def add(
        self,
        A: TensorOrSeq,
        B: TensorOrSeq,
        *,
        alpha: Optional[float] = None,
        scale: Optional[Union[float, Sequence[float]]] = None,
        use_rslora: bool = False,
        adapter_id: Optional[int] = None,
        non_blocking: bool = False,
    ) -> int:
        """Store one adapter and return its id.

        Args:
            A: [r, in] (PEFT ``lora_A.weight``), or one per slice.
            B: [out_s, r] (PEFT ``lora_B.weight``), or one per slice.
            alpha: LoRA alpha; the scale is ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
                Defaults to ``r`` (scale 1 without rsLoRA).
            scale: explicit scale (one float or one per slice); overrides ``alpha``.
            adapter_id: slot to use (must be free); defaults to the lowest free slot.
            non_blocking: copy A/B with ``non_blocking=True`` (asynchronous from pinned host memory on CUDA; the
                caller orders the stream, e.g. with an event). Every device write of ``add`` is then
                stream-ordered on the current stream, with no host sync.

        Raises:
            ValueError: wrong shapes, rank 0 or above ``max_rank``, no free slot or not enough free rows,
                slot already in use. Nothing is changed when it raises.
            TypeError: non-float tensors.
        """
        S = self.num_slices
        As = _as_list("A", A, S)
        Bs = _as_list("B", B, S)
        ranks = []
        for s in range(S):
            na, nb = ("A", "B") if S == 1 else (f"A[{s}]", f"B[{s}]")
            check_tensor(na, As[s], ndim=2, dtypes=FLOAT_DTYPES)
            check_tensor(nb, Bs[s], ndim=2, dtypes=FLOAT_DTYPES)
            r = As[s].shape[0]
            check(As[s].shape[1] == self.in_features, na, f"shape (r, {self.in_features})", tuple(As[s].shape))
            check(1 <= r <= self.max_rank, na, f"rank in [1, max_rank={self.max_rank}]", r)
            check(tuple(Bs[s].shape) == (self.slice_outs[s], r), nb, f"shape ({self.slice_outs[s]}, {r})",
                  tuple(Bs[s].shape))
            ranks.append(r)
        scales = self._scales(ranks, alpha, scale, use_rslora)
        if adapter_id is None:
            free_ids = [i for i in range(self.max_adapters) if i not in self._alloc]
            check(bool(free_ids), "adapter_id", f"a free slot (all {self.max_adapters} in use)", "none free")
            adapter_id = free_ids[0]
        else:
            self._check_id(adapter_id)
            check(adapter_id not in self._alloc, "adapter_id", "a free slot (remove() it first)",
                  f"{adapter_id} in use")
        nrows = max(ranks)
        off = self._take_rows(nrows)
        with torch.no_grad():
            for s in range(S):
                r = ranks[s]
                self.a[s, off : off + r].copy_(As[s], non_blocking=non_blocking)
                self.a[s, off + r : off + nrows].zero_()
                self.b[off : off + r, self.slice_cols[s] : self.slice_cols[s] + self.slice_outs[s]].copy_(
                    Bs[s].t(), non_blocking=non_blocking)
                self.b[off + r : off + nrows, self.slice_cols[s] : self.slice_cols[s] + self.slice_outs[s]].zero_()
            self.offsets[adapter_id] = off
            # Scalar fills, not a host tensor copy: a pageable host-to-device copy would sync the stream.
            for s in range(S):
                self.ranks[s, adapter_id] = ranks[s]
                self.scales[s, adapter_id] = scales[s]
        self._alloc[adapter_id] = (off, nrows)
        self._host_ranks[adapter_id] = tuple(ranks)
        self._version += 1
        return adapter_id

    def remove(self, adapter_id: int) -> None:
        """Free an adapter's slot and rows (reused by later :meth:`add` calls)."""
        self._check_id(adapter_id, loaded=True)
        off, n = self._alloc.pop(adapter_id)
        del self._host_ranks[adapter_id]
        self._version += 1
        with torch.no_grad():
            self.ranks[:, adapter_id] = 0
            self.scales[:, adapter_id] = 0.0
            self.offsets[adapter_id] = 0
        self._give_rows(off, n)

    def _scales(self, ranks, alpha, scale, use_rslora) -> List[float]:
        S = self.num_slices
        if scale is not None:
            vals = [float(scale)] * S if isinstance(scale, (int, float)) else [float(v) for v in scale]
            check(len(vals) == S, "scale", f"one float or {S} floats", scale)
            check(all(math.isfinite(v) for v in vals), "scale", "finite values", scale)
            return vals
        out = []
        for r in ranks:
            al = float(r if alpha is None else alpha)
            check(math.isfinite(al), "alpha", "a finite float", alpha)
            out.append(al / math.sqrt(r) if use_rslora else al / r)
        return out

    def _take_rows(self, n: int) -> int:
        for k, (start, length) in enumerate(self._free):
            if length >= n:  # first fit keeps low rows dense, which keeps padded views possible
                if length == n:
                    self._free.pop(k)
                else:
                    self._free[k] = (start + n, length - n)
                return start
        raise ValueError(
            f"A: expected room for {n} rows in capacity_rows={self.capacity_rows}, got {self.free_rows} free rows "
            f"in {len(self._free)} ranges (remove adapters or raise capacity_rows)"
        )

    def _give_rows(self, off: int, n: int) -> None:
        free = sorted(self._free + [(off, n)])
        merged: List[Tuple[int, int]] = []
        for start, n_rows in free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + n_rows)
            else:
                merged.append((start, n_rows))
        self._free = merged

    def _check_id(self, adapter_id: int, loaded: bool = False) -> None:
        check(isinstance(adapter_id, int) and 0 <= adapter_id < self.max_adapters, "adapter_id",
              f"an int in [0, {self.max_adapters})", adapter_id)
        if loaded:
            check(adapter_id in self._alloc, "adapter_id", "a loaded adapter", f"{adapter_id} (free slot)")

    # ---- padded stacks -------------------------------------------------------------------------------
    @classmethod
    def from_padded(
        cls,
        a: torch.Tensor,
        b: torch.Tensor,
        *,
        ranks: Optional[torch.Tensor] = None,
        scales: Optional[torch.Tensor] = None,
        slice_outs: Optional[Sequence[int]] = None,
    ) -> "LoRAWeights":
        """Wrap padded stacks without copying.

        Args:
            a: [N, r_max, in] (or [S, N, r_max, in] for S slices); rows past an adapter's rank are ignored.
            b: [N, r_max, out] (B transposed; for S slices ``out = sum(slice_outs)``).
            ranks: int32 [N] or [S, N]; defaults to r_max for every slot.
            scales: float32 [N] or [S, N]; defaults to 1.
            slice_outs: output widths of the slices (default: one slice of width ``out``).

        The returned object shares memory with ``a`` and ``b``: writes through either are seen by the other.
        Raises ValueError when the tensors cannot be viewed as the rank-paged layout without a copy.
        """
        check_tensor("a", a, dtypes=FLOAT_DTYPES)
        check(a.ndim in (3, 4), "a", "3 dims [N, r_max, in] or 4 dims [S, N, r_max, in]", f"shape {tuple(a.shape)}")
        a4 = a if a.ndim == 4 else a.unsqueeze(0)
        S, N, r_max, in_f = a4.shape
        check_tensor("b", b, ndim=3, dtypes=(a.dtype,), device=a.device)
        check(b.shape[0] == N and b.shape[1] == r_max, "b", f"shape ({N}, {r_max}, out)", tuple(b.shape))
        outs = tuple(slice_outs) if slice_outs is not None else (b.shape[2],) * S if S == 1 else None
        check(outs is not None and len(outs) == S and sum(outs) == b.shape[2], "slice_outs",
              f"{S} widths summing to {b.shape[2]}", slice_outs)
        check(N >= 1 and r_max >= 1, "a", "N >= 1 and r_max >= 1", tuple(a.shape))
        try:
            a_v = a4.view(S, N * r_max, in_f)
            b_v = b.view(N * r_max, b.shape[2])
        except RuntimeError as e:  # strides that do not flatten
            raise ValueError(f"a/b: expected tensors whose (N, r_max) dims flatten without a copy, got strides "
                             f"{a.stride()} / {b.stride()}") from e
        check(a_v.stride(-1) == 1 or in_f == 1, "a", "unit stride in the last dim", a.stride())
        check(b_v.stride(-1) == 1 or b.shape[2] == 1, "b", "unit stride in the last dim", b.stride())
        self = cls.__new__(cls)
        self._init_storage(a_v, b_v, in_f, outs, N, r_max)
        rk = torch.full((S, N), r_max, dtype=torch.int32) if ranks is None else ranks.reshape(-1, N).expand(S, N)
        check(rk.shape == (S, N), "ranks", f"shape ({N},) or ({S}, {N})", tuple(rk.shape))
        rk_host = rk.to("cpu", torch.int32)
        check(bool(((rk_host >= 0) & (rk_host <= r_max)).all()), "ranks", f"values in [0, {r_max}]", rk_host.tolist())
        sc = torch.ones(S, N) if scales is None else scales.reshape(-1, N).expand(S, N)
        with torch.no_grad():
            self.offsets.copy_(torch.arange(N, dtype=torch.int64) * r_max)
            self.ranks.copy_(rk_host)
            self.scales.copy_(sc.to(torch.float32))
        for i in range(N):
            rs = tuple(int(v) for v in rk_host[:, i])
            if max(rs) > 0:
                self._alloc[i] = (i * r_max, r_max)
                self._host_ranks[i] = rs
        self._free = []
        for i in range(N):
            if i not in self._alloc:
                self._give_rows(i * r_max, r_max)
        return self

    def padded_view(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Zero-copy ``(a [S, N, max_rank, in], b [N, max_rank, out])`` when the storage is in padded layout
        (every loaded adapter ``i`` at row ``i * max_rank``, ``capacity_rows == N * max_rank``).

        Raises ValueError otherwise (use :meth:`to_padded` for a copy).
        """
        N, r = self.max_adapters, self.max_rank
        ok = self.capacity_rows == N * r and all(off == i * r for i, (off, _) in self._alloc.items())
        check(ok, "weights", "padded layout (offsets[i] == i * max_rank)", "rank-paged rows elsewhere; use to_padded()")
        return self.a.view(self.num_slices, N, r, self.in_features), self.b.view(N, r, self.out_features)

    def to_padded(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Copy into padded stacks ``(a [S, N, max_rank, in], b [N, max_rank, out])``, zero past each rank."""
        S, N, r = self.num_slices, self.max_adapters, self.max_rank
        a = torch.zeros(S, N, r, self.in_features, dtype=self.dtype, device=self.device)
        b = torch.zeros(N, r, self.out_features, dtype=self.dtype, device=self.device)
        for i, (off, _) in self._alloc.items():
            for s, rk in enumerate(self._host_ranks[i]):
                a[s, i, :rk] = self.a[s, off : off + rk]
                c0, c1 = self.slice_cols[s], self.slice_cols[s] + self.slice_outs[s]
                b[i, :rk, c0:c1] = self.b[off : off + rk, c0:c1]
        return a, b

    def adapter(self, adapter_id: int, slice_index: int = 0) -> Tuple[torch.Tensor, torch.Tensor, float]:
        """``(A [r, in], B [out_s, r], scale)`` of one loaded adapter and slice (views of the storage, B
        transposed back; the scale is a host float)."""
        self._check_id(adapter_id, loaded=True)
        check(0 <= slice_index < self.num_slices, "slice_index", f"in [0, {self.num_slices})", slice_index)
        off, _ = self._alloc[adapter_id]
        r = self._host_ranks[adapter_id][slice_index]
        c0 = self.slice_cols[slice_index]
        A = self.a[slice_index, off : off + r]
        B = self.b[off : off + r, c0 : c0 + self.slice_outs[slice_index]].t()
        return A, B, float(self.scales[slice_index, adapter_id])

    # ---- training (lora_kernels.lora_delta / lora_linear) ----------------------------------------------
    def requires_grad_(self, requires_grad: bool = True) -> "LoRAWeights":
        """Make the paged storage ``a`` [S, R, in] and ``b`` [R, out] trainable leaf tensors (or frozen again).

        The differentiable ops then accumulate every adapter's gradient into ``a.grad`` / ``b.grad`` in the same
        rank-paged layout (zero for rows no adapter of the batch owns), so one optimiser over
        :meth:`parameters` steps all adapters at once. :meth:`add` / :meth:`remove` still work (under
        no_grad); reset the optimiser's state for rows whose adapter changed. Returns self.
        """
        check(isinstance(requires_grad, bool), "requires_grad", "a bool", repr(requires_grad), TypeError)
        self.a.requires_grad_(requires_grad)
        self.b.requires_grad_(requires_grad)
        return self

    @property
    def requires_grad(self) -> bool:
        """True when ``a`` or ``b`` requires grad (training)."""
        return self.a.requires_grad or self.b.requires_grad

    def parameters(self) -> List[torch.Tensor]:
        """``[a, b]``: the tensors an optimiser steps (every adapter of this layer)."""
        return [self.a, self.b]

    def __repr__(self) -> str:
        return (
            f"LoRAWeights(in={self.in_features}, out={list(self.slice_outs)}, max_adapters={self.max_adapters}, "
            f"max_rank={self.max_rank}, capacity_rows={self.capacity_rows}, loaded={len(self._alloc)}, "
            f"dtype={self.dtype}, device={self.device})"
        )


def _as_list(name: str, v: TensorOrSeq, S: int) -> List[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        check(S == 1, name, f"a sequence of {S} tensors (one per slice)", "one tensor")
        return [v]
    vs = list(v)
    check(len(vs) == S, name, f"{S} tensors (one per slice)", len(vs))
    return vs
