"""The batched LoRA delta (SGMV family): ``shrink``, ``expand_`` and the fused ``add_lora_``.

Semantics (per token t with adapter ``i = adapter_ids[t]``, every slice s of the weights):

    shrink:    h[s, t, :r]   = x[t] @ A_{s,i}^T                    (fp32; 0 past the rank and for i = -1)
    expand_:   y[t, cols_s] += scales[s, i] * h[s, t, :r] @ B_{s,i}^T
    add_lora_: y[t, cols_s] += scales[s, i] * (x[t] @ A_{s,i}^T) @ B_{s,i}^T

with ``r = ranks[s, i]``; tokens with ``i = -1`` (and adapters of rank 0) leave y untouched. Sums are formed in
fp32 and rounded once into y's dtype. Mixed mode (``add_lora_(..., merged=m)``, base weight holding adapter m):
``y[t] += delta_i - delta_m`` for tokens with ``i != m`` (``-delta_m`` for ``i = -1``), nothing for tokens of m.
See :mod:`lora_kernels.reference` for the executable spec.

Each public function validates its arguments in Python (no device reads), then calls a custom op
``torch.ops.lora_kernels.<name>`` (declared mutating where it writes in place, with a fake impl for
torch.compile) whose implementation is chosen by :mod:`lora_kernels.backends`: Triton on CUDA tensors, the
reference on CPU tensors (or Triton under ``TRITON_INTERPRET=1`` when forced).

Host overhead (BENCHMARKS.md: <= 10 us per call outside graphs): in plain eager calls (no torch.compile /
export / jit tracing, no dispatch or torch-function mode, no functorch transform, no autograd profiler, plain
tensors; :func:`_eager`) the wrappers call the op's implementation directly instead of going through the
dispatcher, which is all the custom op would do there (autograd is refused for these ops and y's version
counter is bumped with ``torch.autograd.graph.increment_version``, as the mutating op's ADInplaceOrView kernel
would). Each op's argument checks are one list of rules (an :class:`~lora_kernels._argspec.ArgSpec`: ``_SHRINK``,
``_EXPAND``, ``_ADD_LORA``) from which two functions are generated: the combined predicate the fast path runs
first (``spec.ok``: reads only shapes, dtypes, devices, strides and data pointers, raises nothing) and the
detailed checks (``spec.check``: the same rules in the same order, raising with the argument's name) that run
when the predicate is false or outside plain eager, so every check and message is the same on both paths.
Everything else (tracing, compile, opcheck, fake tensors) goes through the custom op as before.

Outputs never share memory with an input or with storage the library owns (:func:`library_storage`: the
weights' ``a``, ``b``, ``offsets``, ``ranks``, ``scales``, ``slice_info`` and the batch's ``meta``): an op writing
y into B's rows would read rows it already changed and leave the adapter corrupted for every later call. The
fast predicate tests the byte spans (:func:`_clear_of`, about 1 us for the eight tensors); the detailed path
names the tensor y overlaps (:func:`_check_out_disjoint`).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .. import backends, profiling, reference
from .._argspec import ArgSpec, Exact, Let, Rule, tensor
from .._validation import FLOAT_DTYPES, check, check_disjoint, check_int
from ..batch import LoRABatch
from ..plan import decode_counters
from ..profiling import nvtx_range
from ..weights import LoRAWeights

__all__ = ["shrink", "expand_", "add_lora_"]

_triton_mod = None


def _triton():
    global _triton_mod
    if _triton_mod is None:
        from ..triton import sgmv  # imported on first use: importing lora_kernels never imports triton

        _triton_mod = sgmv
    return _triton_mod


# ---- implementations (what the custom ops run; the eager fast path calls them directly) -------------------


def _shrink_impl(x, a, offsets, ranks, meta, max_tokens: int, r_cap: int) -> torch.Tensor:
    S, T = a.shape[0], x.shape[0]
    if backends.select("sgmv", x.device.type) == "triton":
        h = torch.empty(S, T, r_cap, dtype=torch.float32, device=x.device)
        _triton().shrink(x, a, offsets, ranks, meta, max_tokens, h)
        return h
    return reference.shrink(x, a, offsets, ranks, meta[:T], r_cap)


def _expand_impl(y, h, b, offsets, ranks, scales, meta, slice_info, max_tokens: int, cols=None, outs=None) -> None:
    """``cols`` / ``outs``: the slices' host column starts and widths when the caller has them (the eager path
    passes ``weights.slice_cols`` / ``slice_outs``); else read from ``slice_info``."""
    if backends.select("sgmv", y.device.type) == "triton":
        _triton().expand_(y, h, b, offsets, ranks, scales, meta, max_tokens, slice_info)
    else:
        if cols is None:
            cols, outs = slice_info.to("cpu").t().tolist()
        reference.expand_(y, h, b, offsets, ranks, scales, meta[: y.shape[0]], cols, outs)


# ---- the compiled decode kernel (csrc/sgmv_decode.cu) --------------------------------------------------------
# add_lora_ with T <= 64 tokens runs the CUDA decode kernel (one launch, CUDA cores, deterministic) instead of the
# Triton path, but only where `lora-bench tune` verified it on this GPU model ("sgmv_decode_cuda" in
# tuning.verified_kernels), the backend is automatic (a forced backend is obeyed as before), x and y share a dtype
# (the instantiations built), and the weights fit the kernel (<= 8 slices, max_rank <= 256). Otherwise nothing
# changes. Its workspace: fp32 partial sums in the batch's workspace (``ws``; contents irrelevant) and int32
# counters that must be zero between calls (the kernel resets them): the last entries of the batch's ``plan``
# (lora_kernels.plan.decode_counters), so they live as long as the batch, the custom op's declared mutation of
# ``plan`` covers them, and the plan's rule holds: one batch per stream.
_DECODE_KERNEL = "sgmv_decode_cuda"
_DECODE_MAX_T, _DECODE_MAX_S, _DECODE_MAX_RANK, _DECODE_CHUNK = 64, 8, 256, 256  # kernels/sgmv_decode.cuh limits
_DECODE_DEVICE_TYPE = "cuda"  # the device type the gate accepts (a CPU test points it at "cpu" to prove the gate)


def _decode_op(y, x, num_slices: int, r_cap: int):
    """``torch.ops.lora_kernels_C.sgmv_decode_`` when it may serve this add_lora_ call (see above), else None.
    Cheap checks first: this runs on every call."""
    if (x.device.type != _DECODE_DEVICE_TYPE or x.shape[0] > _DECODE_MAX_T or x.dtype != y.dtype
            or num_slices > _DECODE_MAX_S or r_cap > _DECODE_MAX_RANK or backends.forced() is not None):
        return None
    from .. import _ext, tuning

    if _DECODE_KERNEL not in tuning.verified_kernels(x.device):
        return None
    ext = _ext.get()
    return getattr(ext, "sgmv_decode_", None) if ext is not None else None


def _decode_ws_bytes(x, num_slices: int, r_cap: int, merged: int) -> int:
    """Bytes of the decode kernel's fp32 partial sums: T * S * ceil(in / 256) * r_cap (2 r_cap in mixed mode)."""
    chunks = -(-x.shape[1] // _DECODE_CHUNK)
    return 4 * x.shape[0] * num_slices * chunks * r_cap * (2 if merged >= 0 else 1)


def _decode_(op, y, x, a, b, offsets, ranks, scales, meta, outs, r_cap: int, merged: int, plan, ws) -> None:
    """One launch of the decode kernel; ``ws`` (the batch's byte workspace) must hold its partial sums, else a
    temporary is allocated (correct, but not graph-capturable)."""
    n = _decode_ws_bytes(x, a.shape[0], r_cap, merged)
    part = ws[:n].view(torch.float32) if ws is not None and ws.numel() >= n else torch.empty(
        n // 4, dtype=torch.float32, device=x.device)
    op(y, x, a, b, offsets, ranks, scales, meta[: x.shape[0]], list(outs), r_cap, merged, part,
       decode_counters(plan))


def _add_lora_impl(y, x, a, b, offsets, ranks, scales, meta, slice_info, max_tokens: int, r_cap: int,
                   merged: int = -1, cols=None, outs=None, plan=None, ws=None) -> None:
    """``plan`` / ``ws``: the batch's work plan and workspace (the persistent kernel's tile list, counters,
    partial sums and h; :mod:`lora_kernels.plan`); None = the Triton launcher builds its own (allocates).
    T <= 64 may take the compiled decode kernel instead (:func:`_decode_op`; it needs ``outs`` and ``plan``)."""
    if outs is not None and plan is not None:
        op = _decode_op(y, x, a.shape[0], r_cap)
        if op is not None:
            _decode_(op, y, x, a, b, offsets, ranks, scales, meta, outs, r_cap, merged, plan, ws)
            return
    if backends.select("sgmv", y.device.type) == "triton":
        _triton().add_lora_(y, x, a, b, offsets, ranks, scales, meta, max_tokens, slice_info, r_cap, merged=merged,
                            plan=plan, ws=ws, outs=outs)
    else:
        if cols is None:
            cols, outs = slice_info.to("cpu").t().tolist()
        tok = meta[: x.shape[0]]
        if merged < 0:
            reference.add_lora_(y, x, a, b, offsets, ranks, scales, tok, cols, outs)
        else:
            _reference_mixed_(y, x, a, b, offsets, ranks, scales, tok, cols, outs, merged)


# ---- custom ops -----------------------------------------------------------------------------------------


@torch.library.custom_op("lora_kernels::shrink", mutates_args=())
def _shrink_op(
    x: torch.Tensor, a: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor, meta: torch.Tensor,
    max_tokens: int, r_cap: int,
) -> torch.Tensor:
    with nvtx_range("lora_kernels.shrink"):
        return _shrink_impl(x, a, offsets, ranks, meta, max_tokens, r_cap)


@_shrink_op.register_fake
def _(x, a, offsets, ranks, meta, max_tokens, r_cap):
    return x.new_empty((a.shape[0], x.shape[0], r_cap), dtype=torch.float32)


@torch.library.custom_op("lora_kernels::expand_", mutates_args=("y",))
def _expand_op(
    y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, ranks: torch.Tensor,
    scales: torch.Tensor, meta: torch.Tensor, slice_info: torch.Tensor, max_tokens: int,
) -> None:
    with nvtx_range("lora_kernels.expand_"):
        _expand_impl(y, h, b, offsets, ranks, scales, meta, slice_info, max_tokens)


@_expand_op.register_fake
def _(y, h, b, offsets, ranks, scales, meta, slice_info, max_tokens):
    return None


@torch.library.custom_op("lora_kernels::add_lora_", mutates_args=("y", "plan", "ws"))
def _add_lora_op(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor,
    ranks: torch.Tensor, scales: torch.Tensor, meta: torch.Tensor, slice_info: torch.Tensor,
    max_tokens: int, r_cap: int, merged: int = -1, plan: Optional[torch.Tensor] = None,
    ws: Optional[torch.Tensor] = None, outs: Optional[List[int]] = None,
) -> None:
    with nvtx_range("lora_kernels.add_lora_"):
        cols = None
        if outs is not None:
            cols = [sum(outs[:i]) for i in range(len(outs))]
        _add_lora_impl(y, x, a, b, offsets, ranks, scales, meta, slice_info, max_tokens, r_cap, merged,
                       cols=cols, outs=outs, plan=plan, ws=ws)


@_add_lora_op.register_fake
def _(y, x, a, b, offsets, ranks, scales, meta, slice_info, max_tokens, r_cap, merged=-1, plan=None, ws=None,
      outs=None):
    return None


def _workspace(y, x, weights, batch, m: int):
    """The batch's workspace sized for this call when the decode kernel (:func:`_decode_op`) or the Triton backend
    runs it (None otherwise)."""
    if _decode_op(y, x, weights.num_slices, weights.max_rank) is not None:
        return batch.workspace(_decode_ws_bytes(x, weights.num_slices, weights.max_rank, m))
    if backends.select("sgmv", x.device.type) != "triton":
        return None
    n = _triton().workspace_bytes(y, x, weights.a, weights.b, weights.max_rank, batch.meta, batch.max_tokens,
                                  weights.slice_outs, m)
    return batch.workspace(n) if n else None


def _reference_mixed_(y, x, a, b, offsets, ranks, scales, token_adapter, cols, outs, m: int) -> torch.Tensor:
    """Mixed mode on the reference: ``y[t] += delta_{i_t} - delta_m`` for every token with ``i_t != m`` (``i_t
    = -1``: ``-delta_m``), composed from :func:`reference.add_lora_`: the fp32 delta of both parts is formed
    first (the tokens' own adapters with m's tokens mapped to -1, then m with negated scales for every token
    whose id is not m), then added to y and rounded once. Entries with nothing to add (tokens of m; slices
    where both ranks are 0) stay bit-identical, as in the kernels."""
    T = x.shape[0]
    tok = token_adapter.to(torch.int32)
    none = torch.full_like(tok, -1)
    d = torch.zeros(T, y.shape[1], dtype=torch.float32, device=y.device)
    reference.add_lora_(d, x, a, b, offsets, ranks, scales, torch.where(tok == m, none, tok), cols, outs)
    reference.add_lora_(d, x, a, b, offsets, ranks, -scales, torch.where(tok == m, none, torch.full_like(tok, m)),
                        cols, outs)
    # which (token, slice) entries the op writes: token not of m, and its own or m's rank nonzero there
    rk = ranks.to(y.device)
    own = torch.where(tok >= 0, rk[:, tok.clamp(min=0).long()], torch.zeros_like(rk[:, :1]))  # [S, T]
    touched = ((own > 0) | (rk[:, m : m + 1] > 0)) & (tok != m)[None, :]
    for s, (c0, n) in enumerate(zip(cols, outs)):
        ys = y[:, c0 : c0 + n]
        ys.copy_(torch.where(touched[s][:, None], (ys.float() + d[:, c0 : c0 + n]).to(y.dtype), ys))
    return y


# ---- validation -----------------------------------------------------------------------------------------
# Every argument check of the three ops is a rule of an argument spec (lora_kernels._argspec) below: the eager
# fast path runs the spec's generated predicate (``spec.ok``: the rules' conditions as one ``and`` chain, no
# messages, as cheap as writing them out by hand), and the detailed path (``spec.check``: the same rules in the
# same order, each raising its TypeError / ValueError naming the argument) runs when the predicate says no and on
# every call that is not plain eager. One list, so the fast path cannot accept what the detailed checks refuse.
# The checks cache nothing about a LoRAWeights/LoRABatch between calls: every fact (sizes, devices, capacities,
# loaded adapters) is re-read on each call, which costs less than validating a cache key would, and cannot go
# stale after add/remove, a storage swap or a batch rebuilt with other capacities.

_TENSOR = torch.Tensor
_FLOATS = frozenset(FLOAT_DTYPES)


def library_storage(weights, batch, prefix: str = "weights") -> dict:
    """``{name: tensor}`` of the storage the library owns that an op reading ``weights`` under ``batch`` reads:
    an output sharing memory with any of it would change the adapters (or the batch) while the op runs, and for
    every later call. ``weights`` is a LoRAWeights or a DualLoRAWeights (``prefix``: its argument name)."""
    out = {}
    for name in ("a", "b", "ln_weight", "ln_bias", "offsets", "ranks", "ranks2", "scales", "slice_info",
                 "in_slice_info"):
        t = getattr(weights, name, None)
        if isinstance(t, torch.Tensor):
            out[f"{prefix}.{name}"] = t
    out["batch.meta"] = batch.meta
    plan = getattr(batch, "plan", None)
    if isinstance(plan, torch.Tensor):
        out["batch.plan"] = plan
    return out


def _check_out_disjoint(y: torch.Tensor, inputs: dict, weights, batch, prefix: str = "weights") -> None:
    """The output y of an in-place op vs its tensor inputs (``{name: tensor}``) and the library's storage
    (:func:`library_storage`): ValueError naming y on any overlap."""
    if torch.compiler.is_compiling():  # fake tensors have no storage; eager calls are checked
        return
    others = dict(inputs)
    others.update(library_storage(weights, batch, prefix))
    try:  # the fast test first (~1 us); check_disjoint (exact, names the tensor) only when it sees an overlap
        if y.numel() == 0 or _clear_of(y, *others.values()):
            return
    except (RuntimeError, NotImplementedError):  # tensors without storage: check_disjoint decides
        pass
    check_disjoint("y", y, others)


def _check_no_grad(*tensors: torch.Tensor) -> None:
    # The in-place ops have no autograd formula (lora_delta / lora_linear in ops/lora_linear.py do): rather than
    # return gradients that silently miss the LoRA term, refuse to run where autograd would record them.
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            "x/y: expected tensors that do not require grad (the in-place serving ops have no backward; train "
            "with lk.lora_delta / lk.lora_linear, which do); run under torch.no_grad() or torch.inference_mode(), "
            "or detach the inputs"
        )


def _check_merged(merged, weights: LoRAWeights) -> int:
    """``merged`` (None or a loaded adapter id: a Python or numpy integer, or a 0-dim integer CPU tensor; never a
    bool, float or string) as the op's int (-1 = none). ValueError naming ``merged`` otherwise."""
    if merged is None:
        return -1
    check(isinstance(weights, LoRAWeights), "weights", "a LoRAWeights", type(weights).__name__, TypeError)
    m = merged
    if type(m) is not int:  # (the common case skips check_int: this runs on every mixed-mode call)
        try:
            m = check_int("merged", m)
        except TypeError:  # bool, float, str...: a ValueError naming merged, as for an id out of range
            m = None
    check(m is not None and 0 <= m < weights.max_adapters,
          "merged", f"None or an adapter id in [0, {weights.max_adapters})", repr(merged))
    check(m in weights._alloc, "merged", "a loaded adapter (the one merged into the base weight)",
          f"{m} (free slot)")
    return m


def _refuse_merged(merged, op: str) -> None:
    check(merged is None, "merged", f"None ({op} has no mixed mode: use add_lora_(..., merged=m), which runs "
          "it in the same launch(es))", repr(merged))


def _span(t: torch.Tensor) -> int:
    if t.is_contiguous():
        return t.nbytes
    return (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def _same_dev(a: torch.device, b: torch.device) -> bool:
    # the batch's device rule (a CUDA device without an index is device 0: LoRABatch keeps the device it was given)
    return a == b or (a.type == b.type == "cuda" and (a.index or 0) == (b.index or 0))


def _clear_of(y: torch.Tensor, *others: torch.Tensor) -> bool:
    """Fast form of :func:`_check_out_disjoint` for a non-empty y: True when y's byte span misses every span of
    ``others``. Conservative (an empty tensor inside y's span, a tensor of another device, meta tensors count as
    overlapping): False only sends the call through the detailed checks, which decide exactly."""
    yp = y.data_ptr()
    ye = yp + (y.nbytes if y.is_contiguous() else _span(y))
    for t in others:
        p = t.data_ptr()
        # a span starting inside y's overlaps it whatever its length; only one starting below y's needs its length
        if p < ye and (p >= yp or p + (t.nbytes if t.is_contiguous() else _span(t)) > yp):
            return False
    return True


def _inner_ok(t: torch.Tensor) -> bool:
    """Unit stride in the last dim (the rule of ``check_tensor(..., inner_contiguous=True)``; ops/lora_linear)."""
    return t.shape[-1] <= 1 or t.stride(-1) == 1


# The rules. Expressions read the op's arguments and the names bound by Let before them, and may assume every
# earlier rule holds; the spec's generated functions look up this module's globals when they run.
_WEIGHTS = Rule("isinstance(weights, LoRAWeights)", "weights",
                lambda weights: ("a LoRAWeights", type(weights).__name__), TypeError)
_WDEV = Let("wdev", "weights.a.device")  # weights.device without the property call

# x: [T, in] float, on the weights' device, unit last-dim stride
_X_RULES = (
    _WEIGHTS,
    _WDEV,
    *tensor("x", ndim=2, dtypes=FLOAT_DTYPES, device="wdev", inner_contiguous=True),
    Rule("x_d1 == weights.in_features", "x",
         lambda x, weights: (f"shape (T, {weights.in_features}) (weights.in_features)", tuple(x.shape))),
)
_X_LETS = (Let("T", "x_d0"), Let("dev", "x_device"))


def _y_tensor(device: str) -> tuple:
    """y: a 2-D float tensor on ``device`` (an expression) with unit last-dim stride."""
    return tensor("y", ndim=2, dtypes=FLOAT_DTYPES, device=device, inner_contiguous=True)


# y: [T, sum of the slices' widths]; rows that share memory (y = z.expand(T, out), or a row stride < out) would be
# written by several programs at once on the GPU: a data race, silently wrong sums.
_Y_SHAPE_RULES = (
    Rule("y_d0 == T and y_d1 == sum(weights.slice_outs)", "y",
         lambda y, T, weights: (f"shape ({T}, {weights.out_features}) (T, sum of the slices' out_features "
                                f"{list(weights.slice_outs)})", tuple(y.shape))),
    Rule("T <= 1 or y.stride(0) >= y_d1", "y",  # (T: y's row count, by the rule above)
         lambda y: (f"rows that do not overlap (row stride >= {y.shape[1]}; e.g. not an expand())",
                    f"strides {y.stride()}")),
)

# weights and batch vs the call: types, the batch built for these T tokens and for no more adapter slots than
# the weights have (its ids must name slots of the weights), metadata on the call's device
_COMMON_RULES = (
    _WEIGHTS,
    Rule("isinstance(batch, LoRABatch)", "batch", lambda batch: ("a LoRABatch", type(batch).__name__), TypeError),
    Rule("batch.num_tokens == T", "batch",
         lambda batch, T: (f"a batch built for {T} tokens (x/y have {T} rows)", f"{batch.num_tokens} tokens")),
    Rule("batch.max_adapters <= weights.max_adapters", "batch",
         lambda batch, weights: (f"max_adapters <= weights.max_adapters={weights.max_adapters} (ids must name "
                                 "slots of the weights)", batch.max_adapters)),
    Rule("batch.device == dev or _same_dev(batch.device, dev)", "batch",
         lambda batch, dev: (f"metadata on {dev}", batch.device)),
)

# the weights' storage on the call's device: a rule of the weights/batch pair on its own (_COMMON, for lora_linear);
# the ops' specs leave it out, as their x (shrink, add_lora_) or y (expand_) rule already ties dev to the weights'
# device (dev is that tensor's device, and a tensor's CUDA device has an index)
_WEIGHTS_ON_DEV = Rule("wdev == dev or (wdev.type == dev.type and (dev.type != 'cuda' or (wdev.index or 0) == "
                       "(dev.index or 0)))", "weights", lambda weights, dev: (f"storage on {dev}", weights.device))

# y vs what the op reads while writing it: the input and the library's storage (library_storage; a test keeps the
# two lists equal). The predicate is _clear_of (conservative); the detailed path decides exactly.
_STORAGE = ("weights.a, weights.b, weights.offsets, weights.ranks, weights.scales, weights.slice_info, batch.meta, "
            "batch.plan")
_Y_CLEAR_OF_X = Exact(f"not T or not y_d1 or _clear_of(y, x, {_STORAGE})",
                      lambda y, x, weights, batch: _check_out_disjoint(y, {"x": x}, weights, batch))
_Y_CLEAR_OF_H = Exact(f"not T or not y_d1 or _clear_of(y, h, {_STORAGE})",
                      lambda y, h, weights, batch: _check_out_disjoint(y, {"h": h}, weights, batch))

# h: fp32 [S, T, max_rank] contiguous, on y's device
_H_RULES = (
    *tensor("h", shape=("weights.num_slices", "T", "weights.max_rank"), dtypes=(torch.float32,), device="dev"),
    Rule("h.is_contiguous()", "h", lambda h: ("a contiguous tensor", f"strides {h.stride()}")),
)

_SHRINK = ArgSpec("shrink", "x, weights, batch", (*_X_RULES, *_X_LETS, *_COMMON_RULES), globals())
_ADD_LORA = ArgSpec("add_lora_", "y, x, weights, batch",
                    (*_X_RULES, *_X_LETS, *_y_tensor("dev"), *_Y_SHAPE_RULES, *_COMMON_RULES, _Y_CLEAR_OF_X),
                    globals())
_EXPAND = ArgSpec("expand_", "y, h, weights, batch",
                  (_WEIGHTS, _WDEV, *_y_tensor("wdev"), Let("T", "y_d0"), Let("dev", "y_device"),
                   *_Y_SHAPE_RULES, *_COMMON_RULES, *_H_RULES, _Y_CLEAR_OF_H), globals())
# the parts on their own (ops/lora_linear.py and nn/lora_linear.py check x and the weights/batch pair)
_X = ArgSpec("x", "x, weights", _X_RULES, globals())
_Y = ArgSpec("y", "y, weights, T, dev", (*_y_tensor("dev"), *_Y_SHAPE_RULES), globals())
_COMMON = ArgSpec("common", "weights, batch, T, dev", (*_COMMON_RULES, _WDEV, _WEIGHTS_ON_DEV), globals())

_shrink_args_ok, _add_lora_args_ok, _expand_args_ok = _SHRINK.ok, _ADD_LORA.ok, _EXPAND.ok
_x_ok, _y_ok, _common_ok = _X.ok, _Y.ok, _COMMON.ok
_check_x, _check_y, _check_common = _X.check, _Y.check, _COMMON.check


# ---- eager fast path ------------------------------------------------------------------------------------
# Why the wrappers bypass the custom op in plain eager calls: measured with `lora-bench overhead` (CPU, kernels
# stubbed), the dispatcher costs ~13 us per call against a 10 us budget for the whole call, and in plain eager
# mode it only forwards to the implementation (no autograd formula: grad is refused; no autocast or
# functionalization registrations). What it would do besides is replayed by hand: the mutating op's
# ADInplaceOrView kernel bumps y's version counter, done here with torch.autograd.graph.increment_version (the
# public API for "a kernel wrote this tensor through its data pointer"), so autograd still sees saved tensors
# that were modified. Wherever the dispatcher matters (compile, export, tracing, modes, functorch, the profiler,
# tensor subclasses: _eager) the custom op runs.
# The Triton launcher below them keeps a launch record per (weights, batch, x/y layout) (its key holds the
# tensors' identities and version counters, the batch's T and workspace: triton.sgmv._prepared_key), since
# re-deriving the launch (~40 us of config / plan / workspace Python plus ~25 us of Triton binding) is what costs.

_PARAMETER = torch.nn.Parameter
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
_profiler_on = torch._C._autograd._profiler_enabled
_jit_tracing = torch._C._get_tracing_state
_bump_version = torch.autograd.graph.increment_version


# False routes every call through the detailed checks and the custom op (``lora-bench overhead`` times both).
fast_path = True


def _eager(*tensors: torch.Tensor) -> bool:
    """True when calling an op's implementation directly is equivalent to calling the custom op: no
    torch.compile / export / jit trace, no TorchDispatchMode (fake tensors, make_fx, schema checks) or
    TorchFunctionMode (``with torch.device(...)``), no functorch transform, no autograd profiler (it records
    the op by name), and plain tensors (a subclass may intercept the op)."""
    if (not fast_path or _is_compiling() or _dispatch_modes() or _function_modes() or _profiler_on()
            or _jit_tracing() is not None or (_functorch_active is not None and _functorch_active())):
        return False
    for t in tensors:
        tt = type(t)
        if tt is not _TENSOR and tt is not _PARAMETER:
            return False
    return True


def _below_autograd(*tensors: torch.Tensor) -> bool:
    """True when running the implementation outside the dispatcher records no autograd graph either: grad mode
    is off or none of ``tensors`` (the weights' storage the op reads) requires grad. The custom op runs its
    implementation below autograd; called directly, the reference's torch ops would record one (x, y and h are
    refused by :func:`_check_no_grad` on both paths)."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def _nvtx_on() -> bool:
    # profiling.enabled() with the hot-path env read
    on = getattr(profiling, "_enabled", None)
    return on if on is not None else (backends.env("LORA_KERNELS_NVTX") or "0") not in ("", "0")


def _add_lora_eager(y, x, weights, batch, m: int) -> None:
    """The eager fast path's call of :func:`_add_lora_impl` (checked arguments, T > 0). With the Triton backend,
    first the launcher's prepared launch (``triton.sgmv.add_lora_prepared_``: the config, plan, workspace views
    and argument list resolved once per (weights, batch, x/y layout), the compiled kernel launched pre-bound);
    it declines (False) for strategies other than "persistent", and those take the general path. T <= 64 may
    take the compiled decode kernel first (:func:`_decode_op`)."""
    op = _decode_op(y, x, weights.num_slices, weights.max_rank)
    if op is not None:
        _decode_(op, y, x, weights.a, weights.b, weights.offsets, weights.ranks, weights.scales, batch.meta,
                 weights.slice_outs, weights.max_rank, m, batch.plan,
                 batch.workspace(_decode_ws_bytes(x, weights.num_slices, weights.max_rank, m)))
        return
    if backends.select("sgmv", x.device.type) == "triton" and _triton().add_lora_prepared_(y, x, weights, batch, m):
        return
    _add_lora_impl(y, x, weights.a, weights.b, weights.offsets, weights.ranks, weights.scales, batch.meta,
                   weights.slice_info, batch.max_tokens, weights.max_rank, m, weights.slice_cols, weights.slice_outs,
                   batch.plan, _workspace(y, x, weights, batch, m))


# ---- public API -----------------------------------------------------------------------------------------


def shrink(x: torch.Tensor, weights: LoRAWeights, batch: LoRABatch, *, merged: None = None) -> torch.Tensor:
    """``h = shrink(x, weights, batch)``: the first SGMV half (see the module docstring).

    Args:
        x: [T, in] fp16/bf16/fp32, rows may be strided, last dim unit-stride.
        weights: :class:`~lora_kernels.LoRAWeights` with ``in_features == in``.
        batch: :class:`~lora_kernels.LoRABatch` built for these T tokens.

    Returns:
        h: fp32 [S, T, weights.max_rank]; zero past each token's rank and for tokens with no adapter.

        merged: must be None (mixed mode is an :func:`add_lora_` feature; ValueError otherwise).

    Raises:
        TypeError / ValueError naming the argument, before anything runs.
    """
    if merged is not None:
        _refuse_merged(merged, "shrink")
    if _eager(x) and _shrink_args_ok(x, weights, batch) and _below_autograd(weights.a):
        _check_no_grad(x)
        args = (x, weights.a, weights.offsets, weights.ranks, batch.meta, batch.max_tokens, weights.max_rank)
        if _nvtx_on():
            with nvtx_range("lora_kernels.shrink"):
                return _shrink_impl(*args)
        return _shrink_impl(*args)
    _SHRINK.check(x, weights, batch)
    _check_no_grad(x)
    return torch.ops.lora_kernels.shrink(x, weights.a, weights.offsets, weights.ranks, batch.meta,
                                         batch.max_tokens, weights.max_rank)


def expand_(
    y: torch.Tensor, h: torch.Tensor, weights: LoRAWeights, batch: LoRABatch, *, merged: None = None
) -> torch.Tensor:
    """``expand_(y, h, weights, batch)``: ``y[t, cols_s] += s * h[s, t, :r] @ B^T`` in place; returns y.

    Args:
        y: [T, sum(out_s)] fp16/bf16/fp32 (rows may be strided).
        h: fp32 [S, T, weights.max_rank], e.g. from :func:`shrink`.
        merged: must be None (mixed mode is an :func:`add_lora_` feature; ValueError otherwise).
    """
    if merged is not None:
        _refuse_merged(merged, "expand_")
    if _eager(y, h) and _expand_args_ok(y, h, weights, batch) and _below_autograd(weights.b):
        _check_no_grad(y, h)
        if y.shape[0]:
            args = (y, h, weights.b, weights.offsets, weights.ranks, weights.scales, batch.meta, weights.slice_info,
                    batch.max_tokens, weights.slice_cols, weights.slice_outs)
            if _nvtx_on():
                with nvtx_range("lora_kernels.expand_"):
                    _expand_impl(*args)
            else:
                _expand_impl(*args)
            _bump_version(y)  # the custom op's version bump (see "eager fast path")
        return y
    _EXPAND.check(y, h, weights, batch)
    _check_no_grad(y, h)
    if y.shape[0] == 0:
        return y
    torch.ops.lora_kernels.expand_(y, h, weights.b, weights.offsets, weights.ranks, weights.scales, batch.meta,
                                   weights.slice_info, batch.max_tokens)
    return y


def add_lora_(
    y: torch.Tensor, x: torch.Tensor, weights: LoRAWeights, batch: LoRABatch, *, merged: Optional[int] = None
) -> torch.Tensor:
    """``add_lora_(y, x, weights, batch)``: ``y[t, cols_s] += s_i * (x[t] @ A_i^T) @ B_i^T`` in place.

    Semantics (``merged = m``, mixed mode: the base weight already holds ``W0 + delta_m``):
        ``y[t] += delta_{i_t}(x[t]) - delta_m(x[t])`` for every token with ``i_t != m`` (tokens with ``-1``:
        ``-delta_m``); tokens of m are untouched. So ``base_merged(x) + this == base(x) + the unmerged delta``.
        Same launches as the normal mode (m's rows join each segment's gather; see
        :func:`lora_kernels.triton.sgmv.add_lora_`); the fp32 sum of both parts is rounded once into y.

    Args:
        y: [T, sum(out_s)] fp16/bf16/fp32, e.g. the base layer's output (rows may be strided).
        x: [T, in], same device; dtype may differ from y and from the weights (all accumulate in fp32).
        weights: the layer's :class:`~lora_kernels.LoRAWeights` (one or several slices).
        batch: :class:`~lora_kernels.LoRABatch` built for these T tokens.
        merged: None (normal), or the id of a loaded adapter merged into the base weight (mixed mode).

    Returns:
        y. An empty batch (T = 0) is a no-op.

    Raises:
        TypeError / ValueError naming the argument (wrong type, dtype, device, shape, strides, a batch built for
        another T or for more adapter slots than the weights have, y sharing memory with x or with the library's
        storage (``weights.a`` / ``b`` / ``offsets`` / ``ranks`` / ``scales`` / ``slice_info``, ``batch.meta``),
        ``merged`` not None and not a loaded adapter id); RuntimeError when x or y requires grad under grad mode
        (an in-place op without a
        backward: train with :func:`lora_kernels.lora_delta` / :func:`lora_kernels.lora_linear`). y is unchanged
        when it raises.
    """
    m = -1 if merged is None else _check_merged(merged, weights)
    if _eager(y, x) and _add_lora_args_ok(y, x, weights, batch) and _below_autograd(weights.a, weights.b):
        _check_no_grad(x, y)
        if x.shape[0]:
            if _nvtx_on():
                with nvtx_range("lora_kernels.add_lora_"):
                    _add_lora_eager(y, x, weights, batch, m)
            else:
                _add_lora_eager(y, x, weights, batch, m)
            _bump_version(y)  # the custom op's version bump (see "eager fast path")
        return y
    _ADD_LORA.check(y, x, weights, batch)
    _check_no_grad(x, y)
    if x.shape[0] == 0:
        return y
    torch.ops.lora_kernels.add_lora_(y, x, weights.a, weights.b, weights.offsets, weights.ranks, weights.scales,
                                     batch.meta, weights.slice_info, batch.max_tokens, weights.max_rank, m,
                                     batch.plan, _workspace(y, x, weights, batch, m), list(weights.slice_outs))
    return y
