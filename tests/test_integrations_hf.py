"""transformers integration: patch_model on Llama/Qwen2/GPT-2, ids per request, quantised base, compile, graphs."""

import copy

import pytest
import torch
from torch import nn

import lora_kernels as lk
from integ_models import MODELS, VOCAB, fill_adapters, merged_copy, tiny_llama
from lora_kernels.integrations.graphs import DecodeGraph
from lora_kernels.integrations.transformers import patch_model
from lora_kernels.nn import LoRALinear

pytest.importorskip("transformers")

TOL = dict(atol=1e-5, rtol=1e-5)


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_patched_model_matches_single_adapter_references(arch):
    model = MODELS[arch]()
    orig = copy.deepcopy(model)
    p = patch_model(model, None, max_adapters=3, max_rank=8, dtype=torch.float32)
    assert p.layers and all(isinstance(m, LoRALinear) for m in p.layers.values())
    fill_adapters(p.weights, [8, 2, 5])
    ids = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(1))
    req = [2, -1, 0, 2]
    with lk.adapters(req):
        out = _logits(model, ids)
    out_arg = _logits(model, ids, adapter_ids=torch.tensor(req))
    assert torch.equal(out, out_arg)
    for b, i in enumerate(req):
        ref_model = orig if i < 0 else merged_copy(orig, p.weights, i)
        torch.testing.assert_close(out[b], _logits(ref_model, ids[b : b + 1])[0], **TOL)


def test_per_token_ids_and_context_nesting():
    model = tiny_llama(layers=1)
    p = patch_model(model, None, target_modules=["q_proj", "down_proj"], max_adapters=2, max_rank=4,
                    dtype=torch.float32)
    assert sorted(p.layers) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    fill_adapters(p.weights, [4, 3])
    ids = torch.randint(0, VOCAB, (2, 3), generator=torch.Generator().manual_seed(2))
    with lk.adapters([1, 0]):
        per_seq = _logits(model, ids)
        with lk.adapters(torch.tensor([[1, 1, 1], [0, 0, 0]])):
            per_tok = _logits(model, ids)
        again = _logits(model, ids)  # the outer ids are current again
    assert torch.equal(per_seq, per_tok) and torch.equal(per_seq, again)
    none = _logits(model, ids)  # no ids: every token -1, the base model
    p.unpatch()
    assert torch.equal(none, _logits(model, ids))


def test_unpatch_restores_modules_and_outputs():
    model = tiny_llama(layers=1)
    ids = torch.randint(0, VOCAB, (2, 4))
    base = _logits(model, ids)
    before = dict(model.named_modules())
    p = patch_model(model, None, max_adapters=2, max_rank=4, dtype=torch.float32)
    fill_adapters(p.weights, [4, 2])
    with lk.adapters([0, 1]):
        assert not torch.allclose(_logits(model, ids), base)
    p.unpatch()
    p.unpatch()  # idempotent
    after = dict(model.named_modules())
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    assert torch.equal(_logits(model, ids), base)
    assert not model._forward_pre_hooks_with_kwargs


def test_refusals_leave_model_unchanged():
    model = tiny_llama(layers=1)
    mods = dict(model.named_modules())
    with pytest.raises(ValueError, match="target_modules"):
        patch_model(model, None, target_modules=["nope"], max_adapters=2, max_rank=4)
    with pytest.raises(TypeError, match="target_modules"):
        patch_model(model, None, target_modules=["input_layernorm"], max_adapters=2, max_rank=4)
    with pytest.raises(ValueError, match="max_adapters"):
        patch_model(model, None)
    bad = {"model.layers.0.self_attn.q_proj": lk.LoRAWeights(32, 16, 2, 4)}
    with pytest.raises(ValueError, match="in, out"):
        patch_model(model, bad)
    with pytest.raises(ValueError, match="weights_or_pool"):
        patch_model(model, {"model.layers.9.self_attn.q_proj": lk.LoRAWeights(32, 32, 2, 4)})
    assert all(mods[k] is v for k, v in model.named_modules())
    p = patch_model(model, None, max_adapters=2, max_rank=4, max_tokens=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="already a LoRALinear"):
        patch_model(model, None, max_adapters=2, max_rank=4)
    ids = torch.randint(0, VOCAB, (2, 3))
    with pytest.raises(ValueError, match="adapter_ids"):
        _logits(model, ids, adapter_ids=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="adapter_ids"):
        _logits(model, ids, adapter_ids=torch.tensor([0, 2]))  # slot 2 does not exist
    with pytest.raises(ValueError, match="adapter_ids"):
        _logits(model, ids, adapter_ids=[-2, 0])  # a list is checked too
    with pytest.raises(ValueError, match="max_tokens"):
        _logits(model, torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="ids"):
        with lk.adapters([0.5]):
            pass
    p.unpatch()


class Int8Linear(nn.Module):
    """A stand-in quantised linear: int8 weight, per-row fp32 scale, bf16 activations in and out."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach().float()
        s = w.abs().amax(1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(w / s).to(torch.int8))
        self.register_buffer("scale", s)
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def forward(self, x):
        return (x.float() @ (self.qweight.float() * self.scale).t()).to(torch.bfloat16)


def test_quantised_base_gets_bf16_delta():
    from helpers import assert_close_rule

    torch.manual_seed(0)
    seq = nn.Sequential()
    seq.add_module("q_proj", Int8Linear(nn.Linear(32, 24, bias=False)))
    p = patch_model(seq, None, target_modules=["q_proj"], max_adapters=2, max_rank=8, dtype=torch.bfloat16)
    fill_adapters(p.weights, [8, 3])
    x = torch.randn(2, 5, 32).to(torch.bfloat16)
    qbase = p.layers["q_proj"].base
    with torch.no_grad():
        base = qbase(x)
        y = seq(x, adapter_ids=torch.tensor([1, -1]))
    assert y.dtype == torch.bfloat16
    A, B, s = p.weights["q_proj"].adapter(1)
    d32 = s * (x[0].float() @ A.float().t()) @ B.float().t()
    ref = base[0].float() + d32
    lowp = base[0] + s * (x[0] @ A.t()) @ B.t()  # the same in bf16 by PyTorch
    assert_close_rule(y[0], ref, lowp, name="quantised base + bf16 delta")
    assert torch.equal(y[1], base[1])  # -1: the quantised output untouched


def test_torch_compile_fullgraph_of_patched_model():
    model = tiny_llama(layers=1)
    p = patch_model(model, None, max_adapters=3, max_rank=4, dtype=torch.float32)
    fill_adapters(p.weights, [4, 2, 3])
    ids = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    # aot_eager: dynamo's full-graph trace and AOTAutograd over the custom ops' fake impls, without inductor's
    # C++ codegen (minutes on the shared 2-core CI). Inductor on the same model was checked by hand.
    cm = torch.compile(model, fullgraph=True, backend="aot_eager")
    for req in ([0, -1, 2], [1, 1, 0]):  # new ids: same graph, new batch
        with torch.no_grad(), lk.adapters(torch.tensor(req)):
            got = cm(ids).logits
            want = model(ids).logits
        torch.testing.assert_close(got, want, **TOL)
    torch._dynamo.reset()


@pytest.mark.cuda
def test_torch_compile_inductor_fullgraph_cuda():
    model = tiny_llama(layers=1).to("cuda", torch.bfloat16)
    p = patch_model(model, None, max_adapters=3, max_rank=4, dtype=torch.bfloat16)
    fill_adapters(p.weights, [4, 2, 3])
    ids = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(3)).cuda()
    torch._dynamo.reset()
    cm = torch.compile(model, fullgraph=True)  # inductor
    for req in ([0, -1, 2], [1, 1, 0]):
        with torch.no_grad(), lk.adapters(torch.tensor(req, device="cuda")):
            got = cm(ids).logits.float()
            want = model(ids).logits.float()
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)
    torch._dynamo.reset()


def _decode_setup(device):
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    model = tiny_llama(layers=1).to(device, dt)
    p = patch_model(model, None, max_adapters=4, max_rank=8, max_tokens=32, dtype=dt)
    fill_adapters(p.weights, [8, 4, 2, 6])
    return model, p


def test_decode_graph_static_buffers_eager_cpu():
    model, p = _decode_setup("cpu")
    dg = DecodeGraph(p, 3)
    bufs = (dg.adapter_ids.data_ptr(), dg.static_inputs["input_ids"].data_ptr(), p.batch.meta.data_ptr())
    g = torch.Generator().manual_seed(4)
    for req in ([0, 3, -1], [2, 2, 1]):
        tok = torch.randint(0, VOCAB, (3, 1), generator=g)
        got = dg.run_eager(torch.tensor(req, dtype=torch.int32), input_ids=tok)
        with lk.adapters(req):
            want = _logits(model, tok)
        torch.testing.assert_close(got, want, **TOL)
        assert dg.adapter_ids.tolist() == req
    assert bufs == (dg.adapter_ids.data_ptr(), dg.static_inputs["input_ids"].data_ptr(), p.batch.meta.data_ptr())
    with pytest.raises(RuntimeError, match="CUDA"):
        dg.capture()
    with pytest.raises(ValueError, match="adapter_ids"):
        dg.run_eager(torch.tensor([0, 1], dtype=torch.int32), input_ids=tok)


@pytest.mark.cuda
def test_decode_graph_replay_cuda():
    model, p = _decode_setup("cuda")
    dg = DecodeGraph(p, 4)
    g = torch.Generator().manual_seed(5)
    dg.capture()
    for req in ([0, 3, -1, 1], [2, 2, 1, 3], [-1, -1, -1, -1]):
        ids = torch.tensor(req, dtype=torch.int32, device="cuda")
        tok = torch.randint(0, VOCAB, (4, 1), generator=g).cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # replay must not sync with the host
        try:
            got = dg.replay(ids, input_ids=tok).clone()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        want = dg.run_eager(ids, input_ids=tok)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert dg.captures == 1


def _static_cache_check(device, replay: bool):
    model, p = _decode_setup(device)
    B, P, K = 3, 4, 3
    g = torch.Generator().manual_seed(6)
    seq = torch.randint(0, VOCAB, (B, P + K), generator=g).to(device)
    ids = torch.tensor([0, 3, -1], dtype=torch.int32, device=device)
    full = _logits(model, seq, adapter_ids=ids).float()
    dg = DecodeGraph.with_static_cache(p, B, max_cache_len=16)
    pre = dg.prefill(seq[:, :P], ids)
    tol = TOL if device == "cpu" else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(pre.float(), full[:, :P], **tol)
    if replay:
        dg.capture()
    for k in range(K):
        pos = torch.tensor([P + k], device=device)
        tok = seq[:, P + k : P + k + 1]
        out = dg.replay(ids, input_ids=tok, cache_position=pos) if replay else \
            dg.run_eager(ids, input_ids=tok, cache_position=pos)
        torch.testing.assert_close(out[:, 0].float(), full[:, P + k], **tol)
    return dg


def test_decode_graph_static_cache_eager_cpu():
    dg = _static_cache_check("cpu", replay=False)
    with pytest.raises(RuntimeError, match="with_static_cache"):
        DecodeGraph(dg.patch, 3).prefill(torch.zeros(3, 2, dtype=torch.long), dg.adapter_ids)


@pytest.mark.cuda
def test_decode_graph_static_cache_replay_cuda():
    dg = _static_cache_check("cuda", replay=True)
    assert dg.captures == 1
