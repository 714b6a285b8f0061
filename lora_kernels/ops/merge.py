"""Merge LoRA adapters into base weights in place, and undo it bit-exactly (V-LoRA's merged / mixed modes).

Semantics (W [out, in] the base Linear's weight, ``out = weights.out_features``; slice s of a fused projection
owns rows ``[col_s, col_s + out_s)``):

    merge_:   W[rows_s] <- rnd( W[rows_s] + delta_s ),
              delta_s = sum_j coef_{s,j} * B_{s,j} @ A_{s,j},   coef_{s,j} = fl32(fl32(lambda_j) * scale_{s,j})
    unmerge_: W <- the W before the merge, bit for bit (``exact=True``), or rnd(W - delta) (``exact=False``)

The delta is formed in fp32 (fp32 products and sums over the ranks, a fixed order per backend) and rounded
once into W; each weight is read once and written once. With ``exact=True`` the merge also returns, in the
same pass, a 2-bit code per weight (packed 4 per byte: ``ceil(numel / 4)`` bytes) plus a sparse list of
*escapes* (flat index int64 + original value) for the rare weights the code cannot restore; see
docs/merge.md for the maths. ``exact=False`` keeps no side data: unmerge is ``rnd(W' - delta)``, which leaves
a fraction of the weights one rounding step off (PEFT's behaviour, drifting over cycles).

Backends (:mod:`lora_kernels.backends`): the reference on CPU tensors; Triton on CUDA tensors (the compiled
CUDA kernel only where ``lora_kernels.tuning.verified_kernels(device)`` lists ``"merge_cuda"``, or when
forced with ``LORA_KERNELS_BACKEND=cuda``). Each backend computes the same delta in its merge and its unmerge
(so the restore is exact within it); deltas of different backends may differ in the last bits, so the record
remembers its backend and unmerge always uses that one.

Host syncs: an exact merge reads the escape counters back (one sync per call, after the launch); the first
merge of a plan also reads the adapters' scales to the host; unmerge does not sync. The host plan (validation,
terms, device descriptor tables) is cached across calls (:mod:`lora_kernels.ops.merge_plan`: key and
invalidation there), and the unmerge of a merge_many_'s records reuses it. Neither op is CUDA-graph capturable
(merge: the sync; an exact one also re-points a copy of its job table at its code buffer per call).

Adapter weights with NaN/Inf (or a delta that overflows): the merged weights are what IEEE arithmetic gives
(NaN/Inf); every such weight is an escape (its original value is kept), so exact unmerge still restores W
bit for bit. ``merge_`` warns (RuntimeWarning) when it made finite weights non-finite.

Input contract (issue 13; docs/input-contract.md):

* Arguments are validated and converted before anything is written: adapter ids are integers of any integer
  type (Python, numpy, 0-dim or 1-D integer tensors; never bool, never a float such as ``1.0``), in
  ``[0, weights.max_adapters)`` and loaded (an id listed twice is two terms of the sum, each with its lambda);
  lambdas are finite real numbers (never bool, str or complex) whose fp32 coefficient
  ``fl32(fl32(lambda) * scale)`` is finite for every slice; ``exact`` is a bool.
* Outputs never overlap library-owned storage: a W may not share memory with any tensor of the layers'
  LoRAWeights (``a``, ``b``, ``offsets``, ``ranks``, ``scales``, ``slice_info``), with another W of the call, or
  with what a live (not yet unmerged) MergeRecord will read or write at its unmerge (its weights' storage, its
  side data); the adapter storage of a call may not overlap the W of a live record either. ValueError naming
  ``W`` / ``Ws[i]`` (or ``weights[i].a`` ...).
* Transactional: a refusal, or an exception at any later step (a launch, the escape pass, building the records,
  the non-finite warning turned into an error by a warnings filter), leaves every W bit-identical, W's version
  counter as it was, every record and the plan cache as they were. How: every check runs before the first
  write; after it, a failure is rolled back. An exact merge restores the layers written so far from the side
  data its own pass produced (the unmerge path, bit-exact for the same reason the unmerge is); the reference
  backend computes that side data for approximate merges too (host-only, it is discarded on success); an
  approximate Triton/CUDA merge has one launch as its last write (by construction nothing that can fail comes
  after it), or, when the layers span several dtype groups (several launches), keeps a copy of the layers of all
  launches but the last until they are done. An unmerge rolls back by merging the restored layers again
  (deterministic: the same kernel gives the same W' bit for bit), and approximate reference unmerges keep the
  codes of the inverse step. A launch that raises is assumed to have written nothing (launch-time failures: a
  compile error, an invalid argument). If the rollback itself fails, a note on the exception says so.
"""

from __future__ import annotations

import math
import numbers
import struct
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .. import backends, reference
from .._validation import (FLOAT_DTYPES, check, check_each, check_int, check_real, check_tensor, first_overlap,
                           tensor_span)
from ..profiling import nvtx_range
from ..weights import LoRAWeights
from . import merge_plan

__all__ = ["MergeRecord", "merge_", "unmerge_", "merge_many_", "unmerge_many_"]

AdapterArg = Union[int, Sequence[int]]
_F32 = struct.Struct("f")
LambdaArg = Union[None, float, Sequence[float]]

# Width of a row of the job table (columns: W, code, row0, rows, in, A, stride_A, B, stride_B, first term,
# n_terms, first tile, layer, column tiles, packed; one spare). Kept here so that building tables for the CUDA
# kernel does not import Triton.
_JOB_COLS = 16
# Tile geometry of the compiled CUDA kernel (csrc/kernels/merge.cuh): one row, 4 columns per thread.
_CUDA_TILE_M, _CUDA_TILE_N = 1, 1024


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


# ---- backend choice ---------------------------------------------------------------------------------------------
def _select(device: torch.device) -> str:
    forced = backends.forced()
    if forced is None and device.type == "cuda":
        from .. import tuning

        if "merge_cuda" in tuning.verified_kernels(device) and _cuda_ops() is not None:
            return "cuda"
        return "triton" if backends.triton_can_run("cuda") is None else "reference"
    name = backends.select("merge", device)
    if name == "cuda" and _cuda_ops() is None:
        from .. import _ext

        raise RuntimeError("LORA_KERNELS_BACKEND=cuda cannot run merge: the compiled extension has no merge kernel "
                           f"(rebuild it; extension status: {_ext.status()})")
    return name


def _cuda_ops():
    from .. import _ext

    ops = _ext.get()
    if ops is None:
        return None
    try:
        _ = ops.merge_grouped_
    except (AttributeError, RuntimeError):
        return None
    return ops


# ---- tables shared by the Triton and CUDA kernels ---------------------------------------------------------------
def build_tables(layers: Sequence[dict], tile_m: int, tile_n: int, device: torch.device):
    """Device-side descriptors of a grouped launch. Each layer dict has ``W``, ``code`` (uint8 buffer or None),
    ``packed`` (codes packed in-kernel), ``a``, ``b``, ``terms`` (host list of ``[s, row0, rows, off, r]``) and
    ``coefs`` (host list of fp32 values). Returns ``(jobs int64 [n_jobs, JOB_COLS], tile_start int64 [n_jobs],
    terms int64 [n_terms, 2], coefs fp32 [n_terms], total_tiles)``: one job per (layer, slice), its terms
    contiguous. Column layout: ``_J_*`` below (also csrc/kernels/merge.cuh and lora_kernels/triton/merge.py)."""
    JOB_COLS = _JOB_COLS

    jobs: List[List[int]] = []
    tile_start: List[int] = []
    term_rows: List[List[int]] = []
    coef_vals: List[float] = []
    tiles = 0
    for li, L in enumerate(layers):
        W, a, b = L["W"], L["a"], L["b"]
        in_f = W.shape[1]
        es = a.element_size()
        code_ptr = L["code"].data_ptr() if L["code"] is not None and L["code"].numel() else 0
        groups: List[Tuple[int, int, int, List[Tuple[int, int, float]]]] = []
        for (s, row0, rows, off, r), c in zip(L["terms"], L["coefs"]):
            if not groups or groups[-1][0] != s:
                groups.append((s, row0, rows, []))
            if r > 0:
                groups[-1][3].append((off, r, c))
        for s, row0, rows, items in groups:
            ntn = -(-in_f // tile_n)
            ntiles = -(-rows // tile_m) * ntn
            if ntiles == 0:
                continue
            row = [0] * JOB_COLS
            row[:15] = [W.data_ptr(), code_ptr, row0, rows, in_f, a.data_ptr() + s * a.stride(0) * es, a.stride(1),
                        b.data_ptr() + row0 * b.stride(1) * es, b.stride(0), len(term_rows), len(items), tiles,
                        L.get("layer_index", li), ntn, int(L["packed"])]
            jobs.append(row)
            tile_start.append(tiles)
            tiles += ntiles
            for off, r, c in items:
                term_rows.append([off, r])
                coef_vals.append(c)
    n_jobs = len(jobs)
    flat = torch.tensor([v for row in jobs for v in row] + tile_start + [v for t in term_rows for v in t] + [0, 0],
                        dtype=torch.int64)
    flat = flat.to(device)
    nj = n_jobs * JOB_COLS
    jobs_t = flat[:nj].view(n_jobs, JOB_COLS)
    ts = flat[nj : nj + n_jobs]
    terms_t = flat[nj + n_jobs :].view(-1, 2)  # (a dummy row at the end keeps it non-empty)
    coefs_t = torch.tensor(coef_vals + [0.0], dtype=torch.float32).to(device)
    return jobs_t, ts, terms_t, coefs_t, tiles


def _tables(backend: str, Ws, a_list, b_list, terms, coefs, code_col, sel, packed, entry, variant):
    """Per (W dtype, adapter dtype) group of layers (normally one): ``(w_dtype, ab_dtype, jobs, tile_start,
    terms, coefs, tiles, sel)`` with the code column holding ``code_col`` (offsets, rebased per call by
    :func:`merge_plan.code_column`). Cached in ``entry.tables[variant]`` when a plan entry is active."""
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
                uj[:, 14] = 1
                col = torch.tensor(code_col, dtype=torch.int64)[jl]
                uj[:, 1] = col.to(uj.device)
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
        from ..triton import merge as tmerge

        tm, tn = tmerge.TILE_M, tmerge.TILE_N
    dev = Ws[0].device
    out = []
    for (w_dtype, ab_dtype), idx in groups.items():
        jobs, ts, tt, cf, tiles, jl = merge_plan.build_tables_vec(Ws, a_list, b_list, terms, coefs, idx, code_col,
                                                                  packed, tm, tn, dev, return_layers=True)
        # which base each job's code offset is relative to (0: none), from the layer column (12)
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
            jobs = merge_plan.code_column(jobs, jsel, bases)
        if backend == "cuda":
            _cuda_ops().merge_grouped_(jobs, ts, tt, cf, counter, tiles, _kind(w_dtype), _kind(ab_dtype), unmerge,
                                       exact)
        else:
            from ..triton import merge as tmerge

            tmerge.launch_merge_grouped(jobs, ts, tt, cf, counter, tiles, w_dtype, ab_dtype, unmerge, exact)
        if done is not None:
            done.append(gi)


def _kind(dtype: torch.dtype) -> int:
    return {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}[dtype]


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


def _split_terms(terms: torch.Tensor, coefs: torch.Tensor, L: int):
    """Per-layer host lists from the concatenated op arguments (terms int64 [n, 6] = (layer, s, row0, rows, off,
    r), coefs fp32 [n])."""
    tl_: List[List[List[int]]] = [[] for _ in range(L)]
    cl_: List[List[float]] = [[] for _ in range(L)]
    for row, c in zip(terms.tolist(), coefs.tolist()):
        tl_[row[0]].append(row[1:])
        cl_[row[0]].append(c)
    return tl_, cl_


def _scatter(W: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> None:
    """``W.view(-1)[idx] = vals``: the escape writes (one function, so tests can inject a failure here)."""
    W.view(-1)[idx] = vals


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

        raise _rolled_back("merge", err, undo)  # noqa: B904 (re-raises the original exception, rolled back)
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


def _merge_impl(Ws, a_list, b_list, terms, coefs, exact: bool, backend: str) -> List[torch.Tensor]:
    """The op's implementation: every layer merged, or (on any exception) none (see the module docstring)."""
    L = len(Ws)
    entry = merge_plan.active(terms)  # the cached plan of this call (None: plan from scratch)
    terms_list = coefs_list = None
    if entry is not None:
        terms_list, coefs_list = entry.terms_list, entry.coefs_list
    if backend == "reference":
        if terms_list is None:
            terms_list, coefs_list = _split_terms(terms, coefs, L)
        return _reference_merge(Ws, a_list, b_list, terms_list, coefs_list, exact)
    dev = Ws[0].device
    sizes = entry.sizes if entry is not None else merge_plan.layer_sizes(Ws, exact)
    packed = [W.shape[1] % 4 == 0 for W in Ws]
    code_flat = torch.empty(sum(sizes), dtype=torch.uint8, device=dev)  # one buffer, a view per layer
    # Exact layers whose rows are not a multiple of 4 weights get one byte per weight (one shared buffer),
    # packed after the launch.
    byte_sizes = [W.numel() if exact and not pk else 0 for W, pk in zip(Ws, packed)]
    p_off, _ = merge_plan.offsets(sizes)
    b_off, nbytes = merge_plan.offsets(byte_sizes)
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
                pending.append((li, idx, v, _escape_merged_values(W, idx, v, a_list[li], b_list[li], terms_list[li],
                                                                  coefs_list[li])))
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

        raise _rolled_back("merge", err, undo)  # noqa: B904 (re-raises the original exception, rolled back)
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

        raise _rolled_back("unmerge", err, redo)  # noqa: B904 (re-raises the original exception, rolled back)


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
    exact = codes[0].numel() > 0
    sizes = [c.numel() for c in codes]
    p_off, _ = merge_plan.offsets(sizes)
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
    """The op's implementation: every layer unmerged, or (on any exception) none (see the module docstring)."""
    entry = merge_plan.active(terms)
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
            _run(backend, mg, [0, 0], False, False, torch.zeros(max(len(sub), 1), dtype=torch.int32, device=dev))
            for li in layers:
                if idxs[li].numel():
                    W = Ws[li]
                    _scatter(W, idxs[li], _escape_merged_values(W, idxs[li], vals[li], a_list[li], b_list[li],
                                                                tl_[li], cl_[li]))

        raise _rolled_back("unmerge", err, redo)  # noqa: B904 (re-raises the original exception, rolled back)


# ---- custom ops -------------------------------------------------------------------------------------------------
@torch.library.custom_op("lora_kernels::merge_many_", mutates_args=("Ws",))
def _merge_many_op(
    Ws: List[torch.Tensor], a: List[torch.Tensor], b: List[torch.Tensor], terms: torch.Tensor,
    coefs: torch.Tensor, exact: bool, backend: str,
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


def _to_bits(v: torch.Tensor) -> torch.Tensor:
    return v.view(torch.int32 if v.element_size() == 4 else torch.int16).to(torch.int32)


def _from_bits(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return b.to(torch.int32 if dtype == torch.float32 else torch.int16).view(dtype)


@_merge_many_op.register_fake
def _(Ws, a, b, terms, coefs, exact, backend):
    ctx = torch.library.get_ctx()
    dev = Ws[0].device if Ws else torch.device("cpu")
    n = ctx.new_dynamic_size() if exact else 0
    code = torch.empty(sum((W.numel() + 3) // 4 for W in Ws) if exact else 0, dtype=torch.uint8, device=dev)
    return (code, torch.empty(n, dtype=torch.int64, device=dev), torch.empty(n, dtype=torch.int32, device=dev),
            torch.empty(len(Ws), dtype=torch.int64, device=dev))


@torch.library.custom_op("lora_kernels::unmerge_many_", mutates_args=("Ws",))
def _unmerge_many_op(
    Ws: List[torch.Tensor], a: List[torch.Tensor], b: List[torch.Tensor], terms: torch.Tensor,
    coefs: torch.Tensor, code: List[torch.Tensor], escape_idx: List[torch.Tensor],
    escape_val: List[torch.Tensor], backend: str,
) -> None:
    with nvtx_range("lora_kernels.unmerge_many_"):
        _unmerge_impl(Ws, a, b, terms, coefs, code, escape_idx, escape_val, backend)


@_unmerge_many_op.register_fake
def _(Ws, a, b, terms, coefs, code, escape_idx, escape_val, backend):
    return None


@torch.library.custom_op("lora_kernels::merge_", mutates_args=("W",))
def _merge_op(
    W: torch.Tensor, a: torch.Tensor, b: torch.Tensor, terms: torch.Tensor, coefs: torch.Tensor, exact: bool,
    backend: str,
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


@torch.library.custom_op("lora_kernels::unmerge_", mutates_args=("W",))
def _unmerge_op(
    W: torch.Tensor, a: torch.Tensor, b: torch.Tensor, terms: torch.Tensor, coefs: torch.Tensor,
    code: torch.Tensor, escape_idx: torch.Tensor, escape_val: torch.Tensor, backend: str,
) -> None:
    with nvtx_range("lora_kernels.unmerge_"):
        _unmerge_impl([W], [a], [b], terms, coefs, [code], [escape_idx], [escape_val], backend)


@_unmerge_op.register_fake
def _(W, a, b, terms, coefs, code, escape_idx, escape_val, backend):
    return None


# ---- validation -------------------------------------------------------------------------------------------------
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


def _terms_tensors(terms_per_layer: Sequence[Sequence[Sequence[int]]], coefs_per_layer: Sequence[Sequence[float]]):
    """The concatenated op arguments: int64 [n, 6] (layer, s, row0, rows, off, r) and fp32 [n] (host)."""
    rows = [[li] + list(t) for li, ts in enumerate(terms_per_layer) for t in ts]
    cf = [c for cs in coefs_per_layer for c in cs]
    return (torch.tensor(rows, dtype=torch.int64).view(-1, 6), torch.tensor(cf, dtype=torch.float32))


def _version(W: torch.Tensor) -> Optional[int]:
    return None if W.is_inference() else W._version


def _check_record(W: torch.Tensor, rec: Any, wname: str = "W", rname: str = "record") -> None:
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


def _merged_nonfinite(recs: Sequence[MergeRecord], Ws: Sequence[torch.Tensor]) -> int:
    n = 0
    for r, W in zip(recs, Ws):
        if r.escapes:
            orig_ok = torch.isfinite(r.escape_val)
            now_bad = ~torch.isfinite(W.view(-1)[r.escape_idx])
            n += int((orig_ok & now_bad).sum())
    return n


# ---- live records: what later merges must not overlap ------------------------------------------------------------
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


# ---- public API -------------------------------------------------------------------------------------------------
def merge_(
    W: torch.Tensor, weights: LoRAWeights, adapters: AdapterArg, lambdas: LambdaArg = None, *, exact: bool = True,
) -> MergeRecord:
    """``W += sum_j lambda_j * scale_{s,j} * B_{s,j} @ A_{s,j}`` in place (every slice s); returns the record
    :func:`unmerge_` needs.

    Semantics: see the module docstring. The delta is formed in fp32 and rounded once into W (one read and one
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
        (see the module docstring: checks first, rollback after the first write).
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
    ids = _canon_ids(adapters)
    lams = _canon_lams(lambdas, len(ids))
    if not Ws:
        return []
    # The host plan (validation, scales, terms, device tables) is cached per (layers, adapters, lambdas):
    # see lora_kernels.ops.merge_plan for the key and what invalidates it. A hit implies every check of the
    # cold plan (the key holds the pointers, shapes and strides the overlap checks looked at).
    entry, key, backend = None, None, None
    if all(isinstance(W, torch.Tensor) for W in Ws):
        backend = _select(Ws[0].device)
        lam_key = (None,) if lams is None else tuple((v, math.copysign(1.0, v)) for v in lams)
        key = merge_plan.plan_key(Ws, ws, ids, lam_key, exact, backend)
        entry = merge_plan.lookup(key, ws)
    cold = entry is None
    if cold:
        entry, backend = _plan_many(Ws, ws, ids, lams, exact, _single, key)
    _check_live(entry, _single)
    recs = _new_records(entry, Ws, ws, exact, backend)
    # Bookkeeping first (undone on failure), so that nothing that can fail is left after the write of an
    # approximate merge, which has no side data to roll back from.
    versions = [_version(W) for W in Ws]
    group = None
    try:
        if cold and key is not None and key[0] == backend:
            merge_plan.store(entry)
        group = _register_live(entry, recs)
        with torch.no_grad(), merge_plan.activate(entry):
            terms, coefs = entry.terms_t, entry.coefs_t
            if _single:
                outs = torch.ops.lora_kernels.merge_(Ws[0], ws[0].a, ws[0].b, terms, coefs, exact, backend)
            else:
                outs = torch.ops.lora_kernels.merge_many_(Ws, [w.a for w in ws], [w.b for w in ws], terms, coefs,
                                                          exact, backend)
    except BaseException:
        if group is not None:
            _LIVE.discard(group)
        if cold:
            merge_plan.discard(entry)  # (only if it is the entry cached under its key)
        _restore_versions(Ws, versions)
        raise
    for r, W in zip(recs, Ws):
        r.__dict__["version"] = _version(W)
    if not exact:
        return recs
    group.bufs = tuple(zip(("code", "escape_idx", "escape_val", "counts"), outs))
    try:
        codes, idxs, vals = _split_outs(outs, Ws, entry, _single)
        for r, code, idx, v in zip(recs, codes, idxs, vals):
            r.__dict__.update(code=code, escape_idx=idx, escape_val=v, escapes=idx.numel())
        bad = _merged_nonfinite(recs, Ws)
        if bad:
            warnings.warn(f"merge_: {bad} finite weights became NaN/Inf (non-finite adapter weights or overflow); "
                          "unmerge_ restores them exactly from the escape list", RuntimeWarning, stacklevel=2)
    except BaseException as err:  # (a warnings filter may turn the warning into an error)
        def undo():
            c, i, v = _split_outs(outs, Ws, entry, _single)
            with torch.no_grad(), merge_plan.activate(entry):
                _unmerge_impl(Ws, [w.a for w in ws], [w.b for w in ws], entry.terms_t, entry.coefs_t, c, i, v,
                              backend)

        e2 = _rolled_back("merge", err, undo)
        _LIVE.discard(group)
        if cold:
            merge_plan.discard(entry)
        _restore_versions(Ws, versions)
        raise e2  # noqa: B904 (re-raises the original exception, rolled back)
    return recs


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
        terms, coefs = _terms_tensors([p["terms"] for p in plans], [p["coefs"] for p in plans])
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
    backend = _select(dev)
    entry = merge_plan.PlanEntry(key, ws, plans, terms, coefs, merge_plan.layer_sizes(Ws, exact))
    entry.w_spans, entry.in_spans, entry.device = w_spans, in_spans, dev
    return entry, backend


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
        if not _record_ok(W, r):  # the detailed checks (and their messages) only when a cheap one fails
            _check_record(W, r, "W" if _single else f"Ws[{i}]", "record" if _single else f"records[{i}]")
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
        terms, coefs = _terms_tensors([r._terms for r in recs], [r._coefs for r in recs])
    versions = [_version(W) for W in Ws]
    try:
        with torch.no_grad(), merge_plan.activate(entry):
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
