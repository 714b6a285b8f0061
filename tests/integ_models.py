"""Tiny random transformers models (local configs, no network) and a merged-weights reference for the
integration tests."""

from __future__ import annotations

import copy

import torch

VOCAB = 64


def tiny_llama(layers: int = 2, hidden: int = 32, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=48,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_qwen2(layers: int = 1, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def tiny_gpt2(layers: int = 1, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=2, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}


def fill_adapters(weights, ranks, seed: int = 0):
    """Add one adapter per entry of ``ranks`` (ids 0..) to every LoRAWeights of a ``{path: w}`` mapping."""
    g = torch.Generator().manual_seed(seed)
    for w in weights.values():
        for i, r in enumerate(ranks):
            A = torch.randn(r, w.in_features, generator=g) / w.in_features ** 0.5
            B = torch.randn(w.out_features, r, generator=g) / r ** 0.5
            w.add(A, B, alpha=float(r) * (0.5 + i), adapter_id=i)


def merged_copy(model, weights, adapter_id: int):
    """A deep copy of the unpatched ``model`` with adapter ``adapter_id`` of ``weights`` folded into the base
    weights (fp32 math): the single-adapter reference."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for path, w in weights.items():
            if adapter_id not in w.loaded:
                continue
            A, B, s = w.adapter(adapter_id)
            delta = s * (B.double() @ A.double())
            mod = m.get_submodule(path)
            if type(mod).__name__ == "Conv1D":  # weight [in, out]
                mod.weight += delta.t().to(mod.weight.dtype)
            else:
                mod.weight += delta.to(mod.weight.dtype)
    return m
