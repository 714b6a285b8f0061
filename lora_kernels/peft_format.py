"""Reading (and writing) LoRA adapters in PEFT's file format, safetensors only.

Semantics:
    A PEFT LoRA adapter is ``adapter_config.json`` plus ``adapter_model.safetensors`` whose keys are
    ``base_model.model.<module path>.lora_A.weight`` ([r, in]) and ``...lora_B.weight`` ([out, r]); some PEFT
    versions (and in-memory state dicts) put the adapter name in between (``lora_A.default.weight``); both
    forms, and keys without the ``base_model.model.`` prefix, are read. For module path ``p``:

        r_p     = rank_pattern[key matching p] or r          (PEFT's get_pattern_key: ``(.*\\.)?key$``)
        alpha_p = alpha_pattern[key matching p] or lora_alpha
        scale_p = alpha_p / r_p   (alpha_p / sqrt(r_p) with use_rslora)
        delta_p(x) = scale_p * (x @ A_p^T) @ B_p^T

    ``fan_in_fan_out`` (GPT-2's Conv1D) transposes only the base weight in PEFT; the LoRA factors keep the
    shapes above, so it needs nothing here. Options that change the maths and are not implemented (DoRA,
    LoRA bias, aLoRA, layer replication, modules_to_save, bias != "none", ...) raise
    :class:`UnsupportedAdapterError`, as does an option this reader does not know unless its value is a
    default (None / False / empty). Nothing is ever unpickled: ``.bin`` / ``.pt`` files are refused.

Errors are :class:`AdapterFormatError` (a ValueError) naming the file, the key and expected vs actual.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "AdapterFormatError",
    "UnsupportedAdapterError",
    "HostAdapter",
    "AdapterConfig",
    "read_peft_adapter",
    "save_peft_adapter",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

PathLike = Union[str, "os.PathLike[str]"]


class AdapterFormatError(ValueError):
    """A malformed adapter file, or one that does not fit the layers it is loaded into."""


class UnsupportedAdapterError(AdapterFormatError):
    """A valid PEFT adapter using an option this library does not implement (e.g. DoRA)."""


# Options that only affect initialisation, training or bookkeeping: the delta is the same whatever they hold.
_IGNORED = frozenset({
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "lora_dropout", "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "megatron_config", "megatron_core", "runtime_config", "qalora_group_size", "ensure_weight_tying",
    "layers_to_transform", "layers_pattern",  # restrict which modules have keys: the keys say it
})
# Options that change the maths: accepted only at the value that means "plain LoRA".
_MUST_BE_OFF = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a bias on lora_B",
    "alora_invocation_tokens": "aLoRA (activated LoRA)",
    "use_qalora": "QALoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "trainable_token_indices": "trainable token embeddings",
    "modules_to_save": "fully trained modules (modules_to_save)",
}
_HANDLED = frozenset({"peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
                      "target_modules", "exclude_modules", "fan_in_fan_out", "bias"})

_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.(?P<name>[^.]+))?\.weight$")


def _is_default(v: Any) -> bool:
    return v is None or v is False or (isinstance(v, (dict, list, tuple, str)) and len(v) == 0)


def _pattern_key(patterns: Sequence[str], path: str) -> Optional[str]:
    # PEFT's get_pattern_key: the first key k (in order) with re.match(rf"(.*\.)?({k})$", path).
    for k in patterns:
        if re.match(rf"(.*\.)?({k})$", path):
            return k
    return None


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT ``LoraConfig`` that define the delta (see the module docstring)."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    target_modules: Union[None, str, Tuple[str, ...]] = None
    exclude_modules: Union[None, str, Tuple[str, ...]] = None
    fan_in_fan_out: bool = False
    #: layers_to_transform / layers_pattern set: only some layers of target_modules have a LoRA.
    layer_subset: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "adapter config") -> "AdapterConfig":
        """Validate a PEFT config dict. Raises UnsupportedAdapterError / AdapterFormatError naming the key."""
        if not isinstance(d, Mapping):
            raise AdapterFormatError(f"{source}: expected a JSON object, got {type(d).__name__}")
        pt = d.get("peft_type", "LORA")
        pt = getattr(pt, "value", pt)  # peft's PeftType enum in LoraConfig.to_dict()
        if pt is not None and str(pt).upper() != "LORA":
            raise UnsupportedAdapterError(f"{source}: peft_type: expected 'LORA', got {pt!r}")
        for k, what in _MUST_BE_OFF.items():
            if not _is_default(d.get(k)):
                raise UnsupportedAdapterError(f"{source}: {k}: {what} is not supported (expected it off/null, "
                                              f"got {d[k]!r})")
        if d.get("bias", "none") not in ("none", None):
            raise UnsupportedAdapterError(f"{source}: bias: expected 'none' (trained biases are not supported), "
                                          f"got {d['bias']!r}")
        for k, v in d.items():
            if k not in _IGNORED and k not in _HANDLED and k not in _MUST_BE_OFF and not _is_default(v):
                raise UnsupportedAdapterError(f"{source}: {k}: unknown option (it may change the maths), "
                                              f"expected it absent or null, got {v!r}")
        r = d.get("r", 8)
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise AdapterFormatError(f"{source}: r: expected an int >= 1, got {r!r}")
        alpha = d.get("lora_alpha", 8)
        for k in ("rank_pattern", "alpha_pattern"):
            if not isinstance(d.get(k) or {}, Mapping):
                raise AdapterFormatError(f"{source}: {k}: expected an object {{module pattern: value}}, got "
                                         f"{type(d[k]).__name__}")
        for k in ("use_rslora", "fan_in_fan_out"):
            if not isinstance(d.get(k) or False, bool):  # bool("no") is True: never guess a flag
                raise AdapterFormatError(f"{source}: {k}: expected true/false, got {d[k]!r}")
        for k in ("target_modules", "exclude_modules"):
            v = d.get(k)
            if v is not None and not isinstance(v, str) and not (
                    isinstance(v, (list, tuple, set, frozenset)) and all(isinstance(t, str) for t in v)):
                raise AdapterFormatError(f"{source}: {k}: expected a regex string or a list of module names, "
                                         f"got {v!r}")
        rp = dict(d.get("rank_pattern") or {})
        ap = dict(d.get("alpha_pattern") or {})
        for name, v in [("lora_alpha", alpha)] + [(f"alpha_pattern[{k!r}]", v) for k, v in ap.items()]:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v == 0:
                raise AdapterFormatError(f"{source}: {name}: expected a finite nonzero number (alpha 0 makes the "
                                         f"adapter a no-op), got {v!r}")
        for k, v in rp.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise AdapterFormatError(f"{source}: rank_pattern[{k!r}]: expected an int >= 1, got {v!r}")
        tm = d.get("target_modules")
        em = d.get("exclude_modules")
        return cls(
            r=r, lora_alpha=float(alpha), use_rslora=bool(d.get("use_rslora", False)),
            rank_pattern=rp, alpha_pattern={k: float(v) for k, v in ap.items()},
            target_modules=tuple(sorted(tm)) if isinstance(tm, (list, tuple, set, frozenset)) else tm,
            exclude_modules=tuple(sorted(em)) if isinstance(em, (list, tuple, set, frozenset)) else em,
            fan_in_fan_out=bool(d.get("fan_in_fan_out", False)),
            layer_subset=not (_is_default(d.get("layers_to_transform")) and _is_default(d.get("layers_pattern"))),
        )

    def rank_for(self, path: str) -> int:
        k = _pattern_key(list(self.rank_pattern), path)
        return int(self.rank_pattern[k]) if k is not None else self.r

    def alpha_for(self, path: str) -> float:
        k = _pattern_key(list(self.alpha_pattern), path)
        return float(self.alpha_pattern[k]) if k is not None else self.lora_alpha

    def scale_for(self, path: str) -> float:
        r = self.rank_for(path)
        a = self.alpha_for(path)
        return a / math.sqrt(r) if self.use_rslora else a / r

    def targets(self, path: str) -> Optional[bool]:
        """Whether PEFT would put a LoRA on module ``path`` (None when the config cannot say: no or
        'all-linear' target_modules, or a layer subset)."""
        tm = self.target_modules
        if tm is None or tm == "all-linear" or self.layer_subset:
            return None
        if _matches(self.exclude_modules, path):
            return False
        return _matches(tm, path)


def _matches(spec, path: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == t or path.endswith("." + t) for t in spec)


@dataclass
class HostAdapter:
    """A validated adapter on the host: ``modules[path] = (A [r, in], B [out, r], scale)``."""

    name: str
    modules: Dict[str, Tuple[torch.Tensor, torch.Tensor, float]]
    config: AdapterConfig
    source: str

    @property
    def nbytes(self) -> int:
        return sum(A.numel() * A.element_size() + B.numel() * B.element_size() for A, B, _ in self.modules.values())


def _resolve(path: PathLike, config) -> Tuple[Path, Mapping[str, Any], str]:
    p = Path(os.fspath(path))
    if p.suffix.lower() in _PICKLE_SUFFIXES:
        raise AdapterFormatError(f"{p}: expected a .safetensors file or a PEFT directory; pickle-based files "
                                 f"({p.suffix}) are never loaded (convert them with safetensors)")
    if p.is_dir():
        weights = p / WEIGHTS_NAME
        if not weights.is_file():
            pickled = [q.name for q in p.iterdir() if q.suffix.lower() in _PICKLE_SUFFIXES]
            hint = f" (found {pickled}: pickle-based files are never loaded)" if pickled else ""
            raise AdapterFormatError(f"{p}: expected {WEIGHTS_NAME} in the directory{hint}")
        cfg_path = p / CONFIG_NAME
    elif p.is_file():
        if p.suffix.lower() != ".safetensors":
            raise AdapterFormatError(f"{p}: expected a .safetensors file or a PEFT directory, got suffix {p.suffix!r}")
        weights, cfg_path = p, p.parent / CONFIG_NAME
    else:
        raise AdapterFormatError(f"{p}: expected an existing file or directory, got nothing there")
    if config is None:
        if not cfg_path.is_file():
            raise AdapterFormatError(f"{p}: expected {CONFIG_NAME} next to the weights (or config=...), none found")
        try:
            config = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AdapterFormatError(f"{cfg_path}: expected valid JSON, got {type(e).__name__}: {e}") from e
        src = str(cfg_path)
    elif isinstance(config, (str, os.PathLike)):
        try:
            src = os.fspath(config)
            config = json.loads(Path(src).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AdapterFormatError(f"config: expected a readable JSON file, got {type(e).__name__}: {e}") from e
    else:
        if hasattr(config, "to_dict"):  # a peft LoraConfig
            config = config.to_dict()
        src = "config"
    return weights, config, src


def read_peft_adapter(
    path: PathLike,
    *,
    name: Optional[str] = None,
    config: Union[None, PathLike, Mapping[str, Any], Any] = None,
    expected: Optional[Mapping[str, Tuple[int, int]]] = None,
    adapter_name: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    pin: bool = False,
) -> HostAdapter:
    """Read and validate one PEFT LoRA adapter (safetensors only, via ``safe_open``).

    Args:
        path: a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``) or a ``.safetensors``
            file (config from ``config=`` or ``adapter_config.json`` in the same directory).
        name: the adapter's name (default: the directory/file name).
        config: a config dict, a peft ``LoraConfig``, or a path to a JSON file; overrides the one on disk.
        expected: ``{module path: (in_features, out_features)}`` of the layers it will be loaded into. With
            it, every module in the file must be there with those shapes, and every module there that
            ``target_modules`` selects must be in the file.
        adapter_name: the infix to read when the keys carry one (``lora_A.<adapter_name>.weight``) and the
            file holds several; default: the only one present.
        dtype: convert the factors to this dtype (default: keep the file's); the converted values are
            checked to be finite too (fp32 -> fp16 may overflow).
        pin: pin the host tensors (for asynchronous host-to-device copies; needs CUDA, ignored without it).

    Raises:
        AdapterFormatError: unreadable/truncated files, pickle-based files, missing or extra keys, wrong
            shapes, a rank that disagrees with the config, alpha 0, NaN/Inf values.
        UnsupportedAdapterError: DoRA and other options not implemented (see the module docstring).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike (a PEFT directory or .safetensors file), got "
                        f"{type(path).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype: expected None or a floating-point torch.dtype, got {dtype!r}")
    weights, cfg_dict, cfg_src = _resolve(path, config)
    cfg = AdapterConfig.from_dict(cfg_dict, cfg_src)
    name = name if name is not None else Path(os.fspath(path)).stem
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as e:  # pragma: no cover - safetensors is in requirements-dev.txt
        raise ImportError("reading adapters needs the safetensors package (pip install safetensors)") from e
    raw: Dict[str, Dict[str, torch.Tensor]] = {}
    names = set()
    try:
        with safe_open(os.fspath(weights), framework="pt", device="cpu") as f:
            keys = list(f.keys())
            for k in keys:
                m = _KEY_RE.match(k)
                if m is None:
                    what = ("DoRA magnitude" if "lora_magnitude_vector" in k else "embedding LoRA"
                            if "lora_embedding" in k else "a bias on lora_B" if ".lora_B" in k and k.endswith(".bias")
                            else None)
                    if what:
                        raise UnsupportedAdapterError(f"{weights}: key {k!r}: {what} is not supported")
                    raise AdapterFormatError(f"{weights}: key {k!r}: expected '<module path>.lora_A.weight' or "
                                             "'<module path>.lora_B.weight'")
                nm = m.group("name")
                if adapter_name is not None and nm is not None and nm != adapter_name:
                    continue
                names.add(nm)
                raw.setdefault(m.group("path"), {})[m.group("ab")] = f.get_tensor(k)
    except SafetensorError as e:
        raise AdapterFormatError(f"{weights}: expected a readable safetensors file, got {e}") from e
    except (OSError, RuntimeError) as e:  # mmap / short read of a truncated file
        raise AdapterFormatError(f"{weights}: expected a readable safetensors file, got {type(e).__name__}: {e}") from e
    if len(names) > 1:
        raise AdapterFormatError(f"{weights}: expected keys of one adapter, got adapter names "
                                 f"{sorted(map(str, names))} (pass adapter_name=)")
    if not raw:
        raise AdapterFormatError(f"{weights}: expected lora_A/lora_B weights, got none"
                                 + (f" for adapter_name={adapter_name!r}" if adapter_name else ""))
    modules: Dict[str, Tuple[torch.Tensor, torch.Tensor, float]] = {}
    for mp in sorted(raw):
        ab = raw[mp]
        for part in ("A", "B"):
            if part not in ab:
                raise AdapterFormatError(f"{weights}: module {mp!r}: missing key lora_{part}.weight "
                                         f"(found only lora_{'B' if part == 'A' else 'A'})")
        A, B = ab["A"], ab["B"]
        if A.ndim != 2 or B.ndim != 2:
            raise UnsupportedAdapterError(f"{weights}: module {mp!r}: expected 2-D lora_A/lora_B (linear layers), "
                                          f"got shapes {tuple(A.shape)} / {tuple(B.shape)}")
        if not A.is_floating_point() or not B.is_floating_point():
            raise AdapterFormatError(f"{weights}: module {mp!r}: expected float weights, got {A.dtype} / {B.dtype}")
        r = A.shape[0]
        if B.shape[1] != r:
            raise AdapterFormatError(f"{weights}: module {mp!r}: lora_B.weight: expected shape ({B.shape[0]}, {r}) "
                                     f"(rank of lora_A), got {tuple(B.shape)}")
        r_cfg = cfg.rank_for(mp)
        if r != r_cfg:
            raise AdapterFormatError(f"{weights}: module {mp!r}: lora_A.weight: expected rank {r_cfg} (r / "
                                     f"rank_pattern of the config), got {r}")
        if expected is not None:
            if mp not in expected:
                raise AdapterFormatError(f"{weights}: module {mp!r}: extra key: expected one of the pool's modules "
                                         f"{_short(sorted(expected))}")
            in_f, out_f = expected[mp]
            if A.shape[1] != in_f:
                raise AdapterFormatError(f"{weights}: module {mp!r}: lora_A.weight: expected shape ({r}, {in_f}), "
                                         f"got {tuple(A.shape)}")
            if B.shape[0] != out_f:
                raise AdapterFormatError(f"{weights}: module {mp!r}: lora_B.weight: expected shape ({out_f}, {r}), "
                                         f"got {tuple(B.shape)}")
        if dtype is not None:
            A, B = A.to(dtype), B.to(dtype)
        for part, t in (("lora_A", A), ("lora_B", B)):
            if not bool(torch.isfinite(t).all()):
                raise AdapterFormatError(f"{weights}: module {mp!r}: {part}.weight: expected finite values, got "
                                         f"NaN/Inf" + (f" (after conversion to {dtype})" if dtype is not None else ""))
        modules[mp] = (A.contiguous(), B.contiguous(), cfg.scale_for(mp))
    if expected is not None:
        missing = [mp for mp in expected if mp not in modules and cfg.targets(mp)]
        if missing:
            raise AdapterFormatError(f"{weights}: missing keys: target_modules selects {_short(missing)} but the file "
                                     f"has no lora_A/lora_B for them")
    if pin and torch.cuda.is_available():
        modules = {k: (A.pin_memory(), B.pin_memory(), s) for k, (A, B, s) in modules.items()}
    return HostAdapter(name=name, modules=modules, config=cfg, source=os.fspath(path))


def _short(items, n: int = 4) -> str:
    items = list(items)
    return repr(items) if len(items) <= n else repr(items[:n])[:-1] + f", ... ({len(items)} in all)]"


def save_peft_adapter(
    directory: PathLike,
    modules: Mapping[str, Tuple[torch.Tensor, torch.Tensor]],
    *,
    r: int,
    lora_alpha: float,
    target_modules: Optional[Sequence[str]] = None,
    rank_pattern: Optional[Mapping[str, int]] = None,
    alpha_pattern: Optional[Mapping[str, float]] = None,
    use_rslora: bool = False,
) -> Path:
    """Write ``{module path: (A [r, in], B [out, r])}`` as a PEFT LoRA directory (the layout
    ``PeftModel.save_pretrained`` writes: keys ``base_model.model.<path>.lora_{A,B}.weight``). Returns the
    directory. For examples and tests that need many adapter files without building PEFT models.

    Raises:
        TypeError / ValueError naming ``modules[path]`` (not a pair of float tensors, not 2-D, ranks of A and B
        that differ or disagree with ``r`` / ``rank_pattern``, NaN/Inf values), ``r`` or ``lora_alpha`` (not finite):
        structurally broken files are never written (nothing is written when it raises).
    """
    from safetensors.torch import save_file

    if not isinstance(modules, Mapping) or not modules:
        raise ValueError(f"modules: expected a non-empty mapping {{module path: (A, B)}}, got {modules!r:.80}")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r: expected an int >= 1, got {r!r}")
    # alpha 0 is written (a valid PEFT file, which read_peft_adapter refuses as a no-op: tests need such files).
    if not isinstance(lora_alpha, (int, float)) or isinstance(lora_alpha, bool) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha: expected a finite number, got {lora_alpha!r}")
    ranks = AdapterConfig(r=r, lora_alpha=float(lora_alpha), rank_pattern=dict(rank_pattern or {}))
    for mp, pair in modules.items():
        where = f"modules[{mp!r}]"
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(
                isinstance(t, torch.Tensor) and t.is_floating_point() for t in pair):
            raise TypeError(f"{where}: expected a pair (A, B) of floating-point tensors, got {type(pair).__name__}")
        A, B = pair
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or A.shape[0] != ranks.rank_for(mp):
            raise ValueError(f"{where}: expected A [r, in] and B [out, r] with r = {ranks.rank_for(mp)} (r / "
                             f"rank_pattern), got A {tuple(A.shape)}, B {tuple(B.shape)}")
        if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
            raise ValueError(f"{where}: expected finite values, got NaN/Inf")
    d = Path(os.fspath(directory))
    d.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for mp, (A, B) in modules.items():
        tensors[f"base_model.model.{mp}.lora_A.weight"] = A.detach().contiguous().cpu()
        tensors[f"base_model.model.{mp}.lora_B.weight"] = B.detach().contiguous().cpu()
    tm = sorted({mp.rsplit(".", 1)[-1] for mp in modules}) if target_modules is None else list(target_modules)
    cfg = {
        "peft_type": "LORA", "r": int(r), "lora_alpha": lora_alpha, "use_rslora": bool(use_rslora),
        "rank_pattern": dict(rank_pattern or {}), "alpha_pattern": dict(alpha_pattern or {}),
        "target_modules": tm, "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0,
        "use_dora": False, "modules_to_save": None, "task_type": None, "inference_mode": True,
    }
    save_file(tensors, os.fspath(d / WEIGHTS_NAME), metadata={"format": "pt"})
    (d / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return d
