"""Tensor-parallel LoRA on a Llama-style MLP block: gate/up (one fused column-parallel layer) and down (row-parallel).

    torchrun --nproc_per_node 2 python/tp_lora.py [--tokens 64]     # gloo on CPU, 2 ranks
    python python/tp_lora.py                                        # one rank (a 1-process gloo group)

Every rank builds the same full LoRAWeights of both layers (8 adapters of ranks 4..32, one seed: what loading the
same adapters from disk gives) and keeps only its shards (lora_kernels.tensor_parallel.shard_weights). The block
runs as Megatron / vLLM run it: rank k computes its rows of gate and up (x replicated), the activation on them,
its partial down output from those columns, and one all_reduce sums the partials. The LoRA delta joins at each
layer with one scheme:

    plain          column: B split per slice, A replicated; row: reduce="caller" (the partial delta rides on the
                   layer's all_reduce): no communication of its own
    reduce h       row: reduce="h": the base output is reduced first, then one all_reduce of h and the full delta
    fully sharded  column: A split by rank rows, all_gather of h; row: B split by output rows, all_reduce of h

and the block's output is compared on every rank with the unsharded single-process computation.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist

import lora_kernels as lk
from lora_kernels import tensor_parallel as tp

HIDDEN, INTER = 32, 64
RANKS = [4, 8, 16, 32, 4, 8, 16, 32]


def make_model(seed: int = 0):
    """Base weights and the full LoRA weights of both layers, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    W_gate_up = torch.randn(2 * INTER, HIDDEN, generator=g) / HIDDEN**0.5
    W_down = torch.randn(HIDDEN, INTER, generator=g) / INTER**0.5
    gate_up = lk.LoRAWeights(HIDDEN, [INTER, INTER], len(RANKS), max(RANKS), dtype=torch.float32)
    down = lk.LoRAWeights(INTER, HIDDEN, len(RANKS), max(RANKS), dtype=torch.float32)
    for r in RANKS:
        gate_up.add([torch.randn(r, HIDDEN, generator=g) / HIDDEN**0.5 for _ in range(2)],
                    [torch.randn(INTER, r, generator=g) / r**0.5 for _ in range(2)], alpha=2 * r)
        down.add(torch.randn(r, INTER, generator=g) / INTER**0.5, torch.randn(HIDDEN, r, generator=g) / r**0.5,
                 alpha=2 * r)
    return W_gate_up, W_down, gate_up, down


def block(x, W_gate_up, W_down, gate_up, down, batch):
    """The unsharded block: ``down(silu(gate(x)) * up(x))`` with every LoRA delta."""
    gu = lk.add_lora_(x @ W_gate_up.t(), x, gate_up, batch)
    act = torch.nn.functional.silu(gu[:, :INTER]) * gu[:, INTER:]
    return lk.add_lora_(act @ W_down.t(), act, down, batch)


def shard(gate_up, down, scheme: str):
    """This rank's shards of both layers (load time: once per load event, not per step)."""
    k, size = dist.get_rank(), dist.get_world_size()
    fully = scheme == "fully sharded"
    return (tp.shard_weights(gate_up, k, size, "column", fully_sharded=fully),
            tp.shard_weights(down, k, size, "row", fully_sharded=fully))


def block_tp(x, W_gate_up, W_down, sh_gu, sh_down, batch, scheme: str):
    """The same block on this rank's shards; returns the full output (the same on every rank)."""
    k, size = dist.get_rank(), dist.get_world_size()
    n = INTER // size
    rows = torch.cat([torch.arange(k * n, (k + 1) * n), INTER + torch.arange(k * n, (k + 1) * n)])  # gate, up rows
    gu = x @ W_gate_up[rows].t()  # [T, 2 n]: this rank's gate rows, then its up rows
    tp.column_parallel_add_lora_(gu, x, sh_gu, batch)
    act = torch.nn.functional.silu(gu[:, :n]) * gu[:, n:]  # this rank's columns of the down input
    y = act @ W_down[:, k * n : (k + 1) * n].t()  # partial output
    if scheme == "reduce h":
        dist.all_reduce(y)  # the layer's reduce of the base alone, then the full delta on every rank
        tp.row_parallel_add_lora_(y, act, sh_down, batch, reduce="h")
    else:
        tp.row_parallel_add_lora_(y, act, sh_down, batch)  # the partial (or this rank's rows of the) delta
        dist.all_reduce(y)  # the layer's own reduce sums base and LoRA together
    return y


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # tiny matmuls; torchrun's processes share the cores
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    else:
        store = os.path.join(tempfile.mkdtemp(), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        return run(args)
    finally:
        dist.destroy_process_group()


def run(args) -> int:
    me, size = dist.get_rank(), dist.get_world_size()
    say = print if me == 0 else (lambda *a, **k: None)
    W_gate_up, W_down, gate_up, down = make_model()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(-1, len(RANKS), (args.tokens,), generator=g, dtype=torch.int32)  # -1 = base model only
    x = torch.randn(args.tokens, HIDDEN, generator=g)
    batch = lk.LoRABatch.from_ids(ids, len(RANKS))
    want = block(x, W_gate_up, W_down, gate_up, down, batch)
    full_bytes = sum(t.nbytes for w in (gate_up, down) for t in (w.a, w.b))
    say(f"{size} ranks (gloo), {args.tokens} tokens, adapters of ranks {RANKS}, MLP {HIDDEN} -> 2 x {INTER} -> "
        f"{HIDDEN}; full LoRA storage {full_bytes} bytes")
    ok = True
    for scheme in ("plain", "reduce h", "fully sharded"):
        sh_gu, sh_down = shard(gate_up, down, scheme)
        got = block_tp(x, W_gate_up, W_down, sh_gu, sh_down, batch, scheme)
        nbytes = sh_gu.nbytes + sh_down.nbytes
        err = torch.tensor((got - want).abs().max().item())
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        ok &= err.item() < 1e-4
        say(f"{scheme}: max |sharded - unsharded| {err.item():.2e} over all ranks; rank 0 holds {nbytes} bytes "
            f"of LoRA shards")
    say(f"{'OK' if ok else 'FAILED'}: every scheme matches the unsharded block on every rank")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
