"""Fuzz phases that could crash or hang the process that runs them (corrupted safetensors bytes, crafted regex
patterns), run by tests/test_fuzz_adapter_files.py in a subprocess with a timeout. Usage:
``python fuzz_adapter_subprocess.py <scratch dir> <bytes|patterns>``; prints one JSON line of counts.

Each example: the reader either loads the file, and then it serves exactly what safetensors and PEFT's rules
say, or it raises AdapterFormatError naming the file (and the field for config patterns); after a refusal
the pool is unchanged and still serves a valid adapter."""

from __future__ import annotations

import copy
import json
import re
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from adapter_files import (IN, PREFIX, Q, assert_same, check_serving, dense_reference, edit_config,  # noqa: E402
                           get_pattern_key, make_pool, peft_scale, read_st, snapshot, write_base, write_st)
from lora_kernels import _peft_patterns as pat  # noqa: E402
from lora_kernels._safetensors_header import DTYPE_BITS  # noqa: E402
from lora_kernels.peft_format import CONFIG_NAME, WEIGHTS_NAME, AdapterFormatError, read_peft_adapter  # noqa: E402

SETTINGS = dict(max_examples=60, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
ROOT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
COUNTS = {"examples": 0, "refused": 0, "loaded": 0, "max_seconds": 0.0}

GOOD = write_base(ROOT / "good", seed=11)
GOOD_DENSE = dense_reference(GOOD)
POOL = make_pool()
POOL.load("good", GOOD)
POOL.acquire(["good"])
BASE_HEADER, BASE_DATA = read_st(write_base(ROOT / "base", seed=5) / WEIGHTS_NAME)


def _fresh(tag: str) -> Path:
    d = ROOT / f"{tag}{COUNTS['examples']}"
    COUNTS["examples"] += 1
    return d


def _attempt(d: Path, names_ok) -> bool:
    """pool.load(d); True when it loaded (then unloaded again). A refusal must be an AdapterFormatError whose
    message starts with one of ``names_ok`` and must leave the pool as it was."""
    before = snapshot(POOL)
    t0 = time.monotonic()
    try:
        POOL.load("bad", d)
    except AdapterFormatError as e:
        msg = str(e)
        assert any(msg.startswith(str(n)) for n in names_ok), msg
        assert "bad" not in POOL and len(msg) < 2000
        assert_same(before, snapshot(POOL))
        COUNTS["refused"] += 1
        ok = False
    else:
        COUNTS["loaded"] += 1
        ok = True
    COUNTS["max_seconds"] = max(COUNTS["max_seconds"], time.monotonic() - t0)
    return ok


# ---- phase "bytes": corrupted / lying safetensors files ---------------------------------------------------------
_TENSOR_KEYS = sorted(k for k in BASE_HEADER if k != "__metadata__")
_ints = st.one_of(st.integers(-3, 40), st.sampled_from([2**31, 2**63, 10**30, -(2**63)]))
_header_edit = st.one_of(
    st.tuples(st.just("dtype"), st.sampled_from(_TENSOR_KEYS),
              st.one_of(st.sampled_from(sorted(DTYPE_BITS)), st.text(max_size=4), st.integers(0, 9))),
    st.tuples(st.just("shape"), st.sampled_from(_TENSOR_KEYS), st.lists(_ints, max_size=4)),
    st.tuples(st.just("data_offsets"), st.sampled_from(_TENSOR_KEYS), st.lists(_ints, max_size=3)),
    st.tuples(st.just("drop_field"), st.sampled_from(_TENSOR_KEYS),
              st.sampled_from(["dtype", "shape", "data_offsets"])),
    st.tuples(st.just("rename"), st.sampled_from(_TENSOR_KEYS),
              st.sampled_from(["strip_prefix", "default_name", "other_name", "junk", "newline"])),
    st.tuples(st.just("copy_entry"), st.sampled_from(_TENSOR_KEYS), st.sampled_from(_TENSOR_KEYS)),
)
_byte_edit = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 2000)),
    st.tuples(st.just("bytes"), st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1, max_size=4)),
    st.tuples(st.just("length"), st.one_of(st.integers(0, 2000), st.sampled_from([2**63, 2**64 - 1, 10**8]))),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("float"), st.integers(0, 200), st.sampled_from([float("nan"), float("inf"), -float("inf"),
                                                                       3e38, 0.0, -1.5])),
)


def _key_of(sd, path: str, ab: str) -> str:
    """The key of ``path``'s lora_A/B in a state dict (with or without prefix / adapter name), parsed here."""
    (k,) = [k for k in sd if f".lora_{ab}" in k and k.removeprefix(PREFIX).split(f".lora_{ab}")[0] == path]
    return k


def _rename(k: str, how: str) -> str:
    return {"strip_prefix": k.removeprefix(PREFIX), "default_name": k.replace(".weight", ".default.weight"),
            "other_name": k.replace(".weight", ".other.weight"), "junk": k + ".junk", "newline": k + "\n"}[how]


# One example in three is an edit a valid file survives (a key renamed to another accepted form, a finite value
# changed; or a NaN/Inf, which must be refused): the "loads and serves what safetensors reads" branch is
# exercised too.
_benign = st.tuples(
    st.lists(st.tuples(st.just("rename"), st.sampled_from(_TENSOR_KEYS), st.sampled_from(["strip_prefix",
                                                                                          "default_name"])),
             max_size=1),
    st.lists(st.tuples(st.just("float"), st.integers(0, 60),
                       st.sampled_from([1e3, 0.0, -1.5, 1e-40, float("nan"), float("inf")])),
             min_size=1, max_size=3))
_edits = st.integers(0, 2).flatmap(lambda i: _benign if i == 0 else st.tuples(st.lists(_header_edit, max_size=3),
                                                                               st.lists(_byte_edit, max_size=2)))


@settings(**SETTINGS)
@given(_edits)
def fuzz_bytes(edits):
    header_edits, byte_edits = edits
    d = _fresh("bytes")
    write_base(d, seed=5)
    h = copy.deepcopy(BASE_HEADER)
    for kind, key, val in header_edits:
        if key not in h:
            continue
        if kind in ("dtype", "shape", "data_offsets"):
            h[key][kind] = val
        elif kind == "drop_field":
            h[key].pop(val, None)
        elif kind == "rename":
            h[_rename(key, val)] = h.pop(key)
        elif kind == "copy_entry" and val in h:
            h[key] = copy.deepcopy(h[val])
    f = d / WEIGHTS_NAME
    write_st(f, h, BASE_DATA)
    raw = bytearray(f.read_bytes())
    for kind, *args in byte_edits:
        if kind == "truncate":
            raw = raw[: args[0]]
        elif kind == "bytes":
            for pos, b in args[0]:
                if pos < len(raw):
                    raw[pos] = b
        elif kind == "length" and len(raw) >= 8:
            raw[:8] = int(args[0]).to_bytes(8, "little")
        elif kind == "append":
            raw += args[0]
        elif kind == "float":  # a float32 value at a 4-byte slot of the data buffer
            pos = len(raw) - len(BASE_DATA) + 4 * args[0]
            if 0 <= pos <= len(raw) - 4:
                raw[pos : pos + 4] = struct.pack("<f", args[1])
    f.write_bytes(bytes(raw))
    if _attempt(d, [f]):
        try:
            _check_loaded(d, f)
        finally:
            POOL.unload("bad")
    check_serving(POOL, {"good": GOOD_DENSE}, ["good", None])


def _check_loaded(d: Path, f: Path) -> None:
    """Loaded: safetensors must read the same file, and the pool must serve exactly its tensors with PEFT's
    scale."""
    from safetensors.torch import load_file

    sd = load_file(str(f))  # the independent reader must accept what ours accepted
    cfg = json.loads((d / CONFIG_NAME).read_text())
    host = read_peft_adapter(d)
    dense = {}
    for p, (A, B, _) in host.modules.items():
        A_sd, B_sd = (sd[_key_of(sd, p, ab)] for ab in "AB")
        for ours, theirs in ((A, A_sd), (B, B_sd)):
            want = torch.float32 if theirs.dtype.itemsize == 1 else theirs.dtype  # fp8 -> float32
            assert ours.dtype == want and torch.equal(ours, theirs.to(want)), p
        dense[p] = peft_scale(cfg, p) * B_sd.double() @ A_sd.double()
    check_serving(POOL, {"good": GOOD_DENSE, "bad": dense}, ["bad", "good", None, "bad"])


# ---- phase "patterns": crafted regexes as rank_pattern keys and target/exclude_modules ---------------------------
_atoms = st.sampled_from(["a", "aa", ".", ".*", r"\w", r"\d", "0", "model", "layers", "self_attn", "q_proj", r"\.",
                          "[a-z_]", "(?:a|aa)", "(a|a)", "x"])
_quant = st.sampled_from(["", "", "+", "*", "?", "{2}", "{1,3}", "{0,}", "+?"])
_regexes = st.recursive(
    st.builds(lambda a, q: a + q, _atoms, _quant),
    lambda inner: st.one_of(st.builds(lambda xs, q: "(" + "".join(xs) + ")" + q, st.lists(inner, min_size=1,
                                                                                          max_size=3), _quant),
                            st.builds(lambda a, b: a + "|" + b, inner, inner),
                            st.builds(lambda a, b: a + b, inner, inner)),
    max_leaves=6)
LONG_PATHS = ["model." + "a" * 40 + "!", "model.layers.0.self_attn.q_proj", "model." + "a" * 30 + ".q_proj"]


class _ReTimeout(Exception):
    pass


def _with_alarm(fn, *args, seconds: float = 0.5):
    """Run a `re` call with a SIGALRM deadline (`re` checks signals while matching); _ReTimeout when PEFT itself
    would stall on this pattern, so there is no reference to compare with."""
    import signal

    def _raise(*_):
        raise _ReTimeout()

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@settings(**SETTINGS)
@given(_regexes, st.sampled_from(["rank_pattern", "alpha_pattern", "target_modules", "exclude_modules"]),
       st.sampled_from(LONG_PATHS))
def fuzz_patterns(rx, where, path):
    d = _fresh("pat")
    write_base(d, seed=6)
    from safetensors.torch import load_file, save_file

    t = load_file(str(d / WEIGHTS_NAME))
    save_file({k.replace(Q, path): v for k, v in t.items() if Q in k}, str(d / WEIGHTS_NAME))
    # rank 3 where the key matches (the file has rank 2: a match is refused), alpha 2 where it matches (else 4).
    change = ({where: {rx: 3 if where == "rank_pattern" else 2}} if where.endswith("pattern") else
              {"target_modules": rx} if where == "target_modules" else {"target_modules": ".*", "exclude_modules": rx})
    edit_config(d, lambda c: c.update(change))
    cfg_file = str(d / CONFIG_NAME)
    t0 = time.monotonic()
    try:
        h = read_peft_adapter(d, expected={path: (IN, 8), path + "?": (IN, 4)})
    except AdapterFormatError as e:
        msg = str(e)
        took = time.monotonic() - t0
        assert took < 4 * pat.READ_MATCH_BUDGET_S + 1.0, (rx, took)
        COUNTS["refused"] += 1
        if msg.startswith(cfg_file):
            assert re.search(rf": {where}\b", msg), msg  # the field
            if "invalid regular expression" in msg:  # what we call invalid, PEFT's `re` cannot compile either
                try:
                    re.compile(rf"(.*\.)?({rx})$" if where.endswith("pattern") else rx)
                    raise AssertionError(f"re compiles {rx!r}, refused as invalid: {msg}")
                except re.error:
                    pass
        else:  # the pattern worked, and the file disagrees (rank, or a module target_modules selects is missing)
            assert msg.startswith(str(d / WEIGHTS_NAME)), msg
            _agree_with_peft(rx, where, path, ok=False, msg=msg)
        return
    COUNTS["loaded"] += 1
    COUNTS["max_seconds"] = max(COUNTS["max_seconds"], time.monotonic() - t0)
    _agree_with_peft(rx, where, path, ok=True, scale=h.modules[path][2])


def _agree_with_peft(rx, where, path, ok, scale=None, msg=""):
    """The outcome is PEFT's (its `re` rules, on patterns `re` matches within 0.5 s)."""
    try:
        if where in ("rank_pattern", "alpha_pattern"):
            hit = _with_alarm(get_pattern_key, [rx], path) == rx
        else:
            hit = _with_alarm(re.fullmatch, rx, path + "?") is not None
    except _ReTimeout:
        COUNTS["no_reference"] = COUNTS.get("no_reference", 0) + 1
        return
    COUNTS["compared"] = COUNTS.get("compared", 0) + 1
    if where == "rank_pattern":
        assert ok == (not hit), (rx, path, msg)
    elif where == "alpha_pattern":
        assert ok and scale == (2.0 if hit else 4.0) / 2, (rx, path, scale, msg)
    else:  # path + "?" is absent from the file: a module target_modules selects (and not excluded) is missing
        selected = (not hit) if where == "exclude_modules" else hit
        assert ok == (not selected), (rx, where, path, msg)


if __name__ == "__main__":
    phase = sys.argv[2]
    if phase == "patterns":
        # Keep the fuzz fast: the bounds are parameters; a pattern that needs longer is refused sooner.
        pat.MATCH_TIMEOUT_S, pat.READ_MATCH_BUDGET_S = 0.05, 0.2
        fuzz_patterns()
    else:
        fuzz_bytes()
    print(json.dumps(COUNTS))
