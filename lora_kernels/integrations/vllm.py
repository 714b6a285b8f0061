"""A vLLM-style Punica wrapper on this library's kernels: :class:`PunicaWrapperLK`.

It has the method names and argument semantics of vLLM's ``PunicaWrapperGPU`` (vllm/lora/punica_wrapper/
punica_gpu.py), so a fork of vLLM can hand its LoRA layers this object instead; the layers and their weight
stacks stay as they are. docs/integrations.md has the metadata mapping.

Metadata (vLLM's layout):
    ``update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, extra_vocab_size=0)``: ``mapping``
    has ``index_mapping`` (one LoRA *id* per token; ``0`` = no LoRA), ``prompt_mapping`` (one LoRA id per
    sampled row, for the logits) and ``is_prefill``; ``lora_index_to_id[slot]`` is the LoRA id held by slot
    ``slot`` (None = empty). Token t gets slot ``lora_index_to_id.index(id_t)`` or ``-1`` (vLLM's
    ``token_lora_indices``), sampled row j likewise (``sampler_indices``). Each becomes a
    :class:`~lora_kernels.LoRABatch` (token batch, sampler batch), built in place: fixed capacity, no host
    sync, so a CUDA graph that captured the LoRA ops replays with new mappings.

Weights (vLLM's layout, per slice i of a fused projection): ``lora_a_stacked[i]`` [max_loras, 1, r, in],
``lora_b_stacked[i]`` [max_loras, 1, out_i, r] (3-dim [max_loras, r, in] / [max_loras, out_i, r] accepted).
vLLM bakes each adapter's scaling into its B stack and passes ``scale=1.0``; ``scale`` multiplies every
adapter. Slots are padded to r with zero rows (what vLLM stores), so the delta is exact. Each distinct stack is
converted once to the rank-paged :class:`~lora_kernels.LoRAWeights` and refreshed in place when the engine
writes it again (see :mod:`._stacked`: version counters, :meth:`PunicaWrapperLK.refresh_weights`; inference-mode
tensors are converted each call unless :meth:`PunicaWrapperLK.freeze_weights` is used).

Semantics (T tokens, ``i_t`` = token t's slot, nothing for ``-1``):
    add_shrink:   ``y[s, t, :] = scale * x[t] @ A_{s,i_t}^T``   (y fp32 [S, T, r]; overwritten, 0 for -1
                  tokens: what vLLM's GPU kernel does, which zeroes the buffer)
    add_expand:   ``y[t, off_s : off_s + out_s] += x[s, t] @ B_{s,i_t}^T``, ``off_0 = offset_start``
    add_lora_embedding: ``y[t] += x[t] @ B_{i_t}^T`` (x [T, r]: the LoRA-A embedding rows already gathered)
    add_lora_linear:    ``y[t, slice s] += scale * (x[t] @ A_{s,i_t}^T) @ B_{s,i_t}^T`` (one fused launch)
    add_lora_logits:    as add_lora_linear with one slice, rows indexed by the sampler mapping
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .._validation import check, check_fits, check_real, check_tensor
from ..batch import LoRABatch
from ..ops.sgmv import add_lora_, expand_, shrink
from ..weights import LoRAWeights
from ._stacked import StackCache, padded_weights, slot_ranks

__all__ = ["PunicaWrapperLK", "LoRAMapping", "convert_mapping"]

TensorSeq = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass
class LoRAMapping:
    """vLLM's ``LoRAMapping`` fields this wrapper reads (a vLLM fork passes its own object)."""

    index_mapping: Tuple[int, ...]
    prompt_mapping: Tuple[int, ...]
    is_prefill: bool = False


def convert_mapping(ids: Sequence[int], lora_index_to_id: Sequence[Optional[int]]) -> List[int]:
    """LoRA ids (``0``/negative = none) -> slot indices (``-1`` = none), as vLLM's ``convert_mapping``.

    Raises:
        ValueError: an id that no slot holds.
    """
    slot = {lid: k for k, lid in enumerate(lora_index_to_id) if lid is not None}
    out = []
    for v in ids:
        v = int(v)
        if v <= 0:
            out.append(-1)
        elif v in slot:
            out.append(slot[v])
        else:
            raise ValueError(f"mapping: expected LoRA ids held by lora_index_to_id {list(lora_index_to_id)}, got {v}")
    return out


def _as_tuple(v: TensorSeq) -> Tuple[torch.Tensor, ...]:
    return (v,) if isinstance(v, torch.Tensor) else tuple(v)


def _stack3(t: torch.Tensor, name: str) -> torch.Tensor:
    """[N, 1, a, b] or [N, a, b] -> [N, a, b] (a view)."""
    check_tensor(name, t)
    check(t.ndim in (3, 4) and (t.ndim == 3 or t.shape[1] == 1), name,
          "shape [max_loras, 1, a, b] or [max_loras, a, b]", tuple(t.shape))
    return t if t.ndim == 3 else t[:, 0]


class PunicaWrapperLK:
    """vLLM ``PunicaWrapperGPU``-compatible LoRA backend on lora_kernels' ops and :class:`LoRABatch`.

    Args:
        max_num_batched_tokens: capacity of the token batch (and of the sampler batch).
        max_batches: accepted for signature compatibility (the segment form needs no per-request buffers).
        device: where the metadata lives.
        max_loras: adapter slots (keyword, as in vLLM).
        detect_ranks: read each slot's true rank from its stacks when they are converted (see
            :func:`._stacked.slot_ranks`): same results, the kernels skip the zero padding rows.
    """

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device: Union[torch.device, str],
                 *, detect_ranks: bool = False, **kwargs):
        max_loras = kwargs.get("max_loras")
        check(isinstance(max_loras, int) and max_loras >= 1, "max_loras", "an int >= 1 (keyword)", max_loras)
        check(isinstance(max_num_batched_tokens, int) and max_num_batched_tokens >= 1, "max_num_batched_tokens",
              "an int >= 1", max_num_batched_tokens)
        self.device = torch.device(device)
        self.max_loras = max_loras
        self.max_num_batched_tokens = max_num_batched_tokens
        self.token_batch = LoRABatch(max_num_batched_tokens, max_loras, self.device)
        self.sampler_batch = LoRABatch(max_num_batched_tokens, max_loras, self.device)
        self._token_ids = torch.full((max_num_batched_tokens,), -1, dtype=torch.int32, device=self.device)
        self._sampler_ids = torch.full((max_num_batched_tokens,), -1, dtype=torch.int32, device=self.device)
        self._n_tokens = 0
        self._n_sampler = 0
        self.is_prefill = False
        self.no_lora = True
        self._cache = StackCache()
        # Read each slot's true rank (its last non-zero rank row) once per conversion: the kernels then skip the
        # zero rows a padded stack carries. One host sync per conversion, never per call once cached.
        self.detect_ranks = bool(detect_ranks)

    # ---- metadata ------------------------------------------------------------------------------------------
    def update_metadata(self, mapping, lora_index_to_id: Sequence[Optional[int]], max_loras: int,
                        vocab_size: int = 0, extra_vocab_size: int = 0, **kwargs) -> None:
        """Read vLLM's mapping (see the module docstring) and build both batches in place.

        Raises:
            ValueError: more tokens than ``max_num_batched_tokens``, ``max_loras`` above this wrapper's, or a
            LoRA id no slot holds; the previous metadata is kept then.
        """
        check(max_loras <= self.max_loras, "max_loras", f"<= {self.max_loras} (the wrapper's)", max_loras)
        tok = convert_mapping(mapping.index_mapping, lora_index_to_id)
        smp = convert_mapping(mapping.prompt_mapping, lora_index_to_id)
        for name, v in (("mapping.index_mapping", tok), ("mapping.prompt_mapping", smp)):
            check(len(v) <= self.max_num_batched_tokens, name, f"at most {self.max_num_batched_tokens} entries",
                  len(v))
        self.load_slot_ids(torch.tensor(tok, dtype=torch.int32), torch.tensor(smp, dtype=torch.int32))
        self.is_prefill = bool(getattr(mapping, "is_prefill", False))
        self.no_lora = all(v < 0 for v in tok)

    def load_slot_ids(self, token_slots: torch.Tensor, sampler_slots: torch.Tensor) -> None:
        """Build both batches from slot indices (``-1`` = none; any integer dtype, host or device tensors).

        A device-to-device copy into the fixed buffers (no host sync): what a caller that already converted
        the mapping (vLLM's own ``PunicaWrapperBase``) uses instead of :meth:`update_metadata`.
        """
        T, R = int(token_slots.shape[0]), int(sampler_slots.shape[0])
        for name, n in (("token_slots", T), ("sampler_slots", R)):
            check(n <= self.max_num_batched_tokens, name, f"at most {self.max_num_batched_tokens} entries", n)
        self._token_ids[:T].copy_(token_slots, non_blocking=True)
        self._sampler_ids[:R].copy_(sampler_slots, non_blocking=True)
        self._n_tokens, self._n_sampler = T, R
        self.token_batch.build(self._token_ids[:T], validate=False)
        self.sampler_batch.build(self._sampler_ids[:R], validate=False)

    @property
    def token_lora_indices(self) -> torch.Tensor:
        """int32 [T]: slot per token (-1 = none), vLLM's ``token_lora_indices``."""
        return self._token_ids[: self._n_tokens]

    @property
    def sampler_indices(self) -> torch.Tensor:
        """int32 [rows]: slot per sampled row (-1 = none), vLLM's ``sampler_indices``."""
        return self._sampler_ids[: self._n_sampler]

    def _batch(self, which: str, T: int) -> LoRABatch:
        b = self.token_batch if which == "token" else self.sampler_batch
        if b.num_tokens != T:
            # vLLM slices its metadata to x's row count (meta_args(x.size(0))); a rebuild on the same device
            # buffer keeps that sync-free.
            n = self._n_tokens if which == "token" else self._n_sampler
            check(T <= n, "x", f"at most {n} rows (the tokens of the last update_metadata)", T)
            ids = self._token_ids if which == "token" else self._sampler_ids
            b.build(ids[:T], validate=False)
        return b

    def freeze_weights(self, frozen: bool = True) -> None:
        """Cache converted stacks that have no version counter (inference tensors) too; call
        :meth:`refresh_weights` after the engine writes them."""
        self._cache.freeze(frozen)

    def refresh_weights(self) -> None:
        """Re-convert every cached stack in place (same storage: captured CUDA graphs see the new weights)."""
        self._cache.refresh()

    def invalidate_weights(self) -> None:
        """Forget the conversions (new storage at the next use: not for captured graphs; see refresh_weights)."""
        self._cache.invalidate()

    # ---- weights ---------------------------------------------------------------------------------------------
    def _weights(self, a: Optional[Tuple[torch.Tensor, ...]], b: Optional[Tuple[torch.Tensor, ...]]) -> LoRAWeights:
        """The converted weights of A and/or B stacks (a zero stand-in for the missing side)."""
        As = None if a is None else [_stack3(t, f"lora_a_stacked[{k}]") for k, t in enumerate(a)]
        bs = None if b is None else [_stack3(t, f"lora_b_stacked[{k}]") for k, t in enumerate(b)]
        ref = bs[0] if bs is not None else As[0]
        N = ref.shape[0]
        r = ref.shape[2] if bs is not None else ref.shape[1]
        check(N >= self.max_loras, "lora_a_stacked/lora_b_stacked", f"at least max_loras={self.max_loras} slots", N)
        if bs is not None:
            for k, t in enumerate(bs):
                check(t.shape[0] == N and t.shape[2] == r, f"lora_b_stacked[{k}]", f"shape ({N}, 1, out, {r})",
                      tuple(b[k].shape))
        if As is not None:
            check(bs is None or len(As) == len(bs), "lora_a_stacked", f"{len(bs or ())} slices (as lora_b_stacked)",
                  len(As))
            for k, t in enumerate(As):
                check(t.shape[0] == N and t.shape[1] == r and t.shape[2] == As[0].shape[2], f"lora_a_stacked[{k}]",
                      f"shape ({N}, 1, {r}, in)", tuple(a[k].shape))
        S = len(bs) if bs is not None else len(As)
        outs = tuple(int(t.shape[1]) for t in bs) if bs is not None else (1,) * S

        na, has_a, has_b = len(a or ()), a is not None, b is not None
        detect, dtype, dev = self.detect_ranks, ref.dtype, ref.device

        def build(*stacks) -> LoRAWeights:  # the source stacks (a's slices, then b's): held weakly by the cache
            As = [_stack3(t, "lora_a_stacked") for t in stacks[:na]] if has_a else None
            bs = [_stack3(t, "lora_b_stacked") for t in stacks[na:]] if has_b else None
            with torch.no_grad():
                a_pl = None
                if As is not None:
                    a_pl = As[0] if S == 1 and As[0].is_contiguous() else torch.stack(As).contiguous()
                if bs is not None:
                    b_t = torch.cat([t.transpose(1, 2) for t in bs], dim=2).contiguous()
                else:
                    b_t = torch.zeros(N, r, S, dtype=dtype, device=dev)
                ranks = slot_ranks(a_pl, None if bs is None else b_t, outs) if detect else None
                return padded_weights(a_pl, b_t, outs, ranks=ranks)

        return self._cache.get(list(a or ()) + list(b or ()), ("vllm", a is None, b is None, outs), build)

    @staticmethod
    def _check_scale(scale) -> float:
        """``scale`` as a float: a finite real number that fp32 holds (never a string, bool or complex)."""
        return check_fits("scale", check_real("scale", scale))

    @staticmethod
    def _scale(w: LoRAWeights, scale: float) -> None:
        if getattr(w, "_lk_scale", None) != scale:  # host memo: the device fill runs only when it changes
            w.scales.fill_(float(scale))
            w._lk_scale = scale

    # ---- the PunicaWrapper interface --------------------------------------------------------------------------
    def add_shrink(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: TensorSeq, scale: float, **kwargs) -> None:
        """``y[s] = scale * x @ A_s^T`` per token's slot; y fp32 [S, T, r] (overwritten; 0 for -1 tokens)."""
        self.shrink_rows(y, x, lora_a_stacked, scale, "token")

    def shrink_rows(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: TensorSeq, scale: float,
                    which: str = "token") -> None:
        """:meth:`add_shrink` on the token batch (``which="token"``) or the sampler batch (``"sampler"``)."""
        scale = self._check_scale(scale)
        a = _as_tuple(lora_a_stacked)
        x2 = x.reshape(-1, x.shape[-1])
        w = self._weights(a, None)
        check_tensor("y", y, shape=(len(a), x2.shape[0], w.max_rank), dtypes=(torch.float32,), device=x.device)
        h = shrink(x2, w, self._batch(which, x2.shape[0]))
        y.copy_(h.mul_(scale) if scale != 1.0 else h)

    def add_expand(self, y: torch.Tensor, x: TensorSeq, lora_b_stacked: TensorSeq, output_slices: Sequence[int],
                   offset_start: int = 0, add_inputs: bool = True, **kwargs) -> None:
        """``y[:, off_s : off_s + out_s] (+)= x[s] @ B_s^T`` per token's slot (``off_0 = offset_start``).

        ``add_inputs=False`` overwrites the slice columns (all tokens; -1 tokens get 0) instead of adding.
        """
        b = _as_tuple(lora_b_stacked)
        h = torch.stack(list(x)) if not isinstance(x, torch.Tensor) else x
        check(h.ndim == 3 and h.shape[0] == len(b) == len(output_slices), "x",
              f"[{len(b)}, T, r] (one plane per slice of lora_b_stacked / output_slices)", tuple(h.shape))
        w = self._weights(None, b)
        check(tuple(output_slices) == w.slice_outs, "output_slices", f"{w.slice_outs} (lora_b_stacked widths)",
              tuple(output_slices))
        self._scale(w, 1.0)
        y2 = y.view(-1, y.shape[-1])
        ys = y2[:, offset_start : offset_start + w.out_features]
        check(ys.shape[1] == w.out_features, "offset_start", f"room for {w.out_features} columns in y",
              offset_start)
        batch = self._batch("token", h.shape[1])
        if not add_inputs:
            # Into a zeroed copy, then written back: zeroing ys first would change the caller's y even when
            # expand_ refuses its arguments.
            out = torch.zeros_like(ys)
            expand_(out, h.float().contiguous(), w, batch)
            ys.copy_(out)
            return
        expand_(ys, h.float().contiguous(), w, batch)

    def add_lora_embedding(self, y: torch.Tensor, x: torch.Tensor, lora_b_stacked: torch.Tensor,
                           add_inputs: bool = True, **kwargs) -> None:
        """``y[t] (+)= x[t] @ B_{i_t}^T``; x [T, r] holds the LoRA-A embedding rows of each token."""
        self.add_expand(y, x.unsqueeze(0), (lora_b_stacked,), (int(_stack3(lora_b_stacked, "lora_b_stacked")
                                                                   .shape[1]),), 0, add_inputs)

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: TensorSeq, lora_b_stacked: TensorSeq,
                        scale: float, output_slices: Sequence[int], *, buffer=None, **kwargs) -> None:
        """``y[t, slice s] += scale * (x[t] @ A_s^T) @ B_s^T`` per token's slot: one fused
        :func:`~lora_kernels.add_lora_` over all slices (no intermediate buffer; ``buffer`` must be None)."""
        check(buffer is None, "buffer", "None (the fused op needs no buffer)", type(buffer).__name__)
        scale = self._check_scale(scale)
        a, b = _as_tuple(lora_a_stacked), _as_tuple(lora_b_stacked)
        w = self._weights(a, b)
        check(tuple(output_slices) == w.slice_outs, "output_slices", f"{w.slice_outs} (lora_b_stacked widths)",
              tuple(output_slices))
        self._scale(w, scale)
        y2 = y.view(-1, y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        add_lora_(y2[:, : w.out_features], x2, w, self._batch("token", x2.shape[0]))

    def add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                        lora_b_stacked: torch.Tensor, scale, *, buffer=None, **kwargs) -> None:
        """``y[j] += scale * (x[j] @ A^T) @ B^T`` with the slot of sampled row j (``sampler_indices``)."""
        check(buffer is None, "buffer", "None (the fused op needs no buffer)", type(buffer).__name__)
        scale = self._check_scale(scale)
        w = self._weights((lora_a_stacked,), (lora_b_stacked,))
        self._scale(w, scale)
        y2 = y.view(-1, y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        add_lora_(y2[:, : w.out_features], x2, w, self._batch("sampler", x2.shape[0]))
