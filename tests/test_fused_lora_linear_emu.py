"""The fused decode LoRA linear of csrc/kernels/fused_lora_linear.cuh (y = x @ W0^T + bias + delta in one launch) on
a CPU emulation (tests/fused_lora_linear_emu.cpp: the .cuh compiled unchanged by g++, fibers for threads, warp
shuffles and block barriers), against the fp32 spec: base = x.float() @ W0.float().T + bias.float(), delta from
lora_kernels.reference.add_lora_ (mixed mode: lora_kernels.ops.sgmv._reference_mixed_) on an fp32 zero base,
y = rnd(base + delta).

Every one of the 18 kernel instantiations (x / y dtype and weight dtype in fp16, bf16, fp32; 16-byte vector variant
and scalar fallback) runs at least once. Besides the numbers, each run checks: y is fully written (it starts as NaN)
and nothing outside the y view changes; entries without a delta (tokens with -1, rank-0 slices, mixed mode's tokens
of the merged adapter) have exactly the bits of the kernel's plain-GEMV path (the same problem with every token -1);
the counters are back to 0; three launches with different block orders (grid order, reverse, shuffled: the
h-finisher / tile handshake goes both ways) give the same bits; the host's vector / fallback choice is the expected
one. Adapter rows are rank-paged with NaN rows between adapters, the workspace starts as NaN and the emulator
bounds-checks every access, so reading a padded rank, an unwritten partial or anything out of range shows.

A last test compiles every instantiation for sm_80 and sm_90a with nvcc (-Xptxas -v) and checks registers / spills.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import types

import pytest
import torch
from helpers import bits, build_emulator, check_ptxas_budget, whole_storage

from lora_kernels import reference
from lora_kernels.ops.sgmv import _reference_mixed_

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
_KIND = {F16: 0, BF16: 1, F32: 2}
_UNIT = {F16: 2.0**-11, BF16: 2.0**-8, F32: 2.0**-24}  # unit roundoff
_CHUNK, _TILE = 256, 8  # kFllChunk, kFllTile
_REG_BUDGET = 128  # registers per thread for every variant (128 threads per block: no occupancy cliff)


@pytest.fixture(scope="module")
def emu_binary(tmp_path_factory):
    """The kernel compiled by the host compiler with the emulation (see the .cpp)."""
    return build_emulator(tmp_path_factory, "fused_lora_linear_emu.cpp")


# ---- problems ----------------------------------------------------------------------------------------------------
def _problem(T, in_f, outs, ranks, dts, *, seed, bias=True, frac_none=0.25, view=False):
    """(layer, weights, ids, x, y0): layer has w0 [out, in] and bias [out] (or None), weights the LoRAWeights fields
    the references read, y0 the y buffer (NaN inside the view: the kernel must write every element).

    ranks: per adapter, one rank per slice. Adapter rows are rank-paged in reverse id order with 2 NaN rows between
    adapters. view=True: x, W0, a, b are column-offset / padded views (x starts 1 element in, W0 and a have 3
    padding columns), so no row stride is 16-byte aligned and the kernel must take the scalar fallback; the padding
    is NaN (x, W0, a, b) or a sentinel (y, which starts 3 elements in)."""
    a_dt, w_dt = dts
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
            r = int(rk[s, i])  # rows past this slice's rank stay NaN: the kernel must loop to r
            a[s, o : o + r] = (torch.randn(r, in_f, generator=g) / in_f**0.5).to(w_dt)
            b[o : o + r, cols[s] : cols[s] + outs[s]] = (torch.randn(r, outs[s], generator=g) / max(r, 1) ** 0.5).to(
                w_dt)
    scales = (0.5 + 1.5 * torch.rand(S, N, generator=g)).float()
    w = types.SimpleNamespace(a=a, b=b, offsets=torch.tensor(offsets, dtype=torch.int64), ranks=rk, scales=scales,
                              slice_cols=tuple(cols), slice_outs=tuple(outs), num_slices=S)
    w0 = torch.full((total, in_f + pad), float("nan"), dtype=w_dt)[:, :in_f]
    w0.copy_((torch.randn(total, in_f, generator=g) / in_f**0.5).to(w_dt))
    layer = types.SimpleNamespace(w0=w0, bias=torch.randn(total, generator=g).to(w_dt) if bias else None)
    ids = torch.randint(0, N, (T,), generator=g, dtype=torch.int32)
    ids[torch.rand(T, generator=g) < frac_none] = -1
    xo, yo = (1, 3) if view else (0, 0)
    x = torch.full((T, in_f + xo + pad), float("nan"), dtype=a_dt)[:, xo : xo + in_f]
    x.copy_(torch.randn(T, in_f, generator=g).to(a_dt))
    y0 = torch.full((T, total + yo + pad), 1234.0, dtype=a_dt)[:, yo : yo + total]
    y0.fill_(float("nan"))
    return layer, w, ids, x, y0


def _emulate(exe, tmp_path, layer, w, ids, x, y0, merged):
    """Runs the emulator; returns (y of the 3 launches, the storage of launch 1, counters, vectorized, tiles,
    chunks). y0 is not modified."""
    T, in_f = x.shape
    S, N = w.ranks.shape
    out = layer.w0.shape[0]
    parts = {"x": x, "y": y0, "w0": layer.w0, "a": w.a, "b": w.b}
    for k, t in parts.items():
        assert t.stride(-1) == 1, k
    hdr = [_KIND[x.dtype], _KIND[w.a.dtype], T, S, N, in_f, out, int(w.ranks.max()) if N else 0,
           -1 if merged is None else merged, int(layer.bias is not None),
           whole_storage(x).numel(), x.storage_offset(), x.stride(0),
           whole_storage(y0).numel(), y0.storage_offset(), y0.stride(0),
           whole_storage(layer.w0).numel(), layer.w0.storage_offset(), layer.w0.stride(0),
           whole_storage(w.a).numel(), w.a.storage_offset(), w.a.stride(0), w.a.stride(1),
           whole_storage(w.b).numel(), w.b.storage_offset(), w.b.stride(0)]
    stores = [whole_storage(x), whole_storage(y0), whole_storage(layer.w0)]
    stores += [layer.bias.contiguous()] if layer.bias is not None else []
    stores += [whole_storage(w.a), whole_storage(w.b)]
    blobs = [torch.tensor(hdr, dtype=torch.int64), torch.tensor(w.slice_cols, dtype=torch.int64),
             torch.tensor(w.slice_outs, dtype=torch.int64), w.offsets, w.ranks.int(), w.scales.float(),
             ids.int()] + stores
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in blobs))
    r = subprocess.run([exe, str(src), str(dst)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    raw = bytearray(dst.read_bytes())
    ys = whole_storage(y0)
    nb = ys.numel() * ys.element_size()
    outs = [torch.frombuffer(raw[k * nb : (k + 1) * nb], dtype=torch.uint8).view(y0.dtype).clone() for k in range(3)]
    views = [s.as_strided(y0.shape, y0.stride(), y0.storage_offset()) for s in outs]
    pos = 3 * nb
    tiles = math.ceil(out / _TILE)
    counters = torch.frombuffer(raw[pos : pos + 4 * (1 + tiles)], dtype=torch.int32).clone()
    pos += 4 * (1 + tiles)
    vec, tiles_k, chunks = torch.frombuffer(raw[pos:], dtype=torch.int64).tolist()
    assert tiles_k == tiles
    return views, outs[0], counters, bool(vec), chunks


# ---- the yardsticks ----------------------------------------------------------------------------------------------
def _touched(w, ids, merged) -> torch.Tensor:
    """bool [T, out]: the entries that get a delta (the others are the plain GEMV, bit for bit)."""
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


def _reference(layer, w, ids, x, merged):
    """(base, delta), both fp32 [T, out]: the spec of y = rnd(base + delta)."""
    base = x.float() @ layer.w0.float().T
    if layer.bias is not None:
        base = base + layer.bias.float()
    d = torch.zeros_like(base)
    args = (x, w.a, w.b, w.offsets, w.ranks, w.scales, ids, w.slice_cols, w.slice_outs)
    if merged is None:
        reference.add_lora_(d, *args)
    else:
        _reference_mixed_(d, *args, merged)
    return base, d


def _check_close(y, base, delta, name):
    """|y - (base + delta)| <= u |ref| (the one rounding) + 4 u max|delta| (h rounded to y's dtype, as sgmv_decode)
    + 2e-6 max|ref| (fp32 summation order): u the unit roundoff of y's dtype. The bound must be below half the
    delta (a kernel without the delta, or with it twice, fails)."""
    ref = (base + delta).double()
    u = _UNIT[y.dtype]
    dmax = delta.abs().max().item()
    tol = u * ref.abs() + 4 * u * dmax + 2e-6 * ref.abs().max().item()
    err = (y.double() - ref).abs()
    assert torch.isfinite(y).all(), f"{name}: non-finite output (an element not written?)"
    worst = (err - tol).max().item()
    assert worst <= 0, f"{name}: error {err.max().item():.3g} over the bound (by {worst:.3g}), max|delta| {dmax:.3g}"
    if dmax > 0:
        assert tol.max().item() < 0.5 * dmax, f"{name}: test cannot tell a missing delta (bound {tol.max().item()})"


def _run_and_check(exe, tmp_path, layer, w, ids, x, y0, merged, *, expect_vec, name):
    (y, y2, y3), st1, counters, vec, chunks = _emulate(exe, tmp_path, layer, w, ids, x, y0, merged)
    assert vec == expect_vec, f"{name}: host chose vectorized={vec}, expected {expect_vec}"
    assert chunks == math.ceil(x.shape[1] / _CHUNK), name
    assert torch.equal(counters, torch.zeros_like(counters)), f"{name}: counters not reset: {counters.tolist()}"
    assert torch.equal(bits(y), bits(y2)), f"{name}: reverse block order gave other bits"
    assert torch.equal(bits(y), bits(y3)), f"{name}: shuffled block order gave other bits"
    mask = torch.ones(st1.numel(), dtype=torch.bool)
    inside = y.storage_offset() + torch.arange(y.shape[0])[:, None] * y.stride(0) + torch.arange(y.shape[1])[None, :]
    mask[inside.flatten()] = False
    assert torch.equal(bits(st1[mask]), bits(whole_storage(y0)[mask])), f"{name}: wrote outside the y view"
    base, delta = _reference(layer, w, ids, x, merged)
    _check_close(y, base, delta, name)
    # entries without a delta: exactly the plain-GEMV path's bits (same problem, every token -1, no mixed mode)
    (yb, _, _), _, cb, _, _ = _emulate(exe, tmp_path, layer, w, torch.full_like(ids, -1), x, y0, None)
    assert torch.equal(cb, torch.zeros_like(cb)), f"{name}: plain GEMV touched the counters"
    _check_close(yb, base, torch.zeros_like(base), name + " (plain GEMV)")
    keep = ~_touched(w, ids, merged)
    assert torch.equal(bits(y[keep]), bits(yb[keep])), f"{name}: entries without a delta differ from the GEMV"
    assert not bool(keep.all()), f"{name}: the case has no delta at all"


# ---- every instantiation -----------------------------------------------------------------------------------------
_DTS = [F16, BF16, F32]
_COMBOS = list(itertools.product(_DTS, _DTS))


@pytest.mark.parametrize("view", [False, True], ids=["vec16", "fallback"])
@pytest.mark.parametrize("dts", _COMBOS, ids=["a%s-w%s" % tuple(str(d)[6:] for d in c) for c in _COMBOS])
def test_every_instantiation(emu_binary, tmp_path, dts, view):
    """All 9 dtype combinations (x / y, weights), vector variant (aligned storage) and scalar fallback (padded
    views): 2 chunks, 2 unequal slices, ranks incl. 0 per slice, -1 tokens; bias and mixed mode in turn."""
    k = _COMBOS.index(dts)
    layer, w, ids, x, y0 = _problem(4, 264, (16, 40), [(3, 5), (0, 2), (7, 0)], dts, seed=k + 100 * view,
                                    bias=k % 2 == 0, view=view)
    ids[:4] = torch.tensor([0, -1, 2, 1], dtype=torch.int32)
    merged = 1 if (k + view) % 2 else None
    _run_and_check(emu_binary, tmp_path, layer, w, ids, x, y0, merged, expect_vec=not view, name=f"{dts} view={view}")


# ---- shapes ------------------------------------------------------------------------------------------------------
_RANKS6 = [(128, 64, 1), (16, 0, 8), (1, 1, 1), (33, 7, 0), (0, 0, 0), (64, 128, 16)]
CASES = [  # (name, T, in, outs, ranks, dtypes (x / y, weights), bias, merged, view, expect_vec)
    ("T16 S3 fp16 bias", 16, 512, (64, 32, 48), _RANKS6, (F16, F16), True, None, False, True),
    ("T16 S3 bf16 mixed", 16, 264, (64, 32, 48), _RANKS6, (BF16, BF16), False, 5, False, True),
    ("T16 S1 fp32 4 chunks", 16, 1000, (72,), [(128,), (5,), (0,)], (F32, F32), True, None, False, True),
    ("T4 S1 fp16 mixed", 4, 256, (40,), [(8,), (2,), (0,)], (F16, F16), False, 1, False, True),
    ("T4 odd in/out fp32 mixed", 4, 100, (37, 11, 20), _RANKS6, (F32, F16), True, 0, False, False),
    ("T1 S3 odd out", 1, 264, (13, 8, 3), [(4, 2, 1), (9, 3, 0)], (BF16, BF16), True, None, False, True),
    ("T1 chunks > tiles", 1, 1000, (12,), [(32,), (5,)], (F16, F16), False, None, False, True),
    ("T20 two token groups", 20, 264, (24, 16), [(16, 8), (0, 4), (2, 2)], (F16, BF16), True, 2, False, True),
    ("T16 unaligned views", 16, 256, (64, 32), [(8, 4), (16, 0), (0, 0)], (BF16, BF16), True, 1, True, False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_shapes(emu_binary, tmp_path, case):
    """T in {1, 4, 16, 20}, S = 1 / 2 / 3 unequal slices, ranks 1..128 mixed across adapters and slices incl. 0, odd
    in / out (scalar fallback; a partial last tile), more shrink units than tiles, unaligned views, mixed mode."""
    name, T, in_f, outs, ranks, dts, bias, merged, view, expect_vec = case
    layer, w, ids, x, y0 = _problem(T, in_f, outs, ranks, dts, seed=CASES.index(case), bias=bias, view=view)
    if T == 1:
        ids[0] = 0
    _run_and_check(emu_binary, tmp_path, layer, w, ids, x, y0, merged, expect_vec=expect_vec, name=name)


@pytest.mark.parametrize("merged", [None, 0])
def test_no_delta(emu_binary, tmp_path, merged):
    """T = 4, every token -1 (plain) or of the merged adapter (mixed): y = rnd(x @ W0^T + bias), counters stay 0."""
    layer, w, ids, x, y0 = _problem(4, 264, (16, 8), [(4, 2), (3, 3)], (F16, F16), seed=7)
    ids.fill_(-1 if merged is None else merged)
    (y, y2, _), _, counters, _, _ = _emulate(emu_binary, tmp_path, layer, w, ids, x, y0, merged)
    base, delta = _reference(layer, w, ids, x, merged)
    assert not bool(delta.any())
    _check_close(y, base, delta, "no delta")
    assert torch.equal(bits(y), bits(y2))
    assert torch.equal(counters, torch.zeros_like(counters))


# ---- nvcc: registers / spills / shared memory per variant --------------------------------------------------------
_CT = {F16: "__half", BF16: "__nv_bfloat16", F32: "float"}


def test_nvcc_resource_usage(tmp_path):
    """Every instantiation compiled for sm_80 and sm_90a: no spills, registers <= _REG_BUDGET; prints the table."""
    lines = ['#include "kernels/fused_lora_linear.cuh"']
    for (ta, tw), vec in itertools.product(_COMBOS, (True, False)):
        lines.append(f"template __global__ void lora_kernels::fused_lora_linear_kernel<{_CT[ta]}, {_CT[tw]}, "
                     f"{str(vec).lower()}>(const lora_kernels::FusedLoraLinearParams);")
    check_ptxas_budget(tmp_path, "\n".join(lines), expected=2 * 18, reg_budget=_REG_BUDGET)
