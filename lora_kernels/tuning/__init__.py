"""Per-GPU tile configurations for the SGMV kernels (V-LoRA's ATMM idea: profile offline, pick at run time).

A config is a dict of launch parameters for one op (``"shrink"``, ``"expand"`` or ``"add_lora"``); which
config runs depends on the GPU, the activation dtype and a power-of-two bucket of the shape
``(T, in_features, out_features, r_cap)`` (:func:`bucket_key`).

Sources, in order:
    1. the table of the current GPU, ``lora_kernels/tuning/<sanitised GPU name>.json``, written by
       ``lora-bench tune`` (:func:`write_table`) after timing and reference-checking :func:`candidate_configs`
       on that GPU; an entry may be partial, it is merged over 2.;
    2. :func:`default_config`, a simple heuristic (never a config that was not measured).

CPU tensors (the Triton interpreter) always get the defaults, and nothing here initialises CUDA for them.
Bad table entries (unknown keys, bad values, unreadable files) are ignored with a warning, never an error.

Config keys:
    ``shrink``:  BLOCK_M, BLOCK_K, BLOCK_R, SPLIT_K, num_warps, num_stages
    ``expand``:  BLOCK_M, BLOCK_N, BLOCK_R, num_warps, num_stages
    ``add_lora``: strategy ("fused" | "two_pass"); for "fused": BLOCK_M, BLOCK_N, BLOCK_K, N_SPLIT (column
        groups per slice: programs that each redo the tile's shrink and expand 1/N_SPLIT of the columns),
        num_warps, num_stages; for "two_pass": ``"shrink"`` and ``"expand"`` sub-dicts with the keys above.

Tile sizes are powers of two in [16, 256] (``tl.dot`` needs every dimension >= 16).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import warnings
from typing import Any

import torch

from ..plan import PLAN_BLOCK_M

__all__ = [
    "OPS",
    "STRATEGIES",
    "bucket_key",
    "candidate_configs",
    "clear_cache",
    "default_config",
    "get_config",
    "load_table",
    "table_path",
    "validate_config",
    "write_table",
]

OPS = ("shrink", "expand", "add_lora")
STRATEGIES = ("persistent", "fused", "two_pass")
_DIR = os.path.dirname(os.path.abspath(__file__))

_POW2_TILE = (16, 32, 64, 128, 256)
_WARPS = (1, 2, 4, 8, 16)
_SHRINK_KEYS = ("BLOCK_M", "BLOCK_K", "BLOCK_R", "SPLIT_K", "num_warps", "num_stages")
_EXPAND_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_R", "num_warps", "num_stages")
_FUSED_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "N_SPLIT", "num_warps", "num_stages")
_PERSISTENT_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "N_K", "CTAS_PER_SM", "num_warps", "num_stages")
_KEYS = {
    "shrink": _SHRINK_KEYS,
    "expand": _EXPAND_KEYS,
    "persistent": _PERSISTENT_KEYS,
    "add_lora": ("strategy",) + _FUSED_KEYS + ("shrink", "expand", "persistent"),
}


def _valid_value(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if key.startswith("BLOCK_"):
        return isinstance(v, int) and v in _POW2_TILE
    if key == "SPLIT_K":
        return isinstance(v, int) and 1 <= v <= 128
    if key == "N_K":
        return isinstance(v, int) and 0 <= v <= 64
    if key == "CTAS_PER_SM":
        return isinstance(v, int) and 1 <= v <= 4
    if key == "N_SPLIT":
        return isinstance(v, int) and 1 <= v <= 1024
    if key == "num_warps":
        return isinstance(v, int) and v in _WARPS
    if key == "num_stages":
        return isinstance(v, int) and 1 <= v <= 8
    if key == "strategy":
        return v in STRATEGIES
    return False


def _p2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, torch.dtype):
        return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, str(dtype))
    return str(dtype)


def bucket_key(op: str, dtype: Any, T: int, in_f: int, out_f: int, r_cap: int) -> str:
    """Table key of a shape: ``"<op>|<dtype>|T<p2>|in<p2>|out<p2>|r<p2>"``, each size rounded up to a power
    of two (``dtype`` a torch dtype or one of "fp16", "bf16", "fp32"). ``in`` is ``*`` for expand and
    ``out`` is ``*`` for shrink (those ops do not depend on it).

    Example: ``bucket_key("add_lora", torch.bfloat16, 100, 4096, 11008, 16) ==
    "add_lora|bf16|T128|in4096|out16384|r16"``.
    """
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    # shrink does not depend on out and expand not on in: "*" there, so every caller builds the same key.
    ins = "*" if op == "expand" else str(_p2(in_f))
    outs = "*" if op == "shrink" else str(_p2(out_f))
    return f"{op}|{_dtype_name(dtype)}|T{_p2(T)}|in{ins}|out{outs}|r{_p2(r_cap)}"


# ---- defaults ---------------------------------------------------------------------------------------------
def _block_m(T: int) -> int:
    # A token tile much taller than the segments wastes MMA rows; 16 is tl.dot's minimum.
    return 16 if T <= 16 else 32 if T <= 128 else 64


def _default_shrink(T: int, in_f: int, r_cap: int) -> dict[str, Any]:
    # Few tokens: the grid is tiny (one program per segment tile and slice), so split the reduction over
    # `in` to fill the SMs; h is fp32 and the partial sums go through atomics into a zeroed h.
    split_k = (8 if in_f >= 4096 else 4) if (T <= 32 and in_f >= 1024) else 1
    return {
        "BLOCK_M": _block_m(T),
        "BLOCK_K": 64 if in_f >= 64 else 32 if in_f > 16 else 16,
        # One rank block up to 64 keeps x read once per tile; a rank-128 adapter takes two (L2-resident) passes.
        "BLOCK_R": max(16, min(_p2(r_cap), 64)),
        "SPLIT_K": split_k,
        "num_warps": 4,
        "num_stages": 2,
    }


def _default_expand(T: int, out_f: int, r_cap: int) -> dict[str, Any]:
    return {
        "BLOCK_M": _block_m(T),
        "BLOCK_N": 128 if out_f >= 2048 and T > 16 else 64 if out_f > 32 else 32 if out_f > 16 else 16,
        "BLOCK_R": max(16, min(_p2(r_cap), 64)),
        "num_warps": 4,
        "num_stages": 2,
    }


def _default_persistent(dtype: Any, T: int, in_f: int, out_f: int, r_cap: int) -> dict[str, Any]:
    """The persistent kernel's config by the model in docs/benchmarks.md ("How configs are chosen"):

    * BLOCK_M (a plan family): 16 for decode (T <= 64: one tile per request; tl.dot's minimum), 64 up to
      T = 512 and 128 above: every tile re-reads its adapter's A and B (L2 hits, but issued bytes), so taller
      tiles bring issued bytes toward the perfect-cache bytes (<= 1.1x on the proxy's prefill cases);
    * BLOCK_N: 32 for decode (many small expand items, so even a one-tile batch fills the expand role: the busiest program moves ~1/P of the bytes), 128 for
      prefill (half the re-reads of h per column block);
    * BLOCK_K: 64 (16-byte loads, 2 pipeline stages of x and A tiles fit easily);
    * N_K = 0: the launcher sizes the split of ``in`` from the shape (``persistent_plan``);
    * num_warps 4 for decode, 8 for prefill (no spills on sm_90 for ranks up to 64: checked by the AOT test);
    * fp32: BLOCK_N 32, BLOCK_M at most 64, 8 warps in every bucket (fp32 ``tl.dot`` in IEEE precision runs on
      FMAs with its operands, the accumulator and the y tile in registers: wider tiles spill on sm_90);
    * CTAS_PER_SM: 2 with 4 warps (<= 255 registers x 128 threads x 2 fits 64K registers: always resident),
      1 with 8 warps. Every program of the grid must be resident: the expand role waits for the shrink role.
    """
    if _dtype_name(dtype) == "fp32":  # see above: narrow column blocks and 8 warps, or sm_90 spills
        return {"BLOCK_M": 16 if T <= 64 else 64, "BLOCK_N": 32, "BLOCK_K": 64, "N_K": 0, "CTAS_PER_SM": 1,
                "num_warps": 8, "num_stages": 2}
    if T <= 64:
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "N_K": 0, "CTAS_PER_SM": 2, "num_warps": 4,
                "num_stages": 2}
    if T <= 512:
        # 8 warps: with 4, the [64, 128] fp32 accumulator plus a rank-64 B tile compile to 255 registers and
        # spill on sm_90 (the proxy's AOT compile); with 8 they fit, at one CTA per SM
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "N_K": 0, "CTAS_PER_SM": 1, "num_warps": 8,
                "num_stages": 2}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "N_K": 0, "CTAS_PER_SM": 1, "num_warps": 8,
            "num_stages": 2}


def default_config(op: str, dtype: Any, T: int, in_f: int, out_f: int, r_cap: int) -> dict[str, Any]:
    """Config for a shape when the GPU's table has no entry (the documented model). Returns a new dict.

    ``add_lora`` defaults to the ``"persistent"`` strategy (one launch for every T, see
    :func:`_default_persistent`); ``"fused"`` and ``"two_pass"`` remain selectable (explicit config or a tuned
    table) and keep their own defaults."""
    if op == "shrink":
        return _default_shrink(T, in_f, r_cap)
    if op == "expand":
        return _default_expand(T, out_f, r_cap)
    if op == "add_lora":
        bm = _block_m(T)
        return {
            "strategy": "persistent",
            # fused: the h tile [BLOCK_M, p2(r_cap)] lives in registers, so keep BLOCK_M small.
            "BLOCK_M": 16 if T <= 16 or r_cap > 64 else min(bm, 32),
            "BLOCK_N": 64 if out_f > 32 else 32 if out_f > 16 else 16,
            "BLOCK_K": 64 if in_f >= 64 else 32 if in_f > 16 else 16,
            "N_SPLIT": max(1, min(16, out_f // 256)),
            "num_warps": 4,
            "num_stages": 2,
            "shrink": _default_shrink(T, in_f, r_cap),
            "expand": _default_expand(T, out_f, r_cap),
            "persistent": _default_persistent(dtype, T, in_f, out_f, r_cap),
        }
    raise ValueError(f"op: expected one of {OPS}, got {op!r}")


# ---- validation -------------------------------------------------------------------------------------------
def validate_config(op: str, entry: Any, *, where: str = "config") -> dict[str, Any]:
    """The valid part of ``entry`` for ``op``: unknown keys and bad values are dropped with a warning."""
    if not isinstance(entry, dict):
        warnings.warn(f"{where}: expected a dict for op {op!r}, got {type(entry).__name__}; ignored", stacklevel=3)
        return {}
    allowed = _KEYS[op]
    out: dict[str, Any] = {}
    for k, v in entry.items():
        if k not in allowed:
            warnings.warn(f"{where}: unknown key {k!r} for op {op!r} (expected one of {allowed}); ignored",
                          stacklevel=3)
        elif k in ("shrink", "expand", "persistent"):
            out[k] = validate_config(k, v, where=f"{where}.{k}")
        elif not _valid_value(k, v) or (op == "persistent" and k == "BLOCK_M" and v not in PLAN_BLOCK_M):
            warnings.warn(f"{where}: bad value {v!r} for {k!r}; ignored", stacklevel=3)
        else:
            out[k] = v
    return out


def _merge(op: str, base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k in ("shrink", "expand", "persistent") and op == "add_lora":
            out[k] = {**out.get(k, {}), **v}
        else:
            out[k] = v
    return out


# ---- tables -----------------------------------------------------------------------------------------------
def _sanitise(gpu_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", gpu_name).strip("_") or "unknown"


def table_path(gpu_name: str) -> str:
    """Path of the table file for a GPU (``torch.cuda.get_device_name()``), e.g. ``NVIDIA_H100_80GB_HBM3.json``."""
    return os.path.join(_DIR, _sanitise(gpu_name) + ".json")


@functools.cache
def _load_table_cached(gpu_name: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    path = table_path(gpu_name)
    if not os.path.exists(path):
        return ()
    try:
        with open(path) as f:
            data = json.load(f)
        entries = data["entries"]
        if not isinstance(entries, dict):
            raise TypeError(f"entries: expected a dict, got {type(entries).__name__}")
    except Exception as e:  # noqa: BLE001  (never fail an op because of a broken table)
        warnings.warn(f"tuning table {path}: unreadable ({e}); using default configs", stacklevel=2)
        return ()
    out = []
    for key, entry in entries.items():
        op = key.split("|", 1)[0] if isinstance(key, str) else None
        if op not in OPS:
            warnings.warn(f"tuning table {path}: bad key {key!r}; ignored", stacklevel=2)
            continue
        out.append((key, validate_config(op, entry, where=f"{path}[{key}]")))
    return tuple(out)


# Compiled (csrc/) kernels that replace a tested default path only on GPUs where `lora-bench tune` checked
# them against that path. Names: "build_batch_cuda" (the LoRABatch builder of the extension), "sgmv_decode_cuda"
# (add_lora_'s decode kernel for T <= 64, csrc/sgmv_decode.cu: lora_kernels.ops.sgmv._decode_op),
# "fused_linear_cuda" (LoRALinear's base GEMV + delta in one launch for T <= 64, csrc/fused_lora_linear.cu:
# lora_kernels.nn.lora_linear._fused_op).
VERIFIABLE_KERNELS = ("build_batch_cuda", "merge_cuda", "deform_cuda", "sgmv_decode_cuda", "fused_linear_cuda")


@functools.cache
def _verified_cached(gpu_name: str) -> frozenset:
    path = table_path(gpu_name)
    if not os.path.exists(path):
        return frozenset()
    try:
        with open(path) as f:
            names = json.load(f).get("verified_kernels", [])
        return frozenset(n for n in names if n in VERIFIABLE_KERNELS)
    except Exception:  # noqa: BLE001  (a broken table is reported by _load_table_cached)
        return frozenset()


def verified_kernels(device: Any) -> frozenset:
    """Names of the compiled kernels that passed the reference check on ``device``'s GPU (written by
    ``lora-bench tune``); empty for CPU devices and GPUs without a table."""
    gpu = _device_gpu(device)
    return _verified_cached(gpu) if gpu is not None else frozenset()


def load_table(gpu_name: str) -> dict[str, dict[str, Any]]:
    """Validated entries of a GPU's table, keyed by :func:`bucket_key` ({} when there is no table)."""
    return {k: copy.deepcopy(v) for k, v in _load_table_cached(gpu_name)}


def write_table(
    gpu_name: str,
    entries: dict[str, dict[str, Any]],
    meta: dict[str, Any] | None = None,
    verified_kernels: Any = None,
) -> str:
    """Write a GPU's table and return its path. ``meta`` (e.g. ``{"commit": ...}``) is stored alongside;
    the GPU name and the torch/triton versions are added. ``verified_kernels``: names from
    ``VERIFIABLE_KERNELS`` that passed their check on this GPU (None keeps those of the existing table).
    Invalid entries raise ``ValueError``."""
    if verified_kernels is None:
        verified_kernels = sorted(_verified_cached(gpu_name))
    bad = [n for n in verified_kernels if n not in VERIFIABLE_KERNELS]
    if bad:
        raise ValueError(f"verified_kernels: expected names from {VERIFIABLE_KERNELS}, got {bad}")
    for key, entry in entries.items():
        op = key.split("|", 1)[0]
        if op not in OPS:
            raise ValueError(f"entries: expected keys from bucket_key(), got {key!r}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ok = validate_config(op, entry)
        if ok != entry:
            raise ValueError(f"entries[{key!r}]: expected a valid {op} config, got {entry!r}")
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001  # pragma: no cover
        triton_version = None
    data = {
        "gpu": gpu_name,
        "torch": torch.__version__,
        "triton": triton_version,
        **(meta or {}),
        "verified_kernels": sorted(set(verified_kernels)),
        "entries": dict(sorted(entries.items())),
    }
    path = table_path(gpu_name)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    clear_cache()
    return path


def clear_cache() -> None:
    """Forget loaded tables and resolved configs (after writing a table)."""
    _load_table_cached.cache_clear()
    _verified_cached.cache_clear()
    _resolve.cache_clear()
    _gpu_name.cache_clear()


@functools.cache
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=4096)
def _resolve(op: str, dtype: str, gpu: str | None, T: int, in_f: int, out_f: int, r_cap: int) -> dict[str, Any]:
    base = default_config(op, dtype, T, in_f, out_f, r_cap)
    if gpu is None:
        return base
    entry = dict(_load_table_cached(gpu)).get(bucket_key(op, dtype, T, in_f, out_f, r_cap))
    return _merge(op, base, entry) if entry else base


def _device_gpu(device: Any) -> str | None:
    if device is None:
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _gpu_name(index)


def get_config_cached(
    op: str, dtype: Any, T: int, in_f: int, out_f: int, r_cap: int, device: Any = None
) -> dict[str, Any]:
    """:func:`get_config` without the copy: the launchers' hot path. Do not mutate the result."""
    # The defaults depend on the exact sizes only through thresholds, but cache on the exact values: the
    # number of distinct shapes a model sees is small.
    return _resolve(op, _dtype_name(dtype), _device_gpu(device), int(T), int(in_f), int(out_f), int(r_cap))


def get_config(op: str, dtype: Any, T: int, in_f: int, out_f: int, r_cap: int, device: Any = None) -> dict[str, Any]:
    """The config for ``op`` on ``device`` (a torch device, or None = defaults): the GPU table's entry for
    :func:`bucket_key` merged over :func:`default_config`. CPU devices get the defaults without touching CUDA.
    Returns a new dict."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    return copy.deepcopy(get_config_cached(op, dtype, T, in_f, out_f, r_cap, device))


# ---- sweep space ------------------------------------------------------------------------------------------
def candidate_configs(op: str, dtype: Any, T: int, in_f: int, out_f: int, r_cap: int) -> list[dict[str, Any]]:
    """A small sweep space for ``lora-bench tune`` (each entry a full config; the default comes first).

    Sizes larger than the problem are left out (a 128-row tile for 8 tokens only wastes work).
    """
    base = default_config(op, dtype, T, in_f, out_f, r_cap)
    bms = [m for m in (16, 32, 64, 128) if m <= max(16, _p2(T))]
    rp2 = max(16, _p2(r_cap))
    out: list[dict[str, Any]] = [base]

    def add(c: dict[str, Any]) -> None:
        if c not in out:
            out.append(c)

    if op == "shrink":
        splits = [1, 2, 4, 8, 16, 32] if T <= 64 else [1, 2, 4]
        for bm in bms:
            for bk in (32, 64, 128):
                for br in sorted({min(rp2, 32), min(rp2, 64), rp2}):
                    for sk in splits:
                        if sk > 1 and in_f // sk < bk:
                            continue
                        for nw in (4, 8) if bm * br >= 64 * 64 else (4,):
                            add({**base, "BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_R": br, "SPLIT_K": sk,
                                 "num_warps": nw, "num_stages": 3 if bk <= 64 else 2})
    elif op == "expand":
        for bm in bms:
            for bn in (16, 32, 64, 128, 256):
                if bn > max(16, _p2(out_f)):
                    continue
                for br in sorted({min(rp2, 32), min(rp2, 64)}):
                    for nw in (4, 8) if bm * bn >= 64 * 128 else (4,):
                        add({**base, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_R": br, "num_warps": nw,
                             "num_stages": 2})
    elif op == "add_lora":
        # two-pass: the best shrink and expand are tuned separately; the two are combined here only with
        # the default of the other half, plus the fused kernel's own sweep.
        for c in candidate_configs("shrink", dtype, T, in_f, out_f, r_cap)[:24]:
            add({**base, "strategy": "two_pass", "shrink": c})
        for c in candidate_configs("expand", dtype, T, in_f, out_f, r_cap)[:12]:
            add({**base, "strategy": "two_pass", "expand": c})
        # the persistent kernel: tile height (a plan family), column block, split of `in` (0: the model's)
        for bm in [m for m in PLAN_BLOCK_M if m <= max(16, _p2(T))]:
            for bn in (32, 64, 128):
                for nk in (0, 1, 4, 16):
                    for nw in (4, 8):
                        add({**base, "strategy": "persistent",
                             "persistent": {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "N_K": nk,
                                            "CTAS_PER_SM": 2 if nw == 4 else 1, "num_warps": nw, "num_stages": 2}})
        if T <= 256:
            for bm in [m for m in bms if m <= (32 if rp2 <= 64 else 16)]:
                for bn in (32, 64, 128):
                    for ns in sorted({1, 4, 8, 16, 32, max(1, out_f // 256)}):
                        if ns * bn > max(bn, out_f):
                            continue
                        add({**base, "strategy": "fused", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64,
                             "N_SPLIT": ns, "num_warps": 4, "num_stages": 2})
    else:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    return out
