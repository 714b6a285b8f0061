"""The compiled extension: import hygiene and schema (AOT), the JIT build, and (on a GPU) the CUDA batch builder
against the executable spec ``build_batch_torch_``, field by field, and under CUDA-graph capture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import assert_compiled_cuda_op
from helpers import extension_unbuildable_reason as _can_build
from helpers import require_aot_extension as _require_aot

from lora_kernels import _ext
from lora_kernels.batch import MetaLayout, build_batch_torch_

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = (
    "lora_kernels_C::build_batch_(Tensor(a!) meta, Tensor adapter_ids, Tensor? ranks, int max_tokens, "
    "int max_adapters) -> ()"
)


def _run(code: str, env: dict | None = None, timeout: float = 900) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last, which is returned."""
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False, capture_output=True, text=True, env=full_env, cwd=REPO, timeout=timeout,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- AOT module ------------------------------------------------------------------------------------------
def test_import_does_not_initialise_cuda_and_registers_schema():
    _require_aot()
    out = _run(
        """
        import json, sys, torch
        import lora_kernels
        import lora_kernels._C
        from lora_kernels import _ext
        op = torch.ops.lora_kernels_C.build_batch_
        ns = _ext.get(build=False)
        print(json.dumps({
            "cuda_initialized": torch.cuda.is_initialized(),
            "schema": str(op.default._schema),
            "mutable": [a.alias_info is not None and a.alias_info.is_write for a in op.default._schema.arguments],
            "origin": _ext.origin(), "status": _ext.status(), "same": ns is torch.ops.lora_kernels_C,
            "cpp_extension_imported": "torch.utils.cpp_extension" in sys.modules,
        }))
        """
    )
    assert out["cuda_initialized"] is False
    assert out["schema"] == SCHEMA
    assert out["mutable"] == [True, False, False, False, False]
    assert out["origin"] == "aot" and out["status"] == "available (aot)" and out["same"]
    assert out["cpp_extension_imported"] is False  # the AOT path never touches the JIT machinery


def test_import_ext_is_cheap():
    out = _run(
        """
        import json, sys, torch
        import lora_kernels._ext as e
        print(json.dumps({"cuda": torch.cuda.is_initialized(), "C": "lora_kernels._C" in sys.modules,
                          "cpp_extension": "torch.utils.cpp_extension" in sys.modules, "origin": e.origin()}))
        """
    )
    assert out == {"cuda": False, "C": False, "cpp_extension": False, "origin": None}


def test_meta_impl_for_fake_tensors():
    _require_aot()
    import lora_kernels._C  # noqa: F401

    lay = MetaLayout(8, 4)
    meta = torch.empty(lay.size, dtype=torch.int32, device="meta")
    ids = torch.empty(5, dtype=torch.int32, device="meta")
    torch.ops.lora_kernels_C.build_batch_(meta, ids, None, 8, 4)


def test_sgmv_decode_schema_and_meta_impl():
    """lora_kernels_C::sgmv_decode_ declares what it writes (y, the partial workspace, the counters) and has a
    Meta impl (fake tensors, torch.compile)."""
    _require_aot()
    import lora_kernels._C  # noqa: F401

    op = torch.ops.lora_kernels_C.sgmv_decode_
    args = op.default._schema.arguments
    written = [a.name for a in args if a.alias_info is not None and a.alias_info.is_write]
    assert written == ["y", "partial", "counters"], str(op.default._schema)
    m = dict(device="meta")
    op(torch.empty(4, 64, **m), torch.empty(4, 32, **m), torch.empty(1, 8, 32, **m), torch.empty(8, 64, **m),
       torch.empty(2, dtype=torch.int64, **m), torch.empty(1, 2, dtype=torch.int32, **m),
       torch.empty(1, 2, **m), torch.empty(4, dtype=torch.int32, **m), [64], 4, -1, torch.empty(16, **m),
       torch.empty(4, dtype=torch.int32, **m))


def test_fused_lora_linear_schema_and_meta_impl():
    """lora_kernels_C::fused_lora_linear_ declares what it writes (y, the workspace, the counters), takes an
    optional bias, and has a Meta impl (fake tensors, torch.compile)."""
    _require_aot()
    import lora_kernels._C  # noqa: F401

    op = torch.ops.lora_kernels_C.fused_lora_linear_
    args = op.default._schema.arguments
    written = [a.name for a in args if a.alias_info is not None and a.alias_info.is_write]
    assert written == ["y", "workspace", "counters"], str(op.default._schema)
    assert str(args[3].type) == "Optional[Tensor]" and args[3].name == "bias", str(op.default._schema)
    m = dict(device="meta")
    for bias in (torch.empty(64, **m), None):
        op(torch.empty(4, 64, **m), torch.empty(4, 32, **m), torch.empty(64, 32, **m), bias,
           torch.empty(1, 8, 32, **m), torch.empty(8, 64, **m), torch.empty(2, dtype=torch.int64, **m),
           torch.empty(1, 2, dtype=torch.int32, **m), torch.empty(1, 2, **m), torch.empty(4, dtype=torch.int32, **m),
           [64], 4, -1, torch.empty(320, **m), torch.empty(9, dtype=torch.int32, **m))


# ---- settings --------------------------------------------------------------------------------------------
def test_cuda_arch_flags():
    assert _ext.cuda_arch_flags("9.0a;8.0;PTX:9.0") == [
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    assert _ext.cuda_arch_flags("8.6+PTX 10.0f") == [
        "-gencode=arch=compute_86,code=sm_86",
        "-gencode=arch=compute_86,code=compute_86",
        "-gencode=arch=compute_100f,code=sm_100f",
    ]
    default = os.environ.get("LORA_KERNELS_CUDA_ARCHS") or _ext.DEFAULT_ARCHS
    assert _ext.cuda_arch_flags() == _ext.cuda_arch_flags(default)
    with pytest.raises(ValueError, match="LORA_KERNELS_CUDA_ARCHS"):
        _ext.cuda_arch_flags("sm_90")


def test_jit_reasons(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_NO_JIT", "1")
    assert _ext._try_jit() == "JIT disabled (LORA_KERNELS_NO_JIT=1)"
    monkeypatch.delenv("LORA_KERNELS_NO_JIT")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert _ext._try_jit() == "torch is a CPU-only build"
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(_ext, "cuda_home", lambda: None)
    assert _ext._try_jit() == "nvcc not found (set CUDA_HOME)"


def test_source_dir_has_every_translation_unit():
    root = _ext.source_dir()
    assert root is not None
    names = {os.path.basename(p) for p in _ext.sources(root)}
    assert {"bindings.cpp", "lora_batch.cu"} <= names


# ---- JIT -------------------------------------------------------------------------------------------------
def test_jit_build_into_cache(tmp_path):
    why = _can_build()
    if why:
        pytest.skip(f"cannot JIT-build here: {why}")
    # A fresh process, where the AOT module is made unimportable so get() takes the JIT path.
    out = _run(
        """
        import json, os, torch
        from lora_kernels import _ext
        _ext.AOT_MODULE = "lora_kernels._C_not_there"
        ns = _ext.get()
        op = torch.ops.lora_kernels_C.build_batch_
        print(json.dumps({"ok": ns is not None, "status": _ext.status(), "origin": _ext.origin(),
                          "schema": str(op.default._schema), "cuda_initialized": torch.cuda.is_initialized(),
                          "dir": _ext.jit_build_dir(_ext.source_dir(), _ext.cuda_arch_flags())}))
        """,
        env={"LORA_KERNELS_CACHE": str(tmp_path), "LORA_KERNELS_NO_JIT": "0"},
    )
    assert out["ok"], out["status"]
    assert out["origin"] == "jit" and out["status"] == "available (jit)"
    assert out["schema"] == SCHEMA
    assert out["cuda_initialized"] is False
    assert out["dir"].startswith(os.path.join(str(tmp_path), "jit"))
    assert any(f.endswith(".so") for f in os.listdir(out["dir"]))


# ---- CUDA: the builder against the spec -----------------------------------------------------------------
def _cuda_ops():
    """The side under test: the extension's ops (``torch.ops.lora_kernels_C``), compared with the torch builder
    ``build_batch_torch_`` (the spec), never with itself."""
    ns = _ext.get()
    if ns is None:
        pytest.fail(f"CUDA extension unavailable on a GPU machine: {_ext.status()}")
    assert_compiled_cuda_op(ns.build_batch_, "lora_kernels_C::build_batch_")
    return ns


def test_builder_under_test_is_the_compiled_op():
    """CPU side of the -m cuda builder tests below: what they call is the extension's C++ op with a CUDA kernel
    from csrc/bindings.cpp, a different code path from ``build_batch_torch_`` they compare it with."""
    _require_aot()
    ops = _cuda_ops()
    assert ops.build_batch_ is not build_batch_torch_


def _ids(kind: str, T: int, N: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "uniform":  # includes -1
        return torch.randint(-1, N, (T,), generator=gen, dtype=torch.int32)
    if kind == "zipf":
        p = 1.0 / torch.arange(1, N + 1, dtype=torch.float64) ** 1.1
        if T == 0:
            return torch.zeros(0, dtype=torch.int32)
        ids = torch.multinomial(p, T, replacement=True, generator=gen).to(torch.int32)
        return torch.where(torch.rand(T, generator=gen) < 0.1, torch.full_like(ids, -1), ids)
    if kind == "one":
        return torch.full((T,), N - 1, dtype=torch.int32)
    if kind == "none":
        return torch.full((T,), -1, dtype=torch.int32)
    if kind == "invalid":  # ids < -1 and >= N mixed in
        return torch.randint(-3, N + 3, (T,), generator=gen, dtype=torch.int32)
    raise ValueError(kind)


def _ranks(kind: str, N: int, gen: torch.Generator):
    if kind == "none":
        return None
    if kind == "1d":
        return torch.randint(1, 65, (N + 3,), generator=gen, dtype=torch.int32)
    if kind == "2d":
        return torch.randint(0, 129, (3, N), generator=gen, dtype=torch.int32)
    if kind == "2d-transposed":  # non-contiguous [S, N] view
        return torch.randint(0, 129, (N + 1, 2), generator=gen, dtype=torch.int32).t()
    raise ValueError(kind)


def _compare(meta_cuda: torch.Tensor, meta_ref: torch.Tensor, lay: MetaLayout, what: str) -> None:
    got, ref = meta_cuda.cpu(), meta_ref
    fields = {
        "token_adapter": (lay.token_adapter, lay.max_tokens),
        "sorted_token_ids": (lay.sorted_token_ids, lay.max_tokens),
        "active_adapters": (lay.active_adapters, lay.max_active),
        "seg_start": (lay.seg_start, lay.max_active),
        "seg_len": (lay.seg_len, lay.max_active),
        "scalars (num_active, max_rank, num_valid, num_invalid)": (lay.scalars, 4),
    }
    for name, (start, n) in fields.items():
        g, r = got[start : start + n], ref[start : start + n]
        if not torch.equal(g, r):
            bad = (g != r).nonzero()[:5, 0].tolist()
            raise AssertionError(f"{what}: {name} differs at {bad}: got {g[bad].tolist()}, expected {r[bad].tolist()}")


def _check_case(T: int, N: int, id_kind: str, rank_kind: str, seed: int, slack: int = 0, strided: bool = False):
    ops = _cuda_ops()
    gen = torch.Generator().manual_seed(seed)
    Tc = max(T + slack, 1)
    lay = MetaLayout(Tc, min(Tc, N))
    ids = _ids(id_kind, T, N, gen)
    ranks = _ranks(rank_kind, N, gen)
    init = torch.randint(-9, 9, (lay.size,), generator=gen, dtype=torch.int32)  # garbage: every field rewritten
    ref = init.clone()
    build_batch_torch_(ref, ids, ranks, Tc, N)
    meta = init.cuda()
    ids_dev = ids.cuda()
    if strided:
        ids_dev = torch.stack([ids_dev, torch.full_like(ids_dev, 12345)], 1)[:, 0]
        assert ids_dev.stride(0) == 2
    ops.build_batch_(meta, ids_dev, None if ranks is None else ranks.cuda(), Tc, N)
    torch.cuda.synchronize()
    _compare(meta, ref, lay, f"T={T} N={N} ids={id_kind} ranks={rank_kind} Tc={Tc} strided={strided}")


@pytest.mark.cuda
@pytest.mark.parametrize("T", [0, 1, 7, 1000, 70000])
@pytest.mark.parametrize("N", [1, 7, 64, 10000, 70000])
def test_cuda_builder_matches_spec(T, N):
    for seed, id_kind in enumerate(["uniform", "zipf", "one", "none", "invalid"]):
        rank_kind = ["none", "1d", "2d", "2d-transposed", "2d"][seed]
        _check_case(T, N, id_kind, rank_kind, seed=1000 * T + N + seed)


@pytest.mark.cuda
@pytest.mark.parametrize("T,N", [(33, 5), (4097, 300), (70000, 70000), (65536, 65536)])
def test_cuda_builder_slack_and_strided_ids(T, N):
    _check_case(T, N, "invalid", "2d", seed=7, slack=13, strided=True)
    _check_case(T, N, "uniform", "1d", seed=8, slack=0, strided=True)


@pytest.mark.cuda
def test_cuda_builder_checks_arguments():
    ops = _cuda_ops()
    lay = MetaLayout(8, 4)
    meta = torch.zeros(lay.size, dtype=torch.int32, device="cuda")
    ids = torch.zeros(9, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="max_tokens"):
        ops.build_batch_(meta, ids, None, 8, 4)
    with pytest.raises(RuntimeError, match="int32"):
        ops.build_batch_(meta, ids[:4].long(), None, 8, 4)
    with pytest.raises(RuntimeError, match="ranks"):
        ops.build_batch_(meta, ids[:4], torch.zeros(3, dtype=torch.int32, device="cuda"), 8, 4)


@pytest.mark.cuda
@pytest.mark.parametrize("T,N", [(1000, 64), (70000, 70000)])
def test_cuda_builder_graph_capture_replay(T, N):
    ops = _cuda_ops()
    gen = torch.Generator().manual_seed(T + N)
    lay = MetaLayout(T, min(T, N))
    meta = torch.zeros(lay.size, dtype=torch.int32, device="cuda")
    ids_static = _ids("invalid", T, N, gen).cuda()
    ranks = _ranks("2d", N, gen).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph
        ops.build_batch_(meta, ids_static, ranks, T, N)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.cuda.set_sync_debug_mode("error")
        try:
            ops.build_batch_(meta, ids_static, ranks, T, N)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    for kind in ["uniform", "zipf", "one", "none"]:
        new_ids = _ids(kind, T, N, gen)
        ids_static.copy_(new_ids)
        meta.fill_(-7)
        torch.cuda.set_sync_debug_mode("error")
        try:
            graph.replay()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        ref = torch.full((lay.size,), -7, dtype=torch.int32)
        build_batch_torch_(ref, new_ids, ranks.cpu(), T, N)
        _compare(meta, ref, lay, f"graph replay T={T} N={N} ids={kind}")


# ---- CPU: the kernel source itself, on an emulator -------------------------------------------------------
# csrc/kernels/lora_batch.cuh compiled by g++ with the CUDA features it uses emulated by 1024 std::threads (one
# block; __syncthreads and the warp intrinsics are barriers). It checks the real kernel code (indexing, chunking,
# walkers, scans, stable scatter) on machines without a GPU; it says nothing about the memory model of a GPU.
_EMU_PRELUDE = r"""
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
struct EmuDim3 { unsigned x; };
inline thread_local EmuDim3 threadIdx;
#define __global__
#define __device__
#define __forceinline__
#define __launch_bounds__(...)
#define __shared__ static
struct EmuWarp { std::barrier<> bar{32}; unsigned long long vals[32]; };
inline std::barrier<>* g_block_bar;
inline EmuWarp* g_warps;
inline int* g_dyn_smem;
inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
inline void __syncwarp() { g_warps[threadIdx.x >> 5].bar.arrive_and_wait(); }
template <class T> inline T emu_get(T v, int src) {
  EmuWarp& w = g_warps[threadIdx.x >> 5];
  unsigned long long u = 0;
  std::memcpy(&u, &v, sizeof(T));
  w.vals[threadIdx.x & 31] = u;
  w.bar.arrive_and_wait();
  const unsigned long long r = w.vals[src];
  w.bar.arrive_and_wait();
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}
template <class T> inline T __shfl_xor_sync(unsigned, T v, int o) { return emu_get(v, (threadIdx.x & 31) ^ o); }
template <class T> inline T __shfl_up_sync(unsigned, T v, int o) {
  const int l = threadIdx.x & 31;
  return emu_get(v, l >= o ? l - o : l);
}
template <class T> inline T __shfl_sync(unsigned, T v, int src) { return emu_get(v, src & 31); }
inline unsigned emu_mask(long long v, bool equal) {
  EmuWarp& w = g_warps[threadIdx.x >> 5];
  w.vals[threadIdx.x & 31] = (unsigned long long)v;
  w.bar.arrive_and_wait();
  unsigned m = 0;
  for (int l = 0; l < 32; ++l)
    if (equal ? w.vals[l] == (unsigned long long)v : w.vals[l] != 0) m |= 1u << l;
  w.bar.arrive_and_wait();
  return m;
}
inline unsigned __ballot_sync(unsigned, int pred) { return emu_mask(pred ? 1 : 0, false); }
inline unsigned __match_any_sync(unsigned, int v) { return emu_mask(v, true); }
inline int __ffs(unsigned x) { return __builtin_ffs(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
template <class A, class B> inline auto min(A a, B b) { return a < b ? a : b; }
"""

_EMU_MAIN = r"""
#include "kernel_emu.h"
#include <cstdio>
#include <thread>
#include <vector>
// stdin, per case: T Tc N S optin ids_stride rs0 rs1 n_ranks (S < 0: no ranks), the ids buffer (T * ids_stride),
// the ranks buffer (n_ranks), the initial meta. stdout, per case: "chunk walkers" then meta.
int main() {
  long long T, Tc, N, S, optin, st, rs0, rs1, nr;
  while (scanf("%lld %lld %lld %lld %lld %lld %lld %lld %lld", &T, &Tc, &N, &S, &optin, &st, &rs0, &rs1, &nr) == 9) {
    std::vector<int> ids(T * st + 1), ranks(nr + 1);
    for (long long i = 0; i < T * st; ++i) scanf("%d", &ids[i]);
    for (long long i = 0; i < nr; ++i) scanf("%d", &ranks[i]);
    const long long A = std::min(Tc, N);
    std::vector<int> meta(2 * Tc + 3 * A + 4);
    for (auto& x : meta) scanf("%d", &x);
    lora_kernels::BuildBatchParams p{};
    p.meta = meta.data(); p.adapter_ids = ids.data(); p.ids_stride = st;
    p.ranks = S >= 0 ? ranks.data() : nullptr; p.rank_slices = S > 0 ? S : 0;
    p.rank_stride0 = rs0; p.rank_stride1 = rs1;
    p.num_tokens = T; p.max_tokens = Tc; p.max_active = A; p.max_adapters = N;
    const auto plan = lora_kernels::plan_build_batch(T, N, optin);
    p.chunk = plan.chunk; p.walkers = plan.walkers;
    std::vector<int> smem(plan.smem_bytes / 4 + 1, 0x5a5a5a5a);
    g_dyn_smem = smem.data();
    std::barrier<> bar(lora_kernels::kBuildBatchThreads);
    g_block_bar = &bar;
    std::vector<EmuWarp> warps(lora_kernels::kBuildBatchThreads / 32);
    g_warps = warps.data();
    std::vector<std::thread> threads;
    for (int t = 0; t < lora_kernels::kBuildBatchThreads; ++t)
      threads.emplace_back([t, &p] { threadIdx.x = t; lora_kernels::lora_build_batch_kernel(p); });
    for (auto& th : threads) th.join();
    printf("%lld %lld\n", (long long)plan.chunk, (long long)plan.walkers);
    for (int x : meta) printf("%d ", x);
    printf("\n");
  }
}
"""


def _build_emulator(tmp_path) -> str:
    import shutil

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) for the kernel emulator")
    root = _ext.source_dir()
    src = open(os.path.join(root, "kernels", "lora_batch.cuh")).read()
    # The emulator replaces dynamic shared memory and drops the host launcher (<<<>>> is CUDA-only).
    marker = "\n// Launches the builder"
    assert "extern __shared__ int s_cursor[];" in src and marker in src
    src = src.replace("extern __shared__ int s_cursor[];", "int* s_cursor = g_dyn_smem;")
    src = src[: src.index(marker)] + src[src.rindex("}  // namespace lora_kernels") :]
    (tmp_path / "stub").mkdir()
    (tmp_path / "stub" / "cuda_runtime.h").write_text("#pragma once\n")
    (tmp_path / "emu_prelude.h").write_text(_EMU_PRELUDE)
    (tmp_path / "kernel_emu.h").write_text('#include "emu_prelude.h"\n' + src)
    (tmp_path / "main.cpp").write_text(_EMU_MAIN)
    exe = str(tmp_path / "emu")
    proc = subprocess.run(
        [cxx, "-std=c++20", "-O1", "-pthread", "-I", str(tmp_path / "stub"), "-I", str(tmp_path),
         "-I", os.path.join(root, "kernels"),  # layouts.h, included by the kernel
         str(tmp_path / "main.cpp"), "-o", exe],
        check=False, capture_output=True, text=True,
    )
    if proc.returncode != 0 and "barrier" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("the C++ compiler lacks C++20 <barrier>")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return exe


def test_kernel_source_on_cpu_emulator(tmp_path):
    exe = _build_emulator(tmp_path)
    gen = torch.Generator().manual_seed(0)
    small_smem, h100_smem = 6 * 1024, 227 * 1024  # 6 KiB: 1024 counters, forces several chunks of keys
    cases = [  # T, N, slack, optin, ids, ranks, ids_stride
        (0, 7, 0, h100_smem, "uniform", "2d", 1),
        (1, 1, 0, h100_smem, "one", "1d", 1),
        (7, 64, 3, h100_smem, "invalid", "none", 2),
        (33, 5, 0, h100_smem, "uniform", "2d-transposed", 1),
        (1000, 7, 0, h100_smem, "zipf", "2d", 3),  # 32 walkers
        (1000, 300, 5, h100_smem, "invalid", "1d", 1),  # a few walkers
        (1200, 1500, 0, small_smem, "uniform", "2d", 1),  # 2 chunks of keys
        (800, 3000, 0, small_smem, "invalid", "2d-transposed", 2),  # 3 chunks
        (300, 64, 0, small_smem, "none", "1d", 1),
        (1100, 2, 0, h100_smem, "one", "2d", 1),
    ]
    lines, refs = [], []
    for T, N, slack, optin, id_kind, rank_kind, st in cases:
        Tc = max(T + slack, 1)
        lay = MetaLayout(Tc, min(Tc, N))
        ids = _ids(id_kind, T, N, gen)
        ranks = _ranks(rank_kind, N, gen)
        init = torch.randint(-9, 9, (lay.size,), generator=gen, dtype=torch.int32)
        ref = init.clone()
        build_batch_torch_(ref, ids, ranks, Tc, N)
        refs.append((ref, lay, f"T={T} N={N} optin={optin} ids={id_kind} ranks={rank_kind} stride={st}"))
        ids_buf = torch.full((T, st), 12345, dtype=torch.int32)
        ids_buf[:, 0] = ids
        if ranks is None:
            S, rs0, rs1, rbuf = -1, 0, 0, torch.zeros(0, dtype=torch.int32)
        elif ranks.ndim == 1:
            S, rs0, rs1, rbuf = 1, 0, 1, ranks
        else:  # the storage of the (possibly transposed) view, with the view's strides
            S, (rs0, rs1) = ranks.shape[0], ranks.stride()
            rbuf = ranks.t().contiguous().flatten() if rs0 == 1 else ranks.contiguous().flatten()
        lines.append(f"{T} {Tc} {N} {S} {optin} {st} {rs0} {rs1} {rbuf.numel()}")
        lines.append(" ".join(map(str, ids_buf.flatten().tolist())))
        lines.append(" ".join(map(str, rbuf.tolist())))
        lines.append(" ".join(map(str, init.tolist())))
    proc = subprocess.run([exe], input="\n".join(lines) + "\n", check=True, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout.splitlines()
    assert len(out) == 2 * len(cases)
    plans = set()
    for k, (ref, lay, what) in enumerate(refs):
        plans.add(tuple(map(int, out[2 * k].split())))
        got = torch.tensor(list(map(int, out[2 * k + 1].split())), dtype=torch.int32)
        _compare(got, ref, lay, f"emulated kernel, {what}")
    assert any(w == 32 for _, w in plans) and any(1 < w < 32 for _, w in plans)  # walkers exercised


def _cuobjdump() -> str | None:
    import shutil

    home = _ext.cuda_home()
    cands = [shutil.which("cuobjdump")] + ([os.path.join(home, "bin", "cuobjdump")] if home else [])
    try:  # triton's NVIDIA backend ships one
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


# One entry per __global__ kernel family: each must have device code for every target architecture.
KERNELS = ("lora_build_batch_kernel", "merge_grouped_kernel", "deform_pool_fwd_kernel", "deform_pool_bwd_kernel",
           "deform_sample_fwd_kernel", "deform_sample_bwd_kernel", "sgmv_decode_kernel", "fused_lora_linear_kernel")
# Instantiations of the decode kernel csrc/sgmv_decode.cu dispatches to: x / y dtype (3) x weights dtype (3) x
# vector / scalar variant (2). One missing from a cubin would fail at launch on that dtype only.
SGMV_DECODE_INSTANTIATIONS = 18
# Instantiations of the fused LoRA linear csrc/fused_lora_linear.cu dispatches to: one dtype for x, y, W0 and the
# adapters (3) x vector / scalar variant (2).
FUSED_LORA_LINEAR_INSTANTIATIONS = 6


def test_built_extension_has_device_code_for_every_kernel():
    """A kernel template launched only from host-only code (#ifndef __CUDA_ARCH__) is never instantiated in the
    device pass: the extension builds and imports but the launch fails on a GPU. Read the cubins of the built
    extension and require every kernel family in every architecture's cubin."""
    import glob

    sos = glob.glob(os.path.join(REPO, "lora_kernels", "_C*.so"))
    if not sos:
        pytest.skip("no AOT-built extension in the checkout (pip install --no-build-isolation -e .)")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found")
    listing = subprocess.run([tool, "--list-elf", sos[0]], capture_output=True, text=True, check=True).stdout
    archs = sorted(set(a for a in __import__("re").findall(r"\.(sm_\d+a?)\.cubin", listing)))
    assert archs, f"no cubins in {sos[0]}:\n{listing}"
    for arch in archs:
        elf = subprocess.run([tool, "-elf", "-arch", arch, sos[0]], capture_output=True, text=True, check=True).stdout
        missing = [k for k in KERNELS if k not in elf]
        assert not missing, f"{arch}: no device code for {missing}"
        decode = set(__import__("re").findall(r"_ZN12lora_kernels18sgmv_decode_kernelI\w+?SgmvDecodeParamsE", elf))
        assert len(decode) == SGMV_DECODE_INSTANTIATIONS, f"{arch}: sgmv_decode_kernel instantiations {sorted(decode)}"
        fused = set(__import__("re").findall(r"_ZN12lora_kernels24fused_lora_linear_kernelI\w+?FusedLoraLinearParamsE",
                                             elf))
        assert len(fused) == FUSED_LORA_LINEAR_INSTANTIATIONS, f"{arch}: fused_lora_linear_kernel {sorted(fused)}"
