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
"""

from __future__ import annotations

import math
import numbers
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .. import backends, reference
from .._validation import FLOAT_DTYPES, check, check_tensor
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


def _run(backend: str, groups, bases: Sequence[int], unmerge: bool, exact: bool, counter: torch.Tensor) -> None:
    """One grouped launch per group of :func:`_tables`, the code column rebased onto this call's buffers."""
    for w_dtype, ab_dtype, jobs, ts, tt, cf, tiles, jsel, _ in groups:
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


def _merge_impl(Ws, a_list, b_list, terms, coefs, exact: bool, backend: str) -> List[torch.Tensor]:
    L = len(Ws)
    entry = merge_plan.active(terms)  # the cached plan of this call (None: plan from scratch)
    terms_list = coefs_list = None
    if entry is not None:
        terms_list, coefs_list = entry.terms_list, entry.coefs_list
    if backend == "reference":
        if terms_list is None:
            terms_list, coefs_list = _split_terms(terms, coefs, L)
        outs = [reference.merge_(W, a, b, t, c, exact) for W, a, b, t, c in zip(Ws, a_list, b_list, terms_list,
                                                                               coefs_list)]
        flat = torch.cat([o[0] for o in outs]) if outs else torch.empty(0, dtype=torch.uint8)
        return [o[0] for o in outs] + [o[1] for o in outs] + [o[2] for o in outs] + [flat]
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
    _run(backend, groups, [code_flat.data_ptr() if code_flat.numel() else 0,
                           bytes_flat.data_ptr() if bytes_flat is not None else 0], False, exact, counter)
    counts = counter.tolist() if exact else [0] * L  # the one host sync of a merge
    codes = list(code_flat.split(sizes))
    if bytes_flat is not None:
        for li in range(L):
            if byte_sizes[li]:
                codes[li].copy_(reference.pack_codes(bytes_flat[b_off[li] : b_off[li] + byte_sizes[li]]))
    e_idx = torch.empty(0, dtype=torch.int64, device=dev)
    e_val: dict = {}
    idxs, vals = [], []
    for li, W in enumerate(Ws):
        if counts[li]:
            if terms_list is None:  # escapes are rare: split the terms only when one needs its delta
                terms_list, coefs_list = _split_terms(terms, coefs, L)
            code = codes[li]
            idx = reference.escape_indices(code, W.numel())
            if idx.numel() != counts[li]:
                raise RuntimeError(f"merge_: internal error: {counts[li]} escapes counted, {idx.numel()} coded")
            flat = W.view(-1)
            v = flat[idx].clone()  # escaped weights were left unwritten: these are the originals
            flat[idx] = _escape_merged_values(W, idx, v, a_list[li], b_list[li], terms_list[li], coefs_list[li])
        else:
            idx = e_idx
            v = e_val.get(W.dtype)
            if v is None:
                v = e_val[W.dtype] = torch.empty(0, dtype=W.dtype, device=dev)
        idxs.append(idx)
        vals.append(v)
    return codes + idxs + vals + [code_flat]


def _unmerge_impl(Ws, a_list, b_list, terms, coefs, codes, idxs, vals, backend: str) -> None:
    entry = merge_plan.active(terms)
    if backend == "reference":
        if entry is not None:
            terms_list, coefs_list = entry.terms_list, entry.coefs_list
        else:
            terms_list, coefs_list = _split_terms(terms, coefs, len(Ws))
        for W, a, b, t, c, code, i, v in zip(Ws, a_list, b_list, terms_list, coefs_list, codes, idxs, vals):
            reference.unmerge_(W, a, b, t, c, code, i, v)
        return
    dev = Ws[0].device
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
    counter = torch.zeros(max(len(Ws), 1), dtype=torch.int32, device=dev)
    _run(backend, groups, [base], True, exact, counter)
    for W, i, v in zip(Ws, idxs, vals):
        if i.numel():
            W.view(-1)[i] = v


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
def _norm_adapters(weights: LoRAWeights, adapters: AdapterArg, lambdas: LambdaArg, name: str = "adapters"):
    if isinstance(adapters, bool) or not isinstance(adapters, (int, Sequence)) or isinstance(adapters, str):
        raise TypeError(f"{name}: expected an int or a sequence of ints, got {type(adapters).__name__}")
    ids = (adapters,) if isinstance(adapters, int) else tuple(adapters)
    check(len(ids) >= 1, name, "at least one adapter id", "an empty sequence")
    for j in ids:
        check(isinstance(j, int) and not isinstance(j, bool) and 0 <= j < weights.max_adapters, name,
              f"ints in [0, {weights.max_adapters}) (weights.max_adapters)", j)
        check(j in weights._alloc, name, "ids of loaded adapters", f"{j} (a free slot)")
    if lambdas is None:
        lams = (1.0,) * len(ids)
    elif isinstance(lambdas, (int, float)) and not isinstance(lambdas, bool):
        check(len(ids) == 1, "lambdas", f"a sequence of {len(ids)} floats (one per adapter)", lambdas)
        lams = (float(lambdas),)
    else:
        # float("1") would silently accept strings (and merge_ once turned "1" into ("1",)): numbers only.
        ok = not isinstance(lambdas, (str, bytes)) and isinstance(lambdas, Sequence) and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in lambdas)
        check(ok, "lambdas", "None, a float or a sequence of floats", repr(lambdas)[:80], TypeError)
        lams = tuple(float(v) for v in lambdas)
        check(len(lams) == len(ids), "lambdas", f"{len(ids)} floats (one per adapter)", f"{len(lams)} values")
    check(all(math.isfinite(v) for v in lams), "lambdas", "finite floats", lams)
    return ids, lams


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
    if W.data_ptr() != rec.data_ptr or W.dtype != rec.dtype or W.shape != rec.shape or W.device != rec.device:
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
            (the write happens under no_grad).
        weights: the layer's :class:`~lora_kernels.LoRAWeights`.
        adapters: one loaded adapter id, or a sequence of them (mixed ranks allowed).
        lambdas: one float per adapter (default 1), finite.
        exact: keep the side data for a bit-exact unmerge.

    Returns:
        :class:`MergeRecord` (``escapes``: how many weights needed the escape list).

    Raises:
        TypeError / ValueError naming the argument (W's shape/dtype/device/layout, ids out of range or free
        slots, lambdas of the wrong length or non-finite): W is unchanged when it raises.
        Syncs with the host once (escape count; scales).
    """
    return merge_many_([W], [weights], adapters, None if lambdas is None else _as_lams(lambdas), exact=exact,
                       _single=True)[0]


def _as_lams(lambdas):
    if isinstance(lambdas, (int, float, str, bytes)) and not isinstance(lambdas, bool):
        return lambdas  # (a str is refused by _norm_adapters, naming lambdas)
    return tuple(lambdas) if isinstance(lambdas, Iterable) else lambdas


def merge_many_(
    Ws: Sequence[torch.Tensor], weights: Sequence[LoRAWeights], adapters: AdapterArg, lambdas: LambdaArg = None,
    *, exact: bool = True, _single: bool = False,
) -> List[MergeRecord]:
    """:func:`merge_` for many layers (e.g. every projection of a model) in one grouped launch.

    Args:
        Ws: the layers' weights; ``weights``: their LoRAWeights (same length); ``adapters`` / ``lambdas``: as in
            :func:`merge_`, applied to every layer (each must hold the adapters). All on one device.

    Returns: one :class:`MergeRecord` per layer, in order. Raises as :func:`merge_` (``Ws[i]`` named), before
    any layer is written. Layers must be distinct tensors.
    """
    Ws, ws = list(Ws), list(weights)
    check(len(Ws) == len(ws), "weights", f"{len(Ws)} LoRAWeights (one per W)", len(ws))
    for i, w in enumerate(ws):
        check(isinstance(w, LoRAWeights), f"weights[{i}]", "a LoRAWeights", type(w).__name__, TypeError)
    if not Ws:
        return []
    # The host plan (validation, scales, terms, device tables) is cached per (layers, adapters, lambdas):
    # see lora_kernels.ops.merge_plan for the key and what invalidates it.
    entry, key, backend = None, None, None
    al = _cache_ids(adapters, lambdas)
    if al is not None and all(isinstance(W, torch.Tensor) for W in Ws):
        backend = _select(Ws[0].device)
        key = merge_plan.plan_key(Ws, ws, al[0], al[1], exact, backend)
        entry = merge_plan.lookup(key, ws)
    if entry is None:
        entry, backend = _plan_many(Ws, ws, adapters, lambdas, exact, _single, key)
    plans = entry.plans
    with torch.no_grad(), merge_plan.activate(entry):
        terms, coefs = entry.terms_t, entry.coefs_t
        if _single:
            outs = list(torch.ops.lora_kernels.merge_(Ws[0], ws[0].a, ws[0].b, terms, coefs, exact, backend))
        else:
            code, idx, vb, counts = torch.ops.lora_kernels.merge_many_(
                Ws, [w.a for w in ws], [w.b for w in ws], terms, coefs, exact, backend)
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
            outs = list(code.split(entry.sizes)) + idxs + vals
    L = len(Ws)
    tmpl = entry.records
    if tmpl is None:  # the fields every record of this plan shares with the next one (the key fixes them)
        tmpl = entry.records = [dict(vars(MergeRecord(
            shape=tuple(W.shape), dtype=W.dtype, device=W.device, data_ptr=W.data_ptr(), version=None,
            adapters=p["ids"], lambdas=p["lams"], ranks=p["ranks"], offsets=p["offsets"], scales=p["scales"],
            exact=bool(exact), backend=backend, code=None, escape_idx=None, escape_val=None, escapes=0,
            _terms=p["terms"], _coefs=p["coefs"], _tokens=p["tokens"], _plan=entry, _gidx=i,
        ))) for i, (W, p) in enumerate(zip(Ws, plans))]  # (no LoRAWeights here: the cache holds them weakly)
    recs = []
    for i, (W, w) in enumerate(zip(Ws, ws)):
        idx = outs[L + i]
        r = MergeRecord.__new__(MergeRecord)  # (the dataclass __init__ of 24 fields costs ~2 us a layer)
        d = r.__dict__
        d.update(tmpl[i])
        d.update(version=_version(W), code=outs[i], escape_idx=idx, escape_val=outs[2 * L + i],
                 escapes=idx.numel(), _weights=w, _a=w.a, _b=w.b)
        recs.append(r)
    if exact:
        bad = _merged_nonfinite(recs, Ws)
        if bad:
            warnings.warn(f"merge_: {bad} finite weights became NaN/Inf (non-finite adapter weights or overflow); "
                          "unmerge_ restores them exactly from the escape list", RuntimeWarning, stacklevel=2)
    return recs


def _cache_ids(adapters: AdapterArg, lambdas: LambdaArg):
    """``(ids, lambdas)`` as they key the plan cache, or None when they are not plain ints / floats (the
    uncached path then validates and raises). Signed zeros are kept apart (-0.0 and 0.0 give different W)."""
    if isinstance(adapters, int) and not isinstance(adapters, bool):
        ids = (adapters,)
    elif isinstance(adapters, (list, tuple)) and all(type(j) is int for j in adapters):
        ids = tuple(adapters)
    else:
        return None
    if lambdas is None:
        lams: Tuple[Any, ...] = (None,)
    elif type(lambdas) in (int, float):
        lams = ((float(lambdas), math.copysign(1.0, lambdas)),)
    elif isinstance(lambdas, (list, tuple)) and all(type(v) in (int, float) for v in lambdas):
        lams = tuple((float(v), math.copysign(1.0, v)) for v in lambdas)
    else:
        return None
    return ids, lams


def _plan_many(Ws, ws, adapters, lambdas, exact, _single, key):
    """Validate every layer and plan the call from scratch (the uncached path). Returns ``(entry, backend)``;
    the entry is stored in the plan cache when ``key`` is not None."""
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
    fast = _plan_fast(Ws, ws, adapters, lambdas, flat, off)
    if fast is not None:
        plans, terms, coefs = fast
    else:  # a cheap check failed somewhere: the per-layer path names the argument (and raises), or plans it
        host = {id(w): flat[off[id(w)] : off[id(w)] + w.scales.numel()] for w in ws}
        plans = []
        for i, (W, w) in enumerate(zip(Ws, ws)):
            plans.append(_plan(W, w, adapters, lambdas, "W" if _single else f"Ws[{i}]", host[id(w)]))
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
    backend = _select(dev)
    entry = merge_plan.PlanEntry(key, ws, plans, terms, coefs, merge_plan.layer_sizes(Ws, exact))
    if key is not None and key[0] == backend:
        merge_plan.store(entry)
    return entry, backend


def unmerge_(W: torch.Tensor, record: MergeRecord) -> torch.Tensor:
    """Undo the :func:`merge_` that returned ``record``: W bit-exactly as before it (``exact``), or
    ``rnd(W - delta)`` (approximate record). Returns W.

    Raises:
        TypeError / ValueError naming ``record`` when it does not belong to W (shape, dtype, device, data
        pointer, or W modified since: version), was already used, or its adapter slot was removed/reloaded
        since the merge. W is unchanged when it raises. No host sync.
    """
    unmerge_many_([W], [record], _single=True)
    return W


def unmerge_many_(Ws: Sequence[torch.Tensor], records: Sequence[MergeRecord], *, _single: bool = False) -> None:
    """:func:`unmerge_` for many layers in one grouped launch (records from :func:`merge_many_` or
    :func:`merge_`; all of one backend and device). Every record is checked before any layer is written."""
    Ws, recs = list(Ws), list(records)
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
    with torch.no_grad(), merge_plan.activate(entry):
        if _single:
            r = recs[0]
            torch.ops.lora_kernels.unmerge_(Ws[0], r._a, r._b, terms, coefs, r.code, r.escape_idx, r.escape_val,
                                            backend)
        else:
            torch.ops.lora_kernels.unmerge_many_(Ws, [r._a for r in recs], [r._b for r in recs], terms, coefs,
                                                 [r.code for r in recs], [r.escape_idx for r in recs],
                                                 [r.escape_val for r in recs], backend)
    for r in recs:
        r.used = True
