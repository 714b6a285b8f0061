"""lora_kernels.tuning: bucket keys, defaults, per-GPU tables (merge, validation, caching), sweep space."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lora_kernels import tuning

SHAPES = [(1, 16, 16, 1), (7, 200, 48, 33), (33, 4096, 4096, 16), (257, 4096, 11008, 128), (4096, 11008, 4096, 64)]


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    """Tables written to a temporary directory; a fake GPU name for 'cuda' devices."""
    monkeypatch.setattr(tuning, "_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_device_gpu", lambda device: "Fake GPU 80GB" if device is not None
                        and torch.device(device).type == "cuda" else None)
    tuning.clear_cache()
    yield tmp_path
    tuning.clear_cache()


def test_bucket_key():
    assert tuning.bucket_key("add_lora", torch.bfloat16, 100, 4096, 11008, 16) == \
        "add_lora|bf16|T128|in4096|out16384|r16"
    assert tuning.bucket_key("shrink", torch.float16, 1, 200, 48, 33) == "shrink|fp16|T1|in256|out*|r64"
    assert tuning.bucket_key("expand", "fp32", 257, 200, 48, 33) == "expand|fp32|T512|in*|out64|r64"
    with pytest.raises(ValueError, match="op"):
        tuning.bucket_key("gemm", torch.float16, 1, 1, 1, 1)


@pytest.mark.parametrize("op", tuning.OPS)
def test_defaults_are_valid(op):
    for shape in SHAPES:
        cfg = tuning.default_config(op, torch.bfloat16, *shape)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert tuning.validate_config(op, cfg) == cfg
    # split-K only where the grid is small and the reduction long
    assert tuning.default_config("shrink", torch.float16, 4, 4096, 0, 16)["SPLIT_K"] > 1
    assert tuning.default_config("shrink", torch.float16, 4096, 4096, 0, 16)["SPLIT_K"] == 1
    # the persistent one-launch kernel for every T, its plan family by T (decode 16, prefill 64 / 128)
    for T, bm in ((1, 16), (64, 16), (65, 64), (512, 64), (513, 128), (8192, 128)):
        cfg = tuning.default_config("add_lora", torch.float16, T, 4096, 4096, 16)
        assert cfg["strategy"] == "persistent" and cfg["persistent"]["BLOCK_M"] == bm, (T, cfg)


def test_cpu_gets_defaults_without_cuda():
    cfg = tuning.get_config("add_lora", torch.float16, 7, 48, 48, 16, device="cpu")
    assert cfg == tuning.default_config("add_lora", torch.float16, 7, 48, 48, 16)
    cfg["BLOCK_M"] = 128  # a copy: the cache is not mutated
    assert tuning.get_config("add_lora", torch.float16, 7, 48, 48, 16, device="cpu")["BLOCK_M"] != 128
    if not torch.cuda.is_available():
        assert not torch.cuda.is_initialized()


def test_table_roundtrip_and_partial_merge(table_dir):
    key = tuning.bucket_key("add_lora", torch.bfloat16, 16, 4096, 4096, 16)
    path = tuning.write_table("Fake GPU 80GB", {key: {"strategy": "fused", "N_SPLIT": 8,
                                                      "shrink": {"SPLIT_K": 16}}}, {"commit": "abc"})
    assert path == tuning.table_path("Fake GPU 80GB") and path.endswith("Fake_GPU_80GB.json")
    with open(path) as f:
        data = json.load(f)
    assert data["gpu"] == "Fake GPU 80GB" and data["commit"] == "abc" and "torch" in data and "triton" in data
    cfg = tuning.get_config("add_lora", torch.bfloat16, 13, 4096, 4096, 16, device="cuda")
    base = tuning.default_config("add_lora", torch.bfloat16, 13, 4096, 4096, 16)
    assert cfg["strategy"] == "fused" and cfg["N_SPLIT"] == 8
    assert cfg["BLOCK_K"] == base["BLOCK_K"]  # the rest comes from the defaults
    assert cfg["shrink"] == {**base["shrink"], "SPLIT_K": 16}
    # other buckets and CPU tensors: defaults
    assert tuning.get_config("add_lora", torch.bfloat16, 64, 4096, 4096, 16, device="cuda") == \
        tuning.default_config("add_lora", torch.bfloat16, 64, 4096, 4096, 16)
    assert tuning.get_config("add_lora", torch.bfloat16, 13, 4096, 4096, 16, device="cpu") == base
    assert tuning.load_table("Fake GPU 80GB") == {key: {"strategy": "fused", "N_SPLIT": 8, "shrink": {"SPLIT_K": 16}}}


def test_bad_entries_warn_and_are_ignored(table_dir):
    key = tuning.bucket_key("shrink", torch.float16, 8, 4096, 0, 16)
    path = tuning.table_path("Fake GPU 80GB")
    with open(path, "w") as f:
        json.dump({"gpu": "Fake GPU 80GB", "entries": {
            key: {"BLOCK_M": 48, "SPLIT_K": 4, "warp_specialize": True},
            "nonsense": {"BLOCK_M": 16},
        }}, f)
    with pytest.warns(UserWarning):
        cfg = tuning.get_config("shrink", torch.float16, 8, 4096, 0, 16, device="cuda")
    default = tuning.default_config("shrink", torch.float16, 8, 4096, 0, 16)
    assert cfg["SPLIT_K"] == 4 and cfg["BLOCK_M"] == default["BLOCK_M"]
    assert "warp_specialize" not in cfg


def test_unreadable_table_falls_back(table_dir):
    with open(tuning.table_path("Fake GPU 80GB"), "w") as f:
        f.write("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        cfg = tuning.get_config("expand", torch.float16, 8, 0, 4096, 16, device="cuda")
    assert cfg == tuning.default_config("expand", torch.float16, 8, 0, 4096, 16)


def test_write_table_rejects_invalid(table_dir):
    with pytest.raises(ValueError):
        tuning.write_table("Fake GPU 80GB", {"shrink|fp16|T8|in4096|out*|r16": {"BLOCK_M": 3}})
    with pytest.raises(ValueError):
        tuning.write_table("Fake GPU 80GB", {"gemm|fp16": {}})


@pytest.mark.parametrize("op", tuning.OPS)
def test_candidates(op):
    for shape in SHAPES:
        cands = tuning.candidate_configs(op, torch.float16, *shape)
        assert cands[0] == tuning.default_config(op, torch.float16, *shape)
        assert 1 < len(cands) <= 400 or shape[2] <= 16
        assert all(c not in cands[:i] for i, c in enumerate(cands))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for c in cands:
                assert tuning.validate_config(op, c) == c
    assert any(c["strategy"] == "fused" for c in tuning.candidate_configs("add_lora", torch.float16, 8, 4096, 4096, 16))


def test_verified_kernels_gate_the_compiled_builder(table_dir, monkeypatch):
    """The CUDA batch builder is the default only on a GPU whose table lists it as verified."""
    import lora_kernels as lk
    import lora_kernels._ext

    dev = torch.device("cuda", 0)  # never touched: _device_gpu is faked by the fixture
    assert tuning.verified_kernels(dev) == frozenset()
    monkeypatch.setattr(lk._ext, "get", lambda build=True: object())  # pretend the extension loads
    assert lk.backends.select("batch", dev) == "reference"
    tuning.write_table("Fake GPU 80GB", {}, {"commit": "x"}, verified_kernels=["build_batch_cuda"])
    assert tuning.verified_kernels(dev) == frozenset({"build_batch_cuda"})
    assert lk.backends.select("batch", dev) == "cuda"
    tuning.write_table("Fake GPU 80GB", {}, {"commit": "y"})  # None keeps what the table had
    assert tuning.verified_kernels(dev) == frozenset({"build_batch_cuda"})
    tuning.write_table("Fake GPU 80GB", {}, verified_kernels=[])
    assert lk.backends.select("batch", dev) == "reference"
    with pytest.raises(ValueError, match="verified_kernels"):
        tuning.write_table("Fake GPU 80GB", {}, verified_kernels=["nope"])
    assert tuning.verified_kernels(torch.device("cpu")) == frozenset()


def test_every_verifiable_kernel_has_a_verifier():
    """The dispatcher trusts only kernels that `lora-bench tune` verified: each name it may trust needs a check."""
    from lora_kernels.bench import tune

    assert set(tune.VERIFIERS) == set(tuning.VERIFIABLE_KERNELS)


def test_verification_never_passes_off_gpu():
    """On a CPU device every compiled-kernel check fails with a reason: nothing is recorded as verified."""
    from lora_kernels.bench import tune

    passed, report = tune.verify_compiled_kernels(torch.device("cpu"))
    assert passed == []
    assert set(report) == set(tune.VERIFIERS)
    assert all(v != "pass" and v for v in report.values())
