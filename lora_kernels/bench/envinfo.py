"""What machine and software a measurement came from: GPU, driver, versions, git commit.

Nothing here initialises CUDA unless asked for a CUDA device's details.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from typing import Dict, Optional

import torch

__all__ = ["git_commit", "driver_version", "gpu_info", "versions", "collect", "gpu_slug"]

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, cwd: Optional[str] = None, timeout: float = 10.0) -> Optional[str]:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_commit() -> Dict[str, object]:
    """``{"commit": sha or "unknown", "dirty": bool or None}``. ``LORA_KERNELS_COMMIT`` wins (for checkouts
    without .git, e.g. the copy a GPU machine receives); else ``git rev-parse HEAD`` of the package's repo."""
    env = os.environ.get("LORA_KERNELS_COMMIT")
    if env:
        return {"commit": env, "dirty": None, "source": "LORA_KERNELS_COMMIT"}
    repo = os.path.dirname(_PKG_DIR)
    sha = _run(["git", "rev-parse", "HEAD"], cwd=repo)
    if not sha:
        return {"commit": "unknown", "dirty": None, "source": "no git repository or no commit"}
    st = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo)
    return {"commit": sha, "dirty": bool(st) if st is not None else None, "source": "git rev-parse HEAD"}


def driver_version() -> str:
    """NVIDIA driver version from ``nvidia-smi`` (or NVML), else "unknown"."""
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if out:
        return out.splitlines()[0].strip()
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        return "unknown"


def versions() -> Dict[str, Optional[str]]:
    """Python, torch (and the CUDA it was built with), Triton and lora_kernels versions."""
    try:
        import triton

        tv = triton.__version__
    except Exception as e:  # pragma: no cover - depends on the install
        tv = f"not importable ({type(e).__name__})"
    try:
        import lora_kernels

        lv = getattr(lora_kernels, "__version__", "unknown")
    except Exception:  # pragma: no cover
        lv = "unknown"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": tv,
        "lora_kernels": lv,
        "platform": platform.platform(),
    }


def gpu_info(device: Optional[torch.device] = None) -> Optional[Dict[str, object]]:
    """Name, compute capability, SMs, L2 and memory of a CUDA device, the driver, and the CUDA runtime torch
    uses; None without a GPU."""
    if not torch.cuda.is_available():
        return None
    device = torch.device(device if device is not None else "cuda")
    p = torch.cuda.get_device_properties(device)
    return {
        "name": p.name,
        "capability": f"{p.major}.{p.minor}",
        "sm_count": p.multi_processor_count,
        "l2_bytes": int(getattr(p, "L2_cache_size", 0)) or None,
        "memory_bytes": int(p.total_memory),
        "driver": driver_version(),
        "cuda_runtime": torch.version.cuda,
    }


def gpu_slug(name: Optional[str]) -> str:
    """A folder-safe GPU name for bench/results/<gpu>/ ("cpu" without a GPU)."""
    if not name:
        return "cpu"
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-") or "unknown-gpu"


def collect(device: Optional[torch.device] = None) -> Dict[str, object]:
    """Everything a JSON record carries about where it was measured."""
    gpu = gpu_info(device) if device is None or torch.device(device).type == "cuda" else None
    return {"gpu": gpu, "versions": versions(), "git": git_commit()}
