"""Argument checks shared by every op. They run in Python before any launch, read only shapes, dtypes,
devices and strides (never device data, so no host sync), and raise with the argument's name, what was
expected and what was given."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check(cond: bool, name: str, expected: str, actual: Any, exc: type = ValueError) -> None:
    """Raise ``exc("<name>: expected <expected>, got <actual>")`` unless ``cond``."""
    if not cond:
        raise exc(f"{name}: expected {expected}, got {actual}")


def check_tensor(
    name: str,
    t: Any,
    *,
    ndim: Optional[int] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    device: Optional[torch.device] = None,
    inner_contiguous: bool = False,
) -> None:
    """Check a tensor argument. ``shape`` entries that are None are not checked.

    Raises TypeError for a non-tensor or a wrong dtype, ValueError for ndim/shape/device/stride problems.
    This runs on every op call: messages are only built when a check fails.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got {t.ndim} dims (shape {tuple(t.shape)})")
    if shape is not None:
        if t.ndim != len(shape):
            raise ValueError(f"{name}: expected {len(shape)} dims, got {t.ndim} dims (shape {tuple(t.shape)})")
        if not all(s is None or s == d for s, d in zip(shape, t.shape)):
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if device is not None and t.device != device and not _same_device(t.device, torch.device(device)):
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    if inner_contiguous and t.ndim >= 1 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name}: expected unit stride in the last dim (rows may be strided), got strides {t.stride()}"
        )


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        ia = a.index if a.index is not None else torch.cuda.current_device()
        ib = b.index if b.index is not None else torch.cuda.current_device()
        return ia == ib
    return True


# ---- scalars: one rule for every numeric argument (issue 13) ------------------------------------------------
def check_real(
    name: str,
    value: Any,
    *,
    lo: Optional[float] = None,
    hi: Optional[float] = None,
    lo_open: bool = False,
    finite: bool = True,
) -> float:
    """Return ``value`` as a Python float after checking that it is a real number (int, float, numpy or 0-dim
    real tensor; never bool, str or complex), finite (unless ``finite=False``) and within ``[lo, hi]`` (``lo``
    excluded when ``lo_open``). Raises TypeError for a non-number, ValueError for a value out of range; both name
    the argument. A 0-dim tensor is read on the host (call this only on host-side arguments)."""
    import numbers

    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool or value.device.type == "meta":
            raise TypeError(f"{name}: expected a real number, got a tensor of shape {tuple(value.shape)} "
                            f"dtype {value.dtype} on {value.device}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r:.60}")
    try:
        v = float(value)
    except OverflowError:  # a huge Python int
        raise ValueError(f"{name}: expected a finite real number, got {value!r:.60} (overflows float64)") from None
    if finite and v != v or finite and v in (float("inf"), float("-inf")):
        raise ValueError(f"{name}: expected a finite real number, got {v}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name}: expected a value {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name}: expected a value <= {hi}, got {v}")
    return v


def check_int(name: str, value: Any, *, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """Return ``value`` as a Python int after checking that it is an integer (int, numpy integer or 0-dim integer
    tensor; never bool, never a float such as 3.0 or 2.5) within ``[lo, hi]``. TypeError / ValueError name the
    argument."""
    import numbers

    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.is_complex() or value.dtype == torch.bool \
                or value.device.type == "meta":
            raise TypeError(f"{name}: expected an integer, got a tensor of shape {tuple(value.shape)} "
                            f"dtype {value.dtype}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r:.60}")
    v = int(value)
    if lo is not None and v < lo:
        raise ValueError(f"{name}: expected an integer >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name}: expected an integer <= {hi}, got {v}")
    return v


# ---- outputs never alias inputs or library-owned storage (issue 13) -----------------------------------------
def _byte_span(t: torch.Tensor) -> tuple:
    """[first byte, one past the last byte] that ``t`` can touch (through its strides)."""
    if t.numel() == 0:
        return (0, 0)
    last = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
    start = t.data_ptr() + sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if st < 0) * t.element_size()
    return (start, start + (last + 1) * t.element_size())


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the memory spans of ``a`` and ``b`` intersect (same device; conservative: two interleaved views
    of one buffer count as overlapping). Meta/fake tensors have no storage and never overlap."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or a.device.type == "meta":
        return False
    try:
        a0, a1 = _byte_span(a)
        b0, b1 = _byte_span(b)
    except (RuntimeError, NotImplementedError):  # tensors without storage (fake, functional wrappers)
        return False
    return a0 < b1 and b0 < a1


def check_disjoint(name: str, out: torch.Tensor, others: "dict[str, Optional[torch.Tensor]]") -> None:
    """Raise ValueError naming ``name`` when the output ``out`` shares memory with any tensor of ``others``
    (inputs of the op, or storage the library owns such as adapter rows and merge records). Under
    torch.compile (fake tensors) nothing is checked: eager calls are."""
    if torch.compiler.is_compiling():
        return
    for other_name, t in others.items():
        if t is not None and overlaps(out, t):
            raise ValueError(f"{name}: expected memory disjoint from {other_name} (the op writes {name} while "
                             f"reading {other_name}, or {other_name} is storage the library owns), got "
                             "overlapping storage")


def check_fits(name: str, value: float, dtype: torch.dtype = torch.float32, *, what: str = "") -> float:
    """Return the finite float ``value`` rounded to ``dtype`` (a Python float that ``dtype`` holds exactly), after
    checking that it does not overflow ``dtype``: ``|value| <= torch.finfo(dtype).max``, PyTorch's own rule when a
    Python number is written into a tensor. Use it on a value computed in float64 (``alpha / r``) before it is
    stored in a tensor of ``dtype``. ValueError names ``name`` (and ``what`` was computed, when given)."""
    fi = torch.finfo(dtype)
    if not abs(value) <= fi.max:  # also refuses NaN
        raise ValueError(f"{name}: expected {what + ' ' if what else ''}to be a finite value of {dtype} "
                         f"(|x| <= {fi.max:.6g}), got {value!r:.60}")
    if dtype == torch.float64:
        return float(value)
    if dtype == torch.float32:
        import struct

        return struct.unpack("<f", struct.pack("<f", value))[0]
    return float(torch.tensor(value, dtype=torch.float64).to(dtype).item())


def tensor_span(t: torch.Tensor, label: Any) -> tuple:
    """``(first byte, one past the last byte, label)`` of what ``t`` can touch (through its strides); an empty
    span for empty tensors and tensors without storage (meta / fake), which never overlap anything."""
    if t.numel() == 0 or t.device.type == "meta":
        return (0, 0, label)
    try:
        s, e = _byte_span(t)
    except (RuntimeError, NotImplementedError):
        return (0, 0, label)
    return (s, e, label)


def first_overlap(a_spans: Sequence[tuple], b_spans: Sequence[tuple]) -> Optional[tuple]:
    """The first ``(label_a, label_b)`` of two intersecting byte spans, one from each list, or None.

    Spans are ``(start, end, label)`` (end exclusive; empty spans intersect nothing), all on one device (the
    caller groups them). Spans within one list may overlap each other freely. One sort and one sweep:
    O((n + m) log(n + m)), so checking every output of a grouped op against every buffer the library owns stays
    cheap for hundreds of layers."""
    ev = sorted([(s, e, 0, lab) for s, e, lab in a_spans if e > s] + [(s, e, 1, lab) for s, e, lab in b_spans
                                                                          if e > s], key=lambda x: x[0])
    end = [-1, -1]
    who: list = [None, None]
    for s, e, side, lab in ev:
        other = 1 - side
        if s < end[other]:  # some earlier span of the other list reaches past this start
            return (lab, who[other]) if side == 0 else (who[other], lab)
        if e > end[side]:
            end[side], who[side] = e, lab
    return None


def check_each(name: str, items: Iterable, conv) -> list:
    """``conv(name, v)`` of every item (e.g. :func:`check_real`, :func:`check_int`); a refusal names the argument
    and the item's index: ``"<message> (at name[i])"``, same exception type."""
    out = []
    for i, v in enumerate(items):
        try:
            out.append(conv(name, v))
        except (TypeError, ValueError) as e:
            raise type(e)(f"{e} (at {name}[{i}])") from None
    return out
