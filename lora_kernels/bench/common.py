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
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, TypeVar

import torch

from . import envinfo

__all__ = [
    "CPU_LABEL", "DTYPES", "write_json", "default_out_path", "gpu_record_path", "pick_device", "pick_dtype",
    "budget_spent", "budget_why", "doc_header", "finish_doc", "failed_rows", "add_seed_and_cpu", "add_out",
    "err_text", "print_footer", "fmt", "fmt_us", "render_table", "not_ok", "run_sweep", "exit_status",
    "sweep_doc", "print_start",
]

_Item = TypeVar("_Item")

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


def exit_status(rows: List[dict], where: Callable[[dict], str]) -> int:
    """1 when a row failed or errored (:func:`failed_rows`; each named by ``where(row)`` in a printed line), else
    0: what a bench's ``run`` returns."""
    bad = failed_rows(rows)
    if bad:
        print(f"{len(bad)} row(s) FAILED or ERRORED: " + ", ".join(where(r) for r in bad))
    return 1 if bad else 0


def sweep_doc(header: dict, **fields) -> dict:
    """A case-by-case bench's document: ``header`` (:func:`doc_header`) and ``fields``, then what :func:`run_sweep`
    fills in (``cases``, ``rows``, ``skipped_cases``) and ``complete`` (False until :func:`finish_doc`)."""
    return {**header, **fields, "cases": [], "rows": [], "skipped_cases": [], "complete": False}


def print_start(bench: str, label: Optional[str], dtype_name: str, gpu_line: str) -> None:
    """The line a sweep starts with: on the CPU its ``label`` and dtype, on a GPU ``gpu_line`` (GPU, dtype, timing
    and ceilings, as the bench words them)."""
    if label:
        print(f"lora-bench {bench}: {label} ({dtype_name} on the CPU, wall-clock timing)")
    else:
        print(f"lora-bench {bench}: {gpu_line}")


def run_sweep(items: Iterable[_Item], name: Callable[[_Item], str], one: Callable[[_Item], dict], doc: dict,
              path: str, budget: Optional[float], desc: str, progress: bool) -> float:
    """The loop of a case-by-case bench: for each item (a case), ``one(item)`` returns ``{"case": <dict>,
    "rows": [...]}``, appended to ``doc["cases"]`` and ``doc["rows"]``, and ``doc`` is rewritten to ``path`` (a
    run killed by its cap keeps what ran); an item reached after ``budget`` seconds (:func:`budget_spent`) is not
    run but listed in ``doc["skipped_cases"]`` as ``{"case": name(item), "why"}``. A tqdm bar ``desc`` on stderr
    when ``progress``. Returns the ``time.perf_counter()`` reading taken at the start (for :func:`finish_doc`)."""
    try:
        from tqdm import tqdm
    except Exception:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    bar = tqdm(items, desc=desc, unit="case", file=sys.stderr, mininterval=1.0) if tqdm and progress else None
    t0 = time.perf_counter()
    for item in bar if bar is not None else items:
        if bar is not None:
            bar.set_postfix_str(name(item))
        if budget_spent(budget, t0):
            doc["skipped_cases"].append({"case": name(item), "why": budget_why(budget)})
            continue
        res = one(item)
        doc["cases"].append(res["case"])
        doc["rows"].extend(res["rows"])
        write_json(path, doc)
    if bar is not None:
        bar.close()
    return t0


def fmt(v: Optional[float], spec: str, dash: str = "-") -> str:
    """``v`` formatted with ``spec``, or ``dash`` when it is None (a cell with no value)."""
    return dash if v is None else format(v, spec)


def fmt_us(r: dict, spec: str = ".2f") -> str:
    """A row's time cell: ``median [p25-p75]`` of ``us_median`` / ``us_p25`` / ``us_p75`` in ``spec``, or "-"."""
    if r["us_median"] is None:
        return "-"
    return f"{r['us_median']:{spec}} [{r['us_p25']:{spec}}-{r['us_p75']:{spec}}]"


def not_ok(r: dict) -> bool:
    """True for a row that failed, errored or was skipped: the rows whose ``why`` a table prints."""
    return r["status"] in ("FAIL", "ERROR", "SKIP")


def render_table(hdr: Sequence[str], cells: Sequence[Sequence[str]], rows: Sequence[dict], group: Optional[str] = None,
                 show_why: Callable[[dict], bool] = not_ok) -> str:
    """A bench's printed table: the header ``hdr`` and one line of ``cells`` per row of ``rows``, each column as
    wide as its widest cell, a rule under the header, a blank line wherever ``row[group]`` changes (no grouping
    when None), and ``    -> why`` under each row with a ``why`` for which ``show_why(row)`` holds."""
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(hdr)]
    out = ["  ".join(h.ljust(w) for h, w in zip(hdr, widths)), "  ".join("-" * w for w in widths)]
    prev = None
    for line, r in zip(cells, rows):
        if group is not None and prev is not None and r[group] != prev:
            out.append("")
        prev = r[group] if group is not None else None
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
        if r.get("why") and show_why(r):
            out.append(f"    -> {r['why']}")
    return "\n".join(out)
