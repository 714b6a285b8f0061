"""Every Triton kernel of lora_kernels.triton compiled ahead of time for sm_90 and sm_80, on this GPU-less machine.

The Triton kernels are the default path on a GPU, but CPU CI only runs them in the interpreter, which does not
check tl.dot shapes and dtypes, layouts, shared memory, or the types the real compiler infers. This test runs
tests/triton_aot_driver.py once per session in a subprocess (the interpreter must be off there): it records the
launches the real launchers make (tuning defaults over shapes that reach every branch, the tuning sweep's
largest tiles, bf16/fp16/fp32) and compiles them to cubins with Triton's own ptxas (see that file's docstring),
each with the specialisation a real launch applies (alignment / divisibility by 16 / constant 1, computed by
Triton's own launch-time code on the recorded arguments and cross-checked against ``JITFunction.run``).
Compiled artifacts land in Triton's cache, so reruns are fast. On a GPU machine the kernels run for real in the
other tests; this still runs there (it needs no device).
"""

from __future__ import annotations

import json

import pytest
from helpers import run_without_interpreter

pytest.importorskip("triton.compiler")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "report.json"
    r = run_without_interpreter(["tests/triton_aot_driver.py", "--archs", "90,80", "--out", str(out)])
    if r.returncode != 0 and "ptxas" in r.stderr and "not found" in r.stderr.lower():
        pytest.skip("Triton's ptxas is not available here")
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text())


def _fmt(r):
    return f"{r['kernel']} sm_{r['arch']} [{r['scenario']}] consts={r['consts']} opts={r['opts']}"


def test_every_kernel_compiles_for_sm90_and_sm80(report):
    bad = [f"{_fmt(r)}: {r['error']}" for r in report["results"] if not r["ok"]]
    assert not bad, "\n".join(bad)
    archs = {r["arch"] for r in report["results"]}
    dtypes = {r["scenario"].split(":", 1)[0] for r in report["results"]}
    assert archs == {90, 80} and dtypes == {"bf16", "fp16", "fp32"}


def test_every_kernel_of_the_package_is_compiled(report):
    """A new @triton.jit kernel (``*_kernel`` in lora_kernels/triton/) must get a scenario in the driver."""
    compiled = {r["kernel"] for r in report["results"]}
    assert len(report["kernels"]) >= 13
    missing = sorted(set(report["kernels"]) - compiled)
    assert not missing, f"kernels never compiled (add a scenario to tests/triton_aot_driver.py): {missing}"
    # every kernel also compiled with all integer arguments i64 (Triton's type for sizes/strides >= 2^31)
    wide = {r["kernel"] for r in report["results"] if r["scenario"].endswith(":wide_i64")}
    assert wide == set(report["kernels"])


def test_shared_memory_fits_the_target(report):
    """A config whose shared memory exceeds the per-block limit compiles but fails at launch on the GPU."""
    over = [f"{_fmt(r)}: {r['shared']} > {r['limit']} bytes" for r in report["results"]
            if r["ok"] and r["shared"] > r["limit"]]
    assert not over, "\n".join(over)


def test_offsets_into_data_tensors_are_64_bit(report):
    """Issue 3: every offset added straight to a data tensor's base pointer is int64 in the compiled TTIR."""
    # the checker itself: the probe kernel's int32 row offset is flagged, its int64 one is not
    assert len(report["probe_narrow"]) == 1 and report["probe_narrow"][0].startswith("x_ptr:")
    narrow = [f"{_fmt(r)}: {r['narrow']}" for r in report["results"] if r["narrow"]]
    assert not narrow, "\n".join(narrow)


def test_grids_within_cuda_limits(report):
    """Grid axes 1 and 2 are limited to 65535 on CUDA (the interpreter has no limit): e.g. deform_pool with
    B * H = 131072 (recorded on meta tensors) used to put B * H on axis 1."""
    assert report["n_grids"] > 100
    assert not report["grids_over"], "\n".join(report["grids_over"])


def test_compiled_variants_are_the_ones_a_launch_compiles(report):
    """Each case is compiled with the signature, constants, specialisation attributes and options that
    ``JITFunction.run`` itself would hand to the compiler for the same arguments (checked for every unique
    launch), and the specialisation is in use (data pointers and sizes divisible by 16 carry tt.divisibility)."""
    assert report["spec_checked"] >= 100
    assert not report["spec_mismatch"], "\n".join(report["spec_mismatch"])
    with_div = [r for r in report["results"] if r["ok"] and any(
        a == ["tt.divisibility", 16] for v in r["attrs"].values() for a in v)]
    assert len(with_div) >= len(report["results"]) // 2
    assert {r["kernel"] for r in with_div} == set(report["kernels"])
    # ... and the compiled kernels carry them: the TTIR signature's tt.divisibility args are exactly those
    lost = [f"{_fmt(r)}: TTIR {r['ttir_divisible']} vs launch {sorted(r['attrs'])}" for r in report["results"]
            if r["ok"] and r["ttir_divisible"] != sorted(
                n for n, v in r["attrs"].items() if ["tt.divisibility", 16] in v)]
    assert not lost, "\n".join(lost[:20])


def test_specialisation_rule_on_a_probe(report):
    """The rule, written out, on a probe launch (a_ptr 16-byte aligned, b_ptr = a[1:] not; n16 = 32, n7 = 7,
    one = 1): Triton's launch-time code and ``JITFunction.run`` both give exactly this."""
    want = {"sig": {"a_ptr": "*fp32", "b_ptr": "*fp32", "n16": "i32", "n7": "i32", "one": "constexpr",
                    "BLOCK": "constexpr"},
            "consts": {"one": 1, "BLOCK": 16},
            "attrs": {"a_ptr": [["tt.divisibility", 16]], "n16": [["tt.divisibility", 16]]}}
    assert report["probe_spec"]["launch"] == want
    assert report["probe_spec"]["jit_run"] == want


def test_specialisation_changes_the_compiled_kernel(report):
    """Why the attributes matter: the same launch compiled without them (what this test used to compile) is a
    different kernel. Here the bf16 shrink at in = 4096: the PTX differs, and the specialised kernel loads its
    tiles with 16-byte copies (cp.async / vector loads) where the unspecialised one cannot assume alignment."""
    eff = report["spec_effect"]
    assert eff["attrs"], eff
    assert eff["ptx_differs"], eff
    assert eff["wide_loads_with"] > eff["wide_loads_without"], eff


def test_outer_config_rejects_tiles_a_gpu_cannot_dot():
    """Blocks under 16 run in the interpreter but do not compile for tl.dot on a GPU: refused before launch."""
    import torch

    from lora_kernels.triton import sgmv_backward as SB

    g = torch.zeros(1, 4, 8)
    h, x = torch.zeros(1, 3, 4), torch.zeros(3, 8)
    meta = torch.zeros(64, dtype=torch.int32)
    for bad in ({"BLOCK_M": 8}, {"BLOCK_R": 4}, {"BLOCK_N": 48}):
        with pytest.raises(ValueError, match=f"^config\\['{next(iter(bad))}'\\]"):
            SB.outer_(g, h, x, torch.zeros(1, dtype=torch.int64), torch.zeros(1, 1, dtype=torch.int32),
                      torch.zeros(1, 1), meta, 3, None, bad)
    assert not g.any()
