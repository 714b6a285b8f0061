// CPU emulation of what the CUDA kernels in csrc/kernels/ use, shared by the emulators tests/*_emu.cpp (each one
// translation unit: it includes this header, then the kernel header, which is compiled unchanged by the host
// compiler). It supplies what the device would:
//   - threadIdx / blockIdx / blockDim, and emu_launch: the blocks of a grid run one after another, in a given order;
//   - the threads of a block as fibers (ucontext) on ONE OS thread, switched round robin at barriers, so a run is
//     deterministic and cheap: __syncthreads (a block barrier) and __shfl_xor_sync (a warp barrier over a
//     double-buffered exchange); a pass in which no thread makes progress (a barrier some thread never reaches,
//     e.g. one that returned early, or a lane that skipped a shuffle) aborts with "deadlock";
//   - __shared__ as static: one copy per kernel instantiation, shared by the block's fibers (blocks run one after
//     another, so no two blocks use it at once);
//   - __ldg / __ldcg, atomicAdd / atomicExch on ints, atomicAdd on floats, __threadfence (a no-op: blocks do not
//     overlap here), the bit casts and the correctly rounded fp32 intrinsics (__fmul_rn etc.; build with
//     -ffp-contract=off so that nothing is fused behind them);
//   - checked memory: LORA_CHECK_ACCESS (csrc/kernels/lora_common.cuh) checks every access the kernels pass to it
//     against the ranges registered for its buffer in emu_bufs (exact byte extents), and accesses of 8 bytes or more
//     for alignment to min(bytes, 16); atomicAdd(float*) checks its target against emu_bufs[kBufAtomics]. A
//     violation aborts (exit status != 0).
// Not emulated: GPU-only behaviour (the memory model, real alignment faults, performance).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <vector>

struct EmuDim {
  unsigned x = 0, y = 0, z = 0;
};
static EmuDim threadIdx, blockIdx, blockDim;

// ---- fibers and barriers -------------------------------------------------------------------------------------
struct EmuBarrier {
  int count = 0, arrived = 0;
  long gen = 0;
};
struct EmuFiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  int phase = 0;  // which half of its warp's shuffle buffer the thread writes next
};
constexpr size_t kEmuStackBytes = 1 << 17;
static ucontext_t emu_sched;
static std::vector<EmuFiber> emu_fibers;
static int emu_cur = 0;
static long emu_events = 0;  // barrier arrivals and thread exits: progress
static EmuBarrier emu_block_bar;
static std::vector<EmuBarrier> emu_warp_bar;
static std::vector<float> emu_shfl;  // [warp][2][32]
static const std::function<void()>* emu_kernel = nullptr;

inline void emu_yield() { swapcontext(&emu_fibers[emu_cur].ctx, &emu_sched); }

inline void emu_wait(EmuBarrier& b) {
  const long g = b.gen;
  ++emu_events;
  if (++b.arrived == b.count) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  while (b.gen == g) emu_yield();
}

inline void __syncthreads() { emu_wait(emu_block_bar); }
inline void __threadfence() {}

inline float __shfl_xor_sync(unsigned, float v, int off) {
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  int& ph = emu_fibers[emu_cur].phase;  // double buffer: a fast lane's next write cannot clobber a pending read
  float* buf = &emu_shfl[(2 * w + ph) * 32];
  buf[lane] = v;
  emu_wait(emu_warp_bar[w]);
  const float r = buf[lane ^ off];
  ph ^= 1;
  return r;
}

inline void emu_entry() {
  (*emu_kernel)();
  emu_fibers[emu_cur].done = true;
  ++emu_events;
}

// Runs one block of n threads (a multiple of 32) to completion: every thread calls *emu_kernel.
inline void emu_run_block(unsigned n) {
  if (emu_fibers.size() < n) emu_fibers.resize(n);
  emu_block_bar = EmuBarrier{static_cast<int>(n)};
  emu_warp_bar.assign(n / 32, EmuBarrier{32});
  emu_shfl.assign(n / 32 * 64, 0.f);
  for (unsigned i = 0; i < n; ++i) {
    EmuFiber& f = emu_fibers[i];
    f.stack.resize(kEmuStackBytes);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &emu_sched;
    makecontext(&f.ctx, emu_entry, 0);
    f.done = false;
    f.phase = 0;
  }
  unsigned alive = n;
  while (alive > 0) {
    const long before = emu_events;
    for (unsigned i = 0; i < n; ++i) {
      if (emu_fibers[i].done) continue;
      emu_cur = static_cast<int>(i);
      threadIdx.x = i;
      swapcontext(&emu_sched, &emu_fibers[i].ctx);
      if (emu_fibers[i].done) --alive;
    }
    if (alive > 0 && emu_events == before) {
      std::fprintf(stderr, "deadlock: block (%u, %u, %u), %u threads stuck at a barrier\n", blockIdx.x, blockIdx.y,
                   blockIdx.z, alive);
      std::abort();
    }
  }
}

// Linear block ids b = x + grid.x * (y + grid.y * z) of a grid, in order or reversed.
inline std::vector<long> emu_grid_order(dim3 grid, bool reversed) {
  const long n = static_cast<long>(grid.x) * grid.y * grid.z;
  std::vector<long> order(n);
  for (long i = 0; i < n; ++i) order[i] = reversed ? n - 1 - i : i;
  return order;
}

// One launch: the blocks `order` (linear ids, see emu_grid_order) of `grid`, one after another, each of `threads`
// threads calling kernel().
inline void emu_launch(dim3 grid, unsigned threads, const std::vector<long>& order,
                       const std::function<void()>& kernel) {
  emu_kernel = &kernel;
  blockDim.x = threads;
  for (const long b : order) {
    blockIdx.x = static_cast<unsigned>(b % grid.x);
    blockIdx.y = static_cast<unsigned>(b / grid.x % grid.y);
    blockIdx.z = static_cast<unsigned>(b / grid.x / grid.y);
    emu_run_block(threads);
  }
}

// ---- checked memory --------------------------------------------------------------------------------------------
struct EmuRange {
  const char* lo;
  const char* hi;
};
inline EmuRange emu_range(const void* lo, size_t bytes) {
  return EmuRange{static_cast<const char*>(lo), static_cast<const char*>(lo) + bytes};
}
constexpr int kEmuMaxBufs = 32;  // >= lora_kernels::kBufCount (checked below)
static std::vector<EmuRange> emu_bufs[kEmuMaxBufs];

inline void emu_check(int buf, const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  bool in = false;
  for (const auto& r : emu_bufs[buf]) in = in || (c >= r.lo && c + bytes <= r.hi);
  if (!in) {
    std::fprintf(stderr, "out-of-range access: buffer %d, %zu bytes\n", buf, bytes);
    std::abort();
  }
  const size_t align = bytes >= 16 ? 16 : bytes;
  if (bytes >= 8 && reinterpret_cast<uintptr_t>(p) % align != 0) {
    std::fprintf(stderr, "misaligned %zu-byte access: buffer %d\n", bytes, buf);
    std::abort();
  }
}
#define LORA_CHECK_ACCESS(buf, ptr, bytes) emu_check((buf), (ptr), (bytes))

// 16-byte aligned storage (as the caching allocator gives), never freed (the emulators are one-shot processes).
inline char* emu_alloc16(size_t bytes) {
  return static_cast<char*>(std::aligned_alloc(16, (bytes + 16) / 16 * 16));
}

// The next `bytes` bytes of a binary input stream, in fresh 16-byte aligned storage.
inline char* emu_read_storage(std::ifstream& in, size_t bytes) {
  char* p = emu_alloc16(bytes);
  in.read(p, static_cast<std::streamsize>(bytes));
  return p;
}

// n elements of T from a binary input stream.
template <typename T>
std::vector<T> emu_read(std::ifstream& in, size_t n) {
  std::vector<T> v(n);
  in.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(sizeof(T) * n));
  return v;
}

// ---- memory intrinsics and atomics (blocks run one after another, threads one at a time) ------------------------
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __ldcg(const float* p) { return *p; }
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}
inline int atomicExch(int* p, int v) {
  const int old = *p;
  *p = v;
  return old;
}
inline float atomicAdd(float* p, float v);  // after lora_common.cuh: checks against emu_bufs[kBufAtomics]

// ---- fp32 bit casts and correctly rounded intrinsics -------------------------------------------------------------
inline int __float_as_int(float x) {
  int i;
  std::memcpy(&i, &x, 4);
  return i;
}
inline float __int_as_float(int i) {
  float x;
  std::memcpy(&x, &i, 4);
  return x;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#undef __shared__
#define __shared__ static  // one copy shared by the block's fibers (blocks run one after another)

#include "kernels/lora_common.cuh"

static_assert(lora_kernels::kBufCount <= kEmuMaxBufs, "emu_bufs is too small");

inline float atomicAdd(float* p, float v) {
  emu_check(lora_kernels::kBufAtomics, p, sizeof(float));
  const float old = *p;
  *p = old + v;
  return old;
}

// ---- the decode kernels' metadata (sgmv_decode_emu.cpp, fused_lora_linear_emu.cpp) ---------------------------------
// Read from the input in this order: int64 cols [S], outs [S], offsets [N], int32 ranks [S, N], fp32 scales [S, N],
// int32 token_adapter [T]. cols / outs go to the parameters' arrays col / out, the rest stays here.
struct EmuDecodeMeta {
  std::vector<int64_t> offsets;
  std::vector<int32_t> ranks;
  std::vector<float> scales;
  std::vector<int32_t> tok;

  EmuDecodeMeta(std::ifstream& in, int64_t T, int64_t S, int64_t N, int64_t* col, int64_t* out) {
    in.read(reinterpret_cast<char*>(col), 8 * S);
    in.read(reinterpret_cast<char*>(out), 8 * S);
    offsets = emu_read<int64_t>(in, N);
    ranks = emu_read<int32_t>(in, S * N);
    scales = emu_read<float>(in, S * N);
    tok = emu_read<int32_t>(in, T);
  }
  // Points p's metadata at this and registers it as the kBufMeta buffer.
  template <typename P>
  void bind(P& p) const {
    p.offsets = offsets.data();
    p.ranks = ranks.data();
    p.scales = scales.data();
    p.token_adapter = tok.data();
    emu_bufs[lora_kernels::kBufMeta] = {
        emu_range(offsets.data(), 8 * offsets.size()), emu_range(ranks.data(), 4 * ranks.size()),
        emu_range(scales.data(), 4 * scales.size()), emu_range(tok.data(), 4 * tok.size())};
  }
};
