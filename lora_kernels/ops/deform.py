"""Multi-scale deformable pooling, the sampling core of VCE (Visual Cue Enhancement) and Deformable-DETR.

Semantics (:func:`lora_kernels.reference.deform_pool` is the executable spec)::

    out[b, q, h*D + d] = sum_{l < L, p < P} attention_weights[b, q, h, l, p]
                         * bilinear(value[b, start_l : start_l + H_l * W_l, h, d] as [H_l, W_l],
                                    x = loc_x * W_l - 0.5, y = loc_y * H_l - 0.5)

with ``(loc_x, loc_y) = sampling_locations[b, q, h, l, p]`` in [0, 1] (the image spans [0, 1]; pixel centres
at ``(i + 0.5) / W_l``) and zero padding outside: exactly ``grid_sample(align_corners=False,
padding_mode="zeros")`` on ``2 * loc - 1``. Differentiable in value, sampling_locations and attention_weights.

Non-finite locations (NaN, +-Inf): the sample contributes 0 to the output and gets zero gradients (as a sample
far outside the image would). This is checked on the device, per sample, without a host sync. Non-finite
values or attention weights propagate as IEEE arithmetic says.

Metadata that points outside value contributes nothing; validate=True refuses it. With ``validate=False`` and
inconsistent spatial_shapes / level_start_index, every backend treats a bilinear corner whose value row
``start_l + y * W_l + x`` is outside [0, S) as outside the image (zero value, zero gradients), and a level with
H_l < 1 or W_l < 1 contributes nothing: the kernels never read or write outside value's S rows.

Backends (:mod:`lora_kernels.backends`, family ``deform``): CPU tensors and fp64 -> the reference (grid_sample).
CUDA tensors -> Triton (forward and backward), or the compiled CUDA kernels (csrc/deform_pool.cu) where
``lora_kernels.tuning.verified_kernels(device)`` lists ``"deform_cuda"`` or when forced with
``LORA_KERNELS_BACKEND=cuda``. The backward runs on the forward's backend. Both GPU backwards accumulate grad
value with fp32 atomics by default: its last bits may change from run to run (grad locations and weights are
deterministic). ``deterministic=True`` (or ``torch.use_deterministic_algorithms(True)``) sums grad value in a
fixed order instead (keys + stable sort + a segmented gather, in Triton for both GPU backends).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from .. import backends, reference
from .._validation import FLOAT_DTYPES, check, check_int, check_tensor
from ..profiling import nvtx_range

__all__ = ["deform_pool", "deform_sample"]

ShapesArg = Union[torch.Tensor, Sequence[Sequence[int]]]
_DTYPES = FLOAT_DTYPES + (torch.float64,)


# ---- backend choice ---------------------------------------------------------------------------------------------
def _cuda_ops(fused: bool = False):
    """The compiled extension's ops when it has the deform_pool kernels (and, with ``fused``, the deform_sample
    ones: an extension built before them has only the former), else None."""
    from .. import _ext

    ops = _ext.get()
    if ops is None:
        return None
    try:
        _ = ops.deform_sample_fwd_ if fused else ops.deform_pool_fwd_
    except (AttributeError, RuntimeError):
        return None
    return ops


def _select(device: torch.device, dtype: torch.dtype, fused: bool = False) -> str:
    forced = backends.forced()
    if dtype == torch.float64:
        if forced not in (None, "reference"):
            raise RuntimeError(f"LORA_KERNELS_BACKEND={forced} cannot run deform_pool in float64 (reference only)")
        return "reference"
    if forced is None and device.type == "cuda":
        from .. import tuning

        if "deform_cuda" in tuning.verified_kernels(device) and _cuda_ops(fused) is not None:
            return "cuda"
        return "triton" if backends.triton_can_run("cuda") is None else "reference"
    name = backends.select("deform", device)
    if name == "cuda" and _cuda_ops(fused) is None:
        from .. import _ext

        op = "deform_sample" if fused else "deform_pool"
        raise RuntimeError(f"LORA_KERNELS_BACKEND=cuda cannot run {op}: the compiled extension has no {op} "
                           f"kernel (rebuild it; extension status: {_ext.status()})")
    return name


# ---- implementations --------------------------------------------------------------------------------------------
@torch.library.custom_op("lora_kernels::deform_pool", mutates_args=())
def _deform_pool_op(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                    sampling_locations: torch.Tensor, attention_weights: torch.Tensor, backend: str,
                    deterministic: bool) -> torch.Tensor:
    """Forward on validated, contiguous inputs. ``backend``: reference | triton | cuda (see _select);
    ``deterministic`` is used by the backward only."""
    with nvtx_range("lora_kernels.deform_pool"):
        if backend == "triton":
            from ..triton import deform as tdeform

            return tdeform.deform_pool_fwd(value, spatial_shapes, level_start_index, sampling_locations,
                                           attention_weights)
        if backend == "cuda":
            out = value.new_empty(value.shape[0], sampling_locations.shape[1], value.shape[2] * value.shape[3])
            _cuda_ops().deform_pool_fwd_(out, value, spatial_shapes, level_start_index, sampling_locations,
                                         attention_weights, False)
            return out
        return reference.deform_pool(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights)


@_deform_pool_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend, deterministic):
    B, _, H, D = value.shape
    return value.new_empty(B, sampling_locations.shape[1], H * D)


@torch.library.custom_op("lora_kernels::deform_pool_backward", mutates_args=())
def _deform_pool_bwd_op(grad_out: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
                        level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                        attention_weights: torch.Tensor, backend: str, deterministic: bool
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad value, grad sampling_locations, grad attention_weights), each in its input's dtype and shape."""
    with nvtx_range("lora_kernels.deform_pool_backward"):
        grad_out = grad_out.contiguous()
        if backend == "triton":
            from ..triton import deform as tdeform

            return tdeform.deform_pool_bwd(grad_out, value, spatial_shapes, level_start_index, sampling_locations,
                                           attention_weights, deterministic)
        if backend == "cuda":
            grad_out = grad_out.to(value.dtype)
            if deterministic:  # grad loc / weights from the CUDA kernel, grad value without atomics (Triton)
                from ..triton import deform as tdeform

                gv = value.new_empty(0, dtype=torch.float32)
            else:
                gv = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
            gl = torch.zeros_like(sampling_locations)  # (the kernel writes every entry when it runs at all)
            ga = torch.zeros_like(attention_weights)
            _cuda_ops().deform_pool_bwd_(gv, gl, ga, grad_out, value, spatial_shapes, level_start_index,
                                         sampling_locations, attention_weights, False)
            if deterministic:
                gv = tdeform.deform_pool_grad_value_deterministic(grad_out, value, spatial_shapes, level_start_index,
                                                                  sampling_locations, attention_weights)
            return gv.to(value.dtype), gl, ga
        return reference.deform_pool_backward(grad_out, value, spatial_shapes, sampling_locations,
                                              attention_weights, level_start_index)


@_deform_pool_bwd_op.register_fake
def _(grad_out, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend,
      deterministic):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    value, shapes, starts, loc, attn, backend, deterministic = inputs
    ctx.save_for_backward(value, shapes, starts, loc, attn)
    ctx.backend = backend
    ctx.deterministic = deterministic


def _backward(ctx, grad_out):
    value, shapes, starts, loc, attn = ctx.saved_tensors
    gv, gl, ga = _deform_pool_bwd_op(grad_out, value, shapes, starts, loc, attn, ctx.backend, ctx.deterministic)
    return gv, None, None, gl, ga, None, None


torch.library.register_autograd("lora_kernels::deform_pool", _backward, setup_context=_setup_context)


# ---- public API -------------------------------------------------------------------------------------------------
# Device copies of host shape lists, so that repeated calls with the same list copy nothing (and can be captured
# in a CUDA graph after the first call). Small: a model has a handful of level configurations.
_SHAPES_CACHE: Dict[Tuple[Tuple[Tuple[int, int], ...], str], Tuple[torch.Tensor, torch.Tensor]] = {}


def _shapes_tensor(spatial_shapes: ShapesArg, device: torch.device
                   ) -> Tuple[torch.Tensor, Optional[list], Optional[torch.Tensor]]:
    """(int64 [L, 2] tensor on ``device``, host list of pairs or None if not read, int64 [L] level starts on
    ``device`` for a host list, else None)."""
    if isinstance(spatial_shapes, torch.Tensor):
        check(spatial_shapes.dtype == torch.int64, "spatial_shapes", "dtype torch.int64", spatial_shapes.dtype,
              TypeError)
        check(spatial_shapes.ndim == 2 and spatial_shapes.shape[-1] == 2, "spatial_shapes", "shape (L, 2)",
              tuple(spatial_shapes.shape))
        check_tensor("spatial_shapes", spatial_shapes, device=device)
        return spatial_shapes.contiguous(), None, None
    pairs = _host_pairs(spatial_shapes)
    key = (tuple(pairs), str(device))
    hit = _SHAPES_CACHE.get(key)
    if hit is None:
        if len(_SHAPES_CACHE) >= 64:
            _SHAPES_CACHE.clear()
        starts = [sum(h * w for h, w in pairs[:i]) for i in range(len(pairs))]
        hit = _SHAPES_CACHE[key] = (torch.tensor(pairs, dtype=torch.int64).view(-1, 2).to(device),
                                    torch.tensor(starts, dtype=torch.int64).to(device))
    return hit[0], pairs, hit[1]


_I64 = 2**63 - 1


def _host_pairs(spatial_shapes) -> list:
    """A host sequence of (H_l, W_l) as a list of Python int pairs. Every entry must be an integer (int, numpy
    integer, 0-dim integer tensor; a float such as 2.5 or 3.0, a bool or a string is refused rather than
    truncated), and the level sizes and their running total must fit int64 (the kernels' row arithmetic).
    TypeError / ValueError naming ``spatial_shapes``."""
    if isinstance(spatial_shapes, (str, bytes)) or not hasattr(spatial_shapes, "__iter__"):
        raise TypeError(f"spatial_shapes: expected an int64 tensor [L, 2] or a sequence of (H_l, W_l) pairs, got "
                        f"{type(spatial_shapes).__name__}")
    pairs, total = [], 0
    for i, hw in enumerate(spatial_shapes):
        try:
            h, w = hw
        except (TypeError, ValueError):
            raise TypeError(f"spatial_shapes[{i}]: expected an (H_l, W_l) pair of integers, got {hw!r:.60}") from None
        h = check_int(f"spatial_shapes[{i}][0]", h, lo=-_I64, hi=_I64)
        w = check_int(f"spatial_shapes[{i}][1]", w, lo=-_I64, hi=_I64)
        # the level starts are the running sums of H_l * W_l (as given: validate=False keeps negative sizes), in
        # int64 on the device: every product and running sum must fit
        total += h * w
        check(abs(h * w) <= _I64 and abs(total) <= _I64, "spatial_shapes",
              "H_l * W_l and their running sum within int64 (|x| <= 2**63 - 1: the kernels' row indices)",
              f"a running total of {total} at level {i} ({h}, {w})")
        pairs.append((h, w))
    return pairs


def _check_value_points(value: torch.Tensor, name: str, points: torch.Tensor, spatial_shapes: ShapesArg
                        ) -> Tuple[torch.Tensor, Optional[list], Optional[torch.Tensor]]:
    """Check value [B, S, H, D] and the per-sample points ``name`` [B, Q, H, L, P, 2] (value's dtype, or fp32:
    full-precision points with a 16-bit value; value's device) against the L levels of ``spatial_shapes``;
    returns :func:`_shapes_tensor`'s triple."""
    check_tensor("value", value, ndim=4, dtypes=_DTYPES)
    B, _, H, _ = value.shape
    check_tensor(name, points, ndim=6, dtypes=(value.dtype, torch.float32), device=value.device)
    shapes, pairs, host_starts = _shapes_tensor(spatial_shapes, value.device)
    check_tensor(name, points, shape=(B, None, H, shapes.shape[0], None, 2))
    return shapes, pairs, host_starts


def _level_starts(shapes: torch.Tensor, pairs: Optional[list], host_starts: Optional[torch.Tensor],
                  level_start_index: Optional[torch.Tensor], S: int, validate: bool) -> torch.Tensor:
    """Check ``level_start_index`` (and with ``validate`` the shapes' values against value's S rows) and return
    the int64 [L] level starts on shapes' device (computed from the shapes when None)."""
    L = shapes.shape[0]
    if level_start_index is not None:
        check_tensor("level_start_index", level_start_index, shape=(L,), dtypes=(torch.int64,), device=shapes.device)
    if validate and shapes.device.type == "meta":  # meta tensors have no values to check (as under tracing)
        validate = False
    if validate:
        if pairs is None:
            pairs = [tuple(p) for p in shapes.tolist()]  # one host sync (documented)
        check(all(h >= 1 and w >= 1 for h, w in pairs), "spatial_shapes", "every (H_l, W_l) >= 1", pairs)
        # each level bounded by value's rows before anything is summed: a huge (H_l, W_l) is named here, not
        # reported as a wrong S (and no product can overflow: Python ints, each level <= S)
        for i, (h, w) in enumerate(pairs):
            check(h * w <= S, "spatial_shapes", f"H_l * W_l <= S = {S} (value's rows) for every level",
                  f"level {i} ({h}, {w}) with {h * w} rows")
        total = sum(h * w for h, w in pairs)
        check(S == total, "value", f"S = sum(H_l * W_l) = {total} rows (dim 1)", f"S = {S}")
        if level_start_index is not None:
            want = [sum(h * w for h, w in pairs[:i]) for i in range(L)]
            got = level_start_index.tolist()
            check(got == want, "level_start_index", f"{want} (cumulative H_l * W_l of spatial_shapes)", got)
    if level_start_index is not None:
        return level_start_index
    if host_starts is not None:
        return host_starts
    sizes = shapes[:, 0] * shapes[:, 1]
    return torch.cumsum(sizes, 0) - sizes


def deform_pool(value: torch.Tensor, spatial_shapes: ShapesArg, level_start_index: Optional[torch.Tensor],
                sampling_locations: torch.Tensor, attention_weights: torch.Tensor, *,
                validate: bool = True, deterministic: Optional[bool] = None) -> torch.Tensor:
    """Multi-scale deformable pooling (see the module docstring for the semantics).

    Args:
        value: [B, S, H, D] fp32/fp16/bf16 (fp64: reference only), S = sum_l H_l * W_l, levels concatenated.
        spatial_shapes: int64 [L, 2] rows (H_l, W_l) on value's device, or a host sequence of L pairs.
        level_start_index: int64 [L] with ``start_l = sum_{k<l} H_k W_k``, on value's device, or None
            (computed from the shapes).
        sampling_locations: [B, Q, H, L, P, 2] (x, y) in [0, 1], value's dtype or float32 (recommended with a
            16-bit value: a bf16 location near 1 is off by up to 2^-9 of the image).
        attention_weights: [B, Q, H, L, P], the dtype of sampling_locations (normally a softmax over L * P).
        validate: check the shapes' *values* (S = sum H_l W_l, level_start_index consistent, sizes >= 1).
            With device tensors this reads them to the host (one sync); pass a host list of pairs, or
            validate=False once the metadata is known good, to keep the call sync-free. Metadata that points
            outside value contributes nothing; validate=True refuses it (unvalidated metadata is still
            memory-safe: corners whose row start_l + y * W_l + x is outside [0, S) read as zero).
        deterministic: bit-reproducible gradients on the GPU backends (grad value summed per value row in a
            fixed order: keys + stable sort + gather, about 28 extra bytes per (sample, corner) pair and a sort)
            instead of fp32 atomics. None: ``torch.are_deterministic_algorithms_enabled()``. The forward, grad
            locations and grad weights are deterministic either way; the reference is deterministic on the CPU.

    Returns:
        [B, Q, H * D] in value's dtype (head-major channels, as Deformable-DETR's op). Gradients come back in
        each input's dtype.

    Raises:
        TypeError: a non-tensor argument, wrong dtypes (locations and weights share one, value's or float32;
            shapes and starts int64), host spatial_shapes entries that are not integers (2.5 and 3.0 alike: never
            truncated).
        ValueError: inconsistent shapes, devices, level metadata (with ``validate``: a level larger than value's
            S rows, S != sum H_l W_l, level_start_index not their running sum; always, for host shapes: sizes or
            running sums outside int64), or a forced backend that cannot run. Every refusal names the argument
            and comes before any launch.
    """
    shapes, pairs, host_starts = _check_value_points(value, "sampling_locations", sampling_locations,
                                                     spatial_shapes)
    B, S, H, D = value.shape
    dev = value.device
    L = shapes.shape[0]
    Q, P = sampling_locations.shape[1], sampling_locations.shape[4]
    check_tensor("attention_weights", attention_weights, dtypes=(sampling_locations.dtype,), shape=(B, Q, H, L, P),
                 device=dev)
    level_start_index = _level_starts(shapes, pairs, host_starts, level_start_index, S, validate)
    backend = _select(dev, value.dtype)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if deterministic and backend == "cuda" and backends.triton_can_run(dev.type) is not None:
        raise RuntimeError("deform_pool(deterministic=True) on the cuda backend needs Triton for grad value: "
                           f"{backends.triton_can_run(dev.type)}")
    return _deform_pool_op(value.contiguous(), shapes, level_start_index.contiguous(),
                           sampling_locations.contiguous(), attention_weights.contiguous(), backend,
                           bool(deterministic))


# ---- fused sampling: softmax and location arithmetic inside the kernel (VCE) ---------------------------------------
@torch.library.custom_op("lora_kernels::deform_sample", mutates_args=())
def _deform_sample_op(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                      ref: torch.Tensor, offsets: torch.Tensor, logits: torch.Tensor, backend: str,
                      deterministic: bool) -> torch.Tensor:
    """Fused forward on validated, contiguous inputs (backend: reference | triton | cuda)."""
    with nvtx_range("lora_kernels.deform_sample"):
        if backend == "triton":
            from ..triton import deform as tdeform

            return tdeform.deform_sample_fwd(value, spatial_shapes, level_start_index, ref, offsets, logits)
        if backend == "cuda":
            B, Q, H, L, P, _ = offsets.shape
            out = value.new_empty(B, Q, value.shape[2] * value.shape[3])
            if L * P == 0:
                return out.zero_()
            _cuda_ops().deform_sample_fwd_(out, value, spatial_shapes, level_start_index, ref.to(torch.float32),
                                           offsets, logits.view(B, Q, H, L, P))
            return out
        return reference.deform_sample(value, spatial_shapes, level_start_index, ref, offsets, logits)


@_deform_sample_op.register_fake
def _(value, spatial_shapes, level_start_index, ref, offsets, logits, backend, deterministic):
    B, _, H, D = value.shape
    return value.new_empty(B, offsets.shape[1], H * D)


@torch.library.custom_op("lora_kernels::deform_sample_backward", mutates_args=())
def _deform_sample_bwd_op(grad_out: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
                          level_start_index: torch.Tensor, ref: torch.Tensor, offsets: torch.Tensor,
                          logits: torch.Tensor, backend: str, deterministic: bool
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad value, grad offsets, grad logits), each in its input's dtype and shape."""
    with nvtx_range("lora_kernels.deform_sample_backward"):
        grad_out = grad_out.contiguous()
        if backend == "triton":
            from ..triton import deform as tdeform

            return tdeform.deform_sample_bwd(grad_out, value, spatial_shapes, level_start_index, ref, offsets,
                                             logits, deterministic)
        if backend == "cuda":
            return _deform_sample_bwd_cuda(grad_out.to(value.dtype), value, spatial_shapes, level_start_index, ref,
                                           offsets, logits, deterministic)
        return reference.deform_sample_backward(grad_out, value, spatial_shapes, ref, offsets, logits,
                                                level_start_index)


@_deform_sample_bwd_op.register_fake
def _(grad_out, value, spatial_shapes, level_start_index, ref, offsets, logits, backend, deterministic):
    return torch.empty_like(value), torch.empty_like(offsets), torch.empty_like(logits)


def _deform_sample_bwd_cuda(grad_out, value, shapes, starts, ref, offsets, logits, deterministic):
    """The compiled fused backward; grad value without atomics (Triton, as deform_pool's) when deterministic."""
    B, Q, H, L, P, _ = offsets.shape
    if deterministic:
        gv = value.new_empty(0, dtype=torch.float32)
    else:
        gv = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
    go = torch.zeros_like(offsets)
    gl = torch.zeros(B, Q, H, L, P, dtype=torch.float32, device=logits.device)
    _cuda_ops().deform_sample_bwd_(gv, go, gl, grad_out, value, shapes, starts, ref.to(torch.float32), offsets,
                                   logits.view(B, Q, H, L, P))
    if deterministic:
        from ..triton import deform as tdeform

        loc, w = tdeform.sample_locations_weights(shapes, ref, offsets, logits)
        gv = tdeform.deform_pool_grad_value_deterministic(grad_out, value, shapes, starts, loc, w)
    return gv.to(value.dtype), go, gl.view(logits.shape).to(logits.dtype)


def _sample_setup_context(ctx, inputs, output):
    value, shapes, starts, ref, offsets, logits, backend, deterministic = inputs
    ctx.save_for_backward(value, shapes, starts, ref, offsets, logits)
    ctx.backend = backend
    ctx.deterministic = deterministic


def _sample_backward(ctx, grad_out):
    value, shapes, starts, ref, offsets, logits = ctx.saved_tensors
    gv, go, gl = _deform_sample_bwd_op(grad_out, value, shapes, starts, ref, offsets, logits, ctx.backend,
                                       ctx.deterministic)
    return gv, None, None, None, go, gl, None, None


torch.library.register_autograd("lora_kernels::deform_sample", _sample_backward, setup_context=_sample_setup_context)


def deform_sample(value: torch.Tensor, spatial_shapes: ShapesArg, level_start_index: Optional[torch.Tensor],
                  ref: torch.Tensor, offsets: torch.Tensor, logits: torch.Tensor, *, validate: bool = True,
                  deterministic: Optional[bool] = None) -> torch.Tensor:
    """VCE's sampling step with the softmax and the location arithmetic fused into the kernel.

    Semantics (:func:`lora_kernels.reference.deform_sample`): :func:`deform_pool` with
    ``sampling_locations[b, q, h, l, p] = ref[q] + offsets[b, q, h, l, p] / (W_l, H_l)`` and
    ``attention_weights[b, q, h] = softmax(logits[b, q, h])`` over its L * P entries (level-major), both formed
    in fp32 inside the kernel: no location or weight tensor is materialised, and a 16-bit value keeps
    fp32-accurate locations.

    Args:
        value, spatial_shapes, level_start_index, validate, deterministic: as :func:`deform_pool`.
        ref: [Q, 2] reference points (x, y) in [0, 1], float32 (or value's dtype); a constant here: a ref that
            requires grad is refused.
        offsets: [B, Q, H, L, P, 2] in pixels of each level, value's dtype or float32.
        logits: [B, Q, H, L * P] (or [B, Q, H, L, P]), offsets' dtype.

    Returns:
        [B, Q, H * D] in value's dtype; differentiable in value, offsets and logits.

    Backends: as :func:`deform_pool`: the reference on CPU tensors and fp64; on CUDA tensors the compiled fused
    kernels (csrc/kernels/deform_pool.cuh ``deform_sample_*_kernel``) where ``lora-bench tune`` verified
    ``"deform_cuda"`` (or ``LORA_KERNELS_BACKEND=cuda``), else Triton.

    Raises:
        TypeError / ValueError as :func:`deform_pool`, naming the argument; RuntimeError for a forced backend
        that cannot run.
    """
    shapes, pairs, host_starts = _check_value_points(value, "offsets", offsets, spatial_shapes)
    B, S, H, D = value.shape
    dev = value.device
    L = shapes.shape[0]
    Q, P = offsets.shape[1], offsets.shape[4]
    check_tensor("ref", ref, shape=(Q, 2), dtypes=(torch.float32, value.dtype), device=dev)
    check(not ref.requires_grad, "ref", "a tensor that does not require grad (reference points are constants)",
          "ref.requires_grad=True")
    check_tensor("logits", logits, dtypes=(offsets.dtype,), device=dev)
    check(tuple(logits.shape) in ((B, Q, H, L * P), (B, Q, H, L, P)), "logits",
          f"shape {(B, Q, H, L * P)} or {(B, Q, H, L, P)}", tuple(logits.shape))
    level_start_index = _level_starts(shapes, pairs, host_starts, level_start_index, S, validate)
    backend = _select(dev, value.dtype, fused=True)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if deterministic and backend == "cuda" and backends.triton_can_run(dev.type) is not None:
        raise RuntimeError("deform_sample(deterministic=True) on the cuda backend needs Triton for grad value: "
                           f"{backends.triton_can_run(dev.type)}")
    return _deform_sample_op(value.contiguous(), shapes, level_start_index.contiguous(), ref.contiguous(),
                             offsets.contiguous(), logits.contiguous(), backend, bool(deterministic))


# ---- GPU verification (``lora-bench tune``: gates the compiled kernels, name "deform_cuda") ----------------------
def _verify_inputs(B, Q, H, D, shapes, P, dtype, loc_dtype, gen):
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, H, D, generator=gen)
    loc = torch.rand(B, Q, H, len(shapes), P, 2, generator=gen) * 1.4 - 0.2
    loc.view(-1, 2)[::7] = torch.tensor([0.0, 1.0])  # exact borders
    loc.view(-1, 2)[3::11] = torch.tensor([float("nan"), 0.5])  # non-finite: no contribution
    attn = torch.rand(B, Q, H, len(shapes), P, generator=gen)
    return value.to(dtype), loc.to(loc_dtype), attn.to(loc_dtype)


def verify_cuda(device: torch.device, ext=None) -> Optional[str]:
    """The compiled deform_pool kernels and the fused deform_sample kernels (forward and every gradient) against
    the fp64 reference on ``device``: None when every case passes, else why not. Cases: the D = 32/64/128 fast
    paths and the generic path (odd D, 1x1 levels, one point), each dtype (fused: offsets / logits in value's
    dtype or fp32), borders and non-finite locations. Location (offset) gradients are compared only off the pixel
    grid lines (one-sided derivatives there)."""
    if _cuda_ops() is None:
        return "the extension has no deform_pool kernel"
    gen = torch.Generator().manual_seed(2)
    cases = ((2, 37, 4, 64, ((24, 24), (12, 12), (6, 6), (1, 1)), 4), (1, 9, 2, 32, ((5, 7),), 3),
             (1, 5, 3, 128, ((3, 3), (2, 5)), 2), (2, 7, 2, 5, ((4, 3), (1, 1)), 1), (1, 3, 1, 40, ((6, 2),), 2))
    for B, Q, H, D, shapes, P in cases:
        for dtype, loc_dtype in ((torch.float32, torch.float32), (torch.float16, torch.float16),
                                 (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)):
            value, loc, attn = _verify_inputs(B, Q, H, D, shapes, P, dtype, loc_dtype, gen)
            g = torch.randn(B, Q, H * D, generator=gen).to(dtype)
            ins = [t.to(device).requires_grad_(True) for t in (value, loc, attn)]
            with backends.use_backend("cuda"):
                out = deform_pool(ins[0], shapes, None, ins[1], ins[2])
            out.backward(g.to(device))
            ref_in = [t.double().requires_grad_(True) for t in (value, loc, attn)]
            ref = reference.deform_pool(ref_in[0], shapes, None, ref_in[1], ref_in[2])
            ref.backward(g.double())
            tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
            size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64)
            pix = loc.double() * size[None, None, None, :, None, :] - 0.5
            smooth = ((pix - pix.round()).abs() > 1e-2) & torch.isfinite(pix)
            for name, got, want, mask in (("out", out, ref, None), ("grad value", ins[0].grad, ref_in[0].grad, None),
                                          ("grad locations", ins[1].grad, ref_in[1].grad, smooth),
                                          ("grad weights", ins[2].grad, ref_in[2].grad, None)):
                got = got.detach().double().cpu()
                if mask is not None:
                    got, want = got[mask], want[mask]
                scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
                err = float((got - want).abs().max()) if want.numel() else 0.0
                if not (err <= tol * scale) or not bool(torch.isfinite(got).all()):
                    return (f"{name}: max abs err {err:.3g} > {tol * scale:.3g} ({dtype}, locations {loc_dtype}, "
                            f"D={D}, shapes={shapes})")
            why = _verify_sample_case(device, B, Q, H, D, shapes, P, dtype, loc_dtype, tol, gen)
            if why is not None:
                return why
    torch.cuda.synchronize(device)
    return None


def _verify_sample_case(device, B, Q, H, D, shapes, P, dtype, off_dtype, tol, gen) -> Optional[str]:
    """The compiled fused deform_sample kernels (forward, grad value / offsets / logits) on one case vs fp64."""
    if _cuda_ops(fused=True) is None:
        return "the extension has no deform_sample kernel"
    L = len(shapes)
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, H, D, generator=gen).to(dtype)
    ref = torch.rand(Q, 2, generator=gen)
    off = (torch.randn(B, Q, H, L, P, 2, generator=gen) * 2).to(off_dtype)
    logits = (torch.randn(B, Q, H, L * P, generator=gen) * 2).to(off_dtype)
    g = torch.randn(B, Q, H * D, generator=gen).to(dtype)
    ins = [t.to(device).requires_grad_(True) for t in (value, off, logits)]
    with backends.use_backend("cuda"):
        out = deform_sample(ins[0], shapes, None, ref.to(device), ins[1], ins[2])
    out.backward(g.to(device))
    ref_in = [t.double().requires_grad_(True) for t in (value, off, logits)]
    want = reference.deform_sample(ref_in[0], shapes, None, ref.double(), ref_in[1], ref_in[2])
    want.backward(g.double())
    wh = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64).view(1, 1, 1, L, 1, 2)
    pix = (ref.double().view(1, Q, 1, 1, 1, 2) + off.double() / wh) * wh - 0.5
    smooth = (pix - pix.round()).abs() > 1e-2
    for name, got, exp, mask in (("sample out", out, want, None), ("sample grad value", ins[0].grad, ref_in[0].grad,
                                                                    None),
                                 ("sample grad offsets", ins[1].grad, ref_in[1].grad, smooth),
                                 ("sample grad logits", ins[2].grad, ref_in[2].grad, None)):
        got = got.detach().double().cpu()
        exp = exp.detach()
        if mask is not None:
            got, exp = got[mask], exp[mask]
        scale = max(1.0, float(exp.abs().max())) if exp.numel() else 1.0
        err = float((got - exp).abs().max()) if exp.numel() else 0.0
        if not (err <= tol * scale) or not bool(torch.isfinite(got).all()):
            return f"{name}: max abs err {err:.3g} > {tol * scale:.3g} ({dtype}, offsets {off_dtype}, D={D})"
    return None
