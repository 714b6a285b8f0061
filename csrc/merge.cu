// Launcher of the grouped merge / unmerge kernel (kernels/merge.cuh): argument checks, device guard, current
// stream, dtype dispatch. Called only by lora_kernels.ops.merge (the Python custom ops declare the mutation of
// the weights, whose pointers travel in the job table).
#include "kernels/merge.cuh"

// merge_dispatch must be visible to nvcc's device passes too: a kernel template is compiled for the GPU only where
// that pass instantiates it, and a launch hidden behind #ifndef __CUDA_ARCH__ leaves the cubin without the kernel
// (tests/test_extension.py checks the built cubins for every kernel). A non-template function that names every
// instantiation: its definition is what makes the device pass instantiate the kernel templates, even though only
// host code calls it.
namespace lora_kernels {

inline void merge_dispatch(const MergeGroupedParams& p, int64_t tiles, int64_t w_kind, int64_t ab_kind,
                           bool unmerge, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(tiles));
  lora_dispatch_kind(w_kind, [&](auto tw) {
    lora_dispatch_kind(ab_kind, [&](auto tab) {
      using TW = typename decltype(tw)::type;
      using TAB = typename decltype(tab)::type;
      if (unmerge) {
        merge_grouped_kernel<TW, TAB, true><<<grid, kMergeThreads, 0, stream>>>(p);
      } else {
        merge_grouped_kernel<TW, TAB, false><<<grid, kMergeThreads, 0, stream>>>(p);
      }
    });
  });
}

}  // namespace lora_kernels

#ifndef __CUDA_ARCH__
#include <ATen/core/TensorBase.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

#include "launch_checks.h"
#include "ops.h"

namespace lora_kernels {
namespace {

constexpr const char* kOp = "merge_grouped_";

}  // namespace

void merge_grouped_cuda(const at::TensorBase& jobs, const at::TensorBase& tile_start, const at::TensorBase& terms,
                        const at::TensorBase& coefs, const at::TensorBase& counter, int64_t total_tiles,
                        int64_t w_kind, int64_t ab_kind, bool unmerge, bool exact) {
  TORCH_CHECK(jobs.is_cuda(), kOp, ": jobs: expected a CUDA tensor, got device ", jobs.device());
  check_dense(kOp, jobs, jobs, "jobs", at::kLong);
  check_dense(kOp, tile_start, jobs, "tile_start", at::kLong);
  check_dense(kOp, terms, jobs, "terms", at::kLong);
  check_dense(kOp, coefs, jobs, "coefs", at::kFloat);
  check_dense(kOp, counter, jobs, "counter", at::kInt);
  TORCH_CHECK(jobs.dim() == 2 && jobs.size(1) == Job::size, kOp, ": jobs: expected [n_jobs, ", Job::size,
              "], got ", jobs.sizes());
  TORCH_CHECK(tile_start.numel() == jobs.size(0), kOp, ": tile_start: expected ", jobs.size(0),
              " entries, got ", tile_start.numel());
  TORCH_CHECK(w_kind >= 0 && w_kind <= 2 && ab_kind >= 0 && ab_kind <= 2,
              kOp, ": w_kind/ab_kind: expected 0 (fp16), 1 (bf16) or 2 (fp32), got ", w_kind, "/", ab_kind);
  TORCH_CHECK(total_tiles >= 0 && total_tiles <= std::numeric_limits<int32_t>::max(),
              kOp, ": total_tiles: expected 0 <= total_tiles < 2^31, got ", total_tiles);
  if (total_tiles == 0 || jobs.size(0) == 0) return;
  MergeGroupedParams p{};
  p.jobs = jobs.const_data_ptr<int64_t>();
  p.tile_start = tile_start.const_data_ptr<int64_t>();
  p.n_jobs = jobs.size(0);
  p.terms = terms.const_data_ptr<int64_t>();
  p.coefs = coefs.const_data_ptr<float>();
  p.counter = counter.data_ptr<int32_t>();
  p.exact = exact;
  launch_on_current_stream(jobs.device(), [&](cudaStream_t stream) {
    merge_dispatch(p, total_tiles, w_kind, ab_kind, unmerge, stream);
  });
}

}  // namespace lora_kernels
#endif  // __CUDA_ARCH__
