"""Fuzz of adapter files (hypothesis, bounded and deterministic): start from a valid adapter written by the
library's writer for a tiny model, mutate it, and check each example: it loads and serves exactly what PEFT's
rules say, or it raises AdapterFormatError / UnsupportedAdapterError whose message names the file (and the
config field), the pool unchanged and still serving.

* config mutations (random JSON types and values, deleted / renamed / duplicated keys, truncated or corrupted
  text) run here, in-process;
* corrupted safetensors bytes and crafted regex patterns could crash or hang the process that reads them:
  they run in a subprocess with a timeout (tests/fuzz_adapter_subprocess.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter_files import (OUTS, assert_same, check_serving, dense_reference, make_pool, peft_scale, snapshot,
                           write_base)
from lora_kernels.peft_format import CONFIG_NAME, WEIGHTS_NAME, AdapterFormatError

pytest.importorskip("safetensors")

SETTINGS = dict(max_examples=60, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))

# ---- strategies ----------------------------------------------------------------------------------------------------
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 10),
                     st.sampled_from([0, 2, 4, -1, 2**31, 10**20, 10**400, -(10**400)]),
                     st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e39, 1e-50, 1e308]),
                     st.text(max_size=6))
_json = st.recursive(_scalars, lambda ch: st.one_of(st.lists(ch, max_size=3),
                                                    st.dictionaries(st.text(max_size=5), ch, max_size=3)),
                     max_leaves=8)
# Pattern keys `re` matches quickly (the oracle uses `re`); crafted slow ones are in the subprocess phase.
_keys = st.sampled_from(["q_proj", "v_proj", "self_attn.q_proj", r"layers\.0\..*", ".*", "(q|v)_proj", "x",
                         "layers.0.self_attn.v_proj", "[", "(", "a{2,1}", "[[:alpha:]]"])
# Values mostly valid (rank 2 is the file's), so that several matching keys reach the "first key wins" rule.
_rank_dict = st.dictionaries(_keys, st.integers(0, 3).flatmap(
    lambda i: st.just(2) if i < 2 else st.sampled_from([3, 2.0, True]) if i == 2 else _scalars), max_size=3)
_alpha_dict = st.dictionaries(_keys, st.integers(0, 3).flatmap(
    lambda i: st.sampled_from([1.5, 3, -2.0, 6]) if i < 3 else _scalars), max_size=3)
_FIELDS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules", "use_rslora",
           "fan_in_fan_out", "bias", "peft_type", "use_dora", "lora_dropout", "layers_to_transform",
           "modules_to_save", "task_type"]
_MATHS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora"]  # drawn twice as often
_plausible = {
    "r": st.sampled_from([2, 2, 3, 8, 2.0, 2.5, True, "2"]),
    "lora_alpha": st.one_of(st.sampled_from([4, 1.5, -2, 1e39]), _scalars),
    "rank_pattern": _rank_dict, "alpha_pattern": _alpha_dict,
    "target_modules": st.one_of(st.lists(st.sampled_from(["q_proj", "v_proj", "k_proj"]), max_size=3), _keys),
    "exclude_modules": st.one_of(st.lists(st.sampled_from(["q_proj", "k_proj"]), max_size=2), _keys),
    "use_rslora": st.booleans(), "bias": st.sampled_from(["none", "all", None]),
}
# Weights by a drawn index (one_of flattens identical branches, so repeating one would not weight it).
_field = st.integers(0, 4).flatmap(lambda i: st.sampled_from(_FIELDS + _MATHS) if i < 4 else
                                   st.text(min_size=1, max_size=6))


@st.composite
def _set(draw):
    k = draw(_field)
    return ("set", k, draw(st.one_of(_plausible.get(k, _json), _json)))


_mutation = st.integers(0, 4).flatmap(lambda i: [
    _set(), _set(), _set(),
    st.tuples(st.just("del"), st.sampled_from(_FIELDS)),
    st.tuples(st.just("rename"), st.sampled_from(_FIELDS), st.sampled_from(_FIELDS + ["lora_alpha_", "R", "x"]))][i])
# At most one edit of the raw text per example (most of them break the JSON, which says little more each time).
_raw_mutation = st.integers(0, 7).flatmap(lambda i: [
    st.none(), st.none(), st.none(), st.none(), st.none(),
    st.tuples(st.just("dup"), st.sampled_from(_FIELDS), _scalars),  # the key twice in one object
    st.tuples(st.just("truncate"), st.integers(0, 300)),
    st.tuples(st.just("byte"), st.integers(0, 300), st.integers(0, 255))][i])


# Two keys match v_proj: PEFT takes the first (3.0); q_proj only matches the second.
BASE_ALPHA_PATTERN = {"v_proj": 3.0, ".*_proj": 5.0}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A pool holding one referenced valid adapter, and its dense reference."""
    d = write_base(tmp_path_factory.mktemp("good") / "good", seed=21, alpha_pattern=BASE_ALPHA_PATTERN)
    pool = make_pool()
    pool.load("good", d)
    pool.acquire(["good"])
    return pool, dense_reference(d), tmp_path_factory.mktemp("fuzz")


def _apply(cfg: dict, mutations):
    """(config text bytes, keys touched) after the mutations."""
    touched = set()
    raw_ops = []
    for m in mutations:
        if m[0] == "set":
            cfg[m[1]] = m[2]
            touched.add(m[1])
        elif m[0] == "del":
            cfg.pop(m[1], None)
            touched.add(m[1])
        elif m[0] == "rename" and m[1] in cfg:
            cfg[m[2]] = cfg.pop(m[1])
            touched |= {m[1], m[2]}
        else:
            raw_ops.append(m)
    text = json.dumps(cfg).encode()
    for m in raw_ops:
        if m[0] == "dup":
            text = text[:-1] + b", " + json.dumps({m[1]: m[2]}).encode()[1:]
            touched.add(m[1])
        elif m[0] == "truncate":
            text = text[: m[1]]
        elif m[0] == "byte" and m[1] < len(text):
            text = text[: m[1]] + bytes([m[2]]) + text[m[1] + 1 :]
    return text, touched, bool(raw_ops)


@settings(**SETTINGS)
@given(rslora=st.booleans(), mutations=st.lists(_mutation, min_size=1, max_size=3), raw_edit=_raw_mutation)
def test_fuzz_config_mutations(served, rslora, mutations, raw_edit):
    pool, good_dense, root = served
    d = root / f"ex{len(os.listdir(root))}"
    write_base(d, seed=22, alpha_pattern=BASE_ALPHA_PATTERN, use_rslora=rslora)
    mutations = mutations + ([raw_edit] if raw_edit else [])
    text, touched, raw = _apply(json.loads((d / CONFIG_NAME).read_text()), mutations)
    (d / CONFIG_NAME).write_bytes(text)
    before = snapshot(pool)
    try:
        pool.load("bad", d)
    except AdapterFormatError as e:
        msg = str(e)
        assert len(msg) < 2000, msg[:300]
        assert "bad" not in pool
        assert_same(before, snapshot(pool))
        cfg_file = str(d / CONFIG_NAME)
        if msg.startswith(cfg_file):  # a config error names the field that is wrong (or the JSON problem)
            assert raw or any(repr(k)[1:-1] in msg or k in msg for k in touched), (mutations, msg)
        else:  # a config that is valid but disagrees with the weights (rank), or a rank above capacity
            assert msg.startswith(str(d / WEIGHTS_NAME)) or msg.startswith(str(d)), msg
    else:
        # It loaded: the values PEFT's maths uses are unambiguous (what PEFT would build an nn.Linear / scaling
        # from), and the pool serves exactly PEFT's scale (on the JSON as PEFT parses it) times the file's factors.
        cfg = json.loads(text)
        assert_unambiguous(cfg)
        dense = dense_reference(d, cfg)
        w = dict(pool.layers)
        slot = pool.slot_of("bad")
        for paths, lw in pool.layers:
            for s, p in enumerate(paths):
                assert float(lw.scales[s, slot]) == pytest.approx(peft_scale(cfg, p), rel=1e-6), (p, cfg)
        assert w and set(dense) == set(OUTS)
        check_serving(pool, {"good": good_dense, "bad": dense}, ["bad", None, "good", "bad"])
        pool.unload("bad")
    check_serving(pool, {"good": good_dense}, ["good", None])


def assert_unambiguous(cfg: dict) -> None:
    """An accepted config holds plain values: integer ranks >= 1, finite nonzero real alphas, true/false flags."""
    def is_int(v):
        return type(v) is int and v >= 1

    def is_real(v):
        return type(v) in (int, float) and v == v and abs(v) != float("inf") and v != 0

    assert is_int(cfg.get("r", 8)) and is_real(cfg.get("lora_alpha", 8)), cfg
    assert all(is_int(v) for v in (cfg.get("rank_pattern") or {}).values()), cfg
    assert all(is_real(v) for v in (cfg.get("alpha_pattern") or {}).values()), cfg
    assert all(cfg.get(k) in (None, True, False) for k in ("use_rslora", "fan_in_fan_out")), cfg


# ---- corrupted safetensors bytes and crafted patterns, in a subprocess -----------------------------------------
@pytest.mark.parametrize("phase", ["bytes", "patterns"])
def test_fuzz_in_subprocess(tmp_path, phase):
    script = Path(__file__).parent / "fuzz_adapter_subprocess.py"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), phase], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")})
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["examples"] == 60 and counts["refused"] > 0 and counts["loaded"] > 0, counts
    assert counts["max_seconds"] < 3.0, counts  # every example bounded (slow patterns are cut, see the script)
    assert wall < 40, wall  # imports included; the 60 s timeout is the hang guard
