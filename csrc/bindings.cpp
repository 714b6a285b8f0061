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

// ---- merge / unmerge (lora_kernels.ops.merge) ----------------------------------------------------------------------
// merge_grouped_(Tensor jobs, Tensor tile_start, Tensor terms, Tensor coefs, Tensor(a!) counter, int total_tiles,
//                int w_kind, int ab_kind, bool unmerge, bool exact) -> ()
//
// Semantics: csrc/kernels/merge.cuh. An internal launcher: the weights and code buffers it writes travel as device
// pointers in `jobs` (built by lora_kernels.ops.merge.build_tables); the Python custom ops
// torch.ops.lora_kernels.merge_* declare those mutations. One launch, no allocation, no host sync.
namespace lora_kernels {
namespace {

void merge_grouped_(const at::Tensor& jobs, const at::Tensor& tile_start, const at::Tensor& terms,
                    const at::Tensor& coefs, const at::Tensor& counter, int64_t total_tiles, int64_t w_kind,
                    int64_t ab_kind, bool unmerge, bool exact) {
  merge_grouped_cuda(jobs, tile_start, terms, coefs, counter, total_tiles, w_kind, ab_kind, unmerge, exact);
}

void merge_grouped_meta_(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, int64_t, int64_t, int64_t, bool, bool) {}

}  // namespace
}  // namespace lora_kernels

TORCH_LIBRARY_FRAGMENT(lora_kernels_C, m) {
  m.def("merge_grouped_(Tensor jobs, Tensor tile_start, Tensor terms, Tensor coefs, Tensor(a!) counter, "
        "int total_tiles, int w_kind, int ab_kind, bool unmerge, bool exact) -> ()");
}

TORCH_LIBRARY_IMPL(lora_kernels_C, CUDA, m) {
  m.impl("merge_grouped_", &lora_kernels::merge_grouped_);
}

TORCH_LIBRARY_IMPL(lora_kernels_C, Meta, m) {
  m.impl("merge_grouped_", &lora_kernels::merge_grouped_meta_);
}

// ---- deformable pooling (lora_kernels.ops.deform) ------------------------------------------------------------------
// deform_pool_fwd_(Tensor(a!) out, Tensor value, Tensor spatial_shapes, Tensor level_start_index,
//                  Tensor sampling_locations, Tensor attention_weights, bool baseline) -> ()
// deform_pool_bwd_(Tensor(a!) grad_value, Tensor(b!) grad_loc, Tensor(c!) grad_attn, Tensor grad_out, Tensor value,
//                  Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations,
//                  Tensor attention_weights, bool baseline) -> ()
//
// Semantics: lora_kernels.reference.deform_pool / deform_pool_backward; kernels in csrc/kernels/deform_pool.cuh.
// Internal launchers: the Python custom ops torch.ops.lora_kernels.deform_pool{,_backward} allocate the outputs
// (grad_value fp32 and zeroed; grad_loc / grad_attn in the input dtype, or fp32 and zeroed with baseline=true)
// and call these. baseline=true runs the fp32 Deformable-DETR-style kernels (benchmark only). One launch each, no
// allocation, no host sync.
namespace lora_kernels {
namespace {

void deform_pool_fwd_(const at::Tensor& out, const at::Tensor& value, const at::Tensor& shapes,
                      const at::Tensor& starts, const at::Tensor& loc, const at::Tensor& attn, bool baseline) {
  deform_pool_fwd_cuda(out, value, shapes, starts, loc, attn, baseline);
}

void deform_pool_fwd_meta_(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, bool) {}

void deform_pool_bwd_(const at::Tensor& grad_value, const at::Tensor& grad_loc, const at::Tensor& grad_attn,
                      const at::Tensor& grad_out, const at::Tensor& value, const at::Tensor& shapes,
                      const at::Tensor& starts, const at::Tensor& loc, const at::Tensor& attn, bool baseline) {
  deform_pool_bwd_cuda(grad_value, grad_loc, grad_attn, grad_out, value, shapes, starts, loc, attn, baseline);
}

void deform_pool_bwd_meta_(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, bool) {}

}  // namespace
}  // namespace lora_kernels

TORCH_LIBRARY_FRAGMENT(lora_kernels_C, m) {
  m.def("deform_pool_fwd_(Tensor(a!) out, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
        "Tensor sampling_locations, Tensor attention_weights, bool baseline) -> ()");
  m.def("deform_pool_bwd_(Tensor(a!) grad_value, Tensor(b!) grad_loc, Tensor(c!) grad_attn, Tensor grad_out, "
        "Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
        "Tensor attention_weights, bool baseline) -> ()");
}

TORCH_LIBRARY_IMPL(lora_kernels_C, CUDA, m) {
  m.impl("deform_pool_fwd_", &lora_kernels::deform_pool_fwd_);
  m.impl("deform_pool_bwd_", &lora_kernels::deform_pool_bwd_);
}

TORCH_LIBRARY_IMPL(lora_kernels_C, Meta, m) {
  m.impl("deform_pool_fwd_", &lora_kernels::deform_pool_fwd_meta_);
  m.impl("deform_pool_bwd_", &lora_kernels::deform_pool_bwd_meta_);
}

// ---- fused deformable sampling (lora_kernels.ops.deform.deform_sample) ----------------------------------------------
// deform_sample_fwd_(Tensor(a!) out, Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor ref,
//                    Tensor offsets, Tensor logits) -> ()
// deform_sample_bwd_(Tensor(a!) grad_value, Tensor(b!) grad_offsets, Tensor(c!) grad_logits, Tensor grad_out,
//                    Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor ref, Tensor offsets,
//                    Tensor logits) -> ()
//
// Semantics: lora_kernels.reference.deform_sample / deform_sample_backward (deform_pool with loc = ref + offsets /
// (W_l, H_l) and weights = softmax of the L * P logits, formed in the kernel); kernels deform_sample_*_kernel in
// csrc/kernels/deform_pool.cuh. ref fp32 [Q, 2]; offsets [B, Q, H, L, P, 2] and logits [B, Q, H, L, P] in value's
// dtype or fp32; grad_value fp32 zeroed (or empty: not computed), grad_offsets offsets' dtype, grad_logits fp32.
// Internal launchers of the Python custom ops torch.ops.lora_kernels.deform_sample{,_backward}.
namespace lora_kernels {
namespace {

void deform_sample_fwd_(const at::Tensor& out, const at::Tensor& value, const at::Tensor& shapes,
                        const at::Tensor& starts, const at::Tensor& ref, const at::Tensor& offsets,
                        const at::Tensor& logits) {
  deform_sample_fwd_cuda(out, value, shapes, starts, ref, offsets, logits);
}

void deform_sample_fwd_meta_(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&) {}

void deform_sample_bwd_(const at::Tensor& grad_value, const at::Tensor& grad_offsets, const at::Tensor& grad_logits,
                        const at::Tensor& grad_out, const at::Tensor& value, const at::Tensor& shapes,
                        const at::Tensor& starts, const at::Tensor& ref, const at::Tensor& offsets,
                        const at::Tensor& logits) {
  deform_sample_bwd_cuda(grad_value, grad_offsets, grad_logits, grad_out, value, shapes, starts, ref, offsets, logits);
}

void deform_sample_bwd_meta_(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&) {}

}  // namespace
}  // namespace lora_kernels

TORCH_LIBRARY_FRAGMENT(lora_kernels_C, m) {
  m.def("deform_sample_fwd_(Tensor(a!) out, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
        "Tensor ref, Tensor offsets, Tensor logits) -> ()");
  m.def("deform_sample_bwd_(Tensor(a!) grad_value, Tensor(b!) grad_offsets, Tensor(c!) grad_logits, Tensor grad_out, "
        "Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor ref, Tensor offsets, "
        "Tensor logits) -> ()");
}

TORCH_LIBRARY_IMPL(lora_kernels_C, CUDA, m) {
  m.impl("deform_sample_fwd_", &lora_kernels::deform_sample_fwd_);
  m.impl("deform_sample_bwd_", &lora_kernels::deform_sample_bwd_);
}

TORCH_LIBRARY_IMPL(lora_kernels_C, Meta, m) {
  m.impl("deform_sample_fwd_", &lora_kernels::deform_sample_fwd_meta_);
  m.impl("deform_sample_bwd_", &lora_kernels::deform_sample_bwd_meta_);
}

// ---- decode LoRA delta (lora_kernels.ops.sgmv, T <= 64) -----------------------------------------------------------
// sgmv_decode_(Tensor(a!) y, Tensor x, Tensor a, Tensor b, Tensor offsets, Tensor ranks, Tensor scales,
//              Tensor token_adapter, int[] outs, int max_rank, int merged, Tensor(b!) partial,
//              Tensor(c!) counters) -> ()
//
// Semantics: lora_kernels.reference.add_lora_ (merged = -1) or mixed mode (merged = m >= 0,
// lora_kernels.ops.sgmv._reference_mixed_) on y in place; kernel in csrc/kernels/sgmv_decode.cuh.
// y [T, sum(outs)] and x [T, in] of one float dtype, T <= 64; a [S, R, in] and b [R, sum(outs)] of one float dtype
// (LoRAWeights.a / .b), S <= 8, slice s = columns [sum(outs[:s]), + outs[s]); offsets int64 [N], ranks int32 [S, N],
// scales fp32 [S, N], token_adapter int32 [T] (LoRABatch.token_adapter; ids outside [0, N) leave the row
// untouched); max_rank <= 256 bounds every rank. partial: fp32 workspace of >= T * S * ceil(in / 256) * max_rank
// elements (doubled in mixed mode), contents irrelevant; counters: int32 >= T * S elements, ZERO before the call and
// zero again after it (the kernel resets them: allocate them zeroed once). One launch on the current stream, no
// allocation, no host sync (CUDA-graph capturable); deterministic (fixed summation order).
namespace lora_kernels {
namespace {

void sgmv_decode_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                  const at::Tensor& offsets, const at::Tensor& ranks, const at::Tensor& scales,
                  const at::Tensor& token_adapter, at::IntArrayRef outs, int64_t max_rank, int64_t merged,
                  const at::Tensor& partial, const at::Tensor& counters) {
  sgmv_decode_cuda(y, x, a, b, offsets, ranks, scales, token_adapter, outs, max_rank, merged, partial, counters);
}

void sgmv_decode_meta_(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef, int64_t, int64_t,
                       const at::Tensor&, const at::Tensor&) {}

}  // namespace
}  // namespace lora_kernels

TORCH_LIBRARY_FRAGMENT(lora_kernels_C, m) {
  m.def("sgmv_decode_(Tensor(a!) y, Tensor x, Tensor a, Tensor b, Tensor offsets, Tensor ranks, Tensor scales, "
        "Tensor token_adapter, int[] outs, int max_rank, int merged, Tensor(b!) partial, Tensor(c!) counters) -> ()");
}

TORCH_LIBRARY_IMPL(lora_kernels_C, CUDA, m) {
  m.impl("sgmv_decode_", &lora_kernels::sgmv_decode_);
}

TORCH_LIBRARY_IMPL(lora_kernels_C, Meta, m) {
  m.impl("sgmv_decode_", &lora_kernels::sgmv_decode_meta_);
}

// ---- decode fused LoRA linear (lora_kernels.nn.LoRALinear, T <= 64) ----------------------------------------------
// fused_lora_linear_(Tensor(a!) y, Tensor x, Tensor w0, Tensor? bias, Tensor a, Tensor b, Tensor offsets,
//                    Tensor ranks, Tensor scales, Tensor token_adapter, int[] outs, int max_rank, int merged,
//                    Tensor(b!) workspace, Tensor(c!) counters) -> ()
//
// Semantics: y = rnd(x @ w0^T (+ bias) + delta), y fully overwritten and rounded once, with delta that of
// sgmv_decode_ (merged = -1: lora_kernels.reference.add_lora_; merged = m >= 0: mixed mode, w0 holding W0 + delta_m);
// kernel in csrc/kernels/fused_lora_linear.cuh. y [T, sum(outs)], x [T, in], w0 [out, in], bias [out] or None,
// a [S, R, in], b [R, sum(outs)] all of ONE float dtype (the instantiations built), T <= 64, S <= 8, slice s =
// columns [sum(outs[:s]), + outs[s]); offsets int64 [N], ranks int32 [S, N], scales fp32 [S, N], token_adapter int32
// [T] (ids outside [0, N): no delta); max_rank <= 256 bounds every rank. workspace: fp32 of >= T * S * ceil(in / 256)
// * rows + T * S * rows + T * out elements (rows = max_rank, doubled in mixed mode), contents irrelevant; counters:
// int32 >= 1 + ceil(out / 8) elements, ZERO before the call and zero again after it (the kernel resets them: allocate
// them zeroed once). One launch on the current stream, no allocation, no host sync (CUDA-graph capturable);
// deterministic (fixed summation order).
namespace lora_kernels {
namespace {

void fused_lora_linear_(const at::Tensor& y, const at::Tensor& x, const at::Tensor& w0,
                        const std::optional<at::Tensor>& bias, const at::Tensor& a, const at::Tensor& b,
                        const at::Tensor& offsets, const at::Tensor& ranks, const at::Tensor& scales,
                        const at::Tensor& token_adapter, at::IntArrayRef outs, int64_t max_rank, int64_t merged,
                        const at::Tensor& workspace, const at::Tensor& counters) {
  fused_lora_linear_cuda(y, x, w0, bias.has_value() ? static_cast<const at::TensorBase&>(*bias) : at::TensorBase(),
                         a, b, offsets, ranks, scales, token_adapter, outs, max_rank, merged, workspace, counters);
}

void fused_lora_linear_meta_(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             at::IntArrayRef, int64_t, int64_t, const at::Tensor&, const at::Tensor&) {}

}  // namespace
}  // namespace lora_kernels

TORCH_LIBRARY_FRAGMENT(lora_kernels_C, m) {
  m.def("fused_lora_linear_(Tensor(a!) y, Tensor x, Tensor w0, Tensor? bias, Tensor a, Tensor b, Tensor offsets, "
        "Tensor ranks, Tensor scales, Tensor token_adapter, int[] outs, int max_rank, int merged, "
        "Tensor(b!) workspace, Tensor(c!) counters) -> ()");
}

TORCH_LIBRARY_IMPL(lora_kernels_C, CUDA, m) {
  m.impl("fused_lora_linear_", &lora_kernels::fused_lora_linear_);
}

TORCH_LIBRARY_IMPL(lora_kernels_C, Meta, m) {
  m.impl("fused_lora_linear_", &lora_kernels::fused_lora_linear_meta_);
}
