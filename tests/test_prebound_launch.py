"""The pre-bound launch of the persistent SGMV kernel (``triton.sgmv.add_lora_prepared_``: a cached record per
(weights, batch, x/y layout), the CompiledKernel's launcher called directly) against the plain launch
(``sgmv.PREBOUND = False``: ``kernel[grid](...)`` through Triton's JITFunction.run, nothing cached).

No GPU needed: a child process (``TRITON_INTERPRET`` unset) runs under the stand-in sm_90 driver of
``lora-bench overhead``'s launcher mode (:func:`lora_kernels.bench.overhead.launcher_driver`: real compiles,
Triton's real CudaLauncher, a recording no-op in place of ``cuda_utils.launch``). For each call of a sequence
that varies what a record must or must not depend on (x / y of other pointers, misaligned x / y views,
``merged``, adapters added and removed, a batch rebuilt for another T), the op runs once pre-bound and once
plain, and the arguments the driver launch received (grid, stream, function handle, packed metadata, launch
hooks, scratch, every kernel argument, tensors compared by pointer, dtype, shape and strides) must be
identical. The same sequence with a deliberately stale cache (an entry of the record key dropped) must show
mismatches: the comparison can fail.
"""

import json
import os
import subprocess
import sys

import pytest

_CHILD = r'''
import json, sys
import torch
from triton.knobs import HookChain
import lora_kernels as lk
from lora_kernels.bench import overhead as ov
from lora_kernels.triton import sgmv as tri

K = OUT = 64
kern = tri._sgmv_persistent_kernel
plain_runs = [0]  # JITFunction.run calls: a pre-bound launch makes none
_run = kern.run


def counting_run(*a, **k):
    plain_runs[0] += 1
    return _run(*a, **k)


kern.run = counting_run
_key = tri._prepared_key
# stale variants: the record key without one of its entries (index in _prepared_key's tuple)
DROP = {"": None, "batch_T": 7, "y_align": 14, "mixed": 15}


def norm(v):
    if isinstance(v, torch.Tensor):
        return ["tensor", v.data_ptr(), str(v.dtype), list(v.shape), list(v.stride())]
    if isinstance(v, HookChain):
        return ["hooks", id(v), len(v.calls)]
    if isinstance(v, (tuple, list)):
        return [norm(u) for u in v]
    if v is None or isinstance(v, (bool, int, float, str, bytes)):
        return repr(v)
    return "object " + type(v).__name__


def launch_args(log):
    """The last driver launch, normalised; launch_metadata (index 8) is dropped: it is only read by launch hooks,
    and none is set (checked), so the plain path's LazyDict and the pre-bound None are equivalent."""
    call = log[-1]
    assert isinstance(call[9], HookChain) and not call[9].calls and not call[10].calls
    return norm(call[:8] + call[9:])


def sequence(stale, stub):
    drop = DROP[stale]
    tri._prepared_key = _key if drop is None else (lambda *a: (lambda k: k[:drop] + k[drop + 1:])(_key(*a)))
    tri._PREPARED.clear()
    g = torch.Generator().manual_seed(0)
    w = lk.LoRAWeights(K, OUT, 4, 8, dtype=torch.bfloat16)
    for r in (8, 4, 8):
        w.add(torch.randn(r, K, generator=g).bfloat16(), torch.randn(OUT, r, generator=g).bfloat16(), alpha=8.0)
    T = 4
    batch = lk.LoRABatch(64, 4).build(torch.tensor([0, 1, -1, 2], dtype=torch.int32), ranks=w.ranks)

    def xy(T, off_x=0, off_y=0):  # fresh tensors; off_*: views 1 element into a buffer (not 16-byte aligned)
        xb = torch.randn(T * K + 8, generator=g).bfloat16()
        yb = torch.randn(T * OUT + 8, generator=g).bfloat16()
        return yb[off_y:off_y + T * OUT].view(T, OUT), xb[off_x:off_x + T * K].view(T, K)

    steps = []
    y, x = xy(T)
    steps += [("first", y, x, None), ("same", y, x, None)]
    y, x = xy(T)
    steps += [("other x/y", y, x, None), ("merged=0", y, x, 0), ("merged=2", *xy(T), 2), ("merged=None", *xy(T), None)]
    steps += [("x misaligned", *xy(T, off_x=1), None), ("x misaligned again", *xy(T, off_x=1), None)]
    steps += [("y misaligned", *xy(T, off_y=1), None), ("y misaligned again", *xy(T, off_y=1), None)]
    out = []
    for name, y, x, m in steps:
        out.append(compare(name, y, x, w, batch, m, stub))
    w.remove(1)
    w.add(torch.randn(2, K, generator=g).bfloat16(), torch.randn(OUT, 2, generator=g).bfloat16(), alpha=2.0)
    out += [compare("after remove/add", *xy(T), w, batch, None, stub), compare("again", *xy(T), w, batch, None, stub)]
    T = 40
    batch.build(torch.arange(T, dtype=torch.int32) % 4 - 1, ranks=w.ranks)
    out += [compare("rebuilt T=40", *xy(T), w, batch, None, stub), compare("again", *xy(T), w, batch, None, stub)]
    b2 = lk.LoRABatch(64, 4).build(torch.zeros(T, dtype=torch.int32), ranks=w.ranks)
    out += [compare("other batch", *xy(T), w, b2, None, stub), compare("again", *xy(T), w, b2, None, stub),
            compare("mixed", *xy(T), w, b2, 2, stub), compare("again", *xy(T), w, b2, 1, stub)]
    tri._prepared_key = _key
    return out


def compare(name, y, x, w, batch, m, stub):
    """One step: the op pre-bound, then plain; the two launches' arguments."""
    stub.log = []
    runs0 = plain_runs[0]
    tri.PREBOUND = True
    lk.add_lora_(y, x, w, batch, merged=m)
    prebound = runs0 == plain_runs[0]  # no JITFunction.run: the pre-bound launch ran
    got = launch_args(stub.log)
    tri.PREBOUND = False
    lk.add_lora_(y, x, w, batch, merged=m)
    tri.PREBOUND = True
    want = launch_args(stub.log)
    assert len(stub.log) == 2, len(stub.log)
    return {"step": name, "prebound": prebound, "same": got == want,
            "diff": [i for i, (u, v) in enumerate(zip(got, want)) if u != v] + ([len(got)] * (len(got) != len(want)))}


with torch.no_grad(), ov.launcher_driver() as stub:
    print(json.dumps({stale: sequence(stale, stub) for stale in sys.argv[1].split(",")}))
'''


def _run_child(stales):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", _CHILD, ",".join(stales)], env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_prebound_launch_matches_the_plain_launch_and_a_stale_cache_would_not():
    pytest.importorskip("triton")
    res = _run_child(["", "batch_T", "y_align", "mixed"])
    good = res[""]
    bad = [s for s in good if not s["same"]]
    assert not bad, bad
    # the pre-bound launch really ran: on every step whose record was already cached ("merged=None" is not: the
    # mixed calls grew the batch's workspace, so the first non-mixed record no longer fits)
    hits = [s["step"] for s in good if s["prebound"]]
    assert hits == ["same", "other x/y", "merged=2", "x misaligned again", "y misaligned again",
                    "again", "again", "again", "again"], hits
    # a record key missing an entry reuses a record for a launch it does not fit: the comparison sees it
    for stale, step in (("batch_T", "rebuilt T=40"), ("y_align", "y misaligned"), ("mixed", "merged=0")):
        got = {s["step"]: s for s in res[stale]}[step]
        assert got["prebound"] and not got["same"], (stale, got)
