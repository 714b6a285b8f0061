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
    """
    check(isinstance(t, torch.Tensor), name, "a torch.Tensor", type(t).__name__, TypeError)
    if dtypes is not None:
        dtypes = tuple(dtypes)
        check(t.dtype in dtypes, name, f"dtype in {[str(d) for d in dtypes]}", t.dtype, TypeError)
    if ndim is not None:
        check(t.ndim == ndim, name, f"{ndim} dims", f"{t.ndim} dims (shape {tuple(t.shape)})")
    if shape is not None:
        check(t.ndim == len(shape), name, f"{len(shape)} dims", f"{t.ndim} dims (shape {tuple(t.shape)})")
        want = tuple("*" if s is None else s for s in shape)
        ok = all(s is None or s == d for s, d in zip(shape, t.shape))
        check(ok, name, f"shape {want}", tuple(t.shape))
    if device is not None:
        check(_same_device(t.device, torch.device(device)), name, f"device {device}", t.device)
    if inner_contiguous and t.ndim >= 1 and t.shape[-1] > 1:
        check(t.stride(-1) == 1, name, "unit stride in the last dim (rows may be strided)", f"strides {t.stride()}")


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        ia = a.index if a.index is not None else torch.cuda.current_device()
        ib = b.index if b.index is not None else torch.cuda.current_device()
        return ia == ib
    return True
