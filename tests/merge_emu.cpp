// CPU emulation of the CUDA kernel in csrc/kernels/merge.cuh, for tests/test_merge_emu.py on machines without a
// GPU. The kernel source is compiled unchanged by the host compiler into a shared library that the test loads
// into its own process (ctypes), so the job tables built by lora_kernels.ops.merge (host pointers of CPU tensors
// in place of device pointers) are used as they are. This file supplies what the device would: blockIdx /
// threadIdx / blockDim, atomicAdd(int) and the correctly rounded fp32 intrinsics (__fmul_rn etc.; the library is
// built with -ffp-contract=off so nothing is fused behind them). The kernel has no shared memory, barriers or
// shuffles, so blocks and threads run one after the other. It checks the kernel's indexing, tiling, code
// packing, escapes and arithmetic; not GPU-only behaviour (memory model, performance).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

struct EmuDim { unsigned x = 0, y = 0, z = 0; };
static EmuDim threadIdx, blockIdx, blockDim;

inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}
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
#include "kernels/merge.cuh"

using namespace lora_kernels;

template <typename TW, typename TAB>
static void run_typed(const MergeGroupedParams& p, int64_t tiles, bool unmerge) {
  blockDim.x = kMergeThreads;
  for (int64_t b = 0; b < tiles; ++b) {
    blockIdx.x = static_cast<unsigned>(b);
    for (unsigned t = 0; t < static_cast<unsigned>(kMergeThreads); ++t) {
      threadIdx.x = t;
      if (unmerge) {
        merge_grouped_kernel<TW, TAB, true>(p);
      } else {
        merge_grouped_kernel<TW, TAB, false>(p);
      }
    }
  }
}

template <typename TW>
static void run_ab(const MergeGroupedParams& p, int64_t tiles, int64_t ab_kind, bool unmerge) {
  switch (ab_kind) {
    case 0: run_typed<TW, __half>(p, tiles, unmerge); break;
    case 1: run_typed<TW, __nv_bfloat16>(p, tiles, unmerge); break;
    default: run_typed<TW, float>(p, tiles, unmerge); break;
  }
}

// The launcher's dispatch (csrc/merge.cu merge_dispatch), replicated; returns the number of blocks run.
extern "C" int64_t merge_grouped_emu(const int64_t* jobs, const int64_t* tile_start, int64_t n_jobs,
                                     const int64_t* terms, const float* coefs, int32_t* counter, int64_t total_tiles,
                                     int64_t w_kind, int64_t ab_kind, int unmerge, int exact) {
  if (total_tiles == 0 || n_jobs == 0) return 0;
  MergeGroupedParams p{};
  p.jobs = jobs;
  p.tile_start = tile_start;
  p.n_jobs = n_jobs;
  p.terms = terms;
  p.coefs = coefs;
  p.counter = counter;
  p.exact = exact != 0;
  switch (w_kind) {
    case 0: run_ab<__half>(p, total_tiles, ab_kind, unmerge != 0); break;
    case 1: run_ab<__nv_bfloat16>(p, total_tiles, ab_kind, unmerge != 0); break;
    default: run_ab<float>(p, total_tiles, ab_kind, unmerge != 0); break;
  }
  return total_tiles;
}
