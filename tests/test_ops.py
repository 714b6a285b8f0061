"""Public ops: results vs the spec on every backend that runs here, refusals that leave outputs untouched,
opcheck of every custom op, torch.compile of LoRALinear, NVTX, and the import contract."""

import subprocess
import sys

import pytest
import torch

import lora_kernels as lk
from lora_kernels import reference

from test_reference import naive_delta


def setup(outs=(20,), ranks=(1, 8, 33, 16), T=33, in_f=24, dtype=torch.float32, frac_none=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    outs = list(outs)
    S = len(outs)
    w = lk.LoRAWeights(in_f, outs if S > 1 else outs[0], max_adapters=len(ranks) + 2, max_rank=max(ranks), dtype=dtype)
    for r in ranks:
        A = [torch.randn(r, in_f, generator=g) / in_f**0.5 for _ in range(S)]
        B = [torch.randn(o, r, generator=g) / r**0.5 for o in outs]
        w.add(A if S > 1 else A[0], B if S > 1 else B[0], alpha=2.0 * r)
    ids = torch.randint(0, len(ranks) + 1, (T,), generator=g, dtype=torch.int32)  # id len(ranks) = empty slot
    ids[torch.rand(T, generator=g) < frac_none] = -1
    x = torch.randn(T, in_f, generator=g).to(dtype)
    y = torch.randn(T, sum(outs), generator=g).to(dtype)
    batch = lk.LoRABatch(T + 5, w.max_adapters).build(ids, ranks=w.ranks)
    return w, batch, ids, x, y


@pytest.mark.parametrize("outs", [(20,), (16, 8, 8)])
def test_add_lora_shrink_expand_match_naive(outs):
    w, batch, ids, x, y = setup(outs)
    want = y.double() + naive_delta(x, w, ids)
    y1 = y.clone()
    assert lk.add_lora_(y1, x, w, batch) is y1
    torch.testing.assert_close(y1.double(), want, rtol=1e-5, atol=1e-5)
    h = lk.shrink(x, w, batch)
    assert h.shape == (len(outs), 33, 33) and h.dtype == torch.float32
    y2 = y.clone()
    lk.expand_(y2, h, w, batch)
    torch.testing.assert_close(y2, y1, rtol=1e-6, atol=1e-6)
    none = ids < 0
    assert torch.equal(y1[none], y[none])  # tokens with no adapter are bit-identical


def test_strided_rows_without_copy():
    w, batch, ids, x, y = setup()
    xw = torch.zeros(33, 40)
    xw[:, 3:27] = x
    yw = torch.zeros(33, 50)
    yw[:, 5:25] = y
    lk.add_lora_(yw[:, 5:25], xw[:, 3:27], w, batch)
    torch.testing.assert_close(yw[:, 5:25].double(), y.double() + naive_delta(x, w, ids), rtol=1e-5, atol=1e-5)
    assert torch.all(yw[:, :5] == 0) and torch.all(yw[:, 25:] == 0)


def test_empty_batch_is_a_no_op():
    w, _, _, _, _ = setup()
    batch = lk.LoRABatch(4, w.max_adapters).build(torch.empty(0, dtype=torch.int32))
    y = torch.empty(0, 20)
    assert lk.add_lora_(y, torch.empty(0, 24), w, batch) is y
    assert lk.shrink(torch.empty(0, 24), w, batch).shape == (1, 0, 33)


def _bad_calls(w, batch, x, y):
    """(name the error must mention, exception type, call) for every refusal of item 7."""
    T = x.shape[0]
    other = lk.LoRABatch(T + 1, w.max_adapters).build(torch.zeros(T + 1, dtype=torch.int32))
    big = lk.LoRABatch(T, w.max_adapters + 1).build(torch.zeros(T, dtype=torch.int32))
    buf = torch.randn(T, 30)
    return [
        ("x", TypeError, lambda: lk.add_lora_(y, x.to(torch.int32), w, batch)),
        ("y", TypeError, lambda: lk.add_lora_(y.to(torch.float64), x, w, batch)),
        ("x", ValueError, lambda: lk.add_lora_(y, x[:, :-1], w, batch)),
        ("x", ValueError, lambda: lk.add_lora_(y, x.unsqueeze(0), w, batch)),
        ("y", ValueError, lambda: lk.add_lora_(y[:, :-1], x, w, batch)),
        ("x", ValueError, lambda: lk.add_lora_(y, x.t().contiguous().t(), w, batch)),  # inner dim strided
        ("y", ValueError, lambda: lk.add_lora_(y.t().contiguous().t(), x, w, batch)),
        ("batch", ValueError, lambda: lk.add_lora_(y[:-1], x[:-1], w, batch)),  # built for T, given T-1
        ("batch", ValueError, lambda: lk.add_lora_(y, x, w, other)),
        ("batch", ValueError, lambda: lk.add_lora_(y, x, w, big)),  # ids may name slots the weights lack
        ("batch", TypeError, lambda: lk.add_lora_(y, x, w, batch.meta)),
        ("weights", TypeError, lambda: lk.add_lora_(y, x, w.a, batch)),
        ("x", ValueError, lambda: lk.add_lora_(y, torch.empty(x.shape, device="meta"), w, batch)),
        ("y", ValueError, lambda: lk.add_lora_(buf[:, 10:30], buf[:, :24], w, batch)),  # y overlaps x
        ("h", ValueError, lambda: lk.expand_(y, torch.zeros(2, T, w.max_rank), w, batch)),  # slices mismatch
        ("h", TypeError, lambda: lk.expand_(y, torch.zeros(1, T, w.max_rank, dtype=torch.float16), w, batch)),
        ("x/y", RuntimeError, lambda: lk.add_lora_(y, x.clone().requires_grad_(), w, batch)),
    ]


def test_refusals_name_the_argument_and_leave_y_untouched():
    w, batch, ids, x, y = setup(T=9)
    y0 = y.clone()
    for name, exc, call in _bad_calls(w, batch, x, y):
        with pytest.raises(exc, match=rf"^{name}:"):
            call()
        assert torch.equal(y, y0), name


def _opcheck_args(outs=(20,)):
    w, batch, ids, x, y = setup(outs, T=7)
    h = lk.shrink(x, w, batch)
    return w, batch, ids, x, y, h


@pytest.mark.parametrize("outs", [(20,), (16, 8, 8)])
def test_opcheck_every_custom_op(outs):
    w, batch, ids, x, y, h = _opcheck_args(outs)
    ops = torch.ops.lora_kernels
    torch.library.opcheck(ops.shrink.default, (x, w.a, w.offsets, w.ranks, batch.meta, batch.max_tokens, w.max_rank))
    torch.library.opcheck(ops.expand_.default, (y.clone(), h, w.b, w.offsets, w.ranks, w.scales, batch.meta,
                                                w.slice_info, batch.max_tokens))
    torch.library.opcheck(ops.add_lora_.default, (y.clone(), x, w.a, w.b, w.offsets, w.ranks, w.scales, batch.meta,
                                                  w.slice_info, batch.max_tokens, w.max_rank))
    torch.library.opcheck(ops.build_batch_.default, (batch.meta.clone(), ids, w.ranks, batch.max_tokens,
                                                     w.max_adapters))
    torch.library.opcheck(ops.build_batch_.default, (batch.meta.clone(), ids, None, batch.max_tokens, w.max_adapters))


def test_mutating_ops_declare_it():
    for name in ("expand_", "add_lora_", "build_batch_"):
        schema = getattr(torch.ops.lora_kernels, name).default._schema
        writes = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        # add_lora_ also writes the batch's plan (the persistent kernel's counters) and workspace
        extra = ["plan", "ws"] if name == "add_lora_" else []
        assert writes == [schema.arguments[0].name] + extra, str(schema)
    assert "!" not in str(torch.ops.lora_kernels.shrink.default._schema)


class TwoLayer(torch.nn.Module):
    def __init__(self, w1, w2):
        super().__init__()
        self.l1 = lk.nn.LoRALinear(torch.nn.Linear(24, 20), w1)
        self.l2 = lk.nn.LoRALinear(torch.nn.Linear(20, 24), w2)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


def _two_layer():
    w1, batch, ids, x, _ = setup(T=12)
    w2 = lk.LoRAWeights(20, 24, max_adapters=w1.max_adapters, max_rank=8, dtype=torch.float32)
    for r in (2, 8, 4, 1):
        w2.add(torch.randn(r, 20), torch.randn(24, r))
    return TwoLayer(w1, w2), batch, ids, x


@torch.no_grad()
def test_lora_linear_matches_base_plus_delta_and_compiles_fullgraph():
    model, batch, ids, x = _two_layer()
    with lk.use_batch(batch):
        eager = model(x.view(3, 4, 24))
        compiled = torch.compile(model, fullgraph=True, backend="inductor")
        got = compiled(x.view(3, 4, 24))
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
        # New ids built in place: the compiled model follows without recompiling.
        ids2 = torch.flip(ids, [0])
        batch.build(ids2, ranks=model.l1.weights.ranks)
        torch._dynamo.config.error_on_recompile = True
        try:
            got2 = compiled(x.view(3, 4, 24))
        finally:
            torch._dynamo.config.error_on_recompile = False
    h = model.l1.base(x) + naive_delta(x, model.l1.weights, ids2).float()
    want = model.l2.base(torch.relu(h)) + naive_delta(torch.relu(h), model.l2.weights, ids2).float()
    torch.testing.assert_close(got2.view(12, 24), want, rtol=1e-4, atol=1e-4)


def test_lora_linear_needs_a_batch_and_matching_weights():
    lin = torch.nn.Linear(24, 20)
    w = lk.LoRAWeights(24, 20, max_adapters=2, max_rank=4, dtype=torch.float32)
    layer = lk.nn.LoRALinear(lin, w)
    with pytest.raises(RuntimeError, match="no LoRABatch"):
        with torch.no_grad():
            layer(torch.randn(2, 24))
    with pytest.raises(ValueError, match="in_features"):
        lk.nn.LoRALinear(torch.nn.Linear(23, 20), w)
    made = lk.nn.LoRALinear(lin, max_adapters=3, max_rank=8)
    assert made.weights.dtype == torch.float32 and made.weights.max_adapters == 3


def test_nvtx_ranges_on_and_off():
    w, batch, ids, x, y = setup(T=5)
    with lk.nvtx(True):
        assert lk.profiling.enabled()
        lk.add_lora_(y, x, w, batch)
    assert not lk.profiling.enabled()


def test_import_does_not_initialise_cuda_or_import_triton():
    code = (
        "import sys, torch, lora_kernels as lk; "
        "assert not torch.cuda.is_initialized(); "
        "assert 'triton' not in sys.modules, 'triton imported'; "
        "w = lk.LoRAWeights(8, 8, 2, 2); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_forced_backend_errors_are_clear(monkeypatch):
    w, batch, ids, x, y = setup(T=5)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        lk.add_lora_(y, x, w, batch)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LORA_KERNELS_BACKEND"):
        lk.add_lora_(y, x, w, batch)
    monkeypatch.delenv("LORA_KERNELS_BACKEND")
    with lk.backends.use_backend("reference"):
        lk.add_lora_(y, x, w, batch)


@pytest.mark.parametrize("outs", [(20,), (16, 8, 8)])
def test_public_ops_on_the_triton_backend(outs):
    """The same public calls routed to the Triton kernels (the CPU interpreter here, the GPU under -m cuda)."""
    pytest.importorskip("triton")
    if not lk.backends.interpreting() and not torch.cuda.is_available():
        pytest.skip("Triton needs TRITON_INTERPRET=1 or a GPU")
    w, batch, ids, x, y = setup(outs, T=17, dtype=torch.float16)
    with lk.backends.use_backend("reference"):
        want = lk.add_lora_(y.clone(), x, w, batch)
    with lk.backends.use_backend("triton"):
        got = lk.add_lora_(y.clone(), x, w, batch)
        h = lk.shrink(x, w, batch)
        got2 = lk.expand_(y.clone(), h, w, batch)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got2, want, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(h, reference.shrink(x, w.a, w.offsets, w.ranks, ids.clamp(min=-1), w.max_rank),
                               rtol=1e-3, atol=1e-3)
    assert torch.equal(got[ids < 0], y[ids < 0])


class _TransposedOut(torch.nn.Module):
    """A base layer whose output is a non-contiguous view (as some quantised or fused linears return)."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def forward(self, x):
        return (x @ self.lin.weight.t()).t().contiguous().t() + self.lin.bias


@torch.no_grad()
def test_lora_linear_with_a_non_contiguous_base_output():
    w, batch, ids, x, _ = setup(T=6)
    lin = torch.nn.Linear(24, 20)
    layer = lk.nn.LoRALinear(_TransposedOut(lin), w, batch=batch)
    out = layer(x)
    torch.testing.assert_close(out.double(), lin(x).double() + naive_delta(x, w, ids), rtol=1e-5, atol=1e-5)
