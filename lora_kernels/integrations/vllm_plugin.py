"""vLLM plugin: vLLM's LoRA layers run on this library, selected through vLLM's own plugin mechanism (no fork).

Installing lora_kernels declares the entry point ``lora_kernels = lora_kernels.integrations.vllm_plugin:register``
in vLLM's ``vllm.general_plugins`` group (setup.py). vLLM calls :func:`register` in every process it starts
(``vllm.plugins.load_general_plugins``); with ``LORA_KERNELS_VLLM=1`` in the environment it makes vLLM's
punica-wrapper choice return :class:`PunicaWrapperLoRAKernels`, otherwise it does nothing.

The hook (the least invasive one vLLM 0.33 offers): vLLM builds every punica wrapper with
``vllm.lora.punica_wrapper.punica_selector.get_punica_wrapper``, which resolves the qualified name returned by
``current_platform.get_punica_wrapper()`` at call time. :func:`register` wraps that one classmethod of the active
platform class so it answers this module's class wherever the platform would answer vLLM's
``PunicaWrapperGPU`` (CUDA, ROCm); other wrappers (CPU, XPU) are left alone. No vLLM source is edited and no
other vLLM symbol is patched.

:class:`PunicaWrapperLoRAKernels` subclasses the installed vLLM's ``PunicaWrapperBase``: vLLM's own
``_update_base_metadata`` converts the mapping (so ``token_lora_indices``, ``sampler_indices``,
``sampler_indices_padded`` and ``_embeddings_indices``, which vLLM's layers read, are vLLM's), and every abstract
method runs on :class:`~lora_kernels.integrations.vllm.PunicaWrapperLK` (lk.shrink / lk.expand_ /
lk.add_lora_ over :class:`~lora_kernels.LoRABatch`) with ``PunicaWrapperGPU``'s semantics, including its no-LoRA
early exits. Not covered: the MoE LoRA methods (``add_lora_w13`` / ``add_lora_w2`` / ``add_lora_fused_moe`` /
``moe_lora_align_block_size``: they raise NotImplementedError naming the switch to turn off).

Weights: each layer's stacks are converted once and refreshed once per load event (see :mod:`._stacked`). The
wrapper cannot see vLLM's ``set_lora`` / ``reset_lora`` (they write the layers' stacks directly), but vLLM passes
its ``lora_index_to_id`` to :meth:`update_metadata` after every (de)activation, before the step that uses it: a
change there re-converts every cached stack at once, **in place** (the same storage, so the decode CUDA graphs
vLLM captured at start-up read the new adapters; a conversion into new storage would leave them reading the old
one, or freed memory). Stacks with a version counter are also refreshed when written (their version bumps). At
each conversion every slot's true rank is read from its trailing zero rows (:func:`._stacked.slot_ranks`), so the
kernels skip the padding of a smaller adapter.

Supported vLLM versions: :data:`SUPPORTED_VLLM_VERSIONS`. On another version :func:`register` logs a warning and
does nothing, and importing :class:`PunicaWrapperLoRAKernels` raises ImportError naming the supported versions.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Sequence

import torch

from ._engine_pin import installed_version, pin_message

__all__ = ["register", "SUPPORTED_VLLM_VERSIONS", "ENV_SWITCH", "PunicaWrapperLoRAKernels"]

logger = logging.getLogger(__name__)

SUPPORTED_VLLM_VERSIONS = ("0.33.0",)
ENV_SWITCH = "LORA_KERNELS_VLLM"
QUALNAME = "lora_kernels.integrations.vllm_plugin.PunicaWrapperLoRAKernels"
VLLM_GPU_QUALNAME = "vllm.lora.punica_wrapper.punica_gpu.PunicaWrapperGPU"


def enabled() -> bool:
    """Whether the environment switch asks for this backend (``LORA_KERNELS_VLLM`` = 1 / true / yes / on)."""
    return os.environ.get(ENV_SWITCH, "").strip().lower() in ("1", "true", "yes", "on")


def installed_vllm_version() -> Optional[str]:
    """The installed vLLM's version (package metadata; vLLM itself is not imported), or None."""
    return installed_version("vllm")


def version_message(found: Optional[str]) -> str:
    return pin_message("vLLM plugin", "vllm", SUPPORTED_VLLM_VERSIONS, found, f"unset {ENV_SWITCH}")


def _choose_ours(original):
    """A ``get_punica_wrapper`` classmethod body answering :data:`QUALNAME` where ``original`` answers vLLM's
    GPU wrapper."""

    def get_punica_wrapper(cls) -> str:
        name = original()
        return QUALNAME if name == VLLM_GPU_QUALNAME else name

    get_punica_wrapper._lora_kernels_original = original
    return get_punica_wrapper


def register() -> None:
    """vLLM general plugin entry point: select :class:`PunicaWrapperLoRAKernels` when enabled.

    Does nothing without ``LORA_KERNELS_VLLM=1``; logs a warning and does nothing on an unsupported vLLM.
    Idempotent (vLLM loads plugins once per process, possibly in several processes).
    """
    if not enabled():
        return
    found = installed_vllm_version()
    if found not in SUPPORTED_VLLM_VERSIONS:
        logger.warning("%s: vLLM keeps its own LoRA kernels.", version_message(found))
        return
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    if hasattr(platform_cls.get_punica_wrapper, "_lora_kernels_original"):
        return
    platform_cls.get_punica_wrapper = classmethod(_choose_ours(platform_cls.get_punica_wrapper))
    logger.info("lora_kernels: vLLM's punica wrapper is %s where vLLM would use PunicaWrapperGPU", QUALNAME)


def unregister() -> None:
    """Undo :func:`register` (tests)."""
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    original = getattr(platform_cls.get_punica_wrapper, "_lora_kernels_original", None)
    if original is not None:
        platform_cls.get_punica_wrapper = classmethod(original.__func__)


def _build_class():
    """Define :class:`PunicaWrapperLoRAKernels` on the installed vLLM's ``PunicaWrapperBase``."""
    found = installed_vllm_version()
    if found not in SUPPORTED_VLLM_VERSIONS:
        raise ImportError(version_message(found))
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase

    from .vllm import PunicaWrapperLK, TensorSeq

    class PunicaWrapperLoRAKernels(PunicaWrapperBase):
        """vLLM ``PunicaWrapperBase`` on lora_kernels (see the module docstring for what it covers).

        Args (vLLM's ``get_punica_wrapper`` call): ``max_num_batched_tokens``, ``max_batches``, ``device``,
        ``lora_config`` (keyword; ``lora_config.max_loras`` adapter slots).
        """

        def __init__(self, max_num_batched_tokens: int, max_batches: int, device, **kwargs):
            PunicaWrapperBase.__init__(self, max_num_batched_tokens, max_batches, device)
            self.lora_config = kwargs["lora_config"]
            self.max_loras = self.lora_config.max_loras
            self.lk = PunicaWrapperLK(max_num_batched_tokens, max_batches, device, max_loras=self.max_loras,
                                      detect_ranks=True)
            # vLLM's stacks may be inference tensors (no version counter): conversions are cached anyway and
            # refreshed in place when lora_index_to_id changes (update_metadata).
            self.lk.freeze_weights(True)
            self._slot_ids: Optional[list] = None
            self._no_lora_tokens = True
            self._no_lora_prompts = True

        # ---- metadata --------------------------------------------------------------------------------------
        def update_metadata(self, mapping, lora_index_to_id, max_loras: int, vocab_size: int, **kwargs) -> None:
            """vLLM's index conversion, then both LoRABatches built from its slot indices (device copies)."""
            self.is_prefill = mapping.is_prefill
            self._update_base_metadata(mapping, lora_index_to_id, max_loras, vocab_size)
            self._note_slots(lora_index_to_id)
            self.lk.load_slot_ids(self.token_lora_indices, self.sampler_indices)
            # PunicaWrapperGPU's no-LoRA flags (LoRAKernelMeta.prepare_tensors), read from the host mapping.
            self._no_lora_tokens = all(i <= 0 for i in mapping.index_mapping)
            self._no_lora_prompts = all(i <= 0 for i in mapping.prompt_mapping)
            self.no_lora = self._no_lora_tokens

        def _note_slots(self, lora_index_to_id: Sequence[Optional[int]]) -> None:
            """A slot that now holds another adapter (vLLM wrote its stacks): re-convert every cached stack now,
            in place (Python runs here before the step; a CUDA-graph replay of the step runs no Python)."""
            slots = list(lora_index_to_id)
            if slots != self._slot_ids:
                self.lk.refresh_weights()
                self._slot_ids = slots

        @property
        def conversions(self) -> int:
            """How many stack conversions ran (one per layer and load event)."""
            return self.lk._cache.conversions

        # ---- the abstract methods ------------------------------------------------------------------------------
        def add_shrink(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: TensorSeq, scale: float,
                       **kwargs: Any) -> None:
            """``y[s, t] = scale * x[t] @ A_{s,i_t}^T`` (y fp32 [S, T, r] overwritten, 0 for tokens without a
            LoRA); y untouched when no token has one (PunicaWrapperGPU's early exit)."""
            if self._no_lora_tokens or x.numel() == 0:
                return
            self.lk.shrink_rows(y, x, lora_a_stacked, scale, "token")

        def add_expand(self, y: torch.Tensor, x: TensorSeq, lora_b_stacked: TensorSeq,
                       output_slices: Sequence[int], offset_start: int = 0, add_inputs=True,
                       **kwargs: Any) -> None:
            """``y[t, off_s : off_s + out_s] (+)= x[s, t] @ B_{s,i_t}^T``; ``add_inputs=False`` overwrites the
            slice columns of the tokens with a LoRA (others untouched); nothing when no token has one."""
            if self._no_lora_tokens:
                return
            if add_inputs:
                self.lk.add_expand(y, x, lora_b_stacked, output_slices, offset_start, True)
                return
            self._overwrite_rows(y, offset_start, sum(output_slices), self.lk.token_lora_indices,
                                 lambda out: self.lk.add_expand(out, x, lora_b_stacked, output_slices, 0, True))

        @staticmethod
        def _overwrite_rows(y: torch.Tensor, offset: int, width: int, slots: torch.Tensor, add_delta) -> None:
            """``y[t, offset:offset+width] = delta[t]`` for the rows t with a LoRA (slot >= 0), others kept:
            what vLLM's expand kernel does with ``add_inputs=False`` (it visits only those rows)."""
            y2 = y.view(-1, y.shape[-1])
            ys = y2[:, offset : offset + width]
            out = torch.zeros_like(ys)
            add_delta(out)
            rows = slots[: ys.shape[0]].ge(0).unsqueeze(1)
            ys.copy_(torch.where(rows, out, ys))

        def add_lora_embedding(self, y: torch.Tensor, x: torch.Tensor, lora_b_stacked: torch.Tensor,
                               add_inputs: bool = True, **kwargs: Any) -> None:
            """``y[t] (+)= x[t] @ B_{i_t}^T`` (x: the LoRA-A embedding rows already gathered)."""
            out = int(lora_b_stacked.shape[-2])
            self.add_expand(y, x.unsqueeze(0), (lora_b_stacked,), (out,), 0, add_inputs)

        def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: TensorSeq,
                            lora_b_stacked: TensorSeq, scale: float, output_slices: Sequence[int], *,
                            buffer=None, **kwargs: Any) -> None:
            """``y[t, slice s] (+)= scale * (x[t] @ A_s^T) @ B_s^T`` per token's slot: one fused launch
            (``add_inputs`` keyword, default True; ``buffer`` must be None, as in PunicaWrapperGPU)."""
            assert buffer is None, "PunicaWrapperLoRAKernels.add_lora_linear: buffer must be None"
            add_inputs = kwargs.pop("add_inputs", True)
            if self._no_lora_tokens:
                return
            if add_inputs:
                self.lk.add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices)
                return
            self._overwrite_rows(y, 0, sum(output_slices), self.lk.token_lora_indices,
                                 lambda out: self.lk.add_lora_linear(out, x, lora_a_stacked, lora_b_stacked,
                                                                     scale, output_slices))

        def add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                            lora_b_stacked: torch.Tensor, scale, *, buffer=None, **kwargs: Any) -> None:
            """``y[j] += scale * (x[j] @ A^T) @ B^T`` with sampled row j's slot (``sampler_indices``)."""
            assert buffer is None, "PunicaWrapperLoRAKernels.add_lora_logits: buffer must be None"
            if self._no_lora_prompts:
                return
            self.lk.add_lora_logits(y, x, lora_a_stacked, lora_b_stacked, scale)

        def apply_lora_full_linear(self, y: torch.Tensor, x: torch.Tensor, weight_stacked: torch.Tensor,
                                   bias_stacked: torch.Tensor, module_enabled: torch.Tensor) -> None:
            """Rows whose request's adapter replaces this module (``module_enabled[slot]``):
            ``y[j] = x[j] @ W_slot^T + bias_slot``; other rows keep y (vLLM's ``_select_full_linear_output``)."""
            adapter_y = torch.zeros((1, x.shape[0], weight_stacked.shape[-2]), dtype=torch.float32,
                                    device=x.device)
            if not self._no_lora_prompts:
                self.lk.shrink_rows(adapter_y, x, (weight_stacked,), 1.0, "sampler")
            y.copy_(self._select_full_linear_output(y, adapter_y[0], bias_stacked, module_enabled))

        # ---- not covered ---------------------------------------------------------------------------------------
        def _not_covered(self, name: str):
            raise NotImplementedError(
                f"lora_kernels' vLLM plugin does not implement {name} (MoE LoRA); run this model with "
                f"{ENV_SWITCH}=0 to use vLLM's own kernels")

        def moe_lora_align_block_size(self, *args, **kwargs):
            self._not_covered("moe_lora_align_block_size")

        def add_lora_fused_moe(self, *args, **kwargs):
            self._not_covered("add_lora_fused_moe")

        def add_lora_w13(self, *args, **kwargs):
            self._not_covered("add_lora_w13")

        def add_lora_w2(self, *args, **kwargs):
            self._not_covered("add_lora_w2")

    PunicaWrapperLoRAKernels.__module__ = __name__
    PunicaWrapperLoRAKernels.__qualname__ = "PunicaWrapperLoRAKernels"
    return PunicaWrapperLoRAKernels


def __getattr__(name: str):
    # The class exists only on a supported vLLM: defining it imports vLLM, which importing this module (e.g. for
    # register()) must not do.
    if name == "PunicaWrapperLoRAKernels":
        cls = _build_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
