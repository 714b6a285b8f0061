"""PEFT's module-path patterns, matched with PEFT's semantics in bounded time.

Semantics (identical to peft 0.21, ``peft/utils/other.py``):
    * a key ``k`` of ``rank_pattern`` / ``alpha_pattern`` matches module path ``p`` iff
      ``re.match(rf"(.*\\.)?({k})$", p)`` (``get_pattern_key``; the first matching key wins);
    * ``target_modules`` / ``exclude_modules`` given as one string ``s`` select ``p`` iff ``re.fullmatch(s, p)``.

Why not plain :mod:`re`: a crafted pattern such as ``(a|aa)+`` backtracks exponentially and ``re`` cannot be
interrupted, so one ``adapter_config.json`` could stall the loader for minutes. A pattern is therefore

1. accepted only if :mod:`re` parses and compiles it (the combined pattern PEFT compiles, so ``"a)|(b"`` is as
   valid here as in PEFT) without a warning: ``re`` warns about syntax whose meaning differs between regex
   dialects (``[[:alpha:]]`` is a POSIX class for the ``regex`` package and a literal set for ``re``), so the
   accepted language is PEFT's and means the same in both engines (those warnings are recorded, never shown);
2. refused when it is larger than :data:`MAX_PATTERN_SIZE` parse nodes with counted repeats expanded by their
   minimum (the ``regex`` package unrolls ``(?:a{1000}){1000}`` while compiling, which has no timeout);
3. compiled with the ``regex`` package in its ``re``-compatible ``VERSION0`` and matched with a timeout
   (:data:`MATCH_TIMEOUT_S` per match, and a :class:`MatchBudget` for everything one adapter file matches).

Failures raise :class:`PatternError` (a ValueError carrying only the reason); callers add the file and field.
"""

from __future__ import annotations

import functools
import re
import threading
import time
import warnings
from typing import Any, Optional

try:  # the parser behind re.compile: Python 3.11+ / 3.10
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = ["PatternError", "MatchBudget", "CompileBudget", "compile_pattern", "pattern_size", "search_key",
           "fullmatch", "MATCH_TIMEOUT_S", "READ_MATCH_BUDGET_S", "MAX_PATTERN_LEN", "MAX_PATTERN_SIZE",
           "MAX_TOTAL_PATTERN_LEN", "MAX_TOTAL_PATTERN_SIZE"]

#: Longest time one pattern may take to match one module path (a legitimate one takes microseconds).
MATCH_TIMEOUT_S = 0.25
#: Total matching time allowed while reading one adapter file (all patterns x all module paths).
READ_MATCH_BUDGET_S = 2.0
#: Longest pattern string accepted (a regex listing every module of an 80-layer model is ~50k characters).
MAX_PATTERN_LEN = 100_000
#: Largest pattern accepted, in parse nodes with counted repeats expanded by their minimum (~0.5 s to compile).
MAX_PATTERN_SIZE = 100_000
#: Limits for all the patterns of one config together (characters parsed, nodes compiled): ~3 s at worst.
MAX_TOTAL_PATTERN_LEN = 400_000
MAX_TOTAL_PATTERN_SIZE = 400_000

_REPEATS = {getattr(_sre_parse, n) for n in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
            if hasattr(_sre_parse, n)}


class PatternError(ValueError):
    """A pattern that is invalid, too large, or too slow to match (the message says which; no file name)."""


class CompileBudget:
    """Parse nodes left for the patterns of one config (see :data:`MAX_TOTAL_PATTERN_SIZE`)."""

    __slots__ = ("nodes",)

    def __init__(self, nodes: Optional[int] = None):
        self.nodes = MAX_TOTAL_PATTERN_SIZE if nodes is None else int(nodes)


class MatchBudget:
    """Matching time left for one adapter file; every :func:`search_key` / :func:`fullmatch` call spends it."""

    __slots__ = ("left",)

    def __init__(self, seconds: Optional[float] = None):
        self.left = READ_MATCH_BUDGET_S if seconds is None else float(seconds)


def _subpatterns(av: Any):
    """The SubPattern objects inside one parse item's argument (tuples/lists of them, one or two levels)."""
    if isinstance(av, _sre_parse.SubPattern):
        yield av
    elif isinstance(av, (tuple, list)):
        for x in av:
            if isinstance(x, _sre_parse.SubPattern):
                yield x
            elif isinstance(x, (tuple, list)):
                yield from (y for y in x if isinstance(y, _sre_parse.SubPattern))


def _size(sub, limit: int) -> int:
    total = 0
    for op, av in sub.data:
        if op in _REPEATS:
            lo, _, body = av
            # regex unrolls the mandatory repetitions while compiling: cost grows with lo, not with hi.
            total += _size(body, limit) * max(int(lo), 1)
        else:
            total += 1 + sum(_size(s, limit) for s in _subpatterns(av))
        if total > limit:  # stop early: nested repeats can multiply to astronomically large numbers
            return total
    return total


# re's parser warns (FutureWarning / DeprecationWarning) only inside character sets and on group names.
_WARNING_PREFIXES = ("Possible nested set", "Possible set ", "bad character in group name")
_warnings_lock = threading.Lock()


def _parse(pattern: str):
    """re's parse tree of ``pattern``; PatternError for an invalid one or one re warns about."""
    if "[" not in pattern and "(?P" not in pattern:  # nothing re could warn about: leave warnings alone
        return _sre_parse.parse(pattern, 0)
    # catch_warnings changes process-wide state: "record" (not "error") so that a warning another thread emits
    # meanwhile is at worst not shown, never raised; the lock keeps two of these from interleaving.
    with _warnings_lock, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        parsed = _sre_parse.parse(pattern, 0)
    for w in seen:
        if str(w.message).startswith(_WARNING_PREFIXES):
            raise PatternError(f"ambiguous regular expression (its meaning differs between regex engines: "
                               f"{w.message})")
    return parsed


def pattern_size(pattern: str) -> int:
    """Parse nodes of ``pattern`` with counted repeats expanded by their minimum (PatternError if invalid)."""
    try:
        return _size(_parse(pattern), MAX_PATTERN_SIZE)
    except (re.error, OverflowError, ValueError) as e:
        if isinstance(e, PatternError):
            raise
        raise PatternError(f"invalid regular expression ({type(e).__name__}: {e})") from None
    except RecursionError:
        raise PatternError("invalid regular expression (nested too deeply)") from None


@functools.lru_cache(maxsize=256)
def _checked_size(combined: str) -> int:
    if len(combined) > MAX_PATTERN_LEN:
        raise PatternError(f"pattern of {len(combined)} characters (at most {MAX_PATTERN_LEN} accepted)")
    size = pattern_size(combined)
    if size > MAX_PATTERN_SIZE:
        raise PatternError(f"pattern too large: more than {MAX_PATTERN_SIZE} nodes once counted repeats are "
                           f"expanded (e.g. nested {{n}} repeats)")
    return size


@functools.lru_cache(maxsize=256)
def _compile(combined: str):
    try:
        import regex
    except ImportError as e:  # pragma: no cover - regex is an install requirement
        raise ImportError("matching adapter-config patterns in bounded time needs the regex package "
                          "(pip install regex)") from e
    try:
        re.compile(combined)  # what PEFT compiles must compile here too (and vice versa below)
        return regex.compile(combined, regex.VERSION0)
    except (re.error, regex.error, OverflowError, ValueError) as e:
        raise PatternError(f"invalid regular expression ({type(e).__name__}: {e})") from None
    except RecursionError:
        raise PatternError("invalid regular expression (nested too deeply)") from None


def _peft_key(key: str) -> str:
    return rf"(.*\.)?({key})$"  # peft.utils.other.get_pattern_key


def compile_pattern(pattern: str, *, key: bool, budget: Optional[CompileBudget] = None) -> Any:
    """Check and compile ``pattern``: a rank/alpha_pattern key (``key=True``; the combined PEFT pattern is
    compiled) or a target/exclude_modules string (``key=False``), charging its size to ``budget``. Compiled
    patterns are cached. Raises PatternError."""
    if not isinstance(pattern, str):
        raise PatternError(f"expected a string pattern, got {type(pattern).__name__}")
    combined = _peft_key(pattern) if key else pattern
    size = _checked_size(combined)  # parse only: cheap, and it bounds what compiling costs
    if budget is not None:
        if size > budget.nodes:
            raise PatternError(f"the config's patterns together are too large (more than {MAX_TOTAL_PATTERN_SIZE} "
                               "nodes once counted repeats are expanded)")
        budget.nodes -= size
    return _compile(combined)


def _run(method, path: str, budget: Optional[MatchBudget]) -> bool:
    timeout = MATCH_TIMEOUT_S if budget is None else min(MATCH_TIMEOUT_S, budget.left)
    if timeout <= 0:
        raise PatternError(f"matching time budget of {READ_MATCH_BUDGET_S} s for one adapter file used up "
                           f"(at module path {path!r:.120})")
    t0 = time.monotonic()
    try:
        return method(path, timeout=timeout) is not None
    except TimeoutError:
        raise PatternError(f"matching module path {path!r:.120} took longer than {timeout:.3g} s (catastrophic "
                           "backtracking?)") from None
    finally:
        if budget is not None:
            budget.left -= time.monotonic() - t0


def search_key(key: str, path: str, budget: Optional[MatchBudget] = None) -> bool:
    """Whether rank/alpha_pattern key ``key`` matches module ``path`` (``re.match(rf"(.*\\.)?({key})$", path)``)."""
    return _run(compile_pattern(key, key=True).match, path, budget)


def fullmatch(pattern: str, path: str, budget: Optional[MatchBudget] = None) -> bool:
    """Whether the target/exclude_modules string ``pattern`` selects ``path`` (``re.fullmatch``)."""
    return _run(compile_pattern(pattern, key=False).fullmatch, path, budget)
