"""PEFT <-> lora_kernels: serve every adapter loaded in a ``PeftModel`` in one batch, and export back.

Semantics:
    :func:`from_peft` reads, for every PEFT LoRA layer of the model and every adapter name ``k`` (slot id
    ``ids[k]``, in the order given), ``A = lora_A[k].weight`` [r, in], ``B = lora_B[k].weight`` [out, r] and
    PEFT's own ``scaling[k]`` (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA; rank_pattern and
    alpha_pattern are already resolved per layer), stores them in one :class:`~lora_kernels.LoRAWeights` per
    layer, and replaces each PEFT layer by ``LoRALinear(its base_layer, weights)``. A token of a request that
    names adapter k then gets exactly PEFT's single-adapter output ``base(x) + scaling[k] * B (A x)``;
    a layer that k does not target holds rank 0 in slot ``ids[k]`` (no delta), as in PEFT.

    :func:`to_peft_state_dict` and :func:`save_pretrained` go back: one adapter id of a ``{module path:
    LoRAWeights}`` mapping -> PEFT's keys ``base_model.model.<path>.lora_A.weight`` / ``lora_B.weight`` and an
    ``adapter_config.json`` whose ``r``/``lora_alpha`` plus ``rank_pattern``/``alpha_pattern`` reproduce each
    layer's rank and scale (``alpha = scale * r``), loadable by ``PeftModel.from_pretrained``.

Refused (ValueError naming the adapter and layer): DoRA, LoRA bias (``lora_bias=True``), and PEFT layers that
are not linear (embedding / conv LoRA); merged PEFT layers (``merge_adapter()``) too, since their base weight
already holds a delta.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._validation import check
from ..weights import LoRAWeights
from .ids import adapters as _adapters_ctx
from .transformers import LoRAPatch, linear_features, patch_model

__all__ = ["PeftServing", "from_peft", "to_peft_state_dict", "save_pretrained", "peft_lora_layers"]

PREFIX = "base_model.model."


def peft_lora_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """``{module path: PEFT LoraLayer}`` of a model (paths relative to ``model``)."""
    from peft.tuners.lora import LoraLayer

    return {p: m for p, m in model.named_modules() if p and isinstance(m, LoraLayer)}


class PeftServing:
    """Batched serving of a PeftModel's adapters (what :func:`from_peft` returns).

    Attributes:
        model: the transformers model inside the PeftModel (``peft_model.base_model.model``), patched.
        patch: the :class:`~lora_kernels.integrations.transformers.LoRAPatch` (layers, weights, batch).
        ids: ``{adapter name: slot id}``.
    """

    def __init__(self, peft_model: nn.Module, model: nn.Module, patch: LoRAPatch, ids: Dict[str, int]):
        self.peft_model = peft_model
        self.model = model
        self.patch = patch
        self.ids = dict(ids)

    @property
    def weights(self) -> Dict[str, LoRAWeights]:
        return self.patch.weights

    def ids_for(self, names: Sequence[Optional[str]]) -> torch.Tensor:
        """int32 [len(names)] slot ids for per-request adapter names (None -> -1, the base model).

        Raises:
            KeyError: a name that was not loaded (the message lists the known names).
        """
        out = []
        for n in names:
            if n is None:
                out.append(-1)
            elif n in self.ids:
                out.append(self.ids[n])
            else:
                raise KeyError(f"names: expected adapter names in {sorted(self.ids)} or None, got {n!r}")
        return torch.tensor(out, dtype=torch.int32)

    def adapters(self, names: Sequence[Optional[str]]):
        """``with serving.adapters(["a", None, "b"]): serving.model(input_ids)``: one name per sequence."""
        return _adapters_ctx(self.ids_for(names))

    def __call__(self, *args, adapter_names: Optional[Sequence[Optional[str]]] = None, **kwargs):
        """``serving(input_ids, adapter_names=[...])``: the patched model's forward with per-request names."""
        if adapter_names is not None:
            kwargs["adapter_ids"] = self.ids_for(adapter_names)
        return self.model(*args, **kwargs)

    def state_dict_of(self, name: str, prefix: str = PREFIX) -> Dict[str, torch.Tensor]:
        """PEFT-format state dict of one adapter (see :func:`to_peft_state_dict`)."""
        return to_peft_state_dict(self.weights, self.ids[name], prefix=prefix)

    def save_pretrained(self, directory: str, name: str, **config) -> str:
        """Write adapter ``name`` as ``adapter_config.json`` + ``adapter_model.safetensors`` (see
        :func:`save_pretrained`); returns ``directory``."""
        base = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        config.setdefault("base_model_name_or_path", base or None)
        return save_pretrained(directory, self.weights, self.ids[name], **config)

    def restore(self) -> nn.Module:
        """Put PEFT's layers back (the PeftModel works as before); returns the PeftModel."""
        self.patch.unpatch()
        return self.peft_model


def from_peft(
    peft_model: nn.Module,
    adapter_names: Optional[Sequence[str]] = None,
    *,
    max_tokens: int = 4096,
    dtype: Optional[torch.dtype] = None,
    validate: bool = True,
) -> PeftServing:
    """Serve the adapters loaded in ``peft_model`` in one batch (patches its inner model in place).

    Args:
        peft_model: a ``peft.PeftModel`` (or a model with PEFT LoRA layers injected) with one or more LoRA
            adapters loaded (``load_adapter``/``add_adapter``), none merged.
        adapter_names: which adapters, in slot order (default: every adapter PEFT knows, sorted by name).
        max_tokens: LoRABatch capacity (tokens per forward).
        dtype: storage dtype of the LoRA weights (default: each base layer's dtype).

    Returns:
        :class:`PeftServing` (``.restore()`` undoes the patch).

    Raises:
        ValueError naming the adapter and layer for DoRA, LoRA bias, non-linear LoRA layers, merged layers, an
        unknown adapter name or a model without LoRA layers; nothing is changed then.
    """
    inner = _inner_model(peft_model)
    found = peft_lora_layers(inner)
    check(bool(found), "peft_model", "a model with PEFT LoRA layers", type(peft_model).__name__)
    known = sorted({k for m in found.values() for k in m.lora_A.keys()})
    names = list(adapter_names) if adapter_names is not None else known
    check(bool(names) and len(set(names)) == len(names), "adapter_names", "distinct names", names)
    unknown = [n for n in names if n not in known]
    check(not unknown, "adapter_names", f"names of loaded adapters {known}", unknown)
    ids = {n: i for i, n in enumerate(names)}
    weights: Dict[str, LoRAWeights] = {}
    for path, layer in found.items():
        base = layer.get_base_layer()
        feats = linear_features(base)
        present = [n for n in names if n in layer.lora_A]
        if not present:
            continue
        check(feats is not None and hasattr(layer.lora_A[present[0]], "weight") and
              layer.lora_A[present[0]].weight.ndim == 2, f"layer {path}",
              "a linear LoRA layer (embedding / conv LoRA is not supported)", type(layer).__name__)
        check(not getattr(layer, "merged", False), f"layer {path}", "unmerged PEFT layers (call unmerge_adapter())",
              f"merged adapters {getattr(layer, 'merged_adapters', [])}")
        for n in present:
            check(not layer.use_dora.get(n, False), f"adapter {n!r} at {path}", "plain LoRA", "DoRA (use_dora=True)")
            check(not getattr(layer, "lora_bias", {}).get(n, False), f"adapter {n!r} at {path}", "plain LoRA",
                  "lora_bias=True")
        bw = getattr(base, "weight", None)
        wdt = dtype or (bw.dtype if isinstance(bw, torch.Tensor) and bw.is_floating_point() else torch.bfloat16)
        dev = bw.device if isinstance(bw, torch.Tensor) else torch.device("cpu")
        ranks = [int(layer.r[n]) for n in present]
        w = LoRAWeights(feats[0], feats[1], len(names), max(ranks), capacity_rows=sum(ranks), dtype=wdt, device=dev)
        for n in present:
            A = layer.lora_A[n].weight.detach()
            B = layer.lora_B[n].weight.detach()
            w.add(A, B, scale=float(layer.scaling[n]), adapter_id=ids[n])
        weights[path] = w
    patch = patch_model(inner, weights, max_tokens=max_tokens, validate=validate, unwrap=_peft_base)
    return PeftServing(peft_model, inner, patch, ids)


def _peft_base(module: nn.Module) -> nn.Module:
    get = getattr(module, "get_base_layer", None)
    return get() if callable(get) else module


def _inner_model(peft_model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (``base_model.model``), or the model itself."""
    bm = getattr(peft_model, "base_model", None)
    inner = getattr(bm, "model", None)
    return inner if isinstance(inner, nn.Module) and type(peft_model).__name__.startswith("Peft") else peft_model


# ---- export -----------------------------------------------------------------------------------------------


def _slices(weights: Mapping[Union[str, Tuple[str, ...]], LoRAWeights]) -> Iterator[Tuple[str, LoRAWeights, int]]:
    for key, w in weights.items():
        paths = (key,) if isinstance(key, str) else tuple(key)
        check(len(paths) == w.num_slices, f"weights[{key!r}]", f"one module path per slice ({w.num_slices})",
              len(paths))
        for s, p in enumerate(paths):
            yield p, w, s


def to_peft_state_dict(
    weights: Mapping[Union[str, Tuple[str, ...]], LoRAWeights], adapter_id: int, prefix: str = PREFIX
) -> Dict[str, torch.Tensor]:
    """One adapter as PEFT keys: ``{prefix}<path>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r].

    Args:
        weights: ``{module path: LoRAWeights}``; a fused group has a tuple of paths (one per slice) as key.
        adapter_id: the slot to export; layers where it is not loaded (or has rank 0 in a slice) are left out.
        prefix: PEFT's ``base_model.model.`` by default.

    Raises:
        ValueError: the adapter is loaded in no layer, or a key does not name one path per slice.
    """
    out: Dict[str, torch.Tensor] = {}
    for path, w, s in _slices(weights):
        if adapter_id not in w.loaded or w.rank_of(adapter_id)[s] == 0:
            continue
        A, B, _ = w.adapter(adapter_id, s)
        out[f"{prefix}{path}.lora_A.weight"] = A.detach().contiguous().clone()
        out[f"{prefix}{path}.lora_B.weight"] = B.detach().contiguous().clone()
    check(bool(out), "adapter_id", "an adapter loaded in at least one layer", adapter_id)
    return out


def peft_config_of(weights: Mapping[Union[str, Tuple[str, ...]], LoRAWeights], adapter_id: int,
                   **overrides) -> dict:
    """An ``adapter_config.json`` dict reproducing each layer's rank and scale of one adapter.

    ``r`` and ``lora_alpha`` are the most common (rank, alpha) pair; other layers are listed in
    ``rank_pattern``/``alpha_pattern`` by full module path; ``target_modules`` lists the full paths (PEFT
    matches them exactly). ``alpha = scale * r`` (no rsLoRA flag: the scale is stored as it is served).
    """
    per: Dict[str, Tuple[int, float]] = {}
    for path, w, s in _slices(weights):
        if adapter_id in w.loaded and w.rank_of(adapter_id)[s] > 0:
            r = w.rank_of(adapter_id)[s]
            per[path] = (r, float(w.scales[s, adapter_id]) * r)
    check(bool(per), "adapter_id", "an adapter loaded in at least one layer", adapter_id)
    (r0, a0), _ = Counter(per.values()).most_common(1)[0]
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "inference_mode": True,
        "r": r0, "lora_alpha": a0, "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "target_modules": sorted(per), "init_lora_weights": True,
        "rank_pattern": {p: r for p, (r, _) in per.items() if r != r0},
        "alpha_pattern": {p: a for p, (r, a) in per.items() if (r, a) != (r0, a0)},
    }
    cfg.update(overrides)
    return cfg


def save_pretrained(directory: str, weights: Mapping[Union[str, Tuple[str, ...]], LoRAWeights], adapter_id: int,
                    **config) -> str:
    """Write one adapter as PEFT files: ``adapter_model.safetensors`` + ``adapter_config.json``.

    ``config`` overrides fields of :func:`peft_config_of` (e.g. ``base_model_name_or_path``, ``task_type``,
    ``fan_in_fan_out=True`` for GPT-2's Conv1D, which only tells PEFT how the base weight is laid out).
    Returns ``directory``.
    """
    from safetensors.torch import save_file

    sd = to_peft_state_dict(weights, adapter_id)
    cfg = peft_config_of(weights, adapter_id, **config)
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.cpu() for k, v in sd.items()}, os.path.join(directory, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return directory
