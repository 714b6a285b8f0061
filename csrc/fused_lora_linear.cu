// Launcher of the decode-time fused LoRA linear (kernels/fused_lora_linear.cuh): y = x @ W0^T (+ bias) + delta in
// one launch. Argument checks, device guard, current stream, dtype / vector-variant dispatch. Called by
// lora_kernels.nn.LoRALinear.forward (T <= 64, a plain nn.Linear base, only once `lora-bench tune` verified the
// kernel on this GPU model). One launch, no allocation, no host sync.
//
// Instantiations: the .cuh has one dtype TA for x / y and one TW for W0, bias and the adapters' a / b. An
// nn.Linear multiplies x by W0 in one dtype, so TA == TW here: fp16, bf16, fp32, each with the 16-byte vector
// variant and the scalar fallback: 6 kernels. (Adapters stored in another dtype than W0 keep the unfused path:
// the Python gate checks it, and this launcher refuses them.)
#include "kernels/fused_lora_linear.cuh"

// The launch templates must be visible to nvcc's device passes too: a kernel template is compiled for the GPU only
// where that pass instantiates it (tests/test_extension.py checks the built cubins).
namespace lora_kernels {
namespace {

template <typename T>
void fused_lora_linear_typed(const FusedLoraLinearParams& p, const FusedLoraLinearLaunch& l, bool vec,
                             cudaStream_t stream) {
  if (vec) {
    fused_lora_linear_kernel<T, T, true><<<l.grid, l.block, 0, stream>>>(p);
  } else {
    fused_lora_linear_kernel<T, T, false><<<l.grid, l.block, 0, stream>>>(p);
  }
}

}  // namespace

// Dtype kinds: 0 fp16, 1 bf16, 2 fp32 (x, y, W0, bias, a and b all of that dtype).
inline void fused_lora_linear_dispatch(const FusedLoraLinearParams& p, const FusedLoraLinearLaunch& l, int kind,
                                       bool vec, cudaStream_t stream) {
  switch (kind) {
    case 0: fused_lora_linear_typed<__half>(p, l, vec, stream); break;
    case 1: fused_lora_linear_typed<__nv_bfloat16>(p, l, vec, stream); break;
    default: fused_lora_linear_typed<float>(p, l, vec, stream); break;
  }
}

}  // namespace lora_kernels

#ifndef __CUDA_ARCH__
#include <ATen/core/TensorBase.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <utility>

#include "ops.h"

namespace lora_kernels {
namespace {

constexpr const char* kOp = "fused_lora_linear_: ";

int fll_dtype_kind(const at::TensorBase& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return 0;
    case at::kBFloat16: return 1;
    case at::kFloat: return 2;
    default: TORCH_CHECK(false, kOp, name, ": expected float16, bfloat16 or float32, got ", t.scalar_type());
  }
  return -1;  // unreachable
}

void fll_check_on(const at::TensorBase& t, const char* name, const at::TensorBase& y) {
  TORCH_CHECK(t.is_cuda() && t.device() == y.device(), kOp, name, ": expected a tensor on ", y.device(),
              " (as y), got ", t.device());
}

// The one dtype of the launch (the instantiations built: x, y, W0, bias, a, b alike).
void fll_check_dtype(const at::TensorBase& t, const char* name, const at::TensorBase& y) {
  TORCH_CHECK(t.scalar_type() == y.scalar_type(), kOp, name, ": expected y's dtype ", y.scalar_type(),
              " (the fused kernel is built for x, y, W0, bias and the adapters in one dtype), got ", t.scalar_type());
}

// Metadata: the given dtype, a contiguous tensor of the given shape.
void fll_check_meta(const at::TensorBase& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                    const at::TensorBase& y) {
  fll_check_on(t, name, y);
  TORCH_CHECK(t.scalar_type() == dtype, kOp, name, ": expected ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape && t.is_contiguous(), kOp, name, ": expected a contiguous tensor of shape ", shape,
              ", got shape ", t.sizes(), " strides ", t.strides());
}

// Unit stride in the last dim (rows may be strided).
void fll_check_inner(const at::TensorBase& t, const char* name) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, kOp, name, ": expected a unit stride in the last dim, got strides ",
              t.strides());
}

// Byte span [first, last) of a tensor's elements (empty tensors: an empty span).
std::pair<uintptr_t, uintptr_t> fll_span(const at::TensorBase& t) {
  if (t.numel() == 0) return {0, 0};
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const auto p = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {p, p + static_cast<uintptr_t>((last + 1) * t.element_size())};
}

// y is written while x, W0, bias, a and b are read by other blocks: it must not share bytes with them.
void fll_check_disjoint(const at::TensorBase& y, const at::TensorBase& t, const char* name) {
  if (!t.defined()) return;
  const auto ys = fll_span(y), ts = fll_span(t);
  TORCH_CHECK(ys.first == ys.second || ts.first == ts.second || ys.second <= ts.first || ts.second <= ys.first, kOp,
              "y: expected an output that does not overlap ", name, " (the kernel reads it while writing y)");
}

// Fills the tensor fields of p (the launch-derived ones come from fused_lora_linear_bind).
void fll_fill(FusedLoraLinearParams& p, const at::TensorBase& y, const at::TensorBase& x, const at::TensorBase& w0,
              const at::TensorBase& bias, const at::TensorBase& a, const at::TensorBase& b,
              const at::TensorBase& offsets, const at::TensorBase& ranks, const at::TensorBase& scales,
              const at::TensorBase& token_adapter, const FusedLoraLinearLaunch& l, const at::TensorBase& workspace,
              const at::TensorBase& counters) {
  p.x = x.const_data_ptr();
  p.y = y.data_ptr();
  p.w0 = w0.const_data_ptr();
  p.bias = bias.defined() ? bias.const_data_ptr() : nullptr;
  p.a = a.const_data_ptr();
  p.b = b.const_data_ptr();
  p.offsets = offsets.const_data_ptr<int64_t>();
  p.ranks = ranks.const_data_ptr<int32_t>();
  p.scales = scales.const_data_ptr<float>();
  p.token_adapter = token_adapter.const_data_ptr<int32_t>();
  float* ws = workspace.data_ptr<float>();  // [partial | hfin | base]
  p.partial = ws;
  p.hfin = ws + l.partial_floats;
  p.base = ws + l.partial_floats + l.hfin_floats;
  p.counter = counters.data_ptr<int32_t>();
  p.x_stride = x.stride(0);
  p.y_stride = y.stride(0);
  p.w0_stride = w0.stride(0);
  p.a_slice_stride = a.stride(0);
  p.a_row_stride = a.stride(1);
  p.b_stride = b.stride(0);
}

}  // namespace

void fused_lora_linear_cuda(const at::TensorBase& y, const at::TensorBase& x, const at::TensorBase& w0,
                            const at::TensorBase& bias, const at::TensorBase& a, const at::TensorBase& b,
                            const at::TensorBase& offsets, const at::TensorBase& ranks, const at::TensorBase& scales,
                            const at::TensorBase& token_adapter, at::IntArrayRef outs, int64_t max_rank,
                            int64_t merged, const at::TensorBase& workspace, const at::TensorBase& counters) {
  TORCH_CHECK(y.is_cuda(), kOp, "y: expected a CUDA tensor, got device ", y.device());
  TORCH_CHECK(y.dim() == 2, kOp, "y: expected a 2-D tensor [T, out], got ", y.dim(), "-D");
  TORCH_CHECK(x.dim() == 2, kOp, "x: expected a 2-D tensor [T, in], got ", x.dim(), "-D");
  TORCH_CHECK(w0.dim() == 2, kOp, "w0: expected a 2-D tensor [out, in], got ", w0.dim(), "-D");
  TORCH_CHECK(!bias.defined() || bias.dim() == 1, kOp, "bias: expected a 1-D tensor [out] or None, got ", bias.dim(),
              "-D");
  TORCH_CHECK(a.dim() == 3, kOp, "a: expected a 3-D tensor [S, R, in], got ", a.dim(), "-D");
  TORCH_CHECK(b.dim() == 2, kOp, "b: expected a 2-D tensor [R, out], got ", b.dim(), "-D");
  const int kind = fll_dtype_kind(y, "y");
  fll_check_on(x, "x", y);
  fll_check_on(w0, "w0", y);
  if (bias.defined()) fll_check_on(bias, "bias", y);
  fll_check_on(a, "a", y);
  fll_check_on(b, "b", y);
  fll_check_dtype(x, "x", y);
  fll_check_dtype(w0, "w0", y);
  if (bias.defined()) fll_check_dtype(bias, "bias", y);
  fll_check_dtype(a, "a", y);
  fll_check_dtype(b, "b", y);
  fll_check_inner(y, "y");
  fll_check_inner(x, "x");
  fll_check_inner(w0, "w0");
  fll_check_inner(a, "a");
  fll_check_inner(b, "b");
  TORCH_CHECK(!bias.defined() || bias.numel() <= 1 || bias.stride(0) == 1, kOp,
              "bias: expected a contiguous tensor, got strides ", bias.strides());

  const int64_t T = y.size(0), out = y.size(1), S = a.size(0), R = a.size(1), in = a.size(2);
  TORCH_CHECK(T <= kFllMaxTokens, kOp, "y: expected at most ", kFllMaxTokens,
              " tokens (the fused decode kernel; larger batches take base + add_lora_), got ", T);
  TORCH_CHECK(x.size(0) == T && x.size(1) == in, kOp, "x: expected shape [", T, ", ", in, "] (y's T, a's in), got ",
              x.sizes());
  TORCH_CHECK(w0.size(0) == out && w0.size(1) == in, kOp, "w0: expected shape [", out, ", ", in,
              "] (y's columns, a's in), got ", w0.sizes());
  TORCH_CHECK(!bias.defined() || bias.size(0) == out, kOp, "bias: expected ", out, " elements (y's columns), got ",
              bias.size(0));
  TORCH_CHECK(S >= 1 && S <= kFllMaxSlices, kOp, "a: expected 1 to ", kFllMaxSlices, " slices (dim 0), got ", S);
  TORCH_CHECK(static_cast<int64_t>(outs.size()) == S, kOp, "outs: expected one width per slice (", S, "), got ",
              outs.size());
  FusedLoraLinearParams p{};
  int64_t total = 0;
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(outs[s] >= 0, kOp, "outs: expected widths >= 0, got ", outs);
    p.col[s] = total;
    p.outs[s] = outs[s];
    total += outs[s];
  }
  TORCH_CHECK(out == total, kOp, "y: expected ", total, " columns (sum of outs ", outs, "), got ", out);
  TORCH_CHECK(T <= 1 || y.stride(0) >= out, kOp, "y: expected rows that do not overlap (row stride >= ", out,
              "), got strides ", y.strides());
  TORCH_CHECK(b.size(0) == R && b.size(1) == out, kOp, "b: expected shape [", R, ", ", out,
              "] (a's rows, y's columns), got ", b.sizes());
  TORCH_CHECK(max_rank >= 0 && max_rank <= kFllMaxRank, kOp, "max_rank: expected 0 <= max_rank <= ", kFllMaxRank,
              ", got ", max_rank);
  TORCH_CHECK(max_rank <= R, kOp, "max_rank: expected at most a's ", R, " rows, got ", max_rank);
  TORCH_CHECK(ranks.dim() == 2, kOp, "ranks: expected a 2-D tensor [S, N], got ", ranks.dim(), "-D");
  const int64_t N = ranks.size(1);
  fll_check_meta(ranks, "ranks", at::kInt, {S, N}, y);
  fll_check_meta(scales, "scales", at::kFloat, {S, N}, y);
  fll_check_meta(offsets, "offsets", at::kLong, {N}, y);
  fll_check_meta(token_adapter, "token_adapter", at::kInt, {T}, y);
  TORCH_CHECK(merged >= -1 && merged < N, kOp, "merged: expected -1 or an adapter id in [0, ", N, "), got ", merged);
  fll_check_disjoint(y, x, "x");
  fll_check_disjoint(y, w0, "w0");
  fll_check_disjoint(y, bias, "bias");
  fll_check_disjoint(y, a, "a");
  fll_check_disjoint(y, b, "b");
  if (T == 0 || out == 0) return;  // nothing to write (and an empty grid is not launchable)

  const FusedLoraLinearLaunch l = fused_lora_linear_launch(T, S, in, out, max_rank, merged >= 0);
  TORCH_CHECK(l.ok, kOp, "shapes outside the fused kernel's limits (T=", T, ", S=", S, ", in=", in, ", out=", out,
              ", max_rank=", max_rank, ")");
  const int64_t ws_floats = l.partial_floats + l.hfin_floats + l.base_floats;
  fll_check_on(workspace, "workspace", y);
  fll_check_on(counters, "counters", y);
  TORCH_CHECK(workspace.scalar_type() == at::kFloat && workspace.is_contiguous() && workspace.numel() >= ws_floats,
              kOp, "workspace: expected a contiguous float32 tensor of at least ", ws_floats,
              " elements (partial sums T * S * ceil(in / ", kFllChunk, ") * rows + h T * S * rows + base T * out, "
              "rows = max_rank, doubled in mixed mode), got ", workspace.scalar_type(), " with ", workspace.numel(),
              " elements");
  TORCH_CHECK(counters.scalar_type() == at::kInt && counters.is_contiguous() && counters.numel() >= l.counter_ints,
              kOp, "counters: expected a contiguous int32 tensor of at least 1 + ceil(out / ", kFllTile, ") = ",
              l.counter_ints, " elements, zero between calls, got ", counters.scalar_type(), " with ",
              counters.numel(), " elements");

  fll_fill(p, y, x, w0, bias, a, b, offsets, ranks, scales, token_adapter, l, workspace, counters);
  p.T = T;
  p.S = S;
  p.N = N;
  p.in = in;
  p.out = out;
  p.merged = merged;
  fused_lora_linear_bind(p, l);
  const bool vec = fll_can_vectorize(p, y.element_size(), y.element_size());

  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(y.device().index()).stream();
  fused_lora_linear_dispatch(p, l, kind, vec, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace lora_kernels

#endif  // __CUDA_ARCH__
