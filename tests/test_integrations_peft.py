"""PEFT integration: several PEFT adapters served in one batch equal PEFT's own single-adapter outputs (fp32,
tiny Llama, CPU); export back to PEFT files; the AdapterPool path; refusals."""

import copy
import json
import os

import pytest
import torch

import lora_kernels as lk
from integ_models import VOCAB, tiny_llama

peft = pytest.importorskip("peft")

from lora_kernels.integrations.peft import from_peft, peft_lora_layers  # noqa: E402
from lora_kernels.integrations.transformers import patch_model  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
NAMES = ("ad_x", "ad_y", "ad_z")


def _configs():
    return {
        "ad_x": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "ad_y": peft.LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "down_proj", "o_proj"],
                                rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 16}, use_rslora=True,
                                init_lora_weights=False),
        "ad_z": peft.LoraConfig(r=6, lora_alpha=6, target_modules=["k_proj", "gate_proj", "up_proj"],
                                init_lora_weights=False),
    }


def _peft_model(seed=0):
    base = tiny_llama(layers=2, seed=seed)
    cfgs = _configs()
    torch.manual_seed(seed + 1)
    pm = peft.get_peft_model(copy.deepcopy(base), cfgs[NAMES[0]], adapter_name=NAMES[0])
    for n in NAMES[1:]:
        pm.add_adapter(n, cfgs[n])
    return base, pm.eval()


def _peft_single(pm, ids, name):
    with torch.no_grad():
        if name is None:
            with pm.disable_adapter():
                return pm(ids).logits
        pm.set_adapter(name)
        return pm(ids).logits


def test_batched_serving_equals_peft_single_adapter_outputs():
    _, pm = _peft_model()
    ids = torch.randint(0, VOCAB, (5, 6), generator=torch.Generator().manual_seed(1))
    req = ["ad_y", None, "ad_x", "ad_z", "ad_y"]
    refs = {n: _peft_single(pm, ids, n) for n in set(req)}
    serving = from_peft(pm)
    assert serving.ids == {n: i for i, n in enumerate(sorted(NAMES))}
    with torch.no_grad():
        out = serving(ids, adapter_names=req).logits
        with serving.adapters(req):
            out_ctx = serving.model(ids).logits
    assert torch.equal(out, out_ctx)
    for b, n in enumerate(req):
        torch.testing.assert_close(out[b], refs[n][b], **TOL)
    with pytest.raises(KeyError, match="ad_w"):
        serving.ids_for(["ad_w"])
    # restore: PEFT's layers are back and behave as before
    pm2 = serving.restore()
    assert peft_lora_layers(pm2.base_model.model)
    torch.testing.assert_close(_peft_single(pm2, ids, "ad_x"), refs["ad_x"], atol=0, rtol=0)


def test_export_round_trip_through_peft_files(tmp_path):
    base, pm = _peft_model(seed=2)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    serving = from_peft(pm, ["ad_y", "ad_x"])
    with torch.no_grad():
        ours = serving(ids, adapter_names=["ad_y", "ad_y"]).logits
    d = serving.save_pretrained(str(tmp_path / "ad_y"), "ad_y")
    cfg = json.load(open(os.path.join(d, "adapter_config.json")))
    assert cfg["rank_pattern"] and cfg["alpha_pattern"]  # down_proj rank 2, o_proj alpha 16 kept per layer
    from safetensors.torch import load_file

    sd = load_file(os.path.join(d, "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.layers.") for k in sd)
    assert serving.state_dict_of("ad_y").keys() == sd.keys()
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), d).eval()
    with torch.no_grad():
        theirs = reloaded(ids).logits
    torch.testing.assert_close(ours, theirs, **TOL)


def test_adapter_pool_on_a_patched_model_equals_peft(tmp_path):
    base, pm = _peft_model(seed=4)
    for n in NAMES:
        pm.save_pretrained(str(tmp_path), selected_adapters=[n])
    ids = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(5))
    refs = {n: _peft_single(pm, ids, n) for n in NAMES}
    model = copy.deepcopy(base)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    p = patch_model(model, None, target_modules=targets, max_adapters=4, max_rank=8, dtype=torch.float32)
    pool = lk.AdapterPool(model)
    slots = {}
    for n in NAMES:
        path = tmp_path / n if (tmp_path / n).exists() else tmp_path
        slots[n] = pool.load(n, str(path))
    req = ["ad_z", "ad_x", "ad_y"]
    with pool.use(req) as sl, torch.no_grad(), lk.adapters(sl):
        out = model(ids).logits
    assert sl == [slots[n] for n in req]
    for b, n in enumerate(req):
        torch.testing.assert_close(out[b], refs[n][b], **TOL)
    p.unpatch()


def test_refuses_dora_and_changes_nothing():
    base = tiny_llama(layers=1)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                                   init_lora_weights=False), adapter_name="dora")
    before = dict(pm.named_modules())
    with pytest.raises(ValueError, match="DoRA"):
        from_peft(pm)
    assert all(before[k] is v for k, v in pm.named_modules())
    with pytest.raises(ValueError, match="adapter_names"):
        from_peft(pm, ["missing"])


def test_lora_bench_serve_cpu_smoke(tmp_path, capsys):
    from lora_kernels.cli import main

    out = tmp_path / "serve.json"
    rc = main(["serve", "--cpu", "--batch", "3", "--adapters", "3", "--layers", "1", "--reps", "1", "--warmup", "0",
               "--out", str(out)])
    assert rc == 0
    doc = json.load(open(out))
    assert doc["schema"] == "lora_kernels.bench.serve/1" and doc["kind"] == "cpu-smoke" and doc["label"]
    rows = {r["impl"]: r for r in doc["rows"]}
    assert set(rows) == {"base[eager]", "peft.mixed[eager]", "lk[eager]"}
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["lk[eager]"]["max_abs_diff"] <= rows["lk[eager]"]["allowed"]
    assert "CPU smoke" in capsys.readouterr().out
