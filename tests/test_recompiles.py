"""No run-time recompiles in serving: the compiled variants of the persistent SGMV kernel over a serving sweep.

A server calls add_lora_ at every step with a new token count T and a new mix of adapters. Triton's JIT compiles
one kernel variant per distinct cache key: the constexprs, plus its launch specialisation of every other argument
(an integer equal to 1 becomes a constant, integers divisible by 16 and 16-byte aligned pointers get
``tt.divisibility``), unless the argument is in the kernel's ``do_not_specialize`` list. A key that changes with
T or with the adapter mix means a compile (seconds) in the middle of serving, the first time each value comes.

tests/triton_aot_driver.py ``--recompiles`` runs the sweep in a subprocess without the interpreter (the keys are
those of the real ``JITFunction``): T = 1..80, every odd T up to 511, 128/256/384/512; 1..64 active adapters
(tokens round-robin over them, some tokens with no adapter); a preallocated batch of capacity 512 rebuilt in
place, or a batch sized to T; weights with in = 256 and one slice of 128 or three (128, 64, 64), 64 adapters of
rank 16, in fp16/bf16/fp32, mixed mode (merged adapter varying) and not. Each launch is only recorded (the
launcher runs, the kernel does not), and its key is Triton's own (``compute_cache_key`` over the binder's
specialisation, as ``JITFunction.run`` computes it before compiling), for sm_90.
"""

from __future__ import annotations

import json

import pytest
from helpers import run_without_interpreter

pytest.importorskip("triton.compiler")

_PLAN_CONSTS = "EVEN_K"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("recompiles") / "sweep.json"
    r = run_without_interpreter(["tests/triton_aot_driver.py", "--recompiles", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text())


def _name(g):
    return f"{g['weights']} {g['dtype']} {'mixed' if g['mixed'] else 'plain'}"


def _table(sweep) -> str:
    """One line per (weights, dtype, mode) group and one per compiled variant: what the sweep shows."""
    lines = []
    for g in sweep["groups"]:
        lines.append(f"{_name(g)}: {g['n_keys']} compiled variant(s) over {len(g['buckets'])} config bucket(s) "
                     f"{[(b['T_min'], b['T_max']) for b in g['buckets']]}; without {_PLAN_CONSTS}: "
                     f"{g['n_keys_without'][_PLAN_CONSTS]}")
        lines += [f"    T {v['T_min']}..{v['T_max']} ({v['n_T']} values): {v['consts']} {v['attrs'] or ''}"
                  for v in g["variants"]]
    return "\n".join(lines)


def test_sweep_covers_serving(sweep):
    """The sweep is what it claims: every group saw every T 1..80 and the odd T above, every adapter count
    1..64, and crossed the two config buckets of ``tuning._default_persistent`` below 512 tokens."""
    from lora_kernels import tuning

    ts = set(range(1, 81)) | set(range(81, 512, 2)) | {128, 256, 384, 512}
    want_buckets = len({json.dumps(tuning._default_persistent("fp16", T, 256, 256, 16), sort_keys=True) for T in ts})
    assert want_buckets == 2
    assert len(sweep["groups"]) == 2 * 3 * 2
    for g in sweep["groups"]:
        assert set(g["Ts"]) == ts, _name(g)
        assert g["adapters"] == list(range(1, 65)), _name(g)
        assert g["launches"] == sweep["points"] >= 600, _name(g)
        assert len(g["buckets"]) == want_buckets, _name(g)
    print("\n" + _table(sweep))


def test_no_recompiles_beyond_the_config_buckets(sweep):
    """Per (weights, dtype, mode), the distinct compiled variants are at most the config buckets the sweep
    crosses: T and the adapter mix never reach a constexpr or a specialised argument, only the bucket does."""
    over = [f"{_name(g)}: {g['n_keys']} variants > {len(g['buckets'])} buckets" for g in sweep["groups"]
            if g["n_keys"] > len(g["buckets"])]
    assert not over, "\n".join(over) + "\n" + _table(sweep)


def test_recompiles_come_only_from_the_plan_constexprs(sweep):
    """With the constexprs persistent_plan derives from the shape (EVEN_K: whether `in` is a multiple of BLOCK_K) set aside, the
    variants are at most the config buckets, and no two variants differ in a specialisation attribute (alignment /
    divisibility of an argument): no recompile comes from a run-time argument such as P_S, N_K, KPS, TC, the
    plan's offsets, merged or a pointer."""
    bad = [f"{_name(g)}: {g['n_keys_without'][_PLAN_CONSTS]} variants > {len(g['buckets'])} buckets"
           for g in sweep["groups"] if g["n_keys_without"][_PLAN_CONSTS] > len(g["buckets"])]
    bad += [f"{_name(g)}: variants differ in {sorted(v['attrs'])}" for g in sweep["groups"] for v in g["variants"]
            if v["attrs"]]
    assert not bad, "\n".join(bad) + "\n" + _table(sweep)


def test_the_count_sees_a_specialised_argument(sweep):
    """Self-test: for each name in the kernel's do_not_specialize list, the same launches keyed as if that name
    were specialised (a mutant binder) give more variants in some group: the sweep moves every one of those
    arguments (P_S with T, TC and the plan offsets with the capacity, merged in mixed mode), so dropping any of
    them from the list would show up in the tests above."""
    dns = sweep["do_not_specialize"]
    assert {"merged", "P_S", "TC"} <= set(dns), dns
    # N_K and KPS are exempt: with in = 256 they stay in one specialisation class over the sweep (N_K in {2, 4}:
    # not 1, not a multiple of 16; KPS a multiple of 64); N_K > 1 is a run-time branch in the kernel
    blind = [n for n in dns if n not in ("N_K", "KPS")
             and not any(g["mutants"][n] > g["n_keys"] for g in sweep["groups"])]
    assert not blind, f"the sweep never moves {blind}: " + json.dumps([g["mutants"] for g in sweep["groups"]])
