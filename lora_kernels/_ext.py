"""The compiled CUDA ops (``torch.ops.lora_kernels_C``): ahead-of-time module first, JIT build second.

:func:`get` returns the op namespace ``torch.ops.lora_kernels_C`` (so ``get().build_batch_(meta, ids, ranks,
max_tokens, max_adapters)`` calls the CUDA builder) or None, trying in order:

1. the AOT module ``lora_kernels._C`` built by ``setup.py`` (importing it registers the ops; it never
   initialises CUDA);
2. if ``build`` is true, torch has CUDA, nvcc is found and ``LORA_KERNELS_NO_JIT`` is unset: a JIT build of the
   same sources (``csrc/``, or ``lora_kernels/_csrc`` in a wheel) with ``torch.utils.cpp_extension.load`` and
   ninja, into ``$LORA_KERNELS_CACHE/jit/<hash>`` (default ``~/.cache/lora_kernels/jit/<hash>``; the hash
   covers the sources, torch and CUDA versions, and the flags), reused by later processes.

The outcome is cached for the process. :func:`status` says why the ops are unavailable (one line) and
:func:`origin` where they came from. Importing this module does nothing (no build, no CUDA, no torch import);
``setup.py`` also loads it by path for the shared build settings below.

Environment:
    ``LORA_KERNELS_CUDA_ARCHS``: target architectures, TORCH_CUDA_ARCH_LIST syntax (``"9.0a;8.0;9.0+PTX"``:
        ``X.Y`` = SASS for sm_XY, ``+PTX`` = also PTX for compute_XY; ``PTX:X.Y`` = PTX only). Default:
        sm_90a and sm_80 SASS plus compute_90 PTX (``-gencode`` flags in :func:`cuda_arch_flags`).
    ``LORA_KERNELS_NO_JIT=1``: never JIT-build. ``LORA_KERNELS_CACHE``: cache root. ``CUDA_HOME``: toolkit.
    ``MAX_JOBS``: parallel compile jobs (torch's setting).
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import sys
import sysconfig
import threading
from typing import Any, List, Optional

__all__ = ["get", "status", "origin", "cuda_home", "cuda_arch_flags", "source_dir", "sources"]

OP_NAMESPACE = "lora_kernels_C"
AOT_MODULE = "lora_kernels._C"
JIT_NAME = "lora_kernels_jit"
DEFAULT_ARCHS = "9.0a;8.0;PTX:9.0"
NVCC_FLAGS = ["-O3", "-lineinfo"]
CXX_FLAGS = ["-O3", "-g0"]

_lock = threading.Lock()
_ops: Any = None
_origin: Optional[str] = None
_reason: Optional[str] = None  # why unavailable, once tried
_tried_aot = False
_tried_jit = False


# ---- build settings shared with setup.py ------------------------------------------------------------------
def cuda_home() -> Optional[str]:
    """The CUDA toolkit root with ``bin/nvcc``: ``$CUDA_HOME`` / ``$CUDA_PATH``, else ``/usr/local/cuda``, else
    found from ``nvcc`` on PATH. None when there is no nvcc."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def ensure_cuda_home() -> Optional[str]:
    """Set ``CUDA_HOME`` (and torch.utils.cpp_extension's copy) to :func:`cuda_home` when unset or wrong: torch
    otherwise guesses from ``which nvcc`` (e.g. ``/usr/local``) and the link fails with ``-lcudart``."""
    home = cuda_home()
    if home is None:
        return None
    os.environ["CUDA_HOME"] = home
    mod = sys.modules.get("torch.utils.cpp_extension")
    if mod is not None and getattr(mod, "CUDA_HOME", None) != home:
        mod.CUDA_HOME = home
    return home


def cuda_arch_flags(spec: Optional[str] = None) -> List[str]:
    """nvcc ``-gencode`` flags for ``spec`` (default ``$LORA_KERNELS_CUDA_ARCHS`` or sm_90a + sm_80 + PTX 9.0).

    Raises:
        ValueError: an entry is not ``X.Y[a|f][+PTX]`` or ``PTX:X.Y``.
    """
    spec = spec if spec is not None else (os.environ.get("LORA_KERNELS_CUDA_ARCHS") or DEFAULT_ARCHS)
    flags: List[str] = []
    for entry in re.split(r"[;,\s]+", spec.strip()):
        if not entry:
            continue
        m = re.fullmatch(r"(PTX:)?(\d+)\.?(\d)([af]?)(\+PTX)?", entry, flags=re.IGNORECASE)
        if m is None:
            raise ValueError(
                f"LORA_KERNELS_CUDA_ARCHS: expected entries like 9.0a, 8.0, 9.0+PTX or PTX:9.0, got {entry!r}"
            )
        ptx_only, major, minor, suffix, plus_ptx = m.groups()
        cc = f"{major}{minor}{suffix.lower()}"
        if not ptx_only:
            flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if ptx_only or plus_ptx:
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    if not flags:
        raise ValueError(f"LORA_KERNELS_CUDA_ARCHS: expected at least one architecture, got {spec!r}")
    return flags


def nvidia_include_flags() -> List[str]:
    """``-isystem <site-packages>/nvidia/cu13/include`` when present: torch's CUDA headers include cuSPARSE /
    cuBLAS headers that a runtime-only toolkit lacks. ``-isystem`` after the toolkit's include dir, so the
    toolkit's own headers win and the wheel's only fill the gaps."""
    out: List[str] = []
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        inc = os.path.join(base, "nvidia", "cu13", "include")
        if os.path.isdir(inc) and inc not in out:
            out += ["-isystem", inc]
    return out


def source_dir() -> Optional[str]:
    """The C++/CUDA sources: ``csrc/`` next to the package (checkout / editable install), or the copy shipped
    in the package (``lora_kernels/_csrc``, wheels)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (os.path.join(os.path.dirname(here), "csrc"), os.path.join(here, "_csrc")):
        if os.path.isfile(os.path.join(d, "bindings.cpp")):
            return d
    return None


def sources(root: str) -> List[str]:
    """The translation units of the extension under ``root`` (every ``*.cpp`` and ``*.cu`` at its top level)."""
    return sorted(glob.glob(os.path.join(root, "*.cpp")) + glob.glob(os.path.join(root, "*.cu")))


# ---- loading ----------------------------------------------------------------------------------------------
def _namespace() -> Any:
    import torch

    ns = getattr(torch.ops, OP_NAMESPACE)
    _ = ns.build_batch_  # raises AttributeError/RuntimeError if the library did not register the op
    return ns


def _try_aot() -> Optional[str]:
    """Import the AOT module; None on success, else why not."""
    global _ops, _origin
    try:
        import importlib

        import torch  # noqa: F401  (the extension links against torch's libraries: load them first)

        importlib.import_module(AOT_MODULE)
        _ops = _namespace()
        _origin = "aot"
        return None
    except ModuleNotFoundError as e:
        if e.name == AOT_MODULE:
            return f"{AOT_MODULE} not built"
        return f"{AOT_MODULE} failed to import: {e}"
    except Exception as e:  # ImportError (ABI mismatch), registration error
        return f"{AOT_MODULE} failed to import: {_first_line(str(e))}"


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"\berror\b", ln, flags=re.IGNORECASE):
            return ln[:300]
    return (lines[0] if lines else "unknown error")[:300]


def jit_build_dir(root: str, arch_flags: List[str]) -> str:
    """``<cache>/jit/<hash>``: the hash covers the sources, torch/CUDA/Python versions and the flags."""
    import torch

    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        if os.path.isfile(path) and path.endswith((".cpp", ".cu", ".cuh", ".h")):
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    meta = [torch.__version__, str(torch.version.cuda), sys.version, cuda_home() or ""]
    h.update(repr((meta, arch_flags, NVCC_FLAGS, CXX_FLAGS)).encode())
    cache = os.environ.get("LORA_KERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lora_kernels")
    return os.path.join(cache, "jit", h.hexdigest()[:16])


def _try_jit() -> Optional[str]:
    """JIT-build and load the sources; None on success, else why not."""
    global _ops, _origin
    if os.environ.get("LORA_KERNELS_NO_JIT", "0") not in ("", "0"):
        return "JIT disabled (LORA_KERNELS_NO_JIT=1)"
    import torch

    if not torch.version.cuda:
        return "torch is a CPU-only build"
    if ensure_cuda_home() is None:
        return "nvcc not found (set CUDA_HOME)"
    root = source_dir()
    if root is None:
        return "C++/CUDA sources not found (neither csrc/ nor lora_kernels/_csrc)"
    try:
        arch_flags = cuda_arch_flags()
    except ValueError as e:
        return str(e)
    from torch.utils import cpp_extension

    ensure_cuda_home()  # patch cpp_extension.CUDA_HOME now that it is imported
    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja)"
    build_dir = jit_build_dir(root, arch_flags)
    os.makedirs(build_dir, exist_ok=True)
    log = os.path.join(build_dir, "build.log")
    try:
        cpp_extension.load(
            name=JIT_NAME,
            sources=sources(root),
            extra_cflags=CXX_FLAGS + nvidia_include_flags(),
            extra_cuda_cflags=NVCC_FLAGS + arch_flags + nvidia_include_flags(),
            extra_include_paths=[root],
            build_directory=build_dir,
            with_cuda=True,
            is_python_module=False,
            verbose=False,
        )
        _ops = _namespace()
    except Exception as e:
        with open(log, "w") as f:
            f.write(f"{type(e).__name__}: {e}\n")
        return f"JIT build failed: {_first_line(str(e))}; log at {log}"
    _origin = "jit"
    return None


def get(build: bool = True) -> Any:
    """``torch.ops.lora_kernels_C`` when the compiled ops are available, else None (see :func:`status`).

    Args:
        build: allow a JIT build (about a minute on first use; cached on disk) when the AOT module is missing.
    """
    global _reason, _tried_aot, _tried_jit
    if _ops is not None:
        return _ops
    with _lock:
        if _ops is not None:
            return _ops
        if not _tried_aot:
            _tried_aot = True
            _reason = _try_aot()
        if _ops is None and build and not _tried_jit:
            _tried_jit = True
            jit_reason = _try_jit()
            _reason = None if jit_reason is None else f"{jit_reason} ({_reason})"
        return _ops


def status() -> str:
    """``"available (aot)"`` / ``"available (jit)"``, or one line saying why the compiled ops are unavailable.
    Calls :func:`get` (which may JIT-build) if it was not called yet."""
    if _ops is None and not _tried_aot:
        get()
    if _ops is not None:
        return f"available ({_origin})"
    if not _tried_jit:
        return f"{_reason}; JIT build not attempted (get(build=False))"
    return _reason or "unavailable"


def origin() -> Optional[str]:
    """``"aot"`` or ``"jit"`` once :func:`get` succeeded, else None."""
    return _origin
