"""Serve many PEFT adapters in one batch: a tiny Llama-style model, 32 adapters of ranks 8..64 saved in PEFT
format, batched greedy generation where every request uses its own adapter, checked against PEFT one adapter
at a time.

    python python/serve_multi_lora.py                       # CPU-sized defaults, well under a minute
    python python/serve_multi_lora.py --hidden 1024 --layers 8 --vocab 32000 --device cuda --dtype bf16

Steps: build the model from a local ``LlamaConfig`` (random weights, no download); create the adapters with
PEFT (``init_lora_weights=False``: random, non-zero B) and ``save_pretrained`` them; patch a copy of the base
model (:func:`lora_kernels.integrations.transformers.patch_model`) and load the files into an
:class:`lora_kernels.AdapterPool`; generate greedily for all requests at once under ``lk.adapters(slots)``; then
generate each adapter's requests with PEFT (``set_adapter``) and compare the tokens. Prints tokens/s of the
batched generation (wall clock, including Python overhead: on the CPU this is not a kernel measurement) and
``OK:`` when every request's tokens equal PEFT's.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from typing import List, Optional

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=32, help="number of adapters (ranks cycle over 8, 16, ..., 64)")
    p.add_argument("--min-rank", type=int, default=8)
    p.add_argument("--max-rank", type=int, default=64)
    p.add_argument("--requests", type=int, help="requests in the batch (default: one per adapter)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workdir", help="where the PEFT adapters are saved (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def ranks_for(n: int, lo: int, hi: int) -> List[int]:
    steps = list(range(lo, hi + 1, 8)) or [lo]
    return [steps[k % len(steps)] for k in range(n)]


def build_base(args):
    import transformers

    torch.manual_seed(args.seed)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 2),
        max_position_embeddings=args.prompt_len + args.new_tokens + 8, pad_token_id=0, bos_token_id=1,
        eos_token_id=None)
    return transformers.LlamaForCausalLM(cfg).eval()


def save_adapters(base, names, ranks, workdir) -> "object":
    """Create the adapters with PEFT and save each in PEFT format under workdir/<name>; returns the PeftModel."""
    import peft

    pm = None
    for name, r in zip(names, ranks):
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False)
        if pm is None:
            pm = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
        with torch.no_grad():  # PEFT's random init gives tiny deltas at this size: make them matter
            for mod in pm.modules():
                if hasattr(mod, "lora_B") and name in mod.lora_B:
                    mod.lora_B[name].weight.mul_(8.0)
    for name in names:
        pm.save_pretrained(workdir, selected_adapters=[name])
    return pm.eval()


def adapter_dir(workdir: str, name: str) -> str:
    sub = os.path.join(workdir, name)  # PEFT saves non-default adapters in a sub-directory
    return sub if os.path.isdir(sub) else workdir


def greedy(model, prompts, new_tokens: int) -> torch.Tensor:
    with torch.inference_mode():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, prompts.shape[1]:]


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    import lora_kernels as lk
    from lora_kernels.integrations.transformers import patch_model

    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    n = args.adapters
    names = [f"adapter{k:03d}" for k in range(n)]
    ranks = ranks_for(n, args.min_rank, args.max_rank)
    R = args.requests or n
    base = build_base(args)
    tmp = None
    workdir = args.workdir
    if workdir is None:
        tmp = tempfile.TemporaryDirectory()
        workdir = tmp.name
    t0 = time.perf_counter()
    pm = save_adapters(base, names, ranks, workdir)
    print(f"{n} adapters (ranks {min(ranks)}..{max(ranks)}) saved in PEFT format in {time.perf_counter() - t0:.1f}s")

    # Serving model: the base, patched, with the adapter files loaded into a pool.
    model = copy.deepcopy(base).to(dev, dt)
    patch = patch_model(model, None, target_modules=TARGETS, max_adapters=n, max_rank=max(ranks),
                        capacity_rows=sum(ranks), max_tokens=R * (args.prompt_len + args.new_tokens), dtype=dt)
    pool = lk.AdapterPool(model)
    pool.load_many({nm: adapter_dir(workdir, nm) for nm in names}, resident=True, progress=False)
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = torch.randint(2, args.vocab, (R, args.prompt_len), generator=g)
    req_adapter = [names[k % n] for k in range(R)]

    with pool.use(req_adapter) as slots, lk.adapters(torch.tensor(slots, dtype=torch.int32, device=dev)):
        greedy(model, prompts.to(dev), 1)  # warm-up (first-call initialisation)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        batched = greedy(model, prompts.to(dev), args.new_tokens).cpu()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt_gen = time.perf_counter() - t0
    tps = R * args.new_tokens / dt_gen
    print(f"batched greedy generation: {R} requests x {args.new_tokens} tokens, {n} adapters, "
          f"{dt_gen * 1e3:.0f} ms, {tps:.0f} tokens/s ({dev.type}, {args.dtype}; wall clock)")

    # PEFT, one adapter at a time, same requests.
    pm = pm.to(dev, dt)
    bad = []
    for name in names:
        rows = [k for k in range(R) if req_adapter[k] == name]
        if not rows:
            continue
        pm.set_adapter(name)
        ref = greedy(pm, prompts[rows].to(dev), args.new_tokens).cpu()
        for j, k in enumerate(rows):
            if not torch.equal(ref[j], batched[k]):
                bad.append((k, name, ref[j].tolist(), batched[k].tolist()))
    patch.unpatch()
    if tmp is not None:
        tmp.cleanup()
    if bad:
        for k, name, ref, got in bad[:5]:
            print(f"MISMATCH request {k} ({name}): PEFT {ref} vs batched {got}")
        print(f"FAIL: {len(bad)} of {R} requests differ from PEFT")
        return 1
    print(f"OK: all {R} requests equal PEFT's single-adapter greedy tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
