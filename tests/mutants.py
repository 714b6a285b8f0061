"""Deliberately wrong kernels ("mutants") and the pytest plugin that serves them: the evidence that the kernel
test modules can fail (issue 13). ``.ci/mutation_check.py`` runs each test module once per mutant of its op
family and requires a failing test every time.

Usage::

    LORA_KERNELS_MUTANT=sgmv.doubled@triton python -m pytest -q tests/test_triton_sgmv.py  # conftest loads it
    PYTHONPATH=tests LORA_KERNELS_MUTANT=sgmv.doubled python -m pytest -p mutants ...      # the same, explicitly
    python -c "import sys; sys.path.insert(0, 'tests'); import mutants; print(mutants.describe())"

What a mutant replaces, for the whole session: the entry points through which the tests reach one op family's
kernels, in one *scope* (the name's suffix):

* ``@triton``: the Triton launchers (``lora_kernels.triton.*``, also when a test calls them directly, and what
  the ops call on the Triton backend);
* ``@cpu``: the ops' dispatch to the PyTorch reference (the CPU path of ``lk.add_lora_`` and friends);
* no suffix: both.

The mutation check runs each scope separately, so that the tests of each path must catch it on their own.
What a mutant never touches: the executable spec the tests compare against (``lora_kernels.reference`` as the
tests import it): the ops modules' own binding of ``reference`` is replaced by a proxy (or by a mutated copy)
instead. Entries that serve both backends (the merge implementation, the mixed-mode dispatch) take a per-call
gate: only the calls of the requested scope are perturbed.

Two kinds, both installed by :func:`install` and undone by :meth:`Patcher.undo`:

* **wrappers** (:func:`_apply`): the real launcher, with its inputs or outputs perturbed: skipped (no-op), run
  twice (doubled delta), given offsets/ranks/scales with two adapters exchanged (one tenant served with
  another's rows), ranks - 1 (off-by-one rank), a batch whose ``-1`` tokens were given a real adapter (the
  dropped ``-1`` mask), or with one of its gradients zeroed or doubled. Robust to refactors of the kernels.
* **source mutants** (:func:`_source_mutant`): a copy of the kernel module (or of the reference module, for the
  CPU path) with one textual change, for bugs that live inside a kernel body (LayerNorm skipped, ReLU gate
  dropped, bounds mask dropped, a wrong bilinear corner weight). The copy is written to a temporary file and
  imported under the original package, so Triton JIT-compiles (or interprets) the mutated kernels. Every edit
  must match the source exactly as often as declared, so a refactor that moves the code makes the mutant fail
  loudly (:class:`MutantError`) instead of silently becoming the real kernel.

Only the outermost mutated call is perturbed (a thread-local depth): ``lk.add_lora_`` reaching the Triton
launcher through its mutated dispatch is perturbed once, not twice. Every perturbed call is counted; the count
is printed in pytest's summary and written to ``$LORA_KERNELS_MUTANT_REPORT`` (JSON) so that the mutation check
can tell a mutant that was caught from one that was never exercised.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import importlib.util
import inspect
import json
import os
import shutil
import sys
import tempfile
import threading
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

if not torch.cuda.is_available():  # as conftest.py: before anything imports a Triton kernel (also for -p mutants)
    os.environ.setdefault("TRITON_INTERPRET", "1")

ENV_NAME = "LORA_KERNELS_MUTANT"
ENV_REPORT = "LORA_KERNELS_MUTANT_REPORT"

__all__ = ["MUTANTS", "SCOPES", "Mutant", "MutantError", "Patcher", "calls", "describe", "get", "install", "parse"]


class MutantError(RuntimeError):
    """The mutant itself is broken (its target moved, an unknown name): never counts as "caught"."""


# ---- bookkeeping ------------------------------------------------------------------------------------------------
_local = threading.local()
_calls = {"n": 0}


def calls() -> int:
    """How many calls the installed mutant has perturbed so far."""
    return _calls["n"]


class Patcher:
    """setattr with undo (the harness test installs and removes mutants inside one process)."""

    def __init__(self) -> None:
        self._undo: List[Tuple[Any, str, Any]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        if not hasattr(obj, name):
            raise MutantError(f"{getattr(obj, '__name__', obj)!s} has no attribute {name!r}: the dispatch point "
                              "moved; update tests/mutants.py")
        self._undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def undo(self) -> None:
        while self._undo:
            obj, name, old = self._undo.pop()
            setattr(obj, name, old)


def _outermost(fn: Callable, perturbed: Callable) -> Callable:
    """``perturbed(*args, **kwargs)`` for the outermost call into any mutated entry point, ``fn`` inside it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if getattr(_local, "depth", 0):
            return fn(*args, **kwargs)
        _local.depth = 1
        try:
            return perturbed(*args, **kwargs)
        finally:
            _local.depth = 0

    return wrapper


# ---- entry points -----------------------------------------------------------------------------------------------
SCOPES = ("all", "triton", "cpu")


@dataclass(frozen=True)
class Entry:
    """A dispatch point: ``module.attr``, or ``attr`` of an ops module's ``reference`` binding (``via_reference``:
    the op's CPU path), what it produces (``out``: the in-place argument it writes, or ``"return"``) and its role
    (``fwd`` / ``bwd``: forward-only mutants leave the backward alone and vice versa). Its scope is ``triton``
    for a Triton launcher, ``cpu`` for the reference dispatch; an entry serving both backends (``gate``) is
    perturbed only on the calls of the requested scope (``gate(bound arguments)`` True on the CPU path)."""

    module: str
    attr: str
    out: str
    role: str = "fwd"
    via_reference: bool = False
    gate: Optional[Callable[[inspect.BoundArguments], bool]] = None

    @property
    def scope(self) -> str:
        if self.gate is not None:
            return "any"
        return "triton" if self.module.startswith("lora_kernels.triton") else "cpu"


def _merge_on_cpu(ba: inspect.BoundArguments) -> bool:
    return ba.arguments["backend"] == "reference"


def _sgmv_on_cpu(ba: inspect.BoundArguments) -> bool:
    from lora_kernels import backends

    return backends.select("sgmv", ba.arguments["y"].device.type) == "reference"


SGMV_ENTRIES = (
    Entry("lora_kernels.triton.sgmv", "shrink", "h"),
    Entry("lora_kernels.triton.sgmv", "expand_", "y"),
    Entry("lora_kernels.triton.sgmv", "add_lora_", "y"),
    Entry("lora_kernels.ops.sgmv", "shrink", "return", via_reference=True),
    Entry("lora_kernels.ops.sgmv", "expand_", "y", via_reference=True),
    Entry("lora_kernels.ops.sgmv", "add_lora_", "y", via_reference=True),
)
MIXED_ENTRIES = (  # where mixed mode is decided: the Triton launcher, and the ops' dispatch on the CPU path
    Entry("lora_kernels.triton.sgmv", "add_lora_", "y"),
    Entry("lora_kernels.ops.sgmv", "_add_lora_impl", "y", gate=_sgmv_on_cpu),
)
MERGE_ENTRIES = (Entry("lora_kernels.ops.merge.dispatch", "_merge_impl", "return", gate=_merge_on_cpu),)
UNMERGE_ENTRIES = (Entry("lora_kernels.ops.merge.dispatch", "_unmerge_impl", "Ws", "bwd", gate=_merge_on_cpu),)
DEFORM_ENTRIES = (
    Entry("lora_kernels.triton.deform", "deform_pool_fwd", "return"),
    Entry("lora_kernels.triton.deform", "deform_sample_fwd", "return"),
    Entry("lora_kernels.triton.deform", "deform_pool_bwd", "return", "bwd"),
    Entry("lora_kernels.triton.deform", "deform_sample_bwd", "return", "bwd"),
    Entry("lora_kernels.triton.deform", "deform_pool_grad_value_deterministic", "return", "bwd"),
    Entry("lora_kernels.ops.deform", "deform_pool", "return", via_reference=True),
    Entry("lora_kernels.ops.deform", "deform_sample", "return", via_reference=True),
    Entry("lora_kernels.ops.deform", "deform_pool_backward", "return", "bwd", via_reference=True),
    Entry("lora_kernels.ops.deform", "deform_sample_backward", "return", "bwd", via_reference=True),
)
DUAL_ENTRIES = (
    Entry("lora_kernels.triton.dual_lora", "dual_lora_", "y"),
    Entry("lora_kernels.triton.dual_lora", "dual_lora_backward", "return", "bwd"),
    Entry("lora_kernels.ops.dual_lora", "dual_lora_", "y", via_reference=True),
    Entry("lora_kernels.ops.dual_lora", "dual_lora_delta", "return", via_reference=True),
    Entry("lora_kernels.ops.dual_lora", "dual_lora_backward", "return", "bwd", via_reference=True),
)
BACKWARD_ENTRIES = (
    Entry("lora_kernels.triton.sgmv_backward", "lora_backward", "return", "bwd"),
    Entry("lora_kernels.ops.lora_linear", "lora_add_backward", "return", "bwd", via_reference=True),
)


def _reference_proxy(p: Patcher, ops_module: types.ModuleType, base: Optional[types.ModuleType] = None):
    """The ops module's private ``reference`` binding, replaced (once) by a module object holding the same
    functions (or ``base``'s, a source mutant of the reference), so that entries can be overridden there
    without touching ``lora_kernels.reference`` itself (the tests' spec)."""
    cur = ops_module.reference
    if getattr(cur, "__mutant_proxy__", False) and base is None:
        return cur
    src = base if base is not None else cur
    proxy = types.ModuleType(f"{src.__name__}[mutant proxy for {ops_module.__name__}]")
    proxy.__dict__.update({k: v for k, v in vars(src).items() if not k.startswith("__")})
    proxy.__mutant_proxy__ = True
    p.set(ops_module, "reference", proxy)
    return proxy


def _apply(p: Patcher, scope: str, entries: Sequence[Entry], perturb: Callable,
           roles: Sequence[str] = ("fwd", "bwd")) -> None:
    """Wrap every entry of ``roles`` and ``scope``: ``perturb(entry, call, ba)`` runs instead of the real call,
    where ``ba`` is the bound arguments (mutable) and ``call()`` runs the real function on them."""
    for e in entries:
        if e.role not in roles or (scope != "all" and e.scope not in (scope, "any")):
            continue
        mod = importlib.import_module(e.module)
        owner = _reference_proxy(p, mod) if e.via_reference else mod
        fn = getattr(owner, e.attr)
        sig = inspect.signature(fn)
        gate = None if (e.gate is None or scope == "all") else (
            e.gate if scope == "cpu" else (lambda ba, g=e.gate: not g(ba)))

        def perturbed(*args, _fn=fn, _sig=sig, _e=e, _gate=gate, **kwargs):
            ba = _sig.bind(*args, **kwargs)
            ba.apply_defaults()
            if _gate is not None and not _gate(ba):
                return _fn(*args, **kwargs)  # not this scope's call: the real thing
            _calls["n"] += 1
            return perturb(_e, lambda: _fn(*ba.args, **ba.kwargs), ba)

        p.set(owner, e.attr, _outermost(fn, perturbed))


# ---- the batch as the kernels see it ----------------------------------------------------------------------------
def _num_tokens(ba: inspect.BoundArguments) -> int:
    for name in ("x", "y", "dy"):
        t = ba.arguments.get(name)
        if isinstance(t, torch.Tensor):
            return t.shape[0]
    raise MutantError(f"no x / y / dy among {list(ba.arguments)}")


def _token_ids(ba: inspect.BoundArguments, T: int) -> torch.Tensor:
    if "token_adapter" in ba.arguments:
        return ba.arguments["token_adapter"][:T].to("cpu", torch.int64)
    return ba.arguments["meta"][:T].to("cpu", torch.int64)  # MetaLayout: token_adapter is the first field


def _rank_totals(ba: inspect.BoundArguments) -> torch.Tensor:
    r = ba.arguments["ranks"]
    return r.reshape(-1, r.shape[-1]).to("cpu", torch.int64).sum(0)


def _by_frequency(ids: torch.Tensor) -> List[int]:
    v = ids[ids >= 0]
    if v.numel() == 0:
        return []
    counts = torch.bincount(v)
    order = sorted(range(counts.numel()), key=lambda i: (-int(counts[i]), i))
    return [i for i in order if counts[i] > 0]


def _serve_unassigned(ba: inspect.BoundArguments) -> None:
    """The dropped ``-1`` mask: tokens without an adapter get the batch's most used adapter (or, in an all ``-1``
    batch, the slot of largest rank the batch may name), as a kernel that forgot the mask would serve them."""
    T = _num_tokens(ba)
    if T == 0:
        return
    ids = _token_ids(ba, T)
    if bool((ids >= 0).all()):
        return
    present = _by_frequency(ids)
    if present:
        fill = present[0]
    else:
        tot = _rank_totals(ba)
        limit = tot.numel()
        if "meta" in ba.arguments:  # ids the batch may hold: < max_active = min(max_adapters, max_tokens)
            from lora_kernels.batch import MetaLayout

            limit = min(limit, MetaLayout.from_meta(ba.arguments["meta"], ba.arguments["max_tokens"]).max_active)
        if limit <= 0 or int(tot[:limit].max()) == 0:
            return
        fill = int(tot[:limit].argmax())
    new_ids = torch.where(ids < 0, torch.full_like(ids, fill), ids).to(torch.int32)
    if "token_adapter" in ba.arguments:
        old = ba.arguments["token_adapter"]
        ba.arguments["token_adapter"] = new_ids.to(old.device, old.dtype)
        return
    from lora_kernels.batch import build_batch_torch_

    meta = ba.arguments["meta"]
    meta2 = meta.clone()
    N = ba.arguments["offsets"].shape[0]
    build_batch_torch_(meta2, new_ids.to(meta.device), ba.arguments["ranks"], ba.arguments["max_tokens"], N)
    ba.arguments["meta"] = meta2


def _swap_adapters(ba: inspect.BoundArguments) -> None:
    """One tenant served with another's rows: the two most used adapters of the batch (or the most used one and
    the loaded slot of largest rank) exchange offsets, ranks and scales."""
    T = _num_tokens(ba)
    N = ba.arguments["offsets"].shape[0]
    if T == 0 or N < 2:
        return
    present = _by_frequency(_token_ids(ba, T))
    if not present:
        return
    i = present[0]
    if len(present) > 1:
        j = present[1]
    else:
        tot = _rank_totals(ba)
        j = max((k for k in range(N) if k != i), key=lambda k: (int(tot[k]), -k))
    for name in ("offsets", "ranks", "ranks2", "scales"):
        t = ba.arguments.get(name)
        if isinstance(t, torch.Tensor):
            t2 = t.clone()
            t2[..., [i, j]] = t[..., [j, i]]
            ba.arguments[name] = t2


def _rank_minus_one(ba: inspect.BoundArguments) -> None:
    """Off-by-one rank: every adapter served with its first r - 1 rows (a dual adapter's T rows then start one
    row early)."""
    for name, step in (("ranks", 1), ("ranks2", 2)):
        t = ba.arguments.get(name)
        if isinstance(t, torch.Tensor):
            ba.arguments[name] = (t - step).clamp_min(0).to(t.dtype)


# ---- output perturbations ---------------------------------------------------------------------------------------
def _map(r: Any, f: Callable[[int, torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(r, torch.Tensor):
        return f(0, r)
    if isinstance(r, (tuple, list)):
        return type(r)(f(k, t) if isinstance(t, torch.Tensor) else t for k, t in enumerate(r))
    raise MutantError(f"unexpected result type {type(r).__name__}")


def _noop(e: Entry, call: Callable, ba: inspect.BoundArguments):
    """The kernel computes nothing: in-place outputs untouched (shrink's h all zero), returned outputs zero."""
    if e.out == "return":
        return _map(call(), lambda k, t: torch.zeros_like(t))
    if e.out == "h":
        call()
        ba.arguments["h"].zero_()
        return None
    return ba.arguments.get(e.out) if e.via_reference else None


def _doubled(e: Entry, call: Callable, ba: inspect.BoundArguments):
    """The delta applied twice (in-place ops run twice; shrink's h and returned outputs times 2)."""
    if e.out == "return":
        return _map(call(), lambda k, t: t * 2)
    r = call()
    if e.out == "h":
        ba.arguments["h"].mul_(2)
        return r
    return call()


def _scaled(which: Sequence[int], factor: float):
    """Returned gradient(s) number ``which`` (of a tuple, or the single tensor as 0) times ``factor``."""

    def perturb(e: Entry, call: Callable, ba: inspect.BoundArguments):
        return _map(call(), lambda k, t: t * factor if k in which else t)

    return perturb


def _with_args(transform: Callable[[inspect.BoundArguments], None]):
    def perturb(e: Entry, call: Callable, ba: inspect.BoundArguments):
        transform(ba)
        return call()

    return perturb


# ---- source mutants ---------------------------------------------------------------------------------------------
_TMP: List[str] = []


@atexit.register
def _cleanup() -> None:
    for d in _TMP:
        shutil.rmtree(d, ignore_errors=True)


def _source_mutant(modname: str, edits: Sequence[Tuple[str, str, int]]) -> types.ModuleType:
    """A copy of module ``modname`` with ``edits`` applied (each ``(old, new, count)``: ``old`` must occur exactly
    ``count`` times), imported from a temporary file as a sibling module (relative imports resolve as in the
    original). Raises :class:`MutantError` when an edit does not match."""
    mod = importlib.import_module(modname)
    with open(mod.__file__, encoding="utf-8") as f:
        src = f.read()
    for old, new, count in edits:
        n = src.count(old)
        if n != count:
            raise MutantError(f"{modname}: expected {count} occurrence(s) of {old!r}, found {n}: the kernel source "
                              "changed; update the edit in tests/mutants.py")
        src = src.replace(old, new)
    pkg, _, leaf = modname.rpartition(".")
    d = tempfile.mkdtemp(prefix="lk_mutant_")
    _TMP.append(d)
    path = os.path.join(d, f"_mutant_{leaf}.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(src)
    fullname = f"{pkg}._mutant_{leaf}_{len(_TMP)}"
    spec = importlib.util.spec_from_file_location(fullname, path)
    m = importlib.util.module_from_spec(spec)
    sys.modules[fullname] = m
    try:
        spec.loader.exec_module(m)
    except Exception as e:
        del sys.modules[fullname]
        raise MutantError(f"{modname}: the mutated copy does not import ({type(e).__name__}: {e})") from e
    return m


def _counted(f: Callable) -> Callable:
    @functools.wraps(f)
    def counted(*args, **kwargs):
        _calls["n"] += 1
        return f(*args, **kwargs)

    return counted


def _source(triton_module: str, triton_edits, ops_module: str, reference_edits) -> Callable[[Patcher, str], None]:
    """Installer of a source mutant: scope ``triton`` points the Triton module's public launchers at a mutated
    copy of it; scope ``cpu`` points the ops module's ``reference`` binding at a mutated copy of
    lora_kernels.reference (the spec the tests import stays the real one). Each replaced callable is counted."""

    def install_(p: Patcher, scope: str) -> None:
        if scope in ("all", "triton"):
            tmod = importlib.import_module(triton_module)
            tmut = _source_mutant(triton_module, triton_edits)
            for name in tmod.__all__:
                p.set(tmod, name, _outermost(getattr(tmod, name), _counted(getattr(tmut, name))))
        if scope in ("all", "cpu"):
            omod = importlib.import_module(ops_module)
            rmut = _source_mutant("lora_kernels.reference", reference_edits)
            proxy = _reference_proxy(p, omod, base=rmut)
            for name in importlib.import_module("lora_kernels.reference").__all__:
                setattr(proxy, name, _outermost(getattr(rmut, name), _counted(getattr(rmut, name))))

    return install_


# ---- the catalogue ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mutant:
    name: str
    family: str
    doc: str
    installer: Callable[[Patcher, str], None]  # (patcher, scope)
    scopes: Tuple[str, ...] = ("triton", "cpu")  # the paths it can perturb (Triton-only machinery: ("triton",))


def _starts_plus_one(ba: inspect.BoundArguments) -> None:
    """Every level's first value row one too far (level_start_index + 1)."""
    if "starts" in ba.arguments:
        ba.arguments["starts"] = ba.arguments["starts"] + 1
        return
    st = ba.arguments.get("level_start_index")
    if st is None:  # the reference computes the packed starts itself: compute them here first
        shapes = ba.arguments["spatial_shapes"]
        pairs = shapes.tolist() if isinstance(shapes, torch.Tensor) else [tuple(s) for s in shapes]
        acc, out = 0, []
        for h, w in pairs:
            out.append(acc)
            acc += int(h) * int(w)
        st = torch.tensor(out, dtype=torch.int64)
    ba.arguments["level_start_index"] = st + 1


def _merge_terms(transform: Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]):
    """Merge with (terms, coefs) transformed. New tensors, so the cached plan (keyed by the terms tensor's
    identity) is bypassed and the kernel really sees them; the record keeps the true terms, so the unmerge
    that follows is the real one."""

    def perturb(e: Entry, call: Callable, ba: inspect.BoundArguments):
        ba.arguments["terms"], ba.arguments["coefs"] = transform(ba.arguments["terms"].clone(),
                                                                 ba.arguments["coefs"].clone())
        return call()

    return perturb


def _merge_swap(terms: torch.Tensor, coefs: torch.Tensor):
    """Terms rows are (layer, slice, row0, rows, offset, rank): the first two adapters (distinct storage rows)
    of each (layer, slice) exchange offset and rank, each keeping its coefficient."""
    groups: Dict[Tuple[int, int], List[int]] = {}
    for k, row in enumerate(terms.tolist()):
        groups.setdefault((row[0], row[1]), []).append(k)
    t2 = terms.clone()
    for rows in groups.values():
        seen: Dict[Tuple[int, int], int] = {}
        for k in rows:
            seen.setdefault((int(terms[k, 4]), int(terms[k, 5])), k)
        if len(seen) >= 2:
            (ka, kb) = list(seen.values())[:2]
            t2[ka, 4:6], t2[kb, 4:6] = terms[kb, 4:6], terms[ka, 4:6]
    return t2, coefs


def _merge_rank_minus_one(terms: torch.Tensor, coefs: torch.Tensor):
    terms[:, 5] = (terms[:, 5] - 1).clamp_min(0)
    return terms, coefs


def _merge_twice(e: Entry, call: Callable, ba: inspect.BoundArguments):
    call()
    return call()


def _unmerge_one_ulp(e: Entry, call: Callable, ba: inspect.BoundArguments):
    """Unmerge, then one weight of the first layer one unit in the last place off (its lowest bit flipped)."""
    call()
    W = ba.arguments["Ws"][0]
    if W.numel():
        ib = {2: torch.int16, 4: torch.int32, 8: torch.int64}[W.element_size()]
        flat = W.view(-1).view(ib)
        flat[W.numel() // 2] ^= 1
    return None


def _unmerge_inexact(e: Entry, call: Callable, ba: inspect.BoundArguments):
    """The record's codes ignored: the approximate ``rnd(W' - delta)`` restore (a fraction of weights 1 ulp off)."""
    ba.arguments["codes"] = [c.new_empty(0) for c in ba.arguments["codes"]]
    return call()


def _ignore_merged(ba: inspect.BoundArguments) -> None:
    """Mixed mode served as normal mode: the adapter merged into the base weight is not subtracted."""
    if "merged" in ba.arguments:
        ba.arguments["merged"] = -1


def _wrapper(entries, perturb, roles=("fwd", "bwd")) -> Callable[[Patcher, str], None]:
    return lambda p, scope: _apply(p, scope, entries, perturb, roles)


_SGMV_SPLIT_DROPPED = [("for kc2 in range(N_K):", "for kc2 in range(1, N_K):", 1)]  # _sum_partials
_SGMV_COUNTERS_KEPT = [("tl.store(plan_ptr + i + offs, tl.zeros((256,), dtype=tl.int32), mask=(i + offs) < n_t)",
                        "tl.store(plan_ptr + i + offs, tl.full((256,), 1, dtype=tl.int32), mask=(i + offs) < n_t)",
                        1)]
_DEFORM_NO_MASK = (
    [("inb = ok & (xi >= 0) & (xi < wl) & (yi >= 0) & (yi < hl) & (vrow >= 0) & (vrow < S)",
      "inb = ok & (vrow >= 0) & (vrow < S)", 1)],
    [('padding_mode="zeros", align_corners=False)', 'padding_mode="border", align_corners=False)', 2),
     ("grid_sampler_2d_backward(g * a_l, v_l, g_l, 0, 0, False", "grid_sampler_2d_backward(g * a_l, v_l, g_l, 0, 1, "
      "False", 1),
     ("m = ok & (xi >= 0) & (xi < w_l) & (yi >= 0) & (yi < h_l) & (row >= 0) & (row < S)",
      "m = ok & (row >= 0) & (row < S)", 1)],
)
_DEFORM_CORNER = (
    [("wx = fx if dx == 1 else 1.0 - fx", "wx = 1.0 - fx if dx == 1 else fx", 1)],
    # the reference's forward through its explicit corners (grid_sample's weights cannot be edited), mirrored
    [("if not _level_in_range(h_l, w_l, start, S):\n            _, _, corners", "if True:\n            _, _, corners",
      1),
     ("(fx if dx else 1 - fx)", "(1 - fx if dx else fx)", 1)],
)
_DUAL_NO_LN = (
    [("g = tl.maximum(acc_v, 0.0) * (diff * rstd[:, None] * w[None, :] + bb[None, :])",
      "g = tl.maximum(acc_v, 0.0) * acc_u", 1)],
    [("ln = torch.nn.functional.layer_norm(u, (r,), ln_w[o : o + r].to(ct), ln_b[o : o + r].to(ct), eps)",
      "ln = u", 1)],
)
_DUAL_NO_RELU = (
    [("g = tl.maximum(acc_v, 0.0) * (", "g = acc_v * (", 1)],
    [("g = torch.relu(v) * ln", "g = v * ln", 1)],
)


def _catalogue() -> Dict[str, Mutant]:
    M: List[Mutant] = []

    def add(name, doc, installer, scopes=("triton", "cpu")):
        M.append(Mutant(name, "merge" if name.startswith("unmerge") else name.split(".")[0], doc, installer,
                        tuple(scopes)))

    W = _wrapper
    # SGMV: shrink / expand_ / add_lora_ (normal and mixed mode)
    add("sgmv.noop", "shrink/expand_/add_lora_ compute nothing", W(SGMV_ENTRIES, _noop))
    add("sgmv.doubled", "the delta added twice", W(SGMV_ENTRIES, _doubled))
    add("sgmv.swap_adapters", "two adapters' offsets/ranks/scales exchanged", W(SGMV_ENTRIES,
                                                                                 _with_args(_swap_adapters)))
    add("sgmv.rank_minus_1", "every adapter served with r - 1 rows", W(SGMV_ENTRIES, _with_args(_rank_minus_one)))
    add("sgmv.serve_unassigned", "dropped -1 mask: tokens with no adapter get one",
        W(SGMV_ENTRIES, _with_args(_serve_unassigned)))
    add("sgmv.ignore_merged", "mixed mode ignores the merged adapter (merged -> -1)",
        W(MIXED_ENTRIES, _with_args(_ignore_merged)))
    # the persistent kernel's own machinery (Triton only: the CPU reference has no split-K or counters)
    add("sgmv.split_dropped", "persistent kernel: the last split's sum skips split 0 of `in`",
        _source("lora_kernels.triton.sgmv", _SGMV_SPLIT_DROPPED, "lora_kernels.ops.sgmv", []), scopes=("triton",))
    add("sgmv.counters_kept", "persistent kernel: the last program does not reset the plan's counters",
        _source("lora_kernels.triton.sgmv", _SGMV_COUNTERS_KEPT, "lora_kernels.ops.sgmv", []), scopes=("triton",))
    # merge / unmerge (both backends behind _merge_impl / _unmerge_impl; scope by the backend argument)
    add("merge.noop", "merge writes nothing (coefficients 0)", W(MERGE_ENTRIES,
                                                                  _merge_terms(lambda t, c: (t, torch.zeros_like(c)))))
    add("merge.twice", "the merge applied twice", W(MERGE_ENTRIES, _merge_twice))
    add("merge.doubled", "coefficients doubled (2x lambda * scale)", W(MERGE_ENTRIES,
                                                                        _merge_terms(lambda t, c: (t, c * 2))))
    add("merge.lambda_sign", "lambda's sign dropped (|lambda| * scale)", W(MERGE_ENTRIES,
                                                                            _merge_terms(lambda t, c: (t, c.abs()))))
    add("merge.scale_off", "scale 25% off (a wrong alpha / r)", W(MERGE_ENTRIES,
                                                                   _merge_terms(lambda t, c: (t, c * 1.25))))
    add("merge.swap_adapters", "two merged adapters' rows exchanged", W(MERGE_ENTRIES, _merge_terms(_merge_swap)))
    add("merge.rank_minus_1", "each adapter merged with r - 1 rows", W(MERGE_ENTRIES,
                                                                        _merge_terms(_merge_rank_minus_one)))
    add("unmerge.noop", "unmerge restores nothing", W(UNMERGE_ENTRIES, lambda e, call, ba: None))
    add("unmerge.one_ulp", "unmerge leaves one weight 1 ulp off", W(UNMERGE_ENTRIES, _unmerge_one_ulp))
    add("unmerge.inexact", "unmerge ignores the record's codes (approximate restore)",
        W(UNMERGE_ENTRIES, _unmerge_inexact))
    # deformable pooling (deform_pool and the fused deform_sample, forward and backward)
    add("deform.noop", "forward outputs zero", W(DEFORM_ENTRIES, _noop, ("fwd",)))
    add("deform.doubled", "forward outputs doubled", W(DEFORM_ENTRIES, _doubled, ("fwd",)))
    add("deform.level_start_off_by_one", "every level starts one value row late",
        W(DEFORM_ENTRIES, _with_args(_starts_plus_one)))
    add("deform.no_bounds_mask", "corners outside the image are read (not zero)",
        _source("lora_kernels.triton.deform", _DEFORM_NO_MASK[0], "lora_kernels.ops.deform", _DEFORM_NO_MASK[1]))
    add("deform.corner_weight", "bilinear x weights of the two corner columns exchanged",
        _source("lora_kernels.triton.deform", _DEFORM_CORNER[0], "lora_kernels.ops.deform", _DEFORM_CORNER[1]))
    add("deform.grad_value_zero", "backward: grad value zero", W(DEFORM_ENTRIES, _scaled((0,), 0.0), ("bwd",)))
    add("deform.grad_loc_zero", "backward: grad locations / offsets zero",
        W(DEFORM_ENTRIES, _scaled((1,), 0.0), ("bwd",)))
    # Dual-LoRA
    add("dual.noop", "the Dual-LoRA delta is zero", W(DUAL_ENTRIES, _noop, ("fwd",)))
    add("dual.doubled", "the Dual-LoRA delta added twice", W(DUAL_ENTRIES, _doubled, ("fwd",)))
    add("dual.no_layernorm", "LayerNorm skipped (gate * A x)",
        _source("lora_kernels.triton.dual_lora", _DUAL_NO_LN[0], "lora_kernels.ops.dual_lora", _DUAL_NO_LN[1]))
    add("dual.no_relu", "ReLU gate dropped (T x * LN(A x))",
        _source("lora_kernels.triton.dual_lora", _DUAL_NO_RELU[0], "lora_kernels.ops.dual_lora", _DUAL_NO_RELU[1]))
    add("dual.swap_adapters", "two adapters' rows exchanged", W(DUAL_ENTRIES, _with_args(_swap_adapters)))
    add("dual.rank_minus_1", "every adapter served with r - 1 rows", W(DUAL_ENTRIES, _with_args(_rank_minus_one)))
    add("dual.serve_unassigned", "dropped -1 mask: tokens with no adapter get one",
        W(DUAL_ENTRIES, _with_args(_serve_unassigned)))
    add("dual.grad_a_zero", "backward: grad of the [A; T] rows zero", W(DUAL_ENTRIES, _scaled((1,), 0.0), ("bwd",)))
    add("dual.grad_doubled", "backward: every gradient doubled", W(DUAL_ENTRIES, _scaled(range(5), 2.0), ("bwd",)))
    # segmented LoRA backward (lora_delta / lora_linear)
    add("backward.grad_x_zero", "grad x zero", W(BACKWARD_ENTRIES, _scaled((0,), 0.0)))
    add("backward.grad_a_zero", "grad A zero", W(BACKWARD_ENTRIES, _scaled((1,), 0.0)))
    add("backward.grad_b_zero", "grad B zero", W(BACKWARD_ENTRIES, _scaled((2,), 0.0)))
    add("backward.doubled", "every gradient doubled", W(BACKWARD_ENTRIES, _scaled((0, 1, 2), 2.0)))
    add("backward.swap_adapters", "gradients computed with two adapters exchanged",
        W(BACKWARD_ENTRIES, _with_args(_swap_adapters)))
    add("backward.rank_minus_1", "gradients of r - 1 rows only", W(BACKWARD_ENTRIES, _with_args(_rank_minus_one)))
    add("backward.serve_unassigned", "tokens with -1 contribute to the gradients",
        W(BACKWARD_ENTRIES, _with_args(_serve_unassigned)))
    return {m.name: m for m in M}


MUTANTS: Dict[str, Mutant] = _catalogue()


def parse(name: str) -> Tuple[Mutant, str]:
    """``"family.mutant"`` (every path), ``"family.mutant@triton"`` (the Triton kernels only) or
    ``"family.mutant@cpu"`` (the ops' reference dispatch only) -> (mutant, scope). ``ValueError`` naming the
    known mutants otherwise."""
    base, _, scope = name.partition("@")
    m = MUTANTS.get(base)
    if m is None or (scope and scope not in SCOPES) or (scope in ("triton", "cpu") and scope not in m.scopes):
        raise ValueError(f"{ENV_NAME}: unknown mutant {name!r}; known: {', '.join(sorted(MUTANTS))}, each optionally "
                         f"suffixed with @triton or @cpu")
    return m, scope or "all"


def get(name: str) -> Mutant:
    return parse(name)[0]


def install(name: str, patcher: Optional[Patcher] = None) -> Patcher:
    """Install mutant ``name`` (see :func:`parse`); returns the patcher that undoes it. On any error nothing stays
    installed."""
    m, scope = parse(name)
    p = patcher or Patcher()
    try:
        m.installer(p, scope)
    except BaseException:
        p.undo()
        raise
    return p


def describe() -> str:
    return "\n".join(f"{m.name:32s} {m.doc}" for m in MUTANTS.values())


# ---- pytest plugin ----------------------------------------------------------------------------------------------
_active: Dict[str, Any] = {}


def pytest_configure(config) -> None:
    name = os.environ.get(ENV_NAME)
    if not name or _active:
        return
    import pytest

    try:
        _active["patcher"] = install(name)
    except (ValueError, MutantError) as e:  # (the mutation check reports "MutantError" as a broken mutant)
        raise pytest.UsageError(f"{type(e).__name__}: {e}") from None
    _active["name"] = name


def pytest_report_header(config) -> Optional[str]:
    if _active:
        return f"lora_kernels MUTANT installed: {_active['name']} ({get(_active['name']).doc})"
    return None


def pytest_terminal_summary(terminalreporter) -> None:
    if _active:
        terminalreporter.write_line(f"lora_kernels mutant {_active['name']}: {calls()} perturbed call(s)")


def pytest_unconfigure(config) -> None:
    if not _active:
        return
    path = os.environ.get(ENV_REPORT)
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"mutant": _active["name"], "calls": calls()}, f)
    _active["patcher"].undo()
    _active.clear()
