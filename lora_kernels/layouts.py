"""Every device-side buffer layout, described once (issue 16).

Kernels in three languages read the same buffers: the batch metadata (``meta``, written by the CUDA or torch
builder, read by the Triton and CUDA SGMV kernels), the batch's work plan (``plan``), a weights object's slice
table (``slice_info``) and the merge job table. Each layout is described here, once, as an ordered list of
fields whose lengths are expressions over the layout's capacities; everything else is derived from it:

* Python: :class:`~lora_kernels.batch.MetaLayout`, :class:`~lora_kernels.plan.PlanLayout`, the merge tables'
  column constants and the Triton kernels' offsets read :data:`META`, :data:`PLAN`, :data:`MERGE_JOB`,
  :data:`SLICE_INFO` (through :meth:`Layout.offsets_fn` / :meth:`Layout.columns`);
* C++: ``csrc/kernels/layouts.h`` is generated from this module (``python -m lora_kernels.gen_layouts`` writes it,
  ``--check`` fails when the checked-in copy is stale; ``tests/test_layouts.py`` runs both and compiles the header
  to compare its offsets with these). CUDA kernels include it instead of spelling offsets out.

To change a layout, edit its description below and regenerate the header: the builders, kernels, plan and tests
follow. Semantics of each field: the ``doc`` strings below, and the modules that fill them
(:mod:`lora_kernels.batch`, :mod:`lora_kernels.plan`, :mod:`lora_kernels.ops.merge.tables`).

Length expressions use the layout's parameters, integer literals, ``+``, ``-``, ``*``, parentheses and
``fdiv(a, b)`` (floor division of non-negative values), so that each is valid Python and valid C++.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Tuple

__all__ = ["Field", "Layout", "META", "PLAN", "PLAN_BLOCK_M", "PLAN_FAMILY", "DECODE_COUNTERS", "FUSED_COUNTERS",
           "MERGE_JOB", "SLICE_INFO", "LAYOUTS", "HELPERS", "HEADER", "function", "offsets_class", "render_header"]


def fdiv(a: int, b: int) -> int:
    """Floor division of non-negative integers (C++ ``/`` agrees on those)."""
    return a // b


#: Functions the length expressions may call: name -> (parameters, body). The body is itself an expression of the
#: same language (``fdiv`` aside, which is primitive), emitted into the C++ header and compiled for Python.
HELPERS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    # Upper bound on the tiles of height bm of any batch of capacity max_tokens with at most max_active active
    # adapters, the virtual segment of the -1 tokens included (each segment wastes at most bm - 1 rows).
    "plan_n_max": (("max_tokens", "max_active", "bm"), "fdiv(max_tokens + (max_active + 1) * (bm - 1), bm)"),
}
_ENV: Dict[str, Callable] = {"fdiv": fdiv}
for _name, (_args, _body) in HELPERS.items():
    _ENV[_name] = eval(f"lambda {', '.join(_args)}: {_body}", {"__builtins__": {}, **_ENV})  # noqa: S307 (own text)


@dataclass(frozen=True)
class Field:
    """One field of a layout: ``length`` entries (an expression over the layout's parameters)."""

    name: str
    length: str = "1"
    doc: str = ""


@dataclass(frozen=True)
class Layout:
    """An ordered list of fields packed end to end in a buffer of ``ctype`` elements.

    ``params`` are the capacities the lengths depend on (empty for a fixed-width record such as a table row, whose
    offsets are then plain column numbers). Offsets are the running sums of the lengths, in order.
    """

    name: str
    ctype: str
    params: Tuple[str, ...]
    fields: Tuple[Field, ...]
    doc: str = ""
    _exprs: Dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names) or "size" in names:
            raise ValueError(f"layout {self.name}: field names must be unique and not 'size', got {names}")
        # Offsets as linear combinations of the lengths' terms ({term: coefficient}, "" for the constant), so that
        # the generated text reads "2 * max_tokens + max_active" rather than a chain of sums.
        acc: Dict[str, int] = {}
        for f in self.fields:
            self._exprs[f.name] = _render(acc)
            term = "" if f.length.isdigit() else f.length
            acc[term] = acc.get(term, 0) + (int(f.length) if term == "" else 1)
        self._exprs["size"] = _render(acc)

    def offset_expr(self, name: str) -> str:
        """The offset of field ``name`` (or ``"size"``, the total length) as an expression of the parameters."""
        return self._exprs[name]

    def offsets(self, **caps: int) -> Dict[str, int]:
        """Every field's offset, and ``size``, for the given capacities."""
        env = {**_ENV, **caps}
        return {k: int(eval(e, {"__builtins__": {}}, env)) for k, e in self._exprs.items()}  # noqa: S307 (own text)

    def offsets_fn(self, name: str) -> Callable[..., int]:
        """A compiled function of the parameters (positional, in ``params`` order) returning ``name``'s offset."""
        src = f"lambda {', '.join(self.params)}: {self._exprs[name]}"
        return eval(src, {"__builtins__": {}, **_ENV})  # noqa: S307 (own text)

    def columns(self) -> Dict[str, int]:
        """Offsets of a fixed-width record (no parameters): column numbers, and ``size`` (the row width)."""
        if self.params:
            raise ValueError(f"layout {self.name} depends on {self.params}: use offsets()")
        return self.offsets()


def function(name: str) -> Callable[..., int]:
    """A helper of :data:`HELPERS` (or ``fdiv``) as a Python function, e.g. ``function("plan_n_max")(Tc, Ac, 16)``."""
    return _ENV[name]


def offsets_class(layout: Layout):
    """Class decorator: give a frozen dataclass whose fields are ``layout.params`` one read-only property per field
    of ``layout`` (its offset) and ``size``, computed by functions compiled from the description."""

    params = layout.params  # (a tuple of names: the properties close over nothing torch.compile cannot trace)

    def bind(cls):
        for name in [f.name for f in layout.fields] + ["size"]:
            fn = layout.offsets_fn(name)
            doc = next((f"offset of ``{f.name}`` [{f.length}]: {f.doc}" for f in layout.fields if f.name == name),
                       "total length")
            prop = property(lambda self, fn=fn: fn(*[getattr(self, p) for p in params]), doc=doc)
            setattr(cls, name, prop)
        cls.LAYOUT = layout
        return cls

    return bind


def _render(terms: Dict[str, int]) -> str:
    """``{term: coefficient}`` ("" = the constant) as an expression valid in Python and C++."""
    parts = [t if c == 1 else f"{c} * {t}" for t, c in terms.items() if t and c]
    if terms.get("", 0) or not parts:
        parts.append(str(terms.get("", 0)))
    return " + ".join(parts)


# ---- the batch metadata (int32 ``meta``; LoRABatch) ---------------------------------------------------------------
META = Layout(
    "MetaLayout", "int32_t", ("max_tokens", "max_active"),
    (
        Field("token_adapter", "max_tokens", "adapter id of each token as the kernels see it (-1: none)"),
        Field("sorted_token_ids", "max_tokens", "tokens sorted by adapter id (stable), -1 tokens last"),
        Field("active_adapters", "max_active", "adapter ids with tokens, ascending, -1 after num_active"),
        Field("seg_start", "max_active", "first position of each active adapter's run in sorted_token_ids"),
        Field("seg_len", "max_active", "length of that run, 0 after num_active"),
        Field("num_active", "1", "number of adapters with tokens"),
        Field("max_rank", "1", "max rank over active adapters and slices (0 when no ranks were given)"),
        Field("num_valid", "1", "tokens with an adapter"),
        Field("num_invalid", "1", "tokens whose id was out of range (served as -1)"),
    ),
    "Batch metadata of capacities (max_tokens, max_active); docs: lora_kernels/batch.py.",
)

# ---- the batch's work plan (int32 ``plan``; lora_kernels/plan.py) -------------------------------------------------
#: Tile heights a plan lists tiles for (the persistent kernel's BLOCK_M must be one of them): 16 for decode
#: (tl.dot's minimum), 64 and 128 for prefill (taller tiles re-read the adapters' A and B less often).
PLAN_BLOCK_M = (16, 64, 128)
#: Counters of the compiled decode kernel (64 tokens x 8 slices), zero between calls.
DECODE_COUNTERS = 64 * 8
#: Counters of the compiled fused LoRA linear: counter[0] (the shrink's) and one per tile of 8 output features, so
#: layers with out <= 32768 features; zero between calls.
FUSED_COUNTERS = 1 + 32768 // 8

#: One tile family of the plan (tile height BM, ``n_max`` tiles at most), relative to the family's offset.
PLAN_FAMILY = Layout(
    "PlanFamily", "int32_t", ("n_max",),
    (
        Field("n_real", "1", "tiles of real segments"),
        Field("n_all", "1", "n_real + the tiles of the virtual segment of the -1 tokens"),
        Field("pos0", "n_max", "first sorted position of each tile"),
        Field("len", "n_max", "rows of each tile (1..BM; 0 past n_all)"),
        Field("adapter", "n_max", "adapter of each tile (-1: virtual segment or past n_all)"),
    ),
    "One tile family of a plan; docs: lora_kernels/plan.py.",
)


def _n_max(bm: int) -> str:
    """Upper bound on a batch's tiles of height ``bm`` (virtual segment included), as an expression."""
    return f"plan_n_max(max_tokens, max_active, {bm})"


def _plan_fields() -> Tuple[Field, ...]:
    out = [Field("counters", _n_max(min(PLAN_BLOCK_M)), "per-tile counters of the persistent kernel"),
           Field("done", "1", "programs finished (the last one resets the counters)")]
    for bm in PLAN_BLOCK_M:
        n = _n_max(bm)
        for f in PLAN_FAMILY.fields:
            out.append(Field(f"f{bm}_{f.name}", f.length.replace("n_max", n), f"family BM={bm}: {f.doc}"))
    out.append(Field("decode_counters", str(DECODE_COUNTERS), "the compiled decode kernel's counters"))
    out.append(Field("fused_counters", str(FUSED_COUNTERS), "the compiled fused LoRA linear's counters"))
    return tuple(out)


PLAN = Layout("PlanLayout", "int32_t", ("max_tokens", "max_active"), _plan_fields(),
              "Work plan of a batch of capacities (max_tokens, max_active); docs: lora_kernels/plan.py.")

# ---- fixed-width rows ------------------------------------------------------------------------------------------
#: A row of the merge job table (int64; one job per (layer, slice); lora_kernels/ops/merge/tables.py builds it).
MERGE_JOB = Layout(
    "MergeJob", "int64_t", (),
    (
        Field("W", doc="address of W (element [0, 0])"),
        Field("code", doc="address of the job's layer's code buffer (0: none); a cached table holds an offset"),
        Field("row0", doc="the job's first row of W (the slice's col_s)"),
        Field("rows", doc="rows of the job (the slice's width)"),
        Field("in_features", doc="in_features (row length of W and of A)"),
        Field("A", doc="address of A[slice, 0, 0]"),
        Field("stride_A", doc="A's row stride (elements)"),
        Field("B", doc="address of B[0, row0]"),
        Field("stride_B", doc="B's row stride (elements)"),
        Field("term0", doc="the job's first term (row of the term table)"),
        Field("n_terms", doc="how many terms (adapters with rank > 0)"),
        Field("tile0", doc="the job's first tile (== tile_start[job])"),
        Field("layer", doc="the layer's index in the call (its escape counter)"),
        Field("col_tiles", doc="tiles across a row of W (ceil(in / tile_n))"),
        Field("packed", doc="1: codes packed 4 per byte in-kernel; 0: one code byte per weight (packed by the wrapper)"),
        Field("spare", doc="unused"),
    ),
    "A row of the merge job table (int64 [n_jobs, size]).",
)

#: A row of a weights object's ``slice_info`` (int64 [S, 2]).
SLICE_INFO = Layout(
    "SliceInfo", "int64_t", (),
    (Field("col", doc="first output column of the slice"), Field("out", doc="width of the slice")),
    "A row of LoRAWeights.slice_info.",
)

LAYOUTS: Tuple[Layout, ...] = (META, PLAN_FAMILY, PLAN, MERGE_JOB, SLICE_INFO)

# ---- the generated C++ header ------------------------------------------------------------------------------------
HEADER = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "kernels" / "layouts.h"


def _cxx_layout(lay: Layout) -> str:
    lines = [f"// {lay.doc}", f"struct {lay.name} {{"]
    if lay.params:
        lines += [f"  int64_t {p};" for p in lay.params]
        for f in lay.fields:
            lines.append(f"  LK_LAYOUT_FN int64_t {f.name}() const {{ return {lay.offset_expr(f.name)}; }}  "
                         f"// [{f.length}] {f.doc}")
        lines.append(f"  LK_LAYOUT_FN int64_t size() const {{ return {lay.offset_expr('size')}; }}")
    else:
        for f in lay.fields:
            lines.append(f"  static constexpr int {f.name} = {lay.offset_expr(f.name)};  // {f.doc}")
        lines.append(f"  static constexpr int size = {lay.offset_expr('size')};")
    lines.append("};")
    return "\n".join(lines)


def render_header() -> str:
    """The text of ``csrc/kernels/layouts.h`` (torch-free; CUDA or plain C++)."""
    parts = [
        "// GENERATED by `python -m lora_kernels.gen_layouts` from lora_kernels/layouts.py: do not edit by hand.",
        "// Offsets of every device-side buffer layout (issue 16); tests/test_layouts.py checks this file is current.",
        "#pragma once",
        "#include <cstdint>",
        "",
        "#if defined(__CUDACC__)",
        "#define LK_LAYOUT_FN __host__ __device__ constexpr",
        "#else",
        "#define LK_LAYOUT_FN constexpr",
        "#endif",
        "",
        "namespace lora_kernels {",
        "namespace layouts {",
        "",
        "// Floor division of non-negative values (the layouts' length expressions use it).",
        "LK_LAYOUT_FN int64_t fdiv(int64_t a, int64_t b) { return a / b; }",
        *[f"LK_LAYOUT_FN int64_t {n}({', '.join('int64_t ' + a for a in args)}) {{ return {body}; }}"
          for n, (args, body) in HELPERS.items()],
        "",
        f"constexpr int kPlanBlockM[{len(PLAN_BLOCK_M)}] = {{{', '.join(map(str, PLAN_BLOCK_M))}}};",
        f"constexpr int kDecodeCounters = {DECODE_COUNTERS};",
        f"constexpr int kFusedCounters = {FUSED_COUNTERS};",
        "",
    ]
    for lay in LAYOUTS:
        parts += [_cxx_layout(lay), ""]
    parts += ["}  // namespace layouts", "}  // namespace lora_kernels", ""]
    return "\n".join(parts)
