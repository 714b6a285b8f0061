"""Tensor-parallel LoRA over torch.distributed: one rank's share of a :class:`~lora_kernels.LoRAWeights`, and
the ops that add the LoRA delta on that rank (gloo on CPU tensors, NCCL on CUDA tensors, any process group).

Semantics (``tp`` ranks, this rank ``k``; one layer with base weight ``W0 [out, in]``, slices ``s`` of widths
``out_s``; the delta of adapter ``i`` is ``s_i (x A_i^T) B_i^T`` per slice, as in :mod:`lora_kernels.ops.sgmv`):

    Column-parallel layer (``W0`` split by output rows, x replicated, y = this rank's output rows):
        ``shard_weights(w, k, tp, "column")``: B split by output rows *per slice* (the S-LoRA / vLLM scheme for
        fused q/k/v and gate/up projections): rank k owns rows ``[k out_s / tp, (k + 1) out_s / tp)`` of every
        slice s, and ``y_local`` is those rows of every slice side by side (``[T, sum(out_s) / tp]``, what
        vLLM's ``QKVParallelLinear`` / ``MergedColumnParallelLinear`` give each rank). A replicated.
        :func:`column_parallel_add_lora_` is :func:`~lora_kernels.add_lora_` on the shard: no communication.

        ``fully_sharded=True`` (vLLM ``fully_sharded_loras``, S-LoRA's column scheme): A split by rank rows too,
        interleaved: rank k owns rows ``j`` of each adapter with ``j % tp == k``. The op shrinks with its rows
        (``h_k [S, T, ceil(max_rank / tp)]``), ``all_gather``\\ s the small ``h`` (fp32), reassembles the full
        ``h`` (row ``j`` came from rank ``j % tp``; a permute, no per-adapter index) and expands with its B rows.

    Row-parallel layer (``W0`` split by input columns; rank k gets ``x_k = x[:, k in / tp : (k + 1) in / tp]``
    and computes the partial output ``x_k W0_k^T``; the layer's own ``all_reduce`` sums the partials):
        ``shard_weights(w, k, tp, "row")``: A split by input columns, B replicated. Since
        ``delta = sum_k s (x_k A_k^T) B^T``, :func:`row_parallel_add_lora_` with ``reduce="caller"`` adds this
        rank's partial delta into the partial output y BEFORE the layer's ``all_reduce``: that ``all_reduce``
        then sums the base and the LoRA partials together (zero extra communication). With ``reduce="h"``
        the op ``all_reduce``\\ s the small ``h = sum_k x_k A_k^T`` (fp32 ``[S, T, max_rank]``) and expands
        locally: y is then the FULL output on every rank (after the layer's reduce) and gets the full delta.
        That moves ``S T max_rank`` fp32 values instead of the ``T out`` delta: cheaper when
        ``4 S max_rank < out * y.element_size()``, and the only way when the caller needs the delta on every
        rank without reducing its own output.

        ``fully_sharded=True`` (vLLM's sharded row LoRA, S-LoRA's row scheme): A split by input columns and B by
        output rows per slice. With ``reduce="caller"`` the op ``all_reduce``\\ s ``h`` and rank k adds the full
        delta's rows ``[k out_s / tp, (k + 1) out_s / tp)`` of every slice into its partial output y before the
        layer's ``all_reduce`` (which sums the shares: one small ``all_reduce`` of ``h`` plus the one the layer
        does anyway). ``reduce="h"`` (a full delta on every rank) needs the whole B: refused for this shard.

    Tokens with adapter ``-1`` (and adapters of rank 0) leave y bit-identical on every rank, in every scheme.
    Mixed mode (``merged=m``, :func:`~lora_kernels.add_lora_`) is served where the op is one ``add_lora_``
    (column, and row with ``reduce="caller"``, not fully sharded): the partial deltas of ``delta_i - delta_m``
    sum like those of ``delta_i``. The gathered / reduced schemes run ``shrink`` + ``expand_``, which have no
    mixed mode: ``merged`` is refused there.

Sharding is a load-time conversion (:func:`shard_weights`): call it once per load event (after the full
weights' ``add`` / ``remove``); it never reads device data back to the host (the allocation comes from the
weights' host mirror) and the shard is a snapshot that owns its storage. Memory per rank, in elements of the
storage dtype (``R`` rows, ``S`` slices, ``out = sum(out_s)``; the full weights hold ``S R in + R out``):

    ============================  ================================================================
    column                        ``S R in + R out / tp``  (A replicated)
    column, fully sharded         ``S R_k in + R out / tp``, ``R_k = sum_i ceil(n_i / tp)`` over the
                                  loaded adapters (``n_i`` rows each; free rows are not copied)
    row                           ``S R in / tp + R out``  (B replicated)
    row, fully sharded            ``S R in / tp + R out / tp``
    ============================  ================================================================

plus the full weights while the caller keeps them (keep them on the host and pass ``device=`` to place only
the shard on the GPU). :attr:`TPShard.nbytes` reports the shard's bytes.

Refusals. Every op validates its arguments before any collective: ``TypeError`` / ``ValueError`` naming the
argument, as the single-GPU ops. The ops with a collective (fully sharded column, ``reduce="h"``, fully sharded
row) first exchange a 3-int64 header (status, T, a signature of the shard) with one ``all_gather``: a refusal
on any rank (a bad x on one rank, a shard made for another rank, a different token count) is raised on every
rank, naming the same argument (the other ranks say which rank refused), and no rank is left waiting in a
collective; y is unchanged everywhere. The header costs one small collective and one host read per call;
``check_peers=False`` drops it (then only the ranks with bad inputs raise, and their peers block in the payload
collective until the group's timeout: for callers whose ranks run the same code on the same batch), and it is
skipped while a CUDA graph is captured or under torch.compile (no host read there; the eager warm-up checked
the same shapes). The arguments that select the protocol (``group``, ``reduce``, ``check_peers``, the shard's
kind) must be the same on every rank: they are checked locally.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from ._validation import check, check_int
from .batch import LoRABatch
from .ops import add_lora_, expand_, shrink
from .ops.sgmv import _check_no_grad, _check_out_disjoint, _check_y
from .weights import LoRAWeights

__all__ = ["TPShard", "shard_weights", "column_parallel_add_lora_", "row_parallel_add_lora_"]

LAYERS = ("column", "row")
REDUCE = ("caller", "h")


@dataclass(frozen=True, eq=False)
class TPShard:
    """One tensor-parallel rank's share of a LoRAWeights (see the module docstring); made by :func:`shard_weights`.

    Attributes:
        layer: ``"column"`` or ``"row"``.
        tp_rank, tp_size: the rank it was made for, in a group of ``tp_size`` ranks.
        fully_sharded: A (column) or B (row) split as well.
        weights: the LoRAWeights :func:`~lora_kernels.shrink` (and, not fully sharded, ``add_lora_``) reads on
            this rank: x is ``[T, weights.in_features]`` and y ``[T, weights.out_features]``. Fully sharded, its
            ``b`` is a NaN placeholder (this rank's B rows are in ``expand_weights``): serve it with the ops here.
        expand_weights: the LoRAWeights :func:`~lora_kernels.expand_` reads: ``(weights,)`` when not fully
            sharded; fully sharded, this rank's B rows (one object, column; one per slice, row) over a NaN
            placeholder ``a``.
    """

    layer: str
    tp_rank: int
    tp_size: int
    fully_sharded: bool
    weights: LoRAWeights
    expand_weights: Tuple[LoRAWeights, ...]

    @property
    def in_features(self) -> int:
        """Width of the x this rank's op takes (``in`` column-parallel, ``in / tp`` row-parallel)."""
        return self.weights.in_features

    @property
    def out_features(self) -> int:
        """Width of the y this rank's op takes (``sum(out_s) / tp`` column-parallel, ``sum(out_s)`` row)."""
        return self.weights.out_features

    @property
    def nbytes(self) -> int:
        """Bytes of device storage the shard holds (A and B rows and the per-slot metadata; placeholders count
        one element)."""
        seen: Dict[int, int] = {}
        for w in (self.weights, *self.expand_weights):
            for t in (w.a, w.b, w.offsets, w.ranks, w.scales, w.slice_info):
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
        return sum(seen.values())

    @cached_property
    def signature(self) -> int:
        """A CRC of the shard's kind and sizes: equal on every rank of one layer (the op header compares it)."""
        w = self.weights
        key = (self.layer, self.fully_sharded, self.tp_size, w.num_slices, w.in_features, w.slice_outs,
               self.expand_weights[0].max_rank, w.max_rank, w.max_adapters)
        return zlib.crc32(repr(key).encode()) & 0x7FFFFFFF

    def __repr__(self) -> str:
        fs = ", fully_sharded" if self.fully_sharded else ""
        return (f"TPShard({self.layer}{fs}, rank {self.tp_rank}/{self.tp_size}, x [T, {self.in_features}], "
                f"y [T, {self.out_features}], {self.nbytes} bytes)")


# ---- sharding (load time) ---------------------------------------------------------------------------------------


def shard_weights(weights: LoRAWeights, tp_rank: int, tp_size: int, layer: str, *, fully_sharded: bool = False,
                  device: Optional[Union[torch.device, str]] = None) -> TPShard:
    """This rank's share of ``weights`` for a column- or row-parallel layer (see the module docstring).

    Args:
        weights: the layer's full :class:`~lora_kernels.LoRAWeights` (every rank passes the same adapters).
        tp_rank: this rank in the tensor-parallel group, in ``[0, tp_size)``.
        tp_size: the group's size (>= 1).
        layer: ``"column"`` (B split by output rows per slice) or ``"row"`` (A split by input columns).
        fully_sharded: also split A by rank rows (column) or B by output rows (row).
        device: where the shard's storage goes (default: the weights' device); e.g. full weights kept on the
            host, shard on this rank's GPU.

    Returns:
        A :class:`TPShard` owning copies of its rows (later writes to ``weights`` do not reach it: call again
        after each load event). Ranks, scales and the row allocation are copied device to device; nothing is
        read back to the host.

    Raises:
        TypeError: ``weights`` not a LoRAWeights, non-int tp_rank / tp_size, non-bool fully_sharded.
        ValueError: tp_rank out of range, an unknown layer, a slice width (column, or row fully sharded) or
            ``in_features`` (row) that ``tp_size`` does not divide (the message names ``tp_size`` and the widths).
    """
    check(isinstance(weights, LoRAWeights), "weights", "a LoRAWeights", type(weights).__name__, TypeError)
    tp_size = check_int("tp_size", tp_size, lo=1)
    tp_rank = check_int("tp_rank", tp_rank, lo=0, hi=tp_size - 1)
    check(layer in LAYERS, "layer", f"one of {LAYERS}", repr(layer))
    check(type(fully_sharded) is bool, "fully_sharded", "a bool", repr(fully_sharded), TypeError)
    if layer == "column" or fully_sharded:
        check(all(o % tp_size == 0 for o in weights.slice_outs), "tp_size",
              f"a divisor of every slice's out_features {list(weights.slice_outs)} (each slice is split by output "
              f"rows)", tp_size)
    if layer == "row":
        check(weights.in_features % tp_size == 0, "tp_size",
              f"a divisor of in_features={weights.in_features} (row-parallel: A is split by input columns)", tp_size)
    device = weights.device if device is None else torch.device(device)
    with torch.no_grad():
        if layer == "column":
            parts = _column_shard(weights, tp_rank, tp_size, fully_sharded, device)
        else:
            parts = _row_shard(weights, tp_rank, tp_size, fully_sharded, device)
    return TPShard(layer, tp_rank, tp_size, fully_sharded, *parts)


def _column_shard(w: LoRAWeights, k: int, tp: int, fully_sharded: bool, device) -> Tuple[LoRAWeights, tuple]:
    outs = tuple(o // tp for o in w.slice_outs)
    b = _output_rows(w.b, w, k, tp).to(device)  # (cat: already a copy of its own)
    if not fully_sharded:
        wk = _weights_over(w, _owned(w.a, device), b, w.in_features, outs)
        return wk, (wk,)
    wb = _weights_over(w, _placeholder(w.a.shape, w.dtype, device), b, w.in_features, outs)
    return _rank_rows(w, k, tp, outs, device), (wb,)


def _row_shard(w: LoRAWeights, k: int, tp: int, fully_sharded: bool, device) -> Tuple[LoRAWeights, tuple]:
    n_in = w.in_features // tp
    a = _owned(w.a[:, :, k * n_in : (k + 1) * n_in], device)
    if not fully_sharded:
        wk = _weights_over(w, a, _owned(w.b, device), n_in, w.slice_outs)
        return wk, (wk,)
    wa = _weights_over(w, a, _placeholder(w.b.shape, w.dtype, device), n_in, w.slice_outs)
    per_slice = []
    for s, (c0, o) in enumerate(zip(w.slice_cols, w.slice_outs)):
        n = o // tp
        b_s = _owned(w.b[:, c0 + k * n : c0 + (k + 1) * n], device)
        per_slice.append(_weights_over(w, _placeholder((1, *w.a.shape[1:]), w.dtype, device), b_s, w.in_features,
                                       (n,), slices=slice(s, s + 1)))
    return wa, tuple(per_slice)


def _output_rows(b: torch.Tensor, w: LoRAWeights, k: int, tp: int) -> torch.Tensor:
    """Columns of ``b`` (B transposed) holding output rows ``[k out_s / tp, (k + 1) out_s / tp)`` of every slice,
    slice after slice: this rank's B under the per-slice split."""
    return torch.cat([b[:, c0 + k * (o // tp) : c0 + (k + 1) * (o // tp)] for c0, o in zip(w.slice_cols, w.slice_outs)],
                     dim=1)


def _rank_rows(w: LoRAWeights, k: int, tp: int, outs, device) -> LoRAWeights:
    """The fully sharded column A: rank k's rows ``j % tp == k`` of every adapter, compacted.

    Adapter i (``n`` rows at ``off``) gets ``c = ceil(n / tp)`` local rows on every rank, adapters one after the
    other in the order of their offsets (so every rank has the same local offsets); local row q holds global
    row ``off + q tp + k`` (zero when that is past ``n``). Its local rank in slice s is ``ceil((r - k) / tp)``
    (``r`` = ranks[s, i]): the rows ``j < r`` with ``j % tp == k``, so a shrink over these rows gives
    ``h[s, t, q] = x_t . A[j = q tp + k]`` and zero past the rank, as the full shrink's column ``j``."""
    src, dst, alloc, pos = [], [], {}, 0
    for i, (off, n) in sorted(w._alloc.items(), key=lambda item: item[1][0]):
        c = -(-n // tp)
        alloc[i] = (pos, c)
        for q in range(c):
            if q * tp + k < n:
                src.append(off + q * tp + k)
                dst.append(pos + q)
        pos += c
    a = torch.zeros(w.num_slices, max(pos, 1), w.in_features, dtype=w.dtype, device=device)
    if src:
        rows = w.a[:, torch.tensor(src, device=w.device)]
        a[:, torch.tensor(dst, device=device)] = rows.to(device)
    offsets = torch.zeros(w.max_adapters, dtype=torch.int64)
    for i, (o, _) in alloc.items():
        offsets[i] = o
    host_ranks = {i: tuple((r - k + tp - 1) // tp for r in rs) for i, rs in w._host_ranks.items()}
    return _weights_over(w, a, _placeholder((max(pos, 1), sum(outs)), w.dtype, device), w.in_features, outs,
                         max_rank=-(-w.max_rank // tp), offsets=offsets, ranks=(w.ranks - k + tp - 1) // tp,
                         alloc=alloc, host_ranks=host_ranks)


def _weights_over(like: LoRAWeights, a: torch.Tensor, b: torch.Tensor, in_features: int, outs: Sequence[int], *,
                  slices: slice = slice(None), max_rank: Optional[int] = None, offsets=None, ranks=None,
                  alloc=None, host_ranks=None) -> LoRAWeights:
    """A LoRAWeights over the storage ``a`` / ``b`` with ``like``'s slots (its offsets, ranks, scales and host
    allocation, for the slices ``slices``) unless given. The storage is LoRAWeights' own (``_init_storage``, as
    :meth:`LoRAWeights.from_padded` builds it); it has no free rows (a snapshot: re-shard after a load)."""
    w = LoRAWeights.__new__(LoRAWeights)
    w._init_storage(a, b, in_features, tuple(outs), like.max_adapters, like.max_rank if max_rank is None else max_rank)
    w.offsets.copy_(like.offsets if offsets is None else offsets)
    w.ranks.copy_((like.ranks if ranks is None else ranks)[slices])
    w.scales.copy_(like.scales[slices])
    w._alloc.update(like._alloc if alloc is None else alloc)
    host = like._host_ranks if host_ranks is None else host_ranks
    w._host_ranks.update({i: rs[slices] for i, rs in host.items()})
    w._free = []
    return w


def _owned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A contiguous copy of ``t`` on ``device`` that shares no memory with it (detached: the shard serves)."""
    return t.detach().to(device=device, copy=True, memory_format=torch.contiguous_format)


def _placeholder(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A NaN tensor of ``shape`` backed by one element: the factor a fully sharded part does not hold (its op
    never reads it; a misuse with add_lora_ shows as NaN instead of a silently wrong delta)."""
    return torch.full((1,), float("nan"), dtype=dtype, device=device).expand(*shape)


# ---- ops (per step) -------------------------------------------------------------------------------------------


def column_parallel_add_lora_(y: torch.Tensor, x: torch.Tensor, shard: TPShard, batch: LoRABatch, *,
                              group: Optional["dist.ProcessGroup"] = None, merged: Optional[int] = None,
                              check_peers: bool = True) -> torch.Tensor:
    """``y[t, local rows of slice s] += s_i (x[t] A_i^T) B_{i, s, k}^T`` in place on this rank; returns y.

    Args:
        y: ``[T, shard.out_features]`` this rank's output of the column-parallel layer (its rows of every slice,
            slice after slice), fp16/bf16/fp32.
        x: ``[T, in]`` the layer's input (replicated on every rank).
        shard: this rank's column shard (:func:`shard_weights` with ``layer="column"``).
        batch: the :class:`~lora_kernels.LoRABatch` of these T tokens (the same ids on every rank).
        group: the tensor-parallel process group (default: the world); the shard must have been made for this
            process's rank in it and for its size.
        merged: mixed mode (see :func:`~lora_kernels.add_lora_`); refused for a fully sharded shard.
        check_peers: fully sharded only: exchange the refusal header first (module docstring).

    Not fully sharded: one :func:`~lora_kernels.add_lora_` on the shard, no communication (the group is only
    checked, when torch.distributed is initialised). Fully sharded: shrink with this rank's A rows, one
    ``all_gather`` of h (fp32 ``[S, T, ceil(max_rank / tp)]`` per rank), expand with its B rows.

    Raises:
        TypeError / ValueError naming the argument (every rank raises when one refuses, fully sharded);
        RuntimeError: a fully sharded call without an initialised torch.distributed, or x / y requiring grad.
        y is unchanged when it raises.
    """
    _check_protocol(shard, "column", check_peers)
    if not shard.fully_sharded:
        _check_shard_in_group(shard, group)
        return add_lora_(y, x, shard.weights, batch, merged=merged)
    _check_group(group)

    def local() -> torch.Tensor:
        _refuse_merged(merged, "a fully sharded column shard")
        _check_shard_in_group(shard, group)
        h = shrink(x, shard.weights, batch)
        _check_output(y, shard, batch, h, group)
        return h

    h = _agreed(local, group, shard, "column_gather", check_peers)
    if h.shape[1]:
        _expand_all(y, _gather_rank_rows(h, shard, group), shard, batch)
    return y


def row_parallel_add_lora_(y: torch.Tensor, x: torch.Tensor, shard: TPShard, batch: LoRABatch, *,
                           group: Optional["dist.ProcessGroup"] = None, reduce: str = "caller",
                           merged: Optional[int] = None, check_peers: bool = True) -> torch.Tensor:
    """Add the LoRA delta of a row-parallel layer on this rank; returns y (see the module docstring).

    Args:
        y: ``[T, out]``: with ``reduce="caller"`` this rank's PARTIAL output ``x_k W0_k^T``, before the layer's
            ``all_reduce``; with ``reduce="h"`` the FULL output (after it), the same on every rank.
        x: ``[T, in / tp]``: this rank's input columns ``x_k``.
        shard: this rank's row shard (:func:`shard_weights` with ``layer="row"``).
        batch: the :class:`~lora_kernels.LoRABatch` of these T tokens (the same ids on every rank).
        group: the tensor-parallel process group (default: the world).
        reduce: ``"caller"``: y += this rank's share, the layer's ``all_reduce`` completes the delta (plain
            shard: the partial delta ``x_k A_k^T B^T``, no communication; fully sharded: the full delta's output
            rows of this rank, after one ``all_reduce`` of h). ``"h"``: one ``all_reduce`` of h (fp32
            ``[S, T, max_rank]``), then y += the full delta on every rank (plain shard only).
        merged: mixed mode; only with ``reduce="caller"`` on a plain shard (one ``add_lora_``).
        check_peers: for the calls with a collective: exchange the refusal header first (module docstring).

    Raises:
        TypeError / ValueError naming the argument (every rank raises when one refuses, when there is a
        collective); RuntimeError: no initialised torch.distributed where a collective is needed, or x / y
        requiring grad. y is unchanged when it raises.
    """
    _check_protocol(shard, "row", check_peers)
    check(reduce in REDUCE, "reduce", f"one of {REDUCE}", repr(reduce))
    check(reduce == "caller" or not shard.fully_sharded, "reduce",
          "'caller' for a fully sharded row shard (it holds 1/tp of B: it adds its output rows of the delta to its "
          "partial output, the layer's all_reduce sums them)", repr(reduce))
    if reduce == "caller" and not shard.fully_sharded:
        _check_shard_in_group(shard, group)
        return add_lora_(y, x, shard.weights, batch, merged=merged)
    _check_group(group)

    def local() -> torch.Tensor:
        _refuse_merged(merged, f"reduce={reduce!r}" if not shard.fully_sharded else "a fully sharded row shard")
        _check_shard_in_group(shard, group)
        h = shrink(x, shard.weights, batch)
        _check_output(y, shard, batch, h, group)
        return h

    h = _agreed(local, group, shard, f"row_{reduce}", check_peers)
    if h.shape[1]:
        dist.all_reduce(h, group=group)
        _expand_all(y, h, shard, batch)
    return y


# ---- the parts of the ops -------------------------------------------------------------------------------------


def _check_protocol(shard, layer: str, check_peers) -> None:
    """What selects the protocol (checked locally, before anything): the shard's type and kind, check_peers."""
    check(isinstance(shard, TPShard), "shard", "a TPShard (lora_kernels.tensor_parallel.shard_weights)",
          type(shard).__name__, TypeError)
    check(shard.layer == layer, "shard", f"a {layer}-parallel shard (shard_weights(..., layer={layer!r}))",
          f"a {shard.layer}-parallel shard")
    check(type(check_peers) is bool, "check_peers", "a bool", repr(check_peers), TypeError)


def _check_group(group) -> None:
    """An initialised torch.distributed and a group this process belongs to (local: a process outside the group
    takes part in no collective of it)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("lora_kernels.tensor_parallel: torch.distributed is not initialised (call "
                           "torch.distributed.init_process_group first, e.g. under torchrun)")
    check(group is None or isinstance(group, dist.ProcessGroup), "group", "None (the world) or a ProcessGroup",
          type(group).__name__, TypeError)
    check(dist.get_rank(group) >= 0, "group", "a group this process belongs to", "a group without it")


def _check_shard_in_group(shard: TPShard, group) -> None:
    """The shard was made for this process's rank in ``group`` and for its size (when torch.distributed is
    initialised; a single process without it may serve any shard, e.g. to simulate the ranks)."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return
    _check_group(group)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    check(shard.tp_size == size and shard.tp_rank == rank, "shard",
          f"a shard made for rank {rank} of a group of {size}", f"one for rank {shard.tp_rank} of {shard.tp_size}")


def _refuse_merged(merged, where: str) -> None:
    check(merged is None, "merged", f"None for {where} (mixed mode needs one add_lora_: use a plain shard with "
          "reduce='caller')", repr(merged))


def _check_output(y, shard: TPShard, batch, h: torch.Tensor, group) -> None:
    """y before the collective (expand_ checks it again after): its shape, dtype, device and strides, its
    memory clear of the shard's storage, no grad; and h on a device the group's backend communicates on."""
    _check_y(y, shard.weights, h.shape[1], h.device)
    for w in shard.expand_weights:
        _check_out_disjoint(y, {}, w, batch)
    _check_no_grad(y)
    served = _backend_devices(group)
    check(served is None or h.device.type in served, "x",
          f"tensors on a device the group's backend {dist.get_backend(group)} communicates on ({sorted(served or ())})",
          h.device)


def _gather_rank_rows(h: torch.Tensor, shard: TPShard, group) -> torch.Tensor:
    """The full h ``[S, T, max_rank]`` from every rank's ``h_k [S, T, c]`` (fully sharded column): one
    ``all_gather``; column ``j`` of the full h is column ``j // tp`` of rank ``j % tp``'s."""
    S, T, c = h.shape
    tp = shard.tp_size
    parts = h.new_empty(tp, S, T, c)
    dist.all_gather(list(parts.unbind(0)), h, group=group)
    return parts.permute(1, 2, 3, 0).reshape(S, T, c * tp)[:, :, : shard.expand_weights[0].max_rank].contiguous()


def _expand_all(y: torch.Tensor, h: torch.Tensor, shard: TPShard, batch) -> None:
    """expand_ with the full h: into all of y, or (fully sharded row) each slice's B rows into its own output
    rows of y, one expand_ per slice (the shares of different slices are not adjacent in y)."""
    if not (shard.layer == "row" and shard.fully_sharded):
        expand_(y, h, shard.expand_weights[0], batch)
        return
    full = shard.weights
    for s, w in enumerate(shard.expand_weights):
        n = w.slice_outs[0]
        c0 = full.slice_cols[s] + shard.tp_rank * n
        expand_(y[:, c0 : c0 + n], h[s : s + 1], w, batch)


def _backend_devices(group) -> Optional[set]:
    """Device types the group's backend communicates on (None: unknown backend, not checked)."""
    name = str(dist.get_backend(group)).lower()
    if ":" in name:  # "cpu:gloo,cuda:nccl"
        return {part.split(":")[0] for part in name.split(",")}
    return {"nccl": {"cuda"}, "gloo": {"cpu", "cuda"}}.get(name)


# ---- refusals on every rank -----------------------------------------------------------------------------------
# The header of the ops with a collective: [status, T, shard signature] (int64), all_gathered. status 0 = this
# rank's inputs passed; else 1 + 3 * (index of the argument its error names in _ARG_NAMES) + (index of the error's
# type in _ERRORS), so every rank raises the same type naming the same argument.
_ARG_NAMES = ("inputs", "x", "y", "shard", "batch", "weights", "merged", "group", "h")
_ERRORS = (ValueError, TypeError, RuntimeError)
_NAME = re.compile(r"([A-Za-z_]\w*)[\w.\[\]]*:")


def _agreed(local: Callable[[], torch.Tensor], group, shard: TPShard, op: str, check_peers: bool) -> torch.Tensor:
    """Run ``local`` (validation and shrink: no collective) and, with ``check_peers``, share its outcome:
    return its h when every rank's passed and agrees on T and the shard, else raise on every rank."""
    if not check_peers or _capturing_or_compiling():
        return local()
    try:
        h, err = local(), None
    except Exception as e:  # any refusal (and an OOM in shrink) must reach the peers
        h, err = None, e
    status = 0 if err is None else _status_code(err)
    sig = zlib.crc32(f"{op}:{shard.signature}".encode()) & 0x7FFFFFFF
    dev = torch.device("cpu") if "cpu" in (_backend_devices(group) or {"cpu"}) else torch.device(
        "cuda", torch.cuda.current_device())
    header = torch.tensor([status, -1 if h is None else h.shape[1], sig], dtype=torch.int64, device=dev)
    headers = [torch.empty_like(header) for _ in range(dist.get_world_size(group))]
    dist.all_gather(headers, header, group=group)
    rows: List[List[int]] = torch.stack(headers).cpu().tolist()
    me = dist.get_rank(group)
    bad = [r for r, row in enumerate(rows) if row[0]]
    if err is not None:
        _reraise(err, f"rank {me} of the group; refused on every rank, nothing was written")
    if bad:
        name, exc = _decode_status(rows[bad[0]][0])
        raise exc(f"{name}: expected valid inputs on every rank of the group, got a refusal on rank(s) {bad} "
                  f"({exc.__name__} there, naming {name}); nothing was written")
    tokens = [row[1] for row in rows]
    check(len(set(tokens)) == 1, "x", "the same number of tokens on every rank of the group", f"{tokens} per rank")
    check(len({row[2] for row in rows}) == 1, "shard", "shards of one layer, of the same kind, and the same op on "
          "every rank of the group", "shards or ops that differ between ranks")
    return h


def _status_code(err: Exception) -> int:
    m = _NAME.match(str(err))
    arg = _ARG_NAMES.index(m.group(1)) if m and m.group(1) in _ARG_NAMES else 0
    kind = next((j for j, e in enumerate(_ERRORS) if isinstance(err, e)), 0)
    return 1 + 3 * arg + kind


def _decode_status(code: int) -> Tuple[str, type]:
    arg, kind = divmod(code - 1, 3)
    return _ARG_NAMES[arg], _ERRORS[kind]


def _reraise(err: Exception, where: str) -> None:
    try:
        amended = type(err)(f"{err} ({where})")
    except Exception:  # an exception type that takes other arguments: raise it as it is
        raise err from None
    raise amended from err


def _capturing_or_compiling() -> bool:
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
