"""Programs of the persistent add_lora_ kernel that get no work, per role, on the GPU-free proxy's cases.

The proxy (../shared/anchors/proxy) calls a program idle when it stored nothing and issued no ``tl.dot``; every
program of the persistent kernel updates the plan's counters (atomics count as stores there), so its ``idle``
column is 0 by construction and says nothing. This script replays the kernel's work assignment in Python from
the batch's plan (``lora_kernels.plan``) and the launch parameters (``triton.sgmv.persistent_plan_of``), exactly
as the kernel derives them on the device, and counts per role the programs none of whose items moves data:

* shrink: no item whose tile's adapter has rank > 0 in the item's slice (mixed mode: or the merged adapter);
* reduce: no item whose row group holds a token (and a rank > 0);
* expand: no item whose tile has a rank > 0 in the column block's slice.

Usage (CPU; builds the proxy's inputs with its own harness, runs no kernel)::

    python bench/persistent_idle.py [--cases dec-T1-n1-r16,...] [--anchors ../shared/anchors]
"""

from __future__ import annotations

import argparse
import os
import sys


def _tiles(batch, bm: int, mixed: bool):
    pl = batch.plan_layout
    off, n = pl.family(bm), pl.n_max(bm)
    p = batch.plan.tolist()
    n_t = p[off + 1] if mixed else p[off]
    return [(p[off + 2 + i], p[off + 2 + n + i], p[off + 2 + 2 * n + i]) for i in range(n_t)]


def idle_programs(w, batch, x, y, merged: int = -1) -> dict:
    """``{"grid": P, "shrink": (programs, idle), "reduce": (...), "expand": (...)}`` for one add_lora_ call."""
    from lora_kernels import tuning
    from lora_kernels.triton import sgmv

    T, K = x.shape
    cfg = tuning.get_config("add_lora", x.dtype, T, K, w.b.shape[1], w.max_rank, x.device)
    assert cfg["strategy"] == "persistent", cfg["strategy"]
    c = cfg["persistent"]
    mixed = merged >= 0
    lay = batch.layout
    p = sgmv.persistent_plan_of(x, y, w.a, tuple(w.slice_outs), w.max_rank, c, batch.max_tokens, lay.max_active,
                                mixed)
    bm, bn, S, n_k = c["BLOCK_M"], c["BLOCK_N"], w.num_slices, p["N_K"]
    tiles = _tiles(batch, bm, mixed)
    ranks = w.ranks.tolist()

    def rank(s, a):
        own = ranks[s][a] if a >= 0 and a != merged else 0
        return own + (ranks[s][merged] if mixed and a != merged else 0)

    n_t = len(tiles)
    n_s = n_t * S * n_k
    ps = min(n_s, p["P_S"])
    rg = sgmv.REDUCE_GROUPS
    rrows = bm // rg
    n_r = n_t * S * rg if n_k > 1 else 0
    pr = min(n_r, p["P_R"])
    pe = p["P"] - ps - pr
    col_slice = [s for s, o in enumerate(w.slice_outs) for _ in range(-(-o // bn))]
    n_e = n_t * len(col_slice)

    def busy_shrink(q):
        return any(rank((w_ // n_k) % S, tiles[w_ // (S * n_k)][2]) > 0 for w_ in range(q, n_s, ps))

    def busy_reduce(q):
        out = False
        for w_ in range(q, n_r, pr):
            g, rem = divmod(w_, n_t * S)
            t, s = divmod(rem, S)
            out = out or (g * rrows < tiles[t][1] and rank(s, tiles[t][2]) > 0)
        return out

    def busy_expand(q):
        return any(rank(col_slice[w_ % len(col_slice)], tiles[w_ // len(col_slice)][2]) > 0
                   for w_ in range(q, n_e, pe))

    return {"grid": p["P"], "N_K": n_k,
            "shrink": (ps, sum(not busy_shrink(q) for q in range(ps))),
            "reduce": (pr, sum(not busy_reduce(q) for q in range(pr))),
            "expand": (pe, sum(not busy_expand(q) for q in range(pe)))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="all")
    ap.add_argument("--anchors", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "anchors"))
    args = ap.parse_args(argv)
    sys.path[:0] = [os.path.abspath(args.anchors), os.path.join(os.path.abspath(args.anchors), "proxy")]
    from proxy.cases import ProxyData, find
    from proxy.impls import ProjectImpl

    print("| case | grid | N_K | shrink programs / idle | reduce programs / idle | expand programs / idle |")
    print("|---|---|---|---|---|---|")
    for pc in find(args.cases.split(",") if args.cases != "all" else None):
        data = ProxyData(pc, "cpu")
        impl = ProjectImpl(data)
        r = idle_programs(impl.w, impl.batch, impl.x, impl.y)
        print(f"| {pc.id} | {r['grid']} | {r['N_K']} | {r['shrink'][0]} / {r['shrink'][1]} | "
              f"{r['reduce'][0]} / {r['reduce'][1]} | {r['expand'][0]} / {r['expand'][1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
