"""The mutation check's own soundness (tests/mutants.py, .ci/mutation_check.py).

A mutant that is accidentally the real kernel would "survive" and waste a CI run at best; one that only
perturbs the path the tests do not use would be reported as survived for the wrong reason; one that touched
the spec would let tests pass against a wrong reference. So, on tiny inputs, for every mutant and scope:

* it changes what its op family computes on that scope's path (Triton kernels in the interpreter / the ops'
  reference dispatch) and counts the calls it perturbed;
* it rebinds nothing of the other scope's path (where one entry serves both backends, the other path computes
  exactly what it did) and leaves ``lora_kernels.reference`` (the spec) alone;
* uninstalling it restores every binding.

Plus: unknown names are refused (also by the plugin, as a pytest usage error), the plugin loads through
conftest.py and reports, and the CI matrix names only known mutants and covers every mutant.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import lora_kernels as lk
from lora_kernels import backends, reference
from lora_kernels.ops import merge as M

import mutants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCOPE_BACKEND = {"triton": "triton", "cpu": "reference"}
# The Triton path runs on CUDA tensors on a GPU machine, in the interpreter on CPU tensors otherwise.
TRITON_DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not (torch.cuda.is_available() or backends.interpreting()),
                                  reason="Triton needs TRITON_INTERPRET=1 or a GPU")


def _dev(backend: str) -> str:
    return TRITON_DEV if backend == "triton" else "cpu"


# ---- probes: each family's ops on tiny inputs, on one backend (results on the CPU) ------------------------------
def _lora_weights(dev):
    g = torch.Generator().manual_seed(0)
    w = lk.LoRAWeights(16, [8, 8], max_adapters=4, max_rank=4, dtype=torch.float32, device=dev)
    for i, r in enumerate((2, 4, 3)):  # ids 0..2, mixed ranks; slot 3 free
        A = [torch.randn(r, 16, generator=g) / 4 for _ in range(2)]
        B = [torch.randn(8, r, generator=g) for _ in range(2)]
        w.add(A, B, scale=[0.5 + i, 1.5 - 0.25 * i], adapter_id=i)
    x = torch.randn(9, 16, generator=g).to(dev)
    y0 = torch.randn(9, 16, generator=g).to(dev)
    ids = torch.tensor([0, 1, -1, 1, 2, 0, -1, 1, 2], dtype=torch.int32).to(dev)
    return w, x, y0, ids


def _probe_sgmv(backend):
    w, x, y0, ids = _lora_weights(_dev(backend))
    b = lk.LoRABatch.from_ids(ids, w.max_adapters, ranks=w.ranks)
    out = {}
    with torch.no_grad(), backends.use_backend(backend):
        out["add_lora_"] = lk.add_lora_(y0.clone(), x, w, b)
        out["mixed"] = lk.add_lora_(y0.clone(), x, w, b, merged=1)
        h = lk.shrink(x, w, b)
        out["shrink"] = h
        out["expand_"] = lk.expand_(y0.clone(), h, w, b)
    if backend == "triton":  # the launchers as test_triton_sgmv / test_mixed call them
        from lora_kernels.triton import sgmv

        for strategy in ("fused", "two_pass"):
            y = y0.clone()
            sgmv.add_lora_(y, x, w.a, w.b, w.offsets, w.ranks, w.scales, b.meta, b.max_tokens, w.slice_info,
                           w.max_rank, {"strategy": strategy}, merged=1 if strategy == "fused" else -1)
            out[f"launcher {strategy}"] = y
        # the persistent kernel with `in` (48 wide) split in three (its in-kernel sum of partials), on the
        # batch's plan
        g = torch.Generator().manual_seed(3)
        w3 = lk.LoRAWeights(48, 8, max_adapters=4, max_rank=4, dtype=torch.float32, device=x.device)
        for i in range(3):
            w3.add(torch.randn(4, 48, generator=g).to(x.device), torch.randn(8, 4, generator=g).to(x.device),
                   adapter_id=i)
        x3 = torch.randn(x.shape[0], 48, generator=g).to(x.device)
        y = y0[:, :8].clone()
        sgmv.add_lora_(y, x3, w3.a, w3.b, w3.offsets, w3.ranks, w3.scales, b.meta, b.max_tokens, w3.slice_info,
                       w3.max_rank, {"strategy": "persistent", "persistent": {"N_K": 3, "BLOCK_K": 16}},
                       plan=b.plan)
        out["launcher persistent split"] = y
    out["plan"] = b.plan.clone()  # the counters must be back at 0 after every call
    return out


def _probe_merge(backend):
    dev = _dev(backend)
    w, _, _, _ = _lora_weights("cpu")
    w16 = lk.LoRAWeights(16, [8, 8], max_adapters=4, max_rank=4, dtype=torch.float16, device=dev)
    for i in range(3):
        A, B, sc = zip(*(w.adapter(i, s) for s in range(2)))
        w16.add([a.half() for a in A], [b.half() * 8 for b in B], scale=list(sc), adapter_id=i)
    W0 = (torch.randn(16, 16, generator=torch.Generator().manual_seed(1)) * 4).half().to(dev)
    W = W0.clone()
    with backends.use_backend(backend):
        rec = M.merge_(W, w16, [0, 1, 2], [0.5, -1.5, 1.0])
        merged = W.clone()
        M.unmerge_(W, rec)
    return {"merged": merged, "restored": W}


def _deform_inputs(dev, seed=2):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (2, 3)]
    S = sum(h * w for h, w in shapes)
    value = torch.randn(1, S, 2, 4, generator=g)
    loc = torch.rand(1, 5, 2, 2, 2, 2, generator=g) * 1.4 - 0.2  # some samples straddle the border
    attn = torch.rand(1, 5, 2, 2, 2, generator=g)
    return shapes, value.to(dev), loc.to(dev), attn.to(dev)


def _probe_deform(backend):
    dev = _dev(backend)
    shapes, value, loc, attn = _deform_inputs(dev)
    out = {}
    with backends.use_backend(backend):
        for det in (False, True):
            ins = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
            o = lk.deform_pool(ins[0], shapes, None, ins[1], ins[2], deterministic=det)
            o.backward(torch.linspace(-1, 1, o.numel(), device=dev).view(o.shape))
            out.update({f"pool{det}": o.detach(), **{f"pool{det} grad{k}": t.grad for k, t in enumerate(ins)}})
        ref = torch.rand(5, 2, generator=torch.Generator().manual_seed(3)).to(dev)
        offsets = torch.randn(1, 5, 2, 2, 2, 2, generator=torch.Generator().manual_seed(4)).to(dev)
        logits = torch.randn(1, 5, 2, 4, generator=torch.Generator().manual_seed(5)).to(dev)
        ins = [t.clone().requires_grad_(True) for t in (value, offsets, logits)]
        o = lk.deform_sample(ins[0], shapes, None, ref, ins[1], ins[2])
        o.backward(torch.linspace(-1, 1, o.numel(), device=dev).view(o.shape))
        out.update({"sample": o.detach(), **{f"sample grad{k}": t.grad for k, t in enumerate(ins)}})
    return out


def _probe_dual(backend):
    dev = _dev(backend)
    g = torch.Generator().manual_seed(6)
    w = lk.DualLoRAWeights(16, 8, 4, 4, dtype=torch.float32, device=dev)
    for r in (2, 4, 3):
        w.add(torch.randn(r, 16, generator=g) / 4, torch.randn(r, 16, generator=g) / 4, torch.randn(8, r, generator=g),
              ln_weight=1 + 0.3 * torch.randn(r, generator=g), ln_bias=0.3 * torch.randn(r, generator=g), alpha=2.0 * r)
    x = torch.randn(9, 16, generator=g).to(dev)
    ids = torch.tensor([0, 1, -1, 1, 2, 0, -1, 1, 2], dtype=torch.int32).to(dev)
    b = lk.LoRABatch.from_ids(ids, w.max_adapters, ranks=w.ranks)
    out = {}
    with backends.use_backend(backend):
        with torch.no_grad():
            out["dual_lora_"] = lk.dual_lora_(torch.zeros(9, 8, device=dev), x, w, b)
        params = [w.a, w.b, w.ln_weight, w.ln_bias]
        for t in params:
            t.requires_grad_(True)
        xs = x.clone().requires_grad_(True)
        try:
            d = lk.dual_lora(xs, w, b)
            d.backward(torch.linspace(-1, 1, d.numel(), device=dev).view(d.shape))
            out["dual_lora"] = d.detach()
            out.update({f"grad{k}": t.grad.clone() for k, t in enumerate([xs] + params)})
        finally:
            for t in params:
                t.requires_grad_(False)
                t.grad = None
    return out


def _probe_backward(backend):
    w, x, _, ids = _lora_weights(_dev(backend))
    w.requires_grad_(True)
    b = lk.LoRABatch.from_ids(ids, w.max_adapters, ranks=w.ranks)
    xg = x.clone().requires_grad_(True)
    with backends.use_backend(backend):
        d = lk.lora_delta(xg, w, b)
        d.backward(torch.linspace(-1, 1, d.numel(), device=xg.device).view(d.shape))
    return {"delta": d.detach(), "grad x": xg.grad, "grad a": w.a.grad, "grad b": w.b.grad}


PROBES = {"sgmv": _probe_sgmv, "merge": _probe_merge, "deform": _probe_deform, "dual": _probe_dual,
          "backward": _probe_backward}
_BASELINE: dict = {}


def _probe(family, backend) -> dict:
    return {k: v.detach().cpu() for k, v in PROBES[family](backend).items()}


def _baseline(family, backend):
    key = (family, backend)
    if key not in _BASELINE:
        _BASELINE[key] = _probe(family, backend)
    return _BASELINE[key]


def _same(a: dict, b: dict) -> bool:
    def bits(t):
        t = t.detach().contiguous()
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])

    return a.keys() == b.keys() and all(torch.equal(bits(a[k]), bits(b[k])) for k in a)


def _spec_snapshot():
    return {k: v for k, v in vars(reference).items() if callable(v)}


_TRITON_MODULES = ("lora_kernels.triton.sgmv", "lora_kernels.triton.deform", "lora_kernels.triton.dual_lora",
                   "lora_kernels.triton.sgmv_backward", "lora_kernels.triton.merge")
_OPS_MODULES = ("lora_kernels.ops.sgmv", "lora_kernels.ops.deform", "lora_kernels.ops.dual_lora",
                "lora_kernels.ops.lora_linear", "lora_kernels.ops.merge.dispatch")
_GATED = [(e.module, e.attr) for e in mutants.MIXED_ENTRIES + mutants.MERGE_ENTRIES + mutants.UNMERGE_ENTRIES
          if e.gate is not None]


def _bindings() -> dict:
    """Everything a mutant may rebind, by scope: the Triton launchers ("triton"), the ops modules' binding of
    the reference ("cpu"), and the entries serving both backends, gated per call ("gated")."""
    out = {}
    for name in _TRITON_MODULES:
        mod = importlib.import_module(name)
        out.update({("triton", name, a): getattr(mod, a) for a in mod.__all__})
    for name in _OPS_MODULES:
        out[("cpu", name, "reference")] = importlib.import_module(name).reference
    for name, a in _GATED:
        out[("gated", name, a)] = getattr(importlib.import_module(name), a)
    return out


CASES = [f"{name}@{scope}" for name, m in mutants.MUTANTS.items() for scope in m.scopes]


@needs_triton
@pytest.mark.parametrize("case", CASES)
def test_mutant_changes_its_path_only(case):
    """Installed, the mutant changes what its scope's path computes (and counts the calls it perturbed); it
    rebinds nothing of the other scope (a gated entry: the other path computes exactly as before) and nothing
    of the spec; uninstalled, every binding is the original object again."""
    m, scope = mutants.parse(case)
    other = "cpu" if scope == "triton" else "triton"
    want = _baseline(m.family, SCOPE_BACKEND[scope])
    before, spec = _bindings(), _spec_snapshot()
    n0 = mutants.calls()
    p = mutants.install(case)
    try:
        during, spec_during = _bindings(), _spec_snapshot()
        got = _probe(m.family, SCOPE_BACKEND[scope])
        perturbed = mutants.calls() - n0
        changed = {k for k in before if during[k] is not before[k]}
        got_other = _probe(m.family, SCOPE_BACKEND[other]) if any(k[0] == "gated" for k in changed) else None
    finally:
        p.undo()
    assert perturbed > 0, f"{case}: perturbed no call of the {scope} path"
    assert not _same(got, want), f"{case}: the {scope} path computes exactly what the real kernels do"
    assert changed and all(k[0] in (scope, "gated") for k in changed), f"{case}: rebinds {sorted(changed)}"
    if got_other is not None:
        assert _same(got_other, _baseline(m.family, SCOPE_BACKEND[other])), f"{case}: changed the {other} path"
    assert spec_during == spec, f"{case}: touched lora_kernels.reference (the tests' spec)"
    after = _bindings()
    changed = [k for k in before if after[k] is not before[k]]
    assert not changed, f"{case}: undo left {changed}"


def test_every_entry_point_exists_and_spec_is_separate():
    """The ops modules still dispatch through the names the mutants patch (a rename would make every mutant of
    the family inert on that path: installation raises instead)."""
    for entries in (mutants.SGMV_ENTRIES, mutants.MIXED_ENTRIES, mutants.MERGE_ENTRIES, mutants.UNMERGE_ENTRIES,
                    mutants.DEFORM_ENTRIES, mutants.DUAL_ENTRIES, mutants.BACKWARD_ENTRIES):
        for e in entries:
            mod = importlib.import_module(e.module)
            owner = mod.reference if e.via_reference else mod
            assert callable(getattr(owner, e.attr)), f"{e.module}.{e.attr}"
            if e.via_reference:
                assert mod.reference is reference, f"{e.module} no longer dispatches through lora_kernels.reference"


@pytest.mark.parametrize("bad", ["bogus", "sgmv", "sgmv.noop@gpu", "sgmv.nope", ""])
def test_unknown_names_are_refused(bad, monkeypatch):
    with pytest.raises(ValueError, match="unknown mutant"):
        mutants.parse(bad)
    if bad:
        monkeypatch.setenv(mutants.ENV_NAME, bad)
        monkeypatch.setattr(mutants, "_active", {})
        with pytest.raises(pytest.UsageError, match="unknown mutant"):
            mutants.pytest_configure(None)
        assert mutants._active == {}


def test_a_moved_kernel_line_breaks_the_mutant_loudly():
    with pytest.raises(mutants.MutantError, match="expected 1 occurrence"):
        mutants._source_mutant("lora_kernels.triton.dual_lora", [("this line is not in the kernel", "x", 1)])


def test_matrix_covers_every_mutant_with_known_names():
    sys.path.insert(0, os.path.join(ROOT, ".ci"))
    try:
        mc = importlib.import_module("mutation_check")
    finally:
        sys.path.pop(0)
    named = set()
    for mod in mc.MATRIX:
        assert os.path.exists(os.path.join(ROOT, mod.path)), mod.path
        for run in mod.runs():
            m, _ = mutants.parse(run)
            named.add(m.name)
    assert named == set(mutants.MUTANTS), f"mutants no module is checked against: {set(mutants.MUTANTS) - named}"


def test_plugin_loads_through_conftest_and_reports(tmp_path):
    """``LORA_KERNELS_MUTANT`` alone makes conftest.py load the plugin, which installs the mutant and writes its
    report. (An unknown name raises pytest.UsageError, exit code 4: test_unknown_names_are_refused.)"""
    report = tmp_path / "report.json"
    env = {**os.environ, mutants.ENV_NAME: "sgmv.noop@triton", mutants.ENV_REPORT: str(report)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
           "tests/test_mutation_harness.py::test_a_moved_kernel_line_breaks_the_mutant_loudly"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(report.read_text()) == {"mutant": "sgmv.noop@triton", "calls": 0}
