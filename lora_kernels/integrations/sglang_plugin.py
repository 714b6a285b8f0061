"""SGLang plugin: ``--lora-backend lora_kernels`` runs SGLang's LoRA layers on this library (no fork).

Installing lora_kernels declares the entry point ``lora_kernels = lora_kernels.integrations.sglang_plugin:register``
in SGLang's ``sglang.srt.plugins`` group (setup.py). SGLang runs every general plugin early in each of its
processes (``sglang.srt.plugins.load_plugins``: the server entry points before parsing the arguments, the scheduler
and its workers at start-up). :func:`register`:

1. registers :class:`LoRAKernelsBackend` under the name ``lora_kernels`` with SGLang's own backend registry
   (``sglang.srt.lora.backend.lora_registry.register_lora_backend``), which ``LoRAManager`` resolves
   ``--lora-backend`` through;
2. adds ``lora_kernels`` to the choices of the ``--lora-backend`` argument (SGLang's ``Arg`` metadata of the
   ``lora_backend`` field; the parser is built after the plugins ran);
3. registers an AFTER hook (SGLang's ``HookRegistry``, applied by ``load_plugins``) on
   ``LoRAManager._notify_lora_slots_updated``, which SGLang calls after every load into / removal from a memory
   pool slot: the backend refreshes its converted weights then (one conversion per load event, below).

Nothing else of SGLang is patched, and selecting another backend leaves SGLang as it was.

:class:`LoRAKernelsBackend` subclasses the installed SGLang's ``BaseLoRABackend``. Metadata: SGLang's
``LoRAManager.prepare_lora_batch`` hands over one slot per request (``weight_indices``), each slot's true rank
(``lora_ranks``: the adapter's ``r``, 0 for the base model / an empty slot) and scaling; the backend fills SGLang's
``LoRABatchInfo`` (which SGLang's layers read: ``lora_active``, ``has_active_lora``) and a
:class:`~lora_kernels.LoRABatch` (tokens of rank-0 slots are served as "no LoRA"). Kernels: run_lora_a_sgemm
(lk.shrink), run_lora_b_sgemm (lk.expand_), run_qkv_lora / run_gate_up_lora (one lk.add_lora_ over the slices),
run_lora_a_embedding (a lookup), the pruned LM-head passes (their own batches, SGLang's lm_head_batch_info
semantics); ``forward_with_base`` is SGLang's.

Weights: SGLang's pool keeps A ``[N, c * r_max, in]`` with slice s of slot i in rows ``[s r_i, (s + 1) r_i)`` and
B ``[N, out, r_max]``. Each stack a layer passes is converted once to this library's layout (A planes
``[c, N, r_max, in]``, B transposed) and wrapped with :meth:`LoRAWeights.from_padded` with the slots' true ranks,
so the kernels skip every row past an adapter's rank. The conversion is refreshed **in place** (same storage, so a
captured CUDA graph reads the new weights) when a slot is loaded or cleared (the hook above), when a slot is
served at another rank than it was converted with (seen in ``prepare_lora_batch``; SGLang passes rank 0 for the
resident slots a batch does not use, which needs no refresh: those tokens are not served), and when a stack's
version counter moved (an in-place write outside the
pool's loader; inference tensors have none). Memory: one converted copy of every LoRA stack (as large as
SGLang's own pool: Llama-3-8B, all seven projections, 8 slots of r_max 16, fp16: ~0.67 GB beside SGLang's ~0.67 GB).

Decode CUDA graphs: :meth:`init_decode_cuda_graph_batch_info` sizes a static request-slot buffer; in graph mode
``prepare_lora_batch`` only copies the new slots / ranks / scalings into static buffers, and the first LoRA call
of each forward (SGLang calls ``reset_routing_cache`` before every warm-up and capture forward) builds the token
batch from them on the device (no host sync), so a capture records the build and each replay rebuilds the batch
for its own requests (rows past the live requests: no LoRA). Not covered (refused
with a message naming the switch): MoE LoRA targets, DP attention (``supports_dp_attention`` False), prefill CUDA
graphs (``supports_prefill_cuda_graph`` False), LoRA-A overlap, extra (added) vocabulary tokens.

Supported SGLang versions: :data:`SUPPORTED_SGLANG_VERSIONS`. On another version :func:`register` logs a warning
and does nothing, and importing :class:`LoRAKernelsBackend` raises ImportError naming the supported versions.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any, List, Optional, Sequence, Tuple

import torch

from .._validation import check, check_tensor
from ._engine_pin import installed_version, pin_message

__all__ = ["register", "SUPPORTED_SGLANG_VERSIONS", "BACKEND_NAME", "LoRAKernelsBackend"]

logger = logging.getLogger(__name__)

SUPPORTED_SGLANG_VERSIONS = ("0.5.23",)
BACKEND_NAME = "lora_kernels"
SLOTS_UPDATED_HOOK = "sglang.srt.lora.lora_manager.LoRAManager._notify_lora_slots_updated"


def installed_sglang_version() -> Optional[str]:
    """The installed SGLang's version (package metadata; SGLang itself is not imported), or None."""
    return installed_version("sglang")


def version_message(found: Optional[str]) -> str:
    return pin_message("SGLang backend", "sglang", SUPPORTED_SGLANG_VERSIONS, found, "choose another --lora-backend")


# ---- registration ----------------------------------------------------------------------------------------------
def _backend_class():
    return __getattr__("LoRAKernelsBackend")  # built on first use (SGLang imported only then)


def _lora_backend_arg():
    """SGLang's ``Arg`` metadata of the ``lora_backend`` field as ``ServerArgs.add_cli_args`` reads it (its
    ``choices`` list is what the ``--lora-backend`` parser checks)."""
    from typing import get_type_hints

    from sglang.srt.arg_groups.arg_utils import Arg
    from sglang.srt.server_args import ServerArgs

    # ServerArgs' annotations are evaluated objects (the same Arg on every call); the field modules' are strings,
    # and evaluating those would give a fresh Arg each time.
    hint = get_type_hints(ServerArgs, include_extras=True)["lora_backend"]
    return next(m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Arg))


def _after_slots_updated(result, manager, slot_ids, *args, **kwargs):
    """HookRegistry AFTER hook of ``LoRAManager._notify_lora_slots_updated``: tell our backend."""
    notify = getattr(getattr(manager, "lora_backend", None), "on_lora_slots_updated", None)
    if callable(notify):
        notify(slot_ids)
    return result


def register() -> None:
    """SGLang general plugin entry point: make ``--lora-backend lora_kernels`` available (see the module docstring).

    Logs a warning and does nothing on an unsupported SGLang. Idempotent (SGLang loads plugins once per process,
    in several processes).
    """
    found = installed_sglang_version()
    if found not in SUPPORTED_SGLANG_VERSIONS:
        logger.warning("%s: the lora_kernels LoRA backend is not registered.", version_message(found))
        return
    from sglang.srt.lora.backend import lora_registry
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if BACKEND_NAME not in lora_registry.LORA_SUPPORTED_BACKENDS:
        lora_registry.register_lora_backend(BACKEND_NAME)(_backend_class)
    choices = _lora_backend_arg().choices
    if choices is not None and BACKEND_NAME not in choices:
        choices.append(BACKEND_NAME)
    if not any(h is _after_slots_updated for _, h, _ in HookRegistry._hooks.get(SLOTS_UPDATED_HOOK, ())):
        HookRegistry.register(SLOTS_UPDATED_HOOK, _after_slots_updated, HookType.AFTER)
    logger.info("lora_kernels: SGLang LoRA backend %r registered", BACKEND_NAME)


def unregister() -> None:
    """Undo :func:`register` (tests). An applied hook stays applied; it only forwards to backends that listen."""
    from sglang.srt.lora.backend import lora_registry
    from sglang.srt.plugins.hook_registry import HookRegistry

    lora_registry.LORA_SUPPORTED_BACKENDS.pop(BACKEND_NAME, None)
    choices = _lora_backend_arg().choices
    if choices is not None and BACKEND_NAME in choices:
        choices.remove(BACKEND_NAME)
    hooks = HookRegistry._hooks.get(SLOTS_UPDATED_HOOK)
    if hooks is not None and SLOTS_UPDATED_HOOK not in HookRegistry._patched:
        hooks[:] = [e for e in hooks if e[1] is not _after_slots_updated]


# ---- the backend -----------------------------------------------------------------------------------------------
class _Route:
    """One token batch: the LoRABatch, each token's slot rank (LoRA-A output layout), its token count."""

    __slots__ = ("batch", "tok_rank", "num_tokens")

    def __init__(self, batch, tok_rank: torch.Tensor, num_tokens: int):
        self.batch, self.tok_rank, self.num_tokens = batch, tok_rank, num_tokens


def _build_class():
    """Define :class:`LoRAKernelsBackend` on the installed SGLang's ``BaseLoRABackend``."""
    found = installed_sglang_version()
    if found not in SUPPORTED_SGLANG_VERSIONS:
        raise ImportError(version_message(found))
    from sglang.srt.lora.backend.base_backend import BaseLoRABackend
    from sglang.srt.lora.utils import (
        LoRABatchInfo,
        generate_sequence_lengths,
        get_lm_head_pruned_lens,
        merge_and_chunk_segments,
    )

    from ..batch import LoRABatch
    from ..ops.sgmv import add_lora_, expand_, shrink
    from ._stacked import StackCache, padded_weights, set_scales, slice_bounds
    from .sglang import output_or_zeros, packed_lora_a, pool_a_planes, pool_b_t

    @dataclasses.dataclass
    class LKBatchInfo(LoRABatchInfo):
        """SGLang's batch info plus the lora_kernels token batch it describes (None: built on first use)."""

        lk_route: Optional[_Route] = None

    class LoRAKernelsBackend(BaseLoRABackend):
        """SGLang ``BaseLoRABackend`` on lora_kernels (module docstring: semantics, weights, graphs, limits).

        Args (as SGLang's ``LoRAManager`` passes them):
            max_loras_per_batch: memory pool slots.
            device: where activations, weights and metadata live.
            server_args: SGLang's ServerArgs (optional): ``chunked_prefill_size`` sizes the first token batch.
        """

        name = BACKEND_NAME
        supports_lora_a_overlap = False
        supports_dp_attention = False
        supports_prefill_cuda_graph = False

        def __init__(self, max_loras_per_batch: int, device, **kwargs):
            check(isinstance(max_loras_per_batch, int) and max_loras_per_batch >= 1, "max_loras_per_batch",
                  "an int >= 1", max_loras_per_batch)
            super().__init__(max_loras_per_batch, torch.device(device))
            N = max_loras_per_batch
            sa = kwargs.get("server_args")
            self._capacity = max(int(getattr(sa, "chunked_prefill_size", 0) or 0), 256)
            self._route_main: Optional[_Route] = None  # the forward batch's route (rebuilt in place)
            self._lm_routes: List[_Route] = []  # the LM head's pruned-row routes (rebuilt in place per step)
            self._ranks_host: Tuple[int, ...] = (0,) * N  # this batch's slot ranks (0: not served)
            self._conv_ranks: Tuple[int, ...] = (0,) * N  # the ranks the converted weights hold
            self._ranks = torch.zeros(N, dtype=torch.int32, device=self.device)
            self._scalings = torch.zeros(N, dtype=torch.float32, device=self.device)
            # converted once per stack, refreshed in place (load events, rank changes, writes): see _stacked
            self._stacks = StackCache()
            self._stacks.freeze()  # pool stacks without a version counter change only with a load event
            self._graph = None  # decode graph: (max_bs, tokens per request, request slots buffer)
            self._pending_graph_build = False  # graph mode: the batch is built by the next LoRA call
            self.cuda_graph_batch_info = None
            self.slot_updates = 0  # notifications received (tests and stats)

        # ---- metadata --------------------------------------------------------------------------------------
        def _route(self, capacity: int) -> _Route:
            """The main route, grown (re-allocated) when a batch needs more tokens than it holds."""
            r = self._route_main
            if r is None or r.batch.max_tokens < capacity:
                r = self._route_main = self._new_route(max(capacity, self._capacity))
                self._capacity = r.batch.max_tokens
            return r

        def _fill(self, route: _Route, ids: torch.Tensor) -> _Route:
            """Build ``route`` in place from per-token slots (rank-0 slots served as -1); device work only."""
            T = ids.shape[0]
            ranks = self._ranks[ids.clamp(min=0).long()]
            served = torch.where((ids >= 0) & (ranks > 0), ids, torch.full_like(ids, -1))
            route.batch.build(served, validate=False)
            route.tok_rank[:T].copy_(torch.where(served >= 0, ranks, torch.zeros_like(ranks)).long())
            route.num_tokens = T
            return route

        def _set_slots(self, lora_ranks: Sequence[int], scalings: Sequence[float]) -> None:
            from .._validation import check_fits, check_int, check_real

            N = self.max_loras_per_batch
            check(len(lora_ranks) == N, "lora_ranks", f"{N} entries (one per slot)", len(lora_ranks))
            check(len(scalings) == N, "scalings", f"{N} entries (one per slot)", len(scalings))
            rk = tuple(check_int(f"lora_ranks[{k}]", r, lo=0) for k, r in enumerate(lora_ranks))
            sc = [check_fits(f"scalings[{k}]", check_real(f"scalings[{k}]", v)) for k, v in enumerate(scalings)]
            conv = tuple(r if r > 0 else c for r, c in zip(rk, self._conv_ranks))
            cap = self._stacks.rank_capacity()
            check(cap is None or max(conv) <= cap, "lora_ranks", f"ranks <= {cap} (the converted stacks' r_max)", rk)
            self._scalings.copy_(torch.tensor(sc, dtype=torch.float32), non_blocking=True)
            if rk != self._ranks_host:
                self._ranks_host = rk
                self._ranks.copy_(torch.tensor(rk, dtype=torch.int32), non_blocking=True)
            # A slot at rank 0 is not served: its converted rank may stay (no refresh when a batch leaves a resident
            # adapter out); a served slot at another rank than converted needs one.
            if conv != self._conv_ranks:
                self._conv_ranks = conv
                self._stacks.refresh()

        def _check_slots(self, weight_indices: Sequence[int], n: int) -> List[int]:
            from .._validation import check_int

            N = self.max_loras_per_batch
            wi = [check_int(f"weight_indices[{k}]", v) for k, v in enumerate(weight_indices)]
            check(len(wi) == n, "weight_indices", f"{n} entries (one per request)", len(wi))
            check(all(0 <= v < N for v in wi), "weight_indices", f"slots in [0, {N})", wi)
            return wi

        def _info(self, lens: Sequence[int], wi: Sequence[int], route: Optional[_Route]) -> Any:
            """SGLang's batch info for segments ``lens`` of slots ``wi`` (device tensors)."""
            dev = self.device
            seg_lens = torch.tensor(list(lens), dtype=torch.int32)
            indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
            indptr[1:] = torch.cumsum(seg_lens, 0)
            info = LKBatchInfo(
                bs=len(lens), num_segments=len(lens), max_len=max(lens, default=0), use_cuda_graph=False,
                seg_lens=seg_lens.to(dev, non_blocking=True), seg_indptr=indptr.to(dev, non_blocking=True),
                weight_indices=torch.tensor(list(wi), dtype=torch.int32).to(dev, non_blocking=True),
                lora_ranks=self._ranks, scalings=self._scalings, permutation=None,
                expected_tokens=int(sum(lens)), lk_route=route)
            return info

        def _segments_route(self, lens: Sequence[int], wi: Sequence[int], route: Optional[_Route] = None) -> _Route:
            T = int(sum(lens))
            route = route or self._route(T)
            check(T <= route.batch.max_tokens, "forward_batch", f"at most {route.batch.max_tokens} tokens", T)
            per_req = torch.tensor(list(wi), dtype=torch.int32).to(self.device, non_blocking=True)
            reps = torch.tensor(list(lens), dtype=torch.int64).to(self.device, non_blocking=True)
            return self._fill(route, torch.repeat_interleave(per_req, reps, output_size=T))

        def _request_lens(self, forward_batch) -> List[int]:
            mode = forward_batch.forward_mode
            if mode.is_idle():
                return []
            if mode.is_decode():
                return [1] * int(forward_batch.batch_size)
            if mode.is_target_verify():
                return [int(forward_batch.spec_info.draft_token_num)] * int(forward_batch.batch_size)
            lens = forward_batch.extend_seq_lens_cpu
            if lens is None:
                lens = generate_sequence_lengths(forward_batch, device="cpu").tolist()
            return [int(v) for v in lens]

        def prepare_lora_batch(self, forward_batch, weight_indices: Sequence[int], lora_ranks: Sequence[int],
                               scalings: Sequence[float], use_cuda_graph: bool = False,
                               use_prefill_cuda_graph: bool = False, *args, **kwargs) -> None:
            """One forward's metadata (SGLang's LoRAManager semantics): slot per request, rank / scaling per slot.

            Raises ValueError naming the argument (lengths, slots out of range, negative ranks, non-finite
            scalings, too many tokens for a decode graph) before anything is written.
            """
            check(not use_prefill_cuda_graph, "use_prefill_cuda_graph", "False (prefill CUDA graphs are not "
                  "supported by the lora_kernels backend; SGLang does not ask when supports_prefill_cuda_graph is "
                  "False)", use_prefill_cuda_graph)
            bs = int(forward_batch.batch_size)
            wi = self._check_slots(weight_indices, bs)
            lens = self._request_lens(forward_batch)
            if use_cuda_graph:
                check(self._graph is not None, "use_cuda_graph", "init_decode_cuda_graph_batch_info() called first",
                      None, RuntimeError)
                max_bs, tpr, slots, _ = self._graph
                check(bs <= max_bs, "forward_batch", f"at most {max_bs} requests (the captured decode graphs)", bs)
                check(all(n == tpr for n in lens), "forward_batch",
                      f"{tpr} tokens per request (the captured decode graphs' width)", sorted(set(lens)))
            self._set_slots(lora_ranks, scalings)
            if use_cuda_graph:
                info = self.cuda_graph_batch_info
                info.bs = info.num_segments = bs
                info.expected_tokens = bs * tpr
                host = torch.full((max_bs,), -1, dtype=torch.int32)
                host[:bs] = torch.tensor(wi, dtype=torch.int32)
                slots.copy_(host, non_blocking=True)
                info.weight_indices.copy_(host.clamp(min=0), non_blocking=True)
                self._pending_graph_build = True
            else:
                route = self._segments_route(lens, wi)
                info = self._info(lens, wi, route)
                self._pending_graph_build = False
            self.batch_info = info
            self.lm_head_batch_info, self.lm_head_pass_batch_infos = self._lm_head_infos(forward_batch, wi)

        def init_decode_cuda_graph_batch_info(self, max_bs_in_cuda_graph: int, num_tokens_per_req: int) -> None:
            """Static buffers for decode graphs of up to ``max_bs_in_cuda_graph`` requests (see the docstring)."""
            max_bs, tpr = int(max_bs_in_cuda_graph), int(num_tokens_per_req)
            check(max_bs >= 1 and tpr >= 1, "max_bs_in_cuda_graph", ">= 1 (and num_tokens_per_req >= 1)",
                  (max_bs, tpr))
            slots = torch.full((max_bs,), -1, dtype=torch.int32, device=self.device)
            # The graphs' own route, never replaced: captured kernels keep reading its tensors.
            route = self._new_route(max_bs * tpr)
            with torch.device(self.device):
                self.cuda_graph_batch_info = LKBatchInfo(
                    bs=max_bs, num_segments=max_bs, max_len=tpr, use_cuda_graph=True,
                    seg_lens=torch.full((max_bs,), tpr, dtype=torch.int32),
                    seg_indptr=torch.arange(0, (max_bs + 1) * tpr, tpr, dtype=torch.int32),
                    weight_indices=torch.zeros(max_bs, dtype=torch.int32), lora_ranks=self._ranks,
                    scalings=self._scalings, permutation=None, expected_tokens=max_bs * tpr, lk_route=route)
            self._graph = (max_bs, tpr, slots, route)

        def prepare_lora_token_segments(self, *, segment_lens: list, weight_indices: list, lora_ranks: list,
                                        scalings: list) -> None:
            """Explicit eager token-row segments (SGLang's semantics): segment k has ``segment_lens[k]`` rows."""
            self.reset_batch_state()
            lens = [int(v) for v in segment_lens]
            check(all(v >= 0 for v in lens), "segment_lens", "non-negative lengths", lens)
            wi = self._check_slots(weight_indices, len(lens))
            self._set_slots(lora_ranks, scalings)
            self.batch_info = self._info(lens, wi, self._segments_route(lens, wi))
            self._pending_graph_build = False

        def reset_batch_state(self) -> None:
            super().reset_batch_state()
            self._pending_graph_build = False

        def reset_routing_cache(self) -> None:
            """SGLang calls this before every warm-up and capture forward of a decode graph: in graph mode the next
            LoRA call rebuilds the token batch, so each of those forwards, the captured one included, holds a
            build (and every replay rebuilds the batch for its own requests)."""
            super().reset_routing_cache()
            info = self.batch_info
            if info is not None and info.use_cuda_graph:
                self._pending_graph_build = True

        # ---- LM head (pruned rows) --------------------------------------------------------------------------
        def _lm_head_infos(self, forward_batch, wi: Sequence[int]):
            pruned = get_lm_head_pruned_lens(forward_batch)
            if pruned is None:
                return None, None
            total = int(sum(pruned))

            used = itertools.count()

            def info_of(seg_wi, seg_lens):
                route = self._lm_route(next(used), int(sum(seg_lens)))
                return self._info(seg_lens, seg_wi, self._segments_route(seg_lens, seg_wi, route))

            head = info_of(*merge_and_chunk_segments(list(wi), list(pruned), chunk_size=max(total, 1)))
            passes = self._get_lm_head_pass_segments(list(wi), list(pruned))
            if passes is not None:
                passes = [info_of(*merge_and_chunk_segments(p_wi, p_lens, chunk_size=max(sum(p_lens), 1)))
                          for p_wi, p_lens in passes]
            return head, passes

        def _lm_route(self, k: int, T: int) -> _Route:
            """The k-th LM-head route of this step (the pruned rows, then each logprob pass), reused across steps
            and re-allocated only when a step needs more rows (the previous step's batch infos are done by then)."""
            routes = self._lm_routes
            if k == len(routes):
                routes.append(self._new_route(T))
            elif routes[k].batch.max_tokens < T:
                routes[k] = self._new_route(max(T, 2 * routes[k].batch.max_tokens))
            return routes[k]

        def _new_route(self, T: int) -> _Route:
            cap = max(T, 1)
            return _Route(LoRABatch(cap, self.max_loras_per_batch, self.device),
                          torch.zeros(cap, dtype=torch.int64, device=self.device), 0)

        # ---- load events -------------------------------------------------------------------------------------
        def on_lora_slots_updated(self, slot_ids) -> None:
            """SGLang loaded into / cleared these pool slots: refresh every converted stack in place."""
            self.slot_updates += 1
            self._stacks.refresh()

        @property
        def conversions(self) -> int:
            """Stack conversions run so far (first conversions + in-place refreshes)."""
            return self._stacks.conversions

        def validate_lora_targets(self, base_model: torch.nn.Module, target_modules: set) -> None:
            """Refuse MoE targets before SGLang wraps anything (the MoE LoRA runners are not covered here)."""
            try:
                from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
            except ImportError:  # pragma: no cover - the pinned SGLang has it
                return
            if not {"gate_up_proj", "down_proj"} & set(target_modules):
                return
            moe = [n for n, m in base_model.named_modules() if isinstance(m, FusedMoE)]
            check(not moe, "target_modules", "no MoE expert projections (the lora_kernels backend covers dense "
                  "layers; use --lora-backend triton for MoE LoRA)", moe[:4])

        # ---- weights -----------------------------------------------------------------------------------------
        def _weights(self, a: Optional[torch.Tensor], b: Optional[torch.Tensor], c: int,
                     outs: Optional[Tuple[int, ...]]):
            N = self.max_loras_per_batch
            if a is not None:
                check_tensor("lora_a", a, ndim=3, device=self.device)
                check(a.shape[0] >= N and a.shape[1] % c == 0 and a.shape[1] >= c, "lora_a",
                      f"shape (>= {N}, {c} * r_max, in) (stack_num={c})", tuple(a.shape))
            if b is not None:
                check_tensor("lora_b", b, ndim=3, device=self.device)
                check(b.shape[0] >= N and b.shape[2] >= 1, "lora_b", f"shape (>= {N}, out, r_max)", tuple(b.shape))
            r_max = a.shape[1] // c if a is not None else b.shape[2]
            if a is not None and b is not None:
                check(b.shape[2] == r_max and b.dtype == a.dtype, "lora_b",
                      f"last dim r_max={r_max} and dtype {a.dtype} (as lora_a)", (tuple(b.shape), b.dtype))
            rk = self._conv_ranks
            check(max(rk, default=0) <= r_max, "lora_ranks", f"ranks <= r_max={r_max} of the weights", rk)
            if outs is None:
                outs = (int(b.shape[1]),) if b is not None else (1,) * c

            def build(a, b):  # the slots' ranks when it runs: a refresh converts with the ranks of its time
                rk = self._conv_ranks
                ref = a if a is not None else b
                a_pl = None
                if a is not None:
                    a_pl = pool_a_planes(a, c, rk, N)
                    a_pl = a_pl[0] if c == 1 else a_pl
                b_t = pool_b_t(b, rk, N) if b is not None else torch.zeros(N, r_max, c, dtype=ref.dtype,
                                                                              device=ref.device)
                ranks = torch.tensor(rk, dtype=torch.int32).reshape(1, N).expand(c, N).contiguous()
                return padded_weights(a_pl, b_t, outs, ranks=ranks)

            w = self._stacks.get([a, b], ("sglang", c, tuple(outs)), build)
            set_scales(w, self._scalings)
            return w

        # ---- kernels -----------------------------------------------------------------------------------------
        def _build_graph_route(self, x: torch.Tensor) -> None:
            """Graph mode: build the forward's token batch from the static request slots, on the device (inside a
            capture the build is recorded, so every replay rebuilds it for its own requests)."""
            max_bs, tpr, slots, route = self._graph
            T = x.shape[0]
            check(T <= max_bs * tpr, "x", f"at most {max_bs * tpr} rows (the decode graph's capacity)",
                  tuple(x.shape))
            self._fill(route, slots[torch.arange(T, device=self.device) // tpr])
            self._pending_graph_build = False

        def _route_for(self, x: torch.Tensor, pruned_batch_info=None, name: str = "x") -> _Route:
            """The route of this call's rows: a pruned LM-head batch, or the forward batch (built now in graph
            mode: inside a capture this build is recorded with the kernels)."""
            if pruned_batch_info is not None:
                route = getattr(pruned_batch_info, "lk_route", None)
                check(route is not None, "pruned_batch_info", "a batch info made by this backend", None)
            else:
                info = self.batch_info
                check(info is not None, "batch_info", "prepare_lora_batch() called first (SGLang gates LoRA calls "
                      "on lora_active)", None, RuntimeError)
                route = info.lk_route
                if self._pending_graph_build:
                    self._build_graph_route(x)
            check(x.shape[0] == route.num_tokens, name, f"{route.num_tokens} rows (the prepared tokens)",
                  tuple(x.shape))
            return route

        def run_lora_a_sgemm(self, x: torch.Tensor, weights: torch.Tensor, *args, stack_num: int = 1,
                             pruned_batch_info=None, **kwargs) -> torch.Tensor:
            """LoRA-A: ``[T, stack_num * r_max]``, slice s of a token of slot i in columns ``[s r_i, (s+1) r_i)``
            (SGLang's packed layout; unscaled), zeros elsewhere and for tokens without LoRA."""
            if args:  # SGLang's Triton backend takes (x, weights, pruned_batch_info, stack_num) positionally
                pruned_batch_info = args[0]
                if len(args) > 1:
                    stack_num = args[1]
            check_tensor("x", x, ndim=2, device=self.device)
            route = self._route_for(x, pruned_batch_info)
            c = int(stack_num)
            w = self._weights(weights, None, c, None)
            check(x.shape[1] == w.in_features, "x", f"[T, {w.in_features}] (lora_a's input width)", tuple(x.shape))
            return packed_lora_a(shrink(x, w, route.batch), route.tok_rank, x.dtype)

        def run_lora_b_sgemm(self, x: torch.Tensor, weights: torch.Tensor, *args, base_output=None,
                             pruned_batch_info=None, **kwargs) -> torch.Tensor:
            """LoRA-B: ``base_output[t, :out] += g_i * x[t, :r_i] @ B_i^T`` (a new zero tensor when None; a wider
            base_output, as the LM head's padded logits, keeps its columns past ``out``); returned."""
            if args:  # SGLang's Triton backend: (x, weights, base_output, pruned_batch_info)
                base_output = args[0]
                if len(args) > 1:
                    pruned_batch_info = args[1]
            check_tensor("x", x, ndim=2, device=self.device)
            route = self._route_for(x, pruned_batch_info)
            w = self._weights(None, weights, 1, None)
            check(x.shape[1] >= w.max_rank, "x", f"[T, >= r_max={w.max_rank}]", tuple(x.shape))
            out = y = None
            if isinstance(base_output, torch.Tensor) and base_output.ndim == 2 \
                    and base_output.shape[1] > w.out_features:
                # SGLang's LM head: logits padded past the vocabulary (to a multiple of 64); the delta covers the
                # first ``out`` columns, as SGLang's kernel writes them
                check_tensor("base_output", base_output, shape=(x.shape[0], base_output.shape[1]), device=x.device)
                out, y = base_output, base_output[:, : w.out_features]
            else:
                out = y = output_or_zeros(x, base_output, w.out_features)
            if x.shape[0]:
                h = x[:, : w.max_rank].float().unsqueeze(0).contiguous()
                expand_(y, h, w, route.batch)
            return out

        def _fused(self, x, a, b, outs: Tuple[int, ...], base_output) -> torch.Tensor:
            check_tensor("x", x, ndim=2, device=self.device)
            route = self._route_for(x)
            check(isinstance(b, torch.Tensor), "lora_b", "one stacked tensor (N, sum of slice outputs, r_max)",
                  type(b).__name__, TypeError)
            check(sum(outs) == b.shape[1], "output_offset", f"slices covering lora_b's {b.shape[1]} rows", outs)
            w = self._weights(a, b, len(outs), outs)
            check(x.shape[1] == w.in_features, "x", f"[T, {w.in_features}] (lora_a's input width)", tuple(x.shape))
            out = output_or_zeros(x, base_output, w.out_features)
            if x.shape[0]:
                add_lora_(out, x, w, route.batch)
            return out

        def _host_offsets(self, output_offset, output_offset_cpu) -> List[int]:
            off = output_offset_cpu if output_offset_cpu is not None else output_offset
            check(off is not None, "output_offset", "the slice offsets [0, o1, ..., total]", None)
            return [int(v) for v in (off.tolist() if isinstance(off, torch.Tensor) else off)]

        def run_qkv_lora(self, x: torch.Tensor, qkv_lora_a: torch.Tensor, qkv_lora_b: torch.Tensor,
                         output_offset: Optional[torch.Tensor] = None, max_qkv_out_dim: Optional[int] = None,
                         base_output: Optional[torch.Tensor] = None, n_slices: int = 3, *args,
                         output_offset_cpu=None, **kwargs) -> torch.Tensor:
            """``n_slices`` (q/k/v, or MLA's two) projections in one lk.add_lora_: slice s of lora_b is rows
            ``[off_s, off_{s+1})`` and lands in the same output columns (``output_offset_cpu`` avoids a sync)."""
            off = self._host_offsets(output_offset, output_offset_cpu)
            check(len(off) == int(n_slices) + 1 and off[0] == 0 and all(p <= q for p, q in zip(off, off[1:])),
                  "output_offset", f"{int(n_slices) + 1} non-decreasing offsets from 0", off)
            return self._fused(x, qkv_lora_a, qkv_lora_b, slice_bounds(off), base_output)

        def run_gate_up_lora(self, x: torch.Tensor, gate_up_lora_a: torch.Tensor, gate_up_lora_b: torch.Tensor,
                             base_output: Optional[torch.Tensor] = None, *args, **kwargs) -> torch.Tensor:
            """gate/up in one lk.add_lora_: two equal halves of lora_b's rows."""
            check(isinstance(gate_up_lora_b, torch.Tensor) and gate_up_lora_b.ndim == 3
                  and gate_up_lora_b.shape[1] % 2 == 0, "gate_up_lora_b", "(N, 2 * out, r_max)",
                  getattr(gate_up_lora_b, "shape", type(gate_up_lora_b).__name__))
            half = int(gate_up_lora_b.shape[1]) // 2
            return self._fused(x, gate_up_lora_a, gate_up_lora_b, (half, half), base_output)

        def run_lora_a_embedding(self, input_ids: torch.Tensor, weights: torch.Tensor, vocab_size: int,
                                 extra_embeddings: Optional[torch.Tensor] = None, *args, **kwargs) -> torch.Tensor:
            """Embedding LoRA-A: ``out[t, :r_i] = A_i[:r_i, id_t]`` (ids >= vocab_size read the last column, as
            SGLang's kernel); zeros past r_i and for tokens without LoRA. Extra vocabulary is not covered."""
            check(extra_embeddings is None, "extra_embeddings", "None (added vocabulary tokens are not covered by "
                  "the lora_kernels backend)", "a tensor", NotImplementedError)
            check_tensor("input_ids", input_ids, ndim=1, device=self.device)
            check_tensor("weights", weights, ndim=3, device=self.device)
            check(weights.shape[0] >= self.max_loras_per_batch and 1 <= int(vocab_size) <= weights.shape[2],
                  "weights", f"(>= {self.max_loras_per_batch}, rank, >= vocab_size={vocab_size})",
                  tuple(weights.shape))
            route = self._route_for(input_ids, name="input_ids")
            T, R = input_ids.shape[0], weights.shape[1]
            check(max(self._ranks_host, default=0) <= R, "lora_ranks", f"ranks <= {R} (the weights' rank dim)",
                  self._ranks_host)
            tok = route.batch.token_adapter.long() if T else torch.zeros(0, dtype=torch.long, device=self.device)
            ids = input_ids.long().clamp(0, int(vocab_size) - 1)
            rows = weights[tok.clamp(min=0), :, ids]  # [T, R]
            live = torch.arange(R, device=self.device)[None, :] < route.tok_rank[:T, None]
            return torch.where(live, rows, torch.zeros((), dtype=weights.dtype, device=self.device))

    for cls in (LoRAKernelsBackend, LKBatchInfo):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return LoRAKernelsBackend, LKBatchInfo


_CLASSES: Optional[tuple] = None


def __getattr__(name: str):
    global _CLASSES
    if name in ("LoRAKernelsBackend", "LKBatchInfo"):
        if _CLASSES is None:
            _CLASSES = _build_class()
        return _CLASSES[0] if name == "LoRAKernelsBackend" else _CLASSES[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
