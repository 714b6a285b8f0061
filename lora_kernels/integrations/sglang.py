"""An SGLang-style LoRA backend on this library's kernels: :class:`SGLangLoRABackend`.

It has the method names and argument semantics of SGLang's ``BaseLoRABackend`` (python/sglang/srt/lora/
backend/base_backend.py; the Triton backend's conventions), so a fork of SGLang can select it without changing
its LoRA layers or memory pool. docs/integrations.md has the metadata mapping.

Batch info (SGLang's ``LoRABatchInfo``): the tokens are grouped in ``bs`` segments (sequences), segment k has
``seg_lens[k]`` tokens starting at ``seg_indptr[k]`` and uses adapter slot ``weight_indices[k]``;
``lora_ranks[slot]`` and ``scalings[slot]`` describe the slots (rank 0 = no LoRA; ``-1`` as a weight index is
accepted as "no LoRA" too). :meth:`SGLangLoRABackend.prepare_lora_batch` takes them as host lists (as SGLang's
LoRA manager passes them), fills :attr:`batch_info` (device tensors) and builds the
:class:`~lora_kernels.LoRABatch` in place (segment form: per-token ids expanded on the device, no host sync).

Weights (SGLang's memory-pool layout): A ``[N, c * r_max, in]`` where slice s of slot i (c = 3 for qkv, 2 for
gate_up, 1 otherwise) is rows ``[s * r_i, (s + 1) * r_i)`` (packed at the adapter's own rank); B ``[N, out, r_max]``
whose slice s is rows ``[off_s, off_{s+1})``, columns ``[0, r_i)``. The LoRA-A output is ``[T, c * r_max]``
with slice s of a token of slot i in columns ``[s * r_i, (s + 1) * r_i)`` and zeros after ``c * r_i``.

Semantics (token t of slot i, scaling ``g_i``; tokens of rank-0 slots or -1 get nothing):
    run_lora_a_sgemm(x, A, stack_num=c) -> ``out[t, s r_i : (s+1) r_i] = x[t] @ A_{s,i}^T`` (no scaling)
    run_lora_b_sgemm(x, B, base_output) -> ``base_output[t] += g_i * x[t, :r_i] @ B_i^T`` (new zeros when None)
    run_qkv_lora(x, A, B, output_offset, ...) -> ``base_output[t, off_s : off_{s+1}] += g_i (x A_{s,i}^T) B_{s,i}^T``
        for s = q, k, v in one fused launch; run_gate_up_lora likewise with two equal halves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .._validation import check, check_fits, check_int, check_real, check_tensor
from ..batch import LoRABatch
from ..ops.sgmv import add_lora_, expand_, shrink
from ..weights import LoRAWeights
from ._stacked import StackCache, padded_weights, set_scales, slice_bounds

__all__ = ["SGLangLoRABackend", "LoRABatchInfo", "pool_a_planes", "pool_b_t",
           "packed_lora_a", "output_or_zeros"]


@dataclass
class LoRABatchInfo:
    """SGLang's batch info fields (device tensors), as :meth:`SGLangLoRABackend.prepare_lora_batch` fills them."""

    bs: int
    seg_lens: torch.Tensor
    seg_indptr: torch.Tensor
    max_len: int
    weight_indices: torch.Tensor
    lora_ranks: torch.Tensor
    scalings: torch.Tensor
    use_cuda_graph: bool = False
    num_segments: Optional[int] = None
    permutation: Optional[torch.Tensor] = None


def _seq_lens_of(forward_batch) -> List[int]:
    """Per-request token counts from a ForwardBatch-like object or a sequence of ints / a CPU tensor."""
    if isinstance(forward_batch, torch.Tensor):
        check(forward_batch.device.type == "cpu", "forward_batch", "host-side sequence lengths",
              forward_batch.device)
        return [int(v) for v in forward_batch.tolist()]
    if isinstance(forward_batch, (list, tuple)):
        return [int(v) for v in forward_batch]
    mode = getattr(forward_batch, "forward_mode", None)
    is_extend = bool(mode.is_extend()) if mode is not None and hasattr(mode, "is_extend") else False
    if is_extend:
        lens = getattr(forward_batch, "extend_seq_lens_cpu", None)
        if lens is None:
            lens = forward_batch.extend_seq_lens.tolist()
        return [int(v) for v in lens]
    return [1] * int(forward_batch.batch_size)  # decode: one token per request


def pool_a_planes(a: torch.Tensor, c: int, ranks: Sequence[int], N: int) -> torch.Tensor:
    """SGLang's A pool stack ``[N, c * r_max, in]`` -> planes ``[c, N, r_max, in]`` (a new tensor).

    Slice s of slot i is rows ``[s r_i, (s + 1) r_i)`` of the stack (packed at the adapter's rank); rows past r_i
    are zero in the result."""
    r_max = a.shape[1] // c
    j = torch.arange(r_max)
    r_t = torch.tensor(list(ranks), dtype=torch.int64)
    live = j[None, None, :] < r_t[None, :, None]  # [1, N, r_max]
    rows = torch.arange(c)[:, None, None] * r_t[None, :, None] + j[None, None, :]
    rows = torch.where(live, rows, 0).to(a.device)
    slots = torch.arange(N, device=a.device)[None, :, None].expand_as(rows)
    return a[slots, rows] * live.to(device=a.device, dtype=a.dtype)[..., None]


def pool_b_t(b: torch.Tensor, ranks: Sequence[int], N: int) -> torch.Tensor:
    """SGLang's B pool stack ``[N, out, r_max]`` -> ``[N, r_max, out]`` (B transposed, contiguous, a new tensor),
    columns past each slot's rank zeroed."""
    live = torch.arange(b.shape[2])[None, :] < torch.tensor(list(ranks), dtype=torch.int64)[:, None]
    return (b[:N] * live.to(device=b.device, dtype=b.dtype)[:, None, :]).transpose(1, 2).contiguous()


def packed_lora_a(h: torch.Tensor, tok_rank: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """lk.shrink's ``h`` fp32 ``[c, T, r_max]`` -> SGLang's LoRA-A output ``[T, c * r_max]`` in ``dtype``: slice s
    of a token of rank r in columns ``[s r, (s + 1) r)``, zeros elsewhere (one device scatter, no host sync)."""
    c, T, r_max = h.shape
    out = torch.zeros(T, c * r_max + 1, dtype=dtype, device=h.device)
    if T:
        r_t = tok_rank[:T]
        j = torch.arange(r_max, device=h.device)
        col = torch.arange(c, device=h.device)[:, None, None] * r_t[None, :, None] + j[None, None, :]
        col = torch.where(j[None, None, :] < r_t[None, :, None], col, c * r_max)  # past the rank: dump column
        out.scatter_(1, col.permute(1, 0, 2).reshape(T, -1), h.permute(1, 0, 2).reshape(T, -1).to(dtype))
    return out[:, : c * r_max]


def output_or_zeros(x: torch.Tensor, base_output: Optional[torch.Tensor], width: int) -> torch.Tensor:
    """``base_output`` (checked: ``[T, width]`` on x's device) or a new zero ``[T, width]`` tensor."""
    if base_output is None:
        return torch.zeros(x.shape[0], width, dtype=x.dtype, device=x.device)
    check_tensor("base_output", base_output, shape=(x.shape[0], width), device=x.device)
    return base_output


class SGLangLoRABackend:
    """SGLang ``BaseLoRABackend``-compatible backend on lora_kernels' ops and :class:`LoRABatch`.

    Args:
        max_loras_per_batch: adapter slots of the memory pool.
        device: where activations and metadata live.
        max_num_tokens: token capacity of the batch (keyword; default 8192).
    """

    name = "lora_kernels"

    def __init__(self, max_loras_per_batch: int, device: Union[torch.device, str], **kwargs):
        check(isinstance(max_loras_per_batch, int) and max_loras_per_batch >= 1, "max_loras_per_batch",
              "an int >= 1", max_loras_per_batch)
        self.max_loras_per_batch = max_loras_per_batch
        self.device = torch.device(device)
        self.max_num_tokens = int(kwargs.get("max_num_tokens", 8192))
        self.batch = LoRABatch(self.max_num_tokens, max_loras_per_batch, self.device)
        N = max_loras_per_batch
        self._ranks_host: Tuple[int, ...] = (0,) * N
        self._ranks = torch.zeros(N, dtype=torch.int32, device=self.device)
        self._scalings = torch.zeros(N, dtype=torch.float32, device=self.device)
        self._tok_rank = torch.zeros(self.max_num_tokens, dtype=torch.int64, device=self.device)
        self.batch_info: Optional[LoRABatchInfo] = None
        self.cuda_graph_batch_info: Optional[LoRABatchInfo] = None
        self._cache = StackCache()
        self._offsets_host: dict = {}

    # ---- batch info ------------------------------------------------------------------------------------------
    def init_cuda_graph_batch_info(self, max_bs_in_cuda_graph: int, num_tokens_per_bs: int = 1, *args,
                                   **kwargs) -> None:
        """Fixed buffers for graph capture (the LoRABatch is fixed-capacity already)."""
        n = max_bs_in_cuda_graph
        z = dict(device=self.device, dtype=torch.int32)
        self.cuda_graph_batch_info = LoRABatchInfo(
            bs=n, seg_lens=torch.full((n,), num_tokens_per_bs, **z), seg_indptr=torch.zeros(n + 1, **z),
            max_len=num_tokens_per_bs, weight_indices=torch.zeros(n, **z), lora_ranks=self._ranks,
            scalings=self._scalings, use_cuda_graph=True)

    def prepare_lora_batch(self, forward_batch, weight_indices: Sequence[int], lora_ranks: Sequence[int],
                           scalings: Sequence[float], batch_info: Optional[LoRABatchInfo] = None,
                           use_cuda_graph: bool = False, *args, **kwargs) -> None:
        """Take one forward's metadata (host lists, as SGLang's LoRA manager passes them) and build the batch.

        Args:
            forward_batch: a ForwardBatch (``forward_mode``, ``batch_size``, ``extend_seq_lens(_cpu)``) or the
                per-request token counts.
            weight_indices: slot per request (-1 or a rank-0 slot = no LoRA).
            lora_ranks, scalings: per slot (``max_loras_per_batch`` entries).

        Raises:
            ValueError naming the argument (lengths, slots out of range, too many tokens); nothing changes then.
        """
        lens = _seq_lens_of(forward_batch)
        N = self.max_loras_per_batch
        # integers and real numbers as given, never int("3") / int(2.7) / float("2"); all checked before any write
        wi = [check_int(f"weight_indices[{k}]", v) for k, v in enumerate(weight_indices)]
        check(len(wi) == len(lens), "weight_indices", f"{len(lens)} entries (one per request)", len(wi))
        check(all(-1 <= v < N for v in wi), "weight_indices", f"slots in [-1, {N})", wi)
        check(len(lora_ranks) == N and len(scalings) == N, "lora_ranks", f"{N} entries (and {N} scalings)",
              (len(lora_ranks), len(scalings)))
        T = sum(lens)
        check(T <= self.max_num_tokens, "forward_batch", f"at most max_num_tokens={self.max_num_tokens} tokens", T)
        rk = tuple(check_int(f"lora_ranks[{k}]", r, lo=0) for k, r in enumerate(lora_ranks))
        sc = [check_fits(f"scalings[{k}]", check_real(f"scalings[{k}]", v)) for k, v in enumerate(scalings)]
        served = [v if v >= 0 and rk[v] > 0 else -1 for v in wi]
        dev = self.device
        seg_lens = torch.tensor(lens, dtype=torch.int32)
        indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
        indptr[1:] = torch.cumsum(seg_lens, 0)
        self._ranks_host = rk
        self._ranks.copy_(torch.tensor(rk, dtype=torch.int32), non_blocking=True)
        self._scalings.copy_(torch.tensor(sc, dtype=torch.float32), non_blocking=True)
        seg_dev = seg_lens.to(dev, non_blocking=True)
        srv_dev = torch.tensor(served, dtype=torch.int32).to(dev, non_blocking=True)
        ids = torch.repeat_interleave(srv_dev, seg_dev.long(), output_size=T)
        self.batch.build(ids, validate=False)
        self._tok_rank[:T].copy_(torch.where(ids >= 0, self._ranks[ids.clamp(min=0).long()], 0).long())
        info = batch_info or (self.cuda_graph_batch_info if use_cuda_graph else None)
        if info is None:
            info = LoRABatchInfo(bs=len(lens), seg_lens=seg_dev, seg_indptr=indptr.to(dev, non_blocking=True),
                                 max_len=max(lens, default=0), weight_indices=torch.tensor(wi, dtype=torch.int32)
                                 .to(dev, non_blocking=True), lora_ranks=self._ranks, scalings=self._scalings)
        else:
            info.bs = len(lens)
            info.seg_lens[: len(lens)].copy_(seg_lens, non_blocking=True)
            info.seg_indptr[: len(lens) + 1].copy_(indptr, non_blocking=True)
            info.weight_indices[: len(lens)].copy_(torch.tensor(wi, dtype=torch.int32), non_blocking=True)
            info.lora_ranks[:N].copy_(self._ranks)
            info.scalings[:N].copy_(self._scalings)
        info.num_segments = len(lens)
        self.batch_info = info

    # ---- weights ---------------------------------------------------------------------------------------------
    def _weights(self, a: Optional[torch.Tensor], b: Optional[torch.Tensor], c: int,
                 outs: Optional[Tuple[int, ...]]) -> LoRAWeights:
        N = self.max_loras_per_batch
        if a is not None:
            check_tensor("lora_a", a, ndim=3)
            check(a.shape[0] >= N and a.shape[1] % c == 0, "lora_a",
                  f"shape (>= {N}, {c} * r_max, in) (stack_num={c})", tuple(a.shape))
        if b is not None:
            check_tensor("lora_b", b, ndim=3)
            check(b.shape[0] >= N, "lora_b", f"shape (>= {N}, out, r_max)", tuple(b.shape))
        r_max = a.shape[1] // c if a is not None else b.shape[2]
        if a is not None and b is not None:
            check(b.shape[2] == r_max, "lora_b", f"last dim r_max={r_max} (as lora_a)", tuple(b.shape))
        rk = self._ranks_host
        check(max(rk, default=0) <= r_max, "lora_ranks", f"ranks <= r_max={r_max} of the weights", rk)
        if outs is None:
            outs = (int(b.shape[1]),) if b is not None else (1,) * c

        def build(a, b) -> LoRAWeights:
            with torch.no_grad():
                ref = a if a is not None else b
                a_pl = None
                if a is not None:
                    a_pl = pool_a_planes(a, c, rk, N)
                    if c == 1:
                        a_pl = a_pl[0]
                if b is not None:
                    b_t = pool_b_t(b, rk, N)
                else:
                    b_t = torch.zeros(N, r_max, c, dtype=ref.dtype, device=ref.device)
                ranks = torch.tensor(rk, dtype=torch.int32).reshape(1, N).expand(c, N).contiguous()
                return padded_weights(a_pl, b_t, outs, ranks=ranks)

        w = self._cache.get([a, b], ("sglang", c, outs, rk), build)
        set_scales(w, self._scalings)
        return w

    def _x(self, x: torch.Tensor) -> torch.Tensor:
        check(self.batch_info is not None, "batch_info", "prepare_lora_batch() called first", None, RuntimeError)
        check(x.shape[0] == self.batch.num_tokens, "x", f"{self.batch.num_tokens} rows (the prepared tokens)",
              tuple(x.shape))
        return x

    # ---- the backend interface ----------------------------------------------------------------------------------
    def run_lora_a_sgemm(self, x: torch.Tensor, weights: torch.Tensor, stack_num: int = 1, *args,
                         **kwargs) -> torch.Tensor:
        """LoRA-A segment GEMM: ``[T, stack_num * r_max]`` in x's dtype (layout in the module docstring)."""
        x = self._x(x)
        c = int(stack_num)
        w = self._weights(weights, None, c, None)
        return packed_lora_a(shrink(x, w, self.batch), self._tok_rank, x.dtype)

    def run_lora_b_sgemm(self, x: torch.Tensor, weights: torch.Tensor, base_output: Optional[torch.Tensor] = None,
                         *args, **kwargs) -> torch.Tensor:
        """LoRA-B segment GEMM: ``base_output[t] += g_i * x[t, :r_i] @ B_i^T`` (returns it)."""
        x = self._x(x)
        w = self._weights(None, weights, 1, None)
        check(x.ndim == 2 and x.shape[1] == w.max_rank, "x", f"[T, r_max={w.max_rank}]", tuple(x.shape))
        out = output_or_zeros(x, base_output, w.out_features)
        if x.shape[0]:
            expand_(out, x.float().unsqueeze(0).contiguous(), w, self.batch)
        return out

    def _fused(self, x, a, b, outs: Tuple[int, ...], base_output) -> torch.Tensor:
        x = self._x(x)
        if isinstance(b, (tuple, list)):  # older SGLang: (q_b [1, N, out_q, r], kv_b [2, N, out_kv, r])
            b = torch.cat([p[k] for p in b for k in range(p.shape[0])], dim=1)
        check(sum(outs) == b.shape[1], "output_offset", f"slices covering lora_b's {b.shape[1]} rows", outs)
        w = self._weights(a, b, len(outs), outs)
        out = output_or_zeros(x, base_output, w.out_features)
        if x.shape[0]:
            add_lora_(out, x, w, self.batch)
        return out

    def run_qkv_lora(self, x: torch.Tensor, qkv_lora_a: torch.Tensor, qkv_lora_b, output_offset=None,
                     max_qkv_out_dim: Optional[int] = None, base_output: Optional[torch.Tensor] = None, *args,
                     **kwargs) -> torch.Tensor:
        """q/k/v in one fused launch. ``output_offset`` [4] (``[0, q, q + kv, q + 2 kv]``); its host copy
        ``output_offset_cpu`` (keyword) avoids the one sync that reading a device tensor costs (once per tensor)."""
        off = kwargs.get("output_offset_cpu")
        if off is None and output_offset is not None:
            key = (output_offset.data_ptr(), tuple(output_offset.shape), output_offset.device)
            off = self._offsets_host.get(key)
            if off is None:  # one host read per offsets tensor (SGLang keeps it for the model's lifetime)
                off = self._offsets_host[key] = [int(v) for v in output_offset.tolist()]
        if off is None:
            check(not isinstance(qkv_lora_b, torch.Tensor), "output_offset",
                  "given when qkv_lora_b is one tensor", None)
            q, kv = int(qkv_lora_b[0].shape[-2]), int(qkv_lora_b[1].shape[-2])
            off = [0, q, q + kv, q + 2 * kv]
        off = [int(v) for v in (off.tolist() if isinstance(off, torch.Tensor) else off)]
        check(len(off) == 4 and off[0] == 0, "output_offset", "[0, q, q + kv, q + 2 kv]", off)
        return self._fused(x, qkv_lora_a, qkv_lora_b, slice_bounds(off), base_output)

    def run_gate_up_lora(self, x: torch.Tensor, gate_up_lora_a: torch.Tensor, gate_up_lora_b,
                         base_output: Optional[torch.Tensor] = None, *args, **kwargs) -> torch.Tensor:
        """gate/up in one fused launch: two equal halves of lora_b's rows."""
        if isinstance(gate_up_lora_b, (tuple, list)):
            half = int(gate_up_lora_b[0].shape[-2])
            b = torch.cat([t.reshape(-1, *t.shape[-2:]) for t in gate_up_lora_b], dim=1)
        else:
            b = gate_up_lora_b
            check(b.shape[1] % 2 == 0, "gate_up_lora_b", "an even number of output rows", tuple(b.shape))
            half = int(b.shape[1]) // 2
        return self._fused(x, gate_up_lora_a, b, (half, half), base_output)
