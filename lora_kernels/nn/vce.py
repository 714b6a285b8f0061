"""VisualCueEnhancement: the VCE block of "Visual Cue Enhancement and Dual Low-Rank Adaptation" (arXiv
2411.12787, official code pengkun-jiao/FHTC, ``VCE_Module`` + ``MMProjector``), built on
:func:`lora_kernels.ops.deform.deform_sample` (deform_pool with the softmax and the location arithmetic fused).

The official module is Deformable-DETR's ``MSDeformAttn`` used as a cross-attention from one vision layer (the
anchor) to several vision layers; see :class:`VisualCueEnhancement` for the maths and docs/vce-module.md for the
parameter-name mapping and the quirks of the official code that are reproduced here.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._validation import check_int, check_real
from ..ops.deform import deform_sample
from ..profiling import nvtx_range

__all__ = ["VisualCueEnhancement", "CLIP_VIT_L14_336_LAYERS"]

# The official config (config/config.yaml, mm_vision_select_layer): CLIP hidden states -2, -8, -14, -20, stacked in
# this order; the anchor (query) is the LAST level, i.e. layer -20.
CLIP_VIT_L14_336_LAYERS: Tuple[int, ...] = (-2, -8, -14, -20)

Features = Union[torch.Tensor, Sequence[torch.Tensor]]
Shapes = Sequence[Tuple[int, int]]


class _DeformAttnProjections(nn.Module):
    """The four projections of Deformable-DETR's ``MSDeformAttn``, under its attribute names (so the official
    ``cross_attn.*`` keys load). Holds parameters only: the sampling itself is :func:`deform_sample`."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int, **factory):
        super().__init__()
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2, **factory)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points, **factory)
        self.value_proj = nn.Linear(d_model, d_model, **factory)
        self.output_proj = nn.Linear(d_model, d_model, **factory)


class VisualCueEnhancement(nn.Module):
    """Multi-level deformable pooling of vision features onto the anchor level's patches, plus a residual.

    Semantics (levels ``l = 0..L-1`` of grids ``H_l x W_l``, anchor level ``a = query_level`` with
    ``Q = H_a * W_a`` patches, heads ``h`` of ``D = C / n_heads`` channels, points ``p``):

        q      = query_norm(f_a)                                          [B, Q, C]
        value  = value_proj(feat_norm(concat_l f_l))  as [B, S, heads, D]   (S = sum_l H_l W_l)
        off    = sampling_offsets(q)   as [B, Q, heads, L, P, 2]          (x, y), in patches of level l
        w      = softmax over (l, p) of attention_weights(q) as [B, Q, heads, L * P]
        loc    = ref_q + off / (W_l, H_l)                                 ref_q = patch centre of q in [0, 1]^2
        pooled = deform_pool(value, shapes, starts, loc, w)               [B, Q, C] (bilinear, zero padding,
                                                                          grid_sample(align_corners=False))
        x      = f_a + output_proj(pooled)                                (residual onto the UN-normalised anchor)
        out    = projector(x) if projector_dim else x                     (Linear, GELU, Linear)

    ``ref_q = ((j + 0.5) / W_a, (i + 0.5) / H_a)`` for patch ``(i, j)`` in row-major order: the same normalised
    point on every level, so levels of other grid sizes are sampled at the matching image position.

    Quirks of the official code, reproduced (docs/vce-module.md):

    * The anchor is the last level, i.e. CLIP layer -20 (the shallowest of -2/-8/-14/-20), not the deepest.
    * ``norm`` (a third LayerNorm) is computed and its result discarded: the output is ``f_a + attn`` without a
      final norm. Here ``norm`` is kept as a parameter (so checkpoints load strictly) and is not computed;
      ``apply_final_norm=True`` returns ``norm(x)`` instead, which the official code does not do.
    * No positional or level embedding is added to the query or the values; LayerNorm eps is 1e-6.

    Args:
        d_model: channels C of every level (1024 for CLIP ViT-L/14).
        n_levels: number of levels L (4).
        n_heads: heads; must divide ``d_model`` (16, so D = 64).
        n_points: sampling points per head and level (4).
        query_level: index into the levels of the anchor (default -1: the last level, as in the official code).
        projector_dim: output width of the 2-layer GELU MLP projector (the official ``mlp2x_gelu``
            ``mm_projector_llava``); None for no projector (forward returns ``x`` of width C).
        spatial_shapes: default ``(H_l, W_l)`` per level, used when forward gets none; None: every level is
            square with ``H_l = W_l = sqrt(N_l)`` (the official rule; 24 x 24 for 576 CLIP-336 patches).
        eps: LayerNorm epsilon (1e-6 as in the official code).
        apply_final_norm: return ``norm(x)`` (see the quirks); False reproduces the official output.

    The defaults are the official 4-level CLIP ViT-L/14-336 configuration: layers ``CLIP_VIT_L14_336_LAYERS`` =
    (-2, -8, -14, -20), 24 x 24 patches, C = 1024, 16 heads, 4 points, anchor = layer -20.
    Initialisation is the official one (Deformable-DETR's: zero offset weights, offset biases on a ring of
    ``n_heads`` directions scaled by point index, zero attention weights, Xavier value/output projections).

    Raises:
        ValueError from the constructor for a non-positive size, ``n_heads`` not dividing ``d_model``,
        ``query_level`` out of range, an ``eps`` that is not a finite real > 0, or ``spatial_shapes`` of the wrong
        length or with a non-positive size (TypeError for entries that are not integer pairs, or an ``eps`` that is
        not a real number); from forward see :meth:`forward`.
    """

    def __init__(
        self,
        d_model: int = 1024,
        n_levels: int = 4,
        n_heads: int = 16,
        n_points: int = 4,
        *,
        query_level: int = -1,
        projector_dim: Optional[int] = None,
        spatial_shapes: Optional[Shapes] = None,
        eps: float = 1e-6,
        apply_final_norm: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, v in (("d_model", d_model), ("n_levels", n_levels), ("n_heads", n_heads), ("n_points", n_points)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if d_model % n_heads:
            raise ValueError(f"n_heads: expected a divisor of d_model={d_model}, got {n_heads}")
        if not isinstance(query_level, int) or isinstance(query_level, bool) or not -n_levels <= query_level < n_levels:
            raise ValueError(f"query_level: expected an int in [{-n_levels}, {n_levels}), got {query_level!r}")
        if projector_dim is not None and (not isinstance(projector_dim, int) or isinstance(projector_dim, bool)
                                          or projector_dim <= 0):
            raise ValueError(f"projector_dim: expected None or a positive int, got {projector_dim!r}")
        eps = check_real("eps", eps, lo=0.0, lo_open=True)
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.query_level = query_level % n_levels
        self.apply_final_norm = bool(apply_final_norm)
        self.spatial_shapes: Optional[Tuple[Tuple[int, int], ...]] = None
        if spatial_shapes is not None:
            self.spatial_shapes = _check_shapes(spatial_shapes, n_levels)
        kw = {"device": device, "dtype": dtype}
        self.cross_attn = _DeformAttnProjections(d_model, n_levels, n_heads, n_points, **kw)
        self.query_norm = nn.LayerNorm(d_model, eps=eps, **kw)
        self.feat_norm = nn.LayerNorm(d_model, eps=eps, **kw)
        self.norm = nn.LayerNorm(d_model, eps=eps, **kw)
        self.projector: Optional[nn.Sequential] = None
        if projector_dim is not None:
            self.projector = nn.Sequential(nn.Linear(d_model, projector_dim, **kw), nn.GELU(),
                                           nn.Linear(projector_dim, projector_dim, **kw))
        # (shapes, query level, device) -> (spatial_shapes int64 [L, 2], level_start_index int64 [L], ref points
        # [Q, 2] fp32 (the official code's fp32 points)): built once per grid, so forward allocates no metadata per
        # call after the first with that grid.
        self._meta: Dict[tuple, Tuple[torch.Tensor, ...]] = {}
        self.reset_parameters()

    # ---- parameters -------------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official initialisation (VCE_Module's Xavier pass is overwritten by MSDeformAttn's reset)."""
        ca = self.cross_attn
        nn.init.zeros_(ca.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        ca.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(ca.attention_weights.weight)
        nn.init.zeros_(ca.attention_weights.bias)
        for lin in (ca.value_proj, ca.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        for ln in (self.query_norm, self.feat_norm, self.norm):
            ln.reset_parameters()
        if self.projector is not None:
            for m in self.projector:
                if isinstance(m, nn.Linear):
                    m.reset_parameters()

    def load_official_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
        """Load weights saved by the official code.

        Accepts any of: a ``VCE_Module`` state dict (keys ``cross_attn.*``, ``query_norm.*``, ``feat_norm.*``,
        ``norm.*``: these are this module's own names, so plain ``load_state_dict`` works too), optionally with
        ``mm_projector_llava.*`` keys; an ``MMProjector`` state dict (``VCE_module.*`` and
        ``mm_projector_llava.{0,2}.*``); or a whole LLaVA checkpoint
        (``model.mm_projector.VCE_module.*`` ...; keys outside the projector are ignored). ``mm_projector_llava``
        maps to :attr:`projector` (the ``mlp2x_gelu`` type only).

        Returns:
            what :meth:`torch.nn.Module.load_state_dict` returns (missing and unexpected keys).

        Raises:
            TypeError for a non-mapping; RuntimeError (from ``load_state_dict``) for missing/unexpected keys or
            shape mismatches under ``strict``, e.g. projector keys when the module has no projector.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict: expected a mapping of names to tensors, got {type(state_dict).__name__}")
        # With VCE_module.* keys present this is a wrapper's (or a whole model's) dict: other keys are not ours.
        prefixed = any("VCE_module." in k for k in state_dict)
        mapped = {}
        for k, v in state_dict.items():
            if "VCE_module." in k:
                mapped[k.split("VCE_module.", 1)[1]] = v
            elif "mm_projector_llava." in k:
                mapped["projector." + k.split("mm_projector_llava.", 1)[1]] = v
            elif not prefixed:
                mapped[k] = v
        return self.load_state_dict(mapped, strict=strict)

    @staticmethod
    def select_features(hidden_states: Sequence[torch.Tensor], layers: Sequence[int] = CLIP_VIT_L14_336_LAYERS,
                        drop_cls: bool = True) -> List[torch.Tensor]:
        """The official feature selection: ``hidden_states[i][:, 1:]`` (patch tokens) for each ``i`` in ``layers``,
        in that order (so the anchor, the last level, is ``layers[-1]`` = -20 by default). ``hidden_states`` is
        a vision tower's per-layer output, e.g. ``CLIPVisionModel(..., output_hidden_states=True).hidden_states``.
        """
        return [hidden_states[i][:, 1:] if drop_cls else hidden_states[i] for i in layers]

    # ---- forward ----------------------------------------------------------------------------------------

    def forward(self, features: Features, spatial_shapes: Optional[Shapes] = None) -> torch.Tensor:
        """Pool ``features`` onto the anchor level's patches.

        Args:
            features: ``n_levels`` tensors [B, N_l, C] (a list or tuple), or one tensor [L, B, N, C] (the official
                stacked layout, all levels of one size). Same dtype and device for all; C = ``d_model``.
            spatial_shapes: ``(H_l, W_l)`` per level with ``H_l * W_l = N_l``; default the constructor's, else
                square levels.

        Returns:
            [B, Q, C] (``x``), or [B, Q, projector_dim] with a projector; Q = patches of the anchor level.

        Raises:
            TypeError: features not a tensor or a sequence of tensors, or dtypes that differ between levels.
            ValueError: the wrong number of levels, ndim, batch or channel size, levels on different devices, a
                level with no token, a level not square when no shapes are given, or ``spatial_shapes`` not
                matching the token counts (the message names the level and both numbers).
        """
        levels = self._check_features(features)
        shapes = self._resolve_shapes(levels, spatial_shapes)
        with nvtx_range("lora_kernels.vce"):
            B = levels[0].shape[0]
            H, L, P, C = self.n_heads, self.n_levels, self.n_points, self.d_model
            sp, starts, ref = self._metadata(shapes, levels[0].device)
            query = levels[self.query_level]
            Q = query.shape[1]
            # LayerNorm is per token: normalising the concatenation is normalising each level.
            value = self.cross_attn.value_proj(self.feat_norm(torch.cat(levels, 1))).view(B, -1, H, C // H)
            q = self.query_norm(query)
            offsets = self.cross_attn.sampling_offsets(q).view(B, Q, H, L, P, 2)
            logits = self.cross_attn.attention_weights(q).view(B, Q, H, L * P)
            pooled = _sample(value, sp, starts, ref, offsets, logits)
            x = query + self.cross_attn.output_proj(pooled)
            if self.apply_final_norm:
                x = self.norm(x)
            return self.projector(x) if self.projector is not None else x

    def _check_features(self, features: Features) -> List[torch.Tensor]:
        if isinstance(features, torch.Tensor):
            if features.ndim != 4:
                raise ValueError(f"features: expected a [L, B, N, C] tensor or a sequence of L [B, N, C] tensors, "
                                 f"got a tensor of shape {tuple(features.shape)}")
            levels = list(features.unbind(0))
        elif isinstance(features, (list, tuple)):
            levels = list(features)
            for i, f in enumerate(levels):
                if not isinstance(f, torch.Tensor):
                    raise TypeError(f"features[{i}]: expected a torch.Tensor, got {type(f).__name__}")
        else:
            raise TypeError(f"features: expected a tensor or a list/tuple of tensors, got {type(features).__name__}")
        if len(levels) != self.n_levels:
            raise ValueError(f"features: expected {self.n_levels} levels (n_levels), got {len(levels)}")
        f0 = levels[0]
        for i, f in enumerate(levels):
            if f.ndim != 3:
                raise ValueError(f"features[{i}]: expected 3 dims [B, N, C], got shape {tuple(f.shape)}")
            if f.shape[0] != f0.shape[0] or f.shape[2] != self.d_model:
                raise ValueError(f"features[{i}]: expected shape ({f0.shape[0]}, N, {self.d_model}) (batch of "
                                 f"features[0], d_model), got {tuple(f.shape)}")
            if f.dtype != f0.dtype:
                raise TypeError(f"features[{i}]: expected dtype {f0.dtype} (that of features[0]), got {f.dtype}")
            if f.device != f0.device:
                raise ValueError(f"features[{i}]: expected device {f0.device} (that of features[0]), got {f.device}")
            if f.shape[1] == 0:
                raise ValueError(f"features[{i}]: expected at least one token, got shape {tuple(f.shape)}")
        return levels

    def _resolve_shapes(self, levels: List[torch.Tensor], spatial_shapes: Optional[Shapes]):
        if spatial_shapes is not None:
            shapes = _check_shapes(spatial_shapes, self.n_levels)
        elif self.spatial_shapes is not None:
            shapes = self.spatial_shapes
        else:
            shapes = []
            for i, f in enumerate(levels):
                e = math.isqrt(f.shape[1])
                if e * e != f.shape[1]:
                    raise ValueError(f"features[{i}]: expected a square number of tokens when spatial_shapes is not "
                                     f"given, got N={f.shape[1]}; pass spatial_shapes=[(H, W), ...]")
                shapes.append((e, e))
            return tuple(shapes)
        for i, (f, (h, w)) in enumerate(zip(levels, shapes)):
            if h * w != f.shape[1]:
                raise ValueError(f"spatial_shapes[{i}]: expected H*W == features[{i}].shape[1] = {f.shape[1]}, "
                                 f"got ({h}, {w}) -> {h * w}")
        return shapes

    def _metadata(self, shapes, device):
        key = (shapes, self.query_level, device)
        meta = self._meta.get(key)
        if meta is None:
            sp = torch.tensor(shapes, dtype=torch.long)
            starts = torch.cat([sp.new_zeros(1), (sp[:, 0] * sp[:, 1]).cumsum(0)[:-1]])
            hq, wq = shapes[self.query_level]
            ys = (torch.arange(hq, dtype=torch.float32) + 0.5) / hq
            xs = (torch.arange(wq, dtype=torch.float32) + 0.5) / wq
            ref = torch.stack([xs.repeat(hq), ys.repeat_interleave(wq)], -1)  # [Q, 2] (x, y), row-major
            meta = tuple(t.to(device) for t in (sp, starts, ref))
            self._meta[key] = meta
        return meta

    def _apply(self, fn, *args, **kwargs):
        self._meta.clear()  # cached metadata lives on the old device
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, n_points={self.n_points}, "
                f"query_level={self.query_level}, projector={'none' if self.projector is None else 'mlp2x_gelu'}, "
                f"apply_final_norm={self.apply_final_norm}")


def _check_shapes(spatial_shapes, n_levels: int) -> Tuple[Tuple[int, int], ...]:
    # every entry an integer (int, numpy or 0-dim integer tensor): 2.5 and 3.0 alike are refused, never truncated
    try:
        pairs = [tuple(hw) for hw in spatial_shapes]
    except TypeError:
        raise TypeError(f"spatial_shapes: expected a sequence of (H, W) int pairs, got {spatial_shapes!r}") from None
    if not all(len(p) == 2 for p in pairs):
        raise TypeError(f"spatial_shapes: expected (H, W) int pairs, got {spatial_shapes!r}")
    shapes = tuple((check_int(f"spatial_shapes[{i}][0]", h), check_int(f"spatial_shapes[{i}][1]", w))
                   for i, (h, w) in enumerate(pairs))
    if len(shapes) != n_levels:
        raise ValueError(f"spatial_shapes: expected {n_levels} (H, W) pairs (n_levels), got {len(shapes)}")
    for i, (h, w) in enumerate(shapes):
        if h <= 0 or w <= 0:
            raise ValueError(f"spatial_shapes[{i}]: expected positive (H, W), got ({h}, {w})")
    return shapes


# ---- the sampling seam ----------------------------------------------------------------------------------


def _sample(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, ref: torch.Tensor,
            offsets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The single call site of the sampling op: :func:`deform_sample`, which forms the softmax over (levels x points)
    and ``loc = ref + offset / (W_l, H_l)`` inside the kernel (fp32; fp64 for fp64 inputs) and samples.
    ``value`` [B, S, H, D]; ``ref`` [Q, 2] fp32; ``offsets`` [B, Q, H, L, P, 2] (patches of each level);
    ``logits`` [B, Q, H, L*P]. Returns [B, Q, H*D] in value's dtype.

    On the GPU backends (Triton, CUDA) the forward materialises no location or weight tensor (the reference
    backend and the deterministic backward do form them), and locations are never rounded to a 16-bit value
    dtype: the kernel converts the offsets (exactly) to fp32 and forms the location in fp32, as the official code
    does.
    Offsets / logits of another dtype than value (e.g. fp32 from an autocast region) are passed as fp32.
    """
    if offsets.dtype not in (value.dtype, torch.float32):
        offsets = offsets.float()
    if logits.dtype != offsets.dtype:
        logits = logits.to(offsets.dtype)
    # The metadata was built from the validated shapes (S = sum H_l W_l, starts = their cumsum): skipping the op's
    # value checks keeps the call free of host syncs.
    return deform_sample(value, spatial_shapes, level_start_index, ref, offsets, logits, validate=False)
