// Launcher of the grouped merge / unmerge kernel (kernels/merge.cuh): argument checks, device guard, current
// stream, dtype dispatch. Called only by lora_kernels.ops.merge (the Python custom ops declare the mutation of
// the weights, whose pointers travel in the job table).
#include "kernels/merge.cuh"

// The launch templates and merge_dispatch must be visible to nvcc's device passes too: a kernel template is
// compiled for the GPU only where that pass instantiates it, and a launch hidden behind #ifndef __CUDA_ARCH__
// leaves the cubin without the kernel (tests/test_extension.py checks the built cubins for every kernel).
namespace lora_kernels {
namespace {

template <typename TW, typename TAB>
void launch_typed(const MergeGroupedParams& p, int64_t tiles, bool unmerge, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(tiles));
  if (unmerge) {
    merge_grouped_kernel<TW, TAB, true><<<grid, kMergeThreads, 0, stream>>>(p);
  } else {
    merge_grouped_kernel<TW, TAB, false><<<grid, kMergeThreads, 0, stream>>>(p);
  }
}

template <typename TW>
void launch_ab(const MergeGroupedParams& p, int64_t tiles, int64_t ab_kind, bool unmerge, cudaStream_t stream) {
  switch (ab_kind) {
    case 0: launch_typed<TW, __half>(p, tiles, unmerge, stream); break;
    case 1: launch_typed<TW, __nv_bfloat16>(p, tiles, unmerge, stream); break;
    default: launch_typed<TW, float>(p, tiles, unmerge, stream); break;
  }
}

}  // namespace

// A non-template function (outside the anonymous namespace) that names every instantiation: its definition is
// what makes the device pass instantiate the kernel templates, even though only host code calls it.
inline void merge_dispatch(const MergeGroupedParams& p, int64_t tiles, int64_t w_kind, int64_t ab_kind,
                           bool unmerge, cudaStream_t stream) {
  switch (w_kind) {
    case 0: launch_ab<__half>(p, tiles, ab_kind, unmerge, stream); break;
    case 1: launch_ab<__nv_bfloat16>(p, tiles, ab_kind, unmerge, stream); break;
    default: launch_ab<float>(p, tiles, ab_kind, unmerge, stream); break;
  }
}

}  // namespace lora_kernels

#ifndef __CUDA_ARCH__
#include <ATen/core/TensorBase.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

#include "ops.h"

namespace lora_kernels {
namespace {

void check_dev(const at::TensorBase& t, const at::TensorBase& ref, const char* name, at::ScalarType st) {
  TORCH_CHECK(t.device() == ref.device(), "merge_grouped_: ", name, ": expected device ", ref.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == st, "merge_grouped_: ", name, ": expected ", st, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "merge_grouped_: ", name, ": expected a contiguous tensor");
}

}  // namespace

void merge_grouped_cuda(const at::TensorBase& jobs, const at::TensorBase& tile_start, const at::TensorBase& terms,
                        const at::TensorBase& coefs, const at::TensorBase& counter, int64_t total_tiles,
                        int64_t w_kind, int64_t ab_kind, bool unmerge, bool exact) {
  TORCH_CHECK(jobs.is_cuda(), "merge_grouped_: jobs: expected a CUDA tensor, got device ", jobs.device());
  check_dev(jobs, jobs, "jobs", at::kLong);
  check_dev(tile_start, jobs, "tile_start", at::kLong);
  check_dev(terms, jobs, "terms", at::kLong);
  check_dev(coefs, jobs, "coefs", at::kFloat);
  check_dev(counter, jobs, "counter", at::kInt);
  TORCH_CHECK(jobs.dim() == 2 && jobs.size(1) == kJobCols, "merge_grouped_: jobs: expected [n_jobs, ", kJobCols,
              "], got ", jobs.sizes());
  TORCH_CHECK(tile_start.numel() == jobs.size(0), "merge_grouped_: tile_start: expected ", jobs.size(0),
              " entries, got ", tile_start.numel());
  TORCH_CHECK(w_kind >= 0 && w_kind <= 2 && ab_kind >= 0 && ab_kind <= 2,
              "merge_grouped_: w_kind/ab_kind: expected 0 (fp16), 1 (bf16) or 2 (fp32), got ", w_kind, "/", ab_kind);
  TORCH_CHECK(total_tiles >= 0 && total_tiles <= std::numeric_limits<int32_t>::max(),
              "merge_grouped_: total_tiles: expected 0 <= total_tiles < 2^31, got ", total_tiles);
  if (total_tiles == 0 || jobs.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(jobs.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(jobs.device().index()).stream();
  MergeGroupedParams p{};
  p.jobs = jobs.const_data_ptr<int64_t>();
  p.tile_start = tile_start.const_data_ptr<int64_t>();
  p.n_jobs = jobs.size(0);
  p.terms = terms.const_data_ptr<int64_t>();
  p.coefs = coefs.const_data_ptr<float>();
  p.counter = counter.data_ptr<int32_t>();
  p.exact = exact;
  merge_dispatch(p, total_tiles, w_kind, ab_kind, unmerge, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace lora_kernels
#endif  // __CUDA_ARCH__
