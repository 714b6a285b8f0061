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
