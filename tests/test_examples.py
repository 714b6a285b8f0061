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
