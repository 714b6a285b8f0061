"""Which implementation runs an op: the compiled extension, Triton, or the PyTorch reference.

Rules (in order):
    1. ``LORA_KERNELS_BACKEND`` (``reference`` | ``triton`` | ``cuda``) or the :func:`use_backend` context
       forces one; forcing a backend that cannot run raises ``RuntimeError`` (never a silent fallback).
    2. CPU tensors: the reference. (Triton runs on CPU tensors only under ``TRITON_INTERPRET=1`` and only when
       forced: that is how the tests exercise the kernels without a GPU.)
    3. CUDA tensors: Triton for the SGMV family (configs from the per-GPU tuning table, defaults elsewhere);
       for LoRABatch, the compiled builder only on GPUs whose tuning table lists it as verified
       (``lora-bench tune`` checks it against the torch builder there), the sync-free torch builder otherwise.
       A kernel never run on this GPU model is never chosen by default.

Nothing here initialises CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Dict, Iterator, Optional

BACKENDS = ("reference", "triton", "cuda")
# Op families that have a kernel in the compiled extension (csrc/). Forcing "cuda" for another family raises.
CUDA_FAMILIES = frozenset({"batch", "merge", "deform"})
_local = threading.local()


def env(name: str) -> Optional[str]:
    """``os.environ.get(name)``, for the per-call hot path.

    Every op call reads ``LORA_KERNELS_BACKEND`` (and NVTX's switch); ``os.environ.get`` encodes the key and
    decodes the value each time (~1 us, a tenth of the per-call budget). This reads ``os.environ``'s own
    mapping with the key encoded once, so it sees exactly what ``os.environ.get`` sees (every
    ``os.environ[...] = ...``, ``monkeypatch.setenv``, ``mock.patch.dict``): nothing is cached but the key.
    """
    environ = os.environ
    data = getattr(environ, "_data", None)
    encodekey = getattr(environ, "encodekey", None)
    if data is None or encodekey is None:  # not CPython's os._Environ (replaced by a plain dict, other runtime)
        return environ.get(name)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = encodekey(name)
    v = data.get(key)
    return None if v is None else environ.decodevalue(v)


_ENV_KEYS: Dict[str, object] = {}


def forced() -> Optional[str]:
    """The backend forced by :func:`use_backend` or ``LORA_KERNELS_BACKEND``, or None."""
    name = getattr(_local, "backend", None) or env("LORA_KERNELS_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"LORA_KERNELS_BACKEND: expected one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force a backend for ops called in this thread inside the block (None = automatic)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"name: expected one of {BACKENDS} or None, got {name!r}")
    prev = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = prev


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return (env("TRITON_INTERPRET") or "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_status() -> Optional[str]:
    """None if Triton is importable, else the reason it is not."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return f"triton not importable: {e}"
    return None


def triton_can_run(device_type: str) -> Optional[str]:
    """None if Triton kernels can run on tensors of this device type, else why not."""
    why = triton_status()
    if why:
        return why
    if device_type == "cpu" and not interpreting():
        return "CPU tensors need TRITON_INTERPRET=1 (set before lora_kernels is imported)"
    if device_type not in ("cpu", "cuda"):
        return f"no Triton support for device type {device_type}"
    return None


def select(family: str, device) -> str:
    """Pick the backend for an op family (``sgmv`` or ``batch``) on a device (a torch.device, or a device
    type string). Raises RuntimeError when a forced backend cannot run."""
    device_type = device if isinstance(device, str) else device.type
    name = forced()
    if name == "reference":
        return "reference"
    if name == "triton":
        why = triton_can_run(device_type)
        if why:
            raise RuntimeError(f"LORA_KERNELS_BACKEND=triton cannot run: {why}")
        return "triton"
    if name == "cuda":
        if family not in CUDA_FAMILIES:
            raise RuntimeError(f"LORA_KERNELS_BACKEND=cuda cannot run: no CUDA C++ kernel for the {family!r} ops yet "
                               f"(families with one: {sorted(CUDA_FAMILIES)})")
        if device_type != "cuda":
            raise RuntimeError("LORA_KERNELS_BACKEND=cuda needs CUDA tensors")
        from . import _ext

        if _ext.get() is None:
            raise RuntimeError(f"LORA_KERNELS_BACKEND=cuda cannot run: {_ext.status()}")
        return "cuda"
    if device_type != "cuda":
        return "reference"
    if family == "batch":
        from . import _ext, tuning

        verified = not isinstance(device, str) and "build_batch_cuda" in tuning.verified_kernels(device)
        return "cuda" if verified and _ext.get() is not None else "reference"
    return "triton" if triton_can_run("cuda") is None else "reference"


def report() -> Dict[str, str]:
    """What each backend can do here and, if not, why (for ``lora-bench env``). Loads the extension."""
    from . import _ext

    out = {"reference": "available"}
    why = triton_status()
    out["triton"] = "available" + (" (interpreter)" if interpreting() else "") if why is None else why
    out["cuda"] = "available (" + _ext.origin() + ")" if _ext.get() is not None else _ext.status()
    return out
