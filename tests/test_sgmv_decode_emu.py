"""The decode LoRA kernel of csrc/kernels/sgmv_decode.cuh on a CPU emulation (tests/sgmv_decode_emu.cpp, the .cuh
compiled unchanged by g++ with fibers for threads, warp shuffles and block barriers), against the fp32 spec
lora_kernels.reference.add_lora_ (and, in mixed mode, lora_kernels.ops.sgmv._reference_mixed_), with the tolerance
rule of tests/helpers.py (base = y0: a kernel adding no delta, or the delta twice, fails).

Every one of the 54 kernel instantiations (x / weights / y dtype in fp16, bf16, fp32, each independently; 16-byte
vector variant and scalar fallback) runs at least once. Besides the numbers, each run checks: entries the op must
not write (tokens with -1, rank-0 slices, mixed mode's tokens of the merged adapter and slices where both ranks are
0, padding columns around a y view) keep their bits; the counters are back to 0; a second launch (blocks in
reverse order: another chunk finishes last, counters as the first launch left them) gives the same bits; the host's
vector / fallback choice (sgmv_decode_can_vectorize) is the expected one. Adapter rows are rank-paged with NaN rows
between adapters, the workspace starts as NaN and the emulator bounds-checks every access, so reading a padded rank,
an unwritten partial or anything out of range shows.

A last test compiles every instantiation for sm_80 and sm_90a with nvcc (-Xptxas -v) and checks registers / spills.
"""

from __future__ import annotations

import copy
import itertools
import math
import subprocess
import types

import pytest
import torch
from helpers import (assert_close_rule, bits, build_emulator, check_ptxas_budget, lowp_expand_, lowp_shrink,
                     whole_storage)

from lora_kernels import reference
from lora_kernels.ops.sgmv import _reference_mixed_

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
_KIND = {F16: 0, BF16: 1, F32: 2}
_CHUNK = 256  # kSgmvChunk
_REG_BUDGET = 128  # registers per thread allowed for every variant (128 threads per block: no occupancy cliff)


@pytest.fixture(scope="module")
def emu_binary(tmp_path_factory):
    """The kernel compiled by the host compiler with the emulation (see the .cpp)."""
    return build_emulator(tmp_path_factory, "sgmv_decode_emu.cpp")


# ---- problems ----------------------------------------------------------------------------------------------------
def _problem(T, in_f, outs, ranks, dts, *, seed, frac_none=0.25, view=False):
    """Weights (a namespace with the LoRAWeights fields the references read), ids, x and y0.

    ranks: per adapter, one rank per slice. Adapter rows are rank-paged in reverse id order with 2 NaN rows
    between adapters (R = sum of the adapters' largest ranks + gaps). view=True: x, y, a, b are column-offset views
    of wider storages (x starts 1 element in, y 3, a and b have padded rows), so no pointer / stride is 16-byte
    aligned and the kernel must take the scalar fallback; the padding is NaN (x, a, b) or sentinels (y)."""
    x_dt, w_dt, y_dt = dts
    g = torch.Generator().manual_seed(seed)
    S, N = len(outs), len(ranks)
    rk = torch.tensor([[r[s] for r in ranks] for s in range(S)], dtype=torch.int32)
    offsets, row = [0] * N, 2
    for i in reversed(range(N)):
        offsets[i] = row
        row += int(rk[:, i].max()) + 2
    R, total = row, sum(outs)
    cols = [sum(outs[:s]) for s in range(S)]
    pad = 3 if view else 0
    a = torch.full((S, R, in_f + pad), float("nan"), dtype=w_dt)[..., :in_f]
    b = torch.full((R, total + pad), float("nan"), dtype=w_dt)[:, :total]
    for i in range(N):
        o = offsets[i]
        for s in range(S):
            # rows past this slice's rank stay NaN: the kernel must loop to r, never to the adapter's largest rank
            r = int(rk[s, i])
            a[s, o : o + r] = (torch.randn(r, in_f, generator=g) / in_f**0.5).to(w_dt)
            b[o : o + r, cols[s] : cols[s] + outs[s]] = (torch.randn(r, outs[s], generator=g) / max(r, 1) ** 0.5).to(
                w_dt)
    scales = (0.5 + 1.5 * torch.rand(S, N, generator=g)).float()
    w = types.SimpleNamespace(a=a, b=b, offsets=torch.tensor(offsets, dtype=torch.int64), ranks=rk, scales=scales,
                              slice_cols=tuple(cols), slice_outs=tuple(outs), num_slices=S,
                              max_rank=max(1, int(rk.max())))
    ids = torch.randint(0, N, (T,), generator=g, dtype=torch.int32)
    ids[torch.rand(T, generator=g) < frac_none] = -1
    xo, yo = (1, 3) if view else (0, 0)
    x = torch.full((T, in_f + xo + pad), float("nan"), dtype=x_dt)[:, xo : xo + in_f]
    x.copy_(torch.randn(T, in_f, generator=g).to(x_dt))
    y0 = torch.full((T, total + yo + pad), 1234.0, dtype=y_dt)[:, yo : yo + total]
    y0.copy_(torch.randn(T, total, generator=g).to(y_dt))
    return w, ids, x, y0


def _emulate(exe, tmp_path, w, ids, x, y0, merged):
    """Runs the emulator; returns (y after launch 1, y after launch 2, their full storages, counters, vectorized,
    chunks). y0 is not modified."""
    T, in_f = x.shape
    S, N = w.ranks.shape
    parts = {"x": x, "y": y0, "a": w.a, "b": w.b}
    for k, t in parts.items():
        assert t.stride(-1) == 1, k
    hdr = [_KIND[x.dtype], _KIND[w.a.dtype], _KIND[y0.dtype], T, S, N, in_f, int(w.ranks.max()) if N else 0,
           -1 if merged is None else merged,
           whole_storage(x).numel(), x.storage_offset(), x.stride(0),
           whole_storage(y0).numel(), y0.storage_offset(), y0.stride(0),
           whole_storage(w.a).numel(), w.a.storage_offset(), w.a.stride(0), w.a.stride(1),
           whole_storage(w.b).numel(), w.b.storage_offset(), w.b.stride(0)]
    blobs = [torch.tensor(hdr, dtype=torch.int64), torch.tensor(w.slice_cols, dtype=torch.int64),
             torch.tensor(w.slice_outs, dtype=torch.int64), w.offsets, w.ranks.int(), w.scales.float(),
             ids.int()] + [whole_storage(t) for t in parts.values()]
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in blobs))
    r = subprocess.run([exe, str(src), str(dst)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    raw = bytearray(dst.read_bytes())
    ys = whole_storage(y0)
    nb = ys.numel() * ys.element_size()
    stores = [torch.frombuffer(raw[k * nb : (k + 1) * nb], dtype=torch.uint8).view(y0.dtype).clone() for k in (0, 1)]
    views = [s.as_strided(y0.shape, y0.stride(), y0.storage_offset()) for s in stores]
    pos = 2 * nb
    counters = torch.frombuffer(raw[pos : pos + 4 * T * S], dtype=torch.int32).clone()
    pos += 4 * T * S
    vec, chunks = torch.frombuffer(raw[pos:], dtype=torch.int64).tolist()
    return views, stores, counters, bool(vec), chunks


# ---- the yardsticks ----------------------------------------------------------------------------------------------
def _touched(w, ids, merged) -> torch.Tensor:
    """bool [T, sum(out)]: the entries the op writes (everything else must keep its bits)."""
    T = ids.numel()
    tok = ids.long()
    own = torch.where(tok[None, :] >= 0, w.ranks[:, tok.clamp(min=0)], torch.zeros(1, dtype=torch.int32))  # [S, T]
    if merged is None:
        hit = own > 0
    else:
        hit = ((own > 0) | (w.ranks[:, merged : merged + 1] > 0)) & (tok != merged)[None, :]
    out = torch.zeros(T, sum(w.slice_outs), dtype=torch.bool)
    for s, (c0, n) in enumerate(zip(w.slice_cols, w.slice_outs)):
        out[:, c0 : c0 + n] = hit[s][:, None]
    return out


def _reference(w, ids, x, y0, merged) -> torch.Tensor:
    """The fp32 spec, into a copy of y0 (y0 stays the baseline)."""
    y = y0.to(F32, copy=True)
    args = (x, w.a, w.b, w.offsets, w.ranks, w.scales, ids, w.slice_cols, w.slice_outs)
    if merged is None:
        return reference.add_lora_(y, *args)
    return _reference_mixed_(y, *args, merged)


def _lowp(w, ids, x, y0, merged):
    """PyTorch at low precision (x's dtype for the shrink, y's for the expand); mixed mode as two such updates
    (the own adapters with m's tokens as -1, then m with negated scales)."""
    x_dt, y_dt = x.dtype, y0.dtype

    def add(y, ids_, w_):
        lowp_expand_(y, lowp_shrink(x, w_, ids_, w_.max_rank, x_dt), w_, ids_, y_dt)

    y = y0.clone()
    if merged is None:
        add(y, ids, w)
        return y
    none = torch.full_like(ids, -1)
    add(y, torch.where(ids == merged, none, ids), w)
    neg = copy.copy(w)
    neg.scales = -w.scales
    add(y, torch.where(ids == merged, none, torch.full_like(ids, merged)), neg)
    return y


def _run_and_check(exe, tmp_path, w, ids, x, y0, merged, *, expect_vec, name):
    (y, y2), (st1, _), counters, vec, chunks = _emulate(exe, tmp_path, w, ids, x, y0, merged)
    assert vec == expect_vec, f"{name}: host chose vectorized={vec}, expected {expect_vec}"
    assert chunks == math.ceil(x.shape[1] / _CHUNK), name
    assert torch.equal(counters, torch.zeros_like(counters)), f"{name}: counters not reset: {counters.tolist()}"
    assert torch.equal(bits(y), bits(y2)), f"{name}: second launch (reverse block order) gave other bits"
    # storage outside the view (padding columns) untouched
    mask = torch.ones(st1.numel(), dtype=torch.bool)
    inside = y.storage_offset() + torch.arange(y.shape[0])[:, None] * y.stride(0) + torch.arange(y.shape[1])[None, :]
    mask[inside.flatten()] = False
    assert torch.equal(bits(st1[mask]), bits(whole_storage(y0)[mask])), f"{name}: wrote outside the y view"
    keep = ~_touched(w, ids, merged)
    assert torch.equal(bits(y[keep]), bits(y0[keep])), f"{name}: entries the op must not write changed"
    ref = _reference(w, ids, x, y0, merged)
    if bool(keep.all()):
        return
    low = _lowp(w, ids, x, y0, merged)
    low_dt = x.dtype if x.dtype != F32 else y0.dtype
    assert_close_rule(y.contiguous(), ref, low.contiguous(), dtype=low_dt, name=name, base=y0.contiguous())


# ---- every instantiation -----------------------------------------------------------------------------------------
_DTS = [F16, BF16, F32]
_COMBOS = list(itertools.product(_DTS, _DTS, _DTS))


@pytest.mark.parametrize("view", [False, True], ids=["vec16", "fallback"])
@pytest.mark.parametrize("dts", _COMBOS, ids=["x%s-w%s-y%s" % tuple(str(d)[6:] for d in c) for c in _COMBOS])
def test_every_instantiation(emu_binary, tmp_path, dts, view):
    """All 27 dtype combinations, vector variant (aligned storage) and scalar fallback (column-offset views):
    2 chunks (the second partial), 2 unequal slices, ranks incl. 0 per slice, -1 tokens; mixed mode in half."""
    k = _COMBOS.index(dts)
    w, ids, x, y0 = _problem(4, 264, (16, 40), [(3, 5), (0, 2), (7, 0)], dts, seed=k + 100 * view, view=view)
    ids[:4] = torch.tensor([0, -1, 2, 1], dtype=torch.int32)
    merged = 1 if k % 2 else None
    _run_and_check(emu_binary, tmp_path, w, ids, x, y0, merged, expect_vec=not view, name=f"{dts} view={view}")


# ---- shapes ------------------------------------------------------------------------------------------------------
_RANKS6 = [(128, 64, 1), (16, 0, 8), (1, 1, 1), (33, 7, 0), (0, 0, 0), (64, 128, 16)]
CASES = [  # (name, T, in, outs, ranks, dtypes, merged, view, expect_vec)
    ("T64 S3 fp16", 64, 512, (64, 32, 48), _RANKS6, (F16, F16, F16), None, False, True),
    ("T64 S3 bf16 mixed", 64, 264, (64, 32, 48), _RANKS6, (BF16, BF16, BF16), 5, False, True),
    ("T5 odd in/out fp32 mixed", 5, 100, (36, 100, 20), _RANKS6, (F32, F16, F32), 0, False, False),
    ("T5 in 72 odd out", 5, 72, (72, 13), [(4, 2), (9, 3)], (F16, BF16, F16), None, False, False),
    ("T1 4 chunks rank 128", 1, 1000, (72,), [(128,), (5,)], (F16, F16, F16), None, False, True),
    ("T5 unaligned views mixed", 5, 256, (64, 32), [(8, 4), (16, 0), (0, 0)], (BF16, BF16, F32), 1, True, False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_shapes(emu_binary, tmp_path, case):
    """T in {1, 5, 64}, S = 1 / 2 / 3 unequal slices, ranks 1..128 mixed across adapters and slices incl. 0, odd
    in / out (scalar fallback), unaligned views, mixed mode with a merged adapter of rank 128."""
    name, T, in_f, outs, ranks, dts, merged, view, expect_vec = case
    w, ids, x, y0 = _problem(T, in_f, outs, ranks, dts, seed=CASES.index(case), view=view)
    if T == 1:
        ids[0] = 0
    _run_and_check(emu_binary, tmp_path, w, ids, x, y0, merged, expect_vec=expect_vec, name=name)


@pytest.mark.parametrize("merged", [None, 0])
def test_nothing_to_do(emu_binary, tmp_path, merged):
    """T = 1 with its token -1 (plain) or of the merged adapter (mixed): y keeps every bit, counters stay 0."""
    w, ids, x, y0 = _problem(1, 264, (16, 8), [(4, 2), (3, 3)], (F16, F16, F16), seed=7)
    ids[0] = -1 if merged is None else merged
    (y, y2), _, counters, _, _ = _emulate(emu_binary, tmp_path, w, ids, x, y0, merged)
    assert torch.equal(bits(y), bits(y0)) and torch.equal(bits(y2), bits(y0))
    assert torch.equal(counters, torch.zeros_like(counters))


# ---- nvcc: registers / spills / shared memory per variant --------------------------------------------------------
_CT = {F16: "__half", BF16: "__nv_bfloat16", F32: "float"}


def test_nvcc_resource_usage(tmp_path):
    """Every instantiation compiled for sm_80 and sm_90a: no spills, registers <= _REG_BUDGET; prints the table."""
    lines = ['#include "kernels/sgmv_decode.cuh"']
    for (tx, tw, ty), vec in itertools.product(_COMBOS, (True, False)):
        lines.append(f"template __global__ void lora_kernels::sgmv_decode_kernel<{_CT[tx]}, {_CT[tw]}, {_CT[ty]}, "
                     f"{str(vec).lower()}>(const lora_kernels::SgmvDecodeParams);")
    check_ptxas_budget(tmp_path, "\n".join(lines), expected=2 * 54, reg_budget=_REG_BUDGET)
