"""The vLLM plugin against the installed vLLM itself (requirements-engines.txt): every abstract method of vLLM's
``PunicaWrapperBase`` on :class:`PunicaWrapperLoRAKernels` vs vLLM's own ``PunicaWrapperGPU`` (its Triton
kernels, run by Triton's interpreter on the CPU), on vLLM's own ``LoRAConfig`` / ``LoRAMapping`` and its own
index conversion; plus the plugin entry point, the version pin and the one-conversion-per-load-event cache.

On a CPU machine vLLM disables Triton (vllm/triton_utils/importing.py: no active GPU driver) unless
``CUDA_VISIBLE_DEVICES`` is set and empty, and pins host memory when its platform says so: both are set for the
import / the tests here, only when torch sees no GPU.
"""

import importlib.util

import pytest
import torch
from helpers import import_engine_modules

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed (pip install --no-deps -r requirements-engines.txt)", allow_module_level=True)

from lora_kernels.integrations import vllm_plugin  # noqa: E402  (imports no vLLM)

if vllm_plugin.installed_vllm_version() not in vllm_plugin.SUPPORTED_VLLM_VERSIONS:
    pytest.skip(vllm_plugin.version_message(vllm_plugin.installed_vllm_version()), allow_module_level=True)


# vLLM's LoRA modules with real Triton kernels (punica_gpu binds lora_shrink / lora_expand at import)
HAS_VLLM_TRITON = import_engine_modules("vllm.triton_utils", "vllm.lora.punica_wrapper.punica_gpu")[0].HAS_TRITON

from vllm.config.lora import LoRAConfig  # noqa: E402
from vllm.lora.layers import LoRAMapping  # noqa: E402
from vllm.lora.punica_wrapper import punica_selector  # noqa: E402
from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase  # noqa: E402
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU  # noqa: E402

from lora_kernels.integrations.vllm_plugin import PunicaWrapperLoRAKernels  # noqa: E402

needs_vllm_triton = pytest.mark.skipif(
    not HAS_VLLM_TRITON, reason="vLLM's Triton kernels are disabled (vllm.triton_utils was imported before this "
                                "module could set CUDA_VISIBLE_DEVICES='')")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.float16  # vLLM's kernels take fp16 / bf16 only
TOL = dict(atol=3e-3, rtol=3e-3)
MAX_LORAS, R, IN = 4, 8, 32
SLOTS = [5, None, 7, 9]  # lora_index_to_id: slot 1 empty
RANKS = [3, 0, 8, 5]  # true rank per slot (vLLM pads to R with zero rows)
QKV, GATE_UP = (16, 8, 8), (16, 16)

MAPPINGS = {
    # mixed slots, no-LoRA tokens (0), two requests of the same adapter apart
    "prefill": LoRAMapping((5, 5, 0, 7, 7, 7, 9, 0, 5), (5, 0, 9), is_prefill=True),
    "decode": LoRAMapping((9, 0, 7, 5), (9, 0, 7, 5), is_prefill=False),
    "no_lora": LoRAMapping((0, 0, 0), (0, 0, 0), is_prefill=False),
}


@pytest.fixture(autouse=True)
def _no_pinned_memory(monkeypatch):
    if not torch.cuda.is_available():
        import vllm.utils.torch_utils as tu

        monkeypatch.setattr(tu, "PIN_MEMORY", False)


@pytest.fixture(autouse=True)
def _fresh_vllm_pointer_caches():
    """vLLM's Triton ops cache the weight stacks' pointer/stride tensors keyed by ``data_ptr`` (an engine allocates
    its stacks once). Tests free and allocate stacks of other shapes, and the allocator may hand a later test the
    address of an earlier one's stack: vLLM would then read the stale strides (seen in the full suite, not in
    this file alone). Start every test from empty caches."""
    from vllm.lora.ops.triton_ops import utils as vllm_triton_utils

    for name in ("_LORA_A_PTR_DICT", "_LORA_B_PTR_DICT"):
        getattr(vllm_triton_utils, name).clear()
    yield


def _stacks(g, outs, ranks=RANKS, rank_rows=R):
    """vLLM's layout: A [N, 1, R, in], B [N, 1, out, R] per slice, slot i filled up to ranks[i]."""
    a = [torch.zeros(MAX_LORAS, 1, rank_rows, IN, dtype=DT, device=DEV) for _ in outs]
    b = [torch.zeros(MAX_LORAS, 1, o, rank_rows, dtype=DT, device=DEV) for o in outs]
    for s, o in enumerate(outs):
        for i, r in enumerate(ranks):
            a[s][i, 0, :r] = (torch.randn(r, IN, generator=g) / 4).to(DT)
            b[s][i, 0, :, :r] = (torch.randn(o, r, generator=g) / 2).to(DT)
    return tuple(a), tuple(b)


def _pair(mapping):
    """vLLM's GPU wrapper and ours, both given the same vLLM metadata."""
    cfg = LoRAConfig(max_loras=MAX_LORAS, max_lora_rank=R)
    out = []
    for cls in (PunicaWrapperGPU, PunicaWrapperLoRAKernels):
        p = cls(32, 8, DEV, lora_config=cfg)
        p.update_metadata(mapping, SLOTS, MAX_LORAS + 1, 100)  # vLLM passes lora_slots + 1
        out.append(p)
    return out


def _run_both(mapping, call):
    """``call(wrapper)`` -> tensors, on both wrappers; returns (vLLM's, ours)."""
    theirs, ours = _pair(mapping)
    return call(theirs), call(ours)


def _assert_same(got, want):
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_.float(), w_.float(), **TOL)


# ---- the interface ---------------------------------------------------------------------------------------------
def test_every_abstract_method_is_implemented():
    assert PunicaWrapperBase.__abstractmethods__, "vLLM's base lost its abstract methods: re-read punica_base.py"
    assert not PunicaWrapperLoRAKernels.__abstractmethods__
    for name in PunicaWrapperBase.__abstractmethods__:
        assert getattr(PunicaWrapperLoRAKernels, name) is not getattr(PunicaWrapperBase, name), name
    assert issubclass(PunicaWrapperLoRAKernels, PunicaWrapperBase)


@pytest.mark.parametrize("name", sorted(MAPPINGS))
def test_metadata_is_vllms(name):
    theirs, ours = _pair(MAPPINGS[name])
    for attr in ("token_lora_indices", "sampler_indices", "sampler_indices_padded"):
        assert torch.equal(getattr(ours, attr), getattr(theirs, attr)), attr
    T = len(MAPPINGS[name].index_mapping)  # the rest of vLLM's buffer is torch.empty
    assert torch.equal(ours._embeddings_indices[:T], theirs._embeddings_indices[:T])
    assert ours.is_prefill == theirs.is_prefill
    assert torch.equal(ours.lk.token_lora_indices.long(), theirs.token_lora_indices)


# ---- each method vs PunicaWrapperGPU -----------------------------------------------------------------------------
@needs_vllm_triton
@pytest.mark.parametrize("name", sorted(MAPPINGS))
def test_add_lora_linear_qkv_and_gate_up(name):
    mapping = MAPPINGS[name]
    g = torch.Generator().manual_seed(1)
    T = len(mapping.index_mapping)
    x = (torch.randn(T, IN, generator=g)).to(DT).to(DEV)
    for outs in (QKV, GATE_UP):
        a, b = _stacks(g, outs)
        y0 = torch.randn(T, sum(outs) + 3, generator=g).to(DT).to(DEV)  # 3 extra columns stay untouched

        def call(p, a=a, b=b, y0=y0, outs=outs):
            y = y0.clone()
            p.add_lora_linear(y, x, a, b, 0.5, outs)
            return (y,)

        _assert_same(*_run_both(mapping, call))


@needs_vllm_triton
def test_add_lora_linear_overwrite():
    """``add_inputs=False`` (vLLM's dual-stream path): rows with a LoRA get the delta, other rows keep y."""
    mapping = MAPPINGS["prefill"]
    g = torch.Generator().manual_seed(2)
    a, b = _stacks(g, GATE_UP)
    x = torch.randn(9, IN, generator=g).to(DT).to(DEV)
    y0 = torch.randn(9, sum(GATE_UP), generator=g).to(DT).to(DEV)

    def call(p):
        y = y0.clone()
        p.add_lora_linear(y, x, a, b, 2.0, GATE_UP, add_inputs=False)
        return (y,)

    _assert_same(*_run_both(mapping, call))


@needs_vllm_triton
@pytest.mark.parametrize("name", ["prefill", "no_lora"])
def test_add_shrink_then_add_expand_with_offset(name):
    """The column/row-parallel layers' path: shrink into a zeroed fp32 buffer, expand at ``offset_start``."""
    mapping = MAPPINGS[name]
    g = torch.Generator().manual_seed(3)
    a, b = _stacks(g, QKV)
    T = len(mapping.index_mapping)
    x = torch.randn(T, IN, generator=g).to(DT).to(DEV)
    y0 = torch.randn(T, 4 + sum(QKV), generator=g).to(DT).to(DEV)

    def call(p):
        buf = torch.full((len(QKV), T, R), 7.0, dtype=torch.float32, device=DEV)  # no-LoRA: stays untouched
        p.add_shrink(buf, x, a, 0.25)
        y = y0.clone()
        p.add_expand(y, buf, b, QKV, offset_start=4, add_input=True)  # vLLM's layers pass this misspelt keyword
        return buf, y

    _assert_same(*_run_both(mapping, call))


@needs_vllm_triton
@pytest.mark.parametrize("add_inputs", [True, False])
def test_add_lora_embedding(add_inputs):
    mapping = MAPPINGS["decode"]
    g = torch.Generator().manual_seed(4)
    _, b = _stacks(g, (24,))
    x = torch.randn(4, R, generator=g).to(DT).to(DEV)  # the LoRA-A embedding rows, already gathered
    y0 = torch.randn(4, 24, generator=g).to(DT).to(DEV)

    def call(p):
        y = y0.clone()
        p.add_lora_embedding(y, x, b[0], add_inputs=add_inputs)
        return (y,)

    _assert_same(*_run_both(mapping, call))


@needs_vllm_triton
@pytest.mark.parametrize("name", ["prefill", "decode", "no_lora"])
def test_add_lora_logits(name):
    """Rows follow the prompt mapping (``sampler_indices``), not the token mapping."""
    mapping = MAPPINGS[name]
    g = torch.Generator().manual_seed(5)
    a, b = _stacks(g, (40,))
    rows = len(mapping.prompt_mapping)
    x = torch.randn(rows, IN, generator=g).to(DT).to(DEV)
    y0 = torch.randn(rows, 40, generator=g).to(DT).to(DEV)

    def call(p):
        y = y0.clone()
        p.add_lora_logits(y, x, a[0], b[0], 0.5)
        return (y,)

    _assert_same(*_run_both(mapping, call))


@needs_vllm_triton
@pytest.mark.parametrize("name", ["prefill", "no_lora"])
def test_apply_lora_full_linear(name):
    """A classification head replaced per request (``modules_to_save``), slot 3 without one."""
    mapping = MAPPINGS[name]
    g = torch.Generator().manual_seed(6)
    labels = 6
    w = torch.zeros(MAX_LORAS, 1, labels, IN, dtype=DT, device=DEV)
    w[:, 0, :5] = (torch.randn(MAX_LORAS, 5, IN, generator=g) / 4).to(DT)  # 5 labels padded to 6
    bias = torch.randn(MAX_LORAS, labels, generator=g).to(DT).to(DEV)
    enabled = torch.tensor([True, False, True, False], device=DEV)
    rows = len(mapping.prompt_mapping)
    x = torch.randn(rows, IN, generator=g).to(DT).to(DEV)
    y0 = torch.randn(rows, labels, generator=g).to(DT).to(DEV)

    def call(p):
        y = y0.clone()
        p.apply_lora_full_linear(y, x, w, bias, enabled)
        return (y,)

    _assert_same(*_run_both(mapping, call))


# ---- weights: true ranks, one conversion per load event ----------------------------------------------------------
def test_true_ranks_are_read_once_per_load_event():
    cfg = LoRAConfig(max_loras=MAX_LORAS, max_lora_rank=R)
    p = PunicaWrapperLoRAKernels(32, 8, DEV, lora_config=cfg)
    mapping = MAPPINGS["prefill"]
    p.update_metadata(mapping, SLOTS, MAX_LORAS + 1, 100)
    g = torch.Generator().manual_seed(7)
    with torch.inference_mode():  # vLLM's stacks may be inference tensors: no version counter
        a, b = _stacks(g, QKV)
    x = torch.randn(9, IN, generator=g).to(DT).to(DEV)
    y = torch.zeros(9, sum(QKV), dtype=DT, device=DEV)
    for _ in range(3):  # steps
        p.update_metadata(mapping, SLOTS, MAX_LORAS + 1, 100)
        p.add_lora_linear(y, x, a, b, 1.0, QKV)
    assert p.conversions == 1
    w = p.lk._weights(a, b)
    assert w.ranks.tolist() == [RANKS] * len(QKV)
    storage = (w.a.data_ptr(), w.b.data_ptr(), w.ranks.data_ptr())

    # vLLM loads adapter 11 into the empty slot 1 (reset_lora + set_lora, then lora_index_to_id[1] = 11)
    with torch.inference_mode():
        for s, o in enumerate(QKV):
            a[s][1, 0, :2] = (torch.randn(2, IN, generator=g) / 4).to(DT)
            b[s][1, 0, :, :2] = (torch.randn(o, 2, generator=g) / 2).to(DT)
    slots = [5, 11, 7, 9]
    for _ in range(3):
        p.update_metadata(LoRAMapping((11, 5, 0), (11, 5, 0)), slots, MAX_LORAS + 1, 100)
        y = torch.zeros(3, sum(QKV), dtype=DT, device=DEV)
        p.add_lora_linear(y, x[:3], a, b, 1.0, QKV)
    assert p.conversions == 2
    assert p.lk._weights(a, b).ranks.tolist() == [[3, 2, 8, 5]] * len(QKV)
    # refreshed in place: the same object and storage (the decode CUDA graphs vLLM captured keep reading it)
    assert p.lk._weights(a, b) is w and (w.a.data_ptr(), w.b.data_ptr(), w.ranks.data_ptr()) == storage
    want = (x[0].float() @ a[0][1, 0, :2].float().T) @ b[0][1, 0, :, :2].float().T
    torch.testing.assert_close(y[0, : QKV[0]].float(), want, **TOL)


# ---- plugin mechanism --------------------------------------------------------------------------------------------
def _gpu_platform(monkeypatch, answer=vllm_plugin.VLLM_GPU_QUALNAME):
    """The active platform class answering like vLLM's CudaPlatform (this machine's platform may have none)."""
    from vllm.platforms import current_platform

    cls = type(current_platform)
    monkeypatch.setattr(cls, "get_punica_wrapper", classmethod(lambda c: answer))
    return cls


def test_register_selects_ours_through_vllms_selector(monkeypatch):
    cls = _gpu_platform(monkeypatch)
    cfg = LoRAConfig(max_loras=MAX_LORAS, max_lora_rank=R)
    monkeypatch.delenv(vllm_plugin.ENV_SWITCH, raising=False)
    vllm_plugin.register()  # not enabled: nothing changes
    assert cls.get_punica_wrapper() == vllm_plugin.VLLM_GPU_QUALNAME
    monkeypatch.setenv(vllm_plugin.ENV_SWITCH, "1")
    try:
        vllm_plugin.register()
        vllm_plugin.register()  # idempotent
        assert cls.get_punica_wrapper() == vllm_plugin.QUALNAME
        p = punica_selector.get_punica_wrapper(32, max_batches=8, device=DEV, lora_config=cfg)
        assert type(p) is PunicaWrapperLoRAKernels
    finally:
        vllm_plugin.unregister()
    assert cls.get_punica_wrapper() == vllm_plugin.VLLM_GPU_QUALNAME


def test_register_leaves_other_platform_wrappers(monkeypatch):
    cpu = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
    cls = _gpu_platform(monkeypatch, cpu)
    monkeypatch.setenv(vllm_plugin.ENV_SWITCH, "1")
    try:
        vllm_plugin.register()
        assert cls.get_punica_wrapper() == cpu
    finally:
        vllm_plugin.unregister()


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("lora_kernels") == "lora_kernels.integrations.vllm_plugin:register", (
        "reinstall lora_kernels (pip install --no-build-isolation --no-deps -e .) to refresh its entry points")


def test_unsupported_version_warns_and_refuses(monkeypatch, caplog):
    cls = _gpu_platform(monkeypatch)
    monkeypatch.setenv(vllm_plugin.ENV_SWITCH, "1")
    monkeypatch.setattr(vllm_plugin, "installed_vllm_version", lambda: "0.32.1")
    with caplog.at_level("WARNING", logger=vllm_plugin.__name__):
        vllm_plugin.register()
    assert cls.get_punica_wrapper() == vllm_plugin.VLLM_GPU_QUALNAME
    assert "0.33.0" in caplog.text and "0.32.1" in caplog.text
    with pytest.raises(ImportError, match=r"supports vllm 0\.33\.0 only; found 0\.32\.1"):
        vllm_plugin._build_class()


def test_moe_methods_say_what_to_do():
    cfg = LoRAConfig(max_loras=MAX_LORAS, max_lora_rank=R)
    p = PunicaWrapperLoRAKernels(32, 8, DEV, lora_config=cfg)
    with pytest.raises(NotImplementedError, match="LORA_KERNELS_VLLM=0"):
        p.add_lora_w13()
