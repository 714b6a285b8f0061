// Declarations of the CUDA launchers registered in bindings.cpp (one per op, each defined in its own .cu).
//
// Launchers take at::TensorBase (at::Tensor converts implicitly): <ATen/core/TensorBase.h> is much lighter than
// <ATen/core/Tensor.h>, which keeps the .cu files fast to compile. Each launcher checks its arguments with
// TORCH_CHECK, guards the tensors' device and launches on the current stream.
#pragma once

#include <ATen/core/TensorBase.h>

#include <cstdint>

namespace lora_kernels {

// See build_batch_ in bindings.cpp. `ranks` may be undefined (no ranks).
void build_batch_cuda(const at::TensorBase& meta, const at::TensorBase& adapter_ids, const at::TensorBase& ranks,
                      int64_t max_tokens, int64_t max_adapters);

}  // namespace lora_kernels

namespace lora_kernels {

// See merge_grouped_ in bindings.cpp (csrc/merge.cu, kernel in kernels/merge.cuh).
void merge_grouped_cuda(const at::TensorBase& jobs, const at::TensorBase& tile_start, const at::TensorBase& terms,
                        const at::TensorBase& coefs, const at::TensorBase& counter, int64_t total_tiles,
                        int64_t w_kind, int64_t ab_kind, bool unmerge, bool exact);

}  // namespace lora_kernels

namespace lora_kernels {

// See deform_pool_fwd_ / deform_pool_bwd_ in bindings.cpp (csrc/deform_pool.cu, kernels in kernels/deform_pool.cuh).
void deform_pool_fwd_cuda(const at::TensorBase& out, const at::TensorBase& value, const at::TensorBase& shapes,
                          const at::TensorBase& starts, const at::TensorBase& loc, const at::TensorBase& attn,
                          bool baseline);
void deform_pool_bwd_cuda(const at::TensorBase& grad_value, const at::TensorBase& grad_loc,
                          const at::TensorBase& grad_attn, const at::TensorBase& grad_out, const at::TensorBase& value,
                          const at::TensorBase& shapes, const at::TensorBase& starts, const at::TensorBase& loc,
                          const at::TensorBase& attn, bool baseline);
// See deform_sample_fwd_ / deform_sample_bwd_ in bindings.cpp (the fused form; same files).
void deform_sample_fwd_cuda(const at::TensorBase& out, const at::TensorBase& value, const at::TensorBase& shapes,
                            const at::TensorBase& starts, const at::TensorBase& ref, const at::TensorBase& offsets,
                            const at::TensorBase& logits);
void deform_sample_bwd_cuda(const at::TensorBase& grad_value, const at::TensorBase& grad_offsets,
                            const at::TensorBase& grad_logits, const at::TensorBase& grad_out,
                            const at::TensorBase& value, const at::TensorBase& shapes, const at::TensorBase& starts,
                            const at::TensorBase& ref, const at::TensorBase& offsets, const at::TensorBase& logits);

}  // namespace lora_kernels

namespace lora_kernels {

// See sgmv_decode_ in bindings.cpp (csrc/sgmv_decode.cu, kernel in kernels/sgmv_decode.cuh).
void sgmv_decode_cuda(const at::TensorBase& y, const at::TensorBase& x, const at::TensorBase& a,
                      const at::TensorBase& b, const at::TensorBase& offsets, const at::TensorBase& ranks,
                      const at::TensorBase& scales, const at::TensorBase& token_adapter, at::IntArrayRef outs,
                      int64_t max_rank, int64_t merged, const at::TensorBase& partial, const at::TensorBase& counters);

}  // namespace lora_kernels

namespace lora_kernels {

// See fused_lora_linear_ in bindings.cpp (csrc/fused_lora_linear.cu, kernel in kernels/fused_lora_linear.cuh).
// `bias` may be undefined (no bias).
void fused_lora_linear_cuda(const at::TensorBase& y, const at::TensorBase& x, const at::TensorBase& w0,
                            const at::TensorBase& bias, const at::TensorBase& a, const at::TensorBase& b,
                            const at::TensorBase& offsets, const at::TensorBase& ranks, const at::TensorBase& scales,
                            const at::TensorBase& token_adapter, at::IntArrayRef outs, int64_t max_rank,
                            int64_t merged, const at::TensorBase& workspace, const at::TensorBase& counters);

}  // namespace lora_kernels
