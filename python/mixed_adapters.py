"""A serving-style loop over a tiny attention-projection block with many LoRA adapters of mixed ranks.

Each step draws a new batch of requests, each request using its own adapter (or none), rebuilds ONE
LoRABatch in place, and runs a fused q/k/v projection (three slices, one launch) plus an output projection.
Every step is checked against the fp32 reference. Runs on the GPU when there is one, else on the CPU path.

    python python/mixed_adapters.py [--steps 4] [--compile]
"""

from __future__ import annotations

import argparse

import torch

import lora_kernels as lk


def build(hidden: int, kv: int, n_adapters: int, ranks, dtype, device):
    g = torch.Generator().manual_seed(0)
    qkv = lk.LoRAWeights(hidden, [hidden, kv, kv], max_adapters=n_adapters, max_rank=max(ranks), dtype=dtype,
                         device=device)
    o = lk.LoRAWeights(hidden, hidden, max_adapters=n_adapters, max_rank=max(ranks), dtype=dtype, device=device)
    for i in range(n_adapters):
        r = ranks[i % len(ranks)]
        qkv.add([torch.randn(r, hidden, generator=g) / hidden**0.5 for _ in range(3)],
                [torch.randn(n, r, generator=g) / r**0.5 for n in (hidden, kv, kv)], alpha=2 * r)
        o.add(torch.randn(r, hidden, generator=g) / hidden**0.5, torch.randn(hidden, r, generator=g) / r**0.5,
              alpha=2 * r)
    model = torch.nn.ModuleDict({
        "qkv": lk.nn.LoRALinear(torch.nn.Linear(hidden, hidden + 2 * kv, device=device, dtype=dtype), qkv),
        "o": lk.nn.LoRALinear(torch.nn.Linear(hidden, hidden, device=device, dtype=dtype), o),
    })
    return model


def forward(model, x):
    q, k, v = model["qkv"](x).split([model["o"].in_features, *(model["qkv"].weights.slice_outs[1:])], dim=-1)
    return model["o"](q * torch.sigmoid(k.sum(-1, keepdim=True)) + v.mean(-1, keepdim=True))


def reference_forward(model, x, ids):
    qkv = model["qkv"].base(x).float() + lk.reference.lora_delta(x, model["qkv"].weights, ids)
    hidden = model["o"].in_features
    q, k, v = qkv.to(x.dtype).split([hidden, *(model["qkv"].weights.slice_outs[1:])], dim=-1)
    h = q * torch.sigmoid(k.sum(-1, keepdim=True)) + v.mean(-1, keepdim=True)
    return model["o"].base(h).float() + lk.reference.lora_delta(h, model["o"].weights, ids)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) the forward")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hidden, kv, n_adapters, max_tokens = 128, 32, 16, 64
    model = build(hidden, kv, n_adapters, ranks=[4, 8, 16, 32, 64], dtype=dtype, device=device)
    batch = lk.LoRABatch(max_tokens, n_adapters, device)  # one batch, rebuilt in place every step
    fwd = torch.compile(forward, fullgraph=True) if args.compile else forward
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for step in range(args.steps):
        # A fixed token count keeps shapes static (what a CUDA graph or compiled graph wants).
        ids = torch.randint(-1, n_adapters, (max_tokens,), generator=g, dtype=torch.int32)
        x = torch.randn(max_tokens, hidden, generator=g).to(device, dtype)
        batch.build(ids.to(device), ranks=model["qkv"].weights.ranks)
        with torch.inference_mode(), lk.use_batch(batch):
            out = fwd(model, x)
            ref = reference_forward(model, x, ids.to(device))
        err = (out.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
        worst = max(worst, err)
        d = batch.to_dict()
        print(f"step {step}: {d['num_valid']}/{max_tokens} tokens with an adapter, {d['num_active']} adapters active "
              f"(max rank {d['max_rank']}), relative error vs reference {err:.2e}")
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    print(f"{'OK' if worst <= tol else 'FAILED'}: worst relative error {worst:.2e} (tolerance {tol:g}) on {device}")
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    raise SystemExit(main())
