// CPU emulation of the CUDA kernel in csrc/kernels/merge.cuh, for tests/test_merge_emu.py on machines without a
// GPU. The kernel source is compiled unchanged by the host compiler into a shared library that the test loads
// into its own process (ctypes), so the job tables built by lora_kernels.ops.merge (host pointers of CPU tensors
// in place of device pointers) are used as they are. tests/cuda_emu.h supplies what the device would: blockIdx /
// threadIdx / blockDim, atomicAdd(int) and the correctly rounded fp32 intrinsics (__fmul_rn etc.; the library is
// built with -ffp-contract=off so nothing is fused behind them). The kernel has no shared memory, barriers or
// shuffles, so blocks and threads simply run one after the other (not on cuda_emu.h's fibers: the library also runs
// under AddressSanitizer, whose support of ucontext stack switches is partial). It checks the kernel's indexing,
// tiling, code packing, escapes and arithmetic; not GPU-only behaviour (memory model, performance).
#include "cuda_emu.h"
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
  lora_dispatch_kind(w_kind, [&](auto tw) {
    lora_dispatch_kind(ab_kind, [&](auto tab) {
      run_typed<typename decltype(tw)::type, typename decltype(tab)::type>(p, total_tiles, unmerge != 0);
    });
  });
  return total_tiles;
}
