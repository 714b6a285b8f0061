"""Fuzz suite of the serving ops' argument contract (issue 13, item 3): hypothesis over op arguments.

Every example draws one op, a small valid world (weights, batch, activations) and one class of argument change
(dtype, device, shape, strides, overlap, types, capacities, ids of any integer dtype and value, merged ids,
non-finite scales...), then checks the contract:

* either the op succeeds and equals the fp64 reference (an independent loop over tokens and adapters, on the
  values the op was given), or it raises TypeError / ValueError / RuntimeError (grad) whose message starts with
  the culprit argument's name (any other exception fails the example);
* every input, and every tensor the library owns (adapter rows, offsets, ranks, scales, slice info, batch meta), is
  bit-identical afterwards (the output only where the op succeeded, and only inside the output's view);
* the same weights and batch still serve a valid call correctly afterwards.

Mostly the CPU reference backend (fast); a few examples run the Triton kernels in the interpreter with tiny
shapes; the compiled batch builder's kernel runs on the CPU emulator in a subprocess with a timeout. Bounded and
deterministic (``derandomize=True``). ``LK_FUZZ_STATS=<path>`` writes the per-class counts as JSON.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st

import lora_kernels as lk
from lora_kernels import backends
from lora_kernels.batch import INT_DTYPES, build_batch_torch_

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
ACCEPTED = (TypeError, ValueError, RuntimeError)
STATS: Counter = Counter()
IN = 8
N = 6  # slots: 0, 1, 2 loaded (ranks 1, 3, 2); 3, 4, 5 free


def fuzz(n: int):
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module", autouse=True)
def _stats():
    yield
    path = os.environ.get("LK_FUZZ_STATS")
    if path:
        rows = [{"suite": s, "class": c, "outcome": o, "n": n} for (s, c, o), n in sorted(STATS.items())]
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def record(suite: str, cls: str, outcome: str, op: str = "") -> None:
    STATS[(suite, cls, outcome)] += 1
    if op:
        STATS[(suite, f"op {op}", outcome)] += 1
    event(f"{cls}: {outcome}")


# ---- bit-exact snapshots ------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type == "meta" or t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    return t.contiguous().reshape(-1).view(torch.uint8).clone()


def snapshot(owned: dict) -> dict:
    return {k: (_bits(v) if isinstance(v, torch.Tensor) else repr(v)) for k, v in owned.items()}


def changed(before: dict, owned: dict, skip=()) -> list:
    return [k for k, v in owned.items() if k not in skip
            and not (torch.equal(before[k], _bits(v)) if isinstance(v, torch.Tensor) else before[k] == repr(v))]


def names_ok(msg: str, names) -> bool:
    return any(re.match(rf"^{re.escape(n)}(\W|$)", msg) for n in names)


def run_contract(suite, cls, call, owned, expect, check_ok, skip_on_ok=(), op=""):
    """The per-example contract. ``expect``: None (must succeed), ``(exception types, allowed names)`` or a list
    of such alternatives (several culprits in one call: any of them may be named, with its exception type)."""
    before = snapshot(owned)
    try:
        out = call()
    except ACCEPTED as e:
        msg = str(e)
        assert expect is not None, f"[{cls}] refused a valid call: {type(e).__name__}: {msg}"
        alts = expect if isinstance(expect, list) else [expect]  # alternatives: (exception types, names)
        assert any(isinstance(e, exc) and names_ok(msg, names) for exc, names in alts), \
            f"[{cls}] expected one of {alts} (type, a message naming the argument), got {type(e).__name__}: {msg!r}"
        bad = changed(before, owned)
        assert not bad, f"[{cls}] refusal changed {bad}"
        record(suite, cls, "refused", op)
        return None
    assert expect is None, f"[{cls}] accepted a bad call (expected {expect})"
    bad = changed(before, owned, skip_on_ok)
    assert not bad, f"[{cls}] the op changed {bad}"
    check_ok(out)
    record(suite, cls, "ok", op)
    return out


# ---- fp64 reference of the SGMV family ---------------------------------------------------------------------


def tokens(ids, n=N):
    return [int(v) if 0 <= v < n else -1 for v in ids]


def _adapter64(w, i, s):
    A, B, sc = w.adapter(i, s)
    return A.double(), B.double(), sc


def delta64(x, w, tok, merged=None):
    """fp64 [T, out]: s_i (x A_i^T) B_i^T per token (mixed mode: delta_i - delta_m for tokens not of m)."""
    x = x.detach().double()
    d = torch.zeros(x.shape[0], w.out_features, dtype=torch.float64)
    for t, i in enumerate(tok):
        if merged is not None and i == merged:
            continue
        for s in range(w.num_slices):
            c0, o = w.slice_cols[s], w.slice_outs[s]
            if 0 <= i and i in w.loaded:
                A, B, sc = _adapter64(w, i, s)
                d[t, c0:c0 + o] += sc * (x[t] @ A.T) @ B.T
            if merged is not None:
                A, B, sc = _adapter64(w, merged, s)
                d[t, c0:c0 + o] -= sc * (x[t] @ A.T) @ B.T
    return d


def shrink64(x, w, tok):
    x = x.detach().double()
    h = torch.zeros(w.num_slices, x.shape[0], w.max_rank, dtype=torch.float64)
    for t, i in enumerate(tok):
        if 0 <= i and i in w.loaded:
            for s in range(w.num_slices):
                A, _, _ = _adapter64(w, i, s)
                h[s, t, :A.shape[0]] = x[t] @ A.T
    return h


def expand64(h, w, tok):
    h = h.detach().double()
    d = torch.zeros(h.shape[1], w.out_features, dtype=torch.float64)
    for t, i in enumerate(tok):
        if 0 <= i and i in w.loaded:
            for s in range(w.num_slices):
                _, B, sc = _adapter64(w, i, s)
                r = B.shape[1]
                d[t, w.slice_cols[s]:w.slice_cols[s] + w.slice_outs[s]] = sc * h[s, t, :r] @ B.T
    return d


def dual64(x, wd, tok):
    """fp64 Dual-LoRA delta: s_i B_i (ReLU(T_i x) * LN_r(A_i x)), LayerNorm over r (biased variance, wd.eps)."""
    x = x.detach().double()
    d = torch.zeros(x.shape[0], wd.out_features, dtype=torch.float64)
    for t, i in enumerate(tok):
        if 0 <= i and i in wd.loaded:
            p = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in wd.adapter(i).items()}
            u, g = p["A"] @ x[t], p["T"] @ x[t]
            ln = (u - u.mean()) / torch.sqrt(u.var(unbiased=False) + wd.eps) * p["ln_weight"] + p["ln_bias"]
            d[t] = p["scale"] * p["B"] @ (torch.relu(g) * ln)
    return d


TOL = {torch.float16: (3e-2, 2e-2), torch.bfloat16: (2e-1, 3e-2), torch.float32: (2e-4, 1e-4),
       torch.float64: (1e-9, 1e-9)}


def assert_matches(got: torch.Tensor, want: torch.Tensor, what: str, inputs=()) -> None:
    """Close to the fp64 reference at the precision of the least precise of the output and ``inputs`` dtypes (the
    kernels may multiply in the inputs' precision, accumulating in fp32); non-finite entries (NaN / inf scales)
    must be non-finite in both, with the finite ones close."""
    atol, rtol = max(TOL[d] for d in (got.dtype, *inputs) if d in TOL)
    g = got.detach().double()
    assert g.shape == want.shape, (what, g.shape, want.shape)
    fg, fw = torch.isfinite(g), torch.isfinite(want)
    assert torch.equal(fg, fw), f"{what}: non-finite entries differ"
    torch.testing.assert_close(g[fg], want[fw], atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ---- the SGMV / lora_linear world ------------------------------------------------------------------------------


class World:
    def __init__(self, seed, outs, T, wdtype, xdtype, ydtype, ids):
        g = torch.Generator().manual_seed(seed)
        self.w = lk.LoRAWeights(IN, list(outs) if len(outs) > 1 else outs[0], max_adapters=N, max_rank=3,
                                dtype=wdtype)
        S = len(outs)
        for r in (1, 3, 2):
            A = [torch.randn(r, IN, generator=g) / IN**0.5 for _ in range(S)]
            B = [torch.randn(o, r, generator=g) / r**0.5 for o in outs]
            self.w.add(A if S > 1 else A[0], B if S > 1 else B[0], alpha=float(2 * r))
        self.wd = lk.DualLoRAWeights(IN, self.w.out_features, N, 2, dtype=wdtype)
        for r in (1, 2, 2):
            self.wd.add(torch.randn(r, IN, generator=g) / IN**0.5, torch.randn(r, IN, generator=g) / IN**0.5,
                        torch.randn(self.w.out_features, r, generator=g) / r**0.5,
                        ln_weight=torch.rand(r, generator=g) + 0.5, ln_bias=torch.randn(r, generator=g) * 0.1,
                        alpha=float(2 * r))
        self.T = T
        self.ids = ids
        self.tok = tokens(ids)
        self.batch = lk.LoRABatch(T + 2, N).build(torch.tensor(ids, dtype=torch.int32), ranks=self.w.ranks)
        self.x = torch.randn(T, IN, generator=g).to(xdtype)
        self.y = torch.randn(T, self.w.out_features, generator=g).to(ydtype)
        self.h = torch.randn(S, T, 3, generator=g)
        self.W0 = (torch.randn(self.w.out_features, IN, generator=g) / IN**0.5).to(xdtype)
        self.bias = torch.randn(self.w.out_features, generator=g).to(xdtype)
        self.g = g

    def owned(self):
        w, b, wd = self.w, self.batch, self.wd
        return {"w.a": w.a, "w.b": w.b, "w.offsets": w.offsets, "w.ranks": w.ranks, "w.scales": w.scales,
                "w.slice_info": w.slice_info, "batch.meta": b.meta, "w.loaded": w.loaded,
                "w.free": w.free_ranges, "batch.num_tokens": b.num_tokens, "wd.a": wd.a, "wd.b": wd.b,
                "wd.ln_weight": wd.ln_weight, "wd.ln_bias": wd.ln_bias, "wd.ranks": wd.ranks, "wd.scales": wd.scales,
                "wd.offsets": wd.offsets, "wd.in_slice_info": wd.in_slice_info, "wd.loaded": wd.loaded}

    def weights_for(self, op):
        return self.wd if op.startswith("dual") else self.w

    def still_serving(self):
        """A clean fp32 call on the same weights and batch equals the reference."""
        x = torch.randn(self.T, IN, generator=self.g)
        y = torch.randn(self.T, self.w.out_features, generator=self.g)
        want = y.double() + delta64(x, self.w, self.tok)
        y2 = y.clone()
        want2 = y.double() + dual64(x, self.wd, self.tok)
        with torch.no_grad():
            lk.add_lora_(y, x, self.w, self.batch)
            lk.dual_lora_(y2, x, self.wd, self.batch)
        assert_matches(y, want, "still serving")
        assert_matches(y2, want2, "still serving (dual)")


SGMV_OPS = {  # op: its tensor arguments (the first is the one mutated most), the output (or None)
    "add_lora_": (("x", "y"), "y"),
    "add_lora_mixed": (("x", "y"), "y"),
    "shrink": (("x",), None),
    "expand_": (("y", "h"), "y"),
    "lora_delta": (("x",), None),
    "lora_linear": (("x", "W0", "bias"), None),
    "dual_lora_": (("x", "y"), "y"),
    "dual_lora": (("x",), None),
}
DTYPE_CHOICES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64, torch.bool,
                 torch.complex64]
TENSOR_CLASSES = ("dtype", "meta", "rows", "cols", "ndim", "transpose", "row_slice", "expand_rows", "grad")
OTHER_CLASSES = ("none", "overlap", "weights_type", "batch_type", "batch_T", "batch_N", "batch_meta", "merged",
                 "ids", "scale_nonfinite", "scale_arg")
ALL_CLASSES = TENSOR_CLASSES + OTHER_CLASSES


def invoke(op, a):
    if op in ("add_lora_", "add_lora_mixed"):
        return lk.add_lora_(a["y"], a["x"], a["weights"], a["batch"], merged=a["merged"])
    if op == "shrink":
        return lk.shrink(a["x"], a["weights"], a["batch"], merged=a["merged"])
    if op == "expand_":
        return lk.expand_(a["y"], a["h"], a["weights"], a["batch"], merged=a["merged"])
    if op == "lora_delta":
        return lk.lora_delta(a["x"], a["weights"], a["batch"])
    if op == "dual_lora_":
        return lk.dual_lora_(a["y"], a["x"], a["weights"], a["batch"])
    if op == "dual_lora":
        return lk.dual_lora(a["x"], a["weights"], a["batch"])
    return lk.lora_linear(a["x"], a["W0"], a["bias"], a["weights"], a["batch"])


def expected_out(op, a, world, tok):
    """fp64 expected result of a successful call on the (possibly mutated) arguments ``a``."""
    w, x = a["weights"], a["x"]
    if op in ("add_lora_", "add_lora_mixed"):
        return a["y0"].double() + delta64(x, w, tok, a["merged"] if a["merged"] is not None else None)
    if op == "shrink":
        return shrink64(x, w, tok)
    if op == "expand_":
        return a["y0"].double() + expand64(a["h"], w, tok)
    if op == "dual_lora_":
        return a["y0"].double() + dual64(x, w, tok)
    if op == "dual_lora":
        return dual64(x, w, tok)
    x2 = x.detach().reshape(-1, IN)
    d = delta64(x2, w, tok)
    if op == "lora_delta":
        return d
    base = x2.double() @ a["W0"].detach().double().T + a["bias"].detach().double()
    return (base + d).reshape(*x.shape[:-1], w.out_features)


def _mutate_tensor(cls, name, t, data, T, dtypes=DTYPE_CHOICES):
    """(new tensor, its backing buffer or None, valid?) for a tensor-layout class on argument ``name``."""
    if cls == "dtype":
        dt = data.draw(st.sampled_from(dtypes), label="dtype")
        return t.to(dt), None, None
    if cls == "meta":
        return t.to("meta"), None, False
    if cls == "rows":
        if t.shape[0] > 0 and data.draw(st.booleans(), label="drop"):
            return t[:-1], None, False
        return torch.cat([t, t[:1] if t.shape[0] else torch.zeros_like(t[:0]).new_zeros((1, *t.shape[1:]))]), None, \
            False
    if cls == "cols":
        if t.shape[-1] > 1 and data.draw(st.booleans(), label="drop"):
            return t[..., :-1], None, False
        return torch.cat([t, t[..., :1]], -1), None, False
    if cls == "ndim":
        return t.unsqueeze(0), None, False
    if cls == "transpose":
        if t.ndim == 2:
            return t.t().contiguous().t(), None, None
        if t.ndim == 3:
            return t.transpose(1, 2).contiguous().transpose(1, 2), None, None
        return t, None, True
    if cls == "row_slice":
        pad = data.draw(st.integers(1, 3), label="pad")
        buf = torch.full((*t.shape[:-1], t.shape[-1] + pad), 7.0, dtype=t.dtype)
        k = data.draw(st.integers(0, pad), label="offset")
        v = buf[..., k:k + t.shape[-1]]
        v.copy_(t)
        return v, buf, None
    if cls == "expand_rows":
        if t.ndim == 1:
            return t[:1].expand(t.shape[0]) if t.shape[0] else t, None, True
        if t.ndim == 3:
            return t[:, :1].expand(t.shape) if t.shape[1] else t, None, None
        return t[:1].expand(t.shape) if t.shape[0] else t, None, None
    if cls == "grad":
        return (t.detach().clone().requires_grad_(True) if t.is_floating_point() else t), None, None
    raise AssertionError(cls)


def _layout_expect(op, name, cls, t, world):
    """Whether the (mutated) tensor ``t`` is a valid argument ``name`` of ``op`` (classes whose validity depends
    on the drawn values), as (valid, exception, names)."""
    if cls == "dtype":
        if name == "h":
            return t.dtype == torch.float32, TypeError, ("h",)
        if op == "lora_linear":
            ok = t.dtype == world.x.dtype if name != "x" else t.dtype in FLOATS and t.dtype == world.W0.dtype
            return ok, TypeError, ("x", "W0", "bias") if name == "x" else (name,)
        return t.dtype in FLOATS, TypeError, (name,)
    if cls == "transpose":
        if name == "h":
            return t.is_contiguous(), ValueError, ("h",)
        if name in ("W0", "bias"):
            return True, None, ()
        return t.shape[-1] <= 1 or t.stride(-1) == 1, ValueError, (name,)
    if cls == "row_slice":
        return (name != "h" or t.is_contiguous()), ValueError, (name,)
    if cls == "expand_rows":
        if name == "y":
            return t.shape[0] <= 1, ValueError, ("y",)
        if name == "h":
            return t.is_contiguous(), ValueError, ("h",)
        return True, None, ()
    if cls == "grad":
        if op in ("lora_delta", "lora_linear", "dual_lora") or not t.requires_grad:
            return True, None, ()
        return False, RuntimeError, ("x/y",)
    raise AssertionError(cls)


def _overlap_victims(world, op, elems):
    """Tensors a [T, out] float32 output can be laid over (enough bytes), by name."""
    w, b = world.weights_for(op), world.batch
    names = ("a", "b", "offsets", "ranks", "scales", "slice_info") + \
        (("ln_weight", "ln_bias", "in_slice_info") if w is world.wd else ())
    cands = {f"weights.{k}": getattr(w, k) for k in names}
    cands["batch.meta"] = b.meta
    return {k: v for k, v in cands.items() if v.numel() * v.element_size() >= 4 * elems and elems > 0}


# "overlap" lays outputs over the library's own storage (offsets, ranks, batch meta): should a refusal regress,
# the op would corrupt the offsets it then reads and could crash the interpreter, so that class runs in a
# subprocess with a timeout (test_fuzz_overlap_in_subprocess) unless this process is that subprocess.
_IN_SUB = os.environ.get("LK_FUZZ_SUBPROCESS") == "1"
IN_PROCESS_CLASSES = ALL_CLASSES if _IN_SUB else tuple(c for c in ALL_CLASSES if c != "overlap")


@pytest.mark.parametrize("cls", IN_PROCESS_CLASSES)
@fuzz(12)
@given(data=st.data())
def test_fuzz_sgmv_family(cls, data):
    """Reference backend: every class of argument change, each op drawn."""
    sgmv_example(data, cls, sorted(SGMV_OPS), FLOATS, (torch.float32, torch.float16, torch.bfloat16), "sgmv")


@pytest.mark.skipif(_IN_SUB, reason="already in the subprocess")
def test_fuzz_overlap_in_subprocess(tmp_path):
    import sys

    stats = tmp_path / "stats.json"
    env = dict(os.environ, LK_FUZZ_SUBPROCESS="1", LK_FUZZ_STATS=str(stats))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                           f"{__file__}::test_fuzz_sgmv_family[overlap]", f"{__file__}::test_fuzz_triton_overlap"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=os.path.dirname(__file__))
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-4000:], proc.stderr[-2000:])
    for row in json.load(open(stats)):
        STATS[(row["suite"], row["class"], row["outcome"])] += row["n"]


TRITON_CLASSES = ("none", "row_slice", "expand_rows", "ids", "dtype", "merged")


@fuzz(12)
@given(data=st.data())
def test_fuzz_sgmv_triton_interpreter(data):
    """The Triton kernels (interpreter, tiny shapes; fp16/fp32 only: bf16 tl.dot is broken there) on valid layouts
    the fuzz draws (strided and zero-stride rows, mixed dtypes, wide ids, merged ids) and on refusals."""
    _triton_example(data, data.draw(st.sampled_from(TRITON_CLASSES), label="class"))


@pytest.mark.skipif(not _IN_SUB, reason="runs in the subprocess of test_fuzz_overlap_in_subprocess")
@fuzz(4)
@given(data=st.data())
def test_fuzz_triton_overlap(data):
    _triton_example(data, "overlap")


def _triton_example(data, cls):
    with backends.use_backend("triton"):
        sgmv_example(data, cls, ["add_lora_", "add_lora_mixed", "expand_", "shrink"], (torch.float16, torch.float32),
                     (torch.float32, torch.float16), "sgmv-triton", max_T=4)


def sgmv_example(data, cls, ops, act_dtypes, w_dtypes, suite, max_T=5):
    op = data.draw(st.sampled_from(ops if cls != "overlap" else [o for o in ops if SGMV_OPS[o][1]] or ops),
                   label="op")
    event(f"op {op}")
    outs = data.draw(st.sampled_from([(3,), (2, 2)]), label="outs")
    T = data.draw(st.integers(1 if cls in ("overlap", "ids") else 0, max_T), label="T")
    ids = data.draw(st.lists(st.integers(-1, N - 1), min_size=T, max_size=T), label="ids")
    wdt = data.draw(st.sampled_from(w_dtypes), label="wdtype")
    xdt = data.draw(st.sampled_from(act_dtypes), label="xdtype")
    ydt = data.draw(st.sampled_from(act_dtypes), label="ydtype")
    world = World(data.draw(st.integers(0, 2**16), label="seed"), outs, T, wdt, xdt, ydt, ids)
    tensors, out_name = SGMV_OPS[op]
    merged = data.draw(st.sampled_from([0, 1, 2]), label="m") if op == "add_lora_mixed" else None
    a = {"x": world.x, "y": world.y, "h": world.h, "W0": world.W0, "bias": world.bias,
         "weights": world.weights_for(op),
         "batch": world.batch, "merged": merged}
    owned = world.owned()
    expect = None
    tok = world.tok
    buf = name = None
    pre = None  # an action run inside the contract before the op (ids rebuild, scale argument)

    if cls in TENSOR_CLASSES:
        name = data.draw(st.sampled_from(tensors), label="target")
        dts = [d for d in DTYPE_CHOICES if d in act_dtypes or d not in FLOATS]
        t, buf, valid = _mutate_tensor(cls, name, a[name], data, T, dts)
        a[name] = t
        if valid is None:
            valid, exc, names = _layout_expect(op, name, cls, t, world)
        else:
            exc = ValueError if cls != "dtype" else TypeError
            names = (name,)
            if cls == "rows" and name in ("x", "y", "h"):
                names = ("x", "y", "h", "batch")
            if cls == "ndim" and op == "lora_linear" and name == "x":
                valid = True
        if cls == "meta" and name == "x" and op in ("add_lora_", "add_lora_mixed"):
            names = ("x", "y")
        expect = None if valid else (exc, names)
        event(f"target {name}")
    elif cls == "overlap":
        if out_name is None:  # inputs may share library storage: reading it is fine
            wt = world.weights_for(op)
            if wt.dtype == world.x.dtype and T * IN <= wt.a.numel():
                a["x"] = wt.b.view(-1)[: T * IN].view(T, IN) if T * IN <= wt.b.numel() else \
                    wt.a.view(-1)[: T * IN].view(T, IN)
        else:
            elems = T * world.w.out_features
            victims = _overlap_victims(world, op, elems)
            victims.update({"x": a["x"]} if op != "expand_" and a["x"].dtype == torch.float32 and elems and
                           a["x"].numel() >= elems else {})
            victims.update({"h": a["h"]} if op == "expand_" and elems and a["h"].numel() >= elems else {})
            if victims:
                vname = data.draw(st.sampled_from(sorted(victims)), label="victim")
                v = victims[vname]
                flat = v.detach().reshape(-1)
                flat = flat if flat.dtype == torch.float32 else flat.view(torch.float32)
                k = data.draw(st.integers(0, flat.numel() - elems), label="offset")
                a["y"] = flat[k:k + elems].view(T, world.w.out_features)
                owned[f"victim {vname}"] = v
                expect = (ValueError, ("y",))
                event(f"victim {vname}")
    elif cls == "weights_type":
        a["weights"] = data.draw(st.sampled_from([None, "weights", 3, world.w.a, world.wd if op[0] != "d" else
                                                  world.w]), label="bad")
        expect = (TypeError, ("w_dual" if op.startswith("dual") else "weights",))
    elif cls == "batch_type":
        a["batch"] = data.draw(st.sampled_from([None, "batch", world.batch.meta]), label="bad")
        expect = (TypeError, ("batch",))
    elif cls == "batch_T":
        T2 = data.draw(st.sampled_from([t for t in (T - 1, T + 1, T + 3) if t >= 0]), label="T2")
        a["batch"] = lk.LoRABatch(T2 + 1, N).build(torch.zeros(T2, dtype=torch.int32))
        expect = (ValueError, ("batch",))
    elif cls == "batch_N":
        a["batch"] = lk.LoRABatch(T + 1, N + data.draw(st.integers(1, 5), label="k")).build(
            torch.tensor(ids, dtype=torch.int32))
        expect = (ValueError, ("batch",))
    elif cls == "batch_meta":
        a["batch"] = lk.LoRABatch(T + 1, N, device="meta").build(torch.tensor(ids, dtype=torch.int32).to("meta"),
                                                                  validate=False)
        expect = (ValueError, ("batch",))
    elif cls == "merged":
        m = data.draw(st.sampled_from([None, 0, 2, np.int64(1), 3, 5, -1, N, 2**40, True, 1.0, "1", 1j]), label="m")
        if op in ("lora_delta", "lora_linear", "dual_lora_", "dual_lora"):
            m = None  # (no merged argument)
        a["merged"] = m
        good = m is None or (op.startswith("add_lora") and not isinstance(m, (bool, float, str, complex))
                             and int(m) in (0, 1, 2))
        if good and m is not None:
            a["merged"] = int(m)  # for the reference (the op got the numpy integer)
            pre = ("merged_np", m)
        expect = None if good else (ValueError, ("merged",))
    elif cls == "ids":
        dt = data.draw(st.sampled_from(INT_DTYPES + (torch.float32, torch.bool)), label="id dtype")
        info = torch.iinfo(dt) if dt in INT_DTYPES else None
        wide = [5, N, -2, 2**31, 2**32 + 1, 2**32 + 2, 2**63 - 1, -(2**63), 2**64 - 1, 255, -128, 2**16 + 2]
        vals = data.draw(st.lists(st.one_of(st.integers(-1, 3), st.sampled_from(wide)), min_size=T, max_size=T),
                         label="values")
        if info is not None:
            vals = [v for v in vals if info.min <= v <= info.max]
            vals += [0] * (T - len(vals))
        else:
            vals = [min(max(v, 0), 3) for v in vals]
        validate = data.draw(st.booleans(), label="validate")
        bad_dtype = info is None
        bad_vals = any(v < -1 or v >= N for v in vals)
        pre = ("ids", vals, dt, validate)
        if bad_dtype:
            expect = (TypeError, ("adapter_ids",))
        elif bad_vals and validate:
            expect = (ValueError, ("adapter_ids",))
        else:
            tok = tokens(vals)
    elif cls == "scale_nonfinite":
        i = data.draw(st.sampled_from([0, 1, 2]), label="adapter")
        wt = world.weights_for(op)
        s = data.draw(st.integers(0, wt.scales.shape[0] - 1), label="slice")
        wt.scales[s, i] = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]), label="v")
        owned = world.owned()
    elif cls == "scale_arg":
        bad = data.draw(st.sampled_from([float("nan"), float("inf"), "2", 1 + 1j, True, 1e39, -1e39,
                                         torch.tensor(float("nan"))]), label="scale")
        pre = ("scale", bad)
    # ("none": the plain valid call)

    if a["merged"] is not None and op in ("shrink", "expand_") and cls != "merged":
        a["merged"] = None
    y0 = a["y"].detach().clone() if a["y"].device.type != "meta" else None
    a["y0"] = y0
    for k in tensors:
        if isinstance(a[k], torch.Tensor):
            owned[f"arg {k}"] = buf if (buf is not None and k == name) else a[k]
    skip = {f"arg {out_name}"} if out_name else set()
    if cls == "ids":
        skip.add("batch.meta")  # rebuilt on purpose (a refused build must leave it unchanged: not skipped then)
    if buf is not None and out_name and name == out_name:
        skip.add(f"arg {out_name}")

    def call():
        if pre is not None and pre[0] == "ids":
            _, vals, dt, validate = pre
            t = torch.tensor(vals, dtype=torch.int64).to(dt) if dt not in (torch.uint64,) else \
                torch.tensor([v - 2**64 if v >= 2**63 else v for v in vals], dtype=torch.int64).view(torch.uint64)
            world.batch.build(t, ranks=world.w.ranks, validate=validate)
        args = dict(a)
        if pre is not None and pre[0] == "merged_np":
            args["merged"] = pre[1]
        with torch.no_grad() if cls != "grad" else torch.enable_grad():
            return invoke(op, args)

    def check_ok(out):
        want = expected_out(op, a, world, tok)
        if op in ("add_lora_", "add_lora_mixed", "expand_"):
            assert out is a["y"]
            got = a["y"]
            if buf is not None and name == out_name:  # outside y's window its buffer is untouched
                outside = torch.ones(buf.numel(), dtype=torch.bool)
                outside[_window_index(buf, a["y"])] = False
                assert torch.all(buf.reshape(-1)[outside] == 7.0)
        else:
            got = out
        w = a["weights"]
        dts = [w.dtype] + [a[k].dtype for k in tensors if isinstance(a[k], torch.Tensor)]
        assert_matches(got, want, f"{op}/{cls}", dts)

    if pre is not None and pre[0] == "scale":
        exc_names = ("scale",)
        expect = (TypeError, exc_names) if isinstance(pre[1], (str, bool, complex)) else (ValueError, exc_names)
        # the weights refuse the adapter (nothing changed: checked by the contract); the op then is not run, so
        # run it separately below as "still serving"
        run_contract(suite, cls, lambda: call_scale_only(world, pre[1]), owned, expect, lambda _: None, op=op)
        world.still_serving()
        return
    run_contract(suite, cls, call, owned, expect, check_ok, skip_on_ok=skip, op=op)
    if pre is not None and pre[0] == "ids" and expect is None:
        world.tok = tok
    with backends.use_backend(None):  # (the reference: the Triton examples checked their kernels already)
        world.still_serving()


def call_scale_only(world, bad):
    S = world.w.num_slices
    A = [torch.randn(2, IN) for _ in range(S)]
    B = [torch.randn(o, 2) for o in world.w.slice_outs]
    return world.w.add(A if S > 1 else A[0], B if S > 1 else B[0], scale=bad)


def _window_index(buf, v):
    """Flat indices of ``buf`` covered by the view ``v``."""
    idx = torch.arange(buf.numel()).view(buf.shape)
    off = (v.data_ptr() - buf.data_ptr()) // buf.element_size()
    return torch.as_strided(idx.view(-1), v.shape, v.stride(), off).reshape(-1)


# ---- deformable pooling ------------------------------------------------------------------------------------------


def deform64(value, shapes, starts, loc, attn):
    """The documented semantics, one sample and corner at a time in fp64 (bilinear, zero outside the image, corners
    whose row is outside [0, S) read as zero, levels with H_l < 1 or W_l < 1 and non-finite locations contribute 0)."""
    import math

    v = value.detach().double()
    loc = loc.detach().double()
    attn = attn.detach().double()
    B, S, H, D = v.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    out = torch.zeros(B, Q, H, D, dtype=torch.float64)
    for b in range(B):
        for q in range(Q):
            for h in range(H):
                for lvl in range(L):
                    hl, wl = shapes[lvl]
                    st_ = starts[lvl]
                    if hl < 1 or wl < 1:
                        continue
                    for p in range(P):
                        lx, ly = loc[b, q, h, lvl, p].tolist()
                        if not (math.isfinite(lx) and math.isfinite(ly)):
                            continue
                        x, y = lx * wl - 0.5, ly * hl - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        fx, fy = x - x0, y - y0
                        for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
                            for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
                                row = st_ + yy * wl + xx
                                if 0 <= yy < hl and 0 <= xx < wl and 0 <= row < S:
                                    out[b, q, h] += attn[b, q, h, lvl, p] * wy * wx * v[b, row, h]
    return out.reshape(B, Q, H * D)


DEFORM_CLASSES = ("none", "shapes_form", "shapes_float", "shapes_int_dtype", "shapes_nonpositive", "shapes_huge",
                  "shapes_inconsistent", "starts_values", "starts_dtype", "value_dtype", "points_dtype",
                  "points_meta", "points_strided", "nonfinite_locations", "unvalidated_metadata", "fused_sample")


@pytest.mark.parametrize("cls", DEFORM_CLASSES)
@fuzz(8)
@given(data=st.data())
def test_fuzz_deform(cls, data):
    L = data.draw(st.integers(1, 2), label="L")
    shapes = data.draw(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3)), min_size=L, max_size=L),
                       label="shapes")
    B, Q, H, D, P = (data.draw(st.integers(1, m), label=k) for k, m in (("B", 2), ("Q", 3), ("H", 2), ("D", 3),
                                                                          ("P", 2)))
    vdt = data.draw(st.sampled_from([torch.float32, torch.float64, torch.float16]), label="value dtype")
    ldt = data.draw(st.sampled_from([torch.float32, vdt]), label="loc dtype")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, H, D, generator=g).to(vdt)
    loc = (torch.rand(B, Q, H, L, P, 2, generator=g) * 1.4 - 0.2).to(ldt)
    attn = torch.rand(B, Q, H, L, P, generator=g).to(ldt)
    args = {"value": value, "spatial_shapes": list(shapes), "level_start_index": None, "sampling_locations": loc,
            "attention_weights": attn, "validate": True}
    expect = None
    meta_shapes, meta_starts = list(shapes), [sum(h * w for h, w in shapes[:i]) for i in range(L)]
    compare = True
    fused = None
    if cls == "shapes_form":
        form = data.draw(st.sampled_from(["tuple", "numpy", "tensor", "0-dim tensors", "numpy ints"]), label="form")
        args["spatial_shapes"] = {"tuple": tuple(tuple(p) for p in shapes),
                                  "numpy": np.array(shapes, dtype=np.int64),
                                  "tensor": torch.tensor(shapes, dtype=torch.int64),
                                  "0-dim tensors": [(torch.tensor(h), torch.tensor(w)) for h, w in shapes],
                                  "numpy ints": [(np.int32(h), np.int64(w)) for h, w in shapes]}[form]
    elif cls == "shapes_float":
        form = data.draw(st.sampled_from(["x.0", "x.5", "numpy float", "float tensor", "bool", "str"]), label="form")
        sh = [list(p) for p in shapes]
        k = data.draw(st.integers(0, L - 1), label="level")
        if form == "x.0":
            sh[k][1] = float(sh[k][1])
        elif form == "x.5":
            sh[k][0] = sh[k][0] + 0.5
        elif form == "bool":
            sh[k][0] = True
        elif form == "str":
            sh[k][1] = str(sh[k][1])
        sh = {"numpy float": np.array(shapes, dtype=np.float64),
              "float tensor": torch.tensor(shapes, dtype=torch.float32)}.get(form, sh)
        args["spatial_shapes"] = sh
        args["validate"] = data.draw(st.booleans(), label="validate")
        expect = (TypeError, ("spatial_shapes",))
    elif cls == "shapes_int_dtype":
        dt = data.draw(st.sampled_from([torch.int32, torch.int16, torch.uint8, torch.bool]), label="dtype")
        args["spatial_shapes"] = torch.tensor(shapes).to(dt)
        expect = (TypeError, ("spatial_shapes",))
    elif cls in ("shapes_nonpositive", "shapes_huge"):
        k = data.draw(st.integers(0, L - 1), label="level")
        bad = data.draw(st.sampled_from([(0, 3), (-2, 4), (3, -1)] if cls == "shapes_nonpositive" else
                                        [(2**40, 2**40), (2**62, 3), (2**31, 2**31), (2**63 - 1, 2)]), label="bad")
        sh = list(shapes)
        sh[k] = bad
        as_tensor = data.draw(st.booleans(), label="tensor")
        args["spatial_shapes"] = torch.tensor(sh) if as_tensor else sh
        args["validate"] = data.draw(st.booleans(), label="validate")
        if args["validate"] or (not as_tensor and cls == "shapes_huge" and bad[0] * bad[1] > 2**63 - 1):
            expect = (ValueError, ("spatial_shapes",))
        meta_shapes = sh
        meta_starts = [sum(h * w for h, w in sh[:i]) for i in range(L)]  # (as given, negative sizes too)
        compare = all(abs(h) < 2**20 and abs(w) < 2**20 for h, w in sh)
    elif cls == "shapes_inconsistent":
        sh = list(shapes)
        k = data.draw(st.integers(0, L - 1), label="level")
        sh[k] = (sh[k][0] + 1, sh[k][1])
        args["spatial_shapes"] = sh
        expect = (ValueError, ("value", "spatial_shapes"))
    elif cls == "starts_values":
        starts = list(meta_starts)
        k = data.draw(st.integers(0, L - 1), label="level")
        starts[k] += data.draw(st.sampled_from([-3, -1, 1, 5, 2**40]), label="delta")
        args["level_start_index"] = torch.tensor(starts)
        args["spatial_shapes"] = torch.tensor(shapes)
        args["validate"] = data.draw(st.booleans(), label="validate")
        expect = (ValueError, ("level_start_index",)) if args["validate"] else None
        meta_starts = starts
    elif cls == "starts_dtype":
        form = data.draw(st.sampled_from(["float", "int32", "short", "2-D"]), label="form")
        t = torch.tensor(meta_starts)
        args["level_start_index"] = {"float": t.float(), "int32": t.int(), "short": t[:0], "2-D": t[None]}[form]
        expect = (TypeError if form in ("float", "int32") else ValueError, ("level_start_index",))
    elif cls == "value_dtype":
        dt = data.draw(st.sampled_from([torch.int32, torch.bool, torch.complex64, torch.uint8]), label="dtype")
        args["value"] = value.to(dt)
        expect = (TypeError, ("value",))
    elif cls == "points_dtype":
        which = data.draw(st.sampled_from(["sampling_locations", "attention_weights"]), label="which")
        other = [d for d in (torch.float64, torch.float16, torch.bfloat16, torch.int32) if d not in (vdt, ldt)]
        dt = data.draw(st.sampled_from(other), label="dtype")
        args[which] = args[which].to(dt)
        if which == "sampling_locations" and dt in (vdt, torch.float32):
            expect = (TypeError, ("attention_weights",))
        else:
            expect = (TypeError, (which, "attention_weights"))
    elif cls == "points_meta":
        which = data.draw(st.sampled_from(["sampling_locations", "attention_weights", "value"]), label="which")
        args[which] = args[which].to("meta")
        expect = (ValueError, (which, "sampling_locations"))
    elif cls == "points_strided":
        which = data.draw(st.sampled_from(["sampling_locations", "attention_weights", "value"]), label="which")
        form = data.draw(st.sampled_from(["transposed", "sliced", "expanded"]), label="form")
        t = args[which]
        if form == "transposed":
            t = t.transpose(0, 1).contiguous().transpose(0, 1)
        elif form == "sliced":
            big = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
            big[..., ::2] = t
            t = big[..., ::2]
        else:
            t = t[:1].expand(t.shape)
        args[which] = t
    elif cls == "nonfinite_locations":
        flat = args["sampling_locations"].view(-1, 2)
        for _ in range(data.draw(st.integers(1, 3), label="n")):
            i = data.draw(st.integers(0, flat.shape[0] - 1), label="i")
            flat[i, data.draw(st.integers(0, 1), label="c")] = data.draw(
                st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e30]), label="v")
    elif cls == "unvalidated_metadata":
        sh = [(h + data.draw(st.integers(-1, 2), label="dh"), w) for h, w in shapes]
        starts = [s + data.draw(st.integers(-4, 4), label="ds") for s in meta_starts]
        args.update(spatial_shapes=torch.tensor(sh), level_start_index=torch.tensor(starts), validate=False)
        meta_shapes, meta_starts = sh, starts
    elif cls == "fused_sample":
        ref = torch.rand(Q, 2, generator=g)
        off = torch.randn(B, Q, H, L, P, 2, generator=g).to(ldt)
        logits = torch.randn(B, Q, H, L * P, generator=g).to(ldt)
        form = data.draw(st.sampled_from(["ok", "ref grad", "logits shape", "ref shape", "ref dtype"]), label="form")
        expect = None
        if form == "ref grad":
            ref.requires_grad_(True)
            expect = (ValueError, ("ref",))
        elif form == "logits shape":
            logits = logits[..., :-1]
            expect = (ValueError, ("logits",))
        elif form == "ref shape":
            ref = ref[:, :1]
            expect = (ValueError, ("ref",))
        elif form == "ref dtype":
            ref = ref.to(torch.int64)
            expect = (TypeError, ("ref",))
        fused = (ref, off, logits)

    owned = {k: v for k, v in args.items() if isinstance(v, torch.Tensor)}
    if fused is not None:
        owned.update(ref=fused[0], offsets=fused[1], logits=fused[2])

    def call():
        if fused is not None:
            return lk.deform_sample(args["value"], args["spatial_shapes"], args["level_start_index"], *fused,
                                    validate=args["validate"])
        return lk.deform_pool(args["value"], args["spatial_shapes"], args["level_start_index"],
                              args["sampling_locations"], args["attention_weights"], validate=args["validate"])

    def check_ok(out):
        assert out.shape == (B, Q, H * D) and out.dtype == args["value"].dtype
        if fused is not None:
            ref, off, logits = fused
            wh = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64).view(1, 1, 1, L, 1, 2)
            loc64 = ref.double().view(1, Q, 1, 1, 1, 2) + off.double() / wh
            attn64 = torch.softmax(logits.double().view(B, Q, H, L * P), -1).view(B, Q, H, L, P)
            want = deform64(args["value"], shapes, meta_starts, loc64, attn64)
        elif compare:
            want = deform64(args["value"], meta_shapes, meta_starts, args["sampling_locations"],
                            args["attention_weights"])
        else:
            assert torch.isfinite(out).all()
            return
        tol = {torch.float16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-9}[out.dtype]
        torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)

    run_contract("deform", cls, call, owned, expect, check_ok)
    # still serving: a valid call on fresh inputs of the same shapes
    ok = lk.deform_pool(value, list(shapes), None, loc, attn)
    torch.testing.assert_close(ok.double(), deform64(value, shapes, [sum(h * w for h, w in shapes[:i])
                                                                     for i in range(L)], loc, attn),
                               atol=2e-2, rtol=2e-2)


# ---- the batch builder -------------------------------------------------------------------------------------------

from test_batch import expected as batch_expected  # noqa: E402
from test_input_contract_ops import _tensor as int_tensor, cuda_builder_path  # noqa: E402,F401

WIDE = [-2, -128, 255, 2**15, 2**31, 2**32 + 1, 2**32 + 3, 2**40, -(2**40), 2**63 - 1, -(2**63), 2**64 - 1]
BAD_DTYPES = (torch.float32, torch.float16, torch.bool, torch.complex64)


def _draw_ids(data, n, T, label="ids", dtypes=INT_DTYPES + BAD_DTYPES):
    """(tensor of a drawn dtype, its values as Python ints or None for a non-integer dtype)."""
    dt = data.draw(st.sampled_from(dtypes), label=f"{label} dtype")
    vals = data.draw(st.lists(st.one_of(st.integers(-1, n - 1), st.sampled_from(WIDE)), min_size=T, max_size=T),
                     label=label)
    if dt in BAD_DTYPES:
        return torch.tensor([min(max(v, 0), 1) for v in vals]).to(dt), None
    info = torch.iinfo(dt)
    vals = [v if info.min <= v <= info.max else 0 for v in vals]
    return int_tensor(vals, dt), vals


BATCH_PATHS = ("build", "from_ids", "from_segments")


@pytest.mark.parametrize("path", BATCH_PATHS)
@fuzz(40)
@given(data=st.data())
def test_fuzz_batch_builder(path, data):
    n = data.draw(st.integers(1, 8), label="max_adapters")
    T = data.draw(st.integers(0, 10), label="T")
    validate = data.draw(st.booleans(), label="validate")
    with_ranks = data.draw(st.booleans(), label="ranks")
    g = torch.Generator().manual_seed(T * 31 + n)
    ranks = torch.randint(1, 9, (2, n + data.draw(st.integers(0, 2), label="extra slots")), generator=g,
                          dtype=torch.int32) if with_ranks else None
    cap = data.draw(st.sampled_from([None, "T", "T+3", "T-1", -1, 2.0, True, "str"]), label="max_tokens")
    culprits = []  # (name, exception type)

    def cap_value(T_):
        return {None: None, "T": T_, "T+3": T_ + 3, "T-1": T_ - 1}.get(cap, cap)

    if path == "from_segments":
        K = data.draw(st.integers(0, 5), label="segments")
        ads, vals = _draw_ids(data, n, K, "seg_adapters")
        ldt = data.draw(st.sampled_from([torch.int32, torch.int64, torch.uint8, torch.uint64, torch.float32]),
                        label="lens dtype")
        lens_v = data.draw(st.lists(st.one_of(st.integers(0, 4), st.sampled_from([-1, -(2**40), 2**40, 2**33])),
                                    min_size=K, max_size=K), label="lens")
        if ldt == torch.float32:
            lens = torch.tensor(lens_v, dtype=torch.float32)
            culprits.append(("seg_lens", TypeError))
        else:
            info = torch.iinfo(ldt)
            lens_v = [v if info.min <= v <= info.max else 1 for v in lens_v]
            lens = int_tensor(lens_v, ldt)
        T = sum(max(v, 0) for v in lens_v)
        mt = cap_value(T)
        if vals is None:
            culprits.append(("seg_adapters", TypeError))
        limit = lk.batch.max_capacity(n)
        mt_ok = isinstance(mt, int) and not isinstance(mt, bool) and 0 <= mt <= limit
        if isinstance(mt, (float, str)) or mt is True:
            culprits.append(("max_tokens", TypeError))
        elif mt is not None and not mt_ok:
            culprits.append(("max_tokens", ValueError))
        if ("seg_lens", TypeError) not in culprits:
            if any(v < 0 for v in lens_v):
                culprits.append(("seg_lens", ValueError))
            elif any(v > (mt if mt_ok else limit) for v in lens_v) or (mt is None and T > limit):
                culprits.append(("seg_lens", ValueError))
            elif mt_ok and mt < T:
                culprits.append(("max_tokens", ValueError))
        if validate and vals is not None and any(v < -1 or v >= n for v in vals):
            culprits.append(("seg_adapters", ValueError))
        tok_vals = None if culprits else [v for v, k in zip(vals or [], lens_v) for _ in range(k)]
        owned = {"seg_lens": lens, "seg_adapters": ads}
        call = lambda: lk.LoRABatch.from_segments(lens, ads, n, ranks=ranks, max_tokens=mt,  # noqa: E731
                                                  validate=validate)
    else:
        ids, vals = _draw_ids(data, n, T)
        tok_vals = vals
        owned = {"adapter_ids": ids}
        if vals is None:
            culprits.append(("adapter_ids", TypeError))
        elif validate and any(v < -1 or v >= n for v in vals):
            culprits.append(("adapter_ids", ValueError))
        if path == "from_ids":
            mt = cap_value(T)
            if isinstance(mt, (float, str)) or mt is True:
                culprits.append(("max_tokens", TypeError))
            elif mt is not None and mt < T:
                culprits.append(("max_tokens", ValueError))
            call = lambda: lk.LoRABatch.from_ids(ids, n, ranks=ranks, max_tokens=mt, validate=validate)  # noqa
        else:
            Tc = data.draw(st.sampled_from([max(T, 1), T + 2, max(T - 1, 1)]), label="capacity")
            batch = lk.LoRABatch(Tc, n).build(torch.full((min(2, Tc),), -1, dtype=torch.int32))
            if T > Tc:
                culprits.append(("adapter_ids", ValueError))
            owned.update(meta=batch.meta, num_tokens=batch.num_tokens)
            call = lambda: batch.build(ids, ranks=ranks, validate=validate)  # noqa: E731
    if ranks is not None:
        owned["ranks"] = ranks
    expect = None
    if culprits:
        expect = [(t, (name,)) for name, t in culprits]
    skip = ("meta", "num_tokens")

    def check_ok(b):
        assert b.num_tokens == len(tok_vals)
        assert b.to_dict() == batch_expected(tok_vals, n, ranks[:, :n].tolist() if ranks is not None else None)

    run_contract("batch", path, call, owned, expect, check_ok, skip_on_ok=skip)
    if path == "build":  # still serving: a valid rebuild of the same batch object
        ok_ids = list(range(-1, min(n, batch.max_tokens) - 1))
        batch.build(torch.tensor(ok_ids, dtype=torch.int32))
        assert batch.to_dict() == batch_expected(ok_ids, n)


@fuzz(6)
@given(data=st.data())
def _fuzz_compiled_builder_examples(data, sink):
    n = data.draw(st.integers(1, 8), label="max_adapters")
    T = data.draw(st.integers(1, 24), label="T")
    ids, vals = _draw_ids(data, n, T, dtypes=INT_DTYPES)
    b = lk.LoRABatch(T + data.draw(st.integers(0, 3), label="slack"), n)
    b.build(ids, validate=False)
    assert b.to_dict() == batch_expected(vals, n)
    sink.append(vals)


def test_fuzz_compiled_builder_on_emulator(cuda_builder_path, tmp_path):  # noqa: F811 (the imported fixture)
    """Wide ids of every dtype through the compiled builder's Python path (recorded: the extension must receive
    int32 ids that keep every id's class), then the real kernel on the CPU emulator (subprocess, timeout) on
    exactly what it was handed: the same meta as the spec, nothing aliased."""
    from test_extension import _build_emulator

    sink = []
    _fuzz_compiled_builder_examples(sink=sink)
    calls = cuda_builder_path.calls[-len(sink):] if sink else []
    assert len(sink) >= 4 and len(calls) == len(sink)
    exe = _build_emulator(tmp_path)
    lines = []
    for ids32, Tc, n, init in calls:
        lines += [f"{ids32.numel()} {Tc} {n} -1 {227 * 1024} 1 0 0 0", " ".join(map(str, ids32.tolist())), "",
                  " ".join(map(str, init.tolist()))]
    out = subprocess.run([exe], input="\n".join(lines) + "\n", check=True, capture_output=True, text=True,
                         timeout=300).stdout.splitlines()
    assert len(out) == 2 * len(calls)
    for k, ((ids32, Tc, n, init), vals) in enumerate(zip(calls, sink)):
        assert [v if -1 <= v < n else "bad" for v in vals] == \
            [v if -1 <= v < n else "bad" for v in ids32.tolist()]
        got = torch.tensor(list(map(int, out[2 * k + 1].split())), dtype=torch.int32)
        want = init.clone()
        build_batch_torch_(want, ids32, None, Tc, n)
        assert torch.equal(got, want), vals
        T = len(vals)
        assert got[:T].tolist() == [v if 0 <= v < n else -1 for v in vals]
