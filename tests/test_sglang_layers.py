"""SGLang's own LoRA layers (sglang.srt.lora.layers) on the lora_kernels backend vs on SGLang's TritonLoRABackend.

The backend-level conformance is in tests/test_sglang_plugin.py; here the real layer wrappers SGLang puts around a
model's projections (QKVParallelLinearWithLoRA, MergedColumnParallelLinearWithLoRA, ColumnParallelLinearWithLoRA,
RowParallelLinearWithLoRA, VocabParallelEmbeddingWithLoRA, ParallelLMHeadWithLoRA) run their own ``forward`` over
real SGLang base layers (QKVParallelLinear, ...), with the pool's packed mixed-rank stacks, on a prefill and a
decode batch; the LM head also on SGLang's pruned rows (one per request). The two backends must agree, and the
LoRA must have changed the base output (so the comparison is not vacuous).

SGLang's layers need its tensor-parallel state: a world of one gloo process. Its ``initialize_model_parallel``
cannot run on a CPU (it always opens PyNccl), so the group is built with SGLang's own ``init_model_parallel_group``
(no PyNccl) and published with ``get_parallel().override_permanently`` (tp size 1). That state is process-global,
so it runs in a forked child (the rest of the suite keeps an uninitialised torch.distributed).
"""

import importlib.util
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from helpers import import_engine_modules

if importlib.util.find_spec("sglang") is None:
    pytest.skip("sglang is not installed (pip install --no-deps -r requirements-engines.txt)", allow_module_level=True)

from lora_kernels.integrations import sglang_plugin  # noqa: E402  (imports no SGLang)

if sglang_plugin.installed_sglang_version() not in sglang_plugin.SUPPORTED_SGLANG_VERSIONS:
    pytest.skip(sglang_plugin.version_message(sglang_plugin.installed_sglang_version()), allow_module_level=True)

# SGLang's LoRA modules bind Triton / vLLM's Triton at import (helpers.import_engine_modules says why)
import_engine_modules("sglang.srt.lora.backend.triton_backend", "sglang.srt.lora.lora_manager")

N, R_MAX, HIDDEN, VOCAB = 3, 4, 32, 40
SLOT_RANK = [4, 0, 2]  # slot 1: the base model
SCALING = [0.5, 0.0, 2.0]
DT = torch.float16
TOL = dict(atol=3e-3, rtol=3e-3)
# mode -> (slot per request, tokens per request)
BATCHES = {"extend": ([0, 1, 2, 0], [3, 2, 4, 1]), "decode": ([2, 0, 1, 2, 0], [1] * 5)}


def _no_pinned_memory():
    """Pinning host memory needs an NVIDIA driver; it only makes host->device copies asynchronous (same values)."""
    real = torch.tensor

    def tensor(*args, pin_memory=False, **kwargs):
        return real(*args, **kwargs)

    torch.tensor = tensor
    torch.Tensor.pin_memory = lambda self, *a, **k: self


def _sglang_tp1(store: str):
    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.runtime_context import get_parallel

    ps.init_distributed_environment(1, 0, f"file://{store}", 0, backend="gloo", timeout=60)
    g = ps.init_model_parallel_group([[0]], 0, "gloo", use_pynccl=False, use_custom_allreduce=False,
                                     group_name="tp")
    get_parallel().override_permanently(tp_group=g, tp_size=1, tp_rank=0, moe_ep_size=1, pp_size=1,
                                        attn_dp_size=1, attn_cp_size=1, moe_dp_size=1, attn_dcp_size=1,
                                        shared_experts_tp_size=None)


def _pool(g, rows_per_rank: int, width: int, packed: bool):
    """A pool stack of the slots: A ``[N, c r_max, in]`` packed at each slot's rank, or B ``[N, out, r_max]``."""
    if packed:
        t = torch.zeros(N, rows_per_rank * R_MAX, width)
        for i, r in enumerate(SLOT_RANK):
            t[i, : rows_per_rank * r] = torch.randn(rows_per_rank * r, width, generator=g) * 0.2
    else:
        t = torch.zeros(N, rows_per_rank, R_MAX)
        for i, r in enumerate(SLOT_RANK):
            t[i, :, :r] = torch.randn(rows_per_rank, r, generator=g) * 0.25
    return t.to(DT)


def _forward_batch(mode, lens):
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    bs, T = len(lens), sum(lens)
    kw = dict(forward_mode=ForwardMode.EXTEND if mode == "extend" else ForwardMode.DECODE, batch_size=bs,
              input_ids=torch.zeros(T, dtype=torch.long), req_pool_indices=torch.arange(bs),
              seq_lens=torch.tensor(lens) + 2, out_cache_loc=torch.arange(T), seq_lens_sum=T + 2 * bs)
    if mode == "extend":
        kw.update(extend_seq_lens=torch.tensor(lens, dtype=torch.int32), extend_seq_lens_cpu=list(lens),
                  extend_num_tokens=T)
    return ForwardBatch(**kw)


def _layers(backend, g):
    """Every dense LoRA layer SGLang wraps, over real SGLang base layers, with the same weights (seeded)."""
    from sglang.srt.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                          RowParallelLinear)
    from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
    from sglang.srt.lora import layers as L

    def init(m):
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        return m

    qkv = L.QKVParallelLinearWithLoRA(init(QKVParallelLinear(HIDDEN, 8, 2, 1, bias=False, params_dtype=DT)),
                                      backend)  # q 16, k 8, v 8
    qkv.set_lora_info(_pool(g, 3, HIDDEN, True), _pool(g, 32, 0, False))
    gate_up = L.MergedColumnParallelLinearWithLoRA(
        init(MergedColumnParallelLinear(HIDDEN, [24, 24], bias=False, params_dtype=DT)), backend)
    gate_up.set_lora_info(_pool(g, 2, HIDDEN, True), _pool(g, 48, 0, False))
    col = L.ColumnParallelLinearWithLoRA(init(ColumnParallelLinear(HIDDEN, 24, bias=True, params_dtype=DT)),
                                         backend)
    col.set_lora_info(_pool(g, 1, HIDDEN, True), _pool(g, 24, 0, False))
    row = L.RowParallelLinearWithLoRA(init(RowParallelLinear(48, HIDDEN, bias=False, params_dtype=DT)), backend)
    row.set_lora_info(_pool(g, 1, 48, True), _pool(g, HIDDEN, 0, False))
    emb = L.VocabParallelEmbeddingWithLoRA(init(VocabParallelEmbedding(VOCAB, HIDDEN, params_dtype=DT)), backend)
    emb.set_lora_info(None, _pool(g, 1, VOCAB, True), _pool(g, HIDDEN, 0, False))
    head = L.ParallelLMHeadWithLoRA(init(ParallelLMHead(VOCAB, HIDDEN, params_dtype=DT)), backend)
    head.set_lora_info(_pool(g, 1, HIDDEN, True), _pool(g, VOCAB, 0, False))
    return {"qkv": qkv, "gate_up": gate_up, "col": col, "row": row, "emb": emb, "head": head}


@torch.no_grad()  # as SGLang runs its model
def _run(mode, backend):
    """Every layer's forward (as the model calls it) for one batch; outputs and the base layers' own outputs."""
    slots, lens = BATCHES[mode]
    backend.prepare_lora_batch(_forward_batch(mode, lens), slots, SLOT_RANK, SCALING, False)
    backend.batch_info.has_active_lora = True  # as LoRAManager.prepare_lora_batch sets it
    g = torch.Generator().manual_seed(5)
    layers = _layers(backend, g)
    T = sum(lens)
    x = (torch.randn(T, HIDDEN, generator=g) * 0.5).to(DT)
    ids = torch.randint(0, VOCAB, (T,), generator=g)
    out = {}
    for name in ("qkv", "gate_up", "col"):
        out[name] = layers[name](x)[0]
        out[name + ".base"] = layers[name].base_layer(x)[0]
    h = torch.nn.functional.silu(out["gate_up"][:, :24]) * out["gate_up"][:, 24:]
    out["row"], out["row.base"] = layers["row"](torch.cat([h, h], 1))[0], layers["row"].base_layer(
        torch.cat([h, h], 1))[0]
    out["emb"], out["emb.base"] = layers["emb"](ids), layers["emb"].base_layer(ids)
    head = layers["head"]
    if mode == "extend":  # the logits processor's pruned rows: each request's last token
        last = torch.cumsum(torch.tensor(lens), 0) - 1
        hid = x[last]
    else:
        hid = x
    out["head"] = head(hid)
    out["head.base"] = torch.nn.functional.linear(hid, head.weight)
    return out


def _child(store, result_file):
    # A forked child of a process whose intra-op (OpenMP) thread pool has run hangs in its next parallel region:
    # one thread here (the shapes are tiny), as the tensor-parallel tests' workers do.
    torch.set_num_threads(1)
    _no_pinned_memory()
    from sglang.srt.lora.backend.triton_backend import TritonLoRABackend

    _sglang_tp1(store)
    res = {}
    for mode in BATCHES:
        ref = _run(mode, TritonLoRABackend(max_loras_per_batch=N, device=torch.device("cpu")))
        ours = _run(mode, sglang_plugin.LoRAKernelsBackend(max_loras_per_batch=N, device="cpu"))
        res[mode] = (ref, ours)
    torch.save(res, result_file)


@pytest.fixture(scope="module")
def layer_results():
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.pt")
        p = mp.get_context("fork").Process(target=_child, args=(os.path.join(tmp, "store"), out))
        p.start()
        p.join(timeout=180)
        if p.is_alive():
            p.kill()
            pytest.fail("the SGLang layer worker did not finish in 180 s (a hang: see _child)")
        assert p.exitcode == 0 and os.path.exists(out), f"the SGLang layer worker failed (exit code {p.exitcode})"
        yield torch.load(out)


@pytest.mark.parametrize("mode", sorted(BATCHES))
@pytest.mark.parametrize("layer", ["qkv", "gate_up", "col", "row", "emb", "head"])
def test_sglang_layer_forward_on_lora_kernels(layer_results, mode, layer):
    ref, ours = layer_results[mode]
    assert not torch.allclose(ref[layer].float(), ref[layer + ".base"].float(), **TOL), "the LoRA added nothing"
    torch.testing.assert_close(ours[layer].float(), ref[layer].float(), **TOL)
