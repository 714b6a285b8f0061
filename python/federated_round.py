"""Federated LoRA rounds with 10 clients of mixed ranks: fedavg vs stack vs stack_svd.

A tiny frozen 2-layer MLP (hidden 64) gets LoRA on both layers. Clients (ranks 64,32,16,16,8,8,4,4,4,4; weights =
their sample counts) fit non-IID synthetic regression data for a few local steps from a common fresh LoRA
init; the server aggregates with each method, merges the aggregate delta into the global weights (FLoRA's
merge-and-restart) and evaluates the global loss. Printed per round and method: the relative error of the
aggregate against the exact weighted sum of the clients' deltas, and the global eval loss.

    python python/federated_round.py [--rounds 3]                                  # one process
    torchrun --nproc_per_node 2 python/federated_round.py [--rounds 3]            # gloo, clients split

Under torchrun, process i aggregates only its share of the clients through
lora_kernels.federated.distributed.aggregate; every process also trains all clients (cheap here) so that it
can check the distributed aggregate against the single-process one, and prints the largest difference.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

import lora_kernels.federated as fed

RANKS = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]
LAYERS = ("fc1", "fc2")


def make_task(hidden: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(hidden, hidden, generator=g) / hidden**0.5 for n in LAYERS}
    shared = {n: torch.randn(hidden, 8, generator=g) @ torch.randn(8, hidden, generator=g) / hidden for n in LAYERS}
    per_client = [{n: torch.randn(hidden, 2, generator=g) @ torch.randn(2, hidden, generator=g) / hidden
                   for n in LAYERS} for _ in RANKS]
    teachers = [{n: base[n] + shared[n] + 0.5 * pc[n] for n in LAYERS} for pc in per_client]
    samples = [40 + 8 * k for k in range(len(RANKS))]  # aggregation weights
    data = []
    for k, t in enumerate(teachers):
        x = torch.randn(samples[k], hidden, generator=g)
        data.append((x, forward(t, x)))
    x_eval = torch.randn(256, hidden, generator=g)
    glob_teacher = {n: base[n] + shared[n] for n in LAYERS}
    return base, data, samples, (x_eval, forward(glob_teacher, x_eval))


def forward(W, x, lora=None):
    h = x
    for i, n in enumerate(LAYERS):
        y = h @ W[n].t()
        if lora is not None:
            A, B, s = lora[n]
            y = y + s * (h @ A.t()) @ B.t()
        h = torch.nn.functional.gelu(y) if i == 0 else y
    return h


def train_client(W, x, y, rank, round_idx, steps, lr, hidden):
    # A common A init for the round (what a server broadcast gives), truncated to the client's rank; B = 0.
    g = torch.Generator().manual_seed(1000 + round_idx)
    lora = {}
    for n in LAYERS:
        A0 = torch.randn(max(RANKS), hidden, generator=g)[:rank] / hidden**0.5
        lora[n] = [A0.clone().requires_grad_(), torch.zeros(hidden, rank, requires_grad=True), 16.0 / rank]
    params = [t for v in lora.values() for t in v[:2]]
    m = [torch.zeros_like(p) for p in params]
    v2 = [torch.zeros_like(p) for p in params]
    for step in range(1, steps + 1):  # Adam, written out (torch.optim's import pulls torch._dynamo: seconds)
        loss = torch.nn.functional.mse_loss(forward(W, x, lora), y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g_, m_, v_ in zip(params, grads, m, v2):
                m_.mul_(0.9).add_(g_, alpha=0.1)
                v_.mul_(0.999).addcmul_(g_, g_, value=0.001)
                p.addcdiv_(m_ / (1 - 0.9**step), (v_ / (1 - 0.999**step)).sqrt_().add_(1e-8), value=-lr)
    return {n: fed.LoRAFactors(v[0].detach(), v[1].detach(), v[2]) for n, v in lora.items()}


def aggregate(method, clients, weights, svd_rank, dist_share=None):
    if dist_share is None:
        if method == "stack_svd":
            return fed.stack_svd(clients, svd_rank, weights)
        return getattr(fed, method)(clients, weights)
    lo, hi = dist_share
    return fed.distributed.aggregate(clients[lo:hi], method, weights=weights[lo:hi],
                                     target_rank=svd_rank if method == "stack_svd" else None,
                                     num_clients=len(clients))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=15)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--svd-rank", type=int, default=16)
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 64-wide matmuls: threads only add synchronisation (and oversubscribe torchrun)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    share = None
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        me = dist.get_rank()
        K = len(RANKS)
        share = (me * K // world, (me + 1) * K // world)  # contiguous: process order == client order
    else:
        me = 0
    say = print if me == 0 else (lambda *a, **k: None)
    base, data, samples, (x_eval, y_eval) = make_task(args.hidden)
    say(f"{len(RANKS)} clients, ranks {RANKS}, weights {samples}, hidden {args.hidden}, "
        f"{'%d processes (gloo)' % world if world > 1 else 'one process'}")
    ok = True
    worst_dist = 0.0
    final = {}
    for method in ("fedavg", "stack", "stack_svd"):
        W = copy.deepcopy(base)
        for r in range(args.rounds):
            clients = [train_client(W, x, y, RANKS[k], r, args.local_steps, args.lr, args.hidden)
                       for k, (x, y) in enumerate(data)]
            agg = aggregate(method, clients, samples, args.svd_rank, share)
            exact = fed.exact_delta(clients, samples)
            errs = []
            for n in LAYERS:
                d = agg[n].scale * agg[n].B @ agg[n].A
                errs.append(float((d - exact[n]).norm() / exact[n].norm()))
                W[n] = W[n] + d
            if share is not None:  # the distributed aggregate must equal the single-process one
                ref = aggregate(method, clients, samples, args.svd_rank)
                for n in LAYERS:
                    diff = (agg[n].B @ agg[n].A - ref[n].B @ ref[n].A).abs().max().item()
                    worst_dist = max(worst_dist, diff / max(ref[n].B.abs().max().item(), 1e-30))
            loss = torch.nn.functional.mse_loss(forward(W, x_eval), y_eval).item()
            reported = f", reported {agg.max_rel_error:.3e}" if agg.rel_error else ""
            say(f"{method:>9} round {r}: rank {agg[LAYERS[0]].rank:>3}, rel. error vs exact weighted sum "
                f"{max(errs):.3e}{reported}, eval loss {loss:.5f}")
            if method == "stack":
                ok &= max(errs) < 1e-4
            if method == "stack_svd" and r == 0:
                for note in agg.notes:
                    say(f"          note: {note}")
            if method == "stack" and r == args.rounds - 1:
                red = fed.redistribute(agg, RANKS)
                say("    redistribute to client ranks: rel. error " + ", ".join(
                    f"r{rk}={red[k].max_rel_error:.2f}" for k, rk in enumerate(RANKS) if k in (0, 1, 2, 4, 6)))
        final[method] = loss
    ok &= final["stack"] <= final["fedavg"]
    if share is not None:
        ok &= worst_dist < 1e-5
        say(f"distributed aggregate vs single-process: max relative difference {worst_dist:.2e}")
    say(f"{'OK' if ok else 'FAILED'}: final eval loss fedavg {final['fedavg']:.5f}, stack {final['stack']:.5f}, "
        f"stack_svd(r={args.svd_rank}) {final['stack_svd']:.5f}")
    if world > 1:
        fed.distributed.dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
