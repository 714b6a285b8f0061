"""``lora-bench``: demo, env, the CPU smoke sweep and its JSON, tune's refusal without a GPU, and the
benchmark baselines against the reference."""

import json
import os
import subprocess
import sys

import pytest
import torch

import lora_kernels as lk
from lora_kernels.bench import cases as C
from lora_kernels.bench.baselines import BmmGather, NaiveLoop
from lora_kernels.cli import main

HAS_CUDA = torch.cuda.is_available()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The demo on the CPU runs the Triton kernels in the interpreter (a real kernel against the fp32 reference).
_DEMO_TRITON_CPU = "backend: triton (Triton's CPU interpreter)"


def test_demo_in_process(capfd):
    # capfd, not capsys: on a GPU machine --cpu runs the demo again in a fresh process (fd-level output)
    assert main(["demo", "--cpu"]) == 0
    out = capfd.readouterr().out
    assert "PASS" in out and "max |out - fp32 reference|" in out
    assert "bit-identical to the base model" in out
    assert _DEMO_TRITON_CPU in out and "rule: allowed = 2 x PyTorch" in out


def _wrong_add_lora(kind: str):
    """The Triton add_lora_ launcher made wrong: ``noop`` adds nothing, ``double`` adds the delta twice."""
    from lora_kernels.triton import sgmv as triton_sgmv

    real = triton_sgmv.add_lora_

    def wrong(y, *args, **kwargs):
        before = y.clone()
        real(y, *args, **kwargs)
        y.copy_(before if kind == "noop" else before + 2 * (y - before))

    return wrong


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU, --cpu runs the demo in a fresh process: see the cuda test below")
@pytest.mark.parametrize("kind", ["noop", "double"])
def test_demo_fails_on_a_wrong_kernel(kind, monkeypatch, capsys):
    """The demo checks the kernel, not the reference against itself: a wrong Triton kernel makes it exit 1."""
    from lora_kernels.triton import sgmv as triton_sgmv

    monkeypatch.setattr(triton_sgmv, "add_lora_", _wrong_add_lora(kind))
    assert main(["demo", "--cpu"]) == 1
    out = capsys.readouterr().out
    assert _DEMO_TRITON_CPU in out and "FAIL" in out


def _demo_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LORA_KERNELS_BACKEND")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def test_demo_subprocess_without_interpreter():
    """Started without TRITON_INTERPRET: the demo turns the interpreter on itself (or re-runs with it)."""
    r = subprocess.run([sys.executable, "-m", "lora_kernels", "demo", "--cpu"], capture_output=True, text=True,
                       env=_demo_env(), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check: max |out - fp32 reference|" in r.stdout and "PASS" in r.stdout
    assert _DEMO_TRITON_CPU in r.stdout


def test_env_runs(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "backends:" in out and "reference" in out
    assert main(["env", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep) >= {"gpu", "versions", "git", "backends"}
    assert rep["backends"]["reference"] == "available"


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "sgmv" in capsys.readouterr().out


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU smoke path")
def test_sgmv_cpu_smoke_writes_json(tmp_path, capsys):
    out = tmp_path / "res" / "sgmv.json"
    rc = main(["sgmv", "--cases", "smoke-t16-a4-mixed", "--reps", "2", "--warmup", "0",
               "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "CPU smoke, not a GPU measurement" in text
    doc = json.loads(out.read_text())
    assert doc["schema"] == "lora_kernels.bench.sgmv/1" and doc["kind"] == "cpu-smoke" and doc["complete"]
    assert doc["label"] == "CPU smoke, not a GPU measurement"
    for k in ("gpu", "versions", "git_commit", "timing", "roof", "rows", "cases", "dtype", "correctness_rule"):
        assert k in doc
    assert doc["gpu"] is None and doc["versions"]["torch"] == torch.__version__ and doc["git_commit"]
    assert [c["name"] for c in doc["cases"]] == ["smoke-t16-a4-mixed"]
    impls = {r["impl"] for r in doc["rows"]}
    assert {"torch.naive_loop", "torch.bmm_gather", "lk.add_lora_[reference]"} <= impls
    for r in doc["rows"]:
        assert r["status"] == "ok", r
        assert r["us_median"] > 0 and r["us_p25"] <= r["us_median"] <= r["us_p75"] and r["reps"] == 2
        if r["kind"] != "aux":
            assert r["err_max"] <= r["err_allowed"] and r["gbps"] > 0 and r["speedup_vs_best_baseline"] > 0
    case = doc["cases"][0]
    assert case["valid_tokens"] == 12 and case["bytes_min"] > 0 and case["flops"] > 0


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU smoke path")
def test_sgmv_custom_case_and_fail_is_reported(tmp_path, capsys, monkeypatch):
    """A broken implementation is reported FAIL (never timed) and makes the exit status 1."""
    from lora_kernels.bench import sgmv

    def broken_make(prob, y, state):
        return lambda: y.add_(1.0)

    real = sgmv.baseline_impls
    monkeypatch.setattr(sgmv, "baseline_impls", lambda: real() + [sgmv.Impl("broken", "baseline", None, broken_make)])
    out = tmp_path / "c.json"
    rc = main(["sgmv", "--tokens", "9", "--hidden-in", "32", "--hidden-out", "40", "--adapters", "3",
               "--ranks", "2,4", "--dist", "zipf", "--frac-none", "0.3", "--dtype", "fp32", "--reps", "1",
               "--warmup", "0", "--impls", "torch.*,broken", "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 1
    doc = json.loads(out.read_text())
    assert doc["cases"][0]["name"].startswith("custom-t9-a3") and doc["dtype"] == "fp32"
    rows = {r["impl"]: r for r in doc["rows"]}
    assert rows["broken"]["status"] == "FAIL" and rows["broken"]["us_median"] is None
    assert rows["torch.naive_loop"]["status"] == "ok" and "FAIL" in text


def test_sgmv_bad_case_name(capsys):
    assert main(["sgmv", "--cases", "no-such-case", "--cpu"]) == 2
    assert "--cases" in capsys.readouterr().err


def test_sgmv_list(capsys):
    assert main(["sgmv", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("decode-t1-r16", "t256-a64-r16", "mixed-t4096-a64-r8to128", "t4096-a64-r16-4096x11008",
                 "decode-t1-r16-11008x4096"):
        assert name in out


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal without a GPU")
def test_tune_refuses_without_gpu(capsys):
    assert main(["tune"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


# ---- lora-bench linear: the decode sweep of a LoRA'd linear layer (issue 15) --------------------------------

LINEAR_ROW_FIELDS = {"T", "impl", "kind", "status", "path", "verified", "us_median", "us_p25", "us_p75", "reps",
                     "graph", "launches", "bytes", "pct_bytes_bound", "ratio_to_base", "err_max", "err_allowed",
                     "why"}
LINEAR_CUDA_ROWS = ("cuda.fused_lora_linear_", "cuda.sgmv_decode_")


def _run_linear(tmp_path, *extra, tokens="1,3"):
    """``lora-bench linear --cpu`` on a tiny layer (24 -> 40 with bias, 3 adapters of ranks 2 and 4, fp16): the exit
    status and the JSON's rows keyed by (T, impl)."""
    out = tmp_path / "linear.json"
    rc = main(["linear", "--cpu", "--tokens", tokens, "--hidden-in", "24", "--hidden-out", "40", "--adapters", "3",
               "--ranks", "2,4", "--reps", "1", "--warmup", "0", "--no-progress", "--out", str(out), *extra])
    doc = json.loads(out.read_text())
    return rc, doc, {(r["T"], r["impl"]): r for r in doc["rows"]}


def test_linear_cpu_sweep_writes_json(tmp_path, capsys):
    """The CPU run: every row checked and timed, the fields of each row, the CUDA rows skipped with the reason."""
    rc, doc, rows = _run_linear(tmp_path, "--frac-none", "0.34")  # T=3: one token with no adapter
    text = capsys.readouterr().out
    assert rc == 0, text
    assert doc["schema"] == "lora_kernels.bench.linear/1" and doc["kind"] == "cpu-smoke" and doc["complete"]
    assert doc["layer"]["in_features"] == 24 and doc["layer"]["bias"] and doc["dtype"] == "fp16"
    assert [c["T"] for c in doc["cases"]] == [1, 3] and doc["cases"][1]["valid_tokens"] == 2
    for T in (1, 3):
        for name in ("base", "lk.add_lora_", "vllm-style[reference]"):
            r = rows[(T, name)]
            assert set(r) >= LINEAR_ROW_FIELDS, r
            assert r["status"] == "ok" and r["us_median"] > 0 and r["reps"] == 1, r
            assert r["err_max"] <= r["err_allowed"] and r["ratio_to_base"] > 0, r
            assert r["launches"] is None and r["pct_bytes_bound"] is None  # no GPU: nothing to count or bound
        assert rows[(T, "base")]["ratio_to_base"] == 1.0
        assert rows[(T, "lk.add_lora_")]["path"] == "reference"
        assert rows[(T, "lk.add_lora_")]["bytes"] > rows[(T, "base")]["bytes"]
        for name in LINEAR_CUDA_ROWS:
            r = rows[(T, name)]
            assert r["status"] == "SKIP" and r["us_median"] is None and r["verified"] is False, r
            assert r["why"] == "needs a CUDA device (this run is on cpu)", r
    assert "needs a CUDA device" in text and "unverified" in text and "CPU smoke, not a GPU measurement" in text


def test_linear_fails_a_wrong_row(tmp_path, monkeypatch, capsys):
    """A row whose result is wrong (lk.add_lora_ adding the delta twice) is FAIL, not timed, and the exit status 1;
    the other rows still pass."""
    real = lk.add_lora_

    def doubled(y, x, w, batch, **kw):
        before = y.clone()
        real(y, x, w, batch, **kw)
        y.add_(y - before)

    monkeypatch.setattr(lk, "add_lora_", doubled)
    rc, _, rows = _run_linear(tmp_path, "--impls", "base,lk.add_lora_,vllm-*")
    assert rc == 1
    for T in (1, 3):
        bad = rows[(T, "lk.add_lora_")]
        assert bad["status"] == "FAIL" and bad["us_median"] is None and "max abs error" in bad["why"], bad
        assert rows[(T, "vllm-style[reference]")]["status"] == "ok" and rows[(T, "base")]["status"] == "ok"
    assert "FAILED or ERRORED: T=1/lk.add_lora_, T=3/lk.add_lora_" in capsys.readouterr().out


def test_launch_count_counts_device_work_only():
    """What `launches` counts: kernels, memsets and copies, not the syncs or annotation spans the profiler also puts
    on the GPU timeline; this torch's profiler events carry the activity kind the filter reads."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from lora_kernels.bench import measure

    def ev(kind, device=DeviceType.CUDA):
        return SimpleNamespace(activity_type=kind, device_type=device)

    cuda = DeviceType.CUDA
    assert [measure._is_device_work(ev(k), cuda) for k in ("kernel", "gpu_memset", "gpu_memcpy")] == [True] * 3
    assert not any(measure._is_device_work(ev(k), cuda) for k in ("cuda_sync", "gpu_user_annotation", "cpu_op"))
    assert measure._is_device_work(ev(None), cuda) and not measure._is_device_work(ev(None, DeviceType.CPU), cuda)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(4, 4) @ torch.ones(4, 4)
    events = list(prof.events())
    assert events and all(isinstance(e.activity_type, str) and e.activity_type for e in events)
    assert not any(measure._is_device_work(e, cuda) for e in events)
    assert measure.count_launches(lambda: None, torch.device("cpu")) == (None, [])


class _StubKernels:
    """Stands in for the compiled extension on the CPU: ``fused_lora_linear_`` and ``sgmv_decode_`` computed by the
    fp32 reference and rounded once, counting their calls; ``wrong``: the fused op forgets the bias and the decode
    op adds nothing (wrong kernels the bench must catch)."""

    def __init__(self, wrong: bool):
        self.wrong, self.calls = wrong, {"fused": 0, "decode": 0}

    def fused_lora_linear_(self, y, x, w0, bias, a, b, offsets, ranks, scales, tok, outs, r_cap, merged, ws, cnt):
        self.calls["fused"] += 1
        acc = x.float() @ w0.float().T + (bias.float() if bias is not None and not self.wrong else 0.0)
        lk.reference.add_lora_(acc, x, a, b, offsets, ranks, scales, tok, [0], outs)
        y.copy_(acc.to(y.dtype))

    def sgmv_decode_(self, y, x, a, b, offsets, ranks, scales, tok, outs, r_cap, merged, partial, counters):
        self.calls["decode"] += 1
        if not self.wrong:
            acc = y.float()
            lk.reference.add_lora_(acc, x, a, b, offsets, ranks, scales, tok, [0], outs)
            y.copy_(acc.to(y.dtype))


@pytest.mark.parametrize("wrong", [False, True], ids=["right", "wrong"])
def test_linear_cuda_rows_run_and_are_checked(tmp_path, monkeypatch, wrong):
    """The two compiled-kernel rows on the CPU (their device type pointed at "cpu", the extension a stub): they call
    the ops, say "unverified", skip past the kernels' 64 tokens, and FAIL when the op's result is wrong."""
    from lora_kernels import _ext
    from lora_kernels.bench import linear

    stub = _StubKernels(wrong)
    monkeypatch.setattr(linear, "_KERNEL_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(_ext, "get", lambda *a, **k: stub)
    rc, _, rows = _run_linear(tmp_path, "--impls", "base,cuda.*", tokens="3,65")
    assert rc == (1 if wrong else 0)
    assert stub.calls["fused"] > 0 and stub.calls["decode"] > 0
    for name in LINEAR_CUDA_ROWS:
        r = rows[(3, name)]
        assert r["verified"] is False and r["status"] == ("FAIL" if wrong else "ok"), r
        assert (r["us_median"] is None) == wrong and (r["err_max"] <= r["err_allowed"]) != wrong, r
        assert rows[(65, name)]["status"] == "SKIP" and "limit of 64 tokens" in rows[(65, name)]["why"]


@pytest.mark.parametrize("outs", [40, [16, 8, 8]])
@pytest.mark.parametrize("dist", C.DISTRIBUTIONS)
def test_baselines_match_reference(outs, dist):
    g = torch.Generator().manual_seed(3)
    ranks = [4, 1, 16, 8]
    S = len(outs) if isinstance(outs, list) else 1
    w = lk.LoRAWeights(24, outs, max_adapters=6, max_rank=16, dtype=torch.float32)
    for r in ranks:
        A = [torch.randn(r, 24, generator=g) for _ in range(S)]
        B = [torch.randn(o, r, generator=g) for o in (outs if S > 1 else [outs])]
        w.add(A if S > 1 else A[0], B if S > 1 else B[0], alpha=2.0 * r)
    w.remove(1)  # a free slot in the middle: ids naming it get no delta
    ids = C.make_ids(33, 5, dist, frac_none=0.2, seed=1)
    x = torch.randn(33, 24, generator=g)
    y0 = torch.randn(33, w.out_features, generator=g)
    want = y0 + lk.reference.lora_delta(x, w, ids)
    for cls in (NaiveLoop, BmmGather):
        y = cls(w, ids)(y0.clone(), x)
        err = float((y - want).abs().max())
        assert err <= 1e-4 * max(1.0, float(want.abs().max())), (cls.name, err)
        none = ids < 0
        assert torch.equal(y[none], y0[none]), cls.name


def test_make_ids_distributions():
    for dist in C.DISTRIBUTIONS:
        for order in C.ORDERS:
            ids = C.make_ids(37, 5, dist, frac_none=0.25, order=order, seed=2)
            assert ids.dtype == torch.int32 and ids.shape == (37,)
            assert int((ids == -1).sum()) == 9 and int(ids.max()) < 5
            assert torch.equal(ids, C.make_ids(37, 5, dist, frac_none=0.25, order=order, seed=2))
    assert torch.equal(C.make_ids(8, 4, "identical"), torch.zeros(8, dtype=torch.int32))
    assert sorted(C.make_ids(8, 8, "distinct").tolist()) == list(range(8))
    counts = torch.bincount(C.make_ids(64, 8, "uniform").long())
    assert counts.tolist() == [8] * 8
    c = C.make_ids(10, 3, "uniform", order="contiguous", seed=4).tolist()
    assert sum(1 for a, b in zip(c, c[1:]) if a != b) == 2  # three segments


def test_named_cases_cover_the_table():
    names = [c.name for c in C.NAMED_CASES if not c.extra]
    assert len(names) == 9
    mixed = next(c for c in C.NAMED_CASES if c.name == "mixed-t256-a64-r8to128")
    assert min(mixed.ranks) == 8 and max(mixed.ranks) == 128
    # The roofline bytes reproduce BENCHMARKS.md's "roof us" at 2.9 TB/s (within 10%).
    from lora_kernels.bench.cases import ranks_of

    for c in C.NAMED_CASES:
        if c.doc_roof_us is None or c.doc_roof_us < 1:
            continue
        rk = ranks_of(c)
        nbytes = 2 * (c.tokens * c.hidden_in + 2 * c.tokens * c.hidden_out + sum(rk) * (c.hidden_in + c.hidden_out))
        assert abs(nbytes / 2.9e12 * 1e6 - c.doc_roof_us) / c.doc_roof_us < 0.1, c.name


@pytest.mark.skipif(HAS_CUDA or not lk.backends.interpreting(), reason="tune internals under the Triton interpreter")
def test_tune_internals_on_the_interpreter():
    """What `lora-bench tune` does per bucket (reference check, timing, choice), on the CPU interpreter: every
    chosen config is valid for write_table, and the keys are the ones the launchers look up."""
    from lora_kernels.bench import measure, tune

    cases = C.select_cases("smoke-t1-r8", C.SMOKE_CASES)
    entries, report, aborted = tune.tune_cases(cases, ["add_lora", "shrink", "expand"], torch.float16,
                                               torch.device("cpu"), measure.CpuTimer(reps=1, warmup=0), max_configs=2)
    assert aborted is None
    assert sorted(entries) == sorted([
        lk.tuning.bucket_key("add_lora", torch.float16, 1, 64, 96, 8),
        lk.tuning.bucket_key("shrink", torch.float16, 1, 64, 0, 8),
        lk.tuning.bucket_key("expand", torch.float16, 1, 0, 96, 8),
    ])
    for key, cfg in entries.items():
        assert lk.tuning.validate_config(key.split("|")[0], cfg) == cfg
    for rec in report:
        assert len(rec["candidates"]) == 2 and all(c["us_median"] for c in rec["candidates"]), rec
        assert rec["candidates"][0]["config"] == lk.tuning.candidate_configs(rec["op"], torch.float16,
                                                                               *rec["shape"].values())[0]


# ---- on a GPU (pytest -m cuda; bench/gpu_check.sh runs these before the full sweep) ---------------------------


@pytest.mark.cuda
def test_demo_gpu(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "on cuda (backend: triton)" in out and "PASS" in out


@pytest.mark.cuda
def test_demo_cpu_fails_on_a_wrong_kernel_subprocess():
    """test_demo_fails_on_a_wrong_kernel for a GPU machine: the wrong kernel patched in a fresh interpreted
    process, where --cpu runs in-process."""
    code = ("import sys; sys.path.insert(0, 'tests'); from test_cli import _wrong_add_lora; "
            "from lora_kernels.triton import sgmv; sgmv.add_lora_ = _wrong_add_lora('noop'); "
            "from lora_kernels.cli import main; sys.exit(main(['demo', '--cpu']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=_demo_env(TRITON_INTERPRET="1"), cwd=ROOT, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert _DEMO_TRITON_CPU in r.stdout and "FAIL" in r.stdout


@pytest.mark.cuda
def test_sgmv_gpu_smoke_graphs_and_json(tmp_path, capsys):
    out = tmp_path / "sgmv.json"
    rc = main(["sgmv", "--smoke", "--reps", "5", "--warmup", "1", "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    doc = json.loads(out.read_text())
    assert doc["kind"] == "gpu" and doc["gpu"]["name"] and doc["roof"]["bandwidth_Bps"] > 0 and doc["complete"]
    for r in doc["rows"]:
        assert r["status"] == "ok", r
        if r["kind"] == "lora_kernels":
            assert r["graph"] is True, r  # the library's ops must be capturable
            assert r["pct_roof"] > 0 and r["speedup_vs_best_baseline"] > 0


@pytest.mark.cuda
def test_tune_gpu_smoke_no_write(tmp_path, capsys):
    out = tmp_path / "tune.json"
    rc = main(["tune", "--cases", "smoke-t16-a4-mixed", "--max-configs", "3", "--reps", "3", "--no-write",
               "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    doc = json.loads(out.read_text())
    assert doc["table_path"] is None and len(doc["entries"]) == 1
    (rec,) = doc["buckets"]
    assert rec["op"] == "add_lora" and len(rec["candidates"]) == 3 and rec["best"]["us_median"] > 0


def test_every_subcommand_has_a_runner():
    """Each subcommand the parser offers is `env` or a lora_kernels.bench module with run(args)."""
    import argparse
    import importlib

    from lora_kernels import cli

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(cli.BENCH_COMMANDS) | {"env"}
    for name in cli.BENCH_COMMANDS:
        assert callable(importlib.import_module(f"lora_kernels.bench.{name}").run), name
