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

The persistent kernel (add_lora_'s default strategy) is compiled in every recorded variant, and its report
entries are read for what a GPU would feel first: global access widths from the PTX (the ALIGNED variant must
move its 16-bit tensors in wide accesses) and register spills from ptxas.
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


# ---- the persistent kernel (add_lora_'s default strategy): every launch variant, access widths, spills ----------
_PERSISTENT = "_sgmv_persistent_kernel"


def _persistent(report, arch=None):
    """The persistent kernel's compiled launch variants (the "wide" all-i64 ones excepted: their unit column
    strides become ``1 + 2**32`` by construction, so nothing about them is contiguous), optionally on one arch."""
    return [r for r in report["results"] if r["kernel"] == _PERSISTENT and not r["scenario"].endswith(":wide_i64")
            and (arch is None or r["arch"] == arch)]


def _dtype(r):
    return r["scenario"].split(":", 1)[0]


def _narrow_accesses(r) -> dict:
    """The global loads/stores of a compiled variant that move at most 2 bytes per thread: {"ld b16": n, ...}
    (``r["gmem"]`` is ``{op: {"<vN>.<type>": count}}`` from the PTX; 2-byte means a scalar 16-bit access, the
    only width of x, A, B, y and h in fp16/bf16; the kernel's int32/int64 metadata, fp32 scales and partial
    sums are 4 bytes and more)."""
    out = {}
    for op in ("ld", "st"):
        for shape, n in r["gmem"][op].items():
            vec, _, typ = shape.rpartition(".")
            if (int(vec[1:]) if vec else 1) * int("".join(c for c in typ if c.isdigit()) or 0) // 8 <= 2:
                out[f"{op} {shape}"] = n
    return out


def _spills(r) -> int:
    return r["spill_stores"] + r["spill_loads"]


def _fmt_p(r):
    c = r["consts"]
    return (f"{_dtype(r)} sm_{r['arch']} [{r['scenario'].split(':', 1)[1]}] ALIGNED={c['ALIGNED']} "
            f"BLOCK_M={c['BLOCK_M']} BLOCK_N={c['BLOCK_N']} S={c['NUM_SLICES']} MIXED={c['MIXED']} "
            f"warps={r['opts'].get('num_warps')} regs={r['registers']}")


def test_report_has_access_widths_and_spills(report):
    """Every compiled launch carries the PTX's global access widths and ptxas's registers and spill bytes; the
    width parser itself on known instructions (qualifiers between ``.global`` and the vector width / type)."""
    ok = [r for r in report["results"] if r["ok"]]
    assert ok and all({"gmem", "gmem_bytes", "registers", "spill_stores", "spill_loads"} <= set(r) for r in ok)
    assert all(0 < r["registers"] <= 255 for r in ok)
    probe = {"gmem": {"ld": {"v4.b32": 1, "b16": 2, "b32": 1}, "st": {"v2.b16": 1, "b8": 1, "v8.b16": 1}}}
    assert _narrow_accesses(probe) == {"ld b16": 2, "st b8": 1}
    assert report["gmem_probe"] == {
        "ld": {"v4.b32": 2, "b16": 1, "v2.b32": 1, "b32": 1}, "st": {"b16": 1, "v4.b32": 1},
        "cp.async": {"16": 1, "4": 1}}, report["gmem_probe"]


def test_persistent_variants_cover_buckets_slices_modes_and_both_alignments(report):
    """The default config takes the persistent path: its variants are compiled, on sm_90 and sm_80 in fp16, bf16
    and fp32, for each config bucket of ``tuning._default_persistent`` (decode T <= 64, prefill T <= 512, larger:
    told apart by BLOCK_M), one slice and three, mixed mode and not (N_K, the split of `in`, is a run-time
    argument: one variant serves both N_K == 1 and the partial sums), and
    both ALIGNED variants (16-byte contract checked on the host, and the fallback)."""
    from lora_kernels import tuning

    for dt in ("fp16", "bf16", "fp32"):
        bms = {str(tuning._default_persistent(dt, T, 4096, 4096, 16)["BLOCK_M"]) for T in (1, 64, 65, 512, 513, 4096)}
        assert len(bms) == (2 if dt == "fp32" else 3), bms  # fp32: BLOCK_M <= 64 (registers)
        for arch in (90, 80):
            rs = [r for r in _persistent(report, arch) if _dtype(r) == dt]
            assert rs and all(r["ok"] for r in rs), f"{dt} sm_{arch}: {[r['error'] for r in rs]}"
            seen = {k: {r["consts"][k] for r in rs} for k in ("BLOCK_M", "NUM_SLICES", "MIXED", "ALIGNED")}
            assert seen == {"BLOCK_M": bms, "NUM_SLICES": {"1", "3"}, "MIXED": {"0", "1"},
                            "ALIGNED": {"True", "False"}}, f"{dt} sm_{arch}: {seen}"


def test_persistent_aligned_variant_moves_16_bit_tensors_in_wide_accesses(report):
    """ALIGNED=True promises 16-byte aligned pointers and multiples of 8 elements for every row stride, slice
    offset and width, so no fp16/bf16 variant may keep a scalar 2-byte global load or store: x, A, B, y and h are
    the kernel's only 16-bit tensors (its metadata, scales and partial sums are 4 bytes and wider), so "hot" is
    "2 bytes or less per instruction". One exception, counted: the reduce role's h store of a [BLOCK_M / 8, R]
    tile (32 to 256 elements for 128 to 256 threads: one element per thread, so it cannot be wide): at most
    one such store per part (two in mixed mode), once per reduce item, never in a loop; no narrow load at all.
    Nor may any variant spill on sm_90."""
    rs = [r for r in _persistent(report) if r["ok"] and r["consts"]["ALIGNED"] == "True"
          and _dtype(r) in ("fp16", "bf16")]
    assert {(_dtype(r), r["arch"]) for r in rs} == {(d, a) for d in ("fp16", "bf16") for a in (90, 80)}

    def too_narrow(r):
        n = _narrow_accesses(r)
        reduce_store = set(n) == {"st b16"} and n["st b16"] <= 1 + int(r["consts"]["MIXED"])
        return {} if reduce_store else n

    bad = [f"{_fmt_p(r)}: {too_narrow(r)}" for r in rs if too_narrow(r)]
    bad += [f"{_fmt_p(r)}: spills {r['spill_stores']} B stored, {r['spill_loads']} B loaded" for r in rs
            if r["arch"] == 90 and _spills(r)]
    assert not bad, "\n".join(bad)


def test_persistent_unaligned_fallback_compiles(report):
    """ALIGNED=False (the host found an unaligned pointer, stride, slice offset or width) compiles in every dtype
    on both archs; no requirement on access widths. Both ways in are compiled: y an odd column offset view
    (y's pointer not 16-byte aligned, so the launch also drops its divisibility), and aligned pointers with
    slice widths that are not multiples of 8."""
    rs = [r for r in _persistent(report) if r["consts"]["ALIGNED"] == "False"]
    assert {(_dtype(r), r["arch"]) for r in rs} == {(d, a) for d in ("fp16", "bf16", "fp32") for a in (90, 80)}
    bad = [f"{_fmt_p(r) if r['ok'] else r['scenario']}: {r['error']}" for r in rs if not r["ok"]]
    assert not bad, "\n".join(bad)
    assert {"y_ptr" in r["attrs"] for r in rs} == {True, False}, "want y unaligned in one launch, aligned in one"


def test_persistent_variants_do_not_spill_on_sm90(report):
    """No fp16 / bf16 persistent-kernel variant (the serving dtypes) spills registers to local memory on sm_90
    (stores + loads spill bytes == 0, from ptxas -v on the very PTX that was compiled). fp32 (FMA dots, every
    operand in registers; its configs use 32-wide column blocks and 8 warps for this): at most 32 bytes each
    way, which ptxas leaves in some variants at 64-128 registers (not register pressure: no config tried
    removed it; stated in docs/benchmarks.md)."""
    rs = [r for r in _persistent(report, 90) if r["ok"]]
    assert len(rs) >= 12
    bad = [f"{_fmt_p(r)}: {r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads" for r in rs
           if (_spills(r) if _dtype(r) != "fp32" else r["spill_stores"] > 32 or r["spill_loads"] > 32)]
    assert not bad, "\n".join(bad)
