"""``lora-bench``: the command-line entry point (also ``python -m lora_kernels``).

Subcommands:
    demo   a mixed-adapter batch through a small LoRALinear model, checked against the fp32 reference
           (GPU if present, else CPU); exit status 1 if the check fails.
    sgmv   time ``add_lora_`` (and shrink + expand_, and the batch build) against the PyTorch baselines on
           BENCHMARKS.md's cases or a shape given on the command line; table + JSON. Without a GPU: a CPU smoke
           sweep on tiny shapes, labelled as such.
    linear the decode sweep (T = 1..64) of one LoRA'd linear layer (issue 15): the base GEMV alone, base +
           add_lora_, vLLM-style base + shrink + expand_, and the CUDA fused and decode kernels; us, launches per
           call, % of the bytes bound, ratio to the base GEMV; table + JSON (CPU smoke without a GPU).
    env    GPU, driver, torch / Triton / CUDA versions, compute capability, and which backends can run.
    merge  time merge, unmerge and the whole-model mode switch (7B shapes: 32 layers x q,k,v,o,gate,up,down)
           against ``W.addmm_`` and PEFT-style loops, in us and % of the bytes bound, with bit-exactness after
           unmerge; CPU smoke on small shapes without a GPU.
    vce    time deform_pool (VCE's multi-scale deformable pooling) fwd and fwd+bwd at the VCE shapes against the
           grid_sample reference, torch.compile of it and an fp32 Deformable-DETR-style kernel; time and peak
           memory; CPU smoke on tiny shapes without a GPU.
    dual   time the Dual-LoRA delta (forward, forward+backward; r = 32 on 4096 -> 4096) against PyTorch and
           torch.compile of it: time and peak memory, JSON (CPU smoke without a GPU).
    backward  fwd+bwd of the multi-adapter LoRA delta (grad x, A, B of 64 adapters of mixed ranks) in tokens/s
           against a per-adapter PyTorch loop, gradients checked; JSON (CPU smoke without a GPU).
    serve  decode-step latency of a patched Llama-style model with n adapters vs PEFT's mixed batch, eager
           and with CUDA graphs (issue 7); CPU smoke on tiny shapes without a GPU.
    overhead  host time per call of add_lora_, shrink, expand_, LoRALinear.forward and lora_linear with the device
           work stubbed (CPU), fast eager path vs the custom-op dispatcher path; real eager per-call time on CUDA.
    tune   time the Triton configs of each shape bucket on this GPU and write the tuning table (exit 2 without
           a GPU).

See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import List, Optional, Sequence

__all__ = ["main", "build_parser"]


# Each subcommand, in the order `lora-bench --help` lists them, with its one-line help. "env" is this module's own;
# every other is a module of the same name in lora_kernels.bench with add_arguments(parser) and run(args) (its
# docstring is the subcommand's --help text).
SUBCOMMANDS = (
    ("demo", "run a mixed-adapter batch through a small model and check it"),
    ("sgmv", "time the batched LoRA delta against the baselines"),
    ("linear", "decode sweep of a LoRA'd linear layer: base GEMV, the library, vLLM-style, the CUDA kernels"),
    ("merge", "time merge/unmerge and the whole-model mode switch against the baselines"),
    ("env", "GPU, versions and available backends"),
    ("vce", "time deform_pool (VCE) fwd and fwd+bwd against grid_sample and a DETR kernel"),
    ("tune", "tune the Triton configs on this GPU and write the table"),
    ("dual", "time the Dual-LoRA delta against PyTorch and torch.compile of it"),
    ("backward", "time fwd+bwd of the multi-adapter delta against a per-adapter loop"),
    ("serve", "decode-step latency of a patched model with n adapters vs PEFT's mixed batch"),  # issue 7
    ("overhead", "host time per op call (validation + dispatch), kernels stubbed; CUDA eager"),
)
# Subcommands implemented by a module of the same name in lora_kernels.bench.
BENCH_COMMANDS = tuple(name for name, _ in SUBCOMMANDS if name != "env")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lora-bench",
        description="Benchmarks, checks and tuning for lora_kernels (batched heterogeneous LoRA).",
        epilog="Examples: lora-bench demo | lora-bench env | lora-bench sgmv --cases 't256-*' | "
               "lora-bench sgmv --tokens 1,64,4096 --ranks 8,16,32,64,128 --dist zipf | lora-bench merge --layers 4 | "
               "lora-bench linear --tokens 1,16,64 --ranks 8,16,64 | lora-bench tune",
    )
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(name for name, _ in SUBCOMMANDS) + "}")
    for name, help_line in SUBCOMMANDS:
        if name == "env":
            e = sub.add_parser("env", help=help_line)
            e.add_argument("--json", action="store_true", help="print JSON instead of text")
            continue
        mod = importlib.import_module(f".bench.{name}", __package__)
        mod.add_arguments(sub.add_parser(name, help=help_line, description=mod.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter))
    return p


def env_report() -> dict:
    """Everything ``lora-bench env`` prints, as a dict. Never raises for a missing GPU or extension."""
    import torch

    from .bench import envinfo

    out: dict = {**envinfo.collect(None)}
    try:
        import lora_kernels as lk

        out["backends"] = lk.backends.report()
    except Exception as e:
        out["backends"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        import lora_kernels as lk

        out["dispatch"] = {
            "sgmv_cpu": lk.backends.select("sgmv", "cpu"),
            "sgmv_cuda": lk.backends.select("sgmv", "cuda") if torch.cuda.is_available() else None,
            "batch_cuda": lk.backends.select("batch", torch.device("cuda")) if torch.cuda.is_available() else None,
            "forced": lk.backends.forced(),
            "triton_interpreter": lk.backends.interpreting(),
        }
    except Exception as e:
        out["dispatch"] = {"error": f"{type(e).__name__}: {e}"}
    out["cuda_available"] = torch.cuda.is_available()
    if out["gpu"]:
        try:
            from . import tuning

            path = tuning.table_path(out["gpu"]["name"])
            import os

            out["tuning_table"] = path if os.path.exists(path) else f"none for this GPU (would be {path}); defaults"
        except Exception as e:
            out["tuning_table"] = f"error: {type(e).__name__}: {e}"
    return out


def _print_env(rep: dict) -> None:
    v = rep["versions"]
    print(f"lora_kernels {v['lora_kernels']}  python {v['python']}  torch {v['torch']} "
          f"(CUDA build {v['torch_cuda'] or 'none'})  triton {v['triton']}")
    print(f"platform: {v['platform']}")
    g = rep["gpu"]
    if g:
        mem = g["memory_bytes"] / 2**30
        l2 = f"{g['l2_bytes'] / 2**20:.0f} MiB L2" if g.get("l2_bytes") else "L2 unknown"
        print(f"GPU: {g['name']}  compute capability {g['capability']}  {g['sm_count']} SMs  {l2}  {mem:.0f} GiB")
        print(f"driver {g['driver']}  CUDA runtime (torch) {g['cuda_runtime']}")
        print(f"tuning table: {rep.get('tuning_table')}")
    else:
        print("GPU: none (torch.cuda.is_available() is False): ops run the CPU reference path")
    print("backends:")
    for k, val in rep["backends"].items():
        print(f"  {k:10s} {val}")
    d = rep.get("dispatch", {})
    if "error" in d:
        print(f"dispatch: {d['error']}")
    else:
        print(f"dispatch: CPU tensors -> {d['sgmv_cpu']}; CUDA tensors -> sgmv {d['sgmv_cuda'] or '-'}, "
              f"batch build {d['batch_cuda'] or '-'}; forced: {d['forced'] or 'no'}; "
              f"TRITON_INTERPRET: {'on' if d['triton_interpreter'] else 'off'}")
    git = rep["git"]
    print(f"git commit: {git['commit']}" + (" (dirty)" if git.get("dirty") else ""))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``lora-bench`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv_list: List[str] = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv_list)
    args.argv = argv_list[1:]
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "env":
        rep = env_report()
        if args.json:
            print(json.dumps(rep, indent=1, default=str))
        else:
            _print_env(rep)
        return 0
    if args.command in BENCH_COMMANDS:
        # Each subcommand lives in lora_kernels.bench.<name> (imported only when used: some pull transformers,
        # peft or Triton) and exposes run(args) -> exit status.
        return importlib.import_module(f".bench.{args.command}", __package__).run(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
