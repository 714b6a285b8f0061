"""merge_ / unmerge_ / merge_many_ / unmerge_many_: bit-exact restore, numerics of the merged weights, refusals,
opcheck. CPU: the reference path, and the Triton kernel in the interpreter (TRITON_INTERPRET=1, set by
conftest) through ``backends.use_backend("triton")``."""

from __future__ import annotations

import math
import time
import warnings

import pytest
import torch
from helpers import assert_close_rule

import lora_kernels as lk
from lora_kernels import reference as ref
from lora_kernels.ops import merge as M
from lora_kernels.ops.merge import checks, dispatch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT = {2: torch.int16, 4: torch.int32}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT[t.element_size()])


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    if not torch.equal(bits(a), bits(b)):
        n = int((bits(a) != bits(b)).sum())
        raise AssertionError(f"{what}: {n} of {a.numel()} weights differ bitwise")


def adversarial_W(dtype, shape=(8, 16), seed=0, specials=True):
    """Random magnitudes over most of the exponent range, both signs, plus subnormals, binade edges, +-0,
    the largest finite values, +-inf and NaN."""
    g = torch.Generator().manual_seed(seed)
    fi = torch.finfo(dtype)
    lo, hi = math.log2(fi.tiny) - 4, math.log2(fi.max) - 1
    e = torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).double()
    W = (sign * torch.exp2(e)).to(dtype)
    if specials:
        sub = fi.tiny * fi.eps
        vals = [0.0, -0.0, sub, -sub, fi.tiny - sub, fi.tiny, -fi.tiny, 1.0, 1.0 - fi.eps / 2, 2.0 - fi.eps, 2.0,
                -0.5, 0.5 - fi.eps / 4, fi.max, -fi.max, float("inf"), float("-inf"), float("nan"), 3 * sub,
                1024.0, -(2.0 ** 10) * (1 - fi.eps / 2)]
        flat = W.view(-1)
        idx = torch.randperm(flat.numel(), generator=g)[: len(vals)]
        flat[idx] = torch.tensor(vals, dtype=torch.float64).to(dtype)
    return W


def make_weights(in_f, outs, ranks, dtype, seed=0, scale_b=1.0, max_adapters=None):
    g = torch.Generator().manual_seed(seed)
    S = len(outs)
    w = lk.LoRAWeights(in_f, list(outs) if S > 1 else outs[0], max_adapters=max_adapters or len(ranks) + 1,
                       max_rank=max(max(r) if isinstance(r, tuple) else r for r in ranks), dtype=dtype)
    for r in ranks:
        rs = r if isinstance(r, tuple) else (r,) * S
        A = [torch.randn(k, in_f, generator=g) / in_f**0.5 for k in rs]
        B = [torch.randn(o, k, generator=g) * scale_b for o, k in zip(outs, rs)]
        w.add([x.to(dtype) for x in A] if S > 1 else A[0].to(dtype),
              [x.to(dtype) for x in B] if S > 1 else B[0].to(dtype), alpha=2.0 * rs[0])
    return w


def exact_delta(w, adapters, lambdas):
    """The delta in fp64 (the target the fp32 delta approximates)."""
    d = torch.zeros(w.out_features, w.in_features, dtype=torch.float64)
    for j, lam in zip(adapters, lambdas):
        for s in range(w.num_slices):
            if w.rank_of(j)[s]:
                A, B, sc = w.adapter(j, s)
                c0 = w.slice_cols[s]
                d[c0 : c0 + w.slice_outs[s]] += lam * sc * (B.double() @ A.double())
    return d


# ---- the code itself, 10,000 cycles on the reference path ----------------------------------------------------------
def _delta_bank(W, n, seed):
    """n fp32 deltas for W: realistic (|d| ~ 1e-3 |W|), small, large (swamping W), exact cancellation
    (d = -W), subnormal-sized, and with Inf/NaN entries."""
    g = torch.Generator().manual_seed(seed)
    Wf = W.float().nan_to_num(0.0, 0.0, 0.0)
    mag = Wf.abs().clamp_min(torch.finfo(W.dtype).tiny)
    out = []
    for i in range(n):
        z = torch.randn(W.shape, generator=g)
        kind = i % 8
        if kind in (0, 1, 2):
            d = 1e-3 * mag * z
        elif kind == 3:
            d = 1e-6 * mag * z
        elif kind == 4:
            d = 1e3 * mag * z + 1.0 * z
        elif kind == 5:
            d = torch.where(torch.rand(W.shape, generator=g) < 0.5, -Wf, 1e-2 * mag * z)
        elif kind == 6:
            d = z * torch.finfo(W.dtype).tiny * 3
        else:
            d = 1e-2 * mag * z
            d.view(-1)[torch.randint(0, d.numel(), (2,), generator=g)] = float("inf")
            d.view(-1)[torch.randint(0, d.numel(), (1,), generator=g)] = float("nan")
        out.append(d)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_10000_cycles_reference_bit_exact(dtype):
    """10,000 merge/unmerge cycles of the reference's code path (the elementwise core of reference.merge_ /
    unmerge_: round, code, pack, escapes, unpack, restore), bitwise check after every cycle. Vectorised: 10
    different adversarial 8x16 matrices in lockstep, each through 1,000 sequential cycles with a different
    delta every cycle (W carries over from cycle to cycle)."""
    nb, rounds = 10, 1_000
    W0 = torch.stack([adversarial_W(dtype, (8, 16), seed=100 + k) for k in range(nb)])
    W = W0.clone()
    bank = torch.stack([torch.stack(_delta_bank(W0[k], 64, seed=200 + k)) for k in range(nb)], 1)  # [64, nb, 8, 16]
    lam = torch.linspace(-2.0, 2.0, 157)
    lams = torch.stack([lam[(torch.arange(rounds) * 7 + k) % 157] for k in range(nb)], 1).view(rounds, nb, 1, 1)
    esc = 0
    t0 = time.perf_counter()
    for i in range(rounds):
        d = bank[i % 64] * lams[i]
        W_new = (W.float() + d).to(dtype)
        code = ref.merge_codes(W, W_new, d).reshape(-1)
        idx = (code == 3).nonzero().flatten()
        val = W.reshape(-1)[idx].clone()
        packed = ref.pack_codes(code)
        assert packed.numel() == (W.numel() + 3) // 4
        esc += idx.numel()
        out = ref.unmerge_values(W_new, d, ref.unpack_codes(packed, W.numel()).view(W.shape))
        out.view(-1)[idx] = val
        if not torch.equal(bits(out), bits(W0)):
            bad = (bits(out) != bits(W0)).flatten(1).any(1).nonzero().flatten().tolist()
            raise AssertionError(f"round {i}: matrices {bad} differ after their cycle {i}")
        W = out
    dt = time.perf_counter() - t0
    print(f"\n{dtype}: {nb * rounds} cycles in {dt:.2f} s, escapes {esc / (rounds * W.numel()):.4%} of weights")


@pytest.mark.parametrize("dtype", DTYPES)
def test_escape_rates(dtype):
    """Escape rates: realistic deltas (|d| ~ 1e-3 |W|, normal weights) escape rarely; the adversarial set
    escapes more, and every escape is restored."""
    g = torch.Generator().manual_seed(3)
    W = (torch.randn(256, 256, generator=g) * 0.02).to(dtype)
    rates = {}
    for name, d in {
        "realistic 1e-3": 1e-3 * W.float().abs() * torch.randn(W.shape, generator=g),
        "lora-like 1e-3 rms": 1e-3 * 0.02 * torch.randn(W.shape, generator=g),
        "large 1e2": 1e2 * W.float().abs() * torch.randn(W.shape, generator=g),
    }.items():
        W_new = (W.float() + d).to(dtype)
        code = ref.merge_codes(W, W_new, d)
        rates[name] = float((code == 3).float().mean())
        counts = [float((code == k).float().mean()) for k in range(3)]
        print(f"\n{dtype} {name}: codes 0/+1/-1 {counts[0]:.3f}/{counts[1]:.3f}/{counts[2]:.3f}, "
              f"escapes {rates[name]:.5%}")
    Wa = adversarial_W(dtype, (64, 64), seed=4)
    bank = _delta_bank(Wa, 8, seed=5)
    adv = sum(float((ref.merge_codes(Wa, (Wa.float() + d).to(dtype), d) == 3).float().mean()) for d in bank) / 8
    print(f"{dtype} adversarial bank: escapes {adv:.3%}")
    assert rates["realistic 1e-3"] < 1e-3
    assert rates["lora-like 1e-3 rms"] < 1e-2


# ---- the public API --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_api_cycles_reference(dtype):
    """Public API on the reference path: fused 3-slice W with adversarial values, several adapters of mixed ranks,
    lambda-weighted, 200 cycles, bitwise after each."""
    w = make_weights(16, (8, 4, 4), [(3, 2, 4), (4, 4, 1), 2], dtype, seed=6, scale_b=0.05)
    W0 = adversarial_W(dtype, (16, 16), seed=7)
    W = W0.clone()
    lams = torch.linspace(-3, 3, 31).tolist()
    subsets = [[0], [1], [2], [0, 1], [2, 0, 1], [1, 1]]
    esc = 0
    for i in range(200):
        ads = subsets[i % len(subsets)]
        lam = [lams[(i + k) % 31] for k in range(len(ads))]
        rec = M.merge_(W, w, ads, lam)
        esc += rec.escapes
        assert rec.code.numel() == (W.numel() + 3) // 4 and rec.backend == "reference"
        M.unmerge_(W, rec)
        assert_bits_equal(W, W0, f"cycle {i}")
    print(f"\n{dtype}: 200 API cycles, {esc / (200 * W.numel()):.3%} escapes")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_merged_values_vs_fp32_reference(dtype, backend):
    """The merged weight is rnd(W + delta) with an fp32 delta: within the project's rule of the fp64 truth,
    with PEFT's low-precision W += (B @ A) * s as the baseline. Multi-adapter, lambdas, mixed ranks, slices."""
    w = make_weights(40, (24, 8, 8), [(8, 4, 2), (3, 5, 8), 16], dtype, seed=8)
    g = torch.Generator().manual_seed(9)
    W0 = torch.randn(40, 40, generator=g).to(dtype)
    ads, lam = [0, 2, 1], [0.7, -1.3, 2.0]
    truth = (W0.double() + exact_delta(w, ads, lam))
    lowp = W0.clone()
    for j, la in zip(ads, lam):
        for s in range(3):
            A, B, sc = w.adapter(j, s)
            c0 = w.slice_cols[s]
            lowp[c0 : c0 + w.slice_outs[s]] += (B @ A) * (sc * la)
    W = W0.clone()
    with lk.backends.use_backend(backend):
        rec = M.merge_(W, w, ads, lam)
    assert rec.backend == backend
    assert_close_rule(W, truth.float(), lowp, dtype=dtype, name=f"merged W [{backend}]")
    with lk.backends.use_backend(backend):
        M.unmerge_(W, rec)
    assert_bits_equal(W, W0, backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape_in", [16, 13])  # 13: codes packed by the wrapper, not in-kernel
def test_triton_cycles_bit_exact(dtype, shape_in):
    """Cycles through the Triton kernel (interpreter; 50 for fp16 with in-kernel packing, 15 for the other
    cases, to bound the runtime): adversarial W, fused slices, odd sizes, escapes."""
    cycles = 50 if (dtype == torch.float16 and shape_in == 16) else 15
    w = make_weights(shape_in, (33, 7), [(4, 3), (16, 1), 5], dtype, seed=10, scale_b=0.3)
    W0 = adversarial_W(dtype, (40, shape_in), seed=11)
    W = W0.clone()
    esc = 0
    with lk.backends.use_backend("triton"):
        for i in range(cycles):
            ads = [[0], [1, 2], [2, 0, 1]][i % 3]
            lam = [(-1.0) ** i * (0.25 + 0.5 * (i % 5))] * len(ads)
            rec = M.merge_(W, w, ads, lam)
            assert rec.backend == "triton" and rec.code.numel() == (W.numel() + 3) // 4
            if i < 3:  # merged values equal the reference's up to rounding (different summation order)
                Wr = W0.clone()
                with lk.backends.use_backend("reference"):
                    rr = M.merge_(Wr, w, ads, lam)
                fin = torch.isfinite(Wr.float()) & torch.isfinite(W.float())
                err = (W.float() - Wr.float())[fin].abs()
                assert bool((err <= 2 * torch.finfo(dtype).eps * Wr.float()[fin].abs() + 1e-5).all())
                with lk.backends.use_backend("reference"):
                    M.unmerge_(Wr, rr)
            esc += rec.escapes
            M.unmerge_(W, rec)
            assert_bits_equal(W, W0, f"cycle {i}")
    assert esc > 0  # the adversarial values do exercise the escape list
    print(f"\n{dtype} in={shape_in}: {cycles} Triton cycles, {esc / (cycles * W.numel()):.3%} escapes")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_merge_many_equals_per_layer(backend):
    dt = torch.float16
    shapes = [(16, (8, 4, 4)), (12, (20,)), (32, (16, 16)), (7, (5,))]
    ws = [make_weights(i, o, [(3,) * len(o), (8,) * len(o)], dt, seed=20 + k, scale_b=0.2)
          for k, (i, o) in enumerate(shapes)]
    W0s = [adversarial_W(dt, (w.out_features, w.in_features), seed=30 + k) for k, w in enumerate(ws)]
    check_merge_many_equals_per_layer(W0s, ws, backend)


def check_merge_many_equals_per_layer(W0s, ws, backend) -> None:
    """merge_many_ of adapters [1, 0] (scales 0.5, 1.5) into copies of ``W0s`` gives, under ``backend``, the
    bits and records (code, escapes) of merge_ layer by layer, and unmerge_many_ restores every W0 bit for bit.
    Shared with test_merge_cuda."""
    with lk.backends.use_backend(backend):
        singles = []
        for W0, w in zip(W0s, ws):
            W = W0.clone()
            singles.append((W, M.merge_(W, w, [1, 0], [0.5, 1.5])))
        Ws = [W0.clone() for W0 in W0s]
        recs = M.merge_many_(Ws, ws, [1, 0], [0.5, 1.5])
        for (Wsingle, rs), W, r in zip(singles, Ws, recs):
            assert_bits_equal(W, Wsingle, "merged")
            assert torch.equal(r.code, rs.code) and torch.equal(r.escape_idx, rs.escape_idx)
            assert r.escapes == rs.escapes
        M.unmerge_many_(Ws, recs)
    for W, W0 in zip(Ws, W0s):
        assert_bits_equal(W, W0, "unmerge_many_")


def test_record_keeps_its_backend():
    """A Triton record is unmerged by Triton even when another backend is forced at unmerge time."""
    w = make_weights(16, (16,), [4], torch.float32, seed=40, scale_b=0.5)
    W0 = adversarial_W(torch.float32, (16, 16), seed=41)
    W = W0.clone()
    with lk.backends.use_backend("triton"):
        rec = M.merge_(W, w, 0)
    with lk.backends.use_backend("reference"):
        M.unmerge_(W, rec)
    assert_bits_equal(W, W0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_approximate_mode(backend):
    dt = torch.bfloat16
    w = make_weights(32, (32,), [16], dt, seed=50, scale_b=0.002)  # |d| ~ 0.1 |W|
    g = torch.Generator().manual_seed(51)
    W0 = (torch.randn(32, 32, generator=g) * 0.02).to(dt)
    W = W0.clone()
    with lk.backends.use_backend(backend):
        rec = M.merge_(W, w, 0, exact=False)
        assert rec.side_bytes == 0 and rec.code.numel() == 0 and not rec.exact
        Wm = W.clone()
        M.unmerge_(W, rec)
    d = ref.merge_delta(W.shape, w.a, w.b, rec._terms, rec._coefs)
    if backend == "reference":
        assert_bits_equal(W, ref.unmerge_values(Wm, d, None), "fl(W' - d)")
    frac = float((bits(W) != bits(W0)).float().mean())
    print(f"\napproximate unmerge [{backend}]: {frac:.2%} of weights changed after one cycle")
    assert (W.float() - W0.float()).abs().max() <= 2 * torch.finfo(dt).eps * Wm.float().abs().max()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nonfinite_adapter_weights_escape_exactly(backend):
    dt = torch.float16
    w = make_weights(16, (8,), [4], dt, seed=60)
    w.b[0, 3] = float("nan")
    w.a[0, 0, 5] = float("inf")
    W0 = (torch.randn(8, 16) * 0.1).to(dt)
    W = W0.clone()
    with lk.backends.use_backend(backend), pytest.warns(RuntimeWarning, match="NaN/Inf"):
        rec = M.merge_(W, w, 0)
    assert not bool(torch.isfinite(W).all()) and rec.escapes > 0
    with lk.backends.use_backend(backend):
        M.unmerge_(W, rec)
    assert_bits_equal(W, W0)


def test_overflow_to_inf_escapes():
    dt = torch.float16
    w = make_weights(8, (8,), [2], dt, seed=61, scale_b=100.0)
    W0 = torch.full((8, 8), 60000.0, dtype=dt)
    W = W0.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rec = M.merge_(W, w, 0, 1000.0)
    assert bool(torch.isinf(W).any()) and rec.escapes >= int(torch.isinf(W).sum())
    M.unmerge_(W, rec)
    assert_bits_equal(W, W0)


def test_signed_zero_and_side_data_size():
    dt = torch.bfloat16
    w = make_weights(5, (7,), [1], dt, seed=62)  # 35 weights -> 9 code bytes
    W0 = torch.zeros(7, 5, dtype=dt)
    W0[::2] = -0.0
    W = W0.clone()
    rec = M.merge_(W, w, 0, 0.0)  # a zero delta: -0 + +0 rounds to +0, the code restores -0
    assert rec.code.numel() == 9 and rec.side_bytes == 9 + rec.escapes * 10
    M.unmerge_(W, rec)
    assert_bits_equal(W, W0)


# ---- refusals ------------------------------------------------------------------------------------------------
def _setup(dt=torch.float32):
    w = make_weights(16, (8,), [4, 2], dt, seed=70, max_adapters=4)
    W = torch.randn(8, 16).to(dt)
    return w, W


@pytest.mark.parametrize("case", ["shape", "dtype", "noncontig", "id_range", "id_free", "id_type", "lam_len",
                                  "lam_nan", "coef_overflow", "empty"])
def test_merge_refusals_leave_W_unchanged(case):
    w, W = _setup()
    Wc = W.clone()
    kw = dict(W=W, weights=w, adapters=0, lambdas=None)
    exc = ValueError
    if case == "shape":
        kw["W"] = torch.randn(16, 8)
    elif case == "dtype":
        kw["W"], exc = torch.zeros(8, 16, dtype=torch.int32), TypeError
    elif case == "noncontig":
        kw["W"] = torch.randn(16, 8).t()
    elif case == "id_range":
        kw["adapters"] = [0, 4]
    elif case == "id_free":
        kw["adapters"] = [3]
    elif case == "id_type":
        kw["adapters"], exc = "0", TypeError
    elif case == "lam_len":
        kw["adapters"], kw["lambdas"] = [0, 1], [1.0]
    elif case == "lam_nan":
        kw["lambdas"] = [float("nan")]
    elif case == "coef_overflow":
        kw["lambdas"] = [1e38 * 1e10]
    elif case == "empty":
        kw["adapters"] = []
    with pytest.raises(exc) as ei:
        M.merge_(kw["W"], kw["weights"], kw["adapters"], kw["lambdas"])
    assert ei.value.args[0].split(":")[0] in ("W", "adapters", "lambdas")
    assert_bits_equal(W, Wc)


def test_merge_many_refuses_before_writing_any_layer():
    w, W = _setup()
    w2 = make_weights(16, (8,), [4], torch.float32, seed=71)
    W2 = torch.randn(8, 16)
    Wc, W2c = W.clone(), W2.clone()
    with pytest.raises(ValueError, match=r"adapters"):
        M.merge_many_([W, W2], [w, w2], [1])  # adapter 1 is loaded in w only
    with pytest.raises(ValueError, match=r"Ws\[1\]"):
        M.merge_many_([W, W2[:4]], [w, w2], [0])
    with pytest.raises(ValueError, match="distinct"):
        M.merge_many_([W, W], [w, w], [0])
    assert_bits_equal(W, Wc)
    assert_bits_equal(W2, W2c)


@pytest.mark.parametrize("case", ["other_tensor", "modified", "twice", "dtype", "shape", "slot_reloaded",
                                  "not_a_record"])
def test_unmerge_refusals_leave_W_unchanged(case):
    w, W = _setup()
    rec = M.merge_(W, w, [0, 1], [1.0, -0.5])
    target, exc = W, ValueError
    if case == "other_tensor":
        target = W.clone()
    elif case == "modified":
        W.view(-1)[0] += 1.0
    elif case == "twice":
        M.unmerge_(W, rec)
    elif case == "dtype":
        target = W.to(torch.float16)
    elif case == "shape":
        target = W.view(16, 8)
    elif case == "slot_reloaded":
        A, B, _ = w.adapter(1)
        A, B = A.clone(), B.clone()
        w.remove(1)
        w.add(A * 2, B, adapter_id=1)
    elif case == "not_a_record":
        rec, exc = {"shape": (8, 16)}, TypeError
    before = target.clone()
    with pytest.raises(exc, match="record"):
        M.unmerge_(target, rec)
    assert_bits_equal(target, before)


def test_parameter_weight_and_inference_mode():
    w, _ = _setup()
    lin = torch.nn.Linear(16, 8)
    W0 = lin.weight.detach().clone()
    rec = M.merge_(lin.weight, w, 0)  # a Parameter that requires grad: written under no_grad
    assert lin.weight.requires_grad
    M.unmerge_(lin.weight, rec)
    assert_bits_equal(lin.weight.detach(), W0)
    with torch.inference_mode():
        W = torch.randn(8, 16)
        W0 = W.clone()
        rec = M.merge_(W, w, 1)
        assert rec.version is None
        M.unmerge_(W, rec)
        assert_bits_equal(W, W0)


def test_version_bumped_by_merge():
    w, W = _setup()
    v0 = W._version
    rec = M.merge_(W, w, 0)
    assert W._version > v0 and rec.version == W._version
    M.unmerge_(W, rec)
    assert W._version > rec.version


# ---- custom ops ----------------------------------------------------------------------------------------------
def test_opcheck():
    w, W = _setup(torch.float16)
    p = checks._plan(W, w, [0, 1], [1.0, 0.5], "W")
    t1, c1 = dispatch._terms_tensors([p["terms"]], [p["coefs"]])
    t2, c2 = dispatch._terms_tensors([p["terms"]] * 2, [p["coefs"]] * 2)
    for exact in (True, False):
        torch.library.opcheck(torch.ops.lora_kernels.merge_.default, (W.clone(), w.a, w.b, t1, c1, exact, "reference"))
        torch.library.opcheck(torch.ops.lora_kernels.merge_many_.default,
                              ([W.clone(), W.clone() * 2], [w.a, w.a], [w.b, w.b], t2, c2, exact, "reference"))
    Wm = W.clone()
    code, idx, val = torch.ops.lora_kernels.merge_(Wm, w.a, w.b, t1, c1, True, "reference")
    torch.library.opcheck(torch.ops.lora_kernels.unmerge_.default,
                          (Wm.clone(), w.a, w.b, t1, c1, code, idx, val, "reference"))
    torch.library.opcheck(torch.ops.lora_kernels.unmerge_many_.default,
                          ([Wm.clone()], [w.a], [w.b], t1, c1, [code], [idx], [val], "reference"))
