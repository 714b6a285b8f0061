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

Input contract (issue 13): :meth:`LoRAWeights.add`, :meth:`~LoRAWeights.remove` and
:meth:`~LoRAWeights.requires_grad_` validate and convert every argument first (shapes, dtypes, devices, ids,
flags, scales computed in float64 and checked to fit the fp32 ``scales``, A/B values finite in the storage
dtype, a free slot and rows), then write; the writes of add / remove run in a transaction
(``lora_kernels._transaction``; requires_grad_ restores its two flags itself), so a refusal or any exception, even
half-way through the writes, leaves every tensor and host field bit-identical.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ._transaction import Transaction, transaction
from ._validation import FLOAT_DTYPES, check, check_fits, check_int, check_real, check_tensor, overlaps

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
        in_features = check_int("in_features", in_features, lo=1)
        if _is_sequence(out_features):
            outs = tuple(check_int(f"out_features[{k}]", o, lo=1) for k, o in enumerate(out_features))
            check(len(outs) >= 1, "out_features", "one width or a non-empty sequence of widths", out_features)
        else:
            outs = (check_int("out_features", out_features, lo=1),)
        max_adapters = check_int("max_adapters", max_adapters, lo=1)
        max_rank = check_int("max_rank", max_rank, lo=1)
        check(dtype in FLOAT_DTYPES, "dtype", "float16, bfloat16 or float32", dtype, TypeError)
        R = check_int("capacity_rows", capacity_rows if capacity_rows is not None else max_adapters * max_rank, lo=1)
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
        # [S, 2] int64 (first column, width) of each slice, on the device: kernels read it, so a fused group
        # needs no per-call host->device copy.
        self.slice_info = torch.tensor([[c, o] for c, o in zip(self.slice_cols, self.slice_outs)],
                                       dtype=torch.int64).to(dev)
        # The 16-byte access contract (docs/benchmarks.md): in_features, every slice's first column and width
        # (so B's and y's rows) in multiples of 8 elements and the storage 16-byte aligned. The SGMV launchers
        # pick their vectorised (ALIGNED) variant only when this holds and the call's x / y pointers and row
        # strides do too; otherwise the compiled fallback variant runs (same results, narrower accesses).
        # The storage's row strides are part of it (a from_padded storage may have any), exactly as the launchers'
        # own derivation from raw tensors (triton/sgmv.py::_weights_aligned), so both paths pick the same variant.
        self.vector_aligned: bool = (in_features % 8 == 0 and all(v % 8 == 0 for v in cols + list(outs))
                                     and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0
                                     and a.stride(1) % 8 == 0 and b.stride(0) % 8 == 0 and b.stride(1) == 1)
        # Host mirror of the allocation, so that adding/removing never reads the device.
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
        """A counter bumped by every successful :meth:`add` and :meth:`remove` (host data; a call that raises
        leaves it as it was): caches of per-adapter plans compare it to detect a changed allocation."""
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
        return self._alloc[self._check_id(adapter_id, loaded=True)]

    def rank_of(self, adapter_id: int) -> Tuple[int, ...]:
        """Per-slice ranks of a loaded adapter (host data, no sync)."""
        return self._host_ranks[self._check_id(adapter_id, loaded=True)]

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
        check_finite: bool = True,
    ) -> int:
        """Store one adapter and return its id.

        Args:
            A: [r, in] (PEFT ``lora_A.weight``), or one per slice. Float (fp16/bf16/fp32), strided, on any device
                but ``meta`` (copied into the storage's dtype and device).
            B: [out_s, r] (PEFT ``lora_B.weight``), or one per slice.
            alpha: LoRA alpha, a finite real number; the scale is ``alpha / r`` (``alpha / sqrt(r)`` with
                ``use_rslora``), computed in float64. Defaults to ``r`` (scale 1 without rsLoRA).
            scale: explicit scale (one real number or one per slice); overrides ``alpha``.
            use_rslora: a bool.
            adapter_id: slot to use (an integer in ``[0, max_adapters)``, free); defaults to the lowest free slot.
            non_blocking: copy A/B with ``non_blocking=True`` (asynchronous from pinned host memory on CUDA; the
                caller orders the stream, e.g. with an event). Every device write of ``add`` is then
                stream-ordered on the current stream; with ``check_finite=False`` (or A/B on the host) there
                is no host sync.
            check_finite: refuse NaN/Inf in A or B after conversion to the storage dtype (fp32 values too large
                for fp16 count). This reads the values: a host sync when A/B are on a GPU. ``False`` skips it
                for callers that checked already (AdapterPool checks its host copies).

        Scales are finite real numbers (int, float, numpy or 0-dim real tensor; never bool, str or complex)
        whose value fits the fp32 ``scales`` storage: ``|scale| <= 3.4028235e38``. Zero (an exact zero delta)
        and negative values (a subtracted adapter) are allowed.

        Raises:
            TypeError: non-tensors, non-float tensors, a scale/alpha/adapter_id of the wrong type, non-bool flags.
            ValueError: wrong shapes, a meta or sparse tensor, rank 0 or above ``max_rank``, NaN/Inf values
                (``check_finite``), a scale that is not finite or overflows fp32 (naming ``scale`` or ``alpha``),
                no free slot or not enough free rows, slot already in use.
            Nothing is changed when it raises, whatever the error (an exception during the writes, e.g. an
            out-of-memory error, rolls every write back).
        """
        plan = self._plan_add(A, B, alpha=alpha, scale=scale, use_rslora=use_rslora, adapter_id=adapter_id,
                              non_blocking=non_blocking, check_finite=check_finite)
        with transaction() as txn:
            self._write_add(plan, txn)
        return plan.adapter_id

    def remove(self, adapter_id: int) -> None:
        """Free an adapter's slot and rows (reused by later :meth:`add` calls; their values stay until then).

        Raises TypeError / ValueError (not an integer, out of range, a free slot); nothing changes when it raises.
        """
        plan = self._plan_remove(adapter_id)
        with transaction() as txn:
            self._write_remove(plan, txn)

    # The two phases of add/remove (see lora_kernels._transaction): _plan_* validates and converts, writing
    # nothing; _write_* writes under a transaction that AdapterPool and DualLoRAWeights share across objects.
    def _plan_add(self, A, B, *, alpha=None, scale=None, use_rslora=False, adapter_id=None, non_blocking=False,
                  check_finite=True) -> "_AddPlan":
        S = self.num_slices
        As = _as_list("A", A, S)
        Bs = _as_list("B", B, S)
        ranks = []
        for s in range(S):
            na, nb = ("A", "B") if S == 1 else (f"A[{s}]", f"B[{s}]")
            _check_source(na, As[s])
            _check_source(nb, Bs[s])
            r = As[s].shape[0]
            check(As[s].shape[1] == self.in_features, na, f"shape (r, {self.in_features})", tuple(As[s].shape))
            check(1 <= r <= self.max_rank, na, f"rank in [1, max_rank={self.max_rank}]", r)
            check(tuple(Bs[s].shape) == (self.slice_outs[s], r), nb, f"shape ({self.slice_outs[s]}, {r})",
                  tuple(Bs[s].shape))
            ranks.append(r)
        check(type(use_rslora) is bool, "use_rslora", "a bool", repr(use_rslora), TypeError)
        check(type(non_blocking) is bool, "non_blocking", "a bool", repr(non_blocking), TypeError)
        check(type(check_finite) is bool, "check_finite", "a bool", repr(check_finite), TypeError)
        scales = self._scales(ranks, alpha, scale, use_rslora)
        if adapter_id is None:
            adapter_id = next((i for i in range(self.max_adapters) if i not in self._alloc), None)
            check(adapter_id is not None, "adapter_id", f"a free slot (all {self.max_adapters} in use)", "none free")
        else:
            adapter_id = self._check_id(adapter_id)
            check(adapter_id not in self._alloc, "adapter_id", "a free slot (remove() it first)",
                  f"{adapter_id} in use")
        nrows = max(ranks)
        off, free = self._first_fit(nrows)
        # Convert now (a refusal after a partial write is what this order prevents): the storage dtype, detached;
        # a source that shares memory with this storage is copied first, so the writes cannot read what they wrote.
        src_a, src_bt = [], []
        with torch.no_grad():
            for s in range(S):
                na, nb = ("A", "B") if S == 1 else (f"A[{s}]", f"B[{s}]")
                a_s = As[s].detach().to(self.dtype)
                b_s = Bs[s].detach().to(self.dtype)
                if check_finite:
                    check(bool(torch.isfinite(a_s).all()), na, f"finite values in {self.dtype}", "NaN/Inf")
                    check(bool(torch.isfinite(b_s).all()), nb, f"finite values in {self.dtype}", "NaN/Inf")
                if any(overlaps(t, own) for t in (a_s, b_s) for own in (self.a, self.b)):
                    a_s, b_s = a_s.clone(), b_s.clone()
                src_a.append(a_s)
                src_bt.append(b_s.t())
        return _AddPlan(adapter_id, tuple(ranks), tuple(scales), off, nrows, tuple(free), tuple(src_a),
                        tuple(src_bt), non_blocking)

    def _write_add(self, p: "_AddPlan", txn: Transaction) -> None:
        i, off, n = p.adapter_id, p.off, p.nrows
        txn.track(self)
        with torch.no_grad():
            txn.save(self.a[:, off : off + n])
            txn.save(self.b[off : off + n])
            txn.save(self.offsets[i : i + 1])
            txn.save(self.ranks[:, i])
            txn.save(self.scales[:, i])
            for s in range(self.num_slices):
                r = p.ranks[s]
                cols = slice(self.slice_cols[s], self.slice_cols[s] + self.slice_outs[s])
                self.a[s, off : off + r].copy_(p.A[s], non_blocking=p.non_blocking)
                self.a[s, off + r : off + n].zero_()
                self.b[off : off + r, cols].copy_(p.Bt[s], non_blocking=p.non_blocking)
                self.b[off + r : off + n, cols].zero_()
            self.offsets[i] = off
            # Scalar fills, not a host tensor copy: a pageable host-to-device copy would sync the stream. The
            # scales were rounded to fp32 by the plan, so the fill is exact and cannot overflow.
            for s in range(self.num_slices):
                self.ranks[s, i] = p.ranks[s]
                self.scales[s, i] = p.scales[s]
        self._alloc[i] = (off, n)
        self._host_ranks[i] = p.ranks
        self._free = list(p.free)
        self._version += 1

    def _plan_remove(self, adapter_id) -> "_RemovePlan":
        i = self._check_id(adapter_id, loaded=True)
        off, n = self._alloc[i]
        return _RemovePlan(i, tuple(_coalesce(self._free + [(off, n)])))

    def _write_remove(self, p: "_RemovePlan", txn: Transaction) -> None:
        i = p.adapter_id
        txn.track(self)
        with torch.no_grad():
            txn.save(self.ranks[:, i])
            txn.save(self.scales[:, i])
            txn.save(self.offsets[i : i + 1])
            self.ranks[:, i] = 0
            self.scales[:, i] = 0.0
            self.offsets[i] = 0
        del self._alloc[i]
        del self._host_ranks[i]
        self._free = list(p.free)
        self._version += 1

    def _host_state(self):
        # Shallow copies: the (offset, rows) tuples keep their identity, which merge plans compare.
        return dict(self._alloc), dict(self._host_ranks), list(self._free), self._version

    def _restore_host_state(self, state) -> None:
        alloc, host_ranks, free, version = state
        self._alloc.clear()
        self._alloc.update(alloc)
        self._host_ranks.clear()
        self._host_ranks.update(host_ranks)
        self._free = list(free)
        self._version = version

    def _scales(self, ranks, alpha, scale, use_rslora) -> List[float]:
        """Per-slice scales as Python floats exactly representable in fp32 (the ``scales`` dtype), computed in
        float64 and checked after the rounding to fp32; the refusal names ``scale`` or ``alpha``."""
        S = self.num_slices
        al = None if alpha is None else check_real("alpha", alpha)
        if scale is not None:
            if isinstance(scale, (str, bytes)) or not (_is_number(scale) or _is_sequence(scale)):
                raise TypeError(f"scale: expected a real number or {S} real numbers (one per slice), got "
                                f"{type(scale).__name__} {scale!r:.60}")
            if _is_number(scale):
                return [check_fits("scale", check_real("scale", scale))] * S
            vals = list(scale)
            check(len(vals) == S, "scale", f"one real number or {S} (one per slice)", f"{len(vals)} values")
            return [check_fits(f"scale[{s}]", check_real(f"scale[{s}]", v)) for s, v in enumerate(vals)]
        out = []
        for r in ranks:
            a = float(r) if al is None else al
            v = a / math.sqrt(r) if use_rslora else a / r
            out.append(check_fits("alpha", v, what=f"the scale alpha / {'sqrt(r)' if use_rslora else 'r'} "
                                              f"(alpha={a!r:.30}, r={r})"))
        return out

    def _first_fit(self, n: int) -> Tuple[int, List[Tuple[int, int]]]:
        """First row of the first free range holding ``n`` rows, and the free list after taking them (the
        allocator is not changed). First fit keeps low rows dense, which keeps padded views possible."""
        for k, (start, length) in enumerate(self._free):
            if length >= n:
                free = list(self._free)
                if length == n:
                    free.pop(k)
                else:
                    free[k] = (start + n, length - n)
                return start, free
        raise ValueError(
            f"A: expected room for {n} rows in capacity_rows={self.capacity_rows}, got {self.free_rows} free rows "
            f"in {len(self._free)} ranges (remove adapters or raise capacity_rows)"
        )

    def _give_rows(self, off: int, n: int) -> None:
        self._free = _coalesce(self._free + [(off, n)])

    def _check_id(self, adapter_id, loaded: bool = False) -> int:
        """``adapter_id`` as a Python int in ``[0, max_adapters)`` (numpy / 0-dim integer tensors accepted; never
        bool or float), and a loaded one when ``loaded``."""
        try:
            i = check_int("adapter_id", adapter_id, lo=0, hi=self.max_adapters - 1)
        except ValueError:
            raise ValueError(f"adapter_id: expected an int in [0, {self.max_adapters}), got {adapter_id}") from None
        if loaded:
            check(i in self._alloc, "adapter_id", "a loaded adapter", f"{i} (free slot)")
        return i

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
            ranks: integer [N] or [S, N] (e.g. int32), values in [0, r_max]; defaults to r_max for every slot.
            scales: real [N] or [S, N] (e.g. float32), finite and fitting fp32; defaults to 1.
            slice_outs: output widths of the slices (default: one slice of width ``out``).

        The returned object shares memory with ``a`` and ``b``: writes through either are seen by the other
        (``ranks`` and ``scales`` are copied into its own tensors; reading them is a host sync for GPU tensors).
        Raises ValueError when the tensors cannot be viewed as the rank-paged layout without a copy (or a value
        is out of range), TypeError for wrong dtypes.
        """
        check_tensor("a", a, dtypes=FLOAT_DTYPES)
        check(a.device.type != "meta", "a", "a tensor with data", "a tensor on the meta device")
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
        rk = torch.full((S, N), r_max, dtype=torch.int32) if ranks is None else _per_slot("ranks", ranks, S, N)
        check(not rk.dtype.is_floating_point and not rk.is_complex() and rk.dtype != torch.bool, "ranks",
              "an integer tensor", rk.dtype, TypeError)
        rk_host = rk.to("cpu", torch.int64)
        check(bool(((rk_host >= 0) & (rk_host <= r_max)).all()), "ranks", f"values in [0, {r_max}]", rk_host.tolist())
        rk_host = rk_host.to(torch.int32)
        sc = torch.ones(S, N) if scales is None else _per_slot("scales", scales, S, N)
        check(sc.dtype.is_floating_point or not (sc.is_complex() or sc.dtype == torch.bool), "scales",
              "a real tensor", sc.dtype, TypeError)
        sc = sc.to("cpu", torch.float64)
        fmax = torch.finfo(torch.float32).max
        check(bool((sc.abs() <= fmax).all()), "scales", f"finite values with |scale| <= {fmax:.6g} (fp32)",
              "NaN/Inf or an overflow")
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
        adapter_id = self._check_id(adapter_id, loaded=True)
        slice_index = check_int("slice_index", slice_index, lo=0, hi=self.num_slices - 1)
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
        for name, t in (("a", self.a), ("b", self.b)):
            check(t.is_leaf or t.requires_grad == requires_grad, "requires_grad",
                  f"a flag that {name} (a non-leaf view, from_padded over a tensor that requires grad) can take",
                  requires_grad)
        old = (self.a.requires_grad, self.b.requires_grad)
        try:
            self.a.requires_grad_(requires_grad)
            self.b.requires_grad_(requires_grad)
        except BaseException:
            if self.a.is_leaf:
                self.a.requires_grad_(old[0])
            if self.b.is_leaf:
                self.b.requires_grad_(old[1])
            raise
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


@dataclass(frozen=True)
class _AddPlan:
    """A validated :meth:`LoRAWeights.add`: everything converted, nothing written yet."""

    adapter_id: int
    ranks: Tuple[int, ...]
    scales: Tuple[float, ...]  # exactly representable in fp32
    off: int
    nrows: int
    free: Tuple[Tuple[int, int], ...]  # the free list once the rows are taken
    A: Tuple[torch.Tensor, ...]  # per slice [r, in], storage dtype, detached
    Bt: Tuple[torch.Tensor, ...]  # per slice [r, out_s]
    non_blocking: bool


@dataclass(frozen=True)
class _RemovePlan:
    adapter_id: int
    free: Tuple[Tuple[int, int], ...]


def _as_list(name: str, v: TensorOrSeq, S: int) -> List[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        check(S == 1, name, f"a sequence of {S} tensors (one per slice)", "one tensor")
        return [v]
    check(isinstance(v, Sequence) and not isinstance(v, (str, bytes)), name,
          "a tensor or a sequence of tensors (one per slice)", type(v).__name__, TypeError)
    vs = list(v)
    check(len(vs) == S, name, f"{S} tensors (one per slice)", len(vs))
    return vs


def _per_slot(name: str, t: Any, S: int, N: int) -> torch.Tensor:
    """``ranks`` / ``scales`` of :meth:`LoRAWeights.from_padded`: a tensor of shape [N] or [S, N] -> [S, N]."""
    check_tensor(name, t)
    check(t.device.type != "meta", name, "a tensor with data", "a tensor on the meta device")
    check(tuple(t.shape) in ((N,), (1, N), (S, N)), name, f"shape ({N},) or ({S}, {N})", tuple(t.shape))
    return t.reshape(-1, N).expand(S, N)


def _check_source(name: str, t: Any) -> None:
    """A/B factors: 2-D float tensors with data (not meta, not sparse)."""
    check_tensor(name, t, ndim=2, dtypes=FLOAT_DTYPES)
    check(t.device.type != "meta", name, "a tensor with data", "a tensor on the meta device")
    check(t.layout == torch.strided, name, "a dense (strided) tensor", t.layout)


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Number) or (isinstance(x, torch.Tensor) and x.ndim == 0) or (
        hasattr(x, "ndim") and hasattr(x, "dtype") and getattr(x, "ndim", None) == 0)


def _is_sequence(x: Any) -> bool:
    return (isinstance(x, Sequence) and not isinstance(x, (str, bytes))) or (
        hasattr(x, "ndim") and hasattr(x, "__len__") and getattr(x, "ndim", 0) == 1)


def _coalesce(ranges) -> List[Tuple[int, int]]:
    """Sorted (start, n) row ranges with adjacent ones merged (the free list of the row allocator)."""
    out: List[Tuple[int, int]] = []
    for start, n in sorted(ranges):
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((start, n))
    return out
