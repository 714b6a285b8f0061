// The one TORCH_LIBRARY of lora_kernels: schemas of every op in namespace lora_kernels_C and their impls.
// Adding an op: declare its launcher in ops.h, define it in its own .cu (kernel in kernels/*.cuh), add one
// m.def line and its m.impl lines (CUDA, and Meta for fake tensors) below. The only file that includes
// <torch/library.h>.
#include <Python.h>
#include <torch/library.h>

#include <optional>

#include "ops.h"

namespace lora_kernels {
namespace {

// build_batch_(Tensor(a!) meta, Tensor adapter_ids, Tensor? ranks, int max_tokens, int max_adapters) -> ()
//
// Semantics: lora_kernels.batch.build_batch_torch_ (fills every field of the LoRABatch meta buffer).
// meta: int32 [2 * max_tokens + 3 * max_active + 4], contiguous, CUDA; adapter_ids: int32 [T], T <= max_tokens;
// ranks: int32 [N] or [S, N] (N >= max_adapters; only the first max_adapters columns are read) or None.
// One kernel launch on the current stream; no allocation and no host sync (CUDA-graph capturable).
void build_batch_(const at::Tensor& meta, const at::Tensor& adapter_ids, const std::optional<at::Tensor>& ranks,
                  int64_t max_tokens, int64_t max_adapters) {
  build_batch_cuda(meta, adapter_ids, ranks.has_value() ? static_cast<const at::TensorBase&>(*ranks) : at::TensorBase(),
                   max_tokens, max_adapters);
}

// Meta (fake-tensor) impl: the op only mutates meta in place, so there is nothing to compute.
void build_batch_meta_(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t) {}

}  // namespace
}  // namespace lora_kernels

TORCH_LIBRARY(lora_kernels_C, m) {
  m.def("build_batch_(Tensor(a!) meta, Tensor adapter_ids, Tensor? ranks, int max_tokens, int max_adapters) -> ()");
}

TORCH_LIBRARY_IMPL(lora_kernels_C, CUDA, m) {
  m.impl("build_batch_", &lora_kernels::build_batch_);
}

TORCH_LIBRARY_IMPL(lora_kernels_C, Meta, m) {
  m.impl("build_batch_", &lora_kernels::build_batch_meta_);
}

// A Python module with no attributes, so that `import lora_kernels._C` loads the library (and registers the ops
// above) without pybind11. TORCH_EXTENSION_NAME is set by torch.utils.cpp_extension (AOT and JIT alike).
#define LORA_KERNELS_CONCAT_(a, b) a##b
#define LORA_KERNELS_CONCAT(a, b) LORA_KERNELS_CONCAT_(a, b)
#define LORA_KERNELS_STR_(x) #x
#define LORA_KERNELS_STR(x) LORA_KERNELS_STR_(x)

extern "C" PyMODINIT_FUNC LORA_KERNELS_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, LORA_KERNELS_STR(TORCH_EXTENSION_NAME),
                                          "lora_kernels CUDA ops (registered as torch.ops.lora_kernels_C)", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
