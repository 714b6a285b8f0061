"""Write (or ``--check``) ``csrc/kernels/layouts.h`` from :mod:`lora_kernels.layouts`: ``python -m
lora_kernels.gen_layouts``. A module of its own so that ``-m`` does not re-run a module the package already imported."""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Sequence

from .layouts import HEADER, render_header

__all__ = ["main"]


def main(argv: Sequence[str] = ()) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_kernels.gen_layouts", description="Write csrc/kernels/layouts.h")
    ap.add_argument("--check", action="store_true", help="exit 1 if the checked-in header is not current")
    ap.add_argument("--out", default=str(HEADER), help="where to write the header (default: csrc/kernels/layouts.h)")
    args = ap.parse_args(list(argv))
    text = render_header()
    out = pathlib.Path(args.out)
    if args.check:
        current = out.read_text() if out.exists() else ""
        if current != text:
            print(f"{out} is stale: run `python -m lora_kernels.gen_layouts`", file=sys.stderr)
            return 1
        return 0
    out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
