"""Argument specs: an op's argument contract written once, as an ordered list of rules, from which both checks
that run on a call are generated.

An :class:`ArgSpec` turns its rules into two functions of the op's arguments:

* ``spec.ok(*args) -> bool``: every rule's condition joined with ``and`` into one function, generated as if
  written out by hand (no per-rule call, no message, nothing raised). The eager fast path calls it first: a
  call into a Python function costs ~0.1 us, and the hottest op has ~25 conditions.
* ``spec.check(*args) -> None``: the same conditions in the same order, each followed by its rule's refusal
  (``TypeError`` / ``ValueError`` ``"<argument>: expected <what>, got <what was given>"``, the format of
  :func:`lora_kernels._validation.check`). Runs when ``ok`` is False and on every call that is not plain eager
  (torch.compile, tracing, fake tensors).

So ``ok`` is True exactly when ``check`` passes: the fast path cannot accept what the detailed checks refuse, and
a refusal is the same exception with the same message whichever path the call took. An :class:`Exact` rule
relaxes this one way only: its condition is sufficient, not necessary (a cheap test that may say no to an
acceptable call, e.g. "the output's byte span misses every input's"), and ``check`` runs its exact test instead,
which raises or accepts; a conservative False costs the detailed path and nothing else.

A rule's condition is a Python expression (a string) over the spec's parameters, the names bound by earlier
:class:`Let` items, the constants the rule carries and the globals of the module that defines the spec (``env``:
names are looked up when the check runs, so a monkeypatched helper is seen). The expression of a rule may assume
every earlier rule holds (e.g. ``x.shape[1]`` after ``x.ndim == 2``). Rules whose expression already appeared
earlier in the spec are dropped (the expressions have no side effects and every name is bound once), so specs
compose by concatenation: ``X_RULES + Y_RULES`` checks the weights' type once.

Example::

    spec = ArgSpec("scale_", "y, s", (
        *tensor("y", ndim=1, dtypes=(torch.float32,)),
        Rule("s > 0", "s", lambda s: ("a positive scale", s)),
    ), globals())
    spec.ok(torch.ones(3), 2.0)      # True
    spec.check(torch.ones(3), -1.0)  # ValueError: s: expected a positive scale, got -1.0
"""

from __future__ import annotations

import ast
import builtins
import linecache
from types import CodeType, FunctionType
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from ._validation import _same_device


class Rule(NamedTuple):
    """One condition and its refusal.

    ``ok``: the expression that is True when the arguments are acceptable. ``name``: the argument the error names.
    ``message(*values)``: ``(expected, actual)`` for ``"<name>: expected <expected>, got <actual>"``, called only
    when ``ok`` is False, with the values of ``args`` (expressions, comma-separated; default: the names of
    ``message``'s parameters, looked up in the spec's scope). ``exc``: the exception type. ``consts``: values
    ``ok`` refers to by name (bound as closure variables of the generated functions)."""

    ok: str
    name: str
    message: Callable[..., Tuple[Any, Any]]
    exc: type = ValueError
    args: Optional[str] = None
    consts: Tuple[Tuple[str, Any], ...] = ()


class Exact(NamedTuple):
    """A condition that is sufficient, not necessary, and the exact test that decides when it is False.

    ``spec.ok`` uses ``ok`` (cheap; False only costs the detailed path); ``spec.check`` calls ``decide`` with the
    values of ``args`` (default: its parameter names) instead, which raises the refusal or returns to accept.
    ``decide`` must also handle what the fast path never sees (fake tensors, torch.compile tracing)."""

    ok: str
    decide: Callable[..., None]
    args: Optional[str] = None
    consts: Tuple[Tuple[str, Any], ...] = ()


class Let(NamedTuple):
    """Bind ``name`` to the value of ``expr`` for the rules after it (both generated functions compute it at the
    same place, so it may assume every rule before it holds). ``name`` may be a target list (``"a, b"``)."""

    name: str
    expr: str


Item = Union[Rule, Exact, Let]


def tensor(
    name: str,
    *,
    ndim: Optional[int] = None,
    shape: Optional[Sequence[Union[str, int, None]]] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    device: Optional[str] = None,
    inner_contiguous: bool = False,
) -> Tuple[Item, ...]:
    """The rules of :func:`lora_kernels._validation.check_tensor` for the argument ``name``, in its order and with
    its messages: a tensor (TypeError), ``dtype`` in ``dtypes`` (TypeError), ``ndim`` dims, ``shape`` (entries:
    expressions, None = any), on ``device`` (an expression; the same device rule), unit stride in the last dim.

    Binds, for the rules after them, ``<name>_shape``, ``<name>_device`` (when ``device`` is given) and with ``ndim``
    (or ``shape``) given the sizes ``<name>_d0``, ``<name>_d1``...: each tensor attribute read builds a Python
    object (~0.05 us) and indexing a ``torch.Size`` is not the interpreter's fast tuple path (~0.02 us), so the
    fast predicate reads each once."""
    items: List[Item] = [Rule(f"isinstance({name}, _Tensor)", name, lambda t: ("a torch.Tensor", type(t).__name__),
                              TypeError, args=name, consts=(("_Tensor", torch.Tensor),))]
    if device is not None:
        items.append(Let(f"{name}_device", f"{name}.device"))
    dims = f"{name}_shape"
    items.append(Let(dims, f"{name}.shape"))
    if dtypes is not None:
        dtypes = tuple(dtypes)
        allowed = [str(d) for d in dtypes]
        const = "_dtypes_" + "_".join(str(d).replace("torch.", "") for d in dtypes)
        items.append(Rule(f"{name}.dtype in {const}", name, lambda t: (f"dtype in {allowed}", t.dtype), TypeError,
                          args=name, consts=((const, frozenset(dtypes)),)))
    if shape is not None:
        if ndim is not None and ndim != len(shape):
            raise ValueError(f"argspec: {name}: ndim={ndim} and a shape of {len(shape)} dims")
        ndim = len(shape)
    size = [f"{dims}[{k}]" for k in range(ndim or 0)]
    if ndim is not None:
        items.append(Rule(f"len({dims}) == {ndim}", name,
                          lambda t: (f"{ndim} dims", f"{t.ndim} dims (shape {tuple(t.shape)})"), args=name))
        if ndim:
            size = [f"{name}_d{k}" for k in range(ndim)]
            items.append(Let(", ".join(size) + ("," if ndim == 1 else ""), dims))
    if shape is not None:
        want = "(" + "".join(f"{'_ANY' if s is None else s}, " for s in shape) + ")"
        items.append(Rule(" and ".join(f"{d} == {s}" for d, s in zip(size, shape) if s is not None)
                          or "True", name, lambda t, w: (f"shape {w}", tuple(t.shape)), args=f"{name}, {want}",
                          consts=(("_ANY", "*"),)))
    if device is not None:
        items.append(Rule(f"{name}_device == {device} or _same_device({name}_device, {device})", name,
                          lambda t, d: (f"device {d}", t.device), args=f"{name}, {device}",
                          consts=(("_same_device", _same_device),)))
    if inner_contiguous:
        last = f"{size[-1]} <= 1 or {name}.stride({ndim - 1}) == 1" if ndim else (
            f"not {dims} or {dims}[-1] <= 1 or {name}.stride(-1) == 1")
        items.append(Rule(last, name,
                          lambda t: ("unit stride in the last dim (rows may be strided)", f"strides {t.stride()}"),
                          args=name))
    return tuple(items)


class ArgSpec:
    """The rules ``items`` of an op with parameters ``params`` (comma-separated names), compiled into
    :attr:`ok` and :attr:`check` (see the module docstring). ``env``: the globals the expressions see (the
    defining module's ``globals()``). :attr:`source` holds the generated code (tracebacks show it)."""

    def __init__(self, name: str, params: str, items: Sequence[Item], env: Dict[str, Any]):
        self.name = name
        self.params = [p.strip() for p in params.split(",") if p.strip()]
        self.items: List[Item] = _dedup(items)
        self.rules = [it for it in self.items if not isinstance(it, Let)]
        consts = _consts(self.items)
        _check_names(self.params, self.items, consts, env)
        self.source = _generate(name, self.params, self.items, consts)
        filename = f"<argspec {env.get('__name__', '?')}.{name}>"
        linecache.cache[filename] = (len(self.source), None, self.source.splitlines(True), filename)
        # the functions' globals are env itself (not a copy): helpers are looked up when the check runs
        make_code = next(c for c in compile(self.source, filename, "exec").co_consts if isinstance(c, CodeType))
        self.ok, self.check = FunctionType(make_code, env)(self.rules, _fail, *consts.values())
        for fn, role in ((self.ok, "ok"), (self.check, "check")):
            fn.__name__ = fn.__qualname__ = f"{name}.{role}"
            fn.__module__ = env.get("__name__", fn.__module__)

    def __repr__(self) -> str:
        return f"ArgSpec({self.name!r}, {len(self.rules)} rules)"


def _fail(rule: Rule, *values: Any) -> None:
    expected, actual = rule.message(*values)
    raise rule.exc(f"{rule.name}: expected {expected}, got {actual}")


def _dedup(items: Sequence[Item]) -> List[Item]:
    """``items`` without a rule whose expression came earlier, or a Let repeated; a name bound twice to different
    expressions is an error (later rules could not tell which one they see)."""
    out: List[Item] = []
    seen, lets = set(), {}
    for it in items:
        if isinstance(it, Let):
            if it.name in lets:
                if lets[it.name] != it.expr:
                    raise ValueError(f"argspec: {it.name} bound twice ({lets[it.name]!r}, {it.expr!r})")
                continue
            lets[it.name] = it.expr
        elif it.ok in seen:
            continue
        else:
            seen.add(it.ok)
        out.append(it)
    return out


def _consts(items: Sequence[Item]) -> Dict[str, Any]:
    consts: Dict[str, Any] = {}
    for it in items:
        for k, v in getattr(it, "consts", ()):
            if k in consts and consts[k] is not v and consts[k] != v:
                raise ValueError(f"argspec: constant {k} bound to two values")
            consts[k] = v
    return consts


def _args_of(it: Union[Rule, Exact]) -> str:
    if it.args is not None:
        return it.args
    fn = it.message if isinstance(it, Rule) else it.decide
    code = fn.__code__
    return ", ".join(code.co_varnames[: code.co_argcount])


def _check_names(params: List[str], items: Sequence[Item], consts: Mapping[str, Any], env: Mapping[str, Any]) -> None:
    """Every name an expression reads is bound where it is read (a typo fails at import, not on the first
    refusal)."""
    scope = set(params) | set(consts) | set(env) | set(dir(builtins))
    for it in items:
        exprs = [it.expr] if isinstance(it, Let) else [it.ok, _args_of(it)]
        for e in exprs:
            for node in ast.walk(ast.parse(e, mode="eval")):
                if isinstance(node, ast.Name) and node.id not in scope:
                    raise NameError(f"argspec: {node.id!r} in {e!r} is not bound there")
        if isinstance(it, Let):
            scope.update(n.strip() for n in it.name.split(",") if n.strip())


def _generate(name: str, params: List[str], items: Sequence[Item], consts: Mapping[str, Any]) -> str:
    """The source of ``_make(_rules, _fail, *consts) -> (ok, check)``: the constants become closure variables of
    both functions; ``ok`` is one ``and`` chain per run of rules between two Lets, ``check`` one ``if`` per rule."""
    sig = ", ".join(params)
    ok = [f"    def ok({sig}):"]
    chk = [f"    def check({sig}):"]
    run: List[str] = []
    k = 0
    for it in items:
        if isinstance(it, Let):
            if run:
                ok.append(f"        if not ({' and '.join(run)}):\n            return False")
                run = []
            ok.append(f"        {it.name} = {it.expr}")
            chk.append(f"        {it.name} = {it.expr}")
            continue
        run.append(f"({it.ok})")
        if isinstance(it, Exact):
            chk.append(f"        _rules[{k}].decide({_args_of(it)})")
        else:
            chk.append(f"        if not ({it.ok}):\n            _fail(_rules[{k}], {_args_of(it)})")
        k += 1
    if run:
        ok.append(f"        if not ({' and '.join(run)}):\n            return False")
    ok.append("        return True")
    chk.append("        return None")
    head = f"def _make(_rules, _fail{''.join(', ' + c for c in consts)}):"
    return "\n".join([head, *ok, *chk, "    return ok, check"]) + "\n"
