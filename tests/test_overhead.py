"""The eager fast path of the SGMV ops (ops/sgmv.py: direct implementation call after one combined argument
predicate) against the dispatcher path (detailed checks + the custom op): same results, same refusals with the
same messages, no state kept between calls (add/remove, rebuilt batches, env changes are seen at once), the
custom op still used wherever the dispatcher matters (profiler, modes, compile), and `lora-bench overhead`."""

import contextlib
import json

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference
from lora_kernels.bench import overhead
from lora_kernels.ops import sgmv as ops_sgmv

from test_ops import _bad_calls, setup


@contextlib.contextmanager
def path(fast: bool):
    prev = ops_sgmv.fast_path
    ops_sgmv.fast_path = fast
    try:
        yield
    finally:
        ops_sgmv.fast_path = prev


@contextlib.contextmanager
def detailed_checks_forbidden(monkeypatch):
    """The detailed checks raise if called: a call that succeeds inside took the fast path."""
    def boom(*a, **k):
        raise AssertionError("detailed checks ran")

    with monkeypatch.context() as m:
        for name in ("_ADD_LORA", "_SHRINK", "_EXPAND"):  # each op's detailed checks (lora_kernels/_argspec.py)
            m.setattr(getattr(ops_sgmv, name), "check", boom)
        yield


def _run_all(w, batch, x, y, merged):
    out = lk.add_lora_(y.clone(), x, w, batch)
    mixed = lk.add_lora_(y.clone(), x, w, batch, merged=merged)
    h = lk.shrink(x, w, batch)
    ex = lk.expand_(y.clone(), h, w, batch)
    return out, mixed, h, ex


@pytest.mark.parametrize("outs", [(20,), (16, 8, 8)])
@torch.no_grad()
def test_fast_path_is_taken_and_matches_the_dispatcher_path(outs, monkeypatch):
    w, batch, ids, x, y = setup(outs, T=9)
    with path(False):
        want = _run_all(w, batch, x, y, merged=2)
    with path(True), detailed_checks_forbidden(monkeypatch):
        got = _run_all(w, batch, x, y, merged=2)
    for g, e in zip(got, want):
        assert torch.equal(g, e)
    # and both are the spec
    ref = reference.add_lora_(y.clone(), x, w.a, w.b, w.offsets, w.ranks, w.scales, batch.token_adapter,
                              list(w.slice_cols), list(w.slice_outs))
    assert torch.equal(got[0], ref)


@pytest.mark.parametrize("fast", [True, False])
def test_bad_inputs_raise_the_same_errors_on_both_paths(fast):
    w, batch, ids, x, y = setup(T=9)
    y0 = y.clone()
    T = x.shape[0]
    buf = torch.zeros(T * 20 + 1 * T * w.max_rank)
    extra = [
        ("merged", ValueError, lambda: lk.add_lora_(y, x, w, batch, merged=w.max_adapters - 1)),  # free slot
        ("merged", ValueError, lambda: lk.add_lora_(y, x, w, batch, merged=-1)),
        ("merged", ValueError, lambda: lk.add_lora_(y, x, w, batch, merged=True)),
        ("merged", ValueError, lambda: lk.shrink(x, w, batch, merged=0)),
        ("x", ValueError, lambda: lk.shrink(x[:, :-1], w, batch)),
        ("batch", ValueError, lambda: lk.shrink(x[:-1], w, batch)),
        ("weights", TypeError, lambda: lk.shrink(x, w.a, batch)),
        ("h", ValueError, lambda: lk.expand_(y, torch.zeros(1, T, w.max_rank * 2)[..., ::2], w, batch)),  # strided
        ("h", ValueError, lambda: lk.expand_(y, torch.zeros(1, T, w.max_rank, device="meta"), w, batch)),
        ("y", ValueError, lambda: lk.expand_(buf[: T * 20].view(T, 20), buf[T * 20 - 5:][: T * w.max_rank]
                                              .view(1, T, w.max_rank), w, batch)),  # y overlaps h
        ("y", ValueError, lambda: lk.expand_(y[:, :-1], torch.zeros(1, T, w.max_rank), w, batch)),
        ("batch", ValueError, lambda: lk.expand_(y[:-1], torch.zeros(1, T - 1, w.max_rank), w, batch)),
    ]
    msgs = {}
    for fp in (fast, not fast):
        with path(fp):
            for k, (name, exc, call) in enumerate(_bad_calls(w, batch, x, y) + extra):
                with pytest.raises(exc, match=rf"^{name}:") as ei:
                    call()
                assert torch.equal(y, y0), name
                msgs.setdefault(k, set()).add(str(ei.value))
    assert all(len(m) == 1 for m in msgs.values()), [m for m in msgs.values() if len(m) > 1]


@torch.no_grad()
def test_lora_linear_refusals_on_its_combined_check():
    w, batch, ids, x, y = setup(T=9)
    W0, bias = torch.randn(20, 24), torch.randn(20)
    want = lk.lora_linear(x, W0, bias, w, batch)
    torch.testing.assert_close(want, torch.nn.functional.linear(x, W0, bias) + lk.lora_delta(x, w, batch))
    bad = [
        ("weights", TypeError, lambda: lk.lora_linear(x, W0, bias, w.a, batch)),
        ("x", TypeError, lambda: lk.lora_linear(x.double(), W0, bias, w, batch)),
        ("x", ValueError, lambda: lk.lora_linear(x[:, :-1], W0, bias, w, batch)),
        ("x", ValueError, lambda: lk.lora_linear(x.t().contiguous().t(), W0, bias, w, batch)),
        ("W0", TypeError, lambda: lk.lora_linear(x, W0.half(), bias, w, batch)),
        ("W0", ValueError, lambda: lk.lora_linear(x, W0[:-1], bias, w, batch)),
        ("bias", ValueError, lambda: lk.lora_linear(x, W0, bias[:-1], w, batch)),
        ("bias", TypeError, lambda: lk.lora_linear(x, W0, bias.half(), w, batch)),
        ("batch", ValueError, lambda: lk.lora_linear(x[:-1], W0, bias, w, batch)),
        ("batch", TypeError, lambda: lk.lora_linear(x, W0, bias, w, None)),
    ]
    for name, exc, call in bad:
        with pytest.raises(exc, match=rf"^{name}:"):
            call()


@torch.no_grad()
def test_adapter_add_and_remove_are_seen_by_the_next_call():
    w, batch, ids, x, y = setup(T=12)
    m = 1
    lk.add_lora_(y.clone(), x, w, batch, merged=m)  # validated and served once
    w.remove(m)
    with pytest.raises(ValueError, match=r"^merged: .*free slot"):
        lk.add_lora_(y.clone(), x, w, batch, merged=m)
    # tokens of the removed adapter now get nothing, on the next call
    got = lk.add_lora_(y.clone(), x, w, batch)
    ref = reference.add_lora_(y.clone(), x, w.a, w.b, w.offsets, w.ranks, w.scales, batch.token_adapter,
                              [0], [20])
    assert torch.equal(got, ref)
    assert torch.equal(got[ids == m], y[ids == m])
    # a different adapter (rank 5) in the same slot is served at once, mixed mode included
    g = torch.Generator().manual_seed(3)
    assert w.add(torch.randn(5, 24, generator=g), torch.randn(20, 5, generator=g), adapter_id=m) == m
    got = lk.add_lora_(y.clone(), x, w, batch)
    ref = reference.add_lora_(y.clone(), x, w.a, w.b, w.offsets, w.ranks, w.scales, batch.token_adapter,
                              [0], [20])
    assert torch.equal(got, ref) and not torch.equal(got[ids == m], y[ids == m])
    lk.add_lora_(y.clone(), x, w, batch, merged=m)


@torch.no_grad()
def test_batch_rebuilds_and_new_capacities_are_seen_by_the_next_call():
    w, batch, ids, x, y = setup(T=12)
    lk.add_lora_(y.clone(), x, w, batch)
    batch.build(ids[:7], ranks=w.ranks)  # the same object rebuilt for fewer tokens
    with pytest.raises(ValueError, match=r"^batch: .*7 tokens"):
        lk.add_lora_(y.clone(), x, w, batch)
    out = lk.add_lora_(y[:7].clone(), x[:7], w, batch)
    ref = reference.add_lora_(y[:7].clone(), x[:7], w.a, w.b, w.offsets, w.ranks, w.scales, batch.token_adapter,
                              [0], [20])
    assert torch.equal(out, ref)
    # a batch with other capacities: more adapter slots than the weights have is refused, fewer is fine
    wide = lk.LoRABatch(12, w.max_adapters + 3).build(ids, ranks=None)
    with pytest.raises(ValueError, match=r"^batch: .*max_adapters"):
        lk.add_lora_(y.clone(), x, w, wide)
    with pytest.raises(ValueError, match=r"^batch: .*max_adapters"):
        lk.shrink(x, w, wide)
    narrow = lk.LoRABatch(64, w.max_adapters - 1).build(ids.clamp(max=w.max_adapters - 2), ranks=w.ranks)
    lk.add_lora_(y.clone(), x, w, narrow)
    # other weights (other in_features) with the same batch
    w2 = lk.LoRAWeights(16, 20, w.max_adapters, 8)
    with pytest.raises(ValueError, match=r"^x: .*in_features"):
        lk.add_lora_(y.clone(), x, w2, narrow)


@torch.no_grad()
def test_forced_backend_env_changes_are_seen_per_call(monkeypatch):
    w, batch, ids, x, y = setup(T=5)
    lk.add_lora_(y.clone(), x, w, batch)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        lk.add_lora_(y.clone(), x, w, batch)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LORA_KERNELS_BACKEND"):
        lk.shrink(x, w, batch)
    monkeypatch.delenv("LORA_KERNELS_BACKEND")
    lk.add_lora_(y.clone(), x, w, batch)
    assert lk.backends.env("LORA_KERNELS_BACKEND") is None
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "reference")
    assert lk.backends.env("LORA_KERNELS_BACKEND") == "reference" == lk.backends.forced()


def test_trainable_weights_in_grad_mode_record_no_graph_on_either_path():
    """The custom op runs below autograd; the fast path must not let the reference record a graph through
    weights that require grad (it defers to the dispatcher then)."""
    w, batch, ids, x, y = setup(T=5)
    w.requires_grad_()
    got = {}
    for fast in (True, False):
        with path(fast):
            yy = y.clone()
            lk.add_lora_(yy, x, w, batch)
            assert not yy.requires_grad and yy.grad_fn is None, fast
            got[fast] = yy
    assert torch.equal(got[True], got[False]) and not torch.equal(got[True], y)


@torch.no_grad()
def test_fast_path_bumps_the_version_counter_like_the_mutating_op():
    w, batch, ids, x, y = setup(T=5)
    for fast in (True, False):
        with path(fast), overhead.stub_kernels():  # a kernel that writes through a pointer bumps nothing itself
            v = y._version
            lk.add_lora_(y, x, w, batch)
            assert y._version > v, fast
            v = y._version
            lk.expand_(y, lk.shrink(x, w, batch), w, batch)
            assert y._version > v, fast
    with torch.inference_mode():  # inference tensors have no version counter: still fine
        yi = y.clone()
        lk.add_lora_(yi, x, w, batch)


@torch.no_grad()
def test_dispatcher_is_used_when_it_matters():
    w, batch, ids, x, y = setup(T=5)
    assert ops_sgmv._eager(x, y)
    with torch.device("cpu"):  # a TorchFunctionMode
        assert not ops_sgmv._eager(x, y)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        assert not ops_sgmv._eager(x, y)
        lk.add_lora_(y, x, w, batch)
    assert any("lora_kernels::add_lora_" in e.name for e in prof.events())
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx, fy = mode.from_tensor(x), mode.from_tensor(y)
        assert not ops_sgmv._eager(fx, fy)
    assert not ops_sgmv._eager(fx, fy)  # fake tensors outside the mode: subclass
    assert not ops_sgmv._eager(x.as_subclass(_Sub), y)


class _Sub(torch.Tensor):
    pass


def test_lora_bench_overhead_cli(tmp_path):
    out = tmp_path / "o.json"
    assert lk.cli.main(["overhead", "--iters", "20", "--repeats", "2", "--no-cuda", "--no-launcher", "--out",
                        str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["schema"] == overhead.SCHEMA
    ops = {(r["op"], r["path"]) for r in rec["rows"]}
    for op in ("add_lora_", "add_lora_(merged=0)", "shrink", "expand_", "LoRALinear.forward", "lora_linear"):
        assert (op, "fast") in ops and (op, "dispatcher") in ops
    assert all(r["us_median"] > 0 and r["mode"] == "stubbed" for r in rec["rows"])
    assert ops_sgmv.fast_path  # restored


def test_lora_bench_overhead_launcher_mode(tmp_path):
    """The ``launcher`` rows (child process, stand-in sm_90 driver): every (op, path, T) is there, the
    persistent kernel was really compiled (an sm_90 cubin in Triton's JIT cache) and every op call ended in
    exactly one call of the stubbed driver launch (launches == calls), with the persistent grid. CPU CI: a few
    seconds (child start, one compile per variant, cached by Triton afterwards)."""
    pytest.importorskip("triton")
    out = tmp_path / "o.json"
    assert lk.cli.main(["overhead", "--iters", "8", "--repeats", "2", "--no-cuda", "--out", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if r["mode"] == "launcher"]
    keys = {(r["op"], r["path"], r["T"]) for r in rows}
    assert keys == {(op, p, T) for op in ("add_lora_", "add_lora_(merged=0)")
                    for p in ("fast", "fast-plain", "dispatcher") for T in (1, 16)}, keys
    for r in rows:
        assert r["calls"] == 1 + 10 + 8 * 2  # first call, warm-up, timed
        assert r["launches"] == r["calls"], r  # the stub was hit once per call, never skipped or doubled
        assert r["grid"][0] >= 1 and r["grid"][1:] == [1, 1], r
        assert r["jit_cache"] >= 1 and r["cubin_bytes"] > 1000, r
        assert r["us_median"] > 0 and r["hidden"] == 4096 and r["dtype"] == "bf16"
    assert max(r["jit_cache"] for r in rows) <= 4  # one variant per (T bucket, mixed) at most: no recompiles


@pytest.mark.cuda
@torch.no_grad()
def test_fast_path_on_cuda_matches_the_dispatcher_and_captures_in_a_graph():
    """Triton kernels launched directly (fast path) vs through the custom op; the fast path in a CUDA graph."""
    g = torch.Generator().manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    w = lk.LoRAWeights(256, (128, 64), 6, 32, dtype=dt, device=dev)
    for r in (8, 32, 16):
        w.add([torch.randn(r, 256, generator=g) / 16] * 2, [torch.randn(128, r, generator=g) / r**0.5,
                                                            torch.randn(64, r, generator=g) / r**0.5], alpha=16.0)
    ids = torch.tensor([0, 1, -1, 2, 1, 0, 2, 2, -1, 1, 0], dtype=torch.int32, device=dev)
    batch = lk.LoRABatch(16, w.max_adapters, device=dev).build(ids, ranks=w.ranks)
    x = torch.randn(ids.shape[0], 256, generator=g).to(dev, dt)
    y = torch.randn(ids.shape[0], 192, generator=g).to(dev, dt)
    with path(False):
        want = _run_all(w, batch, x, y, merged=1)
    with path(True):
        got = _run_all(w, batch, x, y, merged=1)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    yg = y.clone()
    v = yg._version
    with path(True):
        lk.add_lora_(yg, x, w, batch)
    assert yg._version > v  # Triton writes through a pointer: the fast path bumps the counter itself
    with path(True):
        out = y.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            lk.add_lora_(out, x, w, batch)  # warm-up (compiles) outside the capture
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            lk.add_lora_(out, x, w, batch)
        out.copy_(y)
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want[0], rtol=1e-2, atol=1e-2)
