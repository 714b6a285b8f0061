"""The CUDA merge / unmerge kernel (csrc/kernels/merge.cuh) on a CPU emulation (tests/merge_emu.cpp, compiled by
g++ into a shared library and loaded into this process), driven by the real Python pipeline of
lora_kernels.ops.merge (job tables, code-column rebasing, byte-code packing, escapes) with the compiled op
replaced by the emulator. Compared bit for bit with lora_kernels.reference merge_ / unmerge_: the kernel forms the
reference's delta (the same sequence of correctly rounded fp32 operations), so merged weights, codes and escapes
are identical, and the exact unmerge restores every bit.

Cases: every (W dtype, adapter dtype) pair in grouped launches of several layers; widths that are not a multiple
of 4 (one code byte per weight, packed afterwards) and multiples of 4 (codes packed in-kernel); widths just past
one 1024-column tile (partial tiles); several slices (jobs) per layer; rank-0 terms; adapter rows padded
(row strides != width, padding NaN: an out-of-range read would show); W inside a guarded buffer (an out-of-range
write would show); adversarial weights (subnormals, +-0, huge, inf) so that escapes occur. One run repeats the
check under AddressSanitizer in a subprocess (every out-of-bounds access of the kernel is then fatal)."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lora_kernels import reference as ref
from lora_kernels.ops import merge as M
from lora_kernels.ops.merge import dispatch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INT = {2: torch.int16, 4: torch.int32}
_KIND = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
_GUARD = 8  # elements of sentinel on each side of every W


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT[t.element_size()])


def _build(out: str, asan: bool = False) -> str:
    cxx = shutil.which("g++") or shutil.which("clang++")
    inc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")
    if cxx is None or not os.path.exists(os.path.join(inc, "cuda_fp16.h")):
        pytest.skip("needs g++ and the CUDA headers")
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-ffp-contract=off", "-w", "-I", os.path.join(REPO, "csrc"),
           "-I", inc, os.path.join(REPO, "tests", "merge_emu.cpp"), "-o", out]
    if asan:
        cmd[3:3] = ["-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    return _build(str(tmp_path_factory.mktemp("merge_emu") / "merge_emu.so"))


class EmuOps:
    """Stands in for torch.ops.lora_kernels_C: merge_grouped_ with csrc/merge.cu's argument checks, then the
    emulated launch. Counts launches."""

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        self.lib.merge_grouped_emu.restype = ctypes.c_int64
        self.launches = 0

    def merge_grouped_(self, jobs, tile_start, terms, coefs, counter, total_tiles, w_kind, ab_kind, unmerge, exact):
        for t, dt in ((jobs, torch.int64), (tile_start, torch.int64), (terms, torch.int64), (coefs, torch.float32),
                      (counter, torch.int32)):
            assert t.dtype == dt and t.is_contiguous() and t.device == jobs.device
        assert jobs.dim() == 2 and jobs.shape[1] == 16 and tile_start.numel() == jobs.shape[0]
        assert 0 <= total_tiles < 2**31 and w_kind in (0, 1, 2) and ab_kind in (0, 1, 2)
        assert isinstance(unmerge, bool) and isinstance(exact, bool)
        # the table invariants the kernel's binary search relies on
        ts = tile_start.tolist()
        assert ts[0] == 0 and all(x < y for x, y in zip(ts, ts[1:])) and ts[-1] < total_tiles
        self.launches += 1
        p = ctypes.c_void_p
        self.lib.merge_grouped_emu(p(jobs.data_ptr()), p(tile_start.data_ptr()), ctypes.c_int64(jobs.shape[0]),
                                   p(terms.data_ptr()), p(coefs.data_ptr()), p(counter.data_ptr()),
                                   ctypes.c_int64(total_tiles), ctypes.c_int64(w_kind), ctypes.c_int64(ab_kind),
                                   ctypes.c_int(int(unmerge)), ctypes.c_int(int(exact)))


# (W dtype, adapter dtype, out, in, slices (row0, rows), per-slice terms (off, r)); R = 10 adapter rows
LAYERS = [
    (torch.float16, torch.float16, 5, 1030, [(0, 3), (3, 2)], [[(0, 3), (3, 0), (5, 4)], [(0, 2), (6, 4)]]),
    (torch.bfloat16, torch.bfloat16, 3, 1028, [(0, 3)], [[(1, 5), (0, 1)]]),
    (torch.float32, torch.float32, 4, 7, [(0, 1), (1, 3)], [[(0, 4)], [(2, 3), (0, 0), (7, 3)]]),
    (torch.float32, torch.bfloat16, 2, 9, [(0, 2)], [[(0, 6)]]),
    (torch.bfloat16, torch.float16, 3, 12, [(0, 3)], [[(4, 2), (9, 1)]]),
    (torch.float16, torch.float32, 2, 1025, [(0, 2)], [[(3, 3)]]),
    (torch.float16, torch.bfloat16, 2, 3, [(0, 1), (1, 1)], [[(0, 2)], [(2, 2)]]),
    (torch.bfloat16, torch.float32, 1, 5, [(0, 1)], [[(0, 0)]]),  # rank 0 only: merged W == W, codes 0
    (torch.float32, torch.float16, 3, 16, [(0, 3)], [[(0, 10)]]),
]
_R = 10


def _adversarial(dtype, shape, g):
    """Magnitudes over most of the exponent range, both signs, and specials (no NaN: its payload after a
    rounding is platform-defined, and the escape list restores it either way)."""
    fi = torch.finfo(dtype)
    lo, hi = torch.log2(torch.tensor(fi.tiny)).item() - 4, torch.log2(torch.tensor(fi.max)).item() - 1
    e = torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).double()
    # half the weights of ordinary size (most codes 0/1/2), half adversarial (escapes)
    ordinary = torch.rand(shape, generator=g) < 0.5
    W = torch.where(ordinary, torch.randn(shape, generator=g, dtype=torch.float64) * 0.05, sign * torch.exp2(e))
    W = W.to(dtype)
    sub = fi.tiny * fi.eps
    vals = [0.0, -0.0, sub, -sub, fi.tiny, -fi.tiny, 1.0, fi.max, -fi.max, float("inf"), float("-inf"), 3 * sub]
    flat = W.view(-1)
    n = min(len(vals), flat.numel())
    flat[:n] = torch.tensor(vals[:n], dtype=torch.float64).to(dtype)
    return W


def _make(seed: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for wdt, abdt, out, in_f, slices, sterms in LAYERS:
        S = len(slices)
        W_store = torch.full((out * in_f + 2 * _GUARD,), 7.0, dtype=wdt)
        W = W_store[_GUARD : _GUARD + out * in_f].view(out, in_f)
        W.copy_(_adversarial(wdt, (out, in_f), g))
        # padded rows (stride in_f + 3 / out + 5) filled with NaN: any read past a row's end poisons a delta
        a_store = torch.full((S, _R, in_f + 3), float("nan"), dtype=abdt)
        a = a_store[..., :in_f]
        a.copy_((torch.randn(S, _R, in_f, generator=g) / 3).to(abdt))
        b_store = torch.full((_R, out + 5), float("nan"), dtype=abdt)
        b = b_store[:, :out]
        b.copy_((torch.randn(_R, out, generator=g) * 0.5).to(abdt))
        terms, coefs = [], []
        for s, ((row0, rows), ts) in enumerate(zip(slices, sterms)):
            for off, r in ts:
                terms.append([s, row0, rows, off, r])
                c = float(torch.randn((), generator=g)) * 2.0
                coefs.append(float(torch.tensor(c, dtype=torch.float32)))
        if device != "cpu":
            W_store, a_store, b_store = (t.to(device) for t in (W_store, a_store, b_store))
            W = W_store[_GUARD : _GUARD + out * in_f].view(out, in_f)
            a, b = a_store[..., :in_f], b_store[:, :out]
        layers.append(dict(W=W, W_store=W_store, a=a, b=b, terms=terms, coefs=coefs))
    return layers


def check_against_reference(ops, exact: bool, seed: int = 0, device: str = "cpu") -> dict:
    """Merge every layer of LAYERS in grouped launches of the kernel (``ops``: the emulator, or None on a GPU:
    the compiled extension), compare with the CPU reference, unmerge, compare again. Returns counts for the
    caller's assertions."""
    layers = _make(seed, device)
    Ws = [L["W"] for L in layers]
    W0 = [W.clone() for W in Ws]
    stores0 = [L["W_store"].clone().cpu() for L in layers]
    a_list, b_list = [L["a"] for L in layers], [L["b"] for L in layers]
    terms, coefs = dispatch._terms_tensors([L["terms"] for L in layers], [L["coefs"] for L in layers])
    want = []
    for L, w0 in zip(layers, W0):
        Wr = w0.cpu().clone()
        code, idx, val = ref.merge_(Wr, L["a"].cpu(), L["b"].cpu(), L["terms"], L["coefs"], exact)
        want.append((Wr, code, idx, val))
    launches0 = ops.launches if ops is not None else 0
    outs = dispatch._merge_impl(Ws, a_list, b_list, terms, coefs, exact, "cuda")
    n = len(Ws)
    codes, idxs, vals = outs[:n], outs[n : 2 * n], outs[2 * n : 3 * n]
    if device != "cpu":
        torch.cuda.synchronize()
        W_dev, store_dev = Ws, [L["W_store"] for L in layers]
        Ws = [W.cpu() for W in Ws]
        for L in layers:
            L["W_store"] = L["W_store"].cpu()
        codes, idxs, vals = [c.cpu() for c in codes], [i.cpu() for i in idxs], [v.cpu() for v in vals]
    n_escapes = 0
    for li, (L, W, (Wr, rcode, ridx, rval)) in enumerate(zip(layers, Ws, want)):
        store = L["W_store"]
        assert torch.equal(_bits(store[:_GUARD]), _bits(stores0[li][:_GUARD])), f"layer {li}: write before W"
        assert torch.equal(_bits(store[-_GUARD:]), _bits(stores0[li][-_GUARD:])), f"layer {li}: write after W"
        assert torch.equal(codes[li], rcode), f"layer {li}: codes differ"
        assert torch.equal(idxs[li], ridx), f"layer {li}: escape indices differ"
        assert torch.equal(_bits(vals[li]), _bits(rval)), f"layer {li}: escape values differ"
        n_escapes += ridx.numel()
        # Escaped weights are merged by the Python wrapper (a torch-ops delta, documented as not bit-matched);
        # every weight the kernel wrote must equal the reference bit for bit.
        keep = torch.ones(W.numel(), dtype=torch.bool)
        keep[ridx] = False
        got, exp = _bits(W).view(-1)[keep], _bits(Wr).view(-1)[keep]
        assert torch.equal(got, exp), f"layer {li}: {int((got != exp).sum())} merged weights differ"
        if ridx.numel():
            steps = (ref.float_key(W.view(-1)[ridx]) - ref.float_key(Wr.view(-1)[ridx])).abs()
            assert int(steps.max()) <= (64 if W.dtype == torch.float32 else 1), f"layer {li}: escapes' merged values"
    if ops is not None:
        groups = len({(L["W"].dtype, L["a"].dtype) for L in layers})
        assert ops.launches - launches0 == groups  # one grouped launch per (W dtype, adapter dtype)
    if device != "cpu":
        codes, idxs, vals = outs[:n], outs[n : 2 * n], outs[2 * n : 3 * n]
        dispatch._unmerge_impl(W_dev, a_list, b_list, terms, coefs, codes, idxs, vals, "cuda")
        torch.cuda.synchronize()
        Ws = [W.cpu() for W in W_dev]
        for L, st in zip(layers, store_dev):
            L["W_store"] = st.cpu()
        W0 = [w.cpu() for w in W0]
    else:
        dispatch._unmerge_impl(Ws, a_list, b_list, terms, coefs, codes, idxs, vals, "cuda")
    for li, (L, W, w0) in enumerate(zip(layers, Ws, W0)):
        if exact:
            assert torch.equal(_bits(W), _bits(w0)), f"layer {li}: not restored"
        else:
            Wr = want[li][0].clone()
            empty = torch.empty(0, dtype=torch.uint8)
            ref.unmerge_(Wr, L["a"].cpu(), L["b"].cpu(), L["terms"], L["coefs"], empty,
                         torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=W.dtype))
            # the approximate unmerge (no escapes without codes: the merged weights were equal everywhere)
            assert torch.equal(_bits(W), _bits(Wr)), f"layer {li}: approximate unmerge differs"
        assert torch.equal(_bits(L["W_store"][:_GUARD]), _bits(stores0[li][:_GUARD]))
        assert torch.equal(_bits(L["W_store"][-_GUARD:]), _bits(stores0[li][-_GUARD:]))
    return dict(escapes=n_escapes, launches=ops.launches - launches0 if ops is not None else 0)


def keep_all(idx: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Mask of W's flat indices that are not in ``idx``."""
    keep = torch.ones(W.numel(), dtype=torch.bool)
    keep[idx] = False
    return keep


@pytest.fixture
def emu_ops(emu_lib, monkeypatch):
    ops = EmuOps(emu_lib)
    monkeypatch.setattr(dispatch, "_cuda_ops", lambda: ops)
    return ops


@pytest.mark.parametrize("exact", [True, False])
def test_emulated_kernel_matches_reference_bitwise(emu_ops, exact):
    stats = check_against_reference(emu_ops, exact, seed=1)
    if exact:
        assert stats["escapes"] > 0  # the adversarial weights do produce escapes
    assert stats["launches"] == 2 * len({(d[0], d[1]) for d in LAYERS})  # merge + unmerge per dtype group


def test_emulated_kernel_grid_larger_than_tables(emu_ops):
    """Blocks past the tables' last tile (a grid larger than total_tiles) map to the last job with a row past its
    rows: the kernel must return without touching W (merge.cuh checks row < rows)."""
    L = _make(3)[0]
    out, in_f = L["W"].shape
    store = torch.full(((out + 8) * in_f,), 7.0, dtype=L["W"].dtype)  # 8 rows of guard: 7 extra tiles' worth
    W = store[: out * in_f].view(out, in_f)
    W.copy_(L["W"])
    store0 = store.clone()
    terms, coefs = dispatch._terms_tensors([L["terms"]], [L["coefs"]])
    Wr = W.clone()
    ref.merge_(Wr, L["a"], L["b"], L["terms"], L["coefs"], False)
    (groups,) = [dispatch._tables("cuda", [W], [L["a"]], [L["b"]], terms, coefs, [0], [0], [W.shape[1] % 4 == 0],
                                  None, ("merge", False))]
    (_, _, jobs, ts, tt, cf, tiles, _, _), = groups
    counter = torch.zeros(1, dtype=torch.int32)
    emu_ops.merge_grouped_(jobs, ts, tt, cf, counter, tiles + 7, _KIND[W.dtype], _KIND[L["a"].dtype], False, False)
    assert torch.equal(_bits(W), _bits(Wr))
    assert torch.equal(_bits(store[W.numel() :]), _bits(store0[W.numel() :])), "wrote past W"


def test_emulated_kernel_through_public_api(emu_ops, monkeypatch):
    """merge_many_ / unmerge_many_ (custom ops, cached plans and tables, records) with the emulated kernel as the
    'cuda' backend: identical records and weights to the reference backend, bit-exact restore, twice (the
    second call reuses the cached plan and rebases the code column onto new buffers)."""
    import lora_kernels as lk

    g = torch.Generator().manual_seed(5)
    ws, Ws = [], []
    for in_f, outs, dt in ((1030, (6, 3), torch.float16), (64, (8,), torch.bfloat16), (13, (5,), torch.float32)):
        w = lk.LoRAWeights(in_f, list(outs) if len(outs) > 1 else outs[0], max_adapters=3, max_rank=4, dtype=dt)
        for r in (4, 2):
            A = [(torch.randn(r, in_f, generator=g) / in_f**0.5).to(dt) for _ in outs]
            B = [(torch.randn(o, r, generator=g) * 0.3).to(dt) for o in outs]
            w.add(A if len(outs) > 1 else A[0], B if len(outs) > 1 else B[0], alpha=2.0 * r)
        ws.append(w)
        Ws.append(_adversarial(dt, (sum(outs), in_f), g))
    W0 = [W.clone() for W in Ws]
    monkeypatch.setattr(dispatch, "_select", lambda device: "cuda")
    for _ in range(2):
        Wr = [W.clone() for W in W0]
        with lk.backends.use_backend("reference"):
            rr = M.merge_many_(Wr, ws, [0, 1], [0.75, -1.25])
        n0 = emu_ops.launches
        recs = M.merge_many_(Ws, ws, [0, 1], [0.75, -1.25])
        assert emu_ops.launches > n0 and all(r.backend == "cuda" for r in recs)
        for W, w_r, r, q in zip(Ws, Wr, recs, rr):
            assert torch.equal(r.code, q.code) and torch.equal(r.escape_idx, q.escape_idx)
            keep = keep_all(q.escape_idx, W)
            assert torch.equal(_bits(W).view(-1)[keep], _bits(w_r).view(-1)[keep])
        assert sum(r.escape_idx.numel() for r in recs) > 0
        M.unmerge_many_(Ws, recs)
        for W, w0 in zip(Ws, W0):
            assert torch.equal(_bits(W), _bits(w0))


def test_emulated_kernel_under_address_sanitizer(tmp_path):
    """The bitwise check again with the emulator built with -fsanitize=address and loaded into a fresh Python
    with libasan preloaded: any out-of-bounds read or write of W, the codes, A, B or the tables by the kernel
    aborts the run (torch's CPU tensors come from malloc, so ASan guards their ends)."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("needs g++ (libasan)")
    libasan = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan) or not os.path.exists(libasan):
        pytest.skip("libasan not found")
    lib = _build(str(tmp_path / "merge_emu_asan.so"), asan=True)
    env = dict(os.environ, LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0",
               PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH", "")]))
    code = ("import test_merge_emu as t\n"
            "from lora_kernels.ops.merge import dispatch\n"
            f"ops = t.EmuOps({lib!r})\n"
            "dispatch._cuda_ops = lambda: ops\n"
            "for exact in (True, False):\n"
            "    s = t.check_against_reference(ops, exact, seed=2)\n"
            "print('ASAN-CLEAN', s['launches'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "ASAN-CLEAN" in r.stdout, (r.stdout[-2000:], r.stderr[-4000:])


@pytest.mark.cuda
def test_compiled_kernel_matches_reference_bitwise():
    """On a GPU: the compiled kernel (not the emulator) on the same layers, bit for bit against the CPU reference
    (IEEE fp32 mul / add with round-to-nearest and no FMA on both sides; no flush-to-zero: the extension is built
    without --use_fast_math)."""
    if dispatch._cuda_ops() is None:
        pytest.fail("the compiled extension has no merge kernel")
    stats = check_against_reference(None, True, seed=4, device="cuda")
    assert stats["escapes"] > 0
    check_against_reference(None, False, seed=4, device="cuda")
