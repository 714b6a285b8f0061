"""Shared pieces of the adapter-file tests (tests/test_adapter_files.py, tests/test_fuzz_adapter_files.py and the
subprocess scripts they run): a tiny model's pool, a valid adapter written by the library's writer, raw
safetensors editing, PEFT's own scale rule as the independent reference, and "pool unchanged, still serving"."""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import torch

import lora_kernels as lk
from lora_kernels.peft_format import CONFIG_NAME, WEIGHTS_NAME, save_peft_adapter
from lora_kernels.pool import AdapterPool

IN = 8
OUTS = {"model.layers.0.self_attn.q_proj": 8, "model.layers.0.self_attn.v_proj": 4}
Q, V = OUTS
PREFIX = "base_model.model."
MAX_RANK = 4


def make_pool(n_slots: int = 3) -> AdapterPool:
    return AdapterPool({p: lk.LoRAWeights(IN, o, n_slots, MAX_RANK, dtype=torch.float32) for p, o in OUTS.items()})


def factors(seed: int, rank: int = 2):
    g = torch.Generator().manual_seed(seed)
    return {p: (torch.randn(rank, IN, generator=g) / IN**0.5, torch.randn(o, rank, generator=g) / rank**0.5)
            for p, o in OUTS.items()}


def write_base(d: Path, seed: int = 0, rank: int = 2, alpha: float = 4.0, **cfg) -> Path:
    """A valid PEFT adapter directory for the tiny model, written by ``save_peft_adapter``."""
    save_peft_adapter(d, factors(seed, rank), r=rank, lora_alpha=alpha, **cfg)
    return d


# ---- raw file editing ----------------------------------------------------------------------------------------
def read_st(f: Path):
    """(header dict, data bytes) of a safetensors file, read without any library."""
    raw = Path(f).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(f: Path, header, data: bytes, n: int | None = None) -> None:
    """Write a safetensors file from a header (dict, or raw bytes) and a data buffer; ``n`` overrides the
    declared header length (to lie about it)."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    Path(f).write_bytes(struct.pack("<Q", len(hb) if n is None else n) + hb + data)


def edit_config(d: Path, fn) -> Path:
    c = json.loads((d / CONFIG_NAME).read_text())
    fn(c)
    (d / CONFIG_NAME).write_text(json.dumps(c))
    return d


# ---- the independent reference: PEFT's rule on the parsed JSON, tensors read by safetensors ---------------------
def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """A verbatim copy of peft 0.21's ``peft.utils.other.get_pattern_key`` (importing peft costs ~9 s, too much
    for the fuzz subprocess); tests/test_adapter_files.py checks that it agrees with the installed peft."""
    for key in pattern_keys:
        match = re.match(rf"(.*\.)?({key})$", key_to_match)
        if not match:
            continue
        return key
    return key_to_match


def peft_scale(cfg: dict, path: str) -> float:
    """Module ``path``'s scale exactly as peft computes it (get_pattern_key on rank/alpha_pattern)."""
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    r = rp.get(get_pattern_key(rp.keys(), path), cfg.get("r", 8))
    a = ap.get(get_pattern_key(ap.keys(), path), cfg.get("lora_alpha", 8))
    return a / math.sqrt(r) if cfg.get("use_rslora") else a / r


def dense_reference(d: Path, cfg: dict | None = None) -> dict:
    """{module path: scale * B @ A in float64} from the files, read with safetensors and json directly."""
    from safetensors.torch import load_file

    cfg = json.loads((d / CONFIG_NAME).read_text()) if cfg is None else cfg
    sd = load_file(str(d / WEIGHTS_NAME))
    out = {}
    for k, A in sd.items():
        if ".lora_A." in k:
            path = k.removeprefix(PREFIX).split(".lora_A.")[0]
            B = sd[k.replace(".lora_A.", ".lora_B.")]
            out[path] = peft_scale(cfg, path) * B.double() @ A.double()
    return out


# ---- pool state and serving --------------------------------------------------------------------------------------
def snapshot(pool: AdapterPool):
    layers = [(w.a.clone(), w.b.clone(), w.offsets.clone(), w.ranks.clone(), w.scales.clone(), w.free_ranges)
              for _, w in pool.layers]
    return pool.names, pool.resident, {n: pool.refcount(n) for n in pool.names}, layers


def assert_same(s0, s1) -> None:
    assert s0[:3] == s1[:3]
    for l0, l1 in zip(s0[3], s1[3]):
        for t0, t1 in zip(l0[:5], l1[:5]):
            assert torch.equal(t0, t1)
        assert l0[5] == l1[5]


def check_serving(pool: AdapterPool, dense: dict, names, seed: int = 0, tol: float = 1e-5) -> None:
    """Serve a mixed batch (one token per name, None = no adapter) and compare with the dense references
    ``dense[name][path]`` in float64."""
    x = torch.randn(len(names), IN, generator=torch.Generator().manual_seed(seed))
    with pool.use(names) as ids:
        batch = lk.LoRABatch(len(names), pool.num_slots)
        batch.build(torch.tensor(ids, dtype=torch.int32))
        for paths, w in pool.layers:
            y = torch.zeros(len(names), w.out_features, dtype=w.dtype)
            lk.add_lora_(y, x, w, batch)
            for p, c0, n in zip(paths, w.slice_cols, w.slice_outs):
                want = torch.zeros(len(names), n, dtype=torch.float64)
                for t, nm in enumerate(names):
                    if nm is not None and p in dense[nm]:
                        want[t] = dense[nm][p] @ x[t].double()
                got = y[:, c0 : c0 + n].double()
                scale = max(want.abs().max().item(), 1.0)
                assert (got - want).abs().max().item() <= tol * scale, (p, names)
