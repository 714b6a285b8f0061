"""The python code blocks of README.md and docs/*.md run (on the CPU).

Each block is run as written, after textual substitutions listed here (``"cuda"`` -> ``"cpu"``, smaller sizes
where the CPU would be slow, a concrete value where the text has ``...``), in a namespace that a per-block
setup fills with the names the prose around it assumes (a model, adapter files, tensors). Blocks that need a
GPU (CUDA-graph capture) are listed in ``GPU_ONLY`` with the reason; every block must be in exactly one of the
two tables, so a new docs example is either run here or explicitly excused.
"""

from __future__ import annotations

import os
import pathlib
import re
import socket
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lora_kernels as lk

ROOT = pathlib.Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"```python\n(.*?)```", re.S)


def _blocks():
    out = {}
    for f in [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")):
        for i, m in enumerate(_FENCE.finditer(f.read_text())):
            out[f"{f.relative_to(ROOT)}#{i}"] = m.group(1)
    return out


BLOCKS = _blocks()
CPU = [('"cuda"', '"cpu"'), (".cuda()", "")]


# ---- per-block setups (they run in the block's namespace; the block then runs in it) ---------------------
def _setup_pool(ns, tmp):
    from lora_kernels.peft_format import save_peft_adapter

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = lk.nn.LoRALinear(nn.Linear(16, 16), max_adapters=4, max_rank=4)

        def forward(self, x):
            return self.q_proj(x)

    g = torch.Generator().manual_seed(0)
    for n in ("fr", "de", "it"):
        save_peft_adapter(tmp / "adapters" / n, {"q_proj": (torch.randn(4, 16, generator=g),
                                                            torch.randn(16, 4, generator=g))}, r=4, lora_alpha=8)
    ns.update(torch=torch, model=Model(), request_adapters=["fr", None, "de", "fr"], tokens_per_request=2,
              input_ids=torch.randn(8, 16))


def _check_pool(ns):
    base = ns["model"].q_proj.base
    torch.testing.assert_close(ns["logits"][2:4], base(ns["input_ids"][2:4]))  # request None: base only
    assert not torch.allclose(ns["logits"][:2], base(ns["input_ids"][:2]))
    assert ns["pool"].refcount("fr") == 0 and ns["pool"].slot_of("it") is not None


def _setup_dual(ns, tmp):
    g = torch.Generator().manual_seed(1)
    ns.update(torch=torch, nn=nn, A=torch.randn(32, 4096, generator=g) / 64, T=torch.randn(32, 4096, generator=g) / 64,
              B=torch.randn(4096, 32, generator=g) / 64, g=torch.ones(32), b=torch.zeros(32),
              adapter_ids=torch.tensor([0, 1, -1, 1], dtype=torch.int32),
              x=torch.randn(4, 4096, generator=g).bfloat16(), y=torch.zeros(4, 4096, dtype=torch.bfloat16))


def _check_dual(ns):
    y, delta = ns["y"], ns["delta"]
    assert ns["i"] == 0 and ns["j"] == 1
    assert not y[0].any() and not y[2].any()  # new_adapter: B = 0; token 2: id -1
    assert y[1].abs().sum() > 0
    torch.testing.assert_close(delta.float(), y.float(), atol=2e-2, rtol=2e-2)
    assert isinstance(ns["layer"], lk.nn.DualLoRALinear)


def _fed_clients(ranks, in_f, out_f, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"q": (torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g), 2.0 / r),
             "v": (torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g), 2.0 / r)} for r in ranks]


def _setup_fed(ns, tmp):
    w_qkv = lk.LoRAWeights(24, 48, 4, 8, dtype=torch.float32)
    w_o = lk.LoRAWeights(24, 24, 4, 8, dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    for i, r in enumerate((4, 8, 6)):
        for w in (w_qkv, w_o):
            w.add(torch.randn(r, 24, generator=g), torch.randn(w.out_features, r, generator=g), alpha=2.0 * r,
                  adapter_id=i)
    ns.update(w_qkv=w_qkv, w_o=w_o, ids=[0, 1, 2], n_samples=[10, 20, 30],
              specs=[(c["q"][0], c["q"][1], c["v"][0], c["v"][1], 2.0, c["q"][0].shape[0])
                     for c in _fed_clients((4, 8, 6), 24, 24, 3)])


def _check_fed(ns):
    fed = ns["fed"]
    ref = fed.exact_delta(ns["clients"], weights=ns["n_samples"])
    for k in ("qkv", "o"):
        torch.testing.assert_close(ns["exact"][k].delta(), ref[k], atol=1e-4, rtol=1e-4)
        assert ns["small"][k].rank == 16 and ns["back"][0][k].rank == 4
    assert ns["base"].max_rel_error > 0


def _setup_fdist(ns, tmp):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    ns.update(my_clients=_fed_clients((8, 12), 32, 32, 4), my_sample_counts=[3, 1])


def _check_fdist(ns):
    import lora_kernels.federated as fed

    want = fed.stack_svd(ns["my_clients"], 16, weights=ns["my_sample_counts"])
    for k in ("q", "v"):
        torch.testing.assert_close(ns["agg"][k].delta(), want[k].delta(), atol=1e-4, rtol=1e-4)


def _teardown_fdist(ns):
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        os.environ.pop(k, None)


def _setup_started(ns, tmp):
    w = lk.LoRAWeights(16, 8, 64, 4, dtype=torch.float32)
    w.add(torch.randn(4, 16), torch.randn(8, 4))
    ns["make_model"] = lambda: nn.Sequential(lk.nn.LoRALinear(nn.Linear(16, 8), w))
    ns["steps"] = [SimpleNamespace(adapter_ids=torch.tensor(ids, dtype=torch.int32), tokens=torch.randn(len(ids), 16))
                   for ids in ([0, -1, 0], [-1, -1])]


def _check_started(ns):
    step = ns["steps"][-1]  # all -1: the base model alone
    torch.testing.assert_close(ns["logits"], ns["model"][0].base(step.tokens))


def _teardown_batch(ns):
    lk.set_batch(None)


def _setup_patch(ns, tmp):
    pytest.importorskip("transformers")
    from integ_models import tiny_llama

    from lora_kernels.peft_format import save_peft_adapter

    g = torch.Generator().manual_seed(5)
    adapters = []
    for name, r in (("a", 4), ("b", 8)):
        mods = {f"model.layers.{i}.self_attn.{p}": (torch.randn(r, 32, generator=g) / 8,
                                                     torch.randn(o, r, generator=g) / 8)
                for i in range(2) for p, o in (("q_proj", 32), ("v_proj", 16))}
        adapters.append((name, save_peft_adapter(tmp / name, mods, r=r, lora_alpha=2 * r)))
    ns.update(model=tiny_llama(), adapters=adapters, input_ids=torch.randint(0, 50, (3, 5)))


def _check_patch(ns):
    from lora_kernels.nn import LoRALinear

    assert ns["out"].shape == (3, 5 + 3)
    assert not any(isinstance(m, LoRALinear) for m in ns["model"].modules())  # unpatched
    assert ns["slots"] == [0, 1] or sorted(ns["slots"]) == [0, 1]


def _setup_peft(ns, tmp):
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from integ_models import tiny_llama

    from lora_kernels.integrations.peft import from_peft

    torch.manual_seed(6)
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False), adapter_name="x")
    pm.add_adapter("y", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], init_lora_weights=False))
    ns.update(from_peft=from_peft, peft_model=pm, input_ids=torch.randint(0, 50, (3, 5)))


def _check_peft(ns):
    from lora_kernels.peft_format import read_peft_adapter

    assert ns["out"] is not None
    h = read_peft_adapter("out/x")
    assert len(h.modules) == 4 and all(A.shape[0] == 4 for A, _, _ in h.modules.values())


def _merge_weights(ids, seed):
    g = torch.Generator().manual_seed(seed)
    w = lk.LoRAWeights(16, 12, 8, 4, dtype=torch.float32)
    for j in ids:
        w.add(torch.randn(4, 16, generator=g), torch.randn(12, 4, generator=g), alpha=8.0, adapter_id=j)
    return w


def _setup_merge(ns, tmp):
    ns.update(W=torch.randn(12, 16), weights=_merge_weights((3, 5, 7), 7),
              Ws=[torch.randn(12, 16), torch.randn(12, 16)], weights_per_layer=[_merge_weights((7,), 8),
                                                                                 _merge_weights((1, 7), 9)])
    ns["_orig"] = [ns["W"].clone()] + [W.clone() for W in ns["Ws"]]


def _check_merge(ns):
    for W, o in zip([ns["W"]] + ns["Ws"], ns["_orig"]):
        assert torch.equal(W, o)
    assert ns["rec"].adapters == (3, 5) and len(ns["recs"]) == 2


def _modes_model():
    layers = nn.Sequential(*[lk.nn.LoRALinear(nn.Linear(16, 12), _merge_weights((3, 5), 10 + i)) for i in range(2)])
    return layers, [m.base.weight.clone() for m in layers]


def _setup_modes(ns, tmp):
    ns["model"], ns["_orig"] = _modes_model()


def _check_modes(ns):
    assert (ns["ctl"].mode, ns["ctl"].adapter) == ("unmerged", None)
    assert all(torch.equal(m.base.weight, o) for m, o in zip(ns["model"], ns["_orig"]))


def _setup_auto(ns, tmp):
    from lora_kernels.nn import ModeController

    model, _ = _modes_model()
    ns.update(ctl=ModeController(model), VLoRAPolicy=lk.nn.VLoRAPolicy, adapter_counts={3: 10, -1: 2},
              waiting_credit=[0.0, 0.5], counts={5: 4}, credit=None,
              my_policy=lambda counts, credit: ("unmerged", None))


def _check_auto(ns):
    assert (ns["mode"], ns["adapter"]) == ("mixed", 3)  # the decide() call: adapter 3 has 10 of 12 tokens
    assert ns["ctl"].mode == "unmerged"  # the last auto() with my_policy
    assert ns["ctl"].policy is ns["my_policy"]


def _setup_training(ns, tmp):
    g = torch.Generator().manual_seed(11)
    H = 256
    ns.update(F=torch.nn.functional,
              adapters=[(torch.randn(r, H, generator=g) / 16, torch.randn(H, r, generator=g) / 16) for r in (8, 16, 4)],
              W0=torch.randn(H, H, generator=g).bfloat16() / 16, bias=torch.zeros(H, dtype=torch.bfloat16),
              data=[(torch.randn(5, H, generator=g).bfloat16(), torch.tensor(ids, dtype=torch.int32),
                     torch.randn(5, H, generator=g).bfloat16()) for ids in ([0, 1, -1, 2, 0], [2, 2, 1, -1, -1])])


def _check_training(ns):
    w = ns["w"]
    assert w.a.grad is not None and w.b.grad is not None and w.b.grad.abs().sum() > 0
    assert torch.isfinite(ns["loss"]).all()


def _setup_vce(ns, tmp):
    from lora_kernels.nn import VisualCueEnhancement

    torch.save(VisualCueEnhancement(projector_dim=4096).state_dict(), tmp / "checkpoint.bin")
    g = torch.Generator().manual_seed(12)
    hs = tuple(torch.randn(1, 577, 1024, generator=g) for _ in range(25))  # CLIP ViT-L/14-336: 24 layers + embeddings
    ns.update(torch=torch, clip=lambda pixel_values, output_hidden_states: SimpleNamespace(hidden_states=hs),
              pixel_values=None)


def _check_vce(ns):
    assert ns["tokens"].shape == (1, 576, 4096) and torch.isfinite(ns["tokens"]).all()
    saved = torch.load("checkpoint.bin")
    assert all(torch.equal(v, saved[k]) for k, v in ns["vce"].state_dict().items())


# block -> (setup, substitutions, check, teardown)
CASES = {
    "README.md#0": (None, CPU, lambda ns: (
        ns["y"][2].eq(0).all().item() and ns["y"][0].abs().sum().item() > 0
        and torch.allclose(ns["out"].float(), (ns["layer"].base(ns["x"]) + ns["y"]).float(), atol=5e-2, rtol=2e-2)
    ) or pytest.fail("README example: wrong result"), None),
    "docs/adapter-pool.md#0": (_setup_pool, CPU, _check_pool, None),
    "docs/dual-lora.md#0": (_setup_dual, CPU, _check_dual, None),
    "docs/federated.md#0": (_setup_fed, [("for ...]", "for (A_q, B_q, A_v, B_v, alpha, r) in specs]")], _check_fed,
                            None),
    "docs/federated.md#1": (_setup_fdist, [("clients_per_process=[5, 5]", "clients_per_process=[2]")], _check_fdist,
                            _teardown_fdist),
    "docs/getting-started.md#0": (_setup_started, CPU + [("model = ...", "model = make_model()")], _check_started,
                                  _teardown_batch),
    "docs/integrations.md#0": (_setup_patch, [("max_new_tokens=32", "max_new_tokens=3")], _check_patch, None),
    "docs/integrations.md#1": (_setup_peft, [], _check_peft, None),
    "docs/merge.md#0": (_setup_merge, [], _check_merge, None),
    "docs/modes.md#0": (_setup_modes, [], _check_modes, None),
    "docs/modes.md#2": (_setup_auto, [], _check_auto, None),
    "docs/training.md#0": (_setup_training, CPU + [("4096", "256")], _check_training, None),
    "docs/vce-module.md#0": (_setup_vce, CPU, _check_vce, None),
}
GPU_ONLY = {
    "docs/integrations.md#2": "CUDA-graph capture of a decode step (tests/test_integrations_hf.py covers it on a GPU)",
    "docs/integrations.md#3": "CUDA-graph capture with a static KV cache",
    "docs/modes.md#1": "torch.cuda.graph capture and ModeController graph registration",
}


def test_every_block_is_run_or_excused():
    known = set(CASES) | set(GPU_ONLY)
    assert set(BLOCKS) == known, (f"docs python blocks changed: add them to CASES or GPU_ONLY: unknown "
                                  f"{sorted(set(BLOCKS) - known)}, stale {sorted(known - set(BLOCKS))}")
    assert not set(CASES) & set(GPU_ONLY)


@pytest.mark.parametrize("key", sorted(CASES))
def test_docs_block_runs(key, tmp_path, monkeypatch):
    setup, subs, check, teardown = CASES[key]
    code = BLOCKS[key]
    for old, new in subs:
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    ns: dict = {"__name__": f"docs_block_{key}"}
    try:
        if setup is not None:
            setup(ns, tmp_path)
        exec(compile(code, key, "exec"), ns)
        check(ns)
    finally:
        if teardown is not None:
            teardown(ns)
