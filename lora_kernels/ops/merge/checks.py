"""What a merge decides before its first write: its arguments, their validation, the host plan, the records and
the memory-overlap rules (every check of the package docstring's "Input contract" runs here).

In the order a call meets them:

Arguments (:func:`_canon_ids`, :func:`_canon_lams`), canonicalised once, before anything is written. Adapter ids:
integers of any integer type (Python, numpy, 0-dim or 1-D integer tensors; never bool, never a float such as
``1.0``), at least one, an id listed twice being two terms of the sum. Lambdas: finite real numbers (never bool,
str or complex), one per id (None: every lambda 1). Errors name ``adapters`` / ``lambdas`` (and the item's
index). The per-layer checks (range, loaded slots, fp32 coefficients) are the planning's.

Validation and the host plan. A plan per layer (:func:`_plan`; all layers at once: :func:`_plan_fast`) holds the
adapter ids and lambdas, the terms ``[s, row0, rows, off, r]`` (one per slice and adapter) with their fp32
coefficients ``fl32(fl32(lambda) * scale)``, and what the records keep (ranks, offsets, scales, the slots'
allocation tokens). :func:`_plan_many` validates a whole call (shapes, dtypes, devices, layouts, the Ws' memory
disjoint from each other and from the adapter storage) and returns its :class:`.tables.PlanEntry` (cached
there); the checks against live records (:func:`_check_live`) run on every call, also on a cached plan.

Records. A :class:`MergeRecord` holds W's identity after the merge (shape, dtype, device, data pointer, version
counter), what was merged (adapters, lambdas, per-slice ranks, offsets and scales), its backend (unmerge always
uses the merge's) and the side data (codes and escapes: :mod:`.dispatch`). Privately it holds the inputs the
unmerge recomputes the delta from, the adapter slots' allocation tokens (changed when a slot is reloaded), the
plan of the merge_many_ call that made it (its unmerge reuses the tables) and its live-record group.
:func:`_check_record` refuses a record that does not belong to the W it is given.

Memory overlap: what a merge's output may not overlap, its own inputs and what live records will read or
write. A W may not share memory with another W of the call, with any tensor its LoRAWeights own (``a``, ``b``,
``offsets``, ``ranks``, ``scales``, ``slice_info``), or with what a live (not yet unmerged) MergeRecord will read
or write at its unmerge (its weights' storage, its side data); the adapter storage of a call may not overlap the W
of a live record either. The spans of a call's tensors are taken once per plan (:func:`_storage_spans`, checked by
:func:`_plan_many`); the live records of each merge call form one :class:`_LiveMerge`, checked by
:func:`_check_live` on every merge. Errors are ValueErrors naming ``W`` / ``Ws[i]`` (or ``weights[i].a`` ...).
"""

from __future__ import annotations

import math
import numbers
import struct
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..._validation import (FLOAT_DTYPES, check, check_each, check_int, check_real, check_tensor, first_overlap,
                            tensor_span)
from ...weights import LoRAWeights
from . import dispatch, tables


# ---- arguments: adapter ids and lambdas, canonicalised (the input contract's first rules) ----------------------------
AdapterArg = Union[int, Sequence[int]]
LambdaArg = Union[None, float, Sequence[float]]


def _is_array(x: Any) -> bool:
    """A torch tensor or a numpy array (read with ``tolist``; a CUDA tensor costs one sync)."""
    return isinstance(x, torch.Tensor) or (type(x).__module__ == "numpy" and hasattr(x, "ndim"))


def _integer_dtype(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)
    return x.dtype.kind in "iu"  # numpy: signed / unsigned integers


def _elements(name: str, x: Any) -> list:
    """The elements of an argument that takes one value or many: a tensor / numpy array of 0 or 1 dims, or any
    iterable that is not a string, bytes or a mapping. TypeError / ValueError name ``name``."""
    if _is_array(x):
        if x.ndim > 1:
            raise ValueError(f"{name}: expected a scalar or one dimension, got shape {tuple(x.shape)}")
        if isinstance(x, torch.Tensor) and x.device.type == "meta":
            raise TypeError(f"{name}: expected values, got a meta tensor (no data)")
        return [x.tolist()] if x.ndim == 0 else x.tolist()
    if isinstance(x, (str, bytes, bytearray, Mapping)) or not isinstance(x, Iterable):
        raise TypeError(f"{name}: expected a number or a sequence of numbers, got {type(x).__name__} {x!r:.60}")
    return list(x)


def _each(name: str, items: list, conv) -> tuple:
    """``conv(name, v)`` of every item; the error names the argument and the item's index."""
    return tuple(check_each(name, items, conv))


def _canon_ids(adapters: Any) -> Tuple[int, ...]:
    """Adapter ids as a tuple of Python ints, before any narrowing: an int of any integer type (Python, numpy,
    a 0-dim integer tensor) or a sequence / 1-D integer tensor or array of them. Refused (TypeError naming
    ``adapters``): bool, floats (even integral ones such as ``1.0``: a float id is usually a lambda in the
    wrong place), str. Refused (ValueError): no id. An id may appear more than once: each occurrence is its own
    term of the sum, with its own lambda (``[1, 1]`` with ``[a, b]`` merges adapter 1 twice; the record restores
    W exactly all the same). The range is checked per layer (:func:`_norm_adapters`)."""
    if type(adapters) is int:
        return (adapters,)
    if type(adapters) in (list, tuple) and adapters and all(type(j) is int for j in adapters):
        ids = tuple(adapters)
    else:
        if isinstance(adapters, numbers.Integral) and not isinstance(adapters, bool):
            return (int(adapters),)
        if isinstance(adapters, (bool, float, complex, str, bytes)) or (
                not _is_array(adapters) and not isinstance(adapters, Iterable)):
            raise TypeError(f"adapters: expected an int or a sequence of ints, got {type(adapters).__name__} "
                            f"{adapters!r:.60}")
        if _is_array(adapters) and not _integer_dtype(adapters):
            raise TypeError(f"adapters: expected integer ids, got an array of dtype {adapters.dtype}")
        ids = _each("adapters", _elements("adapters", adapters), check_int)
    check(len(ids) >= 1, "adapters", "at least one adapter id", "an empty sequence")
    return ids


def _canon_lams(lambdas: Any, n: int) -> Optional[Tuple[float, ...]]:
    """Lambdas as a tuple of n Python floats (None: every lambda 1). One real number (for one adapter) or a
    sequence / 1-D tensor / array of n of them; finite (NaN and +-inf refused); never bool, str or complex
    (TypeError). Any magnitude is accepted here; :func:`_plan` refuses a lambda whose fp32 coefficient
    ``fl32(fl32(lambda) * scale)`` overflows."""
    if lambdas is None:
        return None
    if isinstance(lambdas, (numbers.Number, bool)) or (_is_array(lambdas) and lambdas.ndim == 0):
        if not isinstance(lambdas, torch.Tensor) and _is_array(lambdas):
            lambdas = lambdas.item()  # a 0-dim numpy array
        lam = check_real("lambdas", lambdas)
        check(n == 1, "lambdas", f"a sequence of {n} floats (one per adapter)", lambdas)
        return (lam,)
    if isinstance(lambdas, (str, bytes)):
        raise TypeError(f"lambdas: expected None, a float or a sequence of floats, got {lambdas!r:.80}")
    try:
        items = _elements("lambdas", lambdas)
    except TypeError:
        raise TypeError(f"lambdas: expected None, a float or a sequence of floats, got {lambdas!r:.80}") from None
    lams = _each("lambdas", items, check_real)
    check(len(lams) == n, "lambdas", f"{n} floats (one per adapter)", f"{len(lams)} values")
    return lams


def _norm_adapters(weights: LoRAWeights, adapters: AdapterArg, lambdas: LambdaArg, name: str = "adapters"):
    """``(ids, lambdas)`` checked against one layer's weights: every id in ``[0, weights.max_adapters)`` and
    loaded; lambdas default to 1."""
    ids = _canon_ids(adapters)
    lams = _canon_lams(lambdas, len(ids))
    for j in ids:
        check(0 <= j < weights.max_adapters, name, f"ints in [0, {weights.max_adapters}) (weights.max_adapters)", j)
        check(j in weights._alloc, name, "ids of loaded adapters", f"{j} (a free slot)")
    return ids, (lams if lams is not None else (1.0,) * len(ids))


# ---- validation and the host plan of a call --------------------------------------------------------------------------
_F32 = struct.Struct("f")


def _plan(W: torch.Tensor, weights: LoRAWeights, adapters: AdapterArg, lambdas: LambdaArg, wname: str,
          host_scales: Optional[torch.Tensor] = None):
    """Validate one (W, weights, adapters, lambdas) and return its host plan. ``host_scales``: a host copy of
    ``weights.scales`` (read here otherwise)."""
    check(isinstance(weights, LoRAWeights), "weights", "a LoRAWeights", type(weights).__name__, TypeError)
    check_tensor(wname, W, ndim=2, dtypes=FLOAT_DTYPES, device=weights.device)
    check(tuple(W.shape) == (weights.out_features, weights.in_features), wname,
          f"shape ({weights.out_features}, {weights.in_features}) (weights.out_features, weights.in_features)",
          tuple(W.shape))
    check(W.is_contiguous(), wname, "a contiguous tensor", f"strides {W.stride()}")
    check(weights.a.stride(-1) == 1 and weights.b.stride(-1) == 1, "weights", "storage with unit inner stride",
          (weights.a.stride(), weights.b.stride()))
    ids, lams = _norm_adapters(weights, adapters, lambdas)
    S = weights.num_slices
    if host_scales is None:
        host_scales = weights.scales.reshape(-1).to("cpu", torch.float32)
    hs = host_scales.tolist()
    N = weights.max_adapters
    sc = [[hs[s * N + j] for j in ids] for s in range(S)]  # [S][J], fp32 values
    terms, coefs = [], []
    for s in range(S):
        for jj, j in enumerate(ids):
            terms.append([s, weights.slice_cols[s], weights.slice_outs[s], weights._alloc[j][0],
                          weights._host_ranks[j][s]])
            coefs.append(_f32(_f32(lams[jj]) * sc[s][jj]))  # exact product of two fp32 values, rounded once
    check(all(math.isfinite(c) for c in coefs), "lambdas", "lambda * scale finite in fp32", coefs)
    tokens = tuple((weights._alloc[j], weights._host_ranks[j]) for j in ids)
    return dict(
        ids=ids, lams=lams, terms=terms, coefs=coefs,
        ranks=tuple(weights._host_ranks[j] for j in ids), offsets=tuple(weights._alloc[j][0] for j in ids),
        scales=tuple(tuple(sc[s][jj] for s in range(S)) for jj in range(len(ids))), tokens=tokens,
    )


def _plan_fast(Ws, ws, adapters, lambdas, flat, off):
    """:func:`_plan` for every layer at once: ``(plans, terms int64 [n, 6], coefs fp32 [n])``, identical to
    the per-layer path (coefs: one fp32 multiply of the fp32 lambda and scale, the same single rounding as
    ``_f32(_f32(lambda) * scale)``), or None when a cheap check fails for some layer (the caller then runs
    :func:`_plan` per layer, which raises naming the argument). ``flat``: every layer's scales (host fp32),
    ``off[id(LoRAWeights)]``: where that layer's start in it."""
    ids, lams = _norm_adapters(ws[0], adapters, lambdas)
    rows: List[Tuple[int, ...]] = []
    sidx: List[int] = []
    lidx: List[int] = []
    spans = []
    for li, (W, w) in enumerate(zip(Ws, ws)):
        a, b, alloc, hr = w.a, w.b, w._alloc, w._host_ranks
        if not (isinstance(W, torch.Tensor) and W.dtype in FLOAT_DTYPES and W.dim() == 2 and W.device == a.device
                and W.shape[0] == w.out_features and W.shape[1] == w.in_features and W.is_contiguous()
                and a.stride(-1) == 1 and b.stride(-1) == 1 and all(j in alloc for j in ids)):
            return None
        N = w.max_adapters
        base = off[id(w)]
        start = len(rows)
        for s, (col, outw) in enumerate(zip(w.slice_cols, w.slice_outs)):
            for jj, j in enumerate(ids):
                rows.append((li, s, col, outw, alloc[j][0], hr[j][s]))
                sidx.append(base + s * N + j)
                lidx.append(jj)
        spans.append((start, len(rows)))
    sc = flat[torch.tensor(sidx, dtype=torch.int64)]
    coefs = torch.tensor(lams, dtype=torch.float32)[torch.tensor(lidx, dtype=torch.int64)] * sc
    if not bool(torch.isfinite(coefs).all()):
        return None
    terms = torch.tensor(rows, dtype=torch.int64).view(-1, 6)
    sc_l, cf_l = sc.tolist(), coefs.tolist()
    J = len(ids)
    plans = []
    for (start, end), w in zip(spans, ws):
        alloc, hr = w._alloc, w._host_ranks
        S = (end - start) // J
        scl = sc_l[start:end]  # [S][J] row-major
        plans.append(dict(
            ids=ids, lams=lams, terms=[list(r[1:]) for r in rows[start:end]], coefs=cf_l[start:end],
            ranks=tuple(hr[j] for j in ids), offsets=tuple(alloc[j][0] for j in ids),
            scales=tuple(tuple(scl[s * J + jj] for s in range(S)) for jj in range(J)),
            tokens=tuple((alloc[j], hr[j]) for j in ids),
        ))
    return plans, terms, coefs


def _f32(x: float) -> float:
    """Round a Python float to the nearest fp32 value (inf when it overflows)."""
    try:
        return _F32.unpack(_F32.pack(x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _plan_many(Ws, ws, ids, lams, exact, _single, key):
    """Validate every layer and plan the call from scratch (the uncached path). Returns ``(entry, backend)``;
    the caller stores the entry in the plan cache once the call succeeded."""
    # Every layer's scales in one device->host copy per device (one sync for the whole model, not one per
    # layer); off[id(w)]: where w's scales start in the host vector.
    parts, off, pos = [], {}, 0
    for dev_ in {w.scales.device for w in ws}:
        group = [w for w in ws if w.scales.device == dev_]
        parts.append(torch.cat([w.scales.reshape(-1) for w in group]).to("cpu", torch.float32))
        for w in group:
            off[id(w)] = pos
            pos += w.scales.numel()
    flat = parts[0] if len(parts) == 1 else torch.cat(parts)
    fast = _plan_fast(Ws, ws, ids, lams, flat, off)
    if fast is not None:
        plans, terms, coefs = fast
    else:  # a cheap check failed somewhere: the per-layer path names the argument (and raises), or plans it
        host = {id(w): flat[off[id(w)] : off[id(w)] + w.scales.numel()] for w in ws}
        plans = []
        for i, (W, w) in enumerate(zip(Ws, ws)):
            plans.append(_plan(W, w, ids, lams, "W" if _single else f"Ws[{i}]", host[id(w)]))
        terms, coefs = dispatch._terms_tensors([p["terms"] for p in plans], [p["coefs"] for p in plans])
    dev = Ws[0].device
    for i, W in enumerate(Ws):
        check(W.device == dev, f"Ws[{i}]", f"device {dev} (as Ws[0])", W.device)
    # Distinct tensors may still share memory (views of one buffer): each layer's merge reads and rewrites its
    # W, so overlapping layers would corrupt each other and the bit-exact unmerge. Ws are contiguous here.
    spans = sorted((W.data_ptr(), W.data_ptr() + W.numel() * W.element_size(), i) for i, W in enumerate(Ws))
    for (_, e0, i0), (s1, _, i1) in zip(spans, spans[1:]):
        check(s1 >= e0, "Ws", "distinct weight tensors with disjoint memory",
              f"Ws[{min(i0, i1)}] and Ws[{max(i0, i1)}] overlapping (the same tensor twice, or views of one buffer)")
    # W inside adapter storage (a view of weights.a, or of its offsets/ranks/scales read as floats): the merge
    # would rewrite the rows it reads, and the unmerge would recompute another delta (no longer bit-exact).
    w_spans, in_spans = _storage_spans(Ws, ws)
    hit = first_overlap(w_spans, in_spans)
    if hit:
        raise _disjoint_error(_name(hit[0], _single), _name(hit[1], _single),
                              "the merge writes W; the LoRAWeights' tensors are storage the library owns")
    backend = dispatch._select(dev)
    entry = tables.PlanEntry(key, ws, plans, terms, coefs, dispatch.layer_sizes(Ws, exact))
    entry.w_spans, entry.in_spans, entry.device = w_spans, in_spans, dev
    return entry, backend


# ---- records, and the checks that a record belongs to the W it is given ----------------------------------------------
@dataclass(eq=False)
class MergeRecord:
    """What :func:`unmerge_` needs to undo one :func:`merge_` (and to refuse a W it does not belong to).

    Attributes:
        shape, dtype, device, data_ptr, version: W's identity after the merge (``version`` is ``W._version``;
            None for inference tensors, which have no version counter).
        adapters, lambdas: what was merged. ranks: per adapter, the per-slice ranks; offsets: first storage row
            per adapter; scales: per adapter, the per-slice scales (host copies taken at merge time).
        exact: whether side data was kept. backend: ``"reference"`` | ``"triton"`` | ``"cuda"``.
        code: uint8 [ceil(numel / 4)] packed 2-bit codes (empty when not exact).
        escape_idx: int64 [E] flat indices (ascending) of the escaped weights; escape_val: their original values.
        escapes: E. used: set once unmerged (a record restores W once).
    """

    shape: Tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    data_ptr: int
    version: Optional[int]
    adapters: Tuple[int, ...]
    lambdas: Tuple[float, ...]
    ranks: Tuple[Tuple[int, ...], ...]
    offsets: Tuple[int, ...]
    scales: Tuple[Tuple[float, ...], ...]
    exact: bool
    backend: str
    code: torch.Tensor
    escape_idx: torch.Tensor
    escape_val: torch.Tensor
    escapes: int
    used: bool = False
    # Private: the inputs unmerge recomputes the delta from, and slot tokens that change when a slot is reloaded.
    _weights: Any = field(default=None, repr=False)
    _a: Any = field(default=None, repr=False)
    _b: Any = field(default=None, repr=False)
    _terms: Any = field(default=None, repr=False)
    _coefs: Any = field(default=None, repr=False)
    _tokens: Any = field(default=None, repr=False)
    # The cached plan of the merge_many_ call that made it, and this record's layer index in that call.
    _plan: Any = field(default=None, repr=False)
    _gidx: int = field(default=-1, repr=False)
    # The storage this record's unmerge will read and write, checked by later merges (see _LiveMerge).
    _live: Any = field(default=None, repr=False)

    @property
    def side_bytes(self) -> int:
        """Bytes of side data: the packed codes plus the escape list (index + value)."""
        return (self.code.numel() + self.escape_idx.numel() * 8
                + self.escape_val.numel() * self.escape_val.element_size())

    @property
    def escape_rate(self) -> float:
        n = self.shape[0] * self.shape[1]
        return self.escapes / n if n else 0.0


def _version(W: torch.Tensor) -> Optional[int]:
    """W's version counter (None for inference tensors, which have none)."""
    return None if W.is_inference() else W._version


def _check_record(W: torch.Tensor, rec: Any, wname: str = "W", rname: str = "record") -> None:
    """Refuse a record that does not belong to W, or cannot undo its merge any more (TypeError / ValueError
    naming ``rname``, or ``wname`` for a non-contiguous W)."""
    check(isinstance(rec, MergeRecord), rname, "a MergeRecord (from merge_)", type(rec).__name__, TypeError)
    check(isinstance(W, torch.Tensor), wname, "a torch.Tensor", type(W).__name__, TypeError)
    check(not rec.used, rname, "a record not used yet", "a record already unmerged (unmerge twice)")
    check(tuple(W.shape) == rec.shape, rname, f"a record of W's shape {tuple(W.shape)}", f"shape {rec.shape}")
    check(W.dtype == rec.dtype, rname, f"a record of W's dtype {W.dtype}", rec.dtype)
    check(W.device == rec.device, rname, f"a record of W's device {W.device}", rec.device)
    check(W.data_ptr() == rec.data_ptr, rname, "a record of this W (same data pointer)",
          f"a record of another tensor (data_ptr {rec.data_ptr:#x}, W's {W.data_ptr():#x})")
    # (a transposed view of a square W has its pointer, shape and version: the merge wrote a contiguous W)
    check(W.is_contiguous(), wname, "the contiguous tensor the merge wrote", f"strides {W.stride()}")
    v = _version(W)
    check(rec.version is None or v == rec.version, rname,
          f"W unchanged since the merge (version {rec.version})", f"W modified since (version {v})")
    w = rec._weights
    for j, tok in zip(rec.adapters, rec._tokens):
        ok = w._alloc.get(j) is tok[0] and w._host_ranks.get(j) is tok[1]
        check(ok, rname, f"adapter {j} still loaded as at the merge",
              f"adapter slot {j} removed or reloaded since (the merged delta can no longer be recomputed)")


def _record_ok(W: Any, rec: Any) -> bool:
    """True when :func:`_check_record` would pass (no message formatting: the fast path of a 224-layer unmerge)."""
    if type(rec) is not MergeRecord or not isinstance(W, torch.Tensor) or rec.used:
        return False
    if W.data_ptr() != rec.data_ptr or W.dtype != rec.dtype or W.shape != rec.shape or W.device != rec.device \
            or not W.is_contiguous():
        return False
    if rec.version is not None and _version(W) != rec.version:
        return False
    w = rec._weights
    for j, tok in zip(rec.adapters, rec._tokens):
        if w._alloc.get(j) is not tok[0] or w._host_ranks.get(j) is not tok[1]:
            return False
    return True


def _new_records(entry, Ws, ws, exact: bool, backend: str) -> List[MergeRecord]:
    """The records of this call, before it writes anything (their outputs and W's version filled after)."""
    tmpl = entry.records
    if tmpl is None:  # the fields every record of this plan shares with the next one (the key fixes them)
        tmpl = entry.records = [dict(vars(MergeRecord(
            shape=tuple(W.shape), dtype=W.dtype, device=W.device, data_ptr=W.data_ptr(), version=None,
            adapters=p["ids"], lambdas=p["lams"], ranks=p["ranks"], offsets=p["offsets"], scales=p["scales"],
            exact=bool(exact), backend=backend, code=None, escape_idx=None, escape_val=None, escapes=0,
            _terms=p["terms"], _coefs=p["coefs"], _tokens=p["tokens"], _plan=entry, _gidx=i,
        ))) for i, (W, p) in enumerate(zip(Ws, entry.plans))]  # (no LoRAWeights here: the cache holds them weakly)
    dev = Ws[0].device
    e_code = torch.empty(0, dtype=torch.uint8, device=dev)
    e_idx = torch.empty(0, dtype=torch.int64, device=dev)
    e_val: dict = {}
    recs = []
    for i, (W, w) in enumerate(zip(Ws, ws)):
        r = MergeRecord.__new__(MergeRecord)  # (the dataclass __init__ of 25 fields costs ~2 us a layer)
        d = r.__dict__
        d.update(tmpl[i])
        d.update(_weights=w, _a=w.a, _b=w.b)
        if not exact:  # an approximate merge has no side data: its (empty) fields are set here, before the write
            v = e_val.get(W.dtype)
            if v is None:
                v = e_val[W.dtype] = torch.empty(0, dtype=W.dtype, device=dev)
            d.update(code=e_code, escape_idx=e_idx, escape_val=v)
        recs.append(r)
    return recs


# ---- memory overlap: the call's own tensors, and what live records will read or write --------------------------------
_STORAGE = ("a", "b", "offsets", "ranks", "scales", "slice_info")  # the tensors a LoRAWeights owns


class _LiveMerge:
    """The records of one merge call: while one of them is not yet used, its unmerge will write its W and read
    its layers' adapter storage and its side data, so no later merge may write into any of those, nor read
    adapter storage that is such a W. ``entry`` holds the byte spans of the call's Ws and adapter storage
    (computed once per plan), ``bufs`` the call's side-data buffers (``(name, tensor)``), ``pending`` how many
    of its records are not used yet. The records hold the group (and nothing else does, but a weak set): it
    disappears with them. Conservative: a group with one record pending still guards every layer of its call."""

    __slots__ = ("entry", "bufs", "pending", "__weakref__")

    def __init__(self, entry, pending: int):
        self.entry = entry
        self.bufs: tuple = ()
        self.pending = pending


_LIVE: "weakref.WeakSet[_LiveMerge]" = weakref.WeakSet()


def _span(t: torch.Tensor, label: Any) -> tuple:
    if t.is_contiguous():
        p = t.data_ptr()
        return (p, p + t.numel() * t.element_size(), label)
    return tensor_span(t, label)


def _name(label: tuple, single: bool) -> str:
    """How an error names a span: ``("W", i, None)`` -> ``W`` / ``Ws[i]``; ``("weights", i, "a")`` ->
    ``weights.a`` / ``weights[i].a``; ``("rec", i, "code")`` -> ``records[i].code``."""
    kind, i, attr = label
    if kind == "W":
        return "W" if single else f"Ws[{i}]"
    if kind == "weights":
        return f"weights.{attr}" if single else f"weights[{i}].{attr}"
    return f"record {i}'s {attr}"


def _storage_spans(Ws: Sequence[torch.Tensor], ws: Sequence[LoRAWeights]) -> Tuple[list, list]:
    """Byte spans of the call's Ws (contiguous, checked) and of every tensor its LoRAWeights own."""
    w_spans = [_span(W, ("W", i, None)) for i, W in enumerate(Ws)]
    in_spans, seen = [], set()
    for i, w in enumerate(ws):
        if id(w) in seen:
            continue
        seen.add(id(w))
        for nm in _STORAGE:
            t = getattr(w, nm, None)
            if isinstance(t, torch.Tensor):
                in_spans.append(_span(t, ("weights", i, nm)))
    return w_spans, in_spans


def _disjoint_error(out: str, other: str, why: str) -> ValueError:
    return ValueError(f"{out}: expected memory disjoint from {other} ({why}), got overlapping storage")


def _check_live(entry, single: bool) -> None:
    """Refuse a merge that would write what a live record's unmerge reads or writes, or read adapter storage
    that a live record's unmerge will rewrite (ValueError naming the W / the weights' tensor). Free when no
    record is live (the common case: a mode switch unmerges before it merges)."""
    if not _LIVE:
        return
    dev = entry.device
    for g in list(_LIVE):
        if g.pending <= 0 or g.entry.device != dev:
            continue
        bufs = [_span(t, ("rec", 0, nm)) for nm, t in g.bufs if isinstance(t, torch.Tensor)]
        hit = first_overlap(entry.w_spans, list(g.entry.in_spans) + bufs)
        if hit:
            theirs = hit[1]
            other = (f"the adapter storage {_name(theirs, False)} of a live MergeRecord's merge" if theirs[0] != "rec"
                     else f"the side data ({theirs[2]}) of a live MergeRecord")
            raise _disjoint_error(_name(hit[0], single), other, "its unmerge reads it; unmerge or drop that record "
                                  "first")
        hit = first_overlap(entry.in_spans, g.entry.w_spans)
        if hit:
            raise _disjoint_error(_name(hit[0], single), f"the weight {_name(hit[1], False)} of a live MergeRecord's "
                                  "merge", "its unmerge will rewrite it, changing these adapter rows")


def _register_live(entry, recs: Sequence[MergeRecord]) -> _LiveMerge:
    g = _LiveMerge(entry, len(recs))
    for r in recs:
        r.__dict__["_live"] = g
    _LIVE.add(g)  # (last: nothing registered if anything above raised)
    return g
