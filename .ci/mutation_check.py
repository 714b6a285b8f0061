#!/usr/bin/env python3
"""Mutation check (issue 13): every kernel test module must fail against every deliberately wrong kernel of its
op family (tests/mutants.py), and pass against the real one.

For each module of MATRIX it runs, in a subprocess with a timeout,

    python -m pytest -q -x -p no:cacheprovider <module> -k <subset>

once with no mutant (the union of its subsets must pass: exit code 0), and once per mutant and scope with
``LORA_KERNELS_MUTANT=<family.mutant>@<scope>``: scope ``triton`` makes the Triton kernels wrong (the module's
tests of the kernels must fail), scope ``cpu`` the ops' reference dispatch, the CPU path (its tests of that path
must fail); the spec the tests compare against is never touched (tests/mutants.py). A run counts as *caught*
only with exit code 1 (tests failed), at least one perturbed call, and no :class:`mutants.MutantError`; a
collection or import error, a usage error, a timeout, or a failure while the mutant perturbed nothing is
reported as an error. Prints a module x mutant table with the first test that caught each mutant, writes JSON
(``--json``), and exits 1 when any mutant survived or any run misbehaved.

The per-scope ``-k`` subsets keep the check within its CI budget (~8 min on 2 cores, 2 runs at a time): why each
suffices is noted next to it, and the table is the proof (a mutant the subset misses is reported SURVIVED).
``--full`` runs whole modules instead (for auditing a subset).

Usage: python .ci/mutation_check.py [--jobs 2] [--json FILE] [--only SUBSTR ...] [--full] [--timeout S]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

SGMV = ["sgmv.noop", "sgmv.doubled", "sgmv.swap_adapters", "sgmv.rank_minus_1", "sgmv.serve_unassigned"]
MERGE = ["merge.noop", "merge.twice", "merge.doubled", "merge.lambda_sign", "merge.scale_off", "merge.swap_adapters",
         "merge.rank_minus_1", "unmerge.noop", "unmerge.one_ulp", "unmerge.inexact"]
DEFORM = ["deform.noop", "deform.doubled", "deform.level_start_off_by_one", "deform.no_bounds_mask",
          "deform.corner_weight", "deform.grad_value_zero", "deform.grad_loc_zero"]
DUAL = ["dual.noop", "dual.doubled", "dual.no_layernorm", "dual.no_relu", "dual.swap_adapters", "dual.rank_minus_1",
        "dual.serve_unassigned", "dual.grad_a_zero", "dual.grad_doubled"]
BACKWARD = ["backward.grad_x_zero", "backward.grad_a_zero", "backward.grad_b_zero", "backward.doubled",
            "backward.swap_adapters", "backward.rank_minus_1", "backward.serve_unassigned"]


@dataclass
class Module:
    """A test module, the mutants it must catch, and per scope the ``-k`` subset that must catch them.

    Each mutant runs once per scope: ``triton`` (the Triton kernels are wrong: the module's tests of the kernels
    must fail) and ``cpu`` (the ops' reference dispatch is wrong: its tests of the CPU path must fail); the
    unmutated baseline runs the union of the subsets. ``None``: the whole module."""

    path: str
    mutants: List[str]
    subsets: Dict[str, Optional[str]]
    why: str = ""

    def runs(self) -> List[str]:
        return [f"{m}@{s}" for m in self.mutants for s in self.subsets]

    def k(self, mutant: Optional[str]) -> Optional[str]:
        if mutant is not None:
            return self.subsets[mutant.partition("@")[2]]
        ks = list(self.subsets.values())
        return None if any(k is None for k in ks) else " or ".join(f"({k})" for k in ks)


# Subsets: the tests that compare each path's kernels with the spec (or an independent loop) on batches with
# several adapters of mixed ranks and -1 tokens, forward and backward, and nothing else (refusals, storage,
# compile, CLI smoke tests and the CUDA-source emulators cannot see a wrong Triton / reference kernel, and cost
# time). The table proves each subset sufficient: a mutant it misses is reported as SURVIVED.
MATRIX = [
    Module("tests/test_triton_sgmv.py", SGMV, {"triton": "test_matrix"},
           "the pairwise matrix: every strategy, -1 fractions, mixed ranks, slices, layouts, tile configs"),
    Module("tests/test_plan.py", ["sgmv.split_dropped", "sgmv.counters_kept"],
           {"triton": "public_op_on_the_plan"},
           "the persistent kernel through the public op: counters reset, split-K sums, values vs the spec"),
    Module("tests/test_mixed.py", SGMV + ["sgmv.ignore_merged"],
           {"triton": "mixed_equals_unmerged_triton and distinct",
            "cpu": "mixed_equals_unmerged_reference"},
           "mixed mode vs the unmerged truth: fused/two-pass/split-K/small tiles; the CPU path on every case"),
    Module("tests/test_merge.py", MERGE,
           {"triton": "merged_values_vs_fp32_reference and triton",
            "cpu": "api_cycles_reference or merged_values_vs_fp32_reference and not triton"},
           "merged values vs the fp64 truth, then a bit-exact unmerge, per backend and dtype; cycles on the CPU "
           "path (not: the code maths alone, refusals, records, opcheck; Triton cycles: slow, same checks)"),
    Module("tests/test_deform.py", DEFORM,
           {"triton": "triton_matches_reference or triton_deterministic_grad_value or "
                      "deform_sample_matches_reference and triton",
            "cpu": "op_matches_reference_and_gradients or fp32_locations_with_fp16_value and reference or "
                   "deform_sample_matches_reference and not triton"},
           "deform_pool / deform_sample forward and gradients vs the spec, per backend (not: the spec vs the "
           "direct loop, refusals, emulated CUDA source, compile)"),
    Module("tests/test_vce_fused.py", DEFORM,
           {"triton": "beat_rounded_locations and triton or module_gradients and triton",
            "cpu": "beat_rounded_locations and reference or module_gradients and reference"},
           "the VCE module's call site: forward accuracy and every gradient vs the spec, per backend"),
    Module("tests/test_dual_lora.py", DUAL,
           {"triton": "triton_forward_matches_reference or triton_backward_matches_reference",
            "cpu": "inplace_reference_leaves_unserved or op_autograd_gradcheck or functional_op_gradients"},
           "forward and backward vs the spec on every popularity distribution with -1 tokens (not: storage, "
           "refusals, modules, compile, CLI)"),
    Module("tests/test_lora_backward.py", BACKWARD,
           {"triton": "triton_backward_interpreter or triton_outer_split",
            "cpu": "gradcheck_op_fp64 or lora_linear_grads or lora_delta_x_only"},
           "gradients of x, A and B vs finite differences / the per-adapter loop, -1 tokens, mixed ranks (not: "
           "refusals, compile, bench)"),
]

_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)


@dataclass
class Run:
    module: str
    mutant: Optional[str]
    status: str = ""
    rc: Optional[int] = None
    seconds: float = 0.0
    cpu: float = 0.0
    calls: Optional[int] = None
    caught_by: List[str] = field(default_factory=list)
    tail: str = ""


def _run(mod: Module, mutant: Optional[str], full: bool, timeout: float, threads: Optional[int]) -> Run:
    r = Run(mod.path, mutant)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", mod.path]
    k = mod.k(mutant)
    if k and not full:
        cmd += ["-k", k]
    env = dict(os.environ)
    env.pop("LORA_KERNELS_MUTANT", None)
    report = None
    if mutant:
        fd, report = tempfile.mkstemp(prefix="lk_mutant_", suffix=".json")  # the plugin writes it at exit
        os.close(fd)
        env["LORA_KERNELS_MUTANT"] = mutant
        env["LORA_KERNELS_MUTANT_REPORT"] = report
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    # No third-party pytest plugins (hypothesis, timeout, anyio: the subsets use none): their import is ~2 s of
    # each run's ~6 s of CPU, over a hundred runs. The baseline runs prove the subsets pass without them.
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    t0 = time.monotonic()
    with tempfile.TemporaryFile(mode="w+") as log:
        # wait4 rather than communicate(): it gives this run's own CPU time (the runs overlap)
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            try:
                os.killpg(p.pid, signal.SIGKILL)  # pytest and anything it started
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, ru = os.wait4(p.pid, 0)
        finally:
            timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        r.cpu = ru.ru_utime + ru.ru_stime
        r.rc = None if killed.is_set() else p.returncode
        log.seek(0)
        out = log.read()
    r.seconds = time.monotonic() - t0
    r.tail = out[-3000:]
    r.caught_by = _FAILED.findall(out)
    if report:
        with open(report, encoding="utf-8") as f:
            text = f.read()
        os.unlink(report)
        r.calls = json.loads(text).get("calls") if text.strip() else None
    if r.rc is None:
        r.status = "TIMEOUT"
    elif mutant is None:
        r.status = "pass" if r.rc == 0 else f"BASELINE FAILED (rc {r.rc})"
    elif "MutantError" in out:
        r.status = "MUTANT BROKEN"
    elif r.rc == 0:
        r.status = "SURVIVED"
    elif r.rc == 1 and r.caught_by and (r.calls or 0) > 0:
        r.status = "caught"
    elif r.rc == 1:
        r.status = "FAILED WITHOUT THE MUTANT RUNNING" if not r.calls else "FAILED (no test named)"
    else:
        r.status = f"ERROR (pytest rc {r.rc}: not a test failure)"
    return r


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (default 2)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--only", nargs="*", default=None, help="only modules / mutants containing one of these")
    ap.add_argument("--full", action="store_true", help="whole modules, not the -k subsets")
    ap.add_argument("--timeout", type=float, default=400.0, help="seconds per run (default 400)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated runs")
    args = ap.parse_args(argv)

    import mutants  # noqa: E402  (tests/ on sys.path above)

    for mod in MATRIX:
        for name in mod.runs():
            mutants.parse(name)  # unknown names fail here, before anything runs

    jobs = []
    for mod in MATRIX:
        sel = [m for m in mod.runs() if not args.only or any(s in m or s in mod.path for s in args.only)]
        if args.only and not sel and not any(s in mod.path for s in args.only):
            continue
        if not args.no_baseline:
            jobs.append((mod, None))
        jobs += [(mod, m) for m in sel]
    threads = 1 if args.jobs > 1 else None
    t0 = time.monotonic()
    results: List[Run] = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        futs = [ex.submit(_run, mod, m, args.full, args.timeout, threads) for mod, m in jobs]
        for f in futs:
            r = f.result()
            results.append(r)
            print(f"  {r.module:30s} {r.mutant or '(no mutant)':38s} {r.status:10s} {r.seconds:6.1f}s "
                  f"(cpu {r.cpu:5.1f}s) "
                  f"{'calls=' + str(r.calls) if r.calls is not None else ''}", flush=True)
    wall = time.monotonic() - t0
    cpu = sum(r.cpu for r in results)  # what the check costs on an idle machine

    print("\n== mutation check: module x mutant")
    ok = True
    per_module: Dict[str, dict] = {}
    for mod in MATRIX:
        rs = [r for r in results if r.module == mod.path]
        if not rs:
            continue
        base = [r for r in rs if r.mutant is None]
        mrs = [r for r in rs if r.mutant is not None]
        caught = sum(r.status == "caught" for r in mrs)
        print(f"\n{mod.path}" + ("" if args.full else f"  (subsets {mod.subsets}: {mod.why})"))
        for r in base:
            print(f"  {'(no mutant)':38s} {r.status}  {r.seconds:.1f}s")
            ok &= r.status == "pass"
        for r in mrs:
            by = r.caught_by[0].split("::", 1)[-1] if r.caught_by else ""
            print(f"  {r.mutant:38s} {r.status:10s} {r.seconds:6.1f}s  {by}")
            ok &= r.status == "caught"
            if r.status not in ("caught",):
                print("    | " + "\n    | ".join(r.tail.strip().splitlines()[-15:]))
        for r in base:
            if r.status != "pass":
                print("    | " + "\n    | ".join(r.tail.strip().splitlines()[-15:]))
        print(f"  caught {caught}/{len(mrs)}")
        per_module[mod.path] = {"subsets": None if args.full else mod.subsets, "caught": caught, "mutants": len(mrs),
                                "runs": [vars(r) | {"tail": r.tail if r.status not in ("caught", "pass") else ""}
                                         for r in rs]}
    total = sum(v["mutants"] for v in per_module.values())
    caught = sum(v["caught"] for v in per_module.values())
    print(f"\n== {caught}/{total} mutants caught; {len(results)} runs in {wall:.0f} s wall ({args.jobs} at a time), "
          f"{cpu:.0f} s CPU (~{cpu / 2:.0f} s on 2 idle cores)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"caught": caught, "mutants": total, "wall_seconds": wall, "cpu_seconds": cpu,
                       "modules": per_module}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
