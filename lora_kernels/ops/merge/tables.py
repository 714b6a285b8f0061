"""The job table of a grouped merge / unmerge launch (its column layout and builders), and the cache of host
plans (alias: ``lora_kernels.ops.merge_plan``).

The job table. A launch (Triton: ``lora_kernels/triton/merge.py``; CUDA: ``csrc/kernels/merge.cuh``, enum
``MergeJobCol``) covers every *job* of a list of layers; a job is one slice of one layer (rows ``[row0, row0 +
rows)`` of W). Its descriptor is one int64 row of ``JOB_COLS`` columns, named by the ``J_*`` constants below (the
kernels read them at these positions; keep the three copies in step). Beside the job table a launch takes
``tile_start`` (int64 [n_jobs]: the first tile of each job), the job's terms (int64 [n_terms, 2]: first storage
row ``off`` and rank ``r`` of each adapter, a job's terms contiguous from ``J_T0``) and their coefficients (fp32
[n_terms]). :func:`build_tables` is the per-layer reference builder; :func:`build_tables_vec` builds the same
tables with tensor ops (the one the ops use; tests check them equal); :func:`code_column` re-points the code
column of a cached table at a call's code buffer. Torch only: building tables for the CUDA kernel does not import
Triton.

The plan cache: the host plans of the grouped merge / unmerge across mode switches. A whole-model switch (e.g.
32 layers x q, k, v, o, gate, up, down = 224 weights) used to spend most of its host time planning: per-layer
validation, terms lists, a device->host read of every layer's scales, and a Python loop packing the device
descriptor tables (jobs / tile_start / terms / coefs). None of it changes between two switches to the same
adapter, so :func:`lookup` / :func:`store` keep it in a small LRU cache keyed by

    (backend, exact, adapter ids, lambdas,
     per layer: W's data pointer, shape, strides, dtype and device,
                the LoRAWeights' identity and ``version`` (bumped by add/remove), its scales tensor's identity,
                data pointer and in-place version counter, and the data pointers, strides and dtypes of a / b)

and a hit is also checked against the adapters' allocation tokens (the same identity check a MergeRecord uses), so
an add/remove, a direct write to ``weights.scales``, a reassigned ``a`` / ``b`` or a replaced W all miss. A hit
therefore implies every check the cold plan made, including the overlap checks of W against the LoRAWeights'
tensors (the key fixes W's and a/b's pointers and strides; ``offsets`` / ``ranks`` / ``slice_info`` are allocated
once per LoRAWeights object, whose identity the key holds). Only the checks against live records
(:func:`.checks._check_live`) run on every call. A call that fails after storing its plan removes it
again (:func:`discard`). W's *contents* (its version counter) are not in the key: the tables hold pointers, not
values; the records still check W's data pointer and version at unmerge time.

The tables hold raw device pointers of W, A and B; the code buffer (the record's side data) is new for every
merge, so its column holds an offset that :func:`code_column` turns into pointers per call (a few tiny device
ops, no host sync).

The cache holds weak references to the LoRAWeights (a dead one is a miss) and the small device tables.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ...layouts import MERGE_JOB

__all__ = ["J_W", "J_CODE", "J_ROW0", "J_ROWS", "J_IN", "J_A", "J_SA", "J_B", "J_SB", "J_T0", "J_NT", "J_TILE0",
           "J_LAYER", "J_NTN", "J_PACKED", "JOB_COLS", "build_tables", "build_tables_vec", "code_column",
           "PlanEntry", "plan_key", "lookup", "store", "discard", "clear", "info", "set_enabled", "active", "activate"]

# ---- columns of the job table (int64 [n_jobs, JOB_COLS]) ---------------------------------------------------------
# Described once in lora_kernels.layouts.MERGE_JOB (field docs there), from which csrc/kernels/layouts.h is generated.
_COL = MERGE_JOB.columns()
J_W, J_CODE, J_ROW0, J_ROWS, J_IN = _COL["W"], _COL["code"], _COL["row0"], _COL["rows"], _COL["in_features"]
J_A, J_SA, J_B, J_SB = _COL["A"], _COL["stride_A"], _COL["B"], _COL["stride_B"]
J_T0, J_NT, J_TILE0 = _COL["term0"], _COL["n_terms"], _COL["tile0"]
J_LAYER, J_NTN, J_PACKED = _COL["layer"], _COL["col_tiles"], _COL["packed"]
JOB_COLS = _COL["size"]


def build_tables(layers: Sequence[dict], tile_m: int, tile_n: int, device: torch.device):
    """Device-side descriptors of a grouped launch. Each layer dict has ``W``, ``code`` (uint8 buffer or None),
    ``packed`` (codes packed in-kernel), ``a``, ``b``, ``terms`` (host list of ``[s, row0, rows, off, r]``) and
    ``coefs`` (host list of fp32 values). Returns ``(jobs int64 [n_jobs, JOB_COLS], tile_start int64 [n_jobs],
    terms int64 [n_terms, 2], coefs fp32 [n_terms], total_tiles)``: one job per (layer, slice), its terms
    contiguous. Column layout: the ``J_*`` constants."""
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
            row[J_W], row[J_CODE], row[J_ROW0], row[J_ROWS], row[J_IN] = W.data_ptr(), code_ptr, row0, rows, in_f
            row[J_A], row[J_SA] = a.data_ptr() + s * a.stride(0) * es, a.stride(1)
            row[J_B], row[J_SB] = b.data_ptr() + row0 * b.stride(1) * es, b.stride(0)
            row[J_T0], row[J_NT], row[J_TILE0] = len(term_rows), len(items), tiles
            row[J_LAYER], row[J_NTN], row[J_PACKED] = L.get("layer_index", li), ntn, int(L["packed"])
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


def build_tables_vec(Ws: Sequence[torch.Tensor], a_list: Sequence[torch.Tensor], b_list: Sequence[torch.Tensor],
                     terms: torch.Tensor, coefs: torch.Tensor, layers: Sequence[int], code_col: Sequence[int],
                     packed: Sequence[bool], tile_m: int, tile_n: int, device: torch.device,
                     return_layers: bool = False):
    """The tables of :func:`build_tables` for the layers ``layers`` (global indices, ascending) of one grouped
    launch, from the concatenated op arguments (host ``terms`` int64 [n, 6] = (layer, s, row0, rows, off, r),
    ``coefs`` fp32 [n]) with tensor ops instead of per-term Python. ``code_col[l]``: the value of the code column
    for layer l (a pointer, or an offset :func:`code_column` rebases); ``packed[l]``: the packed flag. Returns
    ``(jobs, tile_start, terms, coefs, total_tiles)`` on ``device``, bit-identical to build_tables given the same
    pointers; with ``return_layers`` also the jobs' layer column as a host int64 tensor (so callers need not read
    the device table back)."""
    i64 = torch.int64
    # per layer: (W, in, A, A's slice stride, A's row stride, element size, B, B's row stride, B's column stride,
    # code column, packed)
    lay = torch.tensor([[W.data_ptr(), W.shape[1], a.data_ptr(), a.stride(0), a.stride(1), a.element_size(),
                         b.data_ptr(), b.stride(0), b.stride(1), int(code_col[li]), int(packed[li])]
                        for li, W, a, b in ((li, Ws[li], a_list[li], b_list[li]) for li in layers)],
                       dtype=i64).view(-1, 11)
    pos = torch.full((len(Ws),), -1, dtype=i64)
    pos[torch.tensor(list(layers), dtype=i64)] = torch.arange(len(layers), dtype=i64)
    T = terms.to("cpu", i64).view(-1, 6)
    C = coefs.to("cpu", torch.float32).view(-1)
    if len(layers) != len(Ws):
        sel = pos[T[:, 0]] >= 0
        T, C = T[sel], C[sel]
    n = T.shape[0]
    if n == 0:
        flat = torch.zeros(2, dtype=i64).to(device)
        out = (flat[:0].view(0, JOB_COLS), flat[:0], flat.view(-1, 2),
               torch.zeros(1, dtype=torch.float32).to(device), 0)
        return out + (torch.zeros(0, dtype=i64),) if return_layers else out
    newg = torch.ones(n, dtype=torch.bool)
    newg[1:] = (T[1:, 0] != T[:-1, 0]) | (T[1:, 1] != T[:-1, 1])
    gid = torch.cumsum(newg.to(i64), 0) - 1
    first = newg.nonzero().flatten()
    G = first.numel()
    gl, gs, grow0, grows = T[first, 0], T[first, 1], T[first, 2], T[first, 3]
    P = lay[pos[gl]]
    in_f = P[:, 1]
    ntn = (in_f + tile_n - 1) // tile_n
    ntiles = (grows + tile_m - 1) // tile_m * ntn
    valid = ntiles > 0
    keep = (T[:, 5] > 0) & valid[gid]
    nitems = torch.bincount(gid[keep], minlength=G)
    gv = valid.nonzero().flatten()
    nitems, ntiles = nitems[gv], ntiles[gv]
    first_term = torch.cumsum(nitems, 0) - nitems
    tile_start = torch.cumsum(ntiles, 0) - ntiles
    tiles = int(ntiles.sum())
    P, gl, gs, grow0, grows, in_f, ntn = P[gv], gl[gv], gs[gv], grow0[gv], grows[gv], in_f[gv], ntn[gv]
    es = P[:, 5]
    cols = [torch.zeros_like(gl)] * JOB_COLS
    cols[J_W], cols[J_CODE], cols[J_ROW0], cols[J_ROWS], cols[J_IN] = P[:, 0], P[:, 9], grow0, grows, in_f
    cols[J_A], cols[J_SA] = P[:, 2] + gs * P[:, 3] * es, P[:, 4]
    cols[J_B], cols[J_SB] = P[:, 6] + grow0 * P[:, 8] * es, P[:, 7]
    cols[J_T0], cols[J_NT], cols[J_TILE0] = first_term, nitems, tile_start
    cols[J_LAYER], cols[J_NTN], cols[J_PACKED] = gl, ntn, P[:, 10]
    jobs = torch.stack(cols, 1)
    term_rows = T[keep][:, 4:6]
    flat = torch.cat([jobs.reshape(-1), tile_start, term_rows.reshape(-1), torch.zeros(2, dtype=i64)]).to(device)
    nj = jobs.shape[0] * JOB_COLS
    nJ = jobs.shape[0]
    coefs_t = torch.cat([C[keep], torch.zeros(1, dtype=torch.float32)]).to(device)
    out = (flat[:nj].view(nJ, JOB_COLS), flat[nj : nj + nJ], flat[nj + nJ :].view(-1, 2), coefs_t, tiles)
    return out + (gl,) if return_layers else out


def code_column(jobs: torch.Tensor, sel: torch.Tensor, bases: Sequence[int]) -> torch.Tensor:
    """A copy of the cached ``jobs`` whose code column (``J_CODE``) holds ``offset + bases[sel - 1]`` (``sel``
    int64 [n_jobs] on the device: 0 = no code buffer, k = relative to ``bases[k - 1]``); device ops only, no host
    sync."""
    out = jobs.clone()
    col = out[:, J_CODE]
    for k, base in enumerate(bases, start=1):
        if base:
            col.add_((sel == k).to(torch.int64) * base)
    return out


# ---- the plan cache --------------------------------------------------------------------------------------------------
_MAX_ENTRIES = 16
_cache: "OrderedDict[tuple, PlanEntry]" = OrderedDict()
_stats = {"hits": 0, "misses": 0, "uncacheable": 0}
_enabled = True
_local = threading.local()


class PlanEntry:
    """The host plan of one merge_many_ call: per-layer plans (for the records), the op arguments (``terms_t``
    int64 [n, 6], ``coefs_t`` fp32 [n], host), per-layer term lists, code sizes, and the device tables per
    (backend, unmerge) variant (filled by the first launch)."""

    __slots__ = ("key", "wrefs", "plans", "terms_t", "coefs_t", "terms_list", "coefs_list", "sizes", "tables",
                 "records", "w_spans", "in_spans", "device", "__weakref__")

    def __init__(self, key, ws, plans, terms_t, coefs_t, sizes):
        self.key = key
        self.wrefs = [weakref.ref(w) for w in ws]
        self.plans = plans
        self.terms_t = terms_t
        self.coefs_t = coefs_t
        self.terms_list = [p["terms"] for p in plans]
        self.coefs_list = [p["coefs"] for p in plans]
        self.sizes = sizes
        self.tables: Dict[Any, Any] = {}
        self.records: Optional[List[dict]] = None  # MergeRecord fields shared by every merge of this plan
        # Byte spans (start, end, label) of the Ws and of every tensor their LoRAWeights own, taken when the plan
        # was checked (the key fixes them): later merges check theirs against these while a record is live.
        self.w_spans: List[tuple] = []
        self.in_spans: List[tuple] = []
        self.device: Optional[torch.device] = None


def _tensor_version(t: torch.Tensor) -> Optional[int]:
    return None if t.is_inference() else t._version


def plan_key(Ws: Sequence[torch.Tensor], ws: Sequence[Any], ids: tuple, lams: tuple, exact: bool,
             backend: str) -> Optional[tuple]:
    """The cache key of a merge_many_ call, or None when it cannot be cached (inference-mode scales: no
    version counter to detect writes)."""
    if not _enabled:
        return None
    per = []
    for W, w in zip(Ws, ws):
        sc, a, b = w.scales, w.a, w.b
        sv = _tensor_version(sc)
        if sv is None:
            return None
        per.append((W.data_ptr(), W.shape, W.stride(), W.dtype, W.device, id(w), w.version, id(sc), sc.data_ptr(),
                    sv, a.data_ptr(), a.stride(), a.dtype, b.data_ptr(), b.stride(), b.dtype))
    return (backend, bool(exact), ids, lams, tuple(per))


def lookup(key: Optional[tuple], ws: Sequence[Any]) -> Optional[PlanEntry]:
    """The cached entry for ``key`` if it is still valid for ``ws`` (same LoRAWeights objects, adapters still
    loaded as when it was planned), else None."""
    if key is None:
        _stats["uncacheable"] += 1
        return None
    e = _cache.get(key)
    if e is not None:
        ok = len(e.wrefs) == len(ws) and all(r() is w for r, w in zip(e.wrefs, ws))
        if ok:
            for w, p in zip(ws, e.plans):
                for j, tok in zip(p["ids"], p["tokens"]):
                    if w._alloc.get(j) is not tok[0] or w._host_ranks.get(j) is not tok[1]:
                        ok = False
                        break
                if not ok:
                    break
        if ok:
            _cache.move_to_end(key)
            _stats["hits"] += 1
            return e
        del _cache[key]
    _stats["misses"] += 1
    return None


def store(entry: PlanEntry) -> None:
    if entry.key is None:
        return
    _cache[entry.key] = entry
    _cache.move_to_end(entry.key)
    while len(_cache) > _MAX_ENTRIES:
        _cache.popitem(last=False)


def discard(entry: PlanEntry) -> None:
    """Remove ``entry`` if it is the one cached under its key (a merge that failed after storing its plan)."""
    if entry.key is not None and _cache.get(entry.key) is entry:
        del _cache[entry.key]


def clear() -> None:
    """Drop every cached plan and reset the counters."""
    _cache.clear()
    for k in _stats:
        _stats[k] = 0


def info() -> dict:
    """``{"hits", "misses", "uncacheable", "entries", "enabled"}``."""
    return dict(_stats, entries=len(_cache), enabled=_enabled)


def set_enabled(enabled: bool) -> bool:
    """Turn the plan cache on or off (off: every call plans from scratch, as before the cache); returns the
    previous setting. Turning it off also clears it."""
    global _enabled
    prev, _enabled = _enabled, bool(enabled)
    if not _enabled:
        clear()
    return prev


# ---- the entry in force for the op call in progress (identity of its terms tensor) -----------------------
class activate:
    """``with activate(entry): torch.ops.lora_kernels.merge_many_(..., entry.terms_t, ...)``: lets the op's
    implementation find the cached tables. Matched by the identity of the terms tensor, so a call with other
    arguments (or traced by torch.compile) plans from scratch."""

    def __init__(self, entry: Optional[PlanEntry]):
        self.entry = entry

    def __enter__(self):
        self.prev = getattr(_local, "entry", None)
        _local.entry = self.entry
        return self.entry

    def __exit__(self, *exc):
        _local.entry = self.prev
        return False


def active(terms: torch.Tensor) -> Optional[PlanEntry]:
    e = getattr(_local, "entry", None)
    return e if e is not None and e.terms_t is terms else None
