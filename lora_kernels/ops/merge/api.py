"""The public API: merge_, unmerge_, merge_many_, unmerge_many_ (semantics: the package docstring), and the
transaction around them.

Each call checks every argument before the first write (:mod:`.checks`: the arguments, and on a cold plan the
validation and the host plan; the overlap with live records always), takes its plan from the cache
(:mod:`.tables`), makes the records (:mod:`.checks`), and runs the custom op (:mod:`.dispatch`); a failure after
the first write is rolled back (the op's partial pass in :mod:`.dispatch`; the records, the live-record group,
the plan cache and W's version counter here).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, List, Mapping, Optional, Sequence

import torch

from ..._validation import check
from ...weights import LoRAWeights
from . import checks, dispatch, tables  # (dispatch registers the torch.ops.lora_kernels.* ops called here)
from .checks import AdapterArg, LambdaArg, MergeRecord

__all__ = ["merge_", "unmerge_", "merge_many_", "unmerge_many_"]


def merge_(
    W: torch.Tensor, weights: LoRAWeights, adapters: AdapterArg, lambdas: LambdaArg = None, *, exact: bool = True,
) -> MergeRecord:
    """``W += sum_j lambda_j * scale_{s,j} * B_{s,j} @ A_{s,j}`` in place (every slice s); returns the record
    :func:`unmerge_` needs.

    Semantics: see the package docstring. The delta is formed in fp32 and rounded once into W (one read and one
    write of each weight). With ``exact`` the record keeps 2 bits per weight (``ceil(numel / 4)`` bytes) plus
    the escape list, and :func:`unmerge_` restores W bit for bit; without, it keeps nothing and the unmerge is
    approximate.

    Args:
        W: [weights.out_features, weights.in_features] fp16/bf16/fp32, contiguous, on the weights' device (a
            fused q/k/v weight gets slice s's delta in rows ``[col_s, col_s + out_s)``). Parameters are fine
            (the write happens under no_grad). Its memory must be disjoint from every tensor of ``weights``
            and from what a live record's unmerge reads or writes.
        weights: the layer's :class:`~lora_kernels.LoRAWeights`.
        adapters: one loaded adapter id, or a sequence / 1-D integer tensor of ids (mixed ranks allowed; an id
            listed twice contributes twice); ids of any integer type, never bool or float (``1.0`` is refused).
        lambdas: one real number per adapter (default 1): any finite value (not bool, str or complex) whose
            coefficient ``fl32(fl32(lambda) * scale)`` is finite in fp32 for every slice.
        exact: a bool: keep the side data for a bit-exact unmerge.

    Returns:
        :class:`MergeRecord` (``escapes``: how many weights needed the escape list).

    Raises:
        TypeError / ValueError naming the argument (W's shape/dtype/device/layout or overlapping memory, ids out
        of range, free or not integers, lambdas of the wrong type, length or value, ``exact`` not a
        bool). W is bit-identical (and its version counter unchanged) when it raises, whatever the step
        (see the package docstring: checks first, rollback after the first write).
        Syncs with the host once (escape count; scales).
    """
    return merge_many_([W], [weights], adapters, lambdas, exact=exact, _single=True)[0]


def _as_seq(name: str, x: Any, item: str) -> list:
    """A list argument of many layers; a lone tensor / LoRAWeights / record is refused (it would iterate rows)."""
    if isinstance(x, (torch.Tensor, LoRAWeights, MergeRecord, str, bytes, Mapping)) or not isinstance(x, Iterable):
        raise TypeError(f"{name}: expected a sequence of {item} (one per layer), got {type(x).__name__}")
    return list(x)


def merge_many_(
    Ws: Sequence[torch.Tensor], weights: Sequence[LoRAWeights], adapters: AdapterArg, lambdas: LambdaArg = None,
    *, exact: bool = True, _single: bool = False,
) -> List[MergeRecord]:
    """:func:`merge_` for many layers (e.g. every projection of a model) in one grouped launch.

    Args:
        Ws: the layers' weights; ``weights``: their LoRAWeights (same length); ``adapters`` / ``lambdas``: as in
            :func:`merge_`, applied to every layer (each must hold the adapters). All on one device; the Ws'
            memory pairwise disjoint and disjoint from every LoRAWeights' tensors.

    Returns: one :class:`MergeRecord` per layer, in order. Raises as :func:`merge_` (``Ws[i]`` named), before
    any layer is written; an exception after the first write (a launch, the escape pass, the records, a warning
    turned into an error) restores every layer bit for bit before it propagates.
    """
    if _single:
        Ws, ws = list(Ws), list(weights)
    else:
        Ws, ws = _as_seq("Ws", Ws, "weight tensors"), _as_seq("weights", weights, "LoRAWeights")
    check(len(Ws) == len(ws), "weights", f"{len(Ws)} LoRAWeights (one per W)", len(ws))
    for i, w in enumerate(ws):
        check(isinstance(w, LoRAWeights), "weights" if _single else f"weights[{i}]", "a LoRAWeights",
              type(w).__name__, TypeError)
    check(isinstance(exact, bool), "exact", "a bool", type(exact).__name__, TypeError)
    ids = checks._canon_ids(adapters)
    lams = checks._canon_lams(lambdas, len(ids))
    if not Ws:
        return []
    # The host plan (validation, scales, terms, device tables) is cached per (layers, adapters, lambdas):
    # see .tables (the plan cache) for the key and what invalidates it. A hit implies every check of the
    # cold plan (the key holds the pointers, shapes and strides the overlap checks looked at).
    entry, key, backend = None, None, None
    if all(isinstance(W, torch.Tensor) for W in Ws):
        backend = dispatch._select(Ws[0].device)
        lam_key = (None,) if lams is None else tuple((v, math.copysign(1.0, v)) for v in lams)
        key = tables.plan_key(Ws, ws, ids, lam_key, exact, backend)
        entry = tables.lookup(key, ws)
    cold = entry is None
    if cold:
        entry, backend = checks._plan_many(Ws, ws, ids, lams, exact, _single, key)
    checks._check_live(entry, _single)
    recs = checks._new_records(entry, Ws, ws, exact, backend)
    # Bookkeeping first (undone on failure), so that nothing that can fail is left after the write of an
    # approximate merge, which has no side data to roll back from.
    versions = [checks._version(W) for W in Ws]
    group = None
    try:
        if cold and key is not None and key[0] == backend:
            tables.store(entry)
        group = checks._register_live(entry, recs)
        with torch.no_grad(), tables.activate(entry):
            terms, coefs = entry.terms_t, entry.coefs_t
            if _single:
                outs = torch.ops.lora_kernels.merge_(Ws[0], ws[0].a, ws[0].b, terms, coefs, exact, backend)
            else:
                outs = torch.ops.lora_kernels.merge_many_(Ws, [w.a for w in ws], [w.b for w in ws], terms, coefs,
                                                          exact, backend)
    except BaseException:
        if group is not None:
            checks._LIVE.discard(group)
        if cold:
            tables.discard(entry)  # (only if it is the entry cached under its key)
        _restore_versions(Ws, versions)
        raise
    for r, W in zip(recs, Ws):
        r.__dict__["version"] = checks._version(W)
    if not exact:
        return recs
    group.bufs = tuple(zip(("code", "escape_idx", "escape_val", "counts"), outs))
    try:
        codes, idxs, vals = dispatch._split_outs(outs, Ws, entry, _single)
        for r, code, idx, v in zip(recs, codes, idxs, vals):
            r.__dict__.update(code=code, escape_idx=idx, escape_val=v, escapes=idx.numel())
        bad = dispatch._merged_nonfinite(recs, Ws)
        if bad:
            warnings.warn(f"merge_: {bad} finite weights became NaN/Inf (non-finite adapter weights or overflow); "
                          "unmerge_ restores them exactly from the escape list", RuntimeWarning, stacklevel=2)
    except BaseException as err:  # (a warnings filter may turn the warning into an error)
        def undo():
            c, i, v = dispatch._split_outs(outs, Ws, entry, _single)
            with torch.no_grad(), tables.activate(entry):
                dispatch._unmerge_impl(Ws, [w.a for w in ws], [w.b for w in ws], entry.terms_t, entry.coefs_t, c, i, v,
                                       backend)

        e2 = dispatch._rolled_back("merge", err, undo)
        checks._LIVE.discard(group)
        if cold:
            tables.discard(entry)
        _restore_versions(Ws, versions)
        raise e2  # noqa: B904 (the original error, rolled back)
    return recs


def unmerge_(W: torch.Tensor, record: MergeRecord) -> torch.Tensor:
    """Undo the :func:`merge_` that returned ``record``: W bit-exactly as before it (``exact``), or
    ``rnd(W - delta)`` (approximate record). Returns W.

    Raises:
        TypeError / ValueError naming ``record`` when it does not belong to W (shape, dtype, device, data
        pointer, or W modified since: version), was already used, or its adapter slot was removed/reloaded
        since the merge; naming ``W`` when W is not the contiguous tensor the merge wrote (a transposed view of a
        square W). W is unchanged when it raises, and when any later step fails (rolled back: the layers
        already restored are merged again, bit for bit). No host sync.

    W cannot overlap the record's side data or adapter storage: W is the memory the merge checked (same
    pointer, shape, dtype and layout), and the side data was allocated while W was alive.
    """
    unmerge_many_([W], [record], _single=True)
    return W


def unmerge_many_(Ws: Sequence[torch.Tensor], records: Sequence[MergeRecord], *, _single: bool = False) -> None:
    """:func:`unmerge_` for many layers in one grouped launch (records from :func:`merge_many_` or
    :func:`merge_`; all of one backend and device). Every record is checked before any layer is written; a
    failure after the first write restores every layer to its merged state bit for bit (exact records) before
    it propagates, and the records stay usable."""
    if _single:
        Ws, recs = list(Ws), list(records)
    else:
        Ws, recs = _as_seq("Ws", Ws, "weight tensors"), _as_seq("records", records, "MergeRecords")
    check(len(Ws) == len(recs), "records", f"{len(Ws)} records (one per W)", len(recs))
    for i, (W, r) in enumerate(zip(Ws, recs)):
        if not checks._record_ok(W, r):  # the detailed checks (and messages) only when a cheap one fails
            checks._check_record(W, r, "W" if _single else f"Ws[{i}]",
                                 "record" if _single else f"records[{i}]")
    if not Ws:
        return
    check(len({id(r) for r in recs}) == len(recs), "records", "distinct records", "the same record twice")
    backend = recs[0].backend
    check(all(r.backend == backend and r.device == recs[0].device for r in recs), "records",
          "records of one backend and device", sorted({(r.backend, str(r.device)) for r in recs}))
    check(len({r.exact for r in recs}) == 1, "records", "all exact or all approximate", "a mix")
    # Records of one merge_many_ call, all of them in order: reuse its plan (terms and the device tables built
    # at merge time). Otherwise plan from the records.
    entry = recs[0]._plan
    if not (entry is not None and len(recs) == len(entry.plans)
            and all(r._plan is entry and r._gidx == i for i, r in enumerate(recs))):
        entry = None
    if entry is not None:
        terms, coefs = entry.terms_t, entry.coefs_t
    else:
        terms, coefs = dispatch._terms_tensors([r._terms for r in recs], [r._coefs for r in recs])
    versions = [checks._version(W) for W in Ws]
    try:
        with torch.no_grad(), tables.activate(entry):
            if _single:
                r = recs[0]
                torch.ops.lora_kernels.unmerge_(Ws[0], r._a, r._b, terms, coefs, r.code, r.escape_idx,
                                                r.escape_val, backend)
            else:
                torch.ops.lora_kernels.unmerge_many_(Ws, [r._a for r in recs], [r._b for r in recs], terms, coefs,
                                                     [r.code for r in recs], [r.escape_idx for r in recs],
                                                     [r.escape_val for r in recs], backend)
    except BaseException:
        _restore_versions(Ws, versions)
        raise
    for r in recs:
        r.used = True
        g = r.__dict__.get("_live")
        if g is not None:
            g.pending -= 1


# ---- the transaction's tools (the ops' bodies roll back partial passes: dispatch) ------------------------------------
def _restore_versions(Ws: Sequence[torch.Tensor], versions: Sequence[Optional[int]]) -> None:
    """Put W's version counter back after a rollback restored its bits, so that records that check it (and
    autograd) see the W they knew. No-op where torch lacks the (unsafe, internal) setter."""
    fix = [(W, v) for W, v in zip(Ws, versions) if v is not None and W._version != v]
    setter = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)
    if not fix or setter is None:
        return
    try:
        setter(tuple(W for W, _ in fix), tuple(v for _, v in fix))
    except TypeError:  # older torch: one tensor at a time
        for W, v in fix:
            setter(W, v)
