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

    ``fan_in_fan_out`` (GPT-2's Conv1D) transposes only the base weight in PEFT, so the factors keep the
    shapes above. Options that change the maths and are not implemented (DoRA, LoRA bias, aLoRA, layer
    replication, modules_to_save, bias != "none", ...) raise :class:`UnsupportedAdapterError`, as does an
    option this reader does not know unless its value is a default (None / False / empty). Nothing is ever
    unpickled: ``.bin`` / ``.pt`` files are refused.

Input contract (issue 13): whatever the files hold, :func:`read_peft_adapter` returns a valid adapter or raises
:class:`AdapterFormatError` / :class:`UnsupportedAdapterError` whose message starts with the file and names the
field (config key, tensor key or ``header``), and it never allocates more than the weights file holds:

* config: read as strict UTF-8 JSON of at most :data:`MAX_CONFIG_BYTES`; duplicate keys, nesting too deep,
  numbers that overflow float64 and fields of the wrong type are refused (``r`` and ``rank_pattern`` values
  are integers in [1, 2**31 - 1] (JSON ``8.0``/``true``/``"8"`` are not); ``lora_alpha`` and ``alpha_pattern``
  values finite nonzero reals; flags true/false/null; patterns strings);
* patterns (``rank_pattern`` / ``alpha_pattern`` keys, string ``target_modules`` / ``exclude_modules``) keep
  PEFT's exact semantics and are matched in bounded time (see :mod:`lora_kernels._peft_patterns`): invalid,
  oversized or too slow patterns are refused naming the field;
* every module's scale must be a finite nonzero float32 (the dtype ``LoRAWeights`` stores scales in);
* weights: the safetensors header is checked against the file's size before anything is read (lengths,
  dtypes, shapes, offsets covering the data exactly once, no duplicate names), then every declared shape
  against the config's rank and the ``expected`` layer shapes; only then are tensors read;
* one module defined by two keys (with and without ``base_model.model.``, or with and without an adapter
  name) is refused naming both keys;
* dtypes: F16, BF16, F32, F64 are kept; fp8 (F8_E4M3, F8_E5M2) is converted exactly to float32 (or to
  ``dtype=``), since every fp8 value is representable there and PEFT likewise copies file values into the
  layer's dtype; other float formats (F8_E8M0, F6, F4) raise UnsupportedAdapterError naming the dtype;
  integer, bool and complex tensors raise AdapterFormatError;
* paths: nothing there, a directory where a file is expected, a symlink loop, a device or FIFO, an
  unreadable file are refused naming the path.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import reprlib
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from . import _peft_patterns as _pat
from ._safetensors_header import HeaderError, TensorInfo, loads_strict, read_header
from ._validation import check_int, check_real

__all__ = [
    "AdapterFormatError",
    "UnsupportedAdapterError",
    "HostAdapter",
    "AdapterConfig",
    "read_peft_adapter",
    "save_peft_adapter",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "MAX_CONFIG_BYTES",
    "MAX_RANK",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: Largest adapter_config.json read (a real one is a few kB; one listing 10k modules is ~1 MB).
MAX_CONFIG_BYTES = 16 * 1024 * 1024
#: Largest rank accepted in a config (ranks are stored as int32).
MAX_RANK = 2**31 - 1

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

# fullmatch (never `$`, which also matches before a trailing newline: "k.weight\n" would alias "k.weight").
_KEY_RE = re.compile(r"(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.(?P<name>[^.]+))?\.weight")

# safetensors dtype -> what the reader does with it (see the module docstring).
_KEPT = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_FP8 = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}  # converted exactly to float32
_OTHER_FLOAT = {"F8_E8M0": "an exponent-only scale format", "F6_E2M3": "fp6", "F6_E3M2": "fp6", "F4": "fp4"}

_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict, _repr.maxlevel = 80, 80, 6, 6, 3


def _show(v: Any) -> str:
    """A bounded repr for messages: file contents can be huge or deeply nested."""
    try:
        return _repr.repr(v)
    except Exception:  # a caller-provided object whose repr fails
        return f"<{type(v).__name__}>"


def _is_default(v: Any) -> bool:
    return v is None or v is False or (isinstance(v, (dict, list, tuple, str)) and len(v) == 0)


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT ``LoraConfig`` that define the delta (see the module docstring).

    Build it with :meth:`from_dict`, which validates every field and compiles every pattern; ``source`` (the
    config file) prefixes error messages of the matching methods."""

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
    source: str = field(default="adapter config", compare=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "adapter config") -> "AdapterConfig":
        """Validate a PEFT config dict. Raises UnsupportedAdapterError / AdapterFormatError naming ``source``
        and the key."""
        if not isinstance(d, Mapping):
            raise AdapterFormatError(f"{source}: expected a JSON object, got {type(d).__name__}")
        bad_keys = [k for k in d if not isinstance(k, str)]
        if bad_keys:
            raise AdapterFormatError(f"{source}: expected string keys, got {_show(bad_keys[0])}")
        pt = d.get("peft_type", "LORA")
        pt = getattr(pt, "value", pt)  # peft's PeftType enum in LoraConfig.to_dict()
        if pt is not None and not isinstance(pt, str):
            raise AdapterFormatError(f"{source}: peft_type: expected 'LORA', got {_show(pt)}")
        if pt is not None and pt.upper() != "LORA":
            raise UnsupportedAdapterError(f"{source}: peft_type: expected 'LORA', got {_show(pt)}")
        for k, what in _MUST_BE_OFF.items():
            if not _is_default(d.get(k)):
                raise UnsupportedAdapterError(f"{source}: {k}: {what} is not supported (expected it off/null, "
                                              f"got {_show(d[k])})")
        bias = d.get("bias", "none")
        if not (bias is None or isinstance(bias, str) and bias == "none"):
            raise UnsupportedAdapterError(f"{source}: bias: expected 'none' (trained biases are not supported), "
                                          f"got {_show(bias)}")
        for k, v in d.items():
            if k not in _IGNORED and k not in _HANDLED and k not in _MUST_BE_OFF and not _is_default(v):
                raise UnsupportedAdapterError(f"{source}: {_show(k)}: unknown option (it may change the maths), "
                                              f"expected it absent or null, got {_show(v)}")

        def fail(e: Exception) -> AdapterFormatError:  # check_int/check_real name the field; clip huge numbers
            text = str(e)
            return AdapterFormatError(f"{source}: {text if len(text) <= 300 else text[:300] + '...'}")

        try:
            r = check_int("r", d.get("r", 8), lo=1, hi=MAX_RANK)
            alpha = check_real("lora_alpha", d.get("lora_alpha", 8))
        except (TypeError, ValueError) as e:
            raise fail(e) from None
        if alpha == 0:
            raise AdapterFormatError(f"{source}: lora_alpha: expected a finite nonzero number (alpha 0 makes the "
                                     "adapter a no-op), got 0")
        for k in ("rank_pattern", "alpha_pattern"):
            v = d.get(k)
            if v is not None and not isinstance(v, Mapping):
                raise AdapterFormatError(f"{source}: {k}: expected an object {{module pattern: value}}, got "
                                         f"{type(v).__name__} {_show(v)}")
        for k in ("use_rslora", "fan_in_fan_out"):
            v = d.get(k)
            if v is not None and not isinstance(v, bool):  # bool("no") is True: never guess a flag
                raise AdapterFormatError(f"{source}: {k}: expected true/false, got {_show(v)}")
        for k in ("target_modules", "exclude_modules"):
            v = d.get(k)
            if v is not None and not isinstance(v, str) and not (
                    isinstance(v, (list, tuple, set, frozenset)) and all(isinstance(t, str) for t in v)):
                raise AdapterFormatError(f"{source}: {k}: expected a regex string or a list of module names, "
                                         f"got {_show(v)}")
        rp: Dict[str, int] = {}
        ap: Dict[str, float] = {}
        for k, out, conv in (("rank_pattern", rp, "int"), ("alpha_pattern", ap, "real")):
            for key, v in (d.get(k) or {}).items():
                name = f"{k}[{_show(key)}]"
                if not isinstance(key, str):
                    raise AdapterFormatError(f"{source}: {name}: expected string keys (module patterns)")
                try:
                    out[key] = (check_int(name, v, lo=1, hi=MAX_RANK) if conv == "int" else check_real(name, v))
                except (TypeError, ValueError) as e:
                    raise fail(e) from None
                if conv == "real" and out[key] == 0:
                    raise AdapterFormatError(f"{source}: {name}: expected a finite nonzero number (alpha 0 makes "
                                             "the module a no-op), got 0")
        tm, em = d.get("target_modules"), d.get("exclude_modules")
        # Every pattern is checked and compiled now, so a bad one is refused whichever module it would meet.
        patterns = [(f"rank_pattern[{_show(k)}]", k, True) for k in rp]
        patterns += [(f"alpha_pattern[{_show(k)}]", k, True) for k in ap]
        patterns += [(n, v, False) for n, v in (("target_modules", tm), ("exclude_modules", em))
                     if isinstance(v, str)]
        total = sum(len(p) for _, p, _ in patterns)
        if total > _pat.MAX_TOTAL_PATTERN_LEN:
            raise AdapterFormatError(f"{source}: rank_pattern/alpha_pattern/target_modules/exclude_modules: "
                                     f"expected patterns of at most {_pat.MAX_TOTAL_PATTERN_LEN} characters in all, "
                                     f"got {total}")
        budget = _pat.CompileBudget()
        for name, p, is_key in patterns:
            try:
                _pat.compile_pattern(p, key=is_key, budget=budget)
            except _pat.PatternError as e:
                raise AdapterFormatError(f"{source}: {name}: {e}") from None
        return cls(
            r=r, lora_alpha=alpha, use_rslora=bool(d.get("use_rslora") or False),
            rank_pattern=rp, alpha_pattern=ap,
            target_modules=tuple(sorted(tm)) if isinstance(tm, (list, tuple, set, frozenset)) else tm,
            exclude_modules=tuple(sorted(em)) if isinstance(em, (list, tuple, set, frozenset)) else em,
            fan_in_fan_out=bool(d.get("fan_in_fan_out") or False),
            layer_subset=not (_is_default(d.get("layers_to_transform")) and _is_default(d.get("layers_pattern"))),
            source=source,
        )

    # ---- per-module values (PEFT's matching, bounded in time; errors name source and field) ----------------
    def _key_for(self, kind: str, patterns: Mapping[str, Any], path: str,
                 budget: Optional[_pat.MatchBudget]) -> Optional[str]:
        # PEFT's get_pattern_key: the first key k (in order) with re.match(rf"(.*\.)?({k})$", path).
        for k in patterns:
            try:
                if _pat.search_key(k, path, budget):
                    return k
            except _pat.PatternError as e:
                raise AdapterFormatError(f"{self.source}: {kind}[{_show(k)}]: {e}") from None
        return None

    def rank_for(self, path: str, *, budget: Optional[_pat.MatchBudget] = None) -> int:
        k = self._key_for("rank_pattern", self.rank_pattern, path, budget)
        return int(self.rank_pattern[k]) if k is not None else self.r

    def alpha_for(self, path: str, *, budget: Optional[_pat.MatchBudget] = None) -> float:
        k = self._key_for("alpha_pattern", self.alpha_pattern, path, budget)
        return float(self.alpha_pattern[k]) if k is not None else self.lora_alpha

    def alpha_field(self, path: str, *, budget: Optional[_pat.MatchBudget] = None) -> str:
        """The config field ``alpha_for(path)`` comes from (``lora_alpha`` or ``alpha_pattern[key]``)."""
        k = self._key_for("alpha_pattern", self.alpha_pattern, path, budget)
        return "lora_alpha" if k is None else f"alpha_pattern[{_show(k)}]"

    def scale_for(self, path: str, *, budget: Optional[_pat.MatchBudget] = None) -> float:
        r = self.rank_for(path, budget=budget)
        a = self.alpha_for(path, budget=budget)
        return a / math.sqrt(r) if self.use_rslora else a / r

    def targets(self, path: str, *, budget: Optional[_pat.MatchBudget] = None) -> Optional[bool]:
        """Whether PEFT would put a LoRA on module ``path`` (None when the config cannot say: no or
        'all-linear' target_modules, or a layer subset)."""
        tm = self.target_modules
        if tm is None or tm == "all-linear" or self.layer_subset:
            return None
        if self._matches("exclude_modules", self.exclude_modules, path, budget):
            return False
        return self._matches("target_modules", tm, path, budget)

    def _matches(self, kind: str, spec, path: str, budget: Optional[_pat.MatchBudget]) -> bool:
        if spec is None:
            return False
        if isinstance(spec, str):  # PEFT: re.fullmatch(spec, path)
            try:
                return _pat.fullmatch(spec, path, budget)
            except _pat.PatternError as e:
                raise AdapterFormatError(f"{self.source}: {kind}: {e}") from None
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


# ---- paths and the config file -----------------------------------------------------------------------------
def _stat(p: Path, what: str) -> os.stat_result:
    """``os.stat`` (following symlinks) with every failure as an AdapterFormatError naming ``what`` and ``p``."""
    try:
        return p.stat()
    except FileNotFoundError:
        raise AdapterFormatError(f"{p}: {what}: expected an existing file or directory, got nothing there") from None
    except OSError as e:
        why = "a symlink loop" if e.errno == errno.ELOOP else f"{type(e).__name__}: {e.strerror or e}"
        raise AdapterFormatError(f"{p}: {what}: expected an existing file or directory, got {why}") from None
    except ValueError as e:  # an embedded NUL byte
        raise AdapterFormatError(f"{_show(os.fspath(p))}: {what}: expected a valid path, got {e}") from None


def _kind(st: os.stat_result) -> str:
    m = st.st_mode
    return ("a directory" if stat.S_ISDIR(m) else "a FIFO" if stat.S_ISFIFO(m) else "a device"
            if stat.S_ISCHR(m) or stat.S_ISBLK(m) else "a socket" if stat.S_ISSOCK(m) else "a special file")


def _read_json(p: Path, what: str) -> Any:
    """Strict UTF-8 JSON of at most MAX_CONFIG_BYTES, duplicate keys refused; errors name ``p`` and ``what``."""
    st = _stat(p, what)
    if not stat.S_ISREG(st.st_mode):
        raise AdapterFormatError(f"{p}: {what}: expected a JSON file, got {_kind(st)}")
    if st.st_size > MAX_CONFIG_BYTES:
        raise AdapterFormatError(f"{p}: {what}: expected at most {MAX_CONFIG_BYTES} bytes of JSON, got {st.st_size}")
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise AdapterFormatError(f"{p}: {what}: expected at most {MAX_CONFIG_BYTES} bytes of JSON, got more")
        return loads_strict(data.decode("utf-8"))
    except HeaderError as e:  # a duplicate key
        raise AdapterFormatError(f"{p}: {e}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: JSONDecodeError, too deep, 4300+ digits
        raise AdapterFormatError(f"{p}: {what}: expected valid UTF-8 JSON, got {type(e).__name__}: {e}") from None


def _resolve(path: PathLike, config) -> Tuple[Path, Mapping[str, Any], str]:
    p = Path(os.fspath(path))
    if p.suffix.lower() in _PICKLE_SUFFIXES:
        raise AdapterFormatError(f"{p}: expected a .safetensors file or a PEFT directory; pickle-based files "
                                 f"({p.suffix}) are never loaded (convert them with safetensors)")
    st = _stat(p, "path")
    if stat.S_ISDIR(st.st_mode):
        weights = p / WEIGHTS_NAME
        wst = _stat(weights, WEIGHTS_NAME) if os.path.lexists(weights) else None
        if wst is None or not stat.S_ISREG(wst.st_mode):
            try:
                pickled = [q.name for q in p.iterdir() if q.suffix.lower() in _PICKLE_SUFFIXES]
            except OSError:
                pickled = []
            hint = f" (found {pickled}: pickle-based files are never loaded)" if pickled else ""
            got = "" if wst is None else f", got {_kind(wst)}"
            raise AdapterFormatError(f"{p}: expected {WEIGHTS_NAME} in the directory{hint}{got}")
        cfg_path = p / CONFIG_NAME
    elif stat.S_ISREG(st.st_mode):
        if p.suffix.lower() != ".safetensors":
            raise AdapterFormatError(f"{p}: expected a .safetensors file or a PEFT directory, got suffix {p.suffix!r}")
        weights, cfg_path = p, p.parent / CONFIG_NAME
    else:
        raise AdapterFormatError(f"{p}: path: expected a file or directory, got {_kind(st)}")
    if config is None:
        if not os.path.lexists(cfg_path):
            raise AdapterFormatError(f"{p}: expected {CONFIG_NAME} next to the weights (or config=...), none found")
        return weights, _read_json(cfg_path, CONFIG_NAME), str(cfg_path)
    if isinstance(config, (str, os.PathLike)):
        src = Path(os.fspath(config))
        return weights, _read_json(src, "config"), str(src)
    if hasattr(config, "to_dict"):  # a peft LoraConfig
        config = config.to_dict()
    return weights, config, f"config (given for {p})"


# ---- the weights file --------------------------------------------------------------------------------------
@dataclass
class _Module:
    path: str
    keys: Dict[str, str]  # "A"/"B" -> tensor key
    infos: Dict[str, TensorInfo]
    scale: float = 0.0


def _group_keys(weights: Path, infos: Mapping[str, TensorInfo], adapter_name: Optional[str]) -> Dict[str, _Module]:
    """Tensor keys -> modules; unknown keys, several adapters and one module defined twice are refused."""
    parsed: List[Tuple[str, str, str, Optional[str]]] = []
    for k in infos:
        m = _KEY_RE.fullmatch(k)
        if m is None:
            what = ("DoRA magnitude" if "lora_magnitude_vector" in k else "embedding LoRA"
                    if "lora_embedding" in k else "a bias on lora_B" if ".lora_B" in k and k.endswith(".bias")
                    else None)
            if what:
                raise UnsupportedAdapterError(f"{weights}: key {_show(k)}: {what} is not supported")
            raise AdapterFormatError(f"{weights}: key {_show(k)}: expected '<module path>.lora_A.weight' or "
                                     "'<module path>.lora_B.weight'")
        nm = m.group("name")
        if adapter_name is not None and nm is not None and nm != adapter_name:
            continue
        parsed.append((k, m.group("path"), m.group("ab"), nm))
    named = sorted({nm for *_, nm in parsed if nm is not None})
    if len(named) > 1:
        raise AdapterFormatError(f"{weights}: expected keys of one adapter, got adapter names {_show(named)} "
                                 "(pass adapter_name=)")
    modules: Dict[str, _Module] = {}
    for k, path, ab, _ in parsed:
        mod = modules.setdefault(path, _Module(path, {}, {}))
        if ab in mod.keys:
            raise AdapterFormatError(
                f"{weights}: module {_show(path)}: lora_{ab}.weight: expected one definition, got two: keys "
                f"{_show(mod.keys[ab])} and {_show(k)} (with and without the 'base_model.model.' prefix or an "
                "adapter name; which one PEFT would load is undefined)")
        mod.keys[ab], mod.infos[ab] = k, infos[k]
    if adapter_name is None and named and any(nm is None for *_, nm in parsed):
        raise AdapterFormatError(f"{weights}: expected keys of one adapter, got adapter names "
                                 f"{_show(['None'] + named)} (keys with and without an adapter name; pass "
                                 "adapter_name=)")
    return modules


def _check_dtype(weights: Path, key: str, dtype: str) -> None:
    if dtype in _KEPT or dtype in _FP8 and hasattr(torch, _FP8[dtype]):
        return
    if dtype in _FP8 or dtype in _OTHER_FLOAT:
        what = _OTHER_FLOAT.get(dtype, "fp8 without torch support")
        raise UnsupportedAdapterError(f"{weights}: key {_show(key)}: dtype {dtype} ({what}) is not supported; "
                                      f"expected one of {sorted(_KEPT) + sorted(_FP8)}")
    raise AdapterFormatError(f"{weights}: key {_show(key)}: expected floating-point weights "
                             f"({sorted(_KEPT) + sorted(_FP8)}), got dtype {dtype}")


def _normalise_expected(expected) -> Optional[Dict[str, Tuple[int, int, Optional[int]]]]:
    if expected is None:
        return None
    if not isinstance(expected, Mapping):
        raise TypeError(f"expected: expected None or a mapping {{module path: (in_features, out_features[, "
                        f"max_rank])}}, got {type(expected).__name__}")
    out = {}
    for p, v in expected.items():
        if not isinstance(v, (tuple, list)) or len(v) not in (2, 3):
            raise TypeError(f"expected[{p!r}]: expected (in_features, out_features[, max_rank]), got {_show(v)}")
        vals = [check_int(f"expected[{p!r}][{i}]", x, lo=1) for i, x in enumerate(v)]
        out[p] = (vals[0], vals[1], vals[2] if len(vals) == 3 else None)
    return out


def _check_module(weights: Path, mod: _Module, cfg: AdapterConfig, expected, budget) -> None:
    """Everything about one module that the header and config can tell, before any tensor is read."""
    mp = mod.path
    for part in ("A", "B"):
        if part not in mod.keys:
            raise AdapterFormatError(f"{weights}: module {_show(mp)}: missing key lora_{part}.weight "
                                     f"(found only lora_{'B' if part == 'A' else 'A'})")
    for part in ("A", "B"):
        _check_dtype(weights, mod.keys[part], mod.infos[part].dtype)
    sa, sb = mod.infos["A"].shape, mod.infos["B"].shape
    if len(sa) != 2 or len(sb) != 2:
        exc = UnsupportedAdapterError if len(sa) in (3, 4, 5) and len(sb) in (3, 4, 5) else AdapterFormatError
        raise exc(f"{weights}: module {_show(mp)}: expected 2-D lora_A/lora_B (linear layers; conv LoRA is not "
                  f"supported), got shapes {sa} / {sb}")
    r = sa[0]
    if sb[1] != r:
        raise AdapterFormatError(f"{weights}: module {_show(mp)}: lora_B.weight: expected shape ({sb[0]}, {r}) "
                                 f"(rank of lora_A), got {sb}")
    r_cfg = cfg.rank_for(mp, budget=budget)
    if r != r_cfg:
        raise AdapterFormatError(f"{weights}: module {_show(mp)}: lora_A.weight: expected rank {r_cfg} (r / "
                                 f"rank_pattern of the config), got {r}")
    if expected is not None:
        if mp not in expected:
            raise AdapterFormatError(f"{weights}: module {_show(mp)}: extra key: expected one of the pool's modules "
                                     f"{_short(sorted(expected))}")
        in_f, out_f, max_rank = expected[mp]
        if sa[1] != in_f:
            raise AdapterFormatError(f"{weights}: module {_show(mp)}: lora_A.weight: expected shape ({r}, {in_f}), "
                                     f"got {sa}")
        if sb[0] != out_f:
            raise AdapterFormatError(f"{weights}: module {_show(mp)}: lora_B.weight: expected shape ({out_f}, {r}), "
                                     f"got {sb}")
        if max_rank is not None and r > max_rank:
            raise AdapterFormatError(f"{weights}: module {_show(mp)}: lora_A.weight: expected rank <= {max_rank} "
                                     f"(the layer's max_rank), got {r}")
    elif sa[1] < 1 or sb[0] < 1:
        raise AdapterFormatError(f"{weights}: module {_show(mp)}: expected in/out features >= 1, got lora_A {sa}, "
                                 f"lora_B {sb}")
    scale = cfg.scale_for(mp, budget=budget)
    s32 = torch.tensor(scale, dtype=torch.float64).float().item()
    if not math.isfinite(s32) or s32 == 0:  # LoRAWeights stores scales in float32
        rule = "alpha / sqrt(r) (rsLoRA)" if cfg.use_rslora else "alpha / r"
        raise AdapterFormatError(f"{cfg.source}: {cfg.alpha_field(mp, budget=budget)}: expected {rule} to be a "
                                 f"finite nonzero float32 scale for module {_show(mp)}, got {scale:g}")
    mod.scale = scale


def _read_tensors(weights: Path, modules: Sequence[_Module], dtype: Optional[torch.dtype]):
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as e:  # pragma: no cover - safetensors is in requirements-dev.txt
        raise ImportError("reading adapters needs the safetensors package (pip install safetensors)") from e
    out: Dict[str, Tuple[torch.Tensor, torch.Tensor, float]] = {}
    try:
        with safe_open(os.fspath(weights), framework="pt", device="cpu") as f:
            for mod in modules:
                ts = []
                for part in ("A", "B"):
                    k, info = mod.keys[part], mod.infos[part]
                    sl = f.get_slice(k)  # lazy: compare with what was checked before allocating
                    if list(sl.get_shape()) != list(info.shape) or sl.get_dtype() != info.dtype:
                        raise AdapterFormatError(f"{weights}: key {_show(k)}: the file changed while being read")
                    t = f.get_tensor(k)
                    target = dtype or (torch.float32 if info.dtype in _FP8 else t.dtype)
                    t = t.to(target).contiguous()  # fp8 -> fp32 is exact
                    if not bool(torch.isfinite(t).all()):
                        raise AdapterFormatError(f"{weights}: module {_show(mod.path)}: lora_{part}.weight: expected "
                                                 "finite values, got NaN/Inf"
                                                 + (f" (after conversion to {dtype})" if dtype is not None else ""))
                    ts.append(t)
                out[mod.path] = (ts[0], ts[1], mod.scale)
    except SafetensorError as e:
        raise AdapterFormatError(f"{weights}: expected a readable safetensors file, got {e}") from e
    except (OSError, RuntimeError, TypeError) as e:  # mmap / short read of a file truncated meanwhile
        raise AdapterFormatError(f"{weights}: expected a readable safetensors file, got {type(e).__name__}: {e}") from e
    return out


def read_peft_adapter(
    path: PathLike,
    *,
    name: Optional[str] = None,
    config: Union[None, PathLike, Mapping[str, Any], Any] = None,
    expected: Optional[Mapping[str, Tuple[int, ...]]] = None,
    adapter_name: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    pin: bool = False,
) -> HostAdapter:
    """Read and validate one PEFT LoRA adapter (safetensors only; see the module docstring for the contract).

    Args:
        path: a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``) or a ``.safetensors``
            file (config from ``config=`` or ``adapter_config.json`` in the same directory).
        name: the adapter's name (default: the directory/file name).
        config: a config dict, a peft ``LoraConfig``, or a path to a JSON file; overrides the one on disk.
        expected: ``{module path: (in_features, out_features)}`` or ``(in_features, out_features, max_rank)``
            of the layers it will be loaded into. With it, every module in the file must be there with those
            shapes (and at most that rank), and every module there that ``target_modules`` selects must be in
            the file. All of this is checked on the header, before any tensor is read.
        adapter_name: the infix to read when the keys carry one (``lora_A.<adapter_name>.weight``) and the
            file holds several; default: the only one present.
        dtype: convert the factors to this dtype (default: keep the file's, fp8 becomes float32); the
            converted values are checked to be finite too (fp32 -> fp16 may overflow).
        pin: pin the host tensors (for asynchronous host-to-device copies; needs CUDA, ignored without it).

    Raises:
        AdapterFormatError: anything malformed, with the file and the field (see the module docstring).
        UnsupportedAdapterError: DoRA and other options not implemented, fp4/fp6/e8m0 weights, conv LoRA.
        TypeError: arguments of the wrong type (path, name, adapter_name, dtype, expected).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike (a PEFT directory or .safetensors file), got "
                        f"{type(path).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype: expected None or a floating-point torch.dtype, got {dtype!r}")
    for arg, v in (("name", name), ("adapter_name", adapter_name)):
        if v is not None and not isinstance(v, str):
            raise TypeError(f"{arg}: expected None or a str, got {type(v).__name__}")
    exp = _normalise_expected(expected)
    weights, cfg_dict, cfg_src = _resolve(path, config)
    cfg = AdapterConfig.from_dict(cfg_dict, cfg_src)
    name = name if name is not None else Path(os.fspath(path)).stem
    try:
        infos, _ = read_header(weights)
    except HeaderError as e:
        raise AdapterFormatError(f"{weights}: expected a readable safetensors file; {e}") from None
    except OSError as e:
        raise AdapterFormatError(f"{weights}: expected a readable safetensors file, got {type(e).__name__}: "
                                 f"{e}") from None
    modules = _group_keys(weights, infos, adapter_name)
    if not modules:
        raise AdapterFormatError(f"{weights}: expected lora_A/lora_B weights, got none"
                                 + (f" for adapter_name={adapter_name!r}" if adapter_name else ""))
    budget = _pat.MatchBudget()
    order = [modules[mp] for mp in sorted(modules)]
    for mod in order:
        _check_module(weights, mod, cfg, exp, budget)
    if exp is not None:
        missing = [mp for mp in exp if mp not in modules and cfg.targets(mp, budget=budget)]
        if missing:
            raise AdapterFormatError(f"{weights}: missing keys: target_modules selects {_short(missing)} but the file "
                                     f"has no lora_A/lora_B for them")
    host = _read_tensors(weights, order, dtype)
    if pin and torch.cuda.is_available():
        host = {k: (A.pin_memory(), B.pin_memory(), s) for k, (A, B, s) in host.items()}
    return HostAdapter(name=name, modules=host, config=cfg, source=os.fspath(path))


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
