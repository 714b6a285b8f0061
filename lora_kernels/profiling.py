"""NVTX ranges around every op, off by default.

Switch on with ``LORA_KERNELS_NVTX=1`` in the environment or the :func:`nvtx` context/function. Ranges are
pushed inside the custom ops' implementations (opaque to torch.compile), so turning them on never changes a
compiled graph. Uses the ``nvtx`` package when installed, else ``torch.cuda.nvtx``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Iterator, Optional

_enabled: Optional[bool] = None  # None: follow the environment


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return os.environ.get("LORA_KERNELS_NVTX", "0") not in ("", "0")


@contextlib.contextmanager
def nvtx(on: bool = True) -> Iterator[None]:
    """Enable (or disable) NVTX ranges inside the block."""
    global _enabled
    prev = _enabled
    _enabled = on
    try:
        yield
    finally:
        _enabled = prev


def set_nvtx(on: Optional[bool]) -> None:
    """Enable/disable NVTX ranges globally (None: follow ``LORA_KERNELS_NVTX``)."""
    global _enabled
    _enabled = on


@functools.lru_cache(maxsize=1)
def _push_pop():
    """(push, pop) from the ``nvtx`` package, else torch's CUDA binding, else no-ops with one warning (a
    CPU-only torch without the nvtx package has nowhere to send ranges; ops must not fail because of it)."""
    try:
        import nvtx as _nv  # the NVIDIA package: works without a GPU

        def push(name):
            _nv.push_range(name, domain="lora_kernels")

        def pop():
            _nv.pop_range(domain="lora_kernels")

        return push, pop
    except Exception:
        pass
    import torch

    if torch.version.cuda:
        return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
    warnings.warn("lora_kernels: NVTX ranges requested but neither the nvtx package nor a CUDA build of torch is "
                  "installed; ranges are off", stacklevel=3)
    return (lambda name: None), (lambda: None)


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """An NVTX range named ``name`` when ranges are enabled; free otherwise."""
    if not enabled():
        yield
        return
    push, pop = _push_pop()
    push(name)
    try:
        yield
    finally:
        pop()
