"""Many adapters on disk, a pool that holds a few: 1,000 PEFT adapters, an AdapterPool with 64 slots, requests
drawn from a Zipf distribution; hit rate, misses, prefetch stalls and evictions printed.

Each step serves a batch of requests (each request its own adapter) through a small stack of LoRALinear
layers, after prefetching the adapters of the next step (so copies overlap compute on a GPU: side stream +
events). Every ``--check-every`` steps the output is compared with a dense per-adapter reference, which
proves that evicted-and-reused rows are never served for the wrong adapter. Runs on the GPU when there is one.

    python python/many_adapters.py [--adapters 1000] [--capacity 64] [--steps 200] [--hidden 64] [--cpu]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import tempfile
import time

import torch

import lora_kernels as lk
from lora_kernels.peft_format import save_peft_adapter
from lora_kernels.pool import AdapterPool, PoolFullError


def make_model(hidden: int, layers: int, capacity: int, max_rank: int, rows: int, dtype, device):
    g = torch.Generator().manual_seed(0)
    mods = torch.nn.ModuleDict()
    for i in range(layers):
        for p in ("q_proj", "v_proj"):
            base = torch.nn.Linear(hidden, hidden, bias=False)
            with torch.no_grad():
                base.weight.copy_(torch.randn(hidden, hidden, generator=g) / hidden**0.5)
            w = lk.LoRAWeights(hidden, hidden, capacity, max_rank, capacity_rows=rows, dtype=dtype, device=device)
            mods[f"l{i}_{p}"] = lk.nn.LoRALinear(base.to(device, dtype), w)
    return mods


def forward(model, x):
    for m in model.values():
        x = x + torch.tanh(m(x))
    return x


def reference(model, x, token_adapters, factors):
    """fp64 maths with the model's roundings: base plus each token's own dense delta from the factors written
    to disk (rounded to the storage dtype, as the pool stores them), activations rounded where the model rounds
    them. Evicted rows reused by another adapter would show up here as a wrong delta."""
    dt = x.dtype

    def rnd(t):
        return t.to(dt).double()

    h = x.double()
    for name, m in model.items():
        y = rnd(h @ m.base.weight.double().t())
        d = torch.zeros_like(y)
        for t, a in enumerate(token_adapters):
            if a is not None:
                A, B, s = factors[a][name]
                d[t] = s * (rnd(B).to(h.device) @ (rnd(A).to(h.device) @ h[t]))
        h = rnd(h + rnd(torch.tanh(rnd(y + d))))
    return h


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--capacity", type=int, default=64, help="adapters the pool holds at once")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--requests", type=int, default=16, help="requests per step (each its own adapter)")
    ap.add_argument("--tokens", type=int, default=2, help="tokens per request")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ranks", default="4,8,16", help="adapter ranks, drawn uniformly")
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of adapter popularity")
    ap.add_argument("--check-every", type=int, default=10)
    ap.add_argument("--dir", default=None, help="where to write the adapters (default: a temporary directory)")
    ap.add_argument("--no-prefetch", action="store_true", help="do not prefetch the next step's adapters")
    ap.add_argument("--progress", action="store_true", help="show a progress bar while registering")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                    help="storage/compute dtype (auto: bf16 on CUDA, fp32 on the CPU)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = ((torch.bfloat16 if device == "cuda" else torch.float32) if args.dtype == "auto"
             else getattr(torch, args.dtype))
    ranks = [int(r) for r in args.ranks.split(",")]
    n, hidden = args.adapters, args.hidden
    g = torch.Generator().manual_seed(1)

    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="lk_many_adapters_")
    root = pathlib.Path(args.dir or tmp.name)
    # Rank-paged rows: room for `capacity` adapters of the mean rank, plus slack of one batch of the largest
    # rank (adapters referenced by the current batch cannot move, so free rows may be fragmented around them).
    rows = args.capacity * math.ceil(sum(ranks) / len(ranks)) + args.requests * max(ranks)
    model = make_model(hidden, args.layers, args.capacity, max(ranks), rows=min(rows, args.capacity * max(ranks)),
                       dtype=dtype, device=device)
    t0 = time.perf_counter()
    factors, sources = {}, {}
    for i in range(n):
        r = ranks[int(torch.randint(len(ranks), (1,), generator=g))]
        alpha = float(2 * r)
        mods = {}
        for lname in model:
            layer, proj = lname.split("_", 1)
            mods[f"{layer}.{proj}"] = (torch.randn(r, hidden, generator=g) / hidden**0.5,
                                       torch.randn(hidden, r, generator=g) / r**0.5)
        name = f"adapter{i:04d}"
        sources[name] = save_peft_adapter(root / name, mods, r=r, lora_alpha=alpha)
        factors[name] = {f"{p.split('.')[0]}_{p.split('.')[1]}": (A, B, alpha / r) for p, (A, B) in mods.items()}
    t_write = time.perf_counter() - t0

    # Module paths of the LoRALinear modules in `model` are "l0_q_proj", ...; the files say "l0.q_proj".
    pool = AdapterPool({f"{k.split('_', 1)[0]}.{k.split('_', 1)[1]}": m.weights for k, m in model.items()},
                       prefetch=not args.no_prefetch)
    t0 = time.perf_counter()
    pool.load_many(sources, progress=args.progress)
    t_reg = time.perf_counter() - t0

    names = list(sources)
    popularity = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** args.zipf
    perm = torch.randperm(n, generator=g)

    def draw():
        return [names[int(perm[k])] for k in torch.multinomial(popularity, args.requests, True, generator=g)]

    T = args.requests * args.tokens
    batch = lk.LoRABatch(T, pool.num_slots, device)
    worst, nxt, t_serve = 0.0, draw(), 0.0
    for step in range(args.steps):
        reqs, nxt = nxt, draw()
        t0 = time.perf_counter()
        with pool.use(reqs) as ids:
            if not args.no_prefetch:
                for a in dict.fromkeys(nxt):  # overlap the next step's copies with this step's compute
                    try:
                        pool.prefetch(a)
                    except PoolFullError:
                        break
            batch.build(torch.tensor(ids, dtype=torch.int32).repeat_interleave(args.tokens).to(device))
            x = torch.randn(T, hidden, generator=g).to(device, dtype)
            with torch.inference_mode(), lk.use_batch(batch):
                out = forward(model, x)
            if device == "cuda":
                torch.cuda.synchronize()
            t_serve += time.perf_counter() - t0
            if args.check_every and step % args.check_every == 0:
                ref = reference(model, x, [a for a in reqs for _ in range(args.tokens)], factors)
                worst = max(worst, ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item())
    s = pool.stats
    print(f"{n} adapters written in {t_write:.2f} s, registered in {t_reg:.2f} s ({n / t_reg:.0f} adapters/s); "
          f"pool: {pool.max_adapters} slots x {args.layers * 2} layers on {device}")
    print(f"{args.steps} steps x {args.requests} requests (Zipf {args.zipf}): hit rate {s.hit_rate:.1%} "
          f"(hits {s.hits}, misses {s.misses}, prefetch stalls {s.stalls}), evictions {s.evictions}, "
          f"copies {s.loads}, {1e3 * t_serve / max(args.steps, 1):.2f} ms/step")
    if device == "cpu":
        print("(on the CPU copies are synchronous: stalls are always 0; prefetch still turns misses into hits)")
    tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3}.get(dtype, 1e-4)
    ok = worst <= tol
    print(f"{'OK' if ok else 'FAILED'}: worst relative error vs dense per-adapter reference {worst:.2e} "
          f"(tolerance {tol:g})")
    if tmp is not None:
        tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
