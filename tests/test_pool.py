"""AdapterPool and the PEFT file reader: round trip with peft, malformed files (each a specific error, the pool
unchanged and still serving), churn (hypothesis), threads, and CUDA prefetch on a side stream."""

from __future__ import annotations

import json
import pickle
import random
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_kernels as lk
from lora_kernels.peft_format import CONFIG_NAME, WEIGHTS_NAME, read_peft_adapter, save_peft_adapter
from lora_kernels.pool import AdapterInUseError, AdapterPool, PoolFullError

safetensors_torch = pytest.importorskip("safetensors.torch")

IN = 16
# module path -> out_features; the last three are one fused q/k/v LoRAWeights.
OUTS = {
    "model.layers.0.self_attn.q_proj": 16,
    "model.layers.0.self_attn.o_proj": 12,
    "model.layers.1.self_attn.q_proj": 16,
    "model.layers.1.self_attn.k_proj": 8,
    "model.layers.1.self_attn.v_proj": 8,
}
FUSED = ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj")


def make_layers(n_slots=4, max_rank=8, capacity_rows=None, dtype=torch.float32, device="cpu"):
    kw = dict(capacity_rows=capacity_rows, dtype=dtype, device=device)
    return {
        "model.layers.0.self_attn.q_proj": lk.LoRAWeights(IN, 16, n_slots, max_rank, **kw),
        "model.layers.0.self_attn.o_proj": lk.LoRAWeights(IN, 12, n_slots, max_rank, **kw),
        FUSED: lk.LoRAWeights(IN, [16, 8, 8], n_slots, max_rank, **kw),
    }


def write_adapter(d, seed, rank, modules=None, alpha=None, **cfg):
    """A PEFT adapter directory with random factors; returns (dir, {path: dense fp64 delta [out, in]})."""
    g = torch.Generator().manual_seed(seed)
    modules = list(OUTS) if modules is None else modules
    alpha = float(2 * rank) if alpha is None else alpha
    facs = {p: (torch.randn(rank, IN, generator=g) / IN**0.5, torch.randn(OUTS[p], rank, generator=g) / rank**0.5)
            for p in modules}
    save_peft_adapter(d, facs, r=rank, lora_alpha=alpha, **cfg)
    scale = alpha / rank**0.5 if cfg.get("use_rslora") else alpha / rank
    return d, {p: scale * B.double() @ A.double() for p, (A, B) in facs.items()}


def expected_delta(dense, names, x, path):
    out = torch.zeros(x.shape[0], OUTS[path], dtype=torch.float64)
    for t, n in enumerate(names):
        if n is not None and path in dense[n]:
            out[t] = dense[n][path] @ x[t].double()
    return out


def serve(pool, names, x):
    """Acquire, run add_lora_ on every layer for a mixed batch, release; returns {path: delta [T, out]}."""
    with pool.use(names) as ids:
        batch = lk.LoRABatch(max(len(names), 1), pool.num_slots, x.device)
        batch.build(torch.tensor(ids, dtype=torch.int32, device=x.device))
        out = {}
        for paths, w in pool.layers:
            y = torch.zeros(x.shape[0], w.out_features, dtype=w.dtype, device=x.device)
            lk.add_lora_(y, x.to(w.dtype), w, batch)
            for p, c0, n in zip(paths, w.slice_cols, w.slice_outs):
                out[p] = y[:, c0 : c0 + n].double().cpu()
    return out


def check_serving(pool, dense, names, x, atol=1e-5):
    got = serve(pool, names, x)
    for p in OUTS:
        torch.testing.assert_close(got[p], expected_delta(dense, names, x.cpu(), p), rtol=1e-5, atol=atol,
                                   msg=lambda m, p=p: f"{p}: {m}")


def snapshot(pool):
    layers = [(w.a.clone(), w.b.clone(), w.offsets.clone(), w.ranks.clone(), w.scales.clone(), w.free_ranges)
              for _, w in pool.layers]
    return pool.names, pool.resident, {n: pool.refcount(n) for n in pool.names}, layers


def assert_same(s0, s1):
    assert s0[:3] == s1[:3]
    for l0, l1 in zip(s0[3], s1[3]):
        for t0, t1 in zip(l0[:5], l1[:5]):
            assert torch.equal(t0, t1)
        assert l0[5] == l1[5]


@pytest.fixture
def served_pool(tmp_path):
    """A pool with two adapters resident (ranks 4 and 8; the second only on layer 0 q_proj and the fused
    q/v), one of them referenced, plus its dense model."""
    pool = AdapterPool(make_layers())
    dense = {}
    _, dense["a"] = write_adapter(tmp_path / "a", 1, 4)
    _, dense["b"] = write_adapter(tmp_path / "b", 2, 8, modules=[
        "model.layers.0.self_attn.q_proj", FUSED[0], FUSED[2]], target_modules=["q_proj", "v_proj"])
    pool.load("a", tmp_path / "a")
    pool.load("b", tmp_path / "b")
    pool.acquire(["a"])
    return pool, dense, tmp_path


NAMES = ["a", None, "b", "a", "b", None, "a"]


def x_for(n, seed=0, device="cpu"):
    return torch.randn(n, IN, generator=torch.Generator().manual_seed(seed)).to(device)


# ---- the reader ------------------------------------------------------------------------------------------
def test_serves_dense_model(served_pool):
    pool, dense, _ = served_pool
    check_serving(pool, dense, NAMES, x_for(len(NAMES)))
    assert pool.slot_of("a") == 0 and pool.slot_of("b") == 1
    # b does not target o_proj or k_proj: rank 0 there (a zero delta), 1 zero row with scale 0 in the k slice.
    w = pool.layers[1][1]
    assert 1 not in w.loaded
    assert pool.layers[2][1].rank_of(1) == (8, 1, 8) and float(pool.layers[2][1].scales[1, 1]) == 0.0


def test_adapter_name_infix_and_prefixless_keys(tmp_path):
    _, dense = write_adapter(tmp_path / "a", 3, 4)
    st_ = safetensors_torch.load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / CONFIG_NAME).write_text((tmp_path / "a" / CONFIG_NAME).read_text())
    renamed = {k.replace(".weight", ".default.weight").replace("base_model.model.", "", 1 if i % 2 else 0): v
               for i, (k, v) in enumerate(st_.items())}
    safetensors_torch.save_file(renamed, str(tmp_path / "b" / WEIGHTS_NAME))
    h = read_peft_adapter(tmp_path / "b")
    assert sorted(h.modules) == sorted(OUTS)
    for p, (A, B, s) in h.modules.items():
        torch.testing.assert_close(s * B.double() @ A.double(), dense[p])
    # Two adapter names in one file: ambiguous unless adapter_name picks one.
    both = dict(renamed)
    both.update({k.replace(".default.", ".other."): v.clone() for k, v in renamed.items()})
    safetensors_torch.save_file(both, str(tmp_path / "b" / WEIGHTS_NAME))
    with pytest.raises(lk.AdapterFormatError, match="adapter_name"):
        read_peft_adapter(tmp_path / "b")
    assert sorted(read_peft_adapter(tmp_path / "b", adapter_name="other").modules) == sorted(OUTS)


def test_single_safetensors_file_with_config_argument(tmp_path):
    _, dense = write_adapter(tmp_path / "a", 4, 2, alpha=3.0)
    f = tmp_path / "solo.safetensors"
    f.write_bytes((tmp_path / "a" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(lk.AdapterFormatError, match=CONFIG_NAME):
        read_peft_adapter(f)
    cfg = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    h = read_peft_adapter(f, config=cfg)
    assert h.name == "solo" and h.modules[FUSED[1]][2] == 1.5


def test_rank_and_alpha_patterns_and_rslora(tmp_path):
    g = torch.Generator().manual_seed(5)
    facs = {p: (torch.randn(2 if "layers.1" in p else 4, IN, generator=g),
                torch.randn(OUTS[p], 2 if "layers.1" in p else 4, generator=g)) for p in OUTS}
    save_peft_adapter(tmp_path, facs, r=4, lora_alpha=8, rank_pattern={"layers.1.self_attn.q_proj": 2,
                      "layers.1.self_attn.k_proj": 2, "v_proj": 2}, alpha_pattern={"o_proj": 3}, use_rslora=True)
    h = read_peft_adapter(tmp_path)
    assert h.modules["model.layers.0.self_attn.q_proj"][2] == pytest.approx(8 / 2)
    assert h.modules["model.layers.0.self_attn.o_proj"][2] == pytest.approx(3 / 2)
    assert h.modules[FUSED[2]][2] == pytest.approx(8 / 2**0.5)


# ---- PEFT round trip -------------------------------------------------------------------------------------
def test_peft_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    base = transformers.LlamaForCausalLM(cfg).eval()
    patched = transformers.LlamaForCausalLM(cfg).eval()
    patched.load_state_dict(base.state_dict())
    specs = {
        "r4": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "mix": peft.LoraConfig(r=6, lora_alpha=4, target_modules=["q_proj", "o_proj", "down_proj"],
                               rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"o_proj": 5},
                               init_lora_weights=False),
        "rs": peft.LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["v_proj", "down_proj"],
                              init_lora_weights=False),
    }
    pm = None
    for seed, (name, c) in enumerate(specs.items()):
        torch.manual_seed(seed)
        if pm is None:
            pm = peft.get_peft_model(base, c, adapter_name=name)
        else:
            pm.add_adapter(name, c)
    pm.save_pretrained(str(tmp_path))  # one subdirectory per adapter name
    # Our writer's format is PEFT's: an adapter written by save_peft_adapter loads into PEFT too.
    g = torch.Generator().manual_seed(9)
    own = {f"model.layers.{i}.self_attn.q_proj": (torch.randn(3, 16, generator=g), torch.randn(16, 3, generator=g))
           for i in range(2)}
    save_peft_adapter(tmp_path / "own", own, r=3, lora_alpha=6)
    pm.load_adapter(str(tmp_path / "own"), adapter_name="own")
    names = list(specs) + ["own"]
    assert all((tmp_path / n / WEIGHTS_NAME).is_file() for n in names)

    for layer in patched.model.layers:
        for parent, attrs in ((layer.self_attn, ("q_proj", "v_proj", "o_proj")), (layer.mlp, ("down_proj",))):
            for a in attrs:
                lin = getattr(parent, a)
                setattr(parent, a, lk.nn.LoRALinear(lin, max_adapters=4, max_rank=8))
    pool = AdapterPool(patched)
    for n in names:
        pool.load(n, tmp_path / n)
    prompts = torch.randint(0, 40, (len(names), 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = []
        for n, p in zip(names, prompts):
            pm.set_adapter(n)
            want.append(pm(p[None]).logits[0])
        want = torch.stack(want)
        with pool.use(names) as ids:
            batch = lk.LoRABatch(prompts.numel(), 4)
            batch.build(torch.tensor(ids, dtype=torch.int32).repeat_interleave(prompts.shape[1]))
            with lk.use_batch(batch):
                got = patched(prompts).logits
        with pool.use([None] * len(names)) as ids:
            batch.build(torch.tensor(ids, dtype=torch.int32).repeat_interleave(prompts.shape[1]))
            with lk.use_batch(batch):
                plain = patched(prompts).logits
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-5 * scale
    assert (plain - want).abs().max().item() > 1e-3 * scale  # the adapters do change the output


# ---- malformed files: a specific error, the pool unchanged and still serving ----------------------------------
class _Boom:
    unpickled = []

    def __reduce__(self):
        return (_Boom.unpickled.append, ("unpickled!",))


def _truncated(d):
    write_adapter(d, 7, 4)
    f = d / WEIGHTS_NAME
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return d


def _garbage(d):
    write_adapter(d, 7, 4)
    (d / WEIGHTS_NAME).write_bytes(b"\x00" * 64)
    return d


def _edit(d, fn, **cfg):
    write_adapter(d, 7, 4, **cfg)
    t = safetensors_torch.load_file(str(d / WEIGHTS_NAME))
    fn(t)
    safetensors_torch.save_file(t, str(d / WEIGHTS_NAME))
    return d


def _cfg(d, **changes):
    write_adapter(d, 7, 4)
    c = json.loads((d / CONFIG_NAME).read_text())
    c.update(changes)
    (d / CONFIG_NAME).write_text(json.dumps(c))
    return d


def _pickle_dir(d):
    d.mkdir()
    (d / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (d / "adapter_model.bin").write_bytes(pickle.dumps(_Boom()))
    return d


def _pickle_file(d):
    d.mkdir()
    (d / "adapter_model.bin").write_bytes(pickle.dumps(_Boom()))
    return d / "adapter_model.bin"


K0 = "base_model.model.model.layers.0.self_attn.q_proj"
MALFORMED = {
    "truncated": (_truncated, lk.AdapterFormatError, "readable safetensors"),
    "not_safetensors": (_garbage, lk.AdapterFormatError, "readable safetensors"),
    "missing_lora_B": (lambda d: _edit(d, lambda t: t.pop(K0 + ".lora_B.weight")), lk.AdapterFormatError,
                       "missing key lora_B"),
    "missing_module": (lambda d: _edit(d, lambda t: [t.pop(K0 + f".lora_{x}.weight") for x in "AB"]),
                       lk.AdapterFormatError, "missing keys"),
    "extra_module": (lambda d: _edit(d, lambda t: t.update({
        "base_model.model.model.layers.9.mlp.up_proj.lora_A.weight": torch.zeros(4, IN),
        "base_model.model.model.layers.9.mlp.up_proj.lora_B.weight": torch.zeros(8, 4)})),
        lk.AdapterFormatError, "extra key"),
    "wrong_in_features": (lambda d: _edit(d, lambda t: t.update({K0 + ".lora_A.weight": torch.zeros(4, IN + 1)})),
                          lk.AdapterFormatError, r"expected shape \(4, 16\)"),
    "wrong_out_features": (lambda d: _edit(d, lambda t: t.update({K0 + ".lora_B.weight": torch.zeros(15, 4)})),
                           lk.AdapterFormatError, r"expected shape \(16, 4\)"),
    "rank_mismatch": (lambda d: _edit(d, lambda t: t.update({K0 + ".lora_B.weight": torch.zeros(16, 3)})),
                      lk.AdapterFormatError, "rank of lora_A"),
    "rank_vs_config": (lambda d: _cfg(d, r=5), lk.AdapterFormatError, "expected rank 5"),
    "rank_above_capacity": (lambda d: write_adapter(d, 7, 16)[0], lk.AdapterFormatError, "max_rank"),
    "alpha_0": (lambda d: write_adapter(d, 7, 4, alpha=0.0)[0], lk.AdapterFormatError, "alpha"),
    "nan": (lambda d: _edit(d, lambda t: t[K0 + ".lora_A.weight"].__setitem__((1, 2), float("nan"))),
            lk.AdapterFormatError, "finite"),
    "inf": (lambda d: _edit(d, lambda t: t[K0 + ".lora_B.weight"].__setitem__((0, 0), float("inf"))),
            lk.AdapterFormatError, "finite"),
    "pickle_dir": (_pickle_dir, lk.AdapterFormatError, "never loaded"),
    "pickle_file": (_pickle_file, lk.AdapterFormatError, "never loaded"),
    "dora": (lambda d: _cfg(d, use_dora=True), lk.UnsupportedAdapterError, "DoRA"),
    "dora_key": (lambda d: _edit(d, lambda t: t.update({K0 + ".lora_magnitude_vector": torch.ones(16)})),
                 lk.UnsupportedAdapterError, "DoRA"),
    "lora_bias": (lambda d: _cfg(d, lora_bias=True), lk.UnsupportedAdapterError, "bias"),
    "bias_all": (lambda d: _cfg(d, bias="all"), lk.UnsupportedAdapterError, "bias"),
    "unknown_option": (lambda d: _cfg(d, use_fancy_new_lora=True), lk.UnsupportedAdapterError, "unknown option"),
    "not_lora": (lambda d: _cfg(d, peft_type="IA3"), lk.UnsupportedAdapterError, "LORA"),
    "bad_json": (lambda d: (_cfg(d), (d / CONFIG_NAME).write_text("{nope"))[0], lk.AdapterFormatError, "JSON"),
    "no_file": (lambda d: d / "nothing_here", lk.AdapterFormatError, "existing"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_adapter_refused_pool_unchanged(served_pool, case):
    pool, dense, tmp = served_pool
    make, exc, match = MALFORMED[case]
    src = make(tmp / f"bad_{case}")
    x = x_for(len(NAMES), 1)
    before = snapshot(pool)
    _Boom.unpickled.clear()
    with pytest.raises(exc, match=match):
        pool.load("bad", src)
    assert not _Boom.unpickled, "a pickle was loaded"
    assert "bad" not in pool
    assert_same(before, snapshot(pool))
    check_serving(pool, dense, NAMES, x)


def test_unknown_option_at_default_is_accepted(tmp_path):
    d = _cfg(tmp_path / "a", use_fancy_new_lora=None, some_new_dict={})
    assert read_peft_adapter(d).modules


def test_fp16_overflow_refused(tmp_path):
    pool = AdapterPool(make_layers(dtype=torch.float16))
    d = _edit(tmp_path / "a", lambda t: t[K0 + ".lora_B.weight"].__setitem__((0, 0), 1e6))
    with pytest.raises(lk.AdapterFormatError, match="after conversion"):
        pool.load("a", d)
    assert len(pool) == 0 and all(not w.loaded for _, w in pool.layers)


def test_row_budget_refused(tmp_path):
    pool = AdapterPool(make_layers(), capacity_rows=6)
    with pytest.raises(lk.AdapterFormatError, match="capacity_rows"):
        pool.load("a", write_adapter(tmp_path / "a", 1, 8)[0])
    assert pool.load("b", write_adapter(tmp_path / "b", 1, 6)[0]) == 0


def test_full_pool_in_use_and_release_errors(tmp_path):
    pool = AdapterPool(make_layers(n_slots=2))
    dense = {}
    for i, n in enumerate("abc"):
        _, dense[n] = write_adapter(tmp_path / n, 10 + i, 2 + i)
        pool.register(n, tmp_path / n)
    pool.acquire(["a", "b"])
    before = snapshot(pool)
    with pytest.raises(PoolFullError):
        pool.acquire(["c"])
    with pytest.raises(PoolFullError):
        pool.load("c")
    with pytest.raises(AdapterInUseError):
        pool.evict("a")
    with pytest.raises(AdapterInUseError):
        pool.unload("a")
    with pytest.raises(ValueError, match="at most 1 releases"):
        pool.release(["b", "b"])
    with pytest.raises(KeyError):
        pool.acquire(["a", "zzz"])
    with pytest.raises(ValueError, match="already registered"):
        pool.register("a", tmp_path / "a")
    assert_same(before, snapshot(pool))
    check_serving(pool, dense, ["a", "b", None], x_for(3))
    pool.release(["b"])
    assert pool.load("a") == 0 and pool.acquire(["c"]) == [1]  # b, now unreferenced, was evicted for c
    assert pool.slot_of("b") is None and pool.stats.evictions == 1
    check_serving(pool, dense, ["c", "a", "c"], x_for(3, 2))


def test_lru_order_and_stats(tmp_path):
    pool = AdapterPool(make_layers(n_slots=2))
    for i, n in enumerate("abc"):
        pool.register(n, write_adapter(tmp_path / n, 20 + i, 2)[0])
    for names in (["a"], ["b"], ["a", "a"], ["c"]):  # a more recent than b: b is the LRU victim for c
        pool.acquire(names)
        pool.release(names)
    assert set(pool.resident) == {"a", "c"}
    s = pool.stats
    assert (s.hits, s.misses, s.stalls, s.evictions, s.loads) == (1, 3, 0, 1, 3)
    assert s.hit_rate == pytest.approx(0.25)


def test_load_many_progress_and_rollback(tmp_path, capsys):
    pool = AdapterPool(make_layers(n_slots=2))
    srcs = {n: write_adapter(tmp_path / n, 30 + i, 2)[0] for i, n in enumerate("abc")}
    pool.load_many(srcs, resident=True)
    assert pool.names == list("abc") and list(pool.resident) == ["a", "b"]
    assert "adapters" in capsys.readouterr().err  # the tqdm bar
    srcs2 = {"d": write_adapter(tmp_path / "d", 40, 2)[0], "e": _truncated(tmp_path / "e")}
    with pytest.raises(lk.AdapterFormatError):
        pool.load_many(srcs2, progress=False)
    assert pool.names == list("abc")


# ---- churn ---------------------------------------------------------------------------------------------
_CHURN = {}


def _churn_files():
    if not _CHURN:
        import atexit
        import pathlib
        import shutil
        import tempfile

        d = tempfile.mkdtemp(prefix="lk_pool_churn_")
        atexit.register(shutil.rmtree, d, True)

        for i, r in enumerate((2, 3, 5, 6, 8, 4)):
            mods = list(OUTS) if i % 2 == 0 else ["model.layers.0.self_attn.o_proj", FUSED[1]]
            _CHURN[f"n{i}"] = write_adapter(pathlib.Path(d) / f"n{i}", 100 + i, r, modules=mods)
    return _CHURN


def _churn_pool():
    """(files, pool, dense): the churn adapters registered in a pool of 3 slots and 12 rows per layer (ranks 2..8
    force evictions and fragmented free lists), and each adapter's dense reference by name."""
    files = _churn_files()
    pool = AdapterPool(make_layers(n_slots=3, capacity_rows=12))
    for n, (d, _) in files.items():
        pool.register(n, d)
    return files, pool, {n: v for n, (_, v) in files.items()}


OPS = st.lists(st.tuples(st.sampled_from(["acquire", "release", "prefetch", "evict", "serve", "unload"]),
                         st.integers(0, 5), st.integers(0, 3)), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_churn_never_evicts_referenced_never_serves_stale(ops):
    files, pool, dense = _churn_pool()
    held = []  # (name, slot at acquire)
    x = x_for(6, 3)
    for op, i, j in ops:
        n = f"n{i}"
        if n not in pool:
            pool.register(n, files[n][0])
        if op == "acquire":
            try:
                (slot,) = pool.acquire([n])
                held.append((n, slot))
            except PoolFullError:
                assert len({h for h, _ in held}) >= 1
        elif op == "release" and held:
            name, _ = held.pop(j % len(held))
            pool.release([name])
        elif op == "prefetch":
            try:
                pool.prefetch(n)
            except PoolFullError:
                assert held
        elif op in ("evict", "unload"):
            refs = sum(h == n for h, _ in held)
            if refs:
                with pytest.raises(AdapterInUseError):
                    getattr(pool, op)(n)
            else:
                getattr(pool, op)(n)
        elif op == "serve":
            names = [h for h, _ in held][:4] + [None]
            names += [names[k % len(names)] for k in range(j)]
            check_serving(pool, dense, names, x[: len(names)] if len(names) <= 6 else x_for(len(names)))
        for h, slot in held:  # a referenced adapter keeps its slot
            assert pool.slot_of(h) == slot and pool.refcount(h) >= 1
        res = pool.resident
        assert len(set(res.values())) == len(res) <= 3
        for _, w in pool.layers:  # the pool's bookkeeping matches the layers': no leaked rows or slots
            assert w.free_rows + sum(w.rows_of(s)[1] for s in w.loaded) == w.capacity_rows
            assert set(w.loaded) <= set(res.values())
    if held:
        names = [h for h, _ in held][:6]
        check_serving(pool, dense, names, x[: len(names)])


def test_threads_load_evict_while_serving(tmp_path):
    files, pool, dense = _churn_pool()
    errors, stop = [], threading.Event()

    def churner():
        rnd = random.Random(1)
        while not stop.is_set():
            n = f"n{rnd.randrange(6)}"
            try:
                (pool.evict if rnd.random() < 0.5 else pool.prefetch)(n)
            except (AdapterInUseError, PoolFullError):
                pass
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

    def server(seed):
        rnd = random.Random(seed)
        try:
            for _ in range(15):
                names = [f"n{rnd.randrange(6)}" for _ in range(2)] + [None]
                try:
                    check_serving(pool, dense, names, x_for(3, seed))
                except PoolFullError:
                    pass
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=churner)] + [threading.Thread(target=server, args=(s,)) for s in (1, 2)]
    for t in ts:
        t.start()
    for t in ts[1:]:
        t.join()
    stop.set()
    ts[0].join()
    assert not errors, errors
    assert all(pool.refcount(n) == 0 for n in pool.names)
    assert pool.stats.evictions > 0


# ---- CUDA: pinned host copies, side-stream prefetch, events -------------------------------------------------
@pytest.mark.cuda
def test_cuda_prefetch_side_stream_events(tmp_path):
    pool = AdapterPool(make_layers(n_slots=2, dtype=torch.float32, device="cuda"))
    dense = {}
    for i, n in enumerate("abc"):
        _, dense[n] = write_adapter(tmp_path / n, 50 + i, 4)
        pool.register(n, tmp_path / n)
    e = pool._entries["a"]
    assert all(t.is_pinned() for p in e.parts.values() for t in p.A + p.Bt)
    side = pool._side_stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # keep the side stream busy: the copy of a is still queued
    pool.prefetch("a")
    assert e.ready is not None and not e.ready.query()
    x = x_for(4, device="cuda")
    check_serving(pool, dense, ["a", None, "a", "a"], x)  # waits on a's event only (no host sync needed)
    assert pool.stats.stalls == 1
    torch.cuda.synchronize()
    check_serving(pool, dense, ["a", "a", None, None], x)
    assert pool.stats.hits == 1


@pytest.mark.cuda
def test_cuda_rows_not_reused_before_inflight_batch_finishes(tmp_path):
    """A batch still running on the GPU keeps reading its adapter's rows even after release + eviction: the
    new adapter's copy into the same rows waits on the side stream for the release event."""
    pool = AdapterPool(make_layers(n_slots=1, dtype=torch.float32, device="cuda"))
    dense = {}
    for i, n in enumerate("ab"):
        _, dense[n] = write_adapter(tmp_path / n, 60 + i, 8)
        pool.register(n, tmp_path / n)
    x = x_for(5, 4, device="cuda")
    ids = pool.acquire(["a"] * 5)
    batch = lk.LoRABatch(5, 1, "cuda")
    batch.build(torch.tensor(ids, dtype=torch.int32, device="cuda"))
    torch.cuda._sleep(300_000_000)  # the batch below starts only after this
    outs = {}
    for paths, w in pool.layers:
        y = torch.zeros(5, w.out_features, device="cuda")
        lk.add_lora_(y, x, w, batch)
        outs[paths] = y
    pool.release(["a"] * 5)
    assert pool.acquire(["b"]) == [0]  # evicts a, reuses its slot and rows
    torch.cuda.synchronize()
    for paths, w in pool.layers:
        y = outs[paths]
        for p, c0, n in zip(paths, w.slice_cols, w.slice_outs):
            want = expected_delta(dense, ["a"] * 5, x.cpu(), p)
            torch.testing.assert_close(y[:, c0 : c0 + n].double().cpu(), want, rtol=1e-5, atol=1e-5)
    pool.release(["b"])
    check_serving(pool, dense, ["b", None], x[:2])


# ---- the LoRAWeights helpers the pool uses ---------------------------------------------------------------------
def test_weights_free_ranges_rows_of_non_blocking():
    g = torch.Generator().manual_seed(7)
    fac = [(torch.randn(r, 8, generator=g), torch.randn(8, r, generator=g)) for r in (4, 2, 3)]
    w1 = lk.LoRAWeights(8, 8, 3, 4, capacity_rows=10, dtype=torch.float32)
    w2 = lk.LoRAWeights(8, 8, 3, 4, capacity_rows=10, dtype=torch.float32)
    for w, nb in ((w1, False), (w2, True)):
        for i, (A, B) in enumerate(fac[:2]):
            w.add(A, B, alpha=3.0, adapter_id=i, non_blocking=nb)
        w.remove(0)
        w.add(*fac[2], scale=0.7, adapter_id=2, non_blocking=nb)
    assert w1.free_ranges == [(3, 1), (6, 4)] and w1.rows_of(1) == (4, 2) and w1.rows_of(2) == (0, 3)
    with pytest.raises(ValueError, match="loaded adapter"):
        w1.rows_of(0)
    w1.free_ranges.clear()  # a copy: the allocator is untouched
    assert w1.free_rows == 5
    for t1, t2 in ((w1.a, w2.a), (w1.b, w2.b), (w1.ranks, w2.ranks), (w1.scales, w2.scales), (w1.offsets, w2.offsets)):
        assert torch.equal(t1, t2)
    assert w1.ranks[0].tolist() == [0, 2, 3] and w1.scales[0].tolist() == [0.0, 1.5, pytest.approx(0.7)]


def test_gpt2_fan_in_fan_out_adapter_matches_peft(tmp_path):
    """GPT-2's Conv1D: fan_in_fan_out transposes only the base weight; the factors load as for nn.Linear."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50,
                                                             n_positions=16, bos_token_id=0, eos_token_id=0))
    pm = peft.get_peft_model(m, peft.LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn"], fan_in_fan_out=True,
                                                init_lora_weights=False))
    pm.save_pretrained(str(tmp_path))
    path = "transformer.h.0.attn.c_attn"
    pool = AdapterPool({path: lk.LoRAWeights(16, 48, 2, 4, dtype=torch.float32)})
    slot = pool.load("g", tmp_path)
    x = torch.randn(5, 16)
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        want = layer(x) - layer.base_layer(x)
        batch = lk.LoRABatch(5, 2)
        batch.build(torch.full((5,), slot, dtype=torch.int32))
        got = torch.zeros(5, 48)
        lk.add_lora_(got, x, pool.layers[0][1], batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_model_with_fused_lora_linear_and_lora_config(tmp_path):
    peft = pytest.importorskip("peft")

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = lk.nn.LoRALinear(torch.nn.Linear(IN, 32), lk.LoRAWeights(IN, [16, 8, 8], 3, 8,
                                                                                 dtype=torch.float32))
            self.o_proj = lk.nn.LoRALinear(torch.nn.Linear(IN, 12), max_adapters=3, max_rank=8)

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([Attn()])
    with pytest.raises(ValueError, match="lora_slice_names"):
        AdapterPool(model)
    model.model.layers[0].qkv.lora_slice_names = ("q_proj", "k_proj", "v_proj")
    pool = AdapterPool(model)
    assert [p for p, _ in pool.layers] == [("model.layers.0.q_proj", "model.layers.0.k_proj", "model.layers.0.v_proj"),
                                           ("model.layers.0.o_proj",)]
    g = torch.Generator().manual_seed(3)
    facs = {f"model.layers.0.{n}": (torch.randn(4, IN, generator=g), torch.randn(o, 4, generator=g))
            for n, o in (("q_proj", 16), ("v_proj", 8), ("o_proj", 12))}
    save_peft_adapter(tmp_path, facs, r=4, lora_alpha=2)
    cfg = peft.LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj", "o_proj"])  # enum, set inside
    slot = pool.load("a", tmp_path / WEIGHTS_NAME, config=cfg)
    w = pool.layers[0][1]
    assert w.rank_of(slot) == (4, 1, 4)
    A, B, s = w.adapter(slot, 2)
    torch.testing.assert_close(s * B @ A, 0.5 * facs["model.layers.0.v_proj"][1] @ facs["model.layers.0.v_proj"][0])
    with pytest.raises(TypeError, match="LoRAWeights"):
        AdapterPool({"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="one module path per slice"):
        AdapterPool({"x": lk.LoRAWeights(IN, [4, 4], 2, 2)})


def test_layers_to_transform_is_not_a_missing_key(tmp_path):
    """With layers_to_transform, target_modules names modules of some layers only: no 'missing keys'."""
    write_adapter(tmp_path / "a", 8, 2, modules=["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"],
                  target_modules=["q_proj", "o_proj"])
    pool = AdapterPool(make_layers())
    with pytest.raises(lk.AdapterFormatError, match="missing keys"):
        pool.load("a", tmp_path / "a")
    c = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    c["layers_to_transform"] = [0]
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(c))
    assert pool.load("a", tmp_path / "a") == 0
