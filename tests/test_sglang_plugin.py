"""The SGLang plugin against the installed SGLang itself: every kernel method SGLang's LoRA layers call on
:class:`LoRAKernelsBackend` vs SGLang's own ``TritonLoRABackend`` (its Triton kernels, run by Triton's interpreter
on the CPU), both prepared by SGLang's own ``LoRAManager.prepare_lora_batch`` (the real function, on a stand-in
manager holding a memory pool map and adapter configs) from the same real ``ForwardBatch``; plus the LM-head pruned
batches, explicit token segments, the decode CUDA-graph metadata path (run eagerly), the plugin entry point, the
version pin, the load-event hook and the one-conversion-per-event cache, and the refusals.

Weights are SGLang's pool layout with mixed true ranks below r_max: A ``[N, c * r_max, in]`` with slice s of slot i
in rows ``[s r_i, (s + 1) r_i)``, B ``[N, out, r_max]`` with columns ``[:r_i]``, zeros elsewhere; slot 1 holds the
base model (rank 0), slot 3 is empty. SGLang's LoRA-A kernel writes only columns ``[:c r_i]`` of rows with a LoRA
into a ``torch.empty`` output, so only those are compared.

What of SGLang cannot run here: on a machine without an NVIDIA driver ``TritonLoRABackend.prepare_lora_batch``
pins host memory (``torch.tensor(..., pin_memory=True)``, ``.pin_memory()``), which raises; a fixture drops the pin
(a host-transfer hint, not semantics) only when torch sees no GPU. SGLang is imported with
``CUDA_VISIBLE_DEVICES=""`` then, as the vLLM test does (a precaution: SGLang 0.5.23's LoRA modules import without
it too). Real CUDA graphs are not captured: the decode-graph metadata path is run eagerly on the captured (padded)
row count, which is what a replay reads, and SGLang's capture sequence (one prepare, then warm-up and captured
forwards, each after ``reset_routing_cache()``) is replayed eagerly. The LoRAManager itself (model, memory pool,
adapter loading) is not built: it needs a model; its ``prepare_lora_batch`` / ``prepare_lora_token_segments`` /
``_notify_lora_slots_updated`` / ``init_decode_cuda_graph_batch_info`` run on a stand-in ``self``, and the MoE
refusal is checked on a module tree holding a real ``FusedMoE`` instance whose ``__init__`` (it needs a distributed
setup) is skipped.

Two bugs these tests found in the plugin are fixed: a refresh of a B-only stack crashed (o_proj / down_proj /
the LM head's B, on the first batch with another adapter set), and ``register()`` did not reach SGLang's
``--lora-backend`` parser (it appended to a freshly evaluated ``Arg``).
"""

import argparse
import importlib.util
import logging
import math
import re
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from helpers import import_engine_modules

if importlib.util.find_spec("sglang") is None:
    pytest.skip("sglang is not installed (pip install --no-deps -r requirements-engines.txt)", allow_module_level=True)

from lora_kernels.integrations import sglang_plugin  # noqa: E402  (imports no SGLang)

if sglang_plugin.installed_sglang_version() not in sglang_plugin.SUPPORTED_SGLANG_VERSIONS:
    pytest.skip(sglang_plugin.version_message(sglang_plugin.installed_sglang_version()), allow_module_level=True)


# SGLang's LoRA modules, imported so that vLLM's Triton (which SGLang imports parts of) stays real on a CPU machine
import_engine_modules("sglang.srt.lora.backend.triton_backend", "sglang.srt.lora.lora_manager")

from sglang.srt.lora.backend import lora_registry  # noqa: E402
from sglang.srt.lora.backend.base_backend import BaseLoRABackend  # noqa: E402
from sglang.srt.lora.backend.triton_backend import TritonLoRABackend  # noqa: E402
from sglang.srt.lora.lora_manager import LoRAManager  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode  # noqa: E402
from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: E402

from lora_kernels.integrations.sglang_plugin import LoRAKernelsBackend  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DT = torch.float16  # bf16 dot products are broken in Triton's CPU interpreter
TOL = dict(atol=3e-3, rtol=3e-3)
N, R_MAX, IN = 5, 8, 32
# The memory pool: uid -> slot; the base model (uid None) in slot 1, slot 3 empty.
UID_SLOT = {"a8": 0, None: 1, "a3": 2, "a5": 4}
ADAPTERS = {"a8": (8, 0.5), "a3": (3, 2.0), "a5": (5, 0.75)}  # uid -> (true rank r, scaling)
SLOT_RANK = [8, 0, 3, 0, 5]  # the true rank of what each slot holds (0: base model / empty)
QKV = (16, 8, 8)  # q != k = v widths
MLA = (24, 8)  # ReplicatedLinear's two unequal slices (n_slices=2)
GATE_UP = (16, 16)

# name -> (forward mode, lora_ids per request, tokens per request)
SCENARIOS = {
    # mixed lengths, adapter a8 in two requests apart, a base request
    "extend": (ForwardMode.EXTEND, ["a8", None, "a3", "a8", "a5"], [3, 2, 1, 2, 4]),
    "decode": (ForwardMode.DECODE, ["a5", None, "a8", "a3", "a8"], [1] * 5),
    "target_verify": (ForwardMode.TARGET_VERIFY, ["a3", None, "a5"], [3, 3, 3]),
    "all_base": (ForwardMode.EXTEND, [None, None], [2, 3]),
}


# ---- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _no_pinned_memory(monkeypatch):
    """Pinning host memory needs an NVIDIA driver; it only makes host->device copies asynchronous (same values)."""
    if torch.cuda.is_available():
        return
    real_tensor = torch.tensor

    def tensor(*args, pin_memory=False, **kwargs):
        return real_tensor(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self)


def _lora_backend_arg_of_server_args():
    """The ``Arg`` of ServerArgs' ``lora_backend`` field: the object ``ServerArgs.add_cli_args`` reads choices from."""
    from typing import get_type_hints

    from sglang.srt.server_args import ServerArgs

    hint = get_type_hints(ServerArgs, include_extras=True)["lora_backend"]
    return next(m for m in hint.__metadata__ if hasattr(m, "choices"))


@pytest.fixture
def sglang_state(monkeypatch):
    """SGLang's process-wide plugin state, restored after the test: the backend registry, the ``--lora-backend``
    choices, the HookRegistry and the method ``apply_hooks`` patches."""
    monkeypatch.setattr(lora_registry, "LORA_SUPPORTED_BACKENDS", dict(lora_registry.LORA_SUPPORTED_BACKENDS))
    choices = _lora_backend_arg_of_server_args().choices  # Arg is immutable, its choices list is not
    saved_choices = list(choices)
    hooks = defaultdict(list, {k: list(v) for k, v in HookRegistry._hooks.items()})
    monkeypatch.setattr(HookRegistry, "_hooks", hooks)
    monkeypatch.setattr(HookRegistry, "_patched", set(HookRegistry._patched))
    monkeypatch.setattr(LoRAManager, "_notify_lora_slots_updated",
                        LoRAManager.__dict__["_notify_lora_slots_updated"])
    yield
    sglang_plugin.unregister()
    choices[:] = saved_choices


# ---- SGLang's metadata, built by SGLang ------------------------------------------------------------------------
class _Manager:
    """Stand-in ``self`` for SGLang's LoRAManager methods: the pool map and adapter configs they read."""

    attn_dp_enabled = False
    prepare_lora_batch = LoRAManager.prepare_lora_batch
    prepare_lora_token_segments = LoRAManager.prepare_lora_token_segments
    init_decode_cuda_graph_batch_info = LoRAManager.init_decode_cuda_graph_batch_info
    _use_cuda_graph_batch = LoRAManager._use_cuda_graph_batch
    can_use_prefill_cuda_graph = LoRAManager.can_use_prefill_cuda_graph

    def __init__(self, backend, uid_slot=UID_SLOT, adapters=ADAPTERS):
        self.lora_backend = backend
        self.device = DEV
        self.max_loras_per_batch = N
        self.memory_pool = types.SimpleNamespace(uid_to_buffer_id=dict(uid_slot), max_loras_per_batch=N,
                                                 get_buffer_id=dict(uid_slot).__getitem__)
        self.loras = {u: types.SimpleNamespace(config=types.SimpleNamespace(r=r), scaling=s)
                      for u, (r, s) in adapters.items()}
        self.lora_modules = []


def _forward_batch(mode, lora_ids, lens, *, logprob_starts=None):
    """A real ForwardBatch with the fields the LoRA metadata reads (``logprob_starts``: return_logprob=True)."""
    bs, T = len(lens), sum(lens)
    kw = dict(forward_mode=mode, batch_size=bs, input_ids=torch.zeros(T, dtype=torch.long, device=DEV),
              req_pool_indices=torch.arange(bs, device=DEV), seq_lens=torch.tensor(lens, device=DEV) + 4,
              out_cache_loc=torch.arange(T, device=DEV), seq_lens_sum=T + 4 * bs, lora_ids=list(lora_ids))
    if mode == ForwardMode.EXTEND:
        kw.update(extend_seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEV), extend_seq_lens_cpu=list(lens),
                  extend_num_tokens=T)
    if mode == ForwardMode.TARGET_VERIFY:
        kw["spec_info"] = types.SimpleNamespace(draft_token_num=lens[0])
    if logprob_starts is not None:
        kw.update(return_logprob=True, extend_logprob_start_lens_cpu=list(logprob_starts))
    return ForwardBatch(**kw)


def _backends():
    """(SGLang's Triton backend, ours), constructed as LoRAManager constructs them."""
    return (TritonLoRABackend(max_loras_per_batch=N, device=DEV, server_args=None),
            LoRAKernelsBackend(max_loras_per_batch=N, device=DEV, server_args=None))


def _prepared(name, **fb_kwargs):
    """Both backends prepared by SGLang's LoRAManager.prepare_lora_batch for scenario ``name``; and the slot of
    every token."""
    mode, lora_ids, lens = SCENARIOS[name]
    pair = _backends()
    for be in pair:
        _Manager(be).prepare_lora_batch(_forward_batch(mode, lora_ids, lens, **fb_kwargs))
    return pair, _token_slots(lora_ids, lens)


def _token_slots(lora_ids, lens):
    return [UID_SLOT[u] for u, n in zip(lora_ids, lens) for _ in range(n)]


# ---- SGLang's pool weights ---------------------------------------------------------------------------------------
def _rand(g, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(DT).to(DEV)


def _pool_a(g, c, in_features=IN, ranks=SLOT_RANK):
    """A ``[N, c * r_max, in]``: slot i's c slices packed in rows ``[0, c r_i)``, zeros elsewhere."""
    a = torch.zeros(N, c * R_MAX, in_features, dtype=DT, device=DEV)
    for i, r in enumerate(ranks):
        a[i, : c * r] = _rand(g, c * r, in_features, scale=0.2)
    return a


def _pool_b(g, out, ranks=SLOT_RANK):
    """B ``[N, out, r_max]``: columns ``[:r_i]`` of slot i, zeros elsewhere."""
    b = torch.zeros(N, out, R_MAX, dtype=DT, device=DEV)
    for i, r in enumerate(ranks):
        b[i, :, :r] = _rand(g, out, r, scale=0.25)
    return b


def _offsets(outs):
    off = [0]
    for o in outs:
        off.append(off[-1] + o)
    return torch.tensor(off, dtype=torch.int32, device=DEV), torch.tensor(off, dtype=torch.int32)


def _close(got, want, msg=""):
    torch.testing.assert_close(got.float(), want.float(), **TOL, msg=lambda m: f"{msg}\n{m}")


def _assert_lora_a_same(got, want, tok_slots, c, ranks=SLOT_RANK):
    """Columns ``[:c r_i]`` of rows with a LoRA equal SGLang's; ours is zero elsewhere (its documented layout)."""
    assert got.shape == want.shape == (len(tok_slots), c * R_MAX)
    live = torch.zeros_like(got, dtype=torch.bool)
    for t, s in enumerate(tok_slots):
        live[t, : c * ranks[s]] = True
    _close(got[live], want[live], "LoRA-A columns of LoRA tokens")
    assert not got[~live].any(), "LoRA-A output past each token's rank (or of tokens without LoRA) is not zero"


# ---- every kernel method vs TritonLoRABackend ---------------------------------------------------------------------
def test_is_an_sglang_backend():
    assert issubclass(LoRAKernelsBackend, BaseLoRABackend)
    for name in ("run_lora_a_sgemm", "run_lora_b_sgemm", "run_qkv_lora", "run_gate_up_lora", "run_lora_a_embedding",
                 "prepare_lora_batch", "init_decode_cuda_graph_batch_info", "prepare_lora_token_segments"):
        assert getattr(LoRAKernelsBackend, name) is not getattr(BaseLoRABackend, name), name
    assert LoRAKernelsBackend.name == "lora_kernels"
    assert not LoRAKernelsBackend.supports_prefill_cuda_graph and not LoRAKernelsBackend.supports_dp_attention


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_batch_info_is_sglangs(name):
    """What SGLang's layers and LoRAManager read off batch_info."""
    (ref, ours), tok_slots = _prepared(name)
    bi, rb = ours.batch_info, ref.batch_info
    assert bi.has_active_lora == rb.has_active_lora == any(SLOT_RANK[s] for s in tok_slots)
    assert bi.is_prefill == rb.is_prefill
    assert bi.expected_tokens == rb.expected_tokens == len(tok_slots)
    assert bi.bs == rb.bs and not bi.use_cuda_graph
    assert torch.equal(bi.seg_lens.cpu(), rb.seg_lens.cpu()) and torch.equal(bi.weight_indices.cpu(),
                                                                              rb.weight_indices.cpu())
    assert bi.lora_ranks.tolist() == rb.lora_ranks.tolist() and bi.scalings.tolist() == rb.scalings.tolist()


@pytest.mark.parametrize("name", sorted(SCENARIOS))
@pytest.mark.parametrize("c", [1, 2, 3])
def test_run_lora_a_sgemm(name, c):
    (ref, ours), tok_slots = _prepared(name)
    g = torch.Generator().manual_seed(c)
    a = _pool_a(g, c)
    x = _rand(g, len(tok_slots), IN)
    _assert_lora_a_same(ours.run_lora_a_sgemm(x, a, stack_num=c), ref.run_lora_a_sgemm(x, a, stack_num=c),
                        tok_slots, c)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
@pytest.mark.parametrize("with_base", [True, False])
def test_run_lora_b_sgemm(name, with_base):
    (ref, ours), tok_slots = _prepared(name)
    g = torch.Generator().manual_seed(11)
    b = _pool_b(g, 24)
    x = _rand(g, len(tok_slots), R_MAX)
    y0 = _rand(g, len(tok_slots), 24, scale=0.5)

    def call(be):
        return be.run_lora_b_sgemm(x=x, weights=b, output_offset=None, base_output=y0.clone() if with_base else None)

    _close(call(ours), call(ref))


@pytest.mark.parametrize("name", sorted(SCENARIOS))
@pytest.mark.parametrize("outs", [QKV, MLA], ids=["qkv", "mla_two_slices"])
def test_run_qkv_lora(name, outs):
    (ref, ours), tok_slots = _prepared(name)
    g = torch.Generator().manual_seed(12)
    n = len(outs)
    a, b = _pool_a(g, n), _pool_b(g, sum(outs))
    x = _rand(g, len(tok_slots), IN)
    y0 = _rand(g, len(tok_slots), sum(outs), scale=0.5)
    off, off_cpu = _offsets(outs)

    def call(be):  # as SGLang's QKVParallelLinearWithLoRA / ReplicatedLinearWithLoRA call it
        return be.run_qkv_lora(x=x, qkv_lora_a=a, qkv_lora_b=b, output_offset=off, output_offset_cpu=off_cpu,
                               max_qkv_out_dim=max(outs), base_output=y0.clone(), n_slices=n)

    want = call(ref)
    assert not torch.equal(want, y0) or name == "all_base", "the reference added nothing: the test is vacuous"
    _close(call(ours), want)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
@pytest.mark.parametrize("with_base", [True, False])
def test_run_gate_up_lora(name, with_base):
    (ref, ours), tok_slots = _prepared(name)
    g = torch.Generator().manual_seed(13)
    a, b = _pool_a(g, 2), _pool_b(g, sum(GATE_UP))
    x = _rand(g, len(tok_slots), IN)
    y0 = _rand(g, len(tok_slots), sum(GATE_UP), scale=0.5)
    off, off_cpu = _offsets(GATE_UP)

    def call(be):  # as SGLang's MergedColumnParallelLinearWithLoRA calls it
        return be.run_gate_up_lora(x=x, gate_up_lora_a=a, gate_up_lora_b=b, output_offset=off,
                                   output_offset_cpu=off_cpu, base_output=y0.clone() if with_base else None)

    _close(call(ours), call(ref))


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_run_lora_a_embedding(name):
    """Ids at / past vocab_size read the last column (SGLang clamps); SGLang's output is zero-initialised here, so
    whole rows are compared."""
    (ref, ours), tok_slots = _prepared(name)
    g = torch.Generator().manual_seed(14)
    vocab, cols = 20, 24  # the weights may be wider than the base vocabulary
    w = torch.zeros(N, R_MAX, cols, dtype=DT, device=DEV)
    for i, r in enumerate(SLOT_RANK):
        w[i, :r] = _rand(g, r, cols)
    T = len(tok_slots)
    ids = torch.randint(0, vocab, (T,), generator=g).to(DEV)
    ids[::3] = torch.tensor([vocab, vocab + 3, vocab - 1, 0], device=DEV)[: ids[::3].numel()]

    def call(be):
        return be.run_lora_a_embedding(input_ids=ids, weights=w, vocab_size=vocab, extra_embeddings=None)

    want = call(ref)
    assert torch.equal(call(ours), want)  # a lookup: bit-exact


class _RowLayer:
    """Stand-in for SGLang's RowParallelLinearWithLoRA: ``apply_lora`` runs LoRA-A then LoRA-B on the backend."""

    def __init__(self, backend, a, b):
        self.lora_backend, self.A_buffer, self.B_buffer = backend, a, b
        self.output_offset, self.output_offset_cpu = _offsets((b.shape[1],))

    def apply_lora(self, base_output, x):
        h = self.lora_backend.run_lora_a_sgemm(x, self.A_buffer)
        return self.lora_backend.run_lora_b_sgemm(x=h, weights=self.B_buffer, output_offset=self.output_offset,
                                                  output_offset_cpu=self.output_offset_cpu, base_output=base_output)


@pytest.mark.parametrize("name", ["extend", "decode"])
@pytest.mark.parametrize("all_reduce", [None, "identity", "two_equal_shards"])
def test_forward_with_base(name, all_reduce):
    """BaseLoRABackend.forward_with_base: through the layer's apply_lora (no all-reduce), or A, all-reduce, B."""
    (ref, ours), tok_slots = _prepared(name)
    g = torch.Generator().manual_seed(15)
    a, b = _pool_a(g, 1), _pool_b(g, 24)
    w_base = _rand(g, 24, IN, scale=0.1)
    x = _rand(g, len(tok_slots), IN)
    reduce = {None: None, "identity": lambda t: t, "two_equal_shards": lambda t: t * 2}[all_reduce]

    def call(be):
        layer = _RowLayer(be, a, b)
        return be.forward_with_base(layer, x, lambda: x @ w_base.T, a, b, layer.output_offset, (0, 24),
                                    all_reduce=reduce)

    _close(call(ours), call(ref))


def test_stale_rows_past_the_rank_are_ignored():
    """SGLang's kernels read only rows ``[:c r_i]`` of A and columns ``[:r_i]`` of B, and nothing of rank-0 slots:
    whatever a pool holds there (a larger adapter's leftovers) does not count."""
    (ref, ours), tok_slots = _prepared("extend")
    g = torch.Generator().manual_seed(16)
    a = _rand(g, N, 3 * R_MAX, IN, scale=0.2)  # every row non-zero
    b = _rand(g, N, sum(QKV), R_MAX, scale=0.25)
    x = _rand(g, len(tok_slots), IN)
    y0 = _rand(g, len(tok_slots), sum(QKV), scale=0.5)
    off, off_cpu = _offsets(QKV)

    def call(be):
        return be.run_qkv_lora(x=x, qkv_lora_a=a, qkv_lora_b=b, output_offset=off, output_offset_cpu=off_cpu,
                               max_qkv_out_dim=16, base_output=y0.clone(), n_slices=3)

    _close(call(ours), call(ref))
    _assert_lora_a_same(ours.run_lora_a_sgemm(x, a, stack_num=3), ref.run_lora_a_sgemm(x, a, stack_num=3),
                        tok_slots, 3)


# ---- LM head: pruned rows ------------------------------------------------------------------------------------------
LM_IDS = ["a3", "a3", None, "a8", "a5", "a5"]  # consecutive requests of one adapter: merged segments
LM_LENS = [2, 1, 3, 1, 2, 2]
LM_STARTS = [0, 0, 1, 1, 0, 2]  # logprob start per request: pruned rows [2, 1, 2, 1, 2, 1]
VOCAB = 32


def _lm_head_pair(logprob_starts=None):
    pair = _backends()
    for be in pair:
        _Manager(be).prepare_lora_batch(_forward_batch(ForwardMode.EXTEND, LM_IDS, LM_LENS,
                                                       logprob_starts=logprob_starts))
    return pair


def _pruned_rows(logprob_starts):
    if logprob_starts is None:
        return [1] * len(LM_LENS)
    return [1 if n == s else n - s for n, s in zip(LM_LENS, logprob_starts)]


def _assert_lm_head_same(ref, ours, ref_info, our_info, row_slots, seed):
    """One pruned batch: metadata, LoRA-A (pruned_batch_info=) and LoRA-B with a base output, vs SGLang's."""
    for f in ("bs", "num_segments", "max_len", "expected_tokens", "use_cuda_graph"):
        assert getattr(our_info, f) == getattr(ref_info, f), f
    assert our_info.seg_lens.tolist() == ref_info.seg_lens.tolist()
    assert our_info.weight_indices.tolist() == ref_info.weight_indices.tolist()
    g = torch.Generator().manual_seed(seed)
    a, b = _pool_a(g, 1), _pool_b(g, VOCAB)
    h = _rand(g, len(row_slots), IN)
    y0 = _rand(g, len(row_slots), VOCAB, scale=0.5)
    ha_ref = ref.run_lora_a_sgemm(h, a, pruned_batch_info=ref_info)
    ha = ours.run_lora_a_sgemm(h, a, pruned_batch_info=our_info)
    _assert_lora_a_same(ha, ha_ref, row_slots, 1)
    x = _rand(g, len(row_slots), R_MAX)
    got = ours.run_lora_b_sgemm(x=x, weights=b, base_output=y0.clone(), pruned_batch_info=our_info)
    _close(got, ref.run_lora_b_sgemm(x=x, weights=b, base_output=y0.clone(), pruned_batch_info=ref_info))


def test_lm_head_batch_info_one_row_per_request():
    ref, ours = _lm_head_pair()
    assert ours.lm_head_batch_info.expected_tokens == len(LM_LENS)
    assert ours.lm_head_pass_batch_infos is None and ref.lm_head_pass_batch_infos is None
    rows = [UID_SLOT[u] for u in LM_IDS]
    _assert_lm_head_same(ref, ours, ref.lm_head_batch_info, ours.lm_head_batch_info, rows, 21)


def test_lm_head_pass_batch_infos_chunked_logprobs(monkeypatch):
    """return_logprob with logprob start positions and SGLang's chunked logprob passes (SGLANG_LOGPROB_CHUNK_SIZE,
    read through sglang.srt.environ.envs): one batch info per pass, each vs SGLang's."""
    monkeypatch.setenv("SGLANG_ENABLE_LOGPROB_CHUNK", "true")
    monkeypatch.setenv("SGLANG_LOGPROB_CHUNK_SIZE", "4")
    ref, ours = _lm_head_pair(LM_STARTS)
    pruned = _pruned_rows(LM_STARTS)
    rows = [UID_SLOT[u] for u, n in zip(LM_IDS, pruned) for _ in range(n)]
    assert len(rows) == 9
    _assert_lm_head_same(ref, ours, ref.lm_head_batch_info, ours.lm_head_batch_info, rows, 22)
    assert len(ours.lm_head_pass_batch_infos) == len(ref.lm_head_pass_batch_infos) == 3
    for p, (ri, oi) in enumerate(zip(ref.lm_head_pass_batch_infos, ours.lm_head_pass_batch_infos)):
        _assert_lm_head_same(ref, ours, ri, oi, rows[4 * p: 4 * p + 4], 23 + p)


def test_lm_head_routes_are_reused_across_steps():
    """One backend over several prefill steps: the pruned-row batches are rebuilt in place (grown when a step has
    more rows) and every step equals SGLang's."""
    ref, ours = _backends()
    steps = [(LM_IDS[:3], LM_LENS[:3], None), (LM_IDS, LM_LENS, LM_STARTS), (LM_IDS[2:], LM_LENS[2:], None)]
    routes = []
    for k, (ids, lens, starts) in enumerate(steps):
        for be in (ref, ours):
            _Manager(be).prepare_lora_batch(_forward_batch(ForwardMode.EXTEND, ids, lens, logprob_starts=starts))
        pruned = [1] * len(lens) if starts is None else [1 if n == s else n - s for n, s in zip(lens, starts)]
        rows = [UID_SLOT[u] for u, n in zip(ids, pruned) for _ in range(n)]
        _assert_lm_head_same(ref, ours, ref.lm_head_batch_info, ours.lm_head_batch_info, rows, 30 + k)
        routes.append(ours.lm_head_batch_info.lk_route)
    assert routes[1] is not routes[0], "step 2 has 9 rows, step 1's batch holds 3: it must grow"
    assert routes[2] is routes[1], "the pruned-row batch was re-allocated, not rebuilt in place"


def test_lm_head_pruned_info_is_absent_for_decode():
    (ref, ours), _ = _prepared("decode")
    assert ours.lm_head_batch_info is None and ref.lm_head_batch_info is None
    assert ours.lm_head_pass_batch_infos is None


# ---- explicit token segments --------------------------------------------------------------------------------------
def test_prepare_lora_token_segments():
    """SGLang's LoRAManager.prepare_lora_token_segments (explicit eager row segments, one may be empty)."""
    lora_ids, lens = ["a5", None, "a8", "a3", "a5"], [2, 3, 0, 4, 2]
    pair = _backends()
    for be in pair:
        _Manager(be).prepare_lora_token_segments(lora_ids=lora_ids, segment_lens=lens)
    ref, ours = pair
    assert ours.batch_info.expected_tokens == ref.batch_info.expected_tokens == sum(lens)
    assert ours.batch_info.has_active_lora and ours.lm_head_batch_info is None
    tok_slots = _token_slots(lora_ids, lens)
    g = torch.Generator().manual_seed(31)
    a, b = _pool_a(g, 3), _pool_b(g, sum(QKV))
    x = _rand(g, len(tok_slots), IN)
    y0 = _rand(g, len(tok_slots), sum(QKV), scale=0.5)
    off, off_cpu = _offsets(QKV)
    _assert_lora_a_same(ours.run_lora_a_sgemm(x, a, stack_num=3), ref.run_lora_a_sgemm(x, a, stack_num=3),
                        tok_slots, 3)

    def call(be):
        return be.run_qkv_lora(x=x, qkv_lora_a=a, qkv_lora_b=b, output_offset=off, output_offset_cpu=off_cpu,
                               max_qkv_out_dim=16, base_output=y0.clone(), n_slices=3)

    _close(call(ours), call(ref))


# ---- decode CUDA-graph metadata, run eagerly -----------------------------------------------------------------------
def _graph_pair(max_bs, tokens_per_req=1):
    pair = _backends()
    managers = [_Manager(be) for be in pair]
    for m in managers:  # LoRAManager's: also sets max_bs_in_decode_cuda_graph (graph mode for smaller batches)
        m.init_decode_cuda_graph_batch_info(max_bs, tokens_per_req)
    return pair, managers


# Two batches of one graph: the same adapters active (so the same lora_ranks) in other slots, orders and sizes;
# or other adapters active (LoRAManager zeroes the ranks of the slots not in the batch: the ranks change).
GRAPH_BATCHES = {
    "same_adapters": (["a5", None, "a8", "a3"], ["a3", "a3", "a8", None, "a5"]),
    "other_adapters": (["a5", None, "a8"], ["a3", "a3", None]),
}


@pytest.mark.parametrize("batches", ["same_adapters", "other_adapters"])
@pytest.mark.parametrize("mode, tpr", [(ForwardMode.DECODE, 1), (ForwardMode.TARGET_VERIFY, 2)],
                         ids=["decode", "target_verify"])
def test_decode_cuda_graph_metadata(mode, tpr, batches):
    """Static buffers sized for ``max_bs`` requests of ``tpr`` tokens; a batch of fewer requests is prepared in
    graph mode and the kernels run on the captured row count: rows of live requests equal SGLang's, rows past
    them are untouched; a second prepare into the same buffers (what a replay reads) gives the new batch's answer."""
    max_bs = 6
    T = max_bs * tpr
    (ref, ours), managers = _graph_pair(max_bs, tpr)
    info = ours.cuda_graph_batch_info
    route = info.lk_route
    ptrs = (route.batch.meta.data_ptr(), route.batch.plan.data_ptr(), route.tok_rank.data_ptr())
    g = torch.Generator().manual_seed(41)
    a, b = _pool_a(g, 3), _pool_b(g, sum(QKV))
    a1, b1 = _pool_a(g, 1), _pool_b(g, 24)
    x = _rand(g, T, IN)
    y0 = _rand(g, T, sum(QKV), scale=0.5)
    y1 = _rand(g, T, 24, scale=0.5)
    off, off_cpu = _offsets(QKV)
    for lora_ids in GRAPH_BATCHES[batches]:
        live = len(lora_ids) * tpr
        for m in managers:
            fb = _forward_batch(mode, lora_ids, [tpr] * len(lora_ids))
            assert m._use_cuda_graph_batch(fb)
            m.prepare_lora_batch(fb)
        assert ours.batch_info is info and info.lk_route is route
        tok_slots = _token_slots(lora_ids, [tpr] * len(lora_ids))

        def qkv(be):
            return be.run_qkv_lora(x=x, qkv_lora_a=a, qkv_lora_b=b, output_offset=off, output_offset_cpu=off_cpu,
                                   max_qkv_out_dim=16, base_output=y0.clone(), n_slices=3)

        got, want = qkv(ours), qkv(ref)
        _close(got[:live], want[:live], f"live rows of {lora_ids}")
        assert torch.equal(got[live:], y0[live:]), "rows past the live requests were written"
        assert not torch.equal(want[:live], y0[:live]), "vacuous: the reference added nothing"
        ha, ha_ref = ours.run_lora_a_sgemm(x, a1), ref.run_lora_a_sgemm(x, a1)
        _assert_lora_a_same(ha[:live], ha_ref[:live], tok_slots, 1)
        assert not ha[live:].any()
        h = _rand(g, T, R_MAX)
        got = ours.run_lora_b_sgemm(x=h, weights=b1, base_output=y1.clone())
        want = ref.run_lora_b_sgemm(x=h, weights=b1, base_output=y1.clone())
        _close(got[:live], want[:live])
        assert torch.equal(got[live:], y1[live:])
        assert (route.batch.meta.data_ptr(), route.batch.plan.data_ptr(), route.tok_rank.data_ptr()) == ptrs
    assert ours.conversions == (3 if batches == "same_adapters" else 6)  # other ranks: one refresh of each stack


def _two_layer_forward(be, layers, x):
    """A stand-in model forward: two LoRA layers through ``forward_with_base``, as SGLang's layers run them."""
    h = x
    for layer, w_base in layers:
        h = be.forward_with_base(layer, h, lambda h=h, w=w_base: h @ w.T, layer.A_buffer, layer.B_buffer,
                                 layer.output_offset, (0, layer.B_buffer.shape[1]))
    return h


def test_decode_cuda_graph_capture_sequence(monkeypatch):
    """SGLang's decode graph runner (decode_cuda_graph_runner.py, capture_one_batch_size): one prepare_lora_batch,
    then warm-up forwards and the captured forward, each after reset_routing_cache(); a replay: prepare, then the
    graph. Each of these forwards must build the token batch from the static slots itself (the captured one
    records the build that every replay re-runs); run eagerly, every forward equals SGLang's."""
    max_bs = 4
    (ref, ours), managers = _graph_pair(max_bs)
    g = torch.Generator().manual_seed(43)
    a1, b1, a2, b2 = _pool_a(g, 1), _pool_b(g, 24), _pool_a(g, 1, in_features=24), _pool_b(g, 16)
    w1, w2 = _rand(g, 24, IN, scale=0.1), _rand(g, 16, 24, scale=0.1)
    x = _rand(g, max_bs, IN)
    stacks = {be: [(_RowLayer(be, a1, b1), w1), (_RowLayer(be, a2, b2), w2)] for be in (ref, ours)}
    route_batch = ours.cuda_graph_batch_info.lk_route.batch
    builds = []
    real_build = route_batch.build
    monkeypatch.setattr(route_batch, "build", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    for lora_ids, forwards in ((["a3", None, "a8"], 3), (["a8", "a8", "a3", None], 1)):  # capture, then a replay
        bs = len(lora_ids)
        for m in managers:
            m.prepare_lora_batch(_forward_batch(ForwardMode.DECODE, lora_ids, [1] * bs))
        for _ in range(forwards):
            outs, n = {}, len(builds)
            for be in (ref, ours):
                be.reset_routing_cache()
                outs[be] = _two_layer_forward(be, stacks[be], x)
            assert len(builds) == n + 1, "not one token-batch build per forward: a captured graph would not rebuild"
            _close(outs[ours][:bs], outs[ref][:bs], f"{lora_ids}")
            base = (x @ w1.T) @ w2.T
            assert torch.equal(outs[ours][bs:], base[bs:]), "rows past the live requests got a LoRA"


def test_decode_cuda_graph_refusals():
    (ref, ours), managers = _graph_pair(4)
    fb = _forward_batch(ForwardMode.DECODE, ["a5", None], [1, 1])
    managers[1].prepare_lora_batch(fb)
    g = torch.Generator().manual_seed(42)
    a = _pool_a(g, 1)
    with pytest.raises(ValueError, match=r"^x: .*at most 4 rows"):
        ours.run_lora_a_sgemm(_rand(g, 5, IN), a)
    fresh = LoRAKernelsBackend(max_loras_per_batch=N, device=DEV)
    with pytest.raises(RuntimeError, match="use_cuda_graph"):
        fresh.prepare_lora_batch(fb, [4, 1], SLOT_RANK, [0.75] * N, True)
    big = _forward_batch(ForwardMode.DECODE, ["a5"] * 5, [1] * 5)
    with pytest.raises(ValueError, match="forward_batch"):
        ours.prepare_lora_batch(big, [4] * 5, SLOT_RANK, [0.75] * N, True)
    wide = _forward_batch(ForwardMode.TARGET_VERIFY, ["a5", None], [2, 2])  # the graphs hold 1 token per request
    with pytest.raises(ValueError, match=r"^forward_batch: .*1 tokens per request"):
        ours.prepare_lora_batch(wide, [4, 1], SLOT_RANK, [0.75] * N, True)


# ---- load events: one conversion per event, refreshed in place -----------------------------------------------------
def _qkv_setup(seed, inference=False):
    g = torch.Generator().manual_seed(seed)
    if inference:
        with torch.inference_mode():  # SGLang may allocate its pool in inference mode: no version counter
            a, b = _pool_a(g, 3), _pool_b(g, sum(QKV))
    else:
        a, b = _pool_a(g, 3), _pool_b(g, sum(QKV))
    return g, a, b


def _qkv(be, x, a, b, y0):
    off, off_cpu = _offsets(QKV)
    return be.run_qkv_lora(x=x, qkv_lora_a=a, qkv_lora_b=b, output_offset=off, output_offset_cpu=off_cpu,
                           max_qkv_out_dim=16, base_output=y0.clone(), n_slices=3)


def _converted_ptrs(be):
    return sorted((e[0].a.data_ptr(), e[0].b.data_ptr(), e[0].ranks.data_ptr()) for e in be._stacks._entries.values())


def _load_into_slot(a, b, slot, r, g):
    """What SGLang's pool loader does: write an adapter of rank r into ``slot`` (packed rows, zeros past r)."""
    a[slot].zero_()
    b[slot].zero_()
    a[slot, : 3 * r] = _rand(g, 3 * r, IN, scale=0.2)
    b[slot, :, :r] = _rand(g, sum(QKV), r, scale=0.25)


def test_one_conversion_per_stack():
    (ref, ours), tok_slots = _prepared("extend")
    g, a, b = _qkv_setup(51)
    a1 = _pool_a(g, 1)
    x = _rand(g, len(tok_slots), IN)
    y0 = _rand(g, len(tok_slots), sum(QKV), scale=0.5)
    for step in range(3):
        _Manager(ours).prepare_lora_batch(_forward_batch(*SCENARIOS["extend"]))
        _qkv(ours, x, a, b, y0)
        ours.run_lora_a_sgemm(x, a1)
        assert ours.conversions == 2, step  # the qkv stacks, and a1
    _close(_qkv(ours, x, a, b, y0), _qkv(ref, x, a, b, y0))


def test_load_event_hook_refreshes_in_place(sglang_state):
    """register() + HookRegistry.apply_hooks() (what SGLang's load_plugins does): SGLang's own
    LoRAManager._notify_lora_slots_updated reaches the backend, which refreshes its conversion in place."""
    sglang_plugin.register()
    HookRegistry.apply_hooks()
    (ref, ours), tok_slots = _prepared("extend")
    g, a, b = _qkv_setup(52)
    x = _rand(g, len(tok_slots), IN)
    y0 = _rand(g, len(tok_slots), sum(QKV), scale=0.5)
    before = _qkv(ours, x, a, b, y0)
    ptrs, n = _converted_ptrs(ours), ours.conversions
    _load_into_slot(a, b, 4, 5, g)  # a new adapter of the same rank into a5's slot
    LoRAManager._notify_lora_slots_updated(_Manager(ours), {4})
    assert ours.slot_updates == 1 and ours.conversions == n + 1  # refreshed at the event, not at the next call
    after = _qkv(ours, x, a, b, y0)
    assert ours.conversions == n + 1
    assert _converted_ptrs(ours) == ptrs, "the refresh re-allocated: a captured graph would read the old weights"
    assert not torch.allclose(after, before)
    _close(after, _qkv(ref, x, a, b, y0))


def test_rank_change_refreshes_in_place():
    """A slot's true rank changes (another adapter loaded into it): seen in prepare_lora_batch's lora_ranks."""
    (ref, ours), tok_slots = _prepared("extend")
    g, a, b = _qkv_setup(53, inference=True)  # no version counter: only the rank change can tell
    x = _rand(g, len(tok_slots), IN)
    y0 = _rand(g, len(tok_slots), sum(QKV), scale=0.5)
    _qkv(ours, x, a, b, y0)
    ptrs, n = _converted_ptrs(ours), ours.conversions
    adapters = dict(ADAPTERS, a8=(6, 1.5))  # slot 0 now holds an adapter of rank 6 (rows past 6 are stale)
    with torch.inference_mode():
        a[0, : 3 * 6] = _rand(g, 18, IN, scale=0.2)
        b[0, :, :6] = _rand(g, sum(QKV), 6, scale=0.25)
    pair = (ref, ours)
    for be in pair:
        _Manager(be, adapters=adapters).prepare_lora_batch(_forward_batch(*SCENARIOS["extend"]))
    got = _qkv(ours, x, a, b, y0)
    assert ours.conversions == n + 1 and _converted_ptrs(ours) == ptrs
    _close(got, _qkv(ref, x, a, b, y0))


def test_batches_leaving_resident_adapters_out_convert_nothing():
    """LoRAManager gives rank 0 to the resident slots a batch does not use: their tokens are not served, so no
    stack is re-converted when the set of active adapters changes (only a served slot at a new rank needs one)."""
    (ref, ours), _ = _prepared("extend")
    g, a, b = _qkv_setup(57, inference=True)
    x8 = _rand(g, 8, IN)
    y8 = _rand(g, 8, sum(QKV), scale=0.5)
    # decode batches of 8 requests over subsets of the resident adapters, then all of them again
    for k, lora_ids in enumerate((["a8", None, "a3", "a5"] * 2, ["a3", None] * 4, ["a5"] * 8, ["a8", "a5"] * 4,
                                  ["a8", None, "a3", "a5"] * 2)):
        for be in (ref, ours):
            _Manager(be).prepare_lora_batch(_forward_batch(ForwardMode.DECODE, lora_ids, [1] * 8))
        got = _qkv(ours, x8, a, b, y8)
        if k == 0:
            n = ours.conversions
        assert ours.conversions == n, f"batch {k} ({lora_ids[:4]}...) re-converted the stacks"
        _close(got, _qkv(ref, x8, a, b, y8), f"batch {k}")


def test_in_place_write_with_version_counter_refreshes_without_notification():
    (ref, ours), tok_slots = _prepared("extend")
    g, a, b = _qkv_setup(54)
    x = _rand(g, len(tok_slots), IN)
    y0 = _rand(g, len(tok_slots), sum(QKV), scale=0.5)
    _qkv(ours, x, a, b, y0)
    n = ours.conversions
    _load_into_slot(a, b, 2, 3, g)
    got = _qkv(ours, x, a, b, y0)
    assert ours.conversions == n + 1 and ours.slot_updates == 0
    _close(got, _qkv(ref, x, a, b, y0))


def test_inference_tensor_stack_is_refreshed_by_the_notification():
    """Inference tensors have no version counter: an in-place write is seen only through the load event."""
    (ref, ours), tok_slots = _prepared("extend")
    g, a, b = _qkv_setup(55, inference=True)
    x = _rand(g, len(tok_slots), IN)
    y0 = _rand(g, len(tok_slots), sum(QKV), scale=0.5)
    _qkv(ours, x, a, b, y0)
    n = ours.conversions
    with torch.inference_mode():
        _load_into_slot(a, b, 0, 8, g)
    _qkv(ours, x, a, b, y0)
    assert ours.conversions == n  # nothing could tell
    ours.on_lora_slots_updated({0})
    got = _qkv(ours, x, a, b, y0)
    assert ours.conversions == n + 1
    _close(got, _qkv(ref, x, a, b, y0))


@pytest.mark.parametrize("trigger", ["rank_change", "notification", "in_place_write"])
@pytest.mark.parametrize("kind", ["lora_a", "lora_b"])
def test_single_stack_refresh(kind, trigger):
    """The stacks of run_lora_a_sgemm (A only) and run_lora_b_sgemm (B only) through every refresh trigger."""
    (ref, ours), tok_slots = _prepared("extend")
    g = torch.Generator().manual_seed(56)
    ctx = torch.inference_mode() if trigger == "notification" else torch.no_grad()
    with ctx:  # notification: an inference tensor, so that nothing but the event can tell
        stack = _pool_a(g, 1) if kind == "lora_a" else _pool_b(g, 24)
    x = _rand(g, len(tok_slots), IN if kind == "lora_a" else R_MAX)
    y0 = _rand(g, len(tok_slots), 24, scale=0.5)

    def call(be):
        if kind == "lora_a":
            return be.run_lora_a_sgemm(x, stack)
        return be.run_lora_b_sgemm(x=x, weights=stack, base_output=y0.clone())

    call(ours)
    n = ours.conversions
    if trigger == "rank_change":  # slot 0 now holds a rank-6 adapter: its rows / columns past 6 are stale
        for be in (ref, ours):
            _Manager(be, adapters=dict(ADAPTERS, a8=(6, 1.5))).prepare_lora_batch(_forward_batch(*SCENARIOS["extend"]))
        ranks = [6, 0, 3, 0, 5]
    else:
        with ctx:
            if kind == "lora_a":
                stack[4, :5] = _rand(g, 5, IN, scale=0.2)
            else:
                stack[4, :, :5] = _rand(g, 24, 5, scale=0.25)
        if trigger == "notification":
            ours.on_lora_slots_updated({4})
        ranks = SLOT_RANK
    got, want = call(ours), call(ref)
    assert ours.conversions == n + 1
    if kind == "lora_a":
        _assert_lora_a_same(got, want, tok_slots, 1, ranks)
    else:
        _close(got, want)


# ---- registration -----------------------------------------------------------------------------------------------
def test_register_makes_the_backend_resolvable(sglang_state):
    assert "lora_kernels" not in lora_registry.LORA_SUPPORTED_BACKENDS
    sglang_plugin.register()
    sglang_plugin.register()  # idempotent
    assert lora_registry.get_backend_from_name("lora_kernels") is LoRAKernelsBackend
    hooks = [h for _, h, _ in HookRegistry._hooks[sglang_plugin.SLOTS_UPDATED_HOOK]]
    assert hooks.count(sglang_plugin._after_slots_updated) == 1
    sglang_plugin.unregister()
    assert "lora_kernels" not in lora_registry.LORA_SUPPORTED_BACKENDS
    assert sglang_plugin._after_slots_updated not in [h for _, h, _ in
                                                      HookRegistry._hooks[sglang_plugin.SLOTS_UPDATED_HOOK]]


def _lora_backend_parser():
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser


def test_cli_rejects_unknown_backends(sglang_state):
    sglang_plugin.register()
    with pytest.raises(SystemExit):
        _lora_backend_parser().parse_args(["--model-path", "m", "--lora-backend", "nonsense"])


def test_cli_accepts_lora_backend_lora_kernels(sglang_state):
    sglang_plugin.register()
    parser = _lora_backend_parser()
    try:
        args = parser.parse_args(["--model-path", "m", "--lora-backend", "lora_kernels"])
    except SystemExit:
        raise AssertionError("--lora-backend lora_kernels rejected by SGLang's parser after register()") from None
    assert args.lora_backend == "lora_kernels"


def test_entry_point_is_declared():
    text = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    group = re.search(r'"sglang\.srt\.plugins"\s*:\s*\[([^\]]*)\]', text)
    assert group is not None, "setup.py declares no sglang.srt.plugins entry point"
    assert '"lora_kernels = lora_kernels.integrations.sglang_plugin:register"' in group.group(1)
    from importlib.metadata import entry_points

    installed = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    if installed:  # an install made after the entry point was added
        assert installed.get("lora_kernels") == "lora_kernels.integrations.sglang_plugin:register"


def test_sglang_load_plugins_selects_the_backend(sglang_state, monkeypatch):
    """End to end through SGLang's own plugin loader (what its server and scheduler processes call): the installed
    entry point runs register(), the hooks are applied, `--lora-backend lora_kernels` parses and LoRAManager's
    lookup gives our class, and a slot update reaches the backend."""
    from importlib.metadata import entry_points

    import sglang.srt.plugins as plugins

    if not any(ep.name == "lora_kernels" for ep in entry_points(group=plugins.GENERAL_PLUGINS_GROUP)):
        pytest.skip("lora_kernels is installed without its sglang.srt.plugins entry point (reinstall: pip install "
                    "-e .)")
    monkeypatch.setattr(plugins, "_plugins_loaded", False)
    monkeypatch.setenv("SGLANG_PLUGINS", "lora_kernels")  # only ours, whatever else is installed
    plugins.load_plugins()
    assert lora_registry.get_backend_from_name("lora_kernels") is LoRAKernelsBackend
    assert _lora_backend_parser().parse_args(["--model-path", "m", "--lora-backend", "lora_kernels"]).lora_backend \
        == "lora_kernels"
    assert sglang_plugin.SLOTS_UPDATED_HOOK in HookRegistry._patched
    be = LoRAKernelsBackend(max_loras_per_batch=N, device=DEV)
    LoRAManager._notify_lora_slots_updated(types.SimpleNamespace(lora_backend=be, lora_modules=[]), {2})
    assert be.slot_updates == 1


def test_unsupported_version_warns_and_refuses(sglang_state, monkeypatch, caplog):
    monkeypatch.setattr(sglang_plugin, "installed_sglang_version", lambda: "0.5.22")
    with caplog.at_level(logging.WARNING, logger=sglang_plugin.__name__):
        sglang_plugin.register()
    assert "lora_kernels" not in lora_registry.LORA_SUPPORTED_BACKENDS
    assert not HookRegistry._hooks.get(sglang_plugin.SLOTS_UPDATED_HOOK)
    assert "0.5.22" in caplog.text and "0.5.23" in caplog.text
    with pytest.raises(ImportError, match=r"supports sglang 0\.5\.23 only; found 0\.5\.22"):
        sglang_plugin._build_class()


# ---- refusals: ValueError / TypeError naming the argument, nothing written ----------------------------------------
def _extend_fb():
    return _forward_batch(*SCENARIOS["extend"])


GOOD_WI = [0, 1, 2, 0, 4]
GOOD_RANKS = [8, 0, 3, 0, 5]
GOOD_SC = [0.5, 0.0, 2.0, 0.0, 0.75]


@pytest.mark.parametrize("wi, ranks, sc, name", [
    ([0, 1, 2, 0], GOOD_RANKS, GOOD_SC, "weight_indices"),
    ([0, 1, 2, 0, 5], GOOD_RANKS, GOOD_SC, "weight_indices"),
    ([0, 1, -1, 0, 4], GOOD_RANKS, GOOD_SC, "weight_indices"),
    (GOOD_WI, [8, 0, -3, 0, 5], GOOD_SC, r"lora_ranks\[2\]"),
    (GOOD_WI, GOOD_RANKS[:4], GOOD_SC, "lora_ranks"),
    (GOOD_WI, GOOD_RANKS, [0.5, 0.0, math.nan, 0.0, 0.75], r"scalings\[2\]"),
    (GOOD_WI, GOOD_RANKS, [0.5, 0.0, 2.0, 0.0, math.inf], r"scalings\[4\]"),
], ids=["wi_len", "wi_range", "wi_negative", "rank_negative", "ranks_len", "scaling_nan", "scaling_inf"])
def test_prepare_refusals_write_nothing(wi, ranks, sc, name):
    _, ours = _backends()
    ours.prepare_lora_batch(_extend_fb(), GOOD_WI, GOOD_RANKS, GOOD_SC, False)
    g = torch.Generator().manual_seed(61)
    a, b = _pool_a(g, 3), _pool_b(g, sum(QKV))
    x = _rand(g, 12, IN)
    y0 = _rand(g, 12, sum(QKV), scale=0.5)
    before_info, before = ours.batch_info, _qkv(ours, x, a, b, y0)
    with pytest.raises(ValueError, match=f"^{name}"):
        ours.prepare_lora_batch(_extend_fb(), wi, ranks, sc, False)
    assert ours.batch_info is before_info
    assert ours.batch_info.scalings.tolist() == GOOD_SC and ours.batch_info.lora_ranks.tolist() == GOOD_RANKS
    assert torch.equal(_qkv(ours, x, a, b, y0), before)


def test_prefill_cuda_graph_is_refused():
    _, ours = _backends()
    with pytest.raises(ValueError, match="^use_prefill_cuda_graph"):
        ours.prepare_lora_batch(_extend_fb(), GOOD_WI, GOOD_RANKS, GOOD_SC, False, use_prefill_cuda_graph=True)
    assert ours.batch_info is None
    with pytest.raises(NotImplementedError):
        ours.init_prefill_cuda_graph_batch_info(64)


def _prepared_ours():
    _, ours = _backends()
    ours.prepare_lora_batch(_extend_fb(), GOOD_WI, GOOD_RANKS, GOOD_SC, False)
    return ours


def test_kernel_refusals_write_nothing():
    ours = _prepared_ours()
    g = torch.Generator().manual_seed(62)
    a, b = _pool_a(g, 3), _pool_b(g, sum(QKV))
    x = _rand(g, 12, IN)
    y0 = _rand(g, 12, sum(QKV), scale=0.5)
    y = y0.clone()
    off, off_cpu = _offsets(QKV)
    cases = [  # (exception, message start, call)
        (ValueError, "x", lambda: ours.run_qkv_lora(x=x[:11], qkv_lora_a=a, qkv_lora_b=b, output_offset=off,
                                                    output_offset_cpu=off_cpu, max_qkv_out_dim=16, base_output=y)),
        (ValueError, "x", lambda: ours.run_lora_b_sgemm(x=_rand(g, 13, R_MAX), weights=b, base_output=y)),
        (ValueError, "output_offset", lambda: ours.run_qkv_lora(
            x=x, qkv_lora_a=a, qkv_lora_b=b, output_offset=off, output_offset_cpu=torch.tensor([0, 16, 24, 30]),
            max_qkv_out_dim=16, base_output=y)),
        (ValueError, "output_offset", lambda: ours.run_qkv_lora(
            x=x, qkv_lora_a=a, qkv_lora_b=b, output_offset=off, output_offset_cpu=off_cpu, max_qkv_out_dim=16,
            base_output=y, n_slices=2)),
        (ValueError, "base_output", lambda: ours.run_qkv_lora(
            x=x, qkv_lora_a=a, qkv_lora_b=b, output_offset=off, output_offset_cpu=off_cpu, max_qkv_out_dim=16,
            base_output=y[:, :30])),
        (TypeError, "lora_b", lambda: ours.run_qkv_lora(
            x=x, qkv_lora_a=a, qkv_lora_b=(b,), output_offset=off, output_offset_cpu=off_cpu, max_qkv_out_dim=16,
            base_output=y)),
        (ValueError, "lora_a", lambda: ours.run_qkv_lora(
            x=x, qkv_lora_a=a[:, :20], qkv_lora_b=b, output_offset=off, output_offset_cpu=off_cpu,
            max_qkv_out_dim=16, base_output=y)),
        (ValueError, "lora_b", lambda: ours.run_qkv_lora(
            x=x, qkv_lora_a=a, qkv_lora_b=b[..., :6], output_offset=off, output_offset_cpu=off_cpu,
            max_qkv_out_dim=16, base_output=y)),
    ]
    for exc, name, call in cases:
        with pytest.raises(exc, match=f"^{name}"):
            call()
        assert torch.equal(y, y0), name


def test_ranks_larger_than_the_weights_are_refused():
    _, ours = _backends()
    ours.prepare_lora_batch(_extend_fb(), GOOD_WI, [8, 0, 3, 0, 9], GOOD_SC, False)  # slot 4: rank 9 > r_max 8
    g = torch.Generator().manual_seed(63)
    a, b = _pool_a(g, 3), _pool_b(g, sum(QKV))
    x = _rand(g, 12, IN)
    y0 = _rand(g, 12, sum(QKV), scale=0.5)
    y = y0.clone()
    with pytest.raises(ValueError, match=r"^lora_ranks: .*r_max=8"):
        _qkv(ours, x, a, b, y)
    with pytest.raises(ValueError, match=r"^lora_ranks"):
        ours.run_lora_a_embedding(input_ids=torch.zeros(12, dtype=torch.long, device=DEV),
                                  weights=torch.zeros(N, 8, 20, dtype=DT, device=DEV), vocab_size=20)
    assert ours.conversions == 0


def test_embedding_refusals():
    ours = _prepared_ours()
    ids = torch.zeros(12, dtype=torch.long, device=DEV)
    w = torch.zeros(N, R_MAX, 20, dtype=DT, device=DEV)
    with pytest.raises(NotImplementedError, match="^extra_embeddings"):
        ours.run_lora_a_embedding(input_ids=ids, weights=w, vocab_size=20,
                                  extra_embeddings=torch.zeros(N, 2, R_MAX, dtype=DT, device=DEV))
    with pytest.raises(ValueError, match="^weights"):
        ours.run_lora_a_embedding(input_ids=ids, weights=w, vocab_size=21)
    with pytest.raises(ValueError, match=r"^(input_ids|x): expected 12 rows"):  # the plugin names it "x"
        ours.run_lora_a_embedding(input_ids=ids[:5], weights=w, vocab_size=20)


def test_calls_before_prepare_are_refused():
    _, ours = _backends()
    with pytest.raises(RuntimeError, match="^batch_info"):
        ours.run_lora_a_sgemm(torch.zeros(2, IN, dtype=DT, device=DEV), torch.zeros(N, R_MAX, IN, dtype=DT, device=DEV))
    ref, ours = _lm_head_pair()
    with pytest.raises(ValueError, match="^pruned_batch_info"):  # SGLang's own batch info, not one of ours
        ours.run_lora_a_sgemm(torch.zeros(len(LM_LENS), IN, dtype=DT, device=DEV),
                              torch.zeros(N, R_MAX, IN, dtype=DT, device=DEV), pruned_batch_info=ref.lm_head_batch_info)


def _moe_model():
    """A module tree holding one real SGLang FusedMoE instance (its __init__ needs a distributed setup: skipped,
    only its class is read)."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    experts = FusedMoE.__new__(FusedMoE)
    torch.nn.Module.__init__(experts)
    mlp = torch.nn.Module()
    mlp.add_module("experts", experts)
    mlp.add_module("gate_up_proj", torch.nn.Linear(4, 8))
    model = torch.nn.Module()
    model.add_module("mlp", mlp)
    return model


def test_moe_targets_are_refused():
    _, ours = _backends()
    with pytest.raises(ValueError, match=r"^target_modules: .*mlp\.experts"):
        ours.validate_lora_targets(_moe_model(), {"qkv_proj", "gate_up_proj"})
    ours.validate_lora_targets(_moe_model(), {"qkv_proj", "o_proj"})  # attention only: fine
    dense = torch.nn.Sequential(torch.nn.Linear(4, 8))
    ours.validate_lora_targets(dense, {"gate_up_proj", "down_proj"})
