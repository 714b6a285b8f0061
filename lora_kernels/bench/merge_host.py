"""Host planning time of a whole-model merge / unmerge / switch (``lora-bench merge``'s ``host_planning`` field).

What is timed: ``merge_many_`` / ``unmerge_many_`` / ``ModeController.set_mode`` with the grouped kernel launch
stubbed out (:func:`lora_kernels.ops.merge.dispatch._run` replaced by a no-op, on the Triton or CUDA path; the reference
backend is replaced by Triton's host path on the CPU), so the numbers are the host work of a switch: validation,
the plan (cached or not), the descriptor tables, the per-call code-column rebase, the escape-count read
(one host sync; on a GPU it then waits for nothing but the counter's zero-fill) and the records. The weights
are not modified. ``cold``: the plan cache cleared first; ``warm``: the same switch again (minimum over
``reps``, milliseconds, wall clock; cold is also a minimum over ``reps`` cleared caches).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, List, Sequence

import torch

__all__ = ["host_planning"]


@contextlib.contextmanager
def _stubbed_launch(device: torch.device):
    from ..ops.merge import dispatch

    run, select = dispatch._run, dispatch._select
    dispatch._run = lambda *a, **k: None
    if device.type == "cpu":  # the reference backend has no tables: time Triton's host path (never launched)
        dispatch._select = lambda dev: "triton"
    try:
        yield
    finally:
        dispatch._run, dispatch._select = run, select


def _time(fn: Callable[[], None], reps: int, sync: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def host_planning(Ws: Sequence[torch.Tensor], ws: Sequence, layers: Sequence, a: int, k: int, exact: bool = True,
                  reps: int = 5) -> Dict[str, object]:
    """Host milliseconds per whole-model operation, cold and warm plan cache (see the module docstring).

    Args:
        Ws / ws: every target weight and its LoRAWeights; ``layers``: the model's LoRALinear layers (for the
            controller rows); ``a`` / ``k``: two adapters loaded in every layer.

    Returns a JSON-able dict: ``{"weights", "method", "merge_cold_ms", "merge_warm_ms", "unmerge_cold_ms",
    "unmerge_warm_ms", "switch_cold_ms", "switch_warm_ms", "set_mode_cold_ms", "set_mode_warm_ms"}``
    (switch: unmerge a + merge k; set_mode: ``ModeController.set_mode("merged", k)`` from merged a).
    """
    from ..nn import ModeController
    from ..ops import merge as M
    from ..ops import merge_plan as MP

    Ws, ws = list(Ws), list(ws)
    dev = Ws[0].device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    out: Dict[str, object] = {"weights": len(Ws), "method": __doc__.split("\n\n")[1].replace("\n", " ")}
    st: Dict[str, List] = {}

    def merge(adapter):
        def f():
            st["recs"] = M.merge_many_(Ws, ws, [adapter], exact=exact)
        return f

    def unmerge():
        M.unmerge_many_(Ws, st.pop("recs"))

    def switch(x, y):
        def f():
            unmerge()
            merge(y)()
        return f

    with _stubbed_launch(dev):
        for x in (a, k):  # imports and first-call costs are not planning: warm them up
            merge(x)()
            unmerge()
        cold: Dict[str, List[float]] = {"merge": [], "unmerge": [], "switch": [], "set_mode": []}
        warm: Dict[str, List[float]] = {"merge": [], "unmerge": [], "switch": [], "set_mode": []}
        ctl = ModeController(list(layers), exact=exact) if layers else None
        for _ in range(reps):
            MP.clear()
            cold["merge"].append(_time(merge(a), 1, sync))
            warm["unmerge"].append(0.0)  # placeholder, replaced below (the record's unmerge tables are new)
            cold["unmerge"].append(_time(unmerge, 1, sync))
            warm["merge"].append(_time(merge(a), 1, sync))
            warm["unmerge"][-1] = _time(unmerge, 1, sync)
            merge(a)()
            MP.clear()  # k's plan cold (the unmerge of a reuses its records' own plan)
            cold["switch"].append(_time(switch(a, k), 1, sync))
            warm["switch"].append(min(_time(switch(k, a), 1, sync), _time(switch(a, k), 1, sync)))
            unmerge()
            if ctl is not None:
                ctl.set_mode("merged", a)
                MP.clear()
                cold["set_mode"].append(_time(lambda: ctl.set_mode("merged", k), 1, sync))
                warm["set_mode"].append(min(_time(lambda: ctl.set_mode("merged", a), 1, sync),
                                            _time(lambda: ctl.set_mode("merged", k), 1, sync)))
                ctl.set_mode("unmerged")
        for op in cold:
            if cold[op]:
                out[op + "_cold_ms"], out[op + "_warm_ms"] = min(cold[op]), min(warm[op])
        out["reps"] = reps
    MP.clear()
    return out
