"""ModeController (unmerged / merged / mixed serving modes), the V-LoRA auto policy, and lora-bench merge."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rule, lowp_add_lora_, make_weights

import lora_kernels as lk
from lora_kernels.nn import LoRALinear, ModeController, VLoRAPolicy
from lora_kernels.nn.modes import normalize_counts
from lora_kernels.ops import merge as merge_ops

N_ADAPTERS = 6
PARTIAL = 5  # adapter loaded in the first layer only


# The library's own merge ops (a broken import must fail these tests, never swap in a stand-in).
MERGE_OPS = merge_ops


# ---- a small model: fused q/k/v (3 slices) -> tanh -> projection ----------------------------------------------
class Toy(torch.nn.Module):
    def __init__(self, dtype, seed=0, hidden=32, kv=16, device="cpu"):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        ranks = [(4, 8, 2), (8, 8, 8), (16, 4, 1), (1, 1, 1), (32, 16, 8), (8, 4, 4)][:N_ADAPTERS]
        w1 = make_weights(hidden, [hidden, kv, kv], ranks, dtype=dtype, generator=g, device=device)
        w2 = make_weights(hidden + 2 * kv, hidden, [max(r) for r in ranks], dtype=dtype, generator=g, device=device)
        w2.remove(PARTIAL)
        lin1 = torch.nn.Linear(hidden, hidden + 2 * kv, dtype=dtype)
        lin2 = torch.nn.Linear(hidden + 2 * kv, hidden, dtype=dtype)
        with torch.no_grad():
            for lin in (lin1, lin2):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.in_features ** 0.5)
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.1)
        lin1.to(device), lin2.to(device)
        self.l1 = LoRALinear(lin1, w1)
        self.l2 = LoRALinear(lin2, w2)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def _sim(model, W0s, x, ids, mode, m, dtype):
    """The same model computed by PyTorch in ``dtype``: W_eff = round(W + s_m B_m A_m) when merged/mixed, deltas
    by the naive per-adapter loop in ``dtype``."""
    h = x.to(dtype)
    for k, (layer, W0) in enumerate(zip((model.l1, model.l2), W0s)):
        w = layer.weights
        loaded = m is not None and m in w.loaded
        W = W0.float()
        if mode != "unmerged" and loaded:
            d = torch.zeros_like(W)
            for s in range(w.num_slices):
                A, B, sc = w.adapter(m, s)
                c0 = w.slice_cols[s]
                d[c0:c0 + w.slice_outs[s]] += sc * (B.float() @ A.float())
            W = W + d
        y = F.linear(h, W.to(dtype), layer.base.bias.to(dtype))
        if mode == "unmerged" or (mode == "mixed" and not loaded):
            lowp_add_lora_(y, h, w, ids, dtype)
        elif mode == "mixed":
            lowp_add_lora_(y, h, w, ids, dtype)
            t = torch.zeros_like(y)
            lowp_add_lora_(t, h, w, torch.full_like(ids, m), dtype)
            y = y - t
        h = torch.tanh(y) if k == 0 else y
    return h


def _run(model, x, ids):
    batch = lk.LoRABatch(max_tokens=64, max_adapters=N_ADAPTERS)
    batch.build(ids, ranks=model.l1.weights.ranks)
    with torch.no_grad(), lk.use_batch(batch):
        return model(x)


def _check(model, W0s, x, ids, mode, m, dtype):
    out = _run(model, x, ids)
    ref = _sim(model, W0s, x.float(), ids, "unmerged", None, torch.float32)
    lowp = _sim(model, W0s, x, ids, mode, m, dtype)
    assert_close_rule(out, ref, lowp, dtype=dtype, name=f"{mode}({m})")


# ---- switching -------------------------------------------------------------------------------------------
STATES = [("unmerged", None), ("merged", 2), ("mixed", 2), ("mixed", 4), ("merged", 4), ("mixed", PARTIAL),
          ("merged", PARTIAL)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_pair_of_modes_keeps_outputs(dtype):
    torch.manual_seed(0)
    model = Toy(dtype)
    ctl = ModeController(model, merge_ops=MERGE_OPS)
    W0s = [w.detach().clone() for w in ctl.weights()]
    T = 40
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, 32, generator=g).to(dtype)
    mixed_ids = torch.randint(-1, N_ADAPTERS, (T,), generator=g, dtype=torch.int32)
    # every ordered pair (a, b) of states is visited as a consecutive switch
    seq = [STATES[0]]
    for a in STATES:
        for b in STATES:
            if a != b:
                seq += [a, b]
    for mode, m in seq:
        ctl.set_mode(mode, m)
        assert (ctl.mode, ctl.adapter) == (mode, m)
        if mode != "merged":
            _check(model, W0s, x, mixed_ids, mode, m, dtype)
        if m is not None:
            _check(model, W0s, x, torch.full((T,), m, dtype=torch.int32), mode, m, dtype)
        if mode == "unmerged":
            for W, W0 in zip(ctl.weights(), W0s):
                assert torch.equal(W, W0)
            assert ctl.records is None


def test_many_cycles_bit_exact_and_flag_only_switches():
    model = Toy(torch.bfloat16, seed=3)
    calls = {"merge": 0, "unmerge": 0}

    class Counting:
        def merge_many_(self, *a, **k):
            calls["merge"] += 1
            return MERGE_OPS.merge_many_(*a, **k)

        def unmerge_many_(self, *a, **k):
            calls["unmerge"] += 1
            return MERGE_OPS.unmerge_many_(*a, **k)

    ctl = ModeController(model, merge_ops=Counting())
    W0s = [w.detach().clone() for w in ctl.weights()]
    cycles = 60
    for c in range(cycles):
        m, k = c % N_ADAPTERS, (c + 1) % N_ADAPTERS
        ctl.set_mode("mixed", m)
        ctl.set_mode("merged", m)   # flag only
        ctl.set_mode("mixed", m)    # flag only
        ctl.set_mode("merged", k)   # unmerge m, merge k
        ctl.set_mode("merged", k)   # no-op
        ctl.set_mode("unmerged")
        for W, W0 in zip(ctl.weights(), W0s):
            assert torch.equal(W, W0), f"cycle {c}: base weights differ after returning to unmerged"
    assert calls == {"merge": 2 * cycles, "unmerge": 2 * cycles}
    assert ctl.switches == 4 * cycles


def test_layer_flags_follow_the_mode():
    model = Toy(torch.float32)
    ctl = ModeController(model, merge_ops=MERGE_OPS)
    assert model.l1.mode == model.l2.mode == "unmerged"
    ctl.set_mode("mixed", 1)
    assert (model.l1.mode, model.l1.merged_adapter) == ("mixed", 1)
    assert (model.l2.mode, model.l2.merged_adapter) == ("mixed", 1)
    ctl.set_mode("mixed", PARTIAL)  # not loaded in l2: l2 serves as unmerged (its delta_m is 0)
    assert model.l1.mode == "mixed" and model.l2.mode == "unmerged"
    assert len(ctl.records) == 1
    ctl.set_mode("merged", PARTIAL)
    assert model.l1.mode == model.l2.mode == "merged"
    ctl.set_mode("unmerged")
    assert model.l1.mode == model.l2.mode == "unmerged"


def test_failed_merge_leaves_a_clean_unmerged_model():
    model = Toy(torch.bfloat16)

    class FailSecondMerge:
        n = 0

        def merge_many_(self, *a, **k):
            self.n += 1
            if self.n == 2:
                raise RuntimeError("boom")
            return MERGE_OPS.merge_many_(*a, **k)

        def unmerge_many_(self, *a, **k):
            return MERGE_OPS.unmerge_many_(*a, **k)

    ctl = ModeController(model, merge_ops=FailSecondMerge())
    W0s = [w.detach().clone() for w in ctl.weights()]
    ctl.set_mode("mixed", 1)
    with pytest.raises(RuntimeError, match="boom"):
        ctl.set_mode("mixed", 2)
    assert (ctl.mode, ctl.adapter) == ("unmerged", None)
    assert model.l1.mode == model.l2.mode == "unmerged"
    for W, W0 in zip(ctl.weights(), W0s):
        assert torch.equal(W, W0)


def test_bad_arguments():
    model = Toy(torch.float32)
    ctl = ModeController(model, merge_ops=MERGE_OPS)
    W0s = [w.detach().clone() for w in ctl.weights()]
    with pytest.raises(ValueError, match="mode"):
        ctl.set_mode("folded", 1)
    with pytest.raises(ValueError, match="adapter"):
        ctl.set_mode("merged")
    with pytest.raises(ValueError, match="adapter"):
        ctl.set_mode("unmerged", 1)
    with pytest.raises(ValueError, match="adapter"):
        ctl.set_mode("mixed", N_ADAPTERS)
    with pytest.raises(ValueError, match="adapter"):
        ctl.set_mode("mixed", True)
    model.l1.weights.remove(0)
    model.l2.weights.remove(0)
    with pytest.raises(ValueError, match="loaded in no"):
        ctl.set_mode("merged", 0)
    assert (ctl.mode, ctl.adapter) == ("unmerged", None)
    for W, W0 in zip(ctl.weights(), W0s):
        assert torch.equal(W, W0)
    with pytest.raises(ValueError, match="LoRALinear"):
        ModeController(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    bad = LoRALinear(torch.nn.Identity(), LoRAWeightsFor(4, 4))
    with pytest.raises(TypeError, match="base.weight"):
        ModeController(bad)
    ctl2 = ModeController([model.l1], merge_ops=MERGE_OPS)
    ctl2.set_mode("merged", 1)
    assert repr(ctl2).startswith("ModeController(layers=1, mode='merged', adapter=1")
    ctl2.set_mode("unmerged")


def LoRAWeightsFor(i, o):
    return lk.LoRAWeights(i, o, max_adapters=2, max_rank=2, dtype=torch.float32)


def test_registered_graphs_refuse_switches():
    model = Toy(torch.float32)
    ctl = ModeController(model, merge_ops=MERGE_OPS)
    ctl.set_mode("mixed", 1)
    g1, g2 = object(), object()  # stand-ins for torch.cuda.CUDAGraph: the controller only keeps them
    assert ctl.register_graph(g1) is g1
    ctl.register_graph(g2)
    assert ctl.graphs == [g1, g2]
    W = [w.detach().clone() for w in ctl.weights()]
    for mode, m in [("merged", 1), ("unmerged", None), ("mixed", 2)]:
        with pytest.raises(RuntimeError, match="release_graphs"):
            ctl.set_mode(mode, m)
    assert (ctl.mode, ctl.adapter) == ("mixed", 1)
    assert all(torch.equal(a, b) for a, b in zip(ctl.weights(), W))
    ctl.set_mode("mixed", 1)  # the current mode: a no-op, allowed
    with pytest.raises(RuntimeError):
        ctl.auto({2: 10})
    assert ctl.release_graphs([g1]) == 1
    with pytest.raises(RuntimeError):
        ctl.set_mode("merged", 1)
    assert ctl.release_graphs() == 1
    ctl.set_mode("merged", 1)
    assert ctl.mode == "merged"
    ctl._capturing = 1  # as inside ctl.capture(): switching is refused
    with pytest.raises(RuntimeError, match="capture is in progress"):
        ctl.set_mode("unmerged")
    ctl._capturing = 0
    ctl.set_mode("unmerged")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_capture_registers_and_recapture_cuda():
    model = Toy(torch.bfloat16, device="cuda")
    ctl = ModeController(model, merge_ops=MERGE_OPS)
    batch = lk.LoRABatch(max_tokens=64, max_adapters=N_ADAPTERS, device="cuda")
    x = torch.randn(32, 32, device="cuda", dtype=torch.bfloat16)
    ids = torch.full((32,), 2, dtype=torch.int32, device="cuda")
    batch.build(ids, ranks=model.l1.weights.ranks)
    with torch.no_grad(), lk.use_batch(batch):
        ref = model(x)
        ctl.set_mode("mixed", 2)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            model(x)
        torch.cuda.current_stream().wait_stream(s)
        with ctl.capture() as g:
            out = model(x)
        assert ctl.graphs == [g]
        with pytest.raises(RuntimeError):
            ctl.set_mode("merged", 2)
        g.replay()
        torch.cuda.synchronize()
        assert (out.float() - ref.float()).abs().max() <= 0.05 * ref.float().abs().max()
        ctl.release_graphs()
        ctl.set_mode("unmerged")


# ---- the policy ------------------------------------------------------------------------------------------
def test_vlora_policy_default_rule():
    p = VLoRAPolicy()
    assert p({3: 6, 1: 2, -1: 1}) == ("mixed", 3)
    assert p({3: 8}) == ("merged", 3)
    assert p({3: 5, 1: 5}) == ("unmerged", None)        # exactly half: not more than half
    assert p({3: 5, 1: 4}) == ("mixed", 3)
    assert p({-1: 9, 2: 1}) == ("unmerged", None)        # the no-adapter tokens are never merged
    assert p({3: 3, -1: 1}) == ("mixed", 3)              # -1 tokens need -delta_m: mixed, not merged
    assert p({}) == ("unmerged", None)
    assert p([0, 0, 7, 1]) == ("mixed", 2)               # a list indexed by adapter id
    assert p(torch.tensor([0, 4, 0])) == ("merged", 1)
    assert p({1: 4, 2: 4}) == ("unmerged", None)
    assert VLoRAPolicy(dominant_fraction=0.4)({1: 5, 2: 5}) == ("mixed", 1)  # tie: smallest id


def test_vlora_policy_thresholds_and_starving_credit():
    p = VLoRAPolicy(dominant_fraction=0.7, starving_credit=10.0, max_starving_fraction=0.25)
    assert p({0: 7, 1: 3}) == ("unmerged", None)
    assert p({0: 8, 1: 2}) == ("mixed", 0)
    assert p({0: 8, 1: 2}, [0, 11, 0, 0]) == ("mixed", 0)             # 1/4 starving: allowed
    assert p({0: 8, 1: 2}, [0, 11, 12, 0]) == ("unmerged", None)      # 2/4 > 0.25
    assert p({0: 8, 1: 2}, [10, 10, 10, 10]) == ("mixed", 0)          # at the limit is not starving
    d = VLoRAPolicy()
    assert d({0: 8}, [2.0, 2.0, 0.0, 0.0]) == ("merged", 0)             # half starving: allowed
    assert d({0: 8}, [2.0, 2.0, 2.0, 0.0]) == ("unmerged", None)
    assert d({0: 8}, []) == ("merged", 0)
    assert VLoRAPolicy(allow_mixed=False)({0: 8, 1: 1}) == ("unmerged", None)
    with pytest.raises(ValueError, match="dominant_fraction"):
        VLoRAPolicy(dominant_fraction=1.0)
    with pytest.raises(ValueError, match="max_starving_fraction"):
        VLoRAPolicy(max_starving_fraction=2)
    with pytest.raises(ValueError, match="counts"):
        normalize_counts({1: -1})
    with pytest.raises(ValueError, match="ids"):
        normalize_counts({-2: 1})


def test_auto_and_pluggable_policy():
    model = Toy(torch.float32)
    ctl = ModeController(model, merge_ops=MERGE_OPS)
    assert ctl.auto({1: 6, 2: 1}) == ("mixed", 1)
    assert ctl.auto({1: 6}) == ("merged", 1)
    assert ctl.auto({}) == ("merged", 1)                 # empty batch: keep the mode
    assert ctl.auto({2: 3, 4: 3}) == ("unmerged", None)
    assert ctl.decide({4: 3}) == ("merged", 4) and ctl.mode == "unmerged"
    seen = []

    def always_mixed_3(counts, credit):
        seen.append((dict(counts), credit))
        return "mixed", 3

    assert ctl.auto({1: 1}, [0.5], policy=always_mixed_3) == ("mixed", 3)
    assert seen == [({1: 1}, [0.5])]
    ctl.policy = VLoRAPolicy(dominant_fraction=0.9)
    assert ctl.auto({1: 8, 2: 2}) == ("unmerged", None)
    ctl.policy = lambda c, w: ("unmerged", 7)            # adapter ignored for unmerged
    assert ctl.auto({1: 1}) == ("unmerged", None)
    ctl.policy = lambda c, w: ("fused", 1)
    with pytest.raises(ValueError, match="policy"):
        ctl.auto({1: 1})
    with pytest.raises(TypeError, match="policy"):
        ctl.policy = 3


# ---- lora-bench merge ------------------------------------------------------------------------------------
def test_bench_merge_cpu_smoke_writes_json(tmp_path, capsys):
    from lora_kernels.cli import main

    out = tmp_path / "merge.json"
    rc = main(["merge", "--cpu", "--out", str(out), "--no-progress", "--reps", "2", "--layers", "1"])
    doc = json.loads(out.read_text())
    text = capsys.readouterr().out
    assert doc["schema"].startswith("lora_kernels.bench.merge/")
    assert doc["kind"] == "cpu-smoke" and doc["complete"]
    names = {r["impl"] for r in doc["rows"]}
    assert {"torch.addmm_", "peft-loop"} <= names
    for r in doc["rows"]:
        assert r["status"] in ("ok", "SKIP", "FAIL", "ERROR")
        if r["impl"] == "torch.addmm_" and r["status"] == "ok":
            assert r["us_median"] > 0 and 0.0 <= r["mismatch_frac"] <= 1.0
    ours = [r for r in doc["rows"] if r["impl"].startswith("lk.") and r["status"] == "ok"]
    for r in ours:
        if r.get("exact"):
            assert r["bit_exact"] is True and r["mismatch_frac"] == 0.0
    assert "wrote" in text
    assert rc == (1 if any(r["status"] in ("FAIL", "ERROR") for r in doc["rows"]) else 0)
