"""The four custom ops and what they run: backend choice, the ops' bodies and launches, the reference backend,
the side data, the rollback of a partial pass.

In the order a call meets them:

The custom ops ``torch.ops.lora_kernels.merge_`` / ``unmerge_`` / ``merge_many_`` / ``unmerge_many_``: declared
mutating (``W`` / ``Ws``), with fake impls (an exact merge's escape count is a data-dependent size), so that
they pass ``torch.library.opcheck`` and trace under torch.compile. Their arguments are the planned terms (int64
[n, 6] = (layer, s, row0, rows, off, r)) and coefficients (fp32 [n]) (:func:`_terms_tensors`), checked before the
call (:mod:`.checks`).

Their bodies, :func:`_merge_impl` / :func:`_unmerge_impl`: every layer merged (unmerged), or, on any exception,
none. The reference backend runs layer by layer (:func:`_reference_merge` / :func:`_reference_unmerge`); on
Triton and CUDA they allocate the side data, take the job tables (:func:`_tables`: cached in the call's plan when
one is active, :func:`.tables.active`), launch (:func:`_run`), collect the escapes and, on a failure after the
first write, roll back (how: the package docstring, "Transactional").

Backend choice (:func:`_select`): the reference runs on CPU tensors; Triton on CUDA tensors, or the compiled CUDA
kernel where ``lora_kernels.tuning.verified_kernels(device)`` lists ``"merge_cuda"`` (or when forced with
``LORA_KERNELS_BACKEND=cuda``). The reference has no tables; the two kernels take the same tables
(:mod:`.tables`), built per (W dtype, adapter dtype) group of layers with the backend's tile shape, and cached in
the call's plan.

The reference backend's merge and unmerge of many layers (CPU tensors), transactional: layer by layer, with
:mod:`lora_kernels.reference`'s operations (the spec: fp32 elementwise ops in a fixed order). Each layer's undo
information is computed before the layer is written, so that a failure at layer k restores layers 0..k-1 bit
for bit, exact or approximate.

The side data of an exact merge: per layer, 2-bit codes (packed 4 per byte) and the escape list. Codes take
``ceil(numel / 4)`` bytes a layer, all layers of a call in one buffer (:func:`layer_sizes`, :func:`offsets`). An
*escape* is a weight the code cannot restore: the kernels leave it unwritten and count it; the wrapper then keeps
its flat index and original value, and writes its merged value with torch ops (:func:`_escape_merged_values`,
:func:`_scatter`). The ``merge_many_`` op returns the escape values of all layers as int32 bit patterns (one
dtype for every layer, lossless: :func:`_to_bits` / :func:`_from_bits`), split back per layer by
:func:`_split_outs`.

The rollback of a partial pass (what each path restores from: the package docstring): the copy
(:func:`_snapshot`), which layers a partial launch wrote (:func:`_layers_of`), running a rollback and reporting
its own failure (:func:`_rolled_back`).

The functions here call each other through this module's globals, and the other modules call them as
``dispatch.<name>``, so that a patch of ``lora_kernels.ops.merge.dispatch.<name>`` (``_run``, ``_select``,
``_cuda_ops``, ``_scatter``, ...) reaches every caller.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch

from ... import backends, reference
from ...profiling import nvtx_range
from . import tables
from .tables import J_CODE, J_PACKED


# ---- the custom ops and their fakes ----------------------------------------------------------------------------------
def _returns_nothing(op):
    """Register the fake of an op that only writes its arguments in place (it returns None)."""
    op.register_fake(lambda *args, **kwargs: None)
    return op


@torch.library.custom_op("lora_kernels::merge_many_", mutates_args=("Ws",))
def _merge_many_op(
    Ws: List[torch.Tensor], a: List[torch.Tensor], b: List[torch.Tensor],  # the layers: written, read, read
    terms: torch.Tensor, coefs: torch.Tensor,  # the plan
    exact: bool, backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns flat outputs (a list output of a mutating op cannot be functionalised): the codes of every layer
    concatenated (uint8 [sum ceil(numel_l / 4)]), the escapes' flat indices and original bit patterns (int64,
    int32: lossless for every dtype) concatenated, and the escape count per layer (int64 [L])."""
    with nvtx_range("lora_kernels.merge_many_"):
        outs = _merge_impl(Ws, a, b, terms, coefs, exact, backend)
        L = len(Ws)
        dev = Ws[0].device if L else torch.device("cpu")
        idx = torch.cat(outs[L : 2 * L]) if L else torch.empty(0, dtype=torch.int64, device=dev)
        if idx.numel():
            vb = torch.cat([_to_bits(v) for v in outs[2 * L : 3 * L]])
        else:  # no escapes: skip the per-layer views
            vb = torch.empty(0, dtype=torch.int32, device=dev)
        counts = torch.tensor([t.numel() for t in outs[L : 2 * L]], dtype=torch.int64, device=dev)
        return outs[3 * L], idx, vb, counts


@_merge_many_op.register_fake
def _(Ws, a, b, terms, coefs, exact, backend):
    ctx = torch.library.get_ctx()
    dev = Ws[0].device if Ws else torch.device("cpu")
    n = ctx.new_dynamic_size() if exact else 0
    code = torch.empty(sum((W.numel() + 3) // 4 for W in Ws) if exact else 0, dtype=torch.uint8, device=dev)
    return (code, torch.empty(n, dtype=torch.int64, device=dev), torch.empty(n, dtype=torch.int32, device=dev),
            torch.empty(len(Ws), dtype=torch.int64, device=dev))


@_returns_nothing
@torch.library.custom_op("lora_kernels::unmerge_many_", mutates_args=("Ws",))
def _unmerge_many_op(
    Ws: List[torch.Tensor], a: List[torch.Tensor], b: List[torch.Tensor],  # the layers: written, read, read
    terms: torch.Tensor, coefs: torch.Tensor,  # the plan
    code: List[torch.Tensor], escape_idx: List[torch.Tensor], escape_val: List[torch.Tensor],  # the side data
    backend: str,
) -> None:
    with nvtx_range("lora_kernels.unmerge_many_"):
        _unmerge_impl(Ws, a, b, terms, coefs, code, escape_idx, escape_val, backend)


@torch.library.custom_op("lora_kernels::merge_", mutates_args=("W",))
def _merge_op(
    W: torch.Tensor, a: torch.Tensor, b: torch.Tensor,  # the layer: written, read, read
    terms: torch.Tensor, coefs: torch.Tensor,  # the plan
    exact: bool, backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with nvtx_range("lora_kernels.merge_"):
        code, idx, val, _ = _merge_impl([W], [a], [b], terms, coefs, exact, backend)
        return code, idx, val


@_merge_op.register_fake
def _(W, a, b, terms, coefs, exact, backend):
    return _fake_one(W, exact)


def _fake_one(W, exact):
    ctx = torch.library.get_ctx()
    n = ctx.new_dynamic_size() if exact else 0
    return (W.new_empty(((W.numel() + 3) // 4) if exact else 0, dtype=torch.uint8),
            W.new_empty(n, dtype=torch.int64), W.new_empty(n))


@_returns_nothing
@torch.library.custom_op("lora_kernels::unmerge_", mutates_args=("W",))
def _unmerge_op(
    W: torch.Tensor, a: torch.Tensor, b: torch.Tensor,  # the layer: written, read, read
    terms: torch.Tensor, coefs: torch.Tensor,  # the plan
    code: torch.Tensor, escape_idx: torch.Tensor, escape_val: torch.Tensor,  # the side data
    backend: str,
) -> None:
    with nvtx_range("lora_kernels.unmerge_"):
        _unmerge_impl([W], [a], [b], terms, coefs, [code], [escape_idx], [escape_val], backend)


# ---- the ops' terms and coefficients: built from per-layer lists, split back -----------------------------------------
def _split_terms(terms: torch.Tensor, coefs: torch.Tensor, L: int):
    """Per-layer host lists from the concatenated op arguments (terms int64 [n, 6] = (layer, s, row0, rows, off,
    r), coefs fp32 [n])."""
    tl_: List[List[List[int]]] = [[] for _ in range(L)]
    cl_: List[List[float]] = [[] for _ in range(L)]
    for row, c in zip(terms.tolist(), coefs.tolist()):
        tl_[row[0]].append(row[1:])
        cl_[row[0]].append(c)
    return tl_, cl_


def _terms_tensors(terms_per_layer: Sequence[Sequence[Sequence[int]]], coefs_per_layer: Sequence[Sequence[float]]):
    """The concatenated op arguments: int64 [n, 6] (layer, s, row0, rows, off, r) and fp32 [n] (host)."""
    rows = [[li] + list(t) for li, ts in enumerate(terms_per_layer) for t in ts]
    cf = [c for cs in coefs_per_layer for c in cs]
    return (torch.tensor(rows, dtype=torch.int64).view(-1, 6), torch.tensor(cf, dtype=torch.float32))


# ---- the ops' bodies on every backend --------------------------------------------------------------------------------
def _merge_impl(Ws, a_list, b_list, terms, coefs, exact: bool, backend: str) -> List[torch.Tensor]:
    """The op's implementation: every layer merged, or (on any exception) none (the package docstring:
    "Transactional"). Returns per layer the codes, then the escape indices, then the escape values, then the
    codes of all layers as one buffer."""
    L = len(Ws)
    entry = tables.active(terms)  # the cached plan of this call (None: plan from scratch)
    terms_list = coefs_list = None
    if entry is not None:
        terms_list, coefs_list = entry.terms_list, entry.coefs_list
    if backend == "reference":
        if terms_list is None:
            terms_list, coefs_list = _split_terms(terms, coefs, L)
        return _reference_merge(Ws, a_list, b_list, terms_list, coefs_list, exact)
    dev = Ws[0].device
    sizes = entry.sizes if entry is not None else layer_sizes(Ws, exact)
    packed = [W.shape[1] % 4 == 0 for W in Ws]
    code_flat = torch.empty(sum(sizes), dtype=torch.uint8, device=dev)  # one buffer, a view per layer
    # Exact layers whose rows are not a multiple of 4 weights get one byte per weight (one shared buffer),
    # packed after the launch.
    byte_sizes = [W.numel() if exact and not pk else 0 for W, pk in zip(Ws, packed)]
    p_off, _ = offsets(sizes)
    b_off, nbytes = offsets(byte_sizes)
    bytes_flat = torch.empty(nbytes, dtype=torch.uint8, device=dev) if nbytes else None
    code_col = [(p if pk else bo) if exact else 0 for p, bo, pk in zip(p_off, b_off, packed)]
    sel = [(1 if pk else 2) if exact else 0 for pk in packed]
    groups = _tables(backend, Ws, a_list, b_list, terms, coefs, code_col, sel, packed, entry, ("merge", exact))
    counter = torch.zeros(max(L, 1), dtype=torch.int32, device=dev)
    snap = None if exact else _snapshot(Ws, groups)
    launched: List[int] = []
    scattered: dict = {}  # layer -> (escape indices, original values) already written with merged values
    codes = list(code_flat.split(sizes))

    def packed_code(li: int) -> torch.Tensor:
        if byte_sizes[li]:
            return reference.pack_codes(bytes_flat[b_off[li] : b_off[li] + byte_sizes[li]])
        return codes[li]

    try:
        _run(backend, groups, [code_flat.data_ptr() if code_flat.numel() else 0,
                               bytes_flat.data_ptr() if bytes_flat is not None else 0], False, exact, counter,
             launched)
        if not exact:
            e_idx = torch.empty(0, dtype=torch.int64, device=dev)
            return codes + [e_idx] * L + [torch.empty(0, dtype=W.dtype, device=dev) for W in Ws] + [code_flat]
        counts = counter.tolist()  # the one host sync of a merge
        for li in range(L):
            if byte_sizes[li]:
                codes[li].copy_(packed_code(li))
        # Escapes: every index, original and merged value is gathered before the first of them is written.
        pending = []
        for li, W in enumerate(Ws):
            if counts[li]:
                if terms_list is None:  # escapes are rare: split the terms only when one needs its delta
                    terms_list, coefs_list = _split_terms(terms, coefs, L)
                idx = reference.escape_indices(codes[li], W.numel())
                if idx.numel() != counts[li]:
                    raise RuntimeError(f"merge_: internal error: {counts[li]} escapes counted, {idx.numel()} coded")
                v = W.view(-1)[idx].clone()  # escaped weights were left unwritten: these are the originals
                merged = _escape_merged_values(W, idx, v, a_list[li], b_list[li], terms_list[li], coefs_list[li])
                pending.append((li, idx, v, merged))
        for li, idx, v, m in pending:
            _scatter(Ws[li], idx, m)
            scattered[li] = (idx, v)
    except BaseException as err:
        def undo():
            if snap is not None:  # approximate, several launches
                for li, W0 in snap.items():
                    Ws[li].copy_(W0)
                return
            if not exact:  # one launch: it raised, so it wrote nothing
                return
            layers = _layers_of(groups, launched)
            if not layers:
                return
            tl_, cl_ = (terms_list, coefs_list) if terms_list is not None else _split_terms(terms, coefs, L)
            t, c = _terms_tensors([tl_[li] for li in layers], [cl_[li] for li in layers])
            e_i, e_v = torch.empty(0, dtype=torch.int64, device=dev), {}
            idxs = [scattered[li][0] if li in scattered else e_i for li in layers]
            vals = [scattered[li][1] if li in scattered else e_v.setdefault(Ws[li].dtype, torch.empty(
                0, dtype=Ws[li].dtype, device=dev)) for li in layers]
            _unmerge_raw([Ws[li] for li in layers], [a_list[li] for li in layers], [b_list[li] for li in layers],
                         t, c, [packed_code(li) for li in layers], idxs, vals, backend, None)

        raise _rolled_back("merge", err, undo)  # noqa: B904 (the original error, rolled back)
    e_idx = torch.empty(0, dtype=torch.int64, device=dev)
    e_val: dict = {}
    idxs, vals = [], []
    for li, W in enumerate(Ws):
        if li in scattered:
            idx, v = scattered[li]
        else:
            idx = e_idx
            v = e_val.get(W.dtype)
            if v is None:
                v = e_val[W.dtype] = torch.empty(0, dtype=W.dtype, device=dev)
        idxs.append(idx)
        vals.append(v)
    return codes + idxs + vals + [code_flat]


def _unmerge_raw(Ws, a_list, b_list, terms, coefs, codes, idxs, vals, backend: str, entry) -> None:
    """Launch the unmerge of every layer and scatter the escapes, with no rollback (Triton / CUDA backends)."""
    dev = Ws[0].device
    groups, base = _unmerge_tables(Ws, a_list, b_list, terms, coefs, codes, backend, entry)
    counter = torch.zeros(max(len(Ws), 1), dtype=torch.int32, device=dev)
    _run(backend, groups, [base], True, codes[0].numel() > 0, counter)
    for W, i, v in zip(Ws, idxs, vals):
        if i.numel():
            _scatter(W, i, v)


def _unmerge_tables(Ws, a_list, b_list, terms, coefs, codes, backend: str, entry):
    """``(groups, base)``: the tables of an unmerge, its code column relative to ``base`` (0: absolute pointers).
    The cached merge tables re-pointed at the codes when they are one buffer in merge order (a merge_many_'s
    records), otherwise tables with the codes' own pointers."""
    exact = codes[0].numel() > 0
    sizes = [c.numel() for c in codes]
    p_off, _ = offsets(sizes)
    base = codes[0].data_ptr() if exact else 0
    # The cached tables address the codes as one buffer (a merge_many_'s records, in order); otherwise plan
    # this call from scratch with the codes' own pointers.
    if entry is not None and exact and any(c.data_ptr() != base + o for c, o in zip(codes, p_off)):
        entry = None
    if entry is None and exact:
        code_col = [c.data_ptr() for c in codes]
        sel, base = [0] * len(Ws), 0
    else:
        code_col = p_off if exact else [0] * len(Ws)
        sel = [1 if exact else 0] * len(Ws)
    groups = _tables(backend, Ws, a_list, b_list, terms, coefs, code_col, sel, [True] * len(Ws), entry,
                     ("unmerge", exact))
    return groups, base


def _unmerge_impl(Ws, a_list, b_list, terms, coefs, codes, idxs, vals, backend: str) -> None:
    """The op's implementation: every layer unmerged, or (on any exception) none (the package docstring:
    "Transactional")."""
    entry = tables.active(terms)
    L = len(Ws)
    if backend == "reference":
        if entry is not None:
            terms_list, coefs_list = entry.terms_list, entry.coefs_list
        else:
            terms_list, coefs_list = _split_terms(terms, coefs, L)
        _reference_unmerge(Ws, a_list, b_list, terms_list, coefs_list, codes, idxs, vals)
        return
    dev = Ws[0].device
    exact = codes[0].numel() > 0
    groups, base = _unmerge_tables(Ws, a_list, b_list, terms, coefs, codes, backend, entry)
    snap = None if exact else _snapshot(Ws, groups)
    counter = torch.zeros(max(L, 1), dtype=torch.int32, device=dev)
    launched: List[int] = []
    try:
        _run(backend, groups, [base], True, exact, counter, launched)
        for W, i, v in zip(Ws, idxs, vals):
            if i.numel():
                _scatter(W, i, v)
    except BaseException as err:
        def redo():
            if snap is not None:
                for li, W0 in snap.items():
                    Ws[li].copy_(W0)
                return
            layers = _layers_of(groups, launched)
            if not exact or not layers:  # approximate with one launch: it raised, so it wrote nothing
                return
            # The restored layers hold the original W bit for bit: the merge kernel (same tiles, same order of
            # operations) gives the merged W' again, and the escapes get the values the merge wrapper wrote.
            tl_, cl_ = ((entry.terms_list, entry.coefs_list) if entry is not None else _split_terms(terms, coefs, L))
            t, c = _terms_tensors([tl_[li] for li in layers], [cl_[li] for li in layers])
            sub = [Ws[li] for li in layers]
            mg = _tables(backend, sub, [a_list[li] for li in layers], [b_list[li] for li in layers], t, c,
                         [0] * len(layers), [0] * len(layers), [W.shape[1] % 4 == 0 for W in sub], None,
                         ("merge", False))
            mg_counter = torch.zeros(max(len(sub), 1), dtype=torch.int32, device=dev)
            _run(backend, mg, [0, 0], False, False, mg_counter)
            for li in layers:
                if idxs[li].numel():
                    W = Ws[li]
                    merged = _escape_merged_values(W, idxs[li], vals[li], a_list[li], b_list[li], tl_[li], cl_[li])
                    _scatter(W, idxs[li], merged)

        raise _rolled_back("unmerge", err, redo)  # noqa: B904 (the original error, rolled back)


# ---- backend choice, the grouped job tables of a call, the Triton / CUDA launches ------------------------------------
# Tile geometry of the compiled CUDA kernel (csrc/kernels/merge.cuh): one row, 4 columns per thread.
_CUDA_TILE_M, _CUDA_TILE_N = 1, 1024


def _select(device: torch.device) -> str:
    """The backend of a merge on ``device``: ``"reference"`` | ``"triton"`` | ``"cuda"``."""
    forced = backends.forced()
    if forced is None and device.type == "cuda":
        from ... import tuning

        if "merge_cuda" in tuning.verified_kernels(device) and _cuda_ops() is not None:
            return "cuda"
        return "triton" if backends.triton_can_run("cuda") is None else "reference"
    name = backends.select("merge", device)
    if name == "cuda" and _cuda_ops() is None:
        from ... import _ext

        raise RuntimeError("LORA_KERNELS_BACKEND=cuda cannot run merge: the compiled extension has no merge kernel "
                           f"(rebuild it; extension status: {_ext.status()})")
    return name


def _cuda_ops():
    """The compiled extension's ops when it has the merge kernel, else None."""
    from ... import _ext

    ops = _ext.get()
    if ops is None:
        return None
    try:
        _ = ops.merge_grouped_
    except (AttributeError, RuntimeError):
        return None
    return ops


def _kind(dtype: torch.dtype) -> int:
    return {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}[dtype]


def _tables(backend: str, Ws, a_list, b_list, terms, coefs, code_col, sel, packed, entry, variant):
    """Per (W dtype, adapter dtype) group of layers (normally one): ``(w_dtype, ab_dtype, jobs, tile_start,
    terms, coefs, tiles, sel, layers)`` with the code column holding ``code_col`` (offsets, rebased per call by
    :func:`.tables.code_column`). Cached in ``entry.tables[variant]`` when a plan entry is active."""
    if entry is not None:
        hit = entry.tables.get(variant)
        if hit is not None:
            return hit
        if variant[0] == "unmerge" and ("merge", variant[1]) in entry.tables:
            # The unmerge reuses the merge's tables: same jobs but for the code column (every layer's packed
            # codes, at its offset in the record buffer) and the packed flag; tile_start/terms/coefs shared.
            out = []
            for w_dtype, ab_dtype, jobs, ts, tt, cf, tiles, _, jl in entry.tables[("merge", variant[1])]:
                uj = jobs.clone()
                uj[:, J_PACKED] = 1
                col = torch.tensor(code_col, dtype=torch.int64)[jl]
                uj[:, J_CODE] = col.to(uj.device)
                usel = torch.tensor(sel, dtype=torch.int64)[jl].to(uj.device)
                out.append((w_dtype, ab_dtype, uj, ts, tt, cf, tiles, usel, jl))
            entry.tables[variant] = out
            return out
    groups: dict = {}
    for li, (W, a) in enumerate(zip(Ws, a_list)):
        groups.setdefault((W.dtype, a.dtype), []).append(li)
    if backend == "cuda":
        tm, tn = _CUDA_TILE_M, _CUDA_TILE_N
    else:
        from ...triton import merge as tmerge

        tm, tn = tmerge.TILE_M, tmerge.TILE_N
    dev = Ws[0].device
    out = []
    for (w_dtype, ab_dtype), idx in groups.items():
        jobs, ts, tt, cf, tiles, jl = tables.build_tables_vec(Ws, a_list, b_list, terms, coefs, idx, code_col,
                                                              packed, tm, tn, dev, return_layers=True)
        # which base each job's code offset is relative to (0: none), from the layer column (J_LAYER)
        jsel = torch.tensor(sel, dtype=torch.int64)[jl]
        out.append((w_dtype, ab_dtype, jobs, ts, tt, cf, tiles, jsel.to(dev), jl))
    if entry is not None:
        entry.tables[variant] = out
    return out


def _run(backend: str, groups, bases: Sequence[int], unmerge: bool, exact: bool, counter: torch.Tensor,
         done: Optional[List[int]] = None) -> None:
    """One grouped launch per group of :func:`_tables`, the code column rebased onto this call's buffers.
    ``done`` (optional) receives the index of every group launched, so that a failure of a later group can roll
    back the earlier ones."""
    for gi, (w_dtype, ab_dtype, jobs, ts, tt, cf, tiles, jsel, _) in enumerate(groups):
        if not tiles:
            continue
        if exact and any(bases):
            jobs = tables.code_column(jobs, jsel, bases)
        if backend == "cuda":
            _cuda_ops().merge_grouped_(jobs, ts, tt, cf, counter, tiles, _kind(w_dtype), _kind(ab_dtype), unmerge,
                                       exact)
        else:
            from ...triton import merge as tmerge

            tmerge.launch_merge_grouped(jobs, ts, tt, cf, counter, tiles, w_dtype, ab_dtype, unmerge, exact)
        if done is not None:
            done.append(gi)


# ---- the reference backend (CPU), layer by layer ---------------------------------------------------------------------
def _reference_merge(Ws, a_list, b_list, terms_list, coefs_list, exact: bool) -> List[torch.Tensor]:
    """The reference merge of every layer, layer by layer (:func:`lora_kernels.reference.merge_`'s operations).
    Each layer's codes and escapes are computed before it is written, also for an approximate merge (host
    memory only: the packed codes, dropped on success), so a failure at layer k restores layers 0..k-1 bit for
    bit with the reference unmerge."""
    done: List[Tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        for li, W in enumerate(Ws):
            d = reference.merge_delta(W.shape, a_list[li], b_list[li], terms_list[li], coefs_list[li])
            W_new = (W.float() + d).to(W.dtype)
            code = reference.merge_codes(W, W_new, d).reshape(-1)
            esc_idx = (code == 3).nonzero().flatten()
            esc_val = W.reshape(-1)[esc_idx].clone()
            packed = reference.pack_codes(code)
            del d, code
            W.copy_(W_new)
            done.append((li, packed, esc_idx, esc_val))
    except BaseException as err:
        def undo():
            for li, packed, ei, ev in reversed(done):
                reference.unmerge_(Ws[li], a_list[li], b_list[li], terms_list[li], coefs_list[li], packed, ei, ev)

        raise _rolled_back("merge", err, undo)  # noqa: B904 (the original error, rolled back)
    L = len(Ws)
    if exact:
        outs = [d[1] for d in done] + [d[2] for d in done] + [d[3] for d in done]
    else:
        dev = Ws[0].device
        outs = ([torch.empty(0, dtype=torch.uint8, device=dev) for _ in range(L)]
                + [torch.empty(0, dtype=torch.int64, device=dev) for _ in range(L)]
                + [torch.empty(0, dtype=W.dtype, device=dev) for W in Ws])
    flat = torch.cat(outs[:L]) if L else torch.empty(0, dtype=torch.uint8)
    return outs + [flat]


def _reference_unmerge(Ws, a_list, b_list, terms_list, coefs_list, codes, idxs, vals) -> None:
    """The reference unmerge of every layer (:func:`lora_kernels.reference.unmerge_`'s operations), layer by
    layer; a failure at layer k re-merges layers 0..k-1: for exact records ``rnd(W + delta)`` of the restored W
    is the merged W bit for bit (the reference merge wrote exactly that), for approximate ones the codes of the
    inverse step (``W'' = rnd(W' - delta)``, computed before writing) restore W'."""
    done: List[Tuple[int, Any]] = []
    try:
        for li, W in enumerate(Ws):
            d = reference.merge_delta(W.shape, a_list[li], b_list[li], terms_list[li], coefs_list[li])
            if codes[li].numel():
                c = reference.unpack_codes(codes[li], W.numel()).view(W.shape)
                out = reference.unmerge_values(W, d, c)
                if idxs[li].numel():
                    out.view(-1)[idxs[li]] = vals[li]
                undo = None
            else:
                nd = -d  # (exact: x - d == x + (-d) in IEEE arithmetic)
                out = (W.float() + nd).to(W.dtype)
                code = reference.merge_codes(W, out, nd).reshape(-1)
                ei = (code == 3).nonzero().flatten()
                undo = (reference.pack_codes(code), ei, W.reshape(-1)[ei].clone())
            del d
            W.copy_(out)
            done.append((li, undo))
    except BaseException as err:
        def redo():
            for li, undo in reversed(done):
                W = Ws[li]
                d = reference.merge_delta(W.shape, a_list[li], b_list[li], terms_list[li], coefs_list[li])
                if undo is None:
                    W.copy_((W.float() + d).to(W.dtype))
                else:
                    packed, ei, ev = undo
                    out = reference.unmerge_values(W, -d, reference.unpack_codes(packed, W.numel()).view(W.shape))
                    out.view(-1)[ei] = ev
                    W.copy_(out)

        raise _rolled_back("unmerge", err, redo)  # noqa: B904 (the original error, rolled back)


# ---- side data: codes and escapes ------------------------------------------------------------------------------------
def layer_sizes(Ws: Sequence[torch.Tensor], exact: bool) -> List[int]:
    """Bytes of packed codes per layer (0 for an approximate merge)."""
    return [(W.numel() + 3) // 4 if exact else 0 for W in Ws]


def offsets(sizes: Sequence[int]) -> Tuple[List[int], int]:
    """``(start of each part, total)`` of parts of ``sizes`` laid end to end."""
    out, pos = [], 0
    for s in sizes:
        out.append(pos)
        pos += s
    return out, pos


def _escape_merged_values(W, idx, vals, a, b, terms, coefs) -> torch.Tensor:
    """rnd(W + delta) at the escaped flat indices (fp32 delta, torch ops; used only for escapes, whose
    originals are stored, so this need not match the kernel's delta bit for bit)."""
    in_f = W.shape[1]
    rows, cols = idx // in_f, idx % in_f
    d = torch.zeros(idx.numel(), dtype=torch.float32, device=W.device)
    for (s, row0, nrows, off, r), c in zip(terms, coefs):
        if r == 0:
            continue
        sel = (rows >= row0) & (rows < row0 + nrows)
        rr = (rows - row0).clamp(0, nrows - 1)
        Bg = b[off : off + r, row0 : row0 + nrows].float()[:, rr] * torch.tensor(c, dtype=torch.float32)
        Ag = a[s, off : off + r].float()[:, cols]
        d = torch.where(sel, d + (Bg * Ag).sum(0), d)
    return (vals.float() + d).to(W.dtype)


def _scatter(W: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> None:
    """``W.view(-1)[idx] = vals``: the escape writes (one function, so tests can inject a failure here)."""
    W.view(-1)[idx] = vals


def _to_bits(v: torch.Tensor) -> torch.Tensor:
    return v.view(torch.int32 if v.element_size() == 4 else torch.int16).to(torch.int32)


def _from_bits(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return b.to(torch.int32 if dtype == torch.float32 else torch.int16).view(dtype)


def _split_outs(outs, Ws, entry, single: bool):
    """Per-layer ``(codes, escape indices, escape values)`` from the op's outputs (exact merges)."""
    if single:
        code, idx, val = outs
        return [code], [idx], [val]
    code, idx, vb, counts = outs
    L = len(Ws)
    if idx.numel():
        ns = counts.tolist()
        idxs = list(idx.split(ns))
        vals = [_from_bits(v, W.dtype) for v, W in zip(vb.split(ns), Ws)]
    else:  # no escapes (the common case): shared empty tensors, no per-layer work
        e_val: dict = {}
        for W in Ws:
            if W.dtype not in e_val:
                e_val[W.dtype] = _from_bits(vb, W.dtype)
        idxs = [idx] * L
        vals = [e_val[W.dtype] for W in Ws]
    return list(code.split(entry.sizes)), idxs, vals


def _merged_nonfinite(recs: Sequence, Ws: Sequence[torch.Tensor]) -> int:
    """How many finite weights the merge made NaN/Inf (all of them are escapes: their originals are kept)."""
    n = 0
    for r, W in zip(recs, Ws):
        if r.escapes:
            orig_ok = torch.isfinite(r.escape_val)
            now_bad = ~torch.isfinite(W.view(-1)[r.escape_idx])
            n += int((orig_ok & now_bad).sum())
    return n


# ---- rollback of a partial pass --------------------------------------------------------------------------------------
def _layers_of(groups, launched: Sequence[int]) -> List[int]:
    """The layer indices (ascending) written by the launched groups of :func:`_tables`."""
    return sorted({li for gi in launched for li in groups[gi][8].tolist()})


def _snapshot(Ws, groups) -> Optional[dict]:
    """Copies of the layers of every launch but the last, when there are several: what an approximate
    (side-data-free) pass restores from if a later launch fails. None for one launch (nothing can fail after
    it)."""
    live = [gi for gi, g in enumerate(groups) if g[6]]
    if len(live) < 2:
        return None
    return {li: Ws[li].clone() for li in _layers_of(groups, live[:-1])}


def _rolled_back(what: str, err: BaseException, rollback) -> BaseException:
    """Run ``rollback()`` and return ``err`` to re-raise. If the rollback fails too (the device or the allocator
    failing twice in a row), ``err`` keeps its type and gets a note saying so (as lora_kernels._transaction
    does): the weights may then be partly written."""
    try:
        rollback()
    except BaseException as e2:  # noqa: BLE001 - reported on the original exception
        msg = (f"lora_kernels {what}: rolling back after this error failed too ({type(e2).__name__}: {e2}); the "
               "weights may be partly written")
        if hasattr(err, "add_note"):
            err.add_note(msg)
        else:  # pragma: no cover - Python < 3.11
            err.args = (f"{err.args[0] if err.args else ''} [{msg}]",) + tuple(err.args[1:])
    return err
