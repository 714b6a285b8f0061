"""What every ``lora-bench`` subcommand does the same way: pick the device and dtype, stamp the JSON document's
header, honour ``--time-budget``, write the JSON (atomically, so a run killed by its cap leaves the last
complete document), and finish it.

The document header (:func:`doc_header`) is the provenance every result file carries: ``schema``, ``kind``
(``gpu`` or ``cpu-smoke``), ``label`` (None on a GPU; on the CPU the bench's own, e.g. :data:`CPU_LABEL`),
``created`` (local time, seconds), ``command`` (the ``lora-bench`` command line), ``gpu``, ``versions``,
``git_commit`` (unless left out) and ``git``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from typing import Dict, List, Optional, Tuple

import torch

from . import envinfo

__all__ = [
    "CPU_LABEL", "DTYPES", "write_json", "default_out_path", "gpu_record_path", "pick_device", "pick_dtype",
    "budget_spent", "budget_why", "doc_header", "finish_doc", "failed_rows", "add_seed_and_cpu", "add_out",
    "err_text", "print_footer",
]

CPU_LABEL = "CPU smoke, not a GPU measurement"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_seed_and_cpu(g) -> None:
    """``--seed`` (default 0) and ``--cpu`` (the CPU smoke path even with a GPU), as sgmv, merge and vce word
    them, on the argument group ``g``."""
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cpu", action="store_true", help="run the CPU smoke path even when a GPU is present")


def add_out(g, prefix: str) -> None:
    """``--out`` for a bench whose default path is :func:`default_out_path` with ``prefix``."""
    g.add_argument("--out", help=f"JSON path (default bench/results/<gpu>/{prefix}-<timestamp>.json; without a GPU "
                                 f"out/cpu-smoke/{prefix}-<timestamp>.json)")


def write_json(path: str, doc: dict) -> None:
    """Write ``doc`` to ``path`` (parent folders made) through a temporary file and a rename: a reader, or a run
    killed mid-write, never sees half a document."""
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def default_out_path(gpu_name: Optional[str], prefix: str = "sgmv") -> str:
    """``bench/results/<gpu>/<prefix>-<timestamp>.json`` on a GPU; ``out/cpu-smoke/...`` (git-ignored: a CPU
    smoke run is no measurement to keep) without one. Relative to the working directory."""
    ts = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if not gpu_name:
        return os.path.join("out", "cpu-smoke", f"{prefix}-{ts}.json")
    return os.path.join("bench", "results", envinfo.gpu_slug(gpu_name), f"{prefix}-{ts}.json")


def gpu_record_path(out: Optional[str], gpu_name: Optional[str], prefix: str) -> Optional[str]:
    """``out`` when given; else :func:`default_out_path` on a GPU, and None (no file) for a CPU run: the
    benchmarks whose CPU run is a smoke test only (dual, overhead) write nothing unless asked."""
    if out is not None:
        return out
    return default_out_path(gpu_name, prefix) if gpu_name else None


def pick_device(cpu: bool) -> Tuple[bool, torch.device]:
    """``(gpu, device)``: CUDA when there is one and ``--cpu`` was not given, else the CPU."""
    gpu = torch.cuda.is_available() and not cpu
    return gpu, torch.device("cuda" if gpu else "cpu")


def pick_dtype(name: Optional[str], gpu: bool, cpu_default: torch.dtype = torch.float32) -> torch.dtype:
    """The ``--dtype`` asked for, else bf16 on a GPU and ``cpu_default`` on the CPU."""
    if name:
        return DTYPES[name]
    return torch.bfloat16 if gpu else cpu_default


def budget_spent(budget: Optional[float], t0: float) -> bool:
    """True once more than ``budget`` seconds (``--time-budget``; None = no limit) have passed since ``t0``
    (a ``time.perf_counter()`` reading): the caller starts no new case."""
    return budget is not None and time.perf_counter() - t0 > budget


def budget_why(budget: float) -> str:
    """The ``why`` recorded for a case skipped by :func:`budget_spent`."""
    return f"time budget of {budget:.0f} s spent"


def doc_header(bench: str, schema: str, gpu: bool, label: Optional[str], env: Dict[str, object], args,
               git_commit: bool = True) -> dict:
    """The provenance fields a result document starts with (module docstring), for ``lora-bench <bench>``
    run with ``args`` (``args.argv``: its command line) in the environment ``env`` (``envinfo.collect``);
    ``label`` as given (each bench words its CPU label itself)."""
    doc = {
        "schema": schema, "kind": "gpu" if gpu else "cpu-smoke", "label": label,
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": f"lora-bench {bench} " + " ".join(getattr(args, "argv", []) or []),
        "gpu": env["gpu"], "versions": env["versions"],
    }
    if git_commit:
        doc["git_commit"] = env["git"]["commit"]
    doc["git"] = env["git"]
    return doc


def finish_doc(doc: dict, t0: float, path: str) -> None:
    """Mark ``doc`` complete, record the seconds since ``t0`` as ``elapsed_s`` and write it to ``path``."""
    doc["complete"] = True
    doc["elapsed_s"] = time.perf_counter() - t0
    write_json(path, doc)


def print_footer(skipped: List[dict], label: Optional[str], path: str) -> None:
    """The lines after a bench's table: each case skipped (``{"case", "why"}``), the CPU label if any, and
    where the JSON went."""
    for s in skipped:
        print(f"skipped {s['case']}: {s['why']}")
    if label:
        print(f"({label})")
    print(f"wrote {path}")


def err_text(e: BaseException) -> str:
    """An exception as a row's ``why``: its type and the first line of its message, at most 300 characters."""
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def failed_rows(rows: List[dict]) -> List[dict]:
    """The rows whose status is FAIL or ERROR (a benchmark exits 1 when there is one)."""
    return [r for r in rows if r["status"] in ("FAIL", "ERROR")]
