"""Test setup: without a GPU, Triton kernels run in the CPU interpreter. TRITON_INTERPRET must be set before
Triton decorates any kernel, so it is set here, before tests import lora_kernels.triton."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: slow on the CPU interpreter")
    if os.environ.get("LORA_KERNELS_MUTANT"):
        # The mutation check (.ci/mutation_check.py): serve a deliberately wrong kernel for the whole session.
        import mutants

        if not config.pluginmanager.is_registered(mutants):
            config.pluginmanager.register(mutants, "lora_kernels_mutants")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
