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
    * the segmented backward (``lk.lora_delta`` under autograd, and the outer-product kernel with token
      splits), bf16 and fp16, one and three slices;
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


def run_merge(lk, results):
    """merge_ / unmerge_ / merge_many_ / unmerge_many_ (exact and approximate) on the Triton backend and, when the
    extension has it, the compiled CUDA kernel: fused slices, odd widths (in % 4 != 0: codes packed by the
    wrapper), mixed ranks, escapes (large deltas), several layers in one grouped launch; bit-exact restore and
    merged weights vs the CPU reference."""
    from lora_kernels import reference
    from lora_kernels.ops import merge as M

    backends_ = ["triton"] + (["cuda"] if DEV == "cuda" and M._cuda_ops() is not None else [])
    if DEV == "cuda" and "cuda" not in backends_:
        results.append(("merge [cuda]", True, "skipped: the extension has no merge kernel"))
    layers = [(96, (80,), (4, 8, 16), torch.bfloat16), (64, (48, 16, 16), (8, 16, 4), torch.float16),
              (37, (29,), (2, 33), torch.bfloat16), (128, (96,), (16,), torch.float32),
              (1030, (24,), (4, 8), torch.float16)]  # in > 1024: a partial second column tile of the CUDA kernel
    for be in backends_:
        ws, W0s = [], []
        for k, (in_f, outs, ranks, dtype) in enumerate(layers):
            w = _weights(lk, in_f, outs, ranks, dtype, seed=50 + k)
            W0 = (torch.randn(w.out_features, in_f, generator=torch.Generator().manual_seed(60 + k)) * 0.02)
            W0.view(-1)[::17] = 1e-6  # tiny weights: large relative deltas, so escapes happen
            ws.append(w)
            W0s.append(W0.to(DEV, dtype))
        for exact in (True, False):
            try:
                with torch.no_grad(), lk.backends.use_backend(be):
                    Ws = [W.clone() for W in W0s]
                    recs = [M.merge_(W, w, [0, len(w.loaded) - 1], [1.0, -0.5], exact=exact) for W, w in zip(Ws, ws)]
                    for k, (W, W0, w, r) in enumerate(zip(Ws, W0s, ws, recs)):
                        want = W0.float().cpu() + reference.merge_delta(W.shape, w.a.float().cpu(), w.b.float().cpu(),
                                                                        r._terms, r._coefs)
                        _close(f"merge_ [{be}, exact={exact}] layer {k}", W, want, W.dtype, results)
                    M.unmerge_many_(Ws, recs)
                    if exact:
                        ok = all(torch.equal(W.view(torch.int16 if W.element_size() == 2 else torch.int32),
                                             W0.view(torch.int16 if W.element_size() == 2 else torch.int32))
                                 for W, W0 in zip(Ws, W0s))
                        esc = sum(r.escapes for r in recs)
                        results.append((f"merge_/unmerge_many_ bit-exact [{be}]", ok, f"{esc} escapes"))
                    Ws = [W.clone() for W in W0s]
                    recs = M.merge_many_(Ws, ws, [0], [0.75], exact=exact)
                    M.unmerge_many_(Ws, recs)
                    if exact:
                        ok = all(torch.equal(W, W0) for W, W0 in zip(Ws, W0s))
                        results.append((f"merge_many_/unmerge_many_ bit-exact [{be}]", ok, ""))
            except Exception as e:
                results.append((f"merge [{be}, exact={exact}]", False, f"{type(e).__name__}: {e}"))


def run_backward(lk, results):
    """The segmented backward (lk.lora_delta's autograd on the Triton backend; the outer-product kernel with and
    without token splits) vs the fp32 reference backward on the CPU: grad x, grad a, grad b."""
    from lora_kernels import reference
    from lora_kernels.triton import sgmv_backward

    for dtype in (torch.bfloat16, torch.float16):
        for outs in ((96,), (64, 32, 48)):
            w = _weights(lk, 80, outs, [8, 1, 33, 16], dtype, seed=11)
            T = 37
            ids = _ids(T, 4, 0.2, seed=12)
            batch = lk.LoRABatch.from_ids(ids.to(DEV), w.max_adapters, ranks=w.ranks)
            g = torch.Generator().manual_seed(13)
            x = torch.randn(T, 80, generator=g).to(DEV, dtype)
            dy = torch.randn(T, sum(outs), generator=g).to(DEV, dtype)
            a, b, off, rk, sc = _cpu_weights(w)
            want = reference.lora_add_backward(dy.float().cpu(), x.float().cpu(), a, b, off, rk, sc, ids,
                                               w.slice_cols, w.slice_outs)
            tag = f"backward {str(dtype)[6:]} slices={len(outs)}"
            w.requires_grad_()
            xg = x.clone().requires_grad_()
            with lk.backends.use_backend("triton"):
                lk.lora_delta(xg, w, batch).backward(dy)
            for n, got, ref in zip(("dx", "da", "db"), (xg.grad, w.a.grad, w.b.grad), want):
                _close(f"{tag} {n}", got, ref, dtype, results)
            w.requires_grad_(False)
            got = sgmv_backward.lora_backward(dy, x, w.a, w.b, w.offsets, w.ranks, w.scales, batch.meta,
                                              batch.max_tokens, w.slice_info, w.slice_cols, w.slice_outs, w.max_rank,
                                              config={"SPLIT_M": 3, "BLOCK_M": 16})
            for n, gt, ref in zip(("dx", "da", "db"), got, want):
                _close(f"{tag} split {n}", gt, ref, dtype, results)


def run_dual(lk, results):
    """Dual-LoRA on the Triton backend (fused [A; T] shrink + LayerNorm/gate epilogue, SGMV expand; backward with
    the segmented weight-gradient kernel) vs autograd of the fp32 reference on the CPU: delta and every grad."""
    from lora_kernels import reference

    for dtype in (torch.bfloat16, torch.float16):
        g = torch.Generator().manual_seed(21)
        in_f, out_f, ranks = 80, 72, (8, 1, 32, 16)
        w = lk.DualLoRAWeights(in_f, out_f, len(ranks), 32, dtype=dtype, device=DEV)
        for r in ranks:
            w.add(torch.randn(r, in_f, generator=g) / 9, torch.randn(r, in_f, generator=g) / 9,
                  torch.randn(out_f, r, generator=g) / 4, ln_bias=0.1 * torch.randn(r, generator=g))
        T = 37
        ids = _ids(T, len(ranks), 0.2, seed=22)
        batch = lk.LoRABatch.from_ids(ids.to(DEV), w.max_adapters, ranks=w.ranks)
        x = torch.randn(T, in_f, generator=g).to(DEV, dtype)
        dy = torch.randn(T, out_f, generator=g).to(DEV, dtype)
        leaves = [t.detach().float().cpu().requires_grad_() for t in (x, w.a, w.b, w.ln_weight, w.ln_bias)]
        d = reference.dual_lora_delta(*leaves, w.offsets.cpu(), w.ranks.cpu(), w.scales.cpu(), ids)
        d.backward(dy.float().cpu())
        params = [w.a, w.b, w.ln_weight, w.ln_bias]
        for p_ in params:
            p_.requires_grad_(True)
        xg = x.clone().requires_grad_()
        tag = f"dual_lora {str(dtype)[6:]}"
        with lk.backends.use_backend("triton"):
            out = lk.dual_lora(xg, w, batch)
            out.backward(dy)
        _close(f"{tag} delta", out, d.detach(), dtype, results)
        for n, got, lf in zip(("dx", "da", "db", "dln_w", "dln_b"), [xg.grad] + [p_.grad for p_ in params], leaves):
            _close(f"{tag} {n}", got, lf.grad, dtype, results)
        for p_ in params:
            p_.requires_grad_(False)


def run_deform(lk, results):
    """deform_pool forward + backward (every gradient) on the Triton backend and, when the extension has it, the
    compiled CUDA kernels (D = 32/64/128 fast paths, the generic path at odd D, a 1x1 level, NaN locations), each
    with atomic and deterministic (sort + gather) grad value, and the fp32 Deformable-DETR-style baseline kernels,
    each vs the fp64 reference on the CPU."""
    from lora_kernels import reference
    from lora_kernels.ops import deform

    bes = ["triton"] + (["cuda"] if DEV == "cuda" and deform._cuda_ops() is not None else [])
    if DEV == "cuda" and "cuda" not in bes:
        results.append(("deform_pool [cuda]", True, "skipped: the extension has no deform_pool kernel"))
    cases = ((2, 11, 2, 64, ((5, 7), (3, 3), (1, 1)), 4), (1, 5, 3, 32, ((4, 4),), 2), (1, 3, 2, 128, ((2, 3),), 1),
             (1, 6, 2, 5, ((3, 4), (1, 1)), 3))
    runs = [(be, det) for be in bes for det in (False, True)] + ([("baseline", False)] if "cuda" in bes else [])
    for be, det in runs:
        for B, Q, H, D, shapes, P in cases:
            for dtype in ((torch.float32,) if be == "baseline" else (torch.bfloat16, torch.float16, torch.float32)):
                tag = f"deform_pool [{be}{', deterministic' if det else ''}] {str(dtype)[6:]} D={D}"
                try:
                    g = torch.Generator().manual_seed(D + Q)
                    S = sum(h * w for h, w in shapes)
                    value = torch.randn(B, S, H, D, generator=g).to(dtype)
                    loc = (torch.rand(B, Q, H, len(shapes), P, 2, generator=g) * 1.4 - 0.2).to(dtype)
                    loc.view(-1, 2)[::9] = torch.tensor([float("nan"), 0.5]).to(dtype)
                    attn = torch.rand(B, Q, H, len(shapes), P, generator=g).to(dtype)
                    dy = torch.randn(B, Q, H * D, generator=g).to(dtype)
                    ss = torch.tensor(shapes, dtype=torch.int64)
                    ref_in = [t.double().requires_grad_(True) for t in (value, loc, attn)]
                    ref = reference.deform_pool(ref_in[0], ss, None, ref_in[1], ref_in[2])
                    ref.backward(dy.double())
                    size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64)
                    pix = loc.double() * size[None, None, None, :, None, :] - 0.5
                    smooth = ((pix - pix.round()).abs() > 1e-2) & torch.isfinite(pix)  # one-sided on grid lines
                    if be == "baseline":
                        from lora_kernels.bench import vce

                        dev_in = [t.to(DEV) for t in (value, ss, loc, attn)]
                        sizes = dev_in[1][:, 0] * dev_in[1][:, 1]
                        st = torch.cumsum(sizes, 0) - sizes
                        out = vce.baseline_fwd(dev_in[0], dev_in[1], st, dev_in[2], dev_in[3])
                        grads = vce.baseline_bwd(dy.to(DEV), dev_in[0], dev_in[1], st, dev_in[2], dev_in[3])
                    else:
                        ins = [t.to(DEV).requires_grad_(True) for t in (value, loc, attn)]
                        with lk.backends.use_backend(be):
                            out = lk.deform_pool(ins[0], ss.to(DEV), None, ins[1], ins[2], deterministic=det)
                        out.backward(dy.to(DEV))
                        grads = [t.grad for t in ins]
                    _close(f"{tag} out", out.detach(), ref.detach().float(), dtype, results)
                    _close(f"{tag} grad value", grads[0], ref_in[0].grad.float(), dtype, results)
                    _close(f"{tag} grad loc", grads[1].float().cpu()[smooth], ref_in[1].grad.float()[smooth], dtype,
                           results)
                    _close(f"{tag} grad weights", grads[2], ref_in[2].grad.float(), dtype, results)
                except Exception as e:
                    results.append((tag, False, f"{type(e).__name__}: {e}"))
    # deform_sample (softmax and location arithmetic fused; Triton and the compiled fused kernels): bf16 value,
    # fp32 offsets / logits
    sample_bes = ["triton"] + (["cuda"] if DEV == "cuda" and deform._cuda_ops(fused=True) is not None else [])
    if DEV == "cuda" and "cuda" not in sample_bes:
        results.append(("deform_sample [cuda]", True, "skipped: the extension has no deform_sample kernel"))
    for be, det in [(be, det) for be in sample_bes for det in (False, True)]:
        tag = f"deform_sample [{be}{', deterministic' if det else ''}]"
        try:
            g = torch.Generator().manual_seed(70)
            shapes = ((5, 7), (3, 3), (1, 1))
            S = sum(h * w for h, w in shapes)
            value = torch.randn(2, S, 2, 64, generator=g).to(torch.bfloat16)
            ref_pts = torch.rand(11, 2, generator=g)
            off = torch.randn(2, 11, 2, 3, 4, 2, generator=g)
            logits = torch.randn(2, 11, 2, 12, generator=g)
            dy = torch.randn(2, 11, 128, generator=g).to(torch.bfloat16)
            ss = torch.tensor(shapes, dtype=torch.int64)
            ref_in = [t.double().requires_grad_(True) for t in (value, off, logits)]
            want = reference.deform_sample(ref_in[0], ss, None, ref_pts.double(), ref_in[1], ref_in[2])
            want.backward(dy.double())
            ins = [t.to(DEV).requires_grad_(True) for t in (value, off, logits)]
            with lk.backends.use_backend(be):
                out = lk.deform_sample(ins[0], ss.to(DEV), None, ref_pts.to(DEV), ins[1], ins[2], deterministic=det)
            out.backward(dy.to(DEV))
            _close(f"{tag} out", out.detach(), want.detach().float(), torch.bfloat16, results)
            _close(f"{tag} grad value", ins[0].grad, ref_in[0].grad.float(), torch.bfloat16, results)
            _close(f"{tag} grad logits", ins[2].grad, ref_in[2].grad.float(), torch.bfloat16, results)
        except Exception as e:
            results.append((tag, False, f"{type(e).__name__}: {e}"))


def run_deform_bad_metadata(lk, results):
    """deform_pool / deform_sample with validate=False and level metadata pointing outside value (a negative start,
    a level running past S, a level far past S): every kernel must mask those corners (the sanitizer reports any
    out-of-range read or atomic) and match the reference's defined result (they contribute nothing)."""
    from lora_kernels import reference
    from lora_kernels.ops import deform

    bes = ["triton"] + (["cuda"] if DEV == "cuda" and deform._cuda_ops(fused=True) is not None else [])
    metas = ((16, ((5, 4), (2, 2)), (-3, 14)), (16, ((3, 4), (2, 2), (1, 1)), (0, 100, -1)))
    runs = [(be, det) for be in bes for det in (False, True)] + ([("baseline", False)] if "cuda" in bes else [])
    for be, det in runs:
        for S, shapes, starts in metas:
            for D in (32, 5):
                tag = f"deform bad metadata [{be}{', deterministic' if det else ''}] D={D} starts={starts}"
                try:
                    g = torch.Generator().manual_seed(80 + D)
                    B, Q, H, L, P = 2, 7, 2, len(shapes), 3
                    value = torch.randn(B, S, H, D, generator=g)
                    loc = torch.rand(B, Q, H, L, P, 2, generator=g) * 1.2 - 0.1
                    attn = torch.rand(B, Q, H, L, P, generator=g)
                    dy = torch.randn(B, Q, H * D, generator=g)
                    ss, st = torch.tensor(shapes, dtype=torch.int64), torch.tensor(starts, dtype=torch.int64)
                    ref_in = [t.double().requires_grad_(True) for t in (value, loc, attn)]
                    ref = reference.deform_pool(ref_in[0], ss, st, ref_in[1], ref_in[2])
                    ref.backward(dy.double())
                    if be == "baseline":
                        from lora_kernels.bench import vce

                        dev_in = [t.to(DEV) for t in (value, ss, st, loc, attn)]
                        out = vce.baseline_fwd(*dev_in)
                        grads = vce.baseline_bwd(dy.to(DEV), *dev_in)
                    else:
                        ins = [t.to(DEV).requires_grad_(True) for t in (value, loc, attn)]
                        with lk.backends.use_backend(be):
                            out = lk.deform_pool(ins[0], ss.to(DEV), st.to(DEV), ins[1], ins[2], validate=False,
                                                 deterministic=det)
                        out.backward(dy.to(DEV))
                        grads = [t.grad for t in ins]
                    _close(f"{tag} out", out.detach(), ref.detach().float(), torch.float32, results)
                    _close(f"{tag} grad value", grads[0], ref_in[0].grad.float(), torch.float32, results)
                    _close(f"{tag} grad weights", grads[2], ref_in[2].grad.float(), torch.float32, results)
                    if be != "baseline":  # the fused kernels on the same metadata
                        ref_pts = torch.rand(Q, 2, generator=g)
                        off = torch.randn(B, Q, H, L, P, 2, generator=g)
                        logits = torch.randn(B, Q, H, L * P, generator=g)
                        want = reference.deform_sample(value.double(), ss, st, ref_pts.double(), off.double(),
                                                       logits.double())
                        with lk.backends.use_backend(be):
                            got = lk.deform_sample(value.to(DEV), ss.to(DEV), st.to(DEV), ref_pts.to(DEV),
                                                   off.to(DEV), logits.to(DEV), validate=False, deterministic=det)
                        _close(f"{tag} deform_sample out", got, want.float(), torch.float32, results)
                except Exception as e:
                    results.append((tag, False, f"{type(e).__name__}: {e}"))


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
    for step in (run_builder, run_ops, run_merge, run_backward, run_dual, run_deform, run_deform_bad_metadata):
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
