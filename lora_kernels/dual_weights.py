"""DualLoRAWeights: rank-paged storage of every Dual-LoRA adapter of one linear layer.

Semantics (Dual-LoRA, arXiv 2411.12787; DESIGN.md "Dual-LoRA"):
    For adapter slot ``i`` with rank ``r = ranks[0, i]``, first row ``o = offsets[i]`` and scale
    ``s = scales[0, i]`` (``alpha / r``):

        A_i = a[0, o : o + r]          # [r, in]   the skill space ("A")
        T_i = a[0, o + r : o + 2r]     # [r, in]   the task space gate ("T")
        B_i = b[o : o + r].T           # [out, r]  (b holds B transposed; rows o + r .. o + 2r are 0)
        LN_i: weight ln_weight[o : o + r], bias ln_bias[o : o + r]
        delta_i(x) = s * B_i (ReLU(T_i x) * LN_r(A_i x))

    The A and T rows of an adapter are stacked, so one shrink over ``2r`` rows gives ``[A x; T x]``. The row
    allocation, offsets and scales are those of an inner :class:`~lora_kernels.LoRAWeights` (``self.lora``, one
    slice, ``max_rank = 2 * max_rank``) holding each adapter as the rank-2r pair ``([A; T], [B, 0])``: its
    allocator (first fit, reuse of freed rows, heterogeneous ranks costing only their own rows) is reused as
    is. ``self.lora.ranks`` is ``2r`` (the stacked shrink); ``self.ranks`` is the Dual-LoRA rank ``r`` (the
    LayerNorm width and the expand). LayerNorm parameters are stored per row, aligned with ``a``'s rows.
    A free slot has rank 0: tokens that name it get no delta.

    :meth:`DualLoRAWeights.add` / :meth:`~DualLoRAWeights.remove` are all-or-nothing: the inner rows, the
    LayerNorm rows and the ranks are written in one transaction, so a refusal or an exception never leaves an
    adapter in the inner LoRAWeights without its Dual-LoRA part (issue 13).
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional, Union

import torch

from ._transaction import Transaction, transaction
from ._validation import FLOAT_DTYPES, check, check_fits, check_int, check_real, check_tensor
from .weights import LoRAWeights

__all__ = ["DualLoRAWeights"]


class DualLoRAWeights:
    """Rank-paged Dual-LoRA storage (A, T, B, LayerNorm weight/bias per adapter) for one linear layer.

    Args:
        in_features, out_features: the layer's widths.
        max_adapters: number of adapter slots N (ids ``0 .. N-1``).
        max_rank: the largest Dual-LoRA rank r of one adapter (it occupies ``2r`` rows).
        capacity_rows: total rows R; defaults to ``max_adapters * 2 * max_rank``.
        dtype, device: storage dtype (fp16/bf16/fp32) and device; LayerNorm parameters use the same dtype.
        eps: the LayerNorm epsilon (PyTorch's default 1e-5, as ``nn.LayerNorm(r)`` in the official code).

    Tensors (all views the kernels read): ``a`` [1, R, in], ``b`` [R, out], ``ln_weight`` / ``ln_bias`` [R],
    ``offsets`` int64 [N], ``ranks`` int32 [1, N] (r), ``ranks2`` int32 [1, N] (2r), ``scales`` fp32 [1, N],
    ``slice_info`` / ``in_slice_info`` int64 [1, 2] (first column, width of b's / a's single slice).
    ``a``, ``b``, ``ln_weight`` and ``ln_bias`` may be replaced by ``nn.Parameter`` objects sharing their
    storage (:class:`~lora_kernels.nn.DualLoRALinear` does this to train them).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        max_adapters: int,
        max_rank: int,
        *,
        capacity_rows: Optional[int] = None,
        dtype: torch.dtype = torch.float16,
        device: Union[torch.device, str] = "cpu",
        eps: float = 1e-5,
    ):
        check(isinstance(out_features, int) and out_features >= 1, "out_features", "an int >= 1", out_features)
        check(isinstance(max_rank, int) and max_rank >= 1, "max_rank", "an int >= 1", max_rank)
        check(isinstance(max_adapters, int) and max_adapters >= 1, "max_adapters", "an int >= 1", max_adapters)
        check(isinstance(eps, float) and math.isfinite(eps) and eps > 0, "eps", "a finite float > 0", eps)
        R = capacity_rows if capacity_rows is not None else max_adapters * 2 * max_rank
        self.lora = LoRAWeights(in_features, out_features, max_adapters, 2 * max_rank, capacity_rows=R,
                                dtype=dtype, device=device)
        dev = self.lora.device
        self.max_rank = max_rank
        self.eps = eps
        self.ln_weight = torch.zeros(self.lora.capacity_rows, dtype=dtype, device=dev)
        self.ln_bias = torch.zeros(self.lora.capacity_rows, dtype=dtype, device=dev)
        self.ranks = torch.zeros(1, max_adapters, dtype=torch.int32, device=dev)
        # (first column, width) of dx's single "slice": the backward's dx is an expand over a's 2r rows.
        self.in_slice_info = torch.tensor([[0, in_features]], dtype=torch.int64).to(dev)
        self._host_ranks: Dict[int, int] = {}

    # ---- storage views (the kernels' arguments) -------------------------------------------------------
    @property
    def a(self) -> torch.Tensor:
        return self.lora.a

    @a.setter
    def a(self, t: torch.Tensor) -> None:
        self.lora.a = t

    @property
    def b(self) -> torch.Tensor:
        return self.lora.b

    @b.setter
    def b(self, t: torch.Tensor) -> None:
        self.lora.b = t

    @property
    def offsets(self) -> torch.Tensor:
        return self.lora.offsets

    @property
    def ranks2(self) -> torch.Tensor:
        return self.lora.ranks

    @property
    def scales(self) -> torch.Tensor:
        return self.lora.scales

    @property
    def slice_info(self) -> torch.Tensor:
        return self.lora.slice_info

    # ---- shape facts ------------------------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return self.lora.in_features

    @property
    def out_features(self) -> int:
        return self.lora.out_features

    @property
    def max_adapters(self) -> int:
        return self.lora.max_adapters

    @property
    def capacity_rows(self) -> int:
        return self.lora.capacity_rows

    @property
    def dtype(self) -> torch.dtype:
        return self.lora.dtype

    @property
    def device(self) -> torch.device:
        return self.lora.device

    @property
    def loaded(self) -> List[int]:
        return self.lora.loaded

    def rank_of(self, adapter_id: int) -> int:
        """Dual-LoRA rank r of a loaded adapter (host data, no sync)."""
        return self._host_ranks[self.lora._check_id(adapter_id, loaded=True)]

    # ---- adding and removing ----------------------------------------------------------------------------
    def add(
        self,
        A: torch.Tensor,
        T: torch.Tensor,
        B: torch.Tensor,
        *,
        ln_weight: Optional[torch.Tensor] = None,
        ln_bias: Optional[torch.Tensor] = None,
        alpha: Optional[float] = None,
        scale: Optional[float] = None,
        adapter_id: Optional[int] = None,
        check_finite: bool = True,
    ) -> int:
        """Store one adapter and return its id.

        Args:
            A: [r, in] skill-space down projection; T: [r, in] task-space (gate) projection; B: [out, r].
                Float (fp16/bf16/fp32), dense, on any device but ``meta``.
            ln_weight, ln_bias: [r] LayerNorm affine (default ones / zeros).
            alpha: scale ``alpha / r`` (default alpha = r, scale 1). scale: explicit scale (overrides alpha).
                Both finite real numbers (never bool/str/complex), computed in float64; the scale must fit the
                fp32 ``scales`` storage (``|scale| <= 3.4028235e38``).
            adapter_id: slot to use (an integer in ``[0, max_adapters)``, free); defaults to the lowest free slot.
            check_finite: refuse NaN/Inf in A, T, B and the LayerNorm parameters after conversion to the
                storage dtype (reads the values: a host sync for GPU tensors).

        Raises:
            TypeError (non-float tensors, a scale/alpha of the wrong type) / ValueError (shapes, meta tensors,
            rank 0 or above max_rank, NaN/Inf values, a scale that is not finite or overflows fp32, no room,
            slot in use). Nothing is changed when it raises, whatever the error: the inner LoRAWeights rows, the
            LayerNorm rows and the ranks are written in one transaction (lora_kernels._transaction).
        """
        plan = self._plan_add(A, T, B, ln_weight, ln_bias, alpha, scale, adapter_id, check_finite)
        with transaction() as txn:
            self._write_add(plan, txn)
        return plan[0].adapter_id

    def _plan_add(self, A, T, B, ln_weight, ln_bias, alpha, scale, adapter_id, check_finite):
        check_tensor("A", A, ndim=2, dtypes=FLOAT_DTYPES)
        r = A.shape[0]
        check(1 <= r <= self.max_rank, "A", f"rank in [1, max_rank={self.max_rank}]", r)
        check(A.shape[1] == self.in_features, "A", f"shape (r, {self.in_features})", tuple(A.shape))
        check_tensor("T", T, shape=(r, self.in_features), dtypes=FLOAT_DTYPES)
        check_tensor("B", B, shape=(self.out_features, r), dtypes=FLOAT_DTYPES)
        lw = torch.ones(r) if ln_weight is None else ln_weight
        lb = torch.zeros(r) if ln_bias is None else ln_bias
        check_tensor("ln_weight", lw, shape=(r,), dtypes=FLOAT_DTYPES)
        check_tensor("ln_bias", lb, shape=(r,), dtypes=FLOAT_DTYPES)
        for name, t in (("A", A), ("T", T), ("B", B), ("ln_weight", lw), ("ln_bias", lb)):
            check(t.device.type != "meta", name, "a tensor with data", "a tensor on the meta device")
            check(t.layout == torch.strided, name, "a dense (strided) tensor", t.layout)
        check(type(check_finite) is bool, "check_finite", "a bool", repr(check_finite), TypeError)
        if scale is not None:
            check(isinstance(scale, numbers.Real) and not isinstance(scale, bool)
                  or isinstance(scale, torch.Tensor), "scale", "a finite float", repr(scale), TypeError)
            s = check_fits("scale", check_real("scale", scale))
        else:
            al = r if alpha is None else alpha
            check(isinstance(al, numbers.Real) and not isinstance(al, bool) or isinstance(al, torch.Tensor),
                  "alpha", "a finite float", repr(alpha), TypeError)
            s = check_fits("alpha", check_real("alpha", al) / r, what=f"the scale alpha / r (r={r})")
        dev = self.device
        with torch.no_grad():
            # Converted copies (torch.cat copies; lw / lb cloned): the writes read only these, never the caller's
            # tensors (which may share memory with this storage).
            stacked_a = torch.cat([A.detach().to(dev, self.dtype), T.detach().to(dev, self.dtype)])
            stacked_b = torch.cat([B.detach().to(dev, self.dtype),
                                   torch.zeros(self.out_features, r, dtype=self.dtype, device=dev)], 1)
            lw = lw.detach().to(dev, self.dtype).clone()
            lb = lb.detach().to(dev, self.dtype).clone()
            if check_finite:
                for name, t in (("A", A), ("T", T), ("B", B)):
                    check(bool(torch.isfinite(t.detach().to(self.dtype)).all()), name,
                          f"finite values in {self.dtype}", "NaN/Inf")
                for name, t in (("ln_weight", lw), ("ln_bias", lb)):
                    check(bool(torch.isfinite(t).all()), name, f"finite values in {self.dtype}", "NaN/Inf")
        # validates the slot and the rows; A/T/B were checked above
        inner = self.lora._plan_add(stacked_a, stacked_b, scale=s, adapter_id=adapter_id, check_finite=False)
        return inner, r, lw, lb

    def _write_add(self, plan, txn: Transaction) -> None:
        inner, r, lw, lb = plan
        i, off = inner.adapter_id, inner.off
        self.lora._write_add(inner, txn)
        txn.track(self)
        with torch.no_grad():
            txn.save(self.ln_weight[off : off + 2 * r])
            txn.save(self.ln_bias[off : off + 2 * r])
            txn.save(self.ranks[0, i : i + 1])
            self.ln_weight[off : off + r].copy_(lw)
            self.ln_bias[off : off + r].copy_(lb)
            self.ln_weight[off + r : off + 2 * r].zero_()
            self.ln_bias[off + r : off + 2 * r].zero_()
            self.ranks[0, i] = r
        self._host_ranks[i] = r

    def new_adapter(
        self,
        rank: int,
        alpha: Optional[float] = None,
        *,
        adapter_id: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> int:
        """Create a fresh trainable adapter as in the paper's code: A and T Kaiming-uniform (``nn.Linear``'s
        default, ``a = sqrt(5)``), B zero (so the delta starts at 0), LayerNorm weight 1 and bias 0; scale
        ``alpha / rank`` (alpha defaults to rank). Returns its id. Raises as :meth:`add` (nothing changed)."""
        rank = check_int("rank", rank, lo=1, hi=self.max_rank)
        check(generator is None or isinstance(generator, torch.Generator), "generator", "a torch.Generator or None",
              type(generator).__name__, TypeError)
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on fan_in = in_features
        A = (torch.rand(rank, self.in_features, generator=generator) * 2 - 1) * bound
        T = (torch.rand(rank, self.in_features, generator=generator) * 2 - 1) * bound
        B = torch.zeros(self.out_features, rank)
        return self.add(A, T, B, alpha=alpha, adapter_id=adapter_id)

    def remove(self, adapter_id: int) -> None:
        """Free an adapter's slot and rows. Raises TypeError / ValueError (not a loaded slot); nothing changes."""
        inner = self.lora._plan_remove(adapter_id)
        with transaction() as txn:
            self.lora._write_remove(inner, txn)
            txn.track(self)
            i = inner.adapter_id
            with torch.no_grad():
                txn.save(self.ranks[0, i : i + 1])
                self.ranks[0, i] = 0
            del self._host_ranks[i]

    def _host_state(self):
        return dict(self._host_ranks)

    def _restore_host_state(self, state) -> None:
        self._host_ranks.clear()
        self._host_ranks.update(state)

    def adapter(self, adapter_id: int) -> Dict[str, object]:
        """``{"A", "T", "B", "ln_weight", "ln_bias", "scale"}`` of a loaded adapter (views of the storage, B
        transposed back; the scale is a host float)."""
        adapter_id = self.lora._check_id(adapter_id, loaded=True)
        r = self.rank_of(adapter_id)
        off = self.lora._alloc[adapter_id][0]
        return {
            "A": self.a[0, off : off + r], "T": self.a[0, off + r : off + 2 * r], "B": self.b[off : off + r].t(),
            "ln_weight": self.ln_weight[off : off + r], "ln_bias": self.ln_bias[off : off + r],
            "scale": float(self.scales[0, adapter_id]),
        }

    def __repr__(self) -> str:
        return (
            f"DualLoRAWeights(in={self.in_features}, out={self.out_features}, max_adapters={self.max_adapters}, "
            f"max_rank={self.max_rank}, capacity_rows={self.capacity_rows}, loaded={len(self._host_ranks)}, "
            f"dtype={self.dtype}, device={self.device})"
        )
