"""Patch a Hugging Face transformers model for batched multi-adapter LoRA.

Semantics:
    :func:`patch_model` replaces every target module ``m`` (an ``nn.Linear``, GPT-2's ``Conv1D``, or any module
    whose forward computes ``x W^T (+ bias)`` and names its widths ``in_features``/``out_features``, e.g. a
    quantised linear) by ``LoRALinear(m, weights[path])``, so that

        y[t] = m(x[t]) + s_i * (x[t] A_i^T) B_i^T        with i = the adapter id of token t (nothing for -1).

    The delta is added into ``m``'s output tensor, in its dtype (bf16 for a quantised base with bf16
    activations), accumulated in fp32 and rounded once. The original modules are kept: :meth:`LoRAPatch.unpatch`
    puts them back.

    Adapter ids come per request: ``with lk.adapters(ids): model(input_ids)`` or ``model(input_ids,
    adapter_ids=ids)``; ids [batch] are expanded to every token of [batch, seq] inputs, ids [batch, seq] are per
    token; with neither, every token gets -1 (the base model). A forward pre-hook on the patched model builds
    the model's one :class:`~lora_kernels.LoRABatch` (fixed capacity, in place, no host sync) once per forward;
    every patched layer reads that batch. So ``torch.compile(model, fullgraph=True)`` traces the build and the
    layers together, and a CUDA graph of a decode step (:mod:`lora_kernels.integrations.graphs`) replays it.

Note for ``model.generate``: transformers refuses unknown forward kwargs there, so use the context
(``with lk.adapters(ids): model.generate(...)``); prefill ([batch, prompt]) and decode ([batch, 1]) steps
each expand the per-sequence ids to their own token count.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._validation import check
from ..batch import LoRABatch
from ..nn.lora_linear import LoRALinear
from ..weights import LoRAWeights
from .ids import as_ids_tensor, current_adapter_ids

__all__ = ["patch_model", "LoRAPatch", "linear_features", "DEFAULT_TARGETS", "expand_ids"]

#: Projection names of Llama/Qwen2/Mistral (q/k/v/o, gate/up/down) and GPT-2 (c_attn, c_proj, c_fc).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "c_attn", "c_proj", "c_fc")


def linear_features(module: nn.Module) -> Optional[Tuple[int, int]]:
    """``(in_features, out_features)`` of a module computing ``x W^T``, or None if it is not one.

    ``nn.Linear`` and modules with int ``in_features``/``out_features`` attributes (quantised linears follow
    that contract); GPT-2's ``Conv1D`` (``weight`` [in, out], ``nf`` = out).
    """
    if isinstance(module, LoRALinear):
        return None
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        w = module.weight
        return int(w.shape[0]), int(w.shape[1])
    i, o = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(i, int) and isinstance(o, int):
        return i, o
    return None


def _matches(path: str, targets: Union[str, Sequence[str]]) -> bool:
    if isinstance(targets, str):  # a regex over the full module path (PEFT's convention)
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def _param_device_dtype(module: nn.Module) -> Tuple[torch.device, Optional[torch.dtype]]:
    p = next(module.parameters(), None)
    if p is None:
        return torch.device("cpu"), None
    return p.device, (p.dtype if p.is_floating_point() else None)


def expand_ids(ids: torch.Tensor, token_shape: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Per-token ids [prod(token_shape)] (the dtype of ``ids``) from per-sequence ids [batch] or per-token ids
    [batch, seq].

    No host sync: a [batch] tensor is broadcast over the sequence dimension with ``expand``.

    Raises:
        ValueError naming ``adapter_ids`` when the shapes do not fit.
    """
    ids = as_ids_tensor(ids, "adapter_ids")
    B = token_shape[0] if len(token_shape) >= 1 else 1
    if ids.ndim == 1:
        check(ids.shape[0] == B, "adapter_ids", f"{B} ids (one per sequence of the input's batch)",
              f"{ids.shape[0]} ids")
        tok = ids.view(B, *([1] * (len(token_shape) - 1))).expand(*token_shape)
    else:
        check(tuple(ids.shape) == tuple(token_shape), "adapter_ids",
              f"shape {tuple(token_shape)} (one id per token) or ({B},)", tuple(ids.shape))
        tok = ids
    # (the ids keep their dtype: LoRABatch.build range-checks them at full width before narrowing to int32; a
    # cast to int32 here would truncate int64 ids, e.g. 2**32 + 1 into adapter 1)
    return tok.reshape(-1).to(device=device, non_blocking=True)


class LoRAPatch:
    """The handle :func:`patch_model` returns: the patched layers, their weights, the model's batch.

    Attributes:
        model: the patched model (modified in place).
        layers: ``{module path: LoRALinear}``; each replaced the module at that path.
        weights: ``{module path: LoRAWeights}`` (what an :class:`~lora_kernels.AdapterPool` or
            ``LoRAWeights.add`` fills).
        batch: the :class:`~lora_kernels.LoRABatch` every patched layer reads, rebuilt once per forward.
        max_adapters: adapter slots (ids ``0 .. max_adapters-1``; -1 = no adapter).
    """

    def __init__(self, model: nn.Module, layers: Dict[str, LoRALinear], originals: Dict[str, nn.Module],
                 batch: LoRABatch, validate: bool):
        self.model = model
        self.layers = layers
        self.weights: Dict[str, LoRAWeights] = {k: v.weights for k, v in layers.items()}
        self.batch = batch
        self.max_adapters = batch.max_adapters
        self.validate = validate
        self._originals = originals
        self._hook = model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        self.active = True

    # ---- per-forward batch build -----------------------------------------------------------------------
    def prepare(self, adapter_ids: Optional[torch.Tensor], token_shape: Tuple[int, ...]) -> LoRABatch:
        """Build :attr:`batch` for a forward over inputs of ``token_shape`` ([batch, seq]); returns it.

        ``adapter_ids`` None: every token gets -1. Called by the forward pre-hook; call it directly to drive
        the patched layers without the model's forward (e.g. a hand-written decode step).

        Raises:
            ValueError naming ``adapter_ids`` (shape, ids out of ``[-1, max_adapters)`` when validating on
            CPU ids) or ``input_ids`` (more tokens than ``max_tokens``); the batch is unchanged then.
        """
        T = 1
        for d in token_shape:
            T *= int(d)
        check(T <= self.batch.max_tokens, "input_ids", f"at most max_tokens={self.batch.max_tokens} tokens "
              "(patch_model(max_tokens=...))", f"{T} tokens (shape {tuple(token_shape)})")
        dev = self.batch.device
        if adapter_ids is None:
            tok = torch.full((T,), -1, dtype=torch.int32, device=dev)
        else:
            adapter_ids = as_ids_tensor(adapter_ids, "adapter_ids")
            tok = expand_ids(adapter_ids, tuple(token_shape), dev)
        validate = self.validate and not torch.compiler.is_compiling()
        if validate and adapter_ids is not None and adapter_ids.device.type == "cpu" and T:
            self.batch._check_range(adapter_ids.reshape(-1))
        # CPU ids were checked above; device ids are served as -1 if out of range (checked lazily with
        # batch.check()) so that building never syncs.
        return self.batch.build(tok, validate=False)

    def _pre_hook(self, module, args, kwargs):
        ids = kwargs.pop("adapter_ids", None)
        if ids is None:
            ids = current_adapter_ids()
        x = kwargs.get("input_ids")
        if x is None and args:
            x = args[0]
        if isinstance(x, torch.Tensor):
            # token ids [batch, seq]; a float first input is activations [batch, seq, hidden]
            shape = tuple(x.shape[:-1]) if x.is_floating_point() else tuple(x.shape)
        else:
            emb = kwargs.get("inputs_embeds")
            if not isinstance(emb, torch.Tensor):
                raise ValueError("input_ids: expected input_ids or inputs_embeds to size the LoRA batch, got neither")
            shape = tuple(emb.shape[:-1])
        self.prepare(ids, shape)
        return args, kwargs

    # ---- undo ------------------------------------------------------------------------------------------
    def unpatch(self) -> nn.Module:
        """Put the original modules back and remove the hook; returns the model. Idempotent."""
        if not self.active:
            return self.model
        self._hook.remove()
        for path, orig in self._originals.items():
            _set_submodule(self.model, path, orig)
        self.active = False
        return self.model

    def __repr__(self) -> str:
        return (f"LoRAPatch({len(self.layers)} layers, max_adapters={self.max_adapters}, "
                f"max_tokens={self.batch.max_tokens}, active={self.active})")


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def _layers_of(weights_or_pool) -> Optional[Mapping[str, LoRAWeights]]:
    if weights_or_pool is None:
        return None
    if isinstance(weights_or_pool, Mapping):
        return weights_or_pool
    layers = getattr(weights_or_pool, "layers", None)  # an AdapterPool: [(module paths per slice, LoRAWeights)]
    if isinstance(layers, Mapping):
        return layers
    if isinstance(layers, (list, tuple)):
        out = {}
        for paths, w in layers:
            check(len(paths) == 1, "weights_or_pool", "a pool of one-slice layers (patch_model replaces one module "
                  "per LoRAWeights)", f"a fused layer over {tuple(paths)}")
            out[paths[0]] = w
        return out
    raise TypeError("weights_or_pool: expected None, a {module path: LoRAWeights} mapping or an AdapterPool, "
                    f"got {type(weights_or_pool).__name__}")


def patch_model(
    model: nn.Module,
    weights_or_pool=None,
    target_modules: Optional[Union[str, Iterable[str]]] = None,
    *,
    max_adapters: Optional[int] = None,
    max_rank: Optional[int] = None,
    capacity_rows: Optional[int] = None,
    max_tokens: int = 4096,
    dtype: Optional[torch.dtype] = None,
    validate: bool = True,
    unwrap: Optional[Callable[[nn.Module], nn.Module]] = None,
) -> LoRAPatch:
    """Replace the target modules of ``model`` by :class:`~lora_kernels.nn.LoRALinear` (in place).

    Args:
        model: a transformers model (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``GPT2LMHeadModel``, ...) or
            any ``nn.Module`` whose forward takes ``input_ids`` (or ``inputs_embeds``) first.
        weights_or_pool: None (new empty :class:`~lora_kernels.LoRAWeights` per layer, sized by
            ``max_adapters``/``max_rank``/``capacity_rows``), a mapping ``{module path: LoRAWeights}``, or an
            :class:`~lora_kernels.AdapterPool` built on such a mapping (its ``layers``).
        target_modules: module name suffixes (PEFT's convention: ``"q_proj"`` matches
            ``model.layers.0.self_attn.q_proj``) or one regex over the full path; default: the mapping's keys
            when one is given, else :data:`DEFAULT_TARGETS`.
        max_adapters, max_rank, capacity_rows, dtype: for the new weights (dtype default: the base module's
            floating dtype, bf16 for an integer-weight base).
        max_tokens: capacity of the model's LoRABatch (tokens per forward).
        validate: check CPU ids against ``[-1, max_adapters)`` before each forward (skipped under
            torch.compile and for ids on the GPU, which are served as -1 when out of range).
        unwrap: maps a target module to the module the LoRALinear wraps (default: itself; PEFT's layers:
            their ``base_layer``). :meth:`LoRAPatch.unpatch` puts the target module itself back.

    Returns:
        :class:`LoRAPatch` (``.unpatch()`` restores the model).

    Raises:
        TypeError / ValueError naming the argument: no target module found, a target that is not a linear,
        weights whose widths differ from the module's, a mapping key that names no module, missing sizes.
        The model is unchanged when it raises.
    """
    check(isinstance(model, nn.Module), "model", "an nn.Module", type(model).__name__, TypeError)
    check(isinstance(max_tokens, int) and max_tokens >= 1, "max_tokens", "an int >= 1", max_tokens)
    layers_in = _layers_of(weights_or_pool)
    if target_modules is None:
        targets: Union[str, Tuple[str, ...]] = tuple(layers_in) if layers_in is not None else DEFAULT_TARGETS
    else:
        targets = target_modules if isinstance(target_modules, str) else tuple(target_modules)
    found = [(p, m) for p, m in model.named_modules() if p and _matches(p, targets)]
    if layers_in is not None:
        missing = [k for k in layers_in if k not in dict(found)]
        check(not missing, "weights_or_pool", "keys that name target modules of the model",
              f"unknown or untargeted paths {missing[:4]}")
    check(bool(found), "target_modules", "names matching at least one module of the model", targets)
    plan = []
    for path, target in found:
        check(not isinstance(target, LoRALinear), "model", "a model not patched yet (unpatch() the previous "
              "LoRAPatch first)", f"{path} is already a LoRALinear")
        mod = unwrap(target) if unwrap is not None else target
        feats = linear_features(mod)
        check(feats is not None, "target_modules", f"linear modules (x W^T); {path} is {type(mod).__name__}",
              targets, TypeError)
        dev, pdt = _param_device_dtype(mod)
        if layers_in is not None:
            w = layers_in.get(path)
            if w is None:
                continue  # targeted by name but no weights given for it: left as it is
            check(isinstance(w, LoRAWeights), f"weights_or_pool[{path!r}]", "a LoRAWeights", type(w).__name__,
                  TypeError)
            check((w.in_features, w.out_features) == feats, f"weights_or_pool[{path!r}]",
                  f"(in, out) = {feats} (the module's)", (w.in_features, w.out_features))
        else:
            check(max_adapters is not None and max_rank is not None, "max_adapters",
                  "max_adapters and max_rank when no weights are given", (max_adapters, max_rank))
            w = LoRAWeights(feats[0], feats[1], max_adapters, max_rank, capacity_rows=capacity_rows,
                            dtype=dtype or pdt or torch.bfloat16, device=dev)
        plan.append((path, target, mod, w))
    check(bool(plan), "weights_or_pool", "weights for at least one target module", "none")
    n_slots = min(w.max_adapters for *_, w in plan)
    dev = plan[0][3].device
    batch = LoRABatch(max_tokens, n_slots, device=dev)
    layers: Dict[str, LoRALinear] = {}
    originals: Dict[str, nn.Module] = {}
    for path, target, mod, w in plan:  # nothing below raises for validated inputs: the model changes only here
        layer = LoRALinear(mod, w, batch=batch)
        layers[path] = layer
        originals[path] = target
        _set_submodule(model, path, layer)
    return LoRAPatch(model, layers, originals, batch, validate)
