"""Adapter files: every malformed config, pattern, dtype, size, key or path is refused with AdapterFormatError /
UnsupportedAdapterError whose message names the file and the field, the pool is unchanged and still serves;
duplicate module definitions are refused; patterns keep PEFT's semantics and are matched in bounded time (the
slow ones in a subprocess with a timeout); nothing is read before the header and shapes are checked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from adapter_files import (IN, MAX_RANK, OUTS, PREFIX, Q, V, assert_same, check_serving, dense_reference,
                           edit_config, get_pattern_key, make_pool, read_st, snapshot, write_base, write_st)
from lora_kernels import _peft_patterns as pat
from lora_kernels.peft_format import (CONFIG_NAME, MAX_CONFIG_BYTES, WEIGHTS_NAME, AdapterConfig, AdapterFormatError,
                                      UnsupportedAdapterError, read_peft_adapter)

pytest.importorskip("safetensors")
peft_other = pytest.importorskip("peft.utils.other")

FMT, UNSUP = AdapterFormatError, UnsupportedAdapterError
CFG, ST = "cfg", "st"  # which file the message must name


# ---- makers: each writes a broken adapter into a fresh directory d and returns the path to load -----------------
def cfg_set(**changes):
    return lambda d: edit_config(write_base(d), lambda c: c.update(changes))


def cfg_text(text):
    def make(d):
        write_base(d)
        (d / CONFIG_NAME).write_bytes(text if isinstance(text, bytes) else text.encode())
        return d
    return make


def cfg_raw_field(key, raw):
    """Set ``key`` to a raw JSON token (NaN, 1e400, 10**400 digits...) by editing the text."""
    def make(d):
        write_base(d)
        c = json.loads((d / CONFIG_NAME).read_text())
        c[key] = "@@"
        (d / CONFIG_NAME).write_text(json.dumps(c).replace('"@@"', raw))
        return d
    return make


def st_edit(fn):
    """Edit the weights file's (header dict, data bytearray) and rewrite it with a correct header length."""
    def make(d):
        write_base(d)
        h, data = read_st(d / WEIGHTS_NAME)
        data = bytearray(data)
        out = fn(h, data)
        write_st(d / WEIGHTS_NAME, h, bytes(data) if out is None else out)
        return d
    return make


def st_bytes(fn):
    """Replace the weights file's bytes with fn(bytes)."""
    def make(d):
        write_base(d)
        f = d / WEIGHTS_NAME
        f.write_bytes(fn(f.read_bytes()))
        return d
    return make


def st_header_raw(fn):
    """Rewrite the header as raw bytes fn(header_json_bytes) (its declared length follows)."""
    def make(d):
        write_base(d)
        h, data = read_st(d / WEIGHTS_NAME)
        write_st(d / WEIGHTS_NAME, fn(json.dumps(h).encode()), data)
        return d
    return make


def tensors(fn, **cfg):
    """Rewrite the weights with safetensors after fn(dict of tensors) (a structurally valid file)."""
    from safetensors.torch import load_file, save_file

    def make(d):
        write_base(d, **cfg)
        t = load_file(str(d / WEIGHTS_NAME))
        fn(t)
        save_file(t, str(d / WEIGHTS_NAME))
        return d
    return make


KA, KB = f"{PREFIX}{Q}.lora_A.weight", f"{PREFIX}{Q}.lora_B.weight"
KVA = f"{PREFIX}{V}.lora_A.weight"


def _first(h):
    """The tensor whose data starts the buffer."""
    return min((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])


def _two_names(t):
    renamed = {k.replace(".weight", f".{n}.weight"): v.clone() for k, v in t.items() for n in ("one", "two")}
    t.clear()
    t.update(renamed)


def _shift(h, key, delta):
    h[key]["data_offsets"] = [h[key]["data_offsets"][0] + delta, h[key]["data_offsets"][1] + delta]


def _symlink_loop(d, name):
    write_base(d)
    (d / name).unlink()
    os.symlink(d / name, d / name)
    return d


def _fifo(d, name):
    write_base(d)
    (d / name).unlink()
    os.mkfifo(d / name)
    return d


def _dir_at(d, name):
    write_base(d)
    (d / name).unlink()
    (d / name).mkdir()
    return d


def _sparse_config(d):
    write_base(d)
    with open(d / CONFIG_NAME, "r+b") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)
    return d


def _nested(depth):
    return "[" * depth + "]" * depth


CASES = {
    # ---- the config file itself ---------------------------------------------------------------------------------
    "config_file": {
        "not_utf8": (cfg_text(b'{"r": 2, "lora_alpha": 4, "task_type": "\xff\xfe"}'), FMT, CFG, "UTF-8"),
        "truncated": (cfg_text('{"r": 2, "lora_alpha": 4, "target_mod'), FMT, CFG, "JSON"),
        "empty": (cfg_text(b""), FMT, CFG, "JSON"),
        "nested_too_deep": (cfg_text('{"r": 2, "lora_alpha": 4, "x": ' + _nested(100_000) + "}"), FMT, CFG,
                            "nested too deeply"),
        "duplicate_key": (cfg_text('{"r": 2, "lora_alpha": 4, "r": 4}'), FMT, CFG, "'r': expected distinct keys"),
        "int_of_5000_digits": (cfg_text('{"r": 2, "lora_alpha": 1' + "0" * 5000 + "}"), FMT, CFG, "JSON"),
        "not_an_object": (cfg_text("[2, 4]"), FMT, CFG, "expected a JSON object"),
        "utf8_bom": (cfg_text(b'\xef\xbb\xbf{"r": 2, "lora_alpha": 4}'), FMT, CFG, "JSON"),
        "missing": (lambda d: ((write_base(d) / CONFIG_NAME).unlink(), d)[1], FMT, "dir", CONFIG_NAME),
        "directory": (lambda d: _dir_at(d, CONFIG_NAME), FMT, CFG, "got a directory"),
        "fifo": (lambda d: _fifo(d, CONFIG_NAME), FMT, CFG, "got a FIFO"),  # reading would block forever
        "symlink_loop": (lambda d: _symlink_loop(d, CONFIG_NAME), FMT, CFG, "symlink loop"),
        "dangling_symlink": (lambda d: ((write_base(d) / CONFIG_NAME).unlink(),
                                        os.symlink(d / "gone.json", d / CONFIG_NAME), d)[2], FMT, CFG, "nothing there"),
        "too_big": (_sparse_config, FMT, CFG, f"at most {MAX_CONFIG_BYTES} bytes"),
    },
    # ---- config fields of the wrong type or out of range ---------------------------------------------------------
    "config_fields": {
        **{f"r={v!r}": (cfg_set(r=v), FMT, CFG, ": r: ") for v in ("8", True, 8.5, -1, 0, 10**20, None, [8])},
        "r=10**400": (cfg_raw_field("r", "1" + "0" * 400), FMT, CFG, ": r: "),
        **{f"lora_alpha={v!r}": (cfg_set(lora_alpha=v), FMT, CFG, ": lora_alpha: ")
           for v in ("x", True, 0, None, {}, float("nan"), float("inf"), -float("inf"))},
        "lora_alpha=1e400": (cfg_raw_field("lora_alpha", "1e400"), FMT, CFG, ": lora_alpha: "),  # parses as inf
        "lora_alpha=10**400": (cfg_raw_field("lora_alpha", "1" + "0" * 400), FMT, CFG, "lora_alpha: .*overflows"),
        **{f"rank_pattern={v!r}": (cfg_set(rank_pattern=v), FMT, CFG, "rank_pattern")
           for v in ([], "x", 5, {"q_proj": "2"}, {"q_proj": 0}, {"q_proj": 2.5}, {"q_proj": True},
                     {"q_proj": 2**31})},
        "rank_pattern=10**400": (cfg_raw_field("rank_pattern", '{"q_proj": 1' + "0" * 400 + "}"), FMT, CFG,
                                 r"rank_pattern\['q_proj'\]"),
        **{f"alpha_pattern={v!r}": (cfg_set(alpha_pattern=v), FMT, CFG, "alpha_pattern")
           for v in ([], {"q_proj": "x"}, {"q_proj": 0}, {"q_proj": float("nan")}, {"q_proj": None})},
        "alpha_pattern=10**400": (cfg_raw_field("alpha_pattern", '{"v_proj": -1' + "0" * 400 + "}"), FMT, CFG,
                                  r"alpha_pattern\['v_proj'\]"),
        **{f"target_modules={v!r}": (cfg_set(target_modules=v), FMT, CFG, "target_modules")
           for v in (5, [1], {"a": 1}, True)},
        **{f"exclude_modules={v!r}": (cfg_set(exclude_modules=v), FMT, CFG, "exclude_modules")
           for v in (5, ["a", 3])},
        **{f"use_rslora={v!r}": (cfg_set(use_rslora=v), FMT, CFG, "use_rslora") for v in ("yes", 1, 0, [])},
        **{f"fan_in_fan_out={v!r}": (cfg_set(fan_in_fan_out=v), FMT, CFG, "fan_in_fan_out") for v in (1, "false")},
        "peft_type=5": (cfg_set(peft_type=5), FMT, CFG, "peft_type"),
        "peft_type=list": (cfg_set(peft_type=["LORA"]), FMT, CFG, "peft_type"),
        "peft_type=IA3": (cfg_set(peft_type="IA3"), UNSUP, CFG, "peft_type"),
        "bias=all": (cfg_set(bias="all"), UNSUP, CFG, "bias"),
        "bias=5": (cfg_set(bias=5), UNSUP, CFG, "bias"),
        "use_dora": (cfg_set(use_dora=True), UNSUP, CFG, "use_dora"),
        "unknown_option_deep_value": (cfg_raw_field("new_option", _nested(500)), UNSUP, CFG, "new_option"),
    },
    # ---- patterns: invalid, ambiguous between engines, too large (slow ones: see the subprocess test) ---------
    "patterns": {
        "rank_pattern_invalid": (cfg_set(rank_pattern={"(": 2}), FMT, CFG, r"rank_pattern\['\('\]: invalid"),
        "alpha_pattern_invalid": (cfg_set(alpha_pattern={"[a-": 2}), FMT, CFG, r"alpha_pattern\['\[a-'\]"),
        "target_modules_invalid": (cfg_set(target_modules="(q"), FMT, CFG, "target_modules: invalid"),
        "exclude_modules_invalid": (cfg_set(exclude_modules="*x"), FMT, CFG, "exclude_modules: invalid"),
        "posix_class_ambiguous": (cfg_set(rank_pattern={"[[:alpha:]]_proj": 2}), FMT, CFG, "ambiguous"),
        "flags_not_at_start": (cfg_set(rank_pattern={"q(?i)_proj": 2}), FMT, CFG, "rank_pattern.*invalid"),
        "nested_too_deeply": (cfg_set(rank_pattern={"(" * 3000 + "q" + ")" * 3000: 2}), FMT, CFG, "rank_pattern"),
        "repeat_overflow": (cfg_set(rank_pattern={"a{99999999999}": 2}), FMT, CFG, "rank_pattern.*invalid"),
        "pattern_too_long": (cfg_set(target_modules="q" * (pat.MAX_PATTERN_LEN + 1)), FMT, CFG,
                             "target_modules: pattern of"),
        "patterns_too_long_in_all": (cfg_set(rank_pattern={f"{i}" + "q" * 90_000: 2 for i in range(5)}), FMT, CFG,
                                     "in all"),
        "repeat_expands_too_much": (cfg_set(alpha_pattern={"(?:a{400}){400}": 2}), FMT, CFG,
                                    "alpha_pattern.*too large"),
    },
    # ---- a scale that float32 cannot hold --------------------------------------------------------------------------
    "scales": {
        "alpha_overflows_fp32": (cfg_set(lora_alpha=1e39), FMT, CFG, "lora_alpha: .*float32"),
        "alpha_underflows_fp32": (cfg_set(lora_alpha=1e-50), FMT, CFG, "lora_alpha: .*float32"),
        "alpha_1e308": (cfg_set(lora_alpha=1e308), FMT, CFG, "lora_alpha: .*float32"),
        "alpha_pattern_overflows": (cfg_set(alpha_pattern={"v_proj": -1e300}), FMT, CFG,
                                    r"alpha_pattern\['v_proj'\]: .*float32"),
        "rslora_rule": (cfg_set(use_rslora=True, lora_alpha=6e38, r=2), FMT, CFG, r"sqrt\(r\)"),
    },
    # ---- the safetensors header -----------------------------------------------------------------------------------
    "header": {
        "empty_file": (st_bytes(lambda b: b""), FMT, ST, "at least 8 bytes"),
        "seven_bytes": (st_bytes(lambda b: b[:7]), FMT, ST, "at least 8 bytes"),
        "length_2**63": (st_bytes(lambda b: (2**63).to_bytes(8, "little") + b[8:]), FMT, ST, "header: length"),
        "length_past_eof": (st_bytes(lambda b: (len(b)).to_bytes(8, "little") + b[8:]), FMT, ST, "header: length"),
        "length_short": (st_bytes(lambda b: (int.from_bytes(b[:8], "little") - 3).to_bytes(8, "little") + b[8:]),
                         FMT, ST, "header: expected (a UTF-8 JSON|the tensors to cover)"),  # padding may be cut
        "not_utf8": (st_header_raw(lambda h: h[:-1] + b'"\xff"}'), FMT, ST, "header: expected a UTF-8 JSON"),
        "not_json": (st_header_raw(lambda h: b"{" + b"x" * (len(h) - 1)), FMT, ST, "header: expected a UTF-8 JSON"),
        "a_list": (st_header_raw(lambda h: b"[" + b" " * (len(h) - 2) + b"]"), FMT, ST, "header: expected a JSON obj"),
        "nested_too_deep": (st_header_raw(lambda h: h[:-1] + b', "x": ' + _nested(50_000).encode() + b"}"), FMT, ST,
                            "nested too deeply"),
        "duplicate_tensor": (st_header_raw(lambda h: h[:-1] + b", " + h[1:h.index(b"}") + 2].rstrip(b", ") + b"}"),
                             FMT, ST, "expected distinct keys"),
        "dtype_unknown": (st_edit(lambda h, d: h[KA].update(dtype="F99")), FMT, ST, "dtype: expected one of"),
        "dtype_not_str": (st_edit(lambda h, d: h[KA].update(dtype=5)), FMT, ST, "dtype: expected one of"),
        "shape_negative": (st_edit(lambda h, d: h[KA].update(shape=[-2, -32])), FMT, ST, "shape: expected"),
        "shape_str": (st_edit(lambda h, d: h[KA].update(shape=["2", IN])), FMT, ST, "shape: expected"),
        "shape_bool": (st_edit(lambda h, d: h[KA].update(shape=[True, IN])), FMT, ST, "shape: expected"),
        "shape_lies_bigger": (st_edit(lambda h, d: h[KA].update(shape=[10**6, IN])), FMT, ST, "bytes between"),
        "shape_lies_huge": (st_edit(lambda h, d: h[KA].update(shape=[10**30, 10**30])), FMT, ST, "bytes between"),
        "shape_lies_smaller": (st_edit(lambda h, d: h[KA].update(shape=[1, IN])), FMT, ST, "bytes between"),
        "offsets_past_data": (st_edit(lambda h, d: _shift(h, KA, 10**12)), FMT, ST, "data_offsets: expected"),
        "offsets_negative": (st_edit(lambda h, d: _shift(h, _first(h), -1)), FMT, ST, "data_offsets: expected"),
        "offsets_one_number": (st_edit(lambda h, d: h[KA].update(data_offsets=[0])), FMT, ST, "data_offsets"),
        "offsets_overlap": (st_edit(lambda h, d: h[KVA].update(data_offsets=list(h[KA]["data_offsets"]))), FMT, ST,
                            "data_offsets"),
        "trailing_bytes": (st_edit(lambda h, d: bytes(d) + b"\0" * 16), FMT, ST, "cover"),
        "truncated_data": (st_bytes(lambda b: b[:-5]), FMT, ST, "data_offsets|cover"),
        "metadata_not_str": (st_edit(lambda h, d: h.update(__metadata__={"format": 5})), FMT, ST, "__metadata__"),
        "entry_not_object": (st_edit(lambda h, d: h.update({KA: [1, 2]})), FMT, ST, "expected an object"),
    },
    # ---- keys: one module defined twice, unknown keys, several adapters ---------------------------------------------
    "keys": {
        "with_and_without_prefix": (tensors(lambda t: t.update({KA.removeprefix(PREFIX): t[KA].clone()})), FMT, ST,
                                    "defined|two: keys"),
        "with_and_without_adapter_name": (tensors(lambda t: t.update({KA.replace(".weight", ".default.weight"):
                                                                      t[KA].clone()})), FMT, ST, "two: keys"),
        "trailing_newline_alias": (tensors(lambda t: t.update({KA + "\n": t[KA].clone()})), FMT, ST, "key "),
        "unknown_key": (tensors(lambda t: t.update({"foo.weight": torch.zeros(2)})), FMT, ST, "key 'foo.weight'"),
        "two_adapter_names": (tensors(_two_names), FMT, ST, "adapter_name"),
        "named_and_unnamed": (tensors(lambda t: t.update({k.replace(".weight", ".default.weight"): t.pop(k)
                                                          for k in list(t) if V in k})), FMT, ST, "adapter_name"),
        "missing_lora_B": (tensors(lambda t: t.pop(KB)), FMT, ST, "missing key lora_B"),
        "extra_module": (tensors(lambda t: t.update({f"{PREFIX}model.x.lora_A.weight": torch.zeros(2, IN),
                                                     f"{PREFIX}model.x.lora_B.weight": torch.zeros(3, 2)})), FMT, ST,
                         "extra key"),
        "dora_magnitude": (tensors(lambda t: t.update({f"{PREFIX}{Q}.lora_magnitude_vector": torch.ones(8)})),
                           UNSUP, ST, "DoRA"),
        "no_lora_keys": (lambda d: (write_base(d), write_st(d / WEIGHTS_NAME, {}, b""), d)[2], FMT, ST,
                         "got none"),
    },
    # ---- tensors: ndim, dtype, shapes against config and model, values -----------------------------------------------
    "tensors": {
        "A_1d": (tensors(lambda t: t.update({KA: torch.zeros(2 * IN)})), FMT, ST, "2-D"),
        "A_B_3d": (tensors(lambda t: t.update({KA: torch.zeros(2, IN, 1), KB: torch.zeros(8, 2, 1)})), UNSUP, ST,
                   "2-D"),
        "conv_4d": (tensors(lambda t: t.update({KA: torch.zeros(2, IN, 1, 1), KB: torch.zeros(8, 2, 1, 1)})), UNSUP,
                    ST, "conv"),
        "int32_weights": (tensors(lambda t: t.update({KA: torch.ones(2, IN, dtype=torch.int32)})), FMT, ST, "I32"),
        "bool_weights": (tensors(lambda t: t.update({KB: torch.ones(8, 2, dtype=torch.bool)})), FMT, ST, "BOOL"),
        "complex_weights": (tensors(lambda t: t.update({KA: torch.ones(2, IN, dtype=torch.complex64)})), FMT, ST,
                            "C64"),
        "e8m0_weights": (st_edit(lambda h, d: h[KA].update(dtype="F8_E8M0", shape=[2, IN * 4])), UNSUP, ST,
                         "F8_E8M0"),
        "fp4_weights": (st_edit(lambda h, d: h[KA].update(dtype="F4", shape=[2, IN * 8])), UNSUP, ST, "F4"),
        "rank_mismatch": (tensors(lambda t: t.update({KB: torch.zeros(8, 3)})), FMT, ST, "rank of lora_A"),
        "in_features": (tensors(lambda t: t.update({KA: torch.zeros(2, IN + 1)})), FMT, ST, r"expected shape \(2, 8\)"),
        "out_features": (tensors(lambda t: t.update({KB: torch.zeros(7, 2)})), FMT, ST, r"expected shape \(8, 2\)"),
        "rank_vs_config": (cfg_set(r=3), FMT, ST, "expected rank 3"),
        "rank_above_capacity": (lambda d: write_base(d, rank=MAX_RANK + 2), FMT, "dir", "max_rank"),
        "nan": (tensors(lambda t: t[KA].__setitem__((0, 1), float("nan"))), FMT, ST, "finite"),
        "inf": (tensors(lambda t: t[KB].__setitem__((0, 0), float("-inf"))), FMT, ST, "finite"),
    },
    # ---- paths ----------------------------------------------------------------------------------------------------
    "paths": {
        "nothing_there": (lambda d: d / "absent", FMT, "src", "nothing there"),
        "path_symlink_loop": (lambda d: (d.mkdir(), os.symlink(d / "loop", d / "loop"), d / "loop")[2], FMT, "src",
                              "symlink loop"),
        "weights_is_directory": (lambda d: _dir_at(d, WEIGHTS_NAME), FMT, "dir", "got a directory"),
        "weights_is_fifo": (lambda d: _fifo(d, WEIGHTS_NAME), FMT, "dir", "got a FIFO"),
        "weights_symlink_loop": (lambda d: _symlink_loop(d, WEIGHTS_NAME), FMT, "dir", WEIGHTS_NAME),
        "nul_byte": (lambda d: str(d) + "\0x", FMT, "none", "valid path"),
        "wrong_suffix": (lambda d: (write_base(d), d / CONFIG_NAME)[1], FMT, "src", "suffix"),
        "pickle": (lambda d: (d.mkdir(), (d / "a.bin").write_bytes(b"x"), d / "a.bin")[2], FMT, "src", "never loaded"),
        "device": (lambda d: "/dev/null", FMT, "src", "a device"),
    },
}
ALL = [(cls, name) for cls, cases in CASES.items() for name in cases]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = write_base(tmp_path_factory.mktemp("good") / "good", seed=1)
    return d, dense_reference(d)


@pytest.fixture
def pool(good):
    p = make_pool()
    p.load("good", good[0])
    p.acquire(["good"])  # referenced: a refusal must not touch it
    return p


@pytest.mark.parametrize("cls, case", ALL, ids=[f"{c}:{n}" for c, n in ALL])
def test_malformed_file_refused_naming_file_and_field_pool_unchanged(tmp_path, pool, good, cls, case):
    make, exc, named, field = CASES[cls][case]
    d = tmp_path / "bad"
    src = make(d)
    before = snapshot(pool)
    t0 = time.monotonic()
    with pytest.raises(exc) as ei:
        pool.load("bad", src)
    assert time.monotonic() - t0 < 5.0
    if exc is FMT:
        assert not isinstance(ei.value, UNSUP), ei.value
    msg = str(ei.value)
    file = {CFG: d / CONFIG_NAME, ST: d / WEIGHTS_NAME, "dir": d, "src": src, "none": None}[named]
    if file is not None:
        assert msg.startswith(str(file)), msg
    assert re.search(field, msg), msg
    assert len(msg) < 2000, "messages quote file contents in bounded form"
    assert "bad" not in pool
    assert_same(before, snapshot(pool))
    check_serving(pool, {"good": good[1]}, ["good", None, "good"])


# ---- what still loads ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dt", ["F8_E4M3", "F8_E5M2"])
def test_fp8_weights_are_converted_exactly_to_float32(tmp_path, dt):
    from safetensors.torch import load_file, save_file

    d = write_base(tmp_path / "a", seed=3)
    t = load_file(str(d / WEIGHTS_NAME))
    f8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}[dt]
    save_file({k: v.to(f8) for k, v in t.items()}, str(d / WEIGHTS_NAME))
    h = read_peft_adapter(d)
    for p, (A, B, _s) in h.modules.items():
        assert A.dtype == B.dtype == torch.float32
        assert torch.equal(A, t[f"{PREFIX}{p}.lora_A.weight"].to(f8).float())
    pool = make_pool()
    pool.load("f8", d)
    dense = {p: 2.0 * B.double() @ A.double() for p, (A, B, _) in h.modules.items()}
    check_serving(pool, {"f8": dense}, ["f8", None])
    assert read_peft_adapter(d, dtype=torch.float16).modules[Q][0].dtype == torch.float16


def test_config_from_a_peft_loraconfig_object(tmp_path):
    peft = pytest.importorskip("peft")
    d = write_base(tmp_path / "a", seed=4, rank=2, alpha=6.0)
    c = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], rank_pattern={}, alpha_pattern={})
    h = read_peft_adapter(d / WEIGHTS_NAME, config=c)
    assert h.modules[Q][2] == pytest.approx(3.0)


def test_patterns_keep_peft_semantics():
    """rank/alpha_pattern keys: peft's get_pattern_key; target/exclude_modules strings: re.fullmatch."""
    paths = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.10.mlp.down_proj",
             "q_proj", "model.layers.0.self_attn.k_proj", "xq_proj", "model.layers.1.self_attnXq_proj"]
    keys = ["q_proj", "layers.1.self_attn.q_proj", r"layers\.\d+\.mlp\..*", "self_attn.(q|k)_proj", ".*", "1.s",
            "a)|(q_proj", "^model.*q_proj", r"(?i:Q_PROJ)", "proj$", "layers.1"]
    for path in paths:
        for i in range(len(keys)):
            order = keys[i:] + keys[:i]
            cfg = AdapterConfig.from_dict({"r": 1, "lora_alpha": 1, "rank_pattern": {k: j + 2 for j, k in
                                                                                      enumerate(order)}})
            want = peft_other.get_pattern_key(order, path)
            assert get_pattern_key(order, path) == want  # the copy the fuzz subprocess uses
            want_r = order.index(want) + 2 if want in order else 1
            assert cfg.rank_for(path) == want_r, (path, order)
        for tm in (r".*\.(q|v)_proj", "q_proj", r"model\.layers\.1\..*", ".*k_proj|.*down_proj", "model", "q",
                   r"model\.layers\.\d"):  # the last three match a prefix only: fullmatch, not match
            c = AdapterConfig.from_dict({"r": 1, "lora_alpha": 1, "target_modules": tm})
            assert c.targets(path) == (re.fullmatch(tm, path) is not None), (tm, path)
            c = AdapterConfig.from_dict({"r": 1, "lora_alpha": 1, "target_modules": ".*", "exclude_modules": tm})
            assert c.targets(path) == (re.fullmatch(tm, path) is None), (tm, path)


def test_shapes_checked_before_any_tensor_is_read(tmp_path, monkeypatch):
    """Shape, rank, dtype and capacity problems are found on the header: safe_open is never reached."""
    import safetensors

    def boom(*a, **k):
        raise AssertionError("a tensor was read before the checks")

    monkeypatch.setattr(safetensors, "safe_open", boom)
    exp = {p: (IN, o) for p, o in OUTS.items()}
    for make, match in ((CASES["tensors"]["in_features"][0], "expected shape"),
                        (CASES["tensors"]["int32_weights"][0], "I32"),
                        (CASES["tensors"]["rank_vs_config"][0], "expected rank"),
                        (lambda d: write_base(d, rank=3), "max_rank")):
        d = make(tmp_path / f"x{len(list(tmp_path.iterdir()))}")
        with pytest.raises(FMT, match=match):
            read_peft_adapter(d, expected={p: (*v, 2) for p, v in exp.items()})
    with pytest.raises(AssertionError, match="before the checks"):  # and the patch is effective
        read_peft_adapter(write_base(tmp_path / "ok"), expected=exp)


def test_in_features_zero_refused_without_expected(tmp_path):
    d = tensors(lambda t: t.update({KA: torch.zeros(2, 0), KVA: torch.zeros(2, 0)}))(tmp_path / "a")
    with pytest.raises(FMT, match="in/out features >= 1"):
        read_peft_adapter(d)


def test_dtype_conversion_overflow_names_file(tmp_path):
    d = tensors(lambda t: t[KA].__setitem__((0, 0), 1e6))(tmp_path / "a")
    with pytest.raises(FMT, match=r"lora_A.weight: expected finite values.*float16") as ei:
        read_peft_adapter(d, dtype=torch.float16)
    assert str(ei.value).startswith(str(d / WEIGHTS_NAME))


def test_argument_types_named(tmp_path):
    d = write_base(tmp_path / "a")
    for kw, match in (({"name": 5}, "name:"), ({"adapter_name": 5}, "adapter_name:"), ({"expected": [1]}, "expected:"),
                      ({"expected": {Q: (IN,)}}, r"expected\[")):
        with pytest.raises(TypeError, match=match):
            read_peft_adapter(d, **kw)
    with pytest.raises(ValueError, match=r"expected\['.*'\]\[0\]"):
        read_peft_adapter(d, expected={Q: (0, 8)})


# ---- patterns that would hang `re`: in a subprocess with a timeout ---------------------------------------------------
SLOW_PATTERN_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from adapter_files import IN, write_base, edit_config
    from lora_kernels.peft_format import read_peft_adapter, AdapterFormatError

    root = Path(sys.argv[1])
    LONG = "model." + "a" * 64 + "!"          # a module path that makes (a|aa)+ backtrack exponentially
    cases = {
        "rank_pattern": {"rank_pattern": {"(a|aa)+": 2}},
        "alpha_pattern": {"alpha_pattern": {"(a|aa)+": 2}},
        "target_modules": {"target_modules": "model\\\\.(a|aa)+"},
        "exclude_modules": {"target_modules": "model.*", "exclude_modules": "model\\\\.(a|aa)+"},
        "many_slow_keys": {"rank_pattern": {"(a|aa)+" + "x?" * i: 2 for i in range(40)}},
        "nested_repeats": {"rank_pattern": {"(?:(?:(?:a{100}){100}){100}){100}": 2}},
        "polynomial": {"rank_pattern": {"(.*a){20}b": 2}},
    }
    out = {}
    for name, changes in cases.items():
        d = write_base(root / name)
        # the module path of the file becomes LONG, and the layer it is loaded into is LONG too
        from safetensors.torch import load_file, save_file
        t = load_file(str(d / "adapter_model.safetensors"))
        t = {k.replace("model.layers.0.self_attn.q_proj", LONG): v for k, v in t.items() if "v_proj" not in k}
        save_file(t, str(d / "adapter_model.safetensors"))
        edit_config(d, lambda c: c.update(changes))
        t0 = time.monotonic()
        try:
            # LONG + "?" is in the layers but not in the file: target/exclude_modules decide if it is missing
            read_peft_adapter(d, expected={LONG: (IN, 8), LONG + "?": (IN, 4)})
            res = "loaded"
        except AdapterFormatError as e:
            res = str(e)
        out[name] = [res, time.monotonic() - t0]
    print(json.dumps(out))
""")


def test_slow_patterns_are_refused_in_bounded_time(tmp_path):
    script = tmp_path / "slow_patterns.py"
    script.write_text(SLOW_PATTERN_SCRIPT)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=20)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    cfg_of = {n: str(tmp_path / n / CONFIG_NAME) for n in out}
    for name, field in (("rank_pattern", r"rank_pattern\['\(a\|aa\)\+'\]: matching"),
                        ("alpha_pattern", r"alpha_pattern\['\(a\|aa\)\+'\]: matching"),
                        ("target_modules", "target_modules: matching"),
                        ("exclude_modules", "exclude_modules: matching"),
                        ("many_slow_keys", r"rank_pattern\['\(a\|aa\)\+.*'\]: (matching|.*budget)"),
                        ("nested_repeats", r"rank_pattern\[.*\]: pattern too large")):
        msg, secs = out[name]
        assert msg.startswith(cfg_of[name]) and re.search(field, msg), (name, msg)
        assert secs < pat.READ_MATCH_BUDGET_S + 1.5, (name, secs)
    assert out["polynomial"][1] < pat.READ_MATCH_BUDGET_S + 1.5
    assert wall < 15, wall  # well within the 20 s timeout, imports included


def test_match_budget_bounds_total_matching_time():
    """Each match is cut at MATCH_TIMEOUT_S, all matches of one file at the budget; both refuse with the reason."""
    slow, path = "(a|aa)+", "m." + "a" * 60 + "!"
    assert pat.search_key("a+", "m.aaa") and not pat.search_key("b", "m.aaa")
    with pytest.raises(pat.PatternError, match="budget"):
        pat.search_key("a+", "m.aaa", pat.MatchBudget(0.0))
    b = pat.MatchBudget(0.05)
    t0 = time.monotonic()
    with pytest.raises(pat.PatternError, match=r"took longer than 0\.05 s"):
        pat.search_key(slow, path, b)
    assert time.monotonic() - t0 < 1.0 and b.left < 0.0 + 0.05
    with pytest.raises(pat.PatternError, match="budget"):  # what is spent stays spent
        pat.search_key("a+", "m.aaa", b) if b.left <= 0 else pat.search_key("a+", "m.aaa", pat.MatchBudget(0.0))


def test_config_argument_errors_name_it(tmp_path):
    """config= as a path (missing, a directory) or a dict (bad field): the message names that path / argument."""
    d = write_base(tmp_path / "a")
    f = d / WEIGHTS_NAME
    for cfg, match in ((tmp_path / "nope.json", "nothing there"), (tmp_path, "got a directory")):
        with pytest.raises(FMT, match=match) as ei:
            read_peft_adapter(f, config=cfg)
        assert str(ei.value).startswith(str(cfg))
    with pytest.raises(FMT, match=r"^config \(given for .*\): lora_alpha: ") as ei:
        read_peft_adapter(f, config={"r": 2, "lora_alpha": float("nan")})
    assert str(f) in str(ei.value)
