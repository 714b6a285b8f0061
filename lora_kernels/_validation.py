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
