"""One source of truth for every device-side layout (issue 16): lora_kernels/layouts.py describes them, the C++
header csrc/kernels/layouts.h is generated from it, and every consumer's view must agree with the description."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest
import torch

import lora_kernels as lk
from lora_kernels import gen_layouts, layouts
from lora_kernels.batch import MetaLayout
from lora_kernels.plan import PlanLayout, decode_counters, fused_counters

ROOT = pathlib.Path(__file__).resolve().parent.parent
CAPS = [(1, 1), (8, 4), (64, 64), (1000, 7), (4096, 512)]


def test_header_is_current():
    """The checked-in header is exactly what the description generates (regenerate: python -m lora_kernels.gen_layouts)."""
    assert layouts.HEADER.read_text() == layouts.render_header(), "run `python -m lora_kernels.gen_layouts`"
    assert gen_layouts.main(["--check"]) == 0


def test_check_fails_on_a_stale_header(tmp_path, capsys):
    stale = tmp_path / "layouts.h"
    stale.write_text(layouts.render_header().replace("seg_len() const { return 2 * max_tokens + 2 * max_active",
                                                     "seg_len() const { return 2 * max_tokens + 3 * max_active"))
    assert gen_layouts.main(["--check", "--out", str(stale)]) == 1
    assert "stale" in capsys.readouterr().err


def _cxx_program() -> str:
    """A program printing every offset of every layout, as the generated header computes it."""
    lines = ['#include "layouts.h"', "#include <cstdio>", "using namespace lora_kernels::layouts;", "int main() {"]
    for tc, ac in CAPS:
        for lay in (layouts.META, layouts.PLAN):
            lines.append(f"  {{ {lay.name} l{{{tc}, {ac}}};")
            for name in [f.name for f in lay.fields] + ["size"]:
                lines.append(f'    std::printf("{lay.name} {tc} {ac} {name} %lld\\n", (long long)l.{name}());')
            lines.append("  }")
    for n in (0, 5, 300):
        lines.append(f"  {{ PlanFamily l{{{n}}};")
        for name in [f.name for f in layouts.PLAN_FAMILY.fields] + ["size"]:
            lines.append(f'    std::printf("PlanFamily {n} - {name} %lld\\n", (long long)l.{name}());')
        lines.append("  }")
    for lay in (layouts.MERGE_JOB, layouts.SLICE_INFO):
        for name in [f.name for f in lay.fields] + ["size"]:
            lines.append(f'  std::printf("{lay.name} - - {name} %d\\n", {lay.name}::{name});')
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


def _python_view() -> dict:
    out = {}
    for tc, ac in CAPS:
        for lay in (layouts.META, layouts.PLAN):
            for k, v in lay.offsets(max_tokens=tc, max_active=ac).items():
                out[(lay.name, str(tc), str(ac), k)] = v
    for n in (0, 5, 300):
        for k, v in layouts.PLAN_FAMILY.offsets(n_max=n).items():
            out[("PlanFamily", str(n), "-", k)] = v
    for lay in (layouts.MERGE_JOB, layouts.SLICE_INFO):
        for k, v in lay.columns().items():
            out[(lay.name, "-", "-", k)] = v
    return out


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_generated_header_agrees_with_the_description(tmp_path):
    """Compile the header and compare every offset it computes with Python's (the C++ kernels' view)."""
    src = tmp_path / "offsets.cpp"
    src.write_text(_cxx_program())
    exe = tmp_path / "offsets"
    subprocess.run(["g++", "-std=c++17", "-O0", "-I", str(layouts.HEADER.parent), str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    got = {}
    for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines():
        name, a, b, field, value = line.split()
        got[(name, a, b, field)] = int(value)
    assert got == _python_view()


@pytest.mark.parametrize("tc,ac", CAPS)
def test_python_classes_follow_the_description(tc, ac):
    meta = MetaLayout(tc, ac)
    for k, v in layouts.META.offsets(max_tokens=tc, max_active=ac).items():
        assert getattr(meta, k) == v, k
    assert meta.scalars == meta.num_active
    assert MetaLayout.from_meta(torch.zeros(meta.size, dtype=torch.int32), tc) == meta
    plan = PlanLayout(tc, ac)
    off = layouts.PLAN.offsets(max_tokens=tc, max_active=ac)
    for k, v in off.items():
        assert getattr(plan, k) == v, k
    for bm in layouts.PLAN_BLOCK_M:
        assert plan.family(bm) == off[f"f{bm}_n_real"]
        assert plan.n_max(bm) == (tc + (ac + 1) * (bm - 1)) // bm
    buf = torch.arange(off["size"], dtype=torch.int32)
    assert decode_counters(buf)[0].item() == off["decode_counters"]
    assert len(decode_counters(buf)) == layouts.DECODE_COUNTERS
    assert fused_counters(buf)[0].item() == off["fused_counters"]


def test_torch_builder_writes_where_the_description_says():
    """The torch builder's fields, read at META's offsets, are the batch's documented values."""
    ids = torch.tensor([2, -1, 0, 2, 5, 0, 2], dtype=torch.int32)  # 5 is out of range for 4 adapters
    b = lk.LoRABatch(10, 4)
    b.build(ids, validate=False)
    off = layouts.META.offsets(max_tokens=10, max_active=4)
    m = b.meta
    assert m[off["token_adapter"] : off["token_adapter"] + 7].tolist() == [2, -1, 0, 2, -1, 0, 2]
    assert m[off["sorted_token_ids"] : off["sorted_token_ids"] + 7].tolist() == [2, 5, 0, 3, 6, 1, 4]
    assert m[off["active_adapters"] : off["active_adapters"] + 4].tolist() == [0, 2, -1, -1]
    assert m[off["seg_start"] : off["seg_start"] + 2].tolist() == [0, 2]
    assert m[off["seg_len"] : off["seg_len"] + 2].tolist() == [2, 3]
    assert [m[off[k]].item() for k in ("num_active", "num_valid", "num_invalid")] == [2, 5, 1]


def test_plan_builder_writes_where_the_description_says():
    ids = torch.tensor([1] * 20 + [-1] * 3 + [0] * 2, dtype=torch.int32)
    b = lk.LoRABatch(32, 4)
    b.build(ids)
    lay = PlanLayout(32, 4)
    f16 = layouts.PLAN_FAMILY.offsets(n_max=lay.n_max(16))
    base = lay.family(16)
    p = b.plan
    assert p[base + f16["n_real"]].item() == 1 + 2  # adapter 0: 2 rows, adapter 1: 20 rows = 2 tiles
    assert p[base + f16["n_all"]].item() == 4  # + the virtual segment of the 3 -1 tokens
    assert p[base + f16["len"] : base + f16["len"] + 4].tolist() == [2, 16, 4, 3]
    assert p[base + f16["adapter"] : base + f16["adapter"] + 5].tolist() == [0, 1, 1, -1, -1]
    assert p[base + f16["pos0"] : base + f16["pos0"] + 4].tolist() == [0, 2, 18, 22]


def test_layout_rejects_duplicate_fields():
    with pytest.raises(ValueError, match="unique"):
        layouts.Layout("X", "int32_t", (), (layouts.Field("a"), layouts.Field("a")))
