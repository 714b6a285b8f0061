"""Build of lora_kernels: the Python package, plus the CUDA extension ``lora_kernels._C`` when possible.

The extension is built when torch has CUDA (``torch.version.cuda``), nvcc is found (``CUDA_HOME``, else
``/usr/local/cuda``) and ``LORA_KERNELS_NO_EXTENSION`` is unset; otherwise the package installs as pure Python
(the ops then fall back to a JIT build or the torch/Triton paths) and this script prints why. Build without
isolation so the installed torch is used: ``pip install --no-build-isolation -e .``. Settings (target
architectures, flags) live in ``lora_kernels/_ext.py``, shared with the JIT build; see docs/build.md.
"""

import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _load_ext_settings():
    path = os.path.join(ROOT, "lora_kernels", "_ext.py")
    spec = importlib.util.spec_from_file_location("_lora_kernels_ext_settings", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extension_plan():
    """(ext_modules, cmdclass additions, reason-if-skipped)."""
    if os.environ.get("LORA_KERNELS_NO_EXTENSION", "0") not in ("", "0"):
        return [], {}, "LORA_KERNELS_NO_EXTENSION is set"
    try:
        import torch
    except ImportError:
        return [], {}, "torch is not installed in the build environment (use --no-build-isolation)"
    if not torch.version.cuda:
        return [], {}, f"torch {torch.__version__} is a CPU-only build"
    s = _load_ext_settings()
    if s.ensure_cuda_home() is None:
        return [], {}, "nvcc not found (set CUDA_HOME to a CUDA toolkit)"
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    s.ensure_cuda_home()  # cpp_extension read CUDA_HOME at import: make sure it has ours
    ext = CUDAExtension(
        name="lora_kernels._C",
        sources=[os.path.relpath(p, ROOT) for p in s.sources(CSRC)],
        include_dirs=[CSRC],
        extra_compile_args={
            "cxx": s.CXX_FLAGS + s.nvidia_include_flags(),
            "nvcc": s.NVCC_FLAGS + s.cuda_arch_flags() + s.nvidia_include_flags(),
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}, None


class BuildPyWithSources(build_py):
    """Also copy csrc/ into the package as lora_kernels/_csrc, so wheels can JIT-build the same sources."""

    def run(self):
        super().run()
        if os.path.isdir(CSRC):
            dst = os.path.join(self.build_lib, "lora_kernels", "_csrc")
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(CSRC, dst, ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


ext_modules, cmdclass, skipped = _extension_plan()
if skipped:
    print(f"lora_kernels: building without the CUDA extension: {skipped}", file=sys.stderr)
cmdclass["build_py"] = BuildPyWithSources

setup(
    name="lora_kernels",
    version="0.1.0",
    description="GPU kernels for batched heterogeneous LoRA",
    python_requires=">=3.10",
    packages=find_packages(include=["lora_kernels*"]),
    package_data={"lora_kernels": ["tuning/*.json"]},
    install_requires=["torch", "regex"],  # regex: adapter-config patterns with a timeout
    entry_points={
        "console_scripts": ["lora-bench = lora_kernels.cli:main"],
        # vLLM loads this in every process; it does nothing unless LORA_KERNELS_VLLM=1 (docs/integrations.md).
        "vllm.general_plugins": ["lora_kernels = lora_kernels.integrations.vllm_plugin:register"],
        # SGLang runs this in every process: it only registers `--lora-backend lora_kernels` (docs/integrations.md).
        "sglang.srt.plugins": ["lora_kernels = lora_kernels.integrations.sglang_plugin:register"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
