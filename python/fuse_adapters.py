"""Fuse 4 task adapters of a tiny model by task arithmetic and TIES, sweeping lambda.

Each synthetic task is a classification problem whose labels come from the base model with a task-specific
low-rank change of the first layer that reads only the task's own input features; its inputs come from that
region of the input space (so the tasks are largely, not entirely, compatible). One LoRA adapter
(rank 4, on both layers) is trained per task with the base frozen. The adapters are then fused layer by layer
(``lora_kernels.fusion``, a dict of layers per task) and every task is evaluated with the fused model, for each
lambda. Last, the task-arithmetic fusion is served as a low-rank adapter through ``add_lora_`` and checked
against the dense fused delta.

    python python/fuse_adapters.py [--steps 150] [--density 0.2]
"""

from __future__ import annotations

import argparse

import torch

import lora_kernels as lk
from lora_kernels.fusion import task_arithmetic, ties

IN, HID, CLASSES, RANK, TASKS = 32, 64, 6, 4, 4
LAYERS = {"fc1": (HID, IN), "fc2": (CLASSES, HID)}


def make_tasks(g, device):
    base = {name: torch.randn(o, i, generator=g) / i**0.5 for name, (o, i) in LAYERS.items()}
    tasks = []
    for t in range(TASKS):
        own = slice(8 * t, 8 * t + 8)  # each task lives in its own part of the input space
        V = torch.zeros(2, IN)
        V[:, own] = torch.randn(2, 8, generator=g)
        teacher = dict(base, fc1=base["fc1"] + 3.0 * torch.randn(HID, 2, generator=g) @ V / 8**0.5)
        centre, spread = torch.zeros(IN), torch.full((IN,), 0.3)
        centre[own], spread[own] = 1.0, 1.0

        def sample(n, teacher=teacher, centre=centre, spread=spread):
            x = centre + spread * torch.randn(n, IN, generator=g)
            return x.to(device), forward(teacher, x).argmax(-1).to(device)

        tasks.append(sample)
    return {k: v.to(device) for k, v in base.items()}, tasks


def forward(weights, x):
    return torch.relu(x @ weights["fc1"].t()) @ weights["fc2"].t()


def train_adapter(base, sample, steps, g, device):
    """Plain PyTorch LoRA training (A random, B zero, scale alpha / r with alpha = 2r), base frozen."""
    params = {name: (torch.randn(RANK, i, generator=g).div(i**0.5).to(device).requires_grad_(),
                     torch.zeros(o, RANK, device=device, requires_grad=True)) for name, (o, i) in LAYERS.items()}
    opt = torch.optim.Adam([p for ab in params.values() for p in ab], lr=1e-2)
    scale = 2.0
    for _ in range(steps):
        x, y = sample(256)
        w = {name: base[name] + scale * B @ A for name, (A, B) in params.items()}
        loss = torch.nn.functional.cross_entropy(forward(w, x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {name: (A.detach(), B.detach(), scale) for name, (A, B) in params.items()}


def accuracy(base, deltas, data):
    w = {name: base[name] + deltas[name] for name in base}
    x, y = data
    return (forward(w, x).argmax(-1) == y).float().mean().item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150, help="training steps per task adapter")
    ap.add_argument("--density", type=float, default=0.2, help="TIES: fraction of each task vector kept")
    ap.add_argument("--eval", type=int, default=2000, help="evaluation samples per task")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0, 1.25])
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    base, tasks = make_tasks(g, device)
    adapters = [train_adapter(base, sample, args.steps, g, device) for sample in tasks]
    evals = [sample(args.eval) for sample in tasks]
    zero = {name: torch.zeros_like(W) for name, W in base.items()}

    def row(label, per_task):
        print(f"{label:<24}" + "".join(f"{a:>8.3f}" for a in per_task) + f"{sum(per_task) / len(per_task):>8.3f}")

    print(f"{'':<24}" + "".join(f"{'task' + str(t):>8}" for t in range(TASKS)) + f"{'mean':>8}")
    row("base model", [accuracy(base, zero, d) for d in evals])
    own = [{name: s * B @ A for name, (A, B, s) in ad.items()} for ad in adapters]
    row("own adapter", [accuracy(base, own[t], evals[t]) for t in range(TASKS)])
    for lam in args.lambdas:
        fused = task_arithmetic(adapters, lam)  # {layer: dense delta}
        row(f"task arithmetic l={lam:g}", [accuracy(base, fused, d) for d in evals])
    for lam in args.lambdas:
        fused = ties(adapters, args.density, lam, chunk_rows=16)
        row(f"TIES d={args.density:g} l={lam:g}", [accuracy(base, fused, d) for d in evals])

    # Serve the task-arithmetic fusion of fc1 as one low-rank adapter (the exact stack, rank 4 x 4) with the
    # batched LoRA op, next to one of the original adapters, and check it against the dense fused delta.
    lam = args.lambdas[len(args.lambdas) // 2]
    exact = task_arithmetic(adapters, lam, rank="exact")["fc1"]
    dense = task_arithmetic(adapters, lam)["fc1"]
    w = lk.LoRAWeights(IN, HID, max_adapters=2, max_rank=exact.rank, dtype=torch.float32, device=device)
    fid = w.add(exact.A, exact.B, scale=exact.scale)
    A0, B0, s0 = adapters[0]["fc1"]
    oid = w.add(A0, B0, scale=s0)
    x = evals[0][0][:32]
    ids = torch.tensor([fid, oid] * 16, dtype=torch.int32, device=device)
    batch = lk.LoRABatch(max_tokens=32, max_adapters=2, device=device)
    batch.build(ids, ranks=w.ranks)
    y = torch.zeros(32, HID, device=device)
    with torch.no_grad():
        lk.add_lora_(y, x, w, batch)
    want = torch.where((ids == fid).view(-1, 1), x @ dense.t(), s0 * (x @ A0.t()) @ B0.t())
    err = ((y - want).abs().max() / want.abs().max()).item()
    ok = err <= 1e-4
    print(f"{'OK' if ok else 'FAILED'}: fused rank-{exact.rank} adapter served by add_lora_ matches the dense fused "
          f"delta (relative error {err:.1e}) on {device}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
