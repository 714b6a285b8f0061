// What the launchers in csrc/*.cu share on the host (torch side): the argument checks, each a TORCH_CHECK whose
// message names the op and the argument ("<op>: <name>: expected ..., got ..."), and the guarded launch on the
// current stream. Include it only outside `#ifndef __CUDA_ARCH__` (the device passes do not need torch).
#pragma once

#include <ATen/core/TensorBase.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

namespace lora_kernels {

// The dtype kind of a float tensor (lora_dispatch_kind's kinds): 0 float16, 1 bfloat16, 2 float32; any other dtype
// fails.
inline int check_float_kind(const char* op, const at::TensorBase& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return 0;
    case at::kBFloat16: return 1;
    case at::kFloat: return 2;
    default: TORCH_CHECK(false, op, ": ", name, ": expected float16, bfloat16 or float32, got ", t.scalar_type());
  }
  return -1;  // unreachable
}

// A CUDA tensor on y's device.
inline void check_on(const char* op, const at::TensorBase& t, const char* name, const at::TensorBase& y) {
  TORCH_CHECK(t.is_cuda() && t.device() == y.device(), op, ": ", name, ": expected a tensor on ", y.device(),
              " (as y), got ", t.device());
}

// Metadata: on y's device, the given dtype, a contiguous tensor of the given shape.
inline void check_meta(const char* op, const at::TensorBase& t, const char* name, at::ScalarType dtype,
                       at::IntArrayRef shape, const at::TensorBase& y) {
  check_on(op, t, name, y);
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, ": expected ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape && t.is_contiguous(), op, ": ", name, ": expected a contiguous tensor of shape ",
              shape, ", got shape ", t.sizes(), " strides ", t.strides());
}

// Unit stride in the last dim (rows may be strided).
inline void check_inner(const char* op, const at::TensorBase& t, const char* name) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
              ": expected a unit stride in the last dim, got strides ", t.strides());
}

// On ref's device, of dtype st, contiguous.
inline void check_dense(const char* op, const at::TensorBase& t, const at::TensorBase& ref, const char* name,
                        at::ScalarType st) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, ": expected device ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == st, op, ": ", name, ": expected ", st, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, ": expected a contiguous tensor");
}

// ---- the decode kernels (sgmv_decode.cu, fused_lora_linear.cu) -----------------------------------------------------
// The slices of a's S (1 to max_slices) slices: outs, one width >= 0 per slice; slice s is columns [col[s], col[s] +
// out[s]) of y. Returns the sum of the widths.
inline int64_t check_decode_slices(const char* op, at::IntArrayRef outs, int64_t S, int64_t max_slices, int64_t* col,
                                   int64_t* out) {
  TORCH_CHECK(S >= 1 && S <= max_slices, op, ": a: expected 1 to ", max_slices, " slices (dim 0), got ", S);
  TORCH_CHECK(static_cast<int64_t>(outs.size()) == S, op, ": outs: expected one width per slice (", S, "), got ",
              outs.size());
  int64_t total = 0;
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(outs[s] >= 0, op, ": outs: expected widths >= 0, got ", outs);
    col[s] = total;
    out[s] = outs[s];
    total += outs[s];
  }
  return total;
}

// The adapter metadata of T tokens and S slices on y's device: ranks int32 [S, N], scales fp32 [S, N], offsets int64
// [N], token_adapter int32 [T], all contiguous; merged -1 or an adapter id in [0, N). Returns N.
inline int64_t check_decode_meta(const char* op, const at::TensorBase& ranks, const at::TensorBase& scales,
                                 const at::TensorBase& offsets, const at::TensorBase& token_adapter, int64_t S,
                                 int64_t T, int64_t merged, const at::TensorBase& y) {
  TORCH_CHECK(ranks.dim() == 2, op, ": ranks: expected a 2-D tensor [S, N], got ", ranks.dim(), "-D");
  const int64_t N = ranks.size(1);
  check_meta(op, ranks, "ranks", at::kInt, {S, N}, y);
  check_meta(op, scales, "scales", at::kFloat, {S, N}, y);
  check_meta(op, offsets, "offsets", at::kLong, {N}, y);
  check_meta(op, token_adapter, "token_adapter", at::kInt, {T}, y);
  TORCH_CHECK(merged >= -1 && merged < N, op, ": merged: expected -1 or an adapter id in [0, ", N, "), got ", merged);
  return N;
}

// Points a decode kernel's parameters p at the adapters (a, b) and their metadata (checked above).
template <typename P>
inline void bind_decode_adapters(P& p, const at::TensorBase& a, const at::TensorBase& b, const at::TensorBase& offsets,
                                 const at::TensorBase& ranks, const at::TensorBase& scales,
                                 const at::TensorBase& token_adapter) {
  p.a = a.const_data_ptr();
  p.b = b.const_data_ptr();
  p.offsets = offsets.const_data_ptr<int64_t>();
  p.ranks = ranks.const_data_ptr<int32_t>();
  p.scales = scales.const_data_ptr<float>();
  p.token_adapter = token_adapter.const_data_ptr<int32_t>();
  p.a_slice_stride = a.stride(0);
  p.a_row_stride = a.stride(1);
  p.b_stride = b.stride(0);
}

// ---- every launcher ------------------------------------------------------------------------------------------------
// launch(stream) on the current stream of `device`, under a guard of that device, then the launch error check.
template <typename F>
inline void launch_on_current_stream(const at::Device& device, F&& launch) {
  const c10::cuda::CUDAGuard guard(device);
  launch(c10::cuda::getCurrentCUDAStream(device.index()).stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace lora_kernels
