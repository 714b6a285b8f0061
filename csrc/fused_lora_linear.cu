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

// fused_lora_linear_dispatch must be visible to nvcc's device passes too: a kernel template is compiled for the GPU
// only where that pass instantiates it (tests/test_extension.py checks the built cubins).
namespace lora_kernels {

// Dtype kinds: 0 fp16, 1 bf16, 2 fp32 (x, y, W0, bias, a and b all of that dtype).
inline void fused_lora_linear_dispatch(const FusedLoraLinearParams& p, const FusedLoraLinearLaunch& l, int kind,
                                       bool vec, cudaStream_t stream) {
  lora_dispatch_kind(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (vec) {
      fused_lora_linear_kernel<T, T, true><<<l.grid, l.block, 0, stream>>>(p);
    } else {
      fused_lora_linear_kernel<T, T, false><<<l.grid, l.block, 0, stream>>>(p);
    }
  });
}

}  // namespace lora_kernels

#ifndef __CUDA_ARCH__
#include <ATen/core/TensorBase.h>
#include <c10/util/Exception.h>

#include <utility>

#include "launch_checks.h"
#include "ops.h"

namespace lora_kernels {
namespace {

constexpr const char* kOp = "fused_lora_linear_";

// The one dtype of the launch (the instantiations built: x, y, W0, bias, a, b alike).
void fll_check_dtype(const at::TensorBase& t, const char* name, const at::TensorBase& y) {
  TORCH_CHECK(t.scalar_type() == y.scalar_type(), kOp, ": ", name, ": expected y's dtype ", y.scalar_type(),
              " (the fused kernel is built for x, y, W0, bias and the adapters in one dtype), got ", t.scalar_type());
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
              ": y: expected an output that does not overlap ", name, " (the kernel reads it while writing y)");
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
  bind_decode_adapters(p, a, b, offsets, ranks, scales, token_adapter);
  float* ws = workspace.data_ptr<float>();  // [partial | hfin | base]
  p.partial = ws;
  p.hfin = ws + l.partial_floats;
  p.base = ws + l.partial_floats + l.hfin_floats;
  p.counter = counters.data_ptr<int32_t>();
  p.x_stride = x.stride(0);
  p.y_stride = y.stride(0);
  p.w0_stride = w0.stride(0);
}

}  // namespace

void fused_lora_linear_cuda(const at::TensorBase& y, const at::TensorBase& x, const at::TensorBase& w0,
                            const at::TensorBase& bias, const at::TensorBase& a, const at::TensorBase& b,
                            const at::TensorBase& offsets, const at::TensorBase& ranks, const at::TensorBase& scales,
                            const at::TensorBase& token_adapter, at::IntArrayRef outs, int64_t max_rank,
                            int64_t merged, const at::TensorBase& workspace, const at::TensorBase& counters) {
  TORCH_CHECK(y.is_cuda(), kOp, ": y: expected a CUDA tensor, got device ", y.device());
  TORCH_CHECK(y.dim() == 2, kOp, ": y: expected a 2-D tensor [T, out], got ", y.dim(), "-D");
  TORCH_CHECK(x.dim() == 2, kOp, ": x: expected a 2-D tensor [T, in], got ", x.dim(), "-D");
  TORCH_CHECK(w0.dim() == 2, kOp, ": w0: expected a 2-D tensor [out, in], got ", w0.dim(), "-D");
  TORCH_CHECK(!bias.defined() || bias.dim() == 1, kOp, ": bias: expected a 1-D tensor [out] or None, got ", bias.dim(),
              "-D");
  TORCH_CHECK(a.dim() == 3, kOp, ": a: expected a 3-D tensor [S, R, in], got ", a.dim(), "-D");
  TORCH_CHECK(b.dim() == 2, kOp, ": b: expected a 2-D tensor [R, out], got ", b.dim(), "-D");
  const int kind = check_float_kind(kOp, y, "y");
  check_on(kOp, x, "x", y);
  check_on(kOp, w0, "w0", y);
  if (bias.defined()) check_on(kOp, bias, "bias", y);
  check_on(kOp, a, "a", y);
  check_on(kOp, b, "b", y);
  fll_check_dtype(x, "x", y);
  fll_check_dtype(w0, "w0", y);
  if (bias.defined()) fll_check_dtype(bias, "bias", y);
  fll_check_dtype(a, "a", y);
  fll_check_dtype(b, "b", y);
  check_inner(kOp, y, "y");
  check_inner(kOp, x, "x");
  check_inner(kOp, w0, "w0");
  check_inner(kOp, a, "a");
  check_inner(kOp, b, "b");
  TORCH_CHECK(!bias.defined() || bias.numel() <= 1 || bias.stride(0) == 1, kOp,
              ": bias: expected a contiguous tensor, got strides ", bias.strides());

  const int64_t T = y.size(0), out = y.size(1), S = a.size(0), R = a.size(1), in = a.size(2);
  TORCH_CHECK(T <= kFllMaxTokens, kOp, ": y: expected at most ", kFllMaxTokens,
              " tokens (the fused decode kernel; larger batches take base + add_lora_), got ", T);
  TORCH_CHECK(x.size(0) == T && x.size(1) == in, kOp, ": x: expected shape [", T, ", ", in, "] (y's T, a's in), got ",
              x.sizes());
  TORCH_CHECK(w0.size(0) == out && w0.size(1) == in, kOp, ": w0: expected shape [", out, ", ", in,
              "] (y's columns, a's in), got ", w0.sizes());
  TORCH_CHECK(!bias.defined() || bias.size(0) == out, kOp, ": bias: expected ", out, " elements (y's columns), got ",
              bias.size(0));
  FusedLoraLinearParams p{};
  const int64_t total = check_decode_slices(kOp, outs, S, kFllMaxSlices, p.col, p.outs);
  TORCH_CHECK(out == total, kOp, ": y: expected ", total, " columns (sum of outs ", outs, "), got ", out);
  TORCH_CHECK(T <= 1 || y.stride(0) >= out, kOp, ": y: expected rows that do not overlap (row stride >= ", out,
              "), got strides ", y.strides());
  TORCH_CHECK(b.size(0) == R && b.size(1) == out, kOp, ": b: expected shape [", R, ", ", out,
              "] (a's rows, y's columns), got ", b.sizes());
  TORCH_CHECK(max_rank >= 0 && max_rank <= kFllMaxRank, kOp, ": max_rank: expected 0 <= max_rank <= ", kFllMaxRank,
              ", got ", max_rank);
  TORCH_CHECK(max_rank <= R, kOp, ": max_rank: expected at most a's ", R, " rows, got ", max_rank);
  const int64_t N = check_decode_meta(kOp, ranks, scales, offsets, token_adapter, S, T, merged, y);
  fll_check_disjoint(y, x, "x");
  fll_check_disjoint(y, w0, "w0");
  fll_check_disjoint(y, bias, "bias");
  fll_check_disjoint(y, a, "a");
  fll_check_disjoint(y, b, "b");
  if (T == 0 || out == 0) return;  // nothing to write (and an empty grid is not launchable)

  const FusedLoraLinearLaunch l = fused_lora_linear_launch(T, S, in, out, max_rank, merged >= 0);
  TORCH_CHECK(l.ok, kOp, ": shapes outside the fused kernel's limits (T=", T, ", S=", S, ", in=", in, ", out=", out,
              ", max_rank=", max_rank, ")");
  const int64_t ws_floats = l.partial_floats + l.hfin_floats + l.base_floats;
  check_on(kOp, workspace, "workspace", y);
  check_on(kOp, counters, "counters", y);
  TORCH_CHECK(workspace.scalar_type() == at::kFloat && workspace.is_contiguous() && workspace.numel() >= ws_floats,
              kOp, ": workspace: expected a contiguous float32 tensor of at least ", ws_floats,
              " elements (partial sums T * S * ceil(in / ", kFllChunk, ") * rows + h T * S * rows + base T * out, "
              "rows = max_rank, doubled in mixed mode), got ", workspace.scalar_type(), " with ", workspace.numel(),
              " elements");
  TORCH_CHECK(counters.scalar_type() == at::kInt && counters.is_contiguous() && counters.numel() >= l.counter_ints,
              kOp, ": counters: expected a contiguous int32 tensor of at least 1 + ceil(out / ", kFllTile, ") = ",
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

  launch_on_current_stream(y.device(), [&](cudaStream_t stream) {
    fused_lora_linear_dispatch(p, l, kind, vec, stream);
  });
}

}  // namespace lora_kernels

#endif  // __CUDA_ARCH__
