"""Benchmark cases: shapes, adapter popularity, and the deterministic problem builder.

Semantics:
    A :class:`Case` is one batched-LoRA-delta problem: ``tokens`` tokens of width ``hidden_in``, a layer with
    ``adapters`` loaded adapter slots whose ranks cycle through ``ranks`` (adapter ``i`` has rank
    ``ranks[i % len(ranks)]``), of which the first ``active`` (default: all) are drawn by the tokens with the
    popularity ``dist``; a fraction ``frac_none`` of the tokens has no adapter (id -1). ``order`` says how the
    tokens are laid out: ``shuffled`` (decode-style, a random permutation) or ``contiguous`` (prefill-style,
    each adapter's tokens form one segment; segments in random order).

    Distributions over ``n = active`` adapters (Punica's names):
        identical   every token uses adapter 0;
        distinct    token t uses adapter ``t % n`` (every token its own adapter when T <= n);
        uniform     balanced: each adapter gets floor(T/n) or ceil(T/n) tokens;
        zipf        adapter k drawn with probability proportional to 1 / (k + 1) ** 1.2;
        skewed      half the tokens use adapter 0, the rest are drawn uniformly from the others.

The named cases reproduce BENCHMARKS.md's table (hidden 4096 -> 4096 unless noted). Where the table leaves a
parameter open the choice is recorded in the case's ``note``: "T=256, r=64" uses 64 adapters like its
neighbours, "mixed ranks 8..128" cycles the ranks 8, 16, 32, 64, 128 over 64 adapters (mean rank 48.4, whose
roofline, 20 us at T=256 and 52 us at T=4096, is what the table lists), and both decode rows use one adapter
of rank 16.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "DISTRIBUTIONS", "ORDERS", "Case", "Problem", "NAMED_CASES", "SMOKE_CASES", "select_cases", "make_ids",
    "make_problem", "ranks_of",
]

DISTRIBUTIONS = ("uniform", "zipf", "distinct", "identical", "skewed")
ORDERS = ("shuffled", "contiguous")


@dataclass(frozen=True)
class Case:
    """One benchmark problem (see the module docstring). ``doc_*`` are BENCHMARKS.md's H100 figures, kept
    for context only: a timing is comparable only with one taken in the same run on the same machine."""

    name: str
    tokens: int
    hidden_in: int
    hidden_out: int
    adapters: int
    ranks: Tuple[int, ...]
    dist: str = "uniform"
    frac_none: float = 0.0
    order: str = "shuffled"
    active: Optional[int] = None
    note: str = ""
    doc_peer: str = ""
    doc_peer_us: Optional[float] = None
    doc_roof_us: Optional[float] = None
    extra: bool = False

    @property
    def num_active(self) -> int:
        return self.adapters if self.active is None else min(self.active, self.adapters)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ranks"] = list(self.ranks)
        return d


_H = 4096
NAMED_CASES: Tuple[Case, ...] = (
    Case("decode-t1-r16", 1, _H, _H, 1, (16,), dist="identical", note="decode T=1, 1 adapter r=16",
         doc_peer="vLLM Triton", doc_peer_us=13, doc_roof_us=0.1),
    Case("t256-a64-r16", 256, _H, _H, 64, (16,), note="T=256, 64 adapters r=16",
         doc_peer="SGLang csgmv", doc_peer_us=30, doc_roof_us=8.0),
    Case("t4096-a64-r16", 4096, _H, _H, 64, (16,), note="T=4096, 64 adapters r=16",
         doc_peer="SGLang csgmv", doc_peer_us=74, doc_roof_us=41),
    Case("t256-a64-r64", 256, _H, _H, 64, (64,), note="T=256, r=64 (64 adapters assumed)",
         doc_peer="SGLang triton", doc_peer_us=61, doc_roof_us=25),
    Case("t4096-a64-r64", 4096, _H, _H, 64, (64,), note="T=4096, r=64 (64 adapters assumed)",
         doc_peer="SGLang csgmv", doc_peer_us=179, doc_roof_us=57),
    Case("mixed-t256-a64-r8to128", 256, _H, _H, 64, (8, 16, 32, 64, 128),
         note="mixed ranks 8..128 (8,16,32,64,128 cycled), T=256, 64 adapters",
         doc_peer="SGLang csgmv", doc_peer_us=62, doc_roof_us=20),
    Case("mixed-t4096-a64-r8to128", 4096, _H, _H, 64, (8, 16, 32, 64, 128),
         note="mixed ranks 8..128 (8,16,32,64,128 cycled), T=4096, 64 adapters",
         doc_peer="SGLang csgmv", doc_peer_us=193, doc_roof_us=52),
    Case("t4096-a64-r16-4096x11008", 4096, _H, 11008, 64, (16,), note="4096 -> 11008, T=4096, r=16 (64 adapters)",
         doc_peer="SGLang csgmv", doc_peer_us=150, doc_roof_us=84),
    Case("decode-t1-r16-11008x4096", 1, 11008, _H, 1, (16,), dist="identical",
         note="11008 -> 4096 decode (T=1, 1 adapter r=16 assumed)", doc_peer="vLLM Triton", doc_peer_us=14),
    # Not rows of the table, but the targets name them: grid size vs active adapters, decode batches.
    Case("t256-a4of64-r16", 256, _H, _H, 64, (16,), active=4, extra=True,
         note="64 slots loaded, 4 active (vLLM's grid scales with slots: 2.4-3.9x slower)"),
    Case("decode-t64-a64-r16", 64, _H, _H, 64, (16,), dist="distinct", extra=True,
         note="decode batch of 64 requests, 64 distinct adapters r=16 (target: one launch, <= 15% of base GEMM)"),
)

# Tiny shapes for the CPU smoke sweep (and a quick GPU sanity run with --smoke).
SMOKE_CASES: Tuple[Case, ...] = (
    Case("smoke-t1-r8", 1, 64, 96, 2, (8,), dist="identical", note="CPU smoke: decode T=1"),
    Case("smoke-t16-a4-mixed", 16, 64, 96, 4, (4, 8, 16), frac_none=0.25,
         note="CPU smoke: mixed ranks, 25% no adapter"),
    Case("smoke-t33-a8-zipf", 33, 48, 80, 8, (8, 16), dist="zipf", frac_none=0.1, order="contiguous",
         note="CPU smoke: odd sizes, zipf popularity"),
)


def ranks_of(case: Case) -> List[int]:
    """Rank of every adapter slot of the case."""
    return [case.ranks[i % len(case.ranks)] for i in range(case.adapters)]


def select_cases(patterns: Optional[str], pool: Sequence[Case], include_extra: bool = True) -> List[Case]:
    """Cases of ``pool`` whose name matches one of the comma-separated glob ``patterns`` (all when None).

    Raises ValueError naming the pattern that matched nothing.
    """
    if not patterns:
        return [c for c in pool if include_extra or not c.extra]
    out: List[Case] = []
    for pat in [p.strip() for p in patterns.split(",") if p.strip()]:
        hits = [c for c in pool if fnmatch.fnmatchcase(c.name, pat)]
        if not hits:
            names = ", ".join(c.name for c in pool)
            raise ValueError(f"--cases: expected names or globs matching the cases ({names}), got {pat!r}")
        out.extend(c for c in hits if c not in out)
    return out


def make_ids(T: int, n: int, dist: str, frac_none: float = 0.0, order: str = "shuffled", seed: int = 0) -> torch.Tensor:
    """Per-token adapter ids int32 [T] (CPU) over adapters ``0..n-1`` (see the module docstring)."""
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"dist: expected one of {DISTRIBUTIONS}, got {dist!r}")
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")
    if not 0.0 <= frac_none <= 1.0:
        raise ValueError(f"frac_none: expected a fraction in [0, 1], got {frac_none}")
    if n < 1:
        raise ValueError(f"n: expected at least one adapter, got {n}")
    g = torch.Generator().manual_seed(seed)
    if dist == "identical":
        ids = torch.zeros(T, dtype=torch.int64)
    elif dist in ("distinct", "uniform"):
        ids = torch.arange(T, dtype=torch.int64) % n
    elif dist == "zipf":
        p = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.2
        ids = torch.multinomial(p, T, replacement=True, generator=g) if T else torch.zeros(0, dtype=torch.int64)
    else:  # skewed
        ids = torch.zeros(T, dtype=torch.int64)
        if n > 1:
            rest = torch.randint(1, n, (T,), generator=g)
            take = torch.rand(T, generator=g) >= 0.5
            ids = torch.where(take, rest, ids)
    n_none = int(round(frac_none * T))
    if n_none:
        ids[torch.randperm(T, generator=g)[:n_none]] = -1
    if order == "shuffled":
        ids = ids[torch.randperm(T, generator=g)]
    else:
        keys = torch.unique(ids)
        keys = keys[torch.randperm(keys.numel(), generator=g)]
        ids = torch.cat([ids[ids == k] for k in keys]) if T else ids
    return ids.to(torch.int32)


@dataclass
class Problem:
    """A built case: weights, inputs, ids, and the byte/FLOP counts of its roofline.

    ``y0`` is the base output the delta is added to (``y`` ops work on a copy); ``ids`` live on the device,
    ``ids_cpu`` on the host. ``bytes_min``: x rows read + y rows read and written (tokens with an adapter
    only) + the A and B rows of the active adapters, each at its own rank. ``flops``: ``2 * r * (in + out)``
    per token with an adapter.
    """

    case: Case
    weights: "object"
    x: torch.Tensor
    y0: torch.Tensor
    ids: torch.Tensor
    ids_cpu: torch.Tensor
    active_ids: List[int]
    valid_tokens: int
    bytes_min: int
    flops: int
    info: Dict[str, object] = field(default_factory=dict)


def make_problem(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0, alpha: float = 16.0) -> Problem:
    """Build the weights (adapter i: A ~ N(0, 1/in), B ~ N(0, 1/r), alpha 16), x ~ N(0, 1), y0 ~ N(0, 1) and ids
    of ``case`` on ``device`` in ``dtype``, deterministically from ``seed``."""
    import lora_kernels as lk

    device = torch.device(device)
    ranks = ranks_of(case)
    w = lk.LoRAWeights(case.hidden_in, case.hidden_out, case.adapters, max(ranks), dtype=dtype, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    for r in ranks:
        A = torch.randn(r, case.hidden_in, generator=g, device=device) / math.sqrt(case.hidden_in)
        B = torch.randn(case.hidden_out, r, generator=g, device=device) / math.sqrt(r)
        w.add(A.to(dtype), B.to(dtype), alpha=alpha)
    x = torch.randn(case.tokens, case.hidden_in, generator=g, device=device).to(dtype)
    y0 = torch.randn(case.tokens, case.hidden_out, generator=g, device=device).to(dtype)
    ids_cpu = make_ids(case.tokens, case.num_active, case.dist, case.frac_none, case.order, seed=seed + 1)
    active = sorted(int(i) for i in torch.unique(ids_cpu).tolist() if i >= 0)
    valid = int((ids_cpu >= 0).sum())
    es = torch.empty(0, dtype=dtype).element_size()
    counts = torch.bincount(ids_cpu[ids_cpu >= 0].long(), minlength=case.adapters).tolist()
    in_f, out_f = case.hidden_in, case.hidden_out
    ab = sum(ranks[i] * (in_f + out_f) for i in active)
    bytes_min = es * (valid * in_f + 2 * valid * out_f + ab)
    flops = sum(2 * counts[i] * ranks[i] * (in_f + out_f) for i in active)
    info = {
        "valid_tokens": valid,
        "active_adapters": len(active),
        "active_rank_sum": sum(ranks[i] for i in active),
        "bytes_min": bytes_min,
        "flops": flops,
    }
    return Problem(case, w, x, y0, ids_cpu.to(device), ids_cpu, active, valid, bytes_min, flops, info)


def custom_case(
    name: Optional[str], tokens: int, hidden_in: int, hidden_out: int, adapters: int, ranks: Sequence[int],
    dist: str, frac_none: float, order: str, active: Optional[int] = None,
) -> Case:
    """A case from command-line sizes; the default name spells them out."""
    rk = "r" + "-".join(str(r) for r in ranks) if len(ranks) <= 3 else f"r{min(ranks)}to{max(ranks)}"
    nm = name or f"custom-t{tokens}-a{adapters}-{rk}-{hidden_in}x{hidden_out}-{dist}"
    return Case(nm, tokens, hidden_in, hidden_out, adapters, tuple(ranks), dist=dist, frac_none=frac_none,
                order=order, active=active, note="from the command line")


def override(
    case: Case, dist: Optional[str] = None, frac_none: Optional[float] = None, order: Optional[str] = None,
) -> Case:
    """The case with the given popularity/layout fields replaced (None keeps the case's own)."""
    kw = {k: v for k, v in (("dist", dist), ("frac_none", frac_none), ("order", order)) if v is not None}
    return replace(case, **kw) if kw else case
