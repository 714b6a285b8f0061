"""The runnable examples in python/ stay runnable."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "python" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mixed_adapters_example(capsys):
    assert _load("mixed_adapters").main(["--steps", "2"]) == 0
    assert "OK:" in capsys.readouterr().out


def test_mode_switch_example(capsys):
    # The library's own modules are imported directly: a broken import must fail, not skip.
    import lora_kernels.ops.merge  # noqa: F401
    from lora_kernels.nn import LoRALinear

    assert hasattr(LoRALinear, "set_serving_mode")
    assert _load("mode_switch").main(["--steps-per-phase", "2", "--requests", "16", "--hidden", "32",
                                      "--blocks", "1", "--cpu"]) == 0
    out = capsys.readouterr().out
    assert "OK:" in out and "mixed(3)" in out and "merged(3)" in out


def test_fuse_adapters_example(capsys):
    assert _load("fuse_adapters").main(["--steps", "5", "--eval", "100", "--lambdas", "0.5", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "OK:" in out and "TIES d=0.2 l=1" in out and "task arithmetic l=0.5" in out


def test_vce_dual_lora_example(capsys):
    # vision tower -> VisualCueEnhancement -> projector -> tiny Llama with Dual-LoRA q/v; 2 steps is the fewest
    # in which every trainable tensor moves (B and the offset/attention weights start at zero).
    assert _load("vce_dual_lora").main(["--steps", "2", "--cpu"]) == 0
    out = capsys.readouterr().out
    assert "OK:" in out and "32/32 trainable tensors updated" in out


def test_many_adapters_example(capsys):
    # issue 7: adapters on disk, an AdapterPool smaller than their number, Zipf requests, LRU + prefetch.
    assert _load("many_adapters").main(["--adapters", "60", "--capacity", "8", "--steps", "8", "--requests", "6",
                                        "--check-every", "2", "--hidden", "16", "--layers", "1", "--cpu"]) == 0
    out = capsys.readouterr().out
    assert "OK:" in out and "hit rate" in out and "prefetch stalls" in out


def test_serve_multi_lora_example(capsys):
    import pytest

    pytest.importorskip("peft")
    # 8 adapters (ranks 8..64), 3 new tokens: the full 32-adapter default runs in the same code path.
    assert _load("serve_multi_lora").main(["--adapters", "8", "--new-tokens", "3", "--prompt-len", "4",
                                           "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "OK: all 8 requests equal PEFT" in out and "tokens/s" in out
