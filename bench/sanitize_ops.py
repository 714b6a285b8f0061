"""Run every CUDA and Triton kernel of lora_kernels once on small problems, for compute-sanitizer.

    compute-sanitizer --tool memcheck  --error-exitcode 1 python3 bench/sanitize_ops.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 bench/sanitize_ops.py

(``bench/gpu_check.sh`` does both, with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so that every tensor is its own
allocation and an out-of-bounds access cannot land silently in a neighbour inside the caching allocator's
block.) Run it once without the sanitizer first: Triton compiles into its cache, so the sanitized run only
loads kernels.

What runs (each on mixed ranks, tokens with -1, odd sizes):
    * the LoRABatch builder: the compiled CUDA builder when the extension loads, and the torch builder; ids
      with -1, out-of-range ids (``validate=False``), all -1, T = 1, a batch smaller than its capacity;
    * ``lk.add_lora_``, ``lk.shrink``, ``lk.expand_`` on the Triton backend (default configs), one slice and
      three fused slices, bf16 and fp16;
    * the raw Triton launcher with ``strategy="fused"`` and ``"two_pass"`` (split-K on and off), and both again
      with ``_FLAT_SEGMENT_LIMIT`` lowered so that the kernels take their 2-D (tile, segment) grid.

Every output is compared with the fp32 reference computed on the CPU (so that the sanitizer sees only this
library's kernels and a few copies); exit status 1 if any check fails, 0 otherwise. Without a GPU it prints
why and exits 0 (nothing to sanitize).
"""

from __future__ import annotations

import sys
import traceback

import torch

DEV = "cuda"  # "cpu" with --cpu: the same checks through the Triton interpreter (TRITON_INTERPRET=1)


def _weights(lk, in_f, outs, ranks, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    S = len(outs)
    w = lk.LoRAWeights(in_f, list(outs) if S > 1 else outs[0], max_adapters=len(ranks) + 1, max_rank=max(ranks),
                       dtype=dtype, device=DEV)
    for r in ranks:
        A = [torch.randn(r, in_f, generator=g) / in_f**0.5 for _ in range(S)]
        B = [torch.randn(o, r, generator=g) / r**0.5 for o in outs]
        w.add([a.to(dtype) for a in A] if S > 1 else A[0].to(dtype),
              [b.to(dtype) for b in B] if S > 1 else B[0].to(dtype), alpha=2.0 * r)
    return w


def _ids(T, n, frac_none, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, n, (T,), generator=g, dtype=torch.int32)
    ids[torch.rand(T, generator=g) < frac_none] = -1
    return ids


def _cpu_weights(w):
    """A CPU fp32 copy of the weights' storage (reference inputs)."""
    return w.a.float().cpu(), w.b.float().cpu(), w.offsets.cpu(), w.ranks.cpu(), w.scales.cpu()


def _ref_add(w, x, y, ids):
    from lora_kernels import reference

    a, b, off, rk, sc = _cpu_weights(w)
    out = y.float().cpu().clone()
    return reference.add_lora_(out, x.float().cpu(), a, b, off, rk, sc, ids.cpu(), w.slice_cols, w.slice_outs)


def _ref_shrink(w, x, ids):
    from lora_kernels import reference

    a, _, off, rk, _ = _cpu_weights(w)
    return reference.shrink(x.float().cpu(), a, off, rk, ids.cpu(), w.max_rank)


def _close(name, got, want, dtype, results):
    got = got.float().cpu()
    tol = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}[dtype] * max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max()) if want.numel() else 0.0
    ok = bool(torch.isfinite(got).all()) and err <= tol
    results.append((name, ok, f"max abs err {err:.3g} (tol {tol:.3g})"))


def run_builder(lk, results):
    from lora_kernels import _ext

    builders = ["reference"] + (["cuda"] if DEV == "cuda" and _ext.get() is not None else [])
    if "cuda" not in builders and DEV == "cuda":
        results.append(("LoRABatch build [cuda]", True, f"skipped: extension unavailable ({_ext.status()})"))
    cases = {
        "mixed": torch.tensor([3, -1, 0, 3, 1, 7, -1, 0, 2, 3, 5], dtype=torch.int32),
        "out_of_range": torch.tensor([0, 9, -5, 2, 2, 11, -1], dtype=torch.int32),
        "all_none": torch.full((13,), -1, dtype=torch.int32),
        "one": torch.tensor([4], dtype=torch.int32),
        "many": _ids(300, 8, 0.1, 5),
    }
    ranks = torch.tensor([[4, 8, 16, 0, 32, 8, 8, 64]], dtype=torch.int32)
    for b in builders:
        for name, ids in cases.items():
            try:
                with lk.backends.use_backend(b):
                    batch = lk.LoRABatch(max(ids.numel(), 1) + 3, 8, DEV).build(
                        ids.to(DEV), ranks=ranks.to(DEV), validate=False)
                with lk.backends.use_backend("reference"):
                    ref = lk.LoRABatch(max(ids.numel(), 1) + 3, 8, "cpu").build(ids, ranks=ranks, validate=False)
                ok = batch.to_dict() == ref.to_dict()
                why = "" if ok else f"{batch.to_dict()} != {ref.to_dict()}"
                results.append((f"LoRABatch build [{b}] {name}", ok, why))
            except Exception as e:
                results.append((f"LoRABatch build [{b}] {name}", False, f"{type(e).__name__}: {e}"))


def run_ops(lk, results):
    from lora_kernels.triton import sgmv as tsgmv

    problems = [
        ("1slice", 96, (80,), (4, 8, 16, 1, 33), 37, torch.bfloat16),
        ("3slices", 64, (48, 16, 16), (8, 16, 4), 21, torch.float16),
        ("decode", 128, (96,), (16, 8), 1, torch.bfloat16),
    ]
    for name, in_f, outs, ranks, T, dtype in problems:
        w = _weights(lk, in_f, outs, ranks, dtype, seed=T)
        ids = _ids(T, len(ranks) + 1, 0.25 if T > 1 else 0.0, seed=T + 1)  # id len(ranks) names a free slot
        x = torch.randn(T, in_f, generator=torch.Generator().manual_seed(T + 2)).to(DEV, dtype)
        y = torch.randn(T, w.out_features, generator=torch.Generator().manual_seed(T + 3)).to(DEV, dtype)
        batch = lk.LoRABatch(T + 2, w.max_adapters, DEV).build(ids.to(DEV), ranks=w.ranks)
        y1 = None
        want = _ref_add(w, x, y, ids)
        with torch.no_grad(), lk.backends.use_backend("triton"):
            try:
                y1 = y.clone()
                lk.add_lora_(y1, x, w, batch)
                _close(f"add_lora_ [{name}]", y1, want, dtype, results)
                h = lk.shrink(x, w, batch)
                _close(f"shrink [{name}]", h, _ref_shrink(w, x, ids), dtype, results)
                y2 = y.clone()
                lk.expand_(y2, h, w, batch)
                _close(f"expand_ [{name}]", y2, want, dtype, results)
            except Exception as e:
                results.append((f"ops [{name}]", False, f"{type(e).__name__}: {e}"))
        configs = {
            "fused": {"strategy": "fused", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "N_SPLIT": 2},
            "two_pass": {"strategy": "two_pass", "shrink": {"SPLIT_K": 1, "BLOCK_K": 32}},
            "two_pass_splitk": {"strategy": "two_pass", "shrink": {"SPLIT_K": 2, "BLOCK_K": 32}},
        }
        for cname, cfg in configs.items():
            try:
                y3 = y.clone()
                tsgmv.add_lora_(y3, x, w.a, w.b, w.offsets, w.ranks, w.scales, batch.meta, batch.max_tokens,
                                w.slice_info, w.max_rank, config=cfg)
                _close(f"triton add_lora_ {cname} [{name}]", y3, want, dtype, results)
            except Exception as e:
                results.append((f"triton add_lora_ {cname} [{name}]", False, f"{type(e).__name__}: {e}"))
        none = (ids < 0).to(DEV)
        if bool(none.any()) and y1 is not None:
            ok = torch.equal(y1[none], y[none])
            results.append((f"-1 tokens untouched [{name}]", ok, ""))
    # The 2-D (tile, segment) grid, used above _FLAT_SEGMENT_LIMIT segments: lower the limit for one problem.
    lim = getattr(tsgmv, "_FLAT_SEGMENT_LIMIT", None)
    if lim is None:
        results.append(("2-D grid path", True, "skipped: no _FLAT_SEGMENT_LIMIT in lora_kernels.triton.sgmv"))
        return
    w = _weights(lk, 64, (40,), (4, 8, 16, 8, 2, 32), torch.bfloat16, seed=9)
    ids = _ids(45, 7, 0.2, seed=10)
    x = torch.randn(45, 64).to(DEV, torch.bfloat16)
    y = torch.randn(45, 40).to(DEV, torch.bfloat16)
    batch = lk.LoRABatch(45, w.max_adapters, DEV).build(ids.to(DEV), ranks=w.ranks)
    want = _ref_add(w, x, y, ids)
    tsgmv._FLAT_SEGMENT_LIMIT = 2
    try:
        for cname, cfg in {"fused": {"strategy": "fused", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "N_SPLIT": 2},
                           "two_pass": {"strategy": "two_pass"}}.items():
            try:
                y1 = y.clone()
                tsgmv.add_lora_(y1, x, w.a, w.b, w.offsets, w.ranks, w.scales, batch.meta, batch.max_tokens,
                                w.slice_info, w.max_rank, config=cfg)
                _close(f"triton add_lora_ {cname} [2-D grid]", y1, want, torch.bfloat16, results)
            except Exception as e:
                results.append((f"triton add_lora_ {cname} [2-D grid]", False, f"{type(e).__name__}: {e}"))
    finally:
        tsgmv._FLAT_SEGMENT_LIMIT = lim


def main(argv=None) -> int:
    global DEV
    argv = sys.argv[1:] if argv is None else argv
    if "--cpu" in argv:
        import os

        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            print("sanitize_ops --cpu: set TRITON_INTERPRET=1 (the Triton kernels run in the interpreter)")
            return 2
        DEV = "cpu"
    elif not torch.cuda.is_available():
        print("sanitize_ops: no CUDA GPU here; nothing to sanitize (--cpu runs the checks in the Triton interpreter)")
        return 0
    import lora_kernels as lk

    results = []
    for step in (run_builder, run_ops):
        try:
            step(lk, results)
        except Exception as e:
            results.append((step.__name__, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    if DEV == "cuda":
        torch.cuda.synchronize()
    bad = 0
    for name, ok, msg in results:
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}  {msg}")
    print(f"sanitize_ops: {len(results) - bad}/{len(results)} checks passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
