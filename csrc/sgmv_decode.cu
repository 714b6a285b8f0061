// Launcher of the decode LoRA delta (kernels/sgmv_decode.cuh): argument checks, device guard, current stream,
// dtype / vector-variant dispatch. Called by lora_kernels.ops.sgmv (the add_lora_ dispatch, T <= 64, only once
// `lora-bench tune` verified the kernel on this GPU model). One launch, no allocation, no host sync.
//
// Instantiations: x and y of one dtype (fp16 / bf16 / fp32) and the weights in any of the three, each with the
// 16-byte vector variant and the scalar fallback: 18 kernels. (The .cuh supports x, weights and y dtypes
// independently, 54 kernels; an x / y dtype mismatch is rare in serving and each instantiation costs build time,
// so those calls keep the Triton path: the Python gate checks x.dtype == y.dtype, and this launcher refuses them.)
#include "kernels/sgmv_decode.cuh"

// The launch templates and sgmv_decode_dispatch must be visible to nvcc's device passes too: a kernel template is
// compiled for the GPU only where that pass instantiates it (tests/test_extension.py checks the built cubins).
namespace lora_kernels {
namespace {

template <typename TXY, typename TW>
void sgmv_decode_typed(const SgmvDecodeParams& p, const SgmvDecodeLaunch& l, bool vec, cudaStream_t stream) {
  if (vec) {
    sgmv_decode_kernel<TXY, TW, TXY, true><<<l.grid, l.block, 0, stream>>>(p);
  } else {
    sgmv_decode_kernel<TXY, TW, TXY, false><<<l.grid, l.block, 0, stream>>>(p);
  }
}

template <typename TXY>
void sgmv_decode_w(const SgmvDecodeParams& p, const SgmvDecodeLaunch& l, int w_kind, bool vec, cudaStream_t st) {
  switch (w_kind) {
    case 0: sgmv_decode_typed<TXY, __half>(p, l, vec, st); break;
    case 1: sgmv_decode_typed<TXY, __nv_bfloat16>(p, l, vec, st); break;
    default: sgmv_decode_typed<TXY, float>(p, l, vec, st); break;
  }
}

}  // namespace

// Dtype kinds: 0 fp16, 1 bf16, 2 fp32 (xy_kind: x and y; w_kind: a and b).
inline void sgmv_decode_dispatch(const SgmvDecodeParams& p, const SgmvDecodeLaunch& l, int xy_kind, int w_kind,
                                 bool vec, cudaStream_t stream) {
  switch (xy_kind) {
    case 0: sgmv_decode_w<__half>(p, l, w_kind, vec, stream); break;
    case 1: sgmv_decode_w<__nv_bfloat16>(p, l, w_kind, vec, stream); break;
    default: sgmv_decode_w<float>(p, l, w_kind, vec, stream); break;
  }
}

}  // namespace lora_kernels

#ifndef __CUDA_ARCH__
#include <ATen/core/TensorBase.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "ops.h"

namespace lora_kernels {
namespace {

constexpr int64_t kSgmvMaxTokens = 64;  // the decode kernel's domain: one block per (chunk, slice, token)

int dtype_kind(const at::TensorBase& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return 0;
    case at::kBFloat16: return 1;
    case at::kFloat: return 2;
    default:
      TORCH_CHECK(false, "sgmv_decode_: ", name, ": expected float16, bfloat16 or float32, got ", t.scalar_type());
  }
  return -1;  // unreachable
}

void check_cuda_on(const at::TensorBase& t, const char* name, const at::TensorBase& y) {
  TORCH_CHECK(t.is_cuda() && t.device() == y.device(), "sgmv_decode_: ", name, ": expected a tensor on ", y.device(),
              " (as y), got ", t.device());
}

// Metadata: the given dtype, a contiguous tensor of the given shape.
void check_meta(const at::TensorBase& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                const at::TensorBase& y) {
  check_cuda_on(t, name, y);
  TORCH_CHECK(t.scalar_type() == dtype, "sgmv_decode_: ", name, ": expected ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape && t.is_contiguous(), "sgmv_decode_: ", name,
              ": expected a contiguous tensor of shape ", shape, ", got shape ", t.sizes(), " strides ", t.strides());
}

// Unit stride in the last dim (rows may be strided).
void check_inner(const at::TensorBase& t, const char* name) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, "sgmv_decode_: ", name,
              ": expected a unit stride in the last dim, got strides ", t.strides());
}

}  // namespace

void sgmv_decode_cuda(const at::TensorBase& y, const at::TensorBase& x, const at::TensorBase& a,
                      const at::TensorBase& b, const at::TensorBase& offsets, const at::TensorBase& ranks,
                      const at::TensorBase& scales, const at::TensorBase& token_adapter, at::IntArrayRef outs,
                      int64_t max_rank, int64_t merged, const at::TensorBase& partial,
                      const at::TensorBase& counters) {
  TORCH_CHECK(y.is_cuda(), "sgmv_decode_: y: expected a CUDA tensor, got device ", y.device());
  TORCH_CHECK(y.dim() == 2, "sgmv_decode_: y: expected a 2-D tensor [T, sum(outs)], got ", y.dim(), "-D");
  TORCH_CHECK(x.dim() == 2, "sgmv_decode_: x: expected a 2-D tensor [T, in], got ", x.dim(), "-D");
  TORCH_CHECK(a.dim() == 3, "sgmv_decode_: a: expected a 3-D tensor [S, R, in], got ", a.dim(), "-D");
  TORCH_CHECK(b.dim() == 2, "sgmv_decode_: b: expected a 2-D tensor [R, sum(outs)], got ", b.dim(), "-D");
  check_cuda_on(x, "x", y);
  check_cuda_on(a, "a", y);
  check_cuda_on(b, "b", y);
  const int xy_kind = dtype_kind(y, "y"), w_kind = dtype_kind(a, "a");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "sgmv_decode_: x: expected y's dtype ", y.scalar_type(),
              " (the decode kernel is built for x and y of one dtype), got ", x.scalar_type());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), "sgmv_decode_: b: expected a's dtype ", a.scalar_type(), ", got ",
              b.scalar_type());
  check_inner(y, "y");
  check_inner(x, "x");
  check_inner(a, "a");
  check_inner(b, "b");

  const int64_t T = y.size(0), S = a.size(0), R = a.size(1), in = a.size(2);
  TORCH_CHECK(T <= kSgmvMaxTokens, "sgmv_decode_: y: expected at most ", kSgmvMaxTokens,
              " tokens (the decode kernel; larger batches take the Triton path), got ", T);
  TORCH_CHECK(x.size(0) == T && x.size(1) == in, "sgmv_decode_: x: expected shape [", T, ", ", in,
              "] (y's T, a's in), got ", x.sizes());
  TORCH_CHECK(S >= 1 && S <= kSgmvMaxSlices, "sgmv_decode_: a: expected 1 to ", kSgmvMaxSlices,
              " slices (dim 0), got ", S);
  TORCH_CHECK(static_cast<int64_t>(outs.size()) == S, "sgmv_decode_: outs: expected one width per slice (", S,
              "), got ", outs.size());
  int64_t total = 0;
  SgmvDecodeParams p{};
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(outs[s] >= 0, "sgmv_decode_: outs: expected widths >= 0, got ", outs);
    p.col[s] = total;
    p.out[s] = outs[s];
    total += outs[s];
  }
  TORCH_CHECK(y.size(1) == total, "sgmv_decode_: y: expected ", total, " columns (sum of outs ", outs, "), got ",
              y.size(1));
  TORCH_CHECK(T <= 1 || y.stride(0) >= total, "sgmv_decode_: y: expected rows that do not overlap (row stride >= ",
              total, "), got strides ", y.strides());
  TORCH_CHECK(b.size(0) == R && b.size(1) == total, "sgmv_decode_: b: expected shape [", R, ", ", total,
              "] (a's rows, sum of outs), got ", b.sizes());
  TORCH_CHECK(max_rank >= 0 && max_rank <= kSgmvMaxRank, "sgmv_decode_: max_rank: expected 0 <= max_rank <= ",
              kSgmvMaxRank, " (the decode kernel's shared-memory h), got ", max_rank);
  TORCH_CHECK(max_rank <= R, "sgmv_decode_: max_rank: expected at most a's ", R, " rows, got ", max_rank);
  TORCH_CHECK(ranks.dim() == 2, "sgmv_decode_: ranks: expected a 2-D tensor [S, N], got ", ranks.dim(), "-D");
  const int64_t N = ranks.size(1);
  check_meta(ranks, "ranks", at::kInt, {S, N}, y);
  check_meta(scales, "scales", at::kFloat, {S, N}, y);
  check_meta(offsets, "offsets", at::kLong, {N}, y);
  check_meta(token_adapter, "token_adapter", at::kInt, {T}, y);
  TORCH_CHECK(merged >= -1 && merged < N, "sgmv_decode_: merged: expected -1 or an adapter id in [0, ", N, "), got ",
              merged);

  const SgmvDecodeLaunch l = sgmv_decode_launch(T, S, in, max_rank, merged >= 0);
  TORCH_CHECK(l.ok, "sgmv_decode_: shapes outside the decode kernel's limits (T=", T, ", S=", S, ", in=", in,
              ", max_rank=", max_rank, ")");
  check_cuda_on(partial, "partial", y);
  check_cuda_on(counters, "counters", y);
  TORCH_CHECK(partial.scalar_type() == at::kFloat && partial.is_contiguous() && partial.numel() >= l.partial_floats,
              "sgmv_decode_: partial: expected a contiguous float32 workspace of at least ", l.partial_floats,
              " elements (T * S * ceil(in / ", kSgmvChunk, ") * max_rank, doubled in mixed mode), got ",
              partial.scalar_type(), " with ", partial.numel(), " elements");
  TORCH_CHECK(counters.scalar_type() == at::kInt && counters.is_contiguous() && counters.numel() >= l.counter_ints,
              "sgmv_decode_: counters: expected a contiguous int32 tensor of at least T * S = ", l.counter_ints,
              " elements, zero between calls, got ", counters.scalar_type(), " with ", counters.numel(), " elements");
  if (T == 0 || l.chunks == 0 || l.rows_cap == 0) return;  // nothing to add (and an empty grid is not launchable)

  p.x = x.const_data_ptr();
  p.y = y.data_ptr();
  p.a = a.const_data_ptr();
  p.b = b.const_data_ptr();
  p.offsets = offsets.const_data_ptr<int64_t>();
  p.ranks = ranks.const_data_ptr<int32_t>();
  p.scales = scales.const_data_ptr<float>();
  p.token_adapter = token_adapter.const_data_ptr<int32_t>();
  p.partial = partial.data_ptr<float>();
  p.counter = counters.data_ptr<int32_t>();
  p.T = T;
  p.S = S;
  p.N = N;
  p.in = in;
  p.chunks = l.chunks;
  p.rows_cap = l.rows_cap;
  p.x_stride = x.stride(0);
  p.y_stride = y.stride(0);
  p.a_slice_stride = a.stride(0);
  p.a_row_stride = a.stride(1);
  p.b_stride = b.stride(0);
  p.merged = merged;
  const int64_t sxy = y.element_size(), sw = a.element_size();
  const bool vec = sgmv_decode_can_vectorize(p, sxy, sw, sxy);

  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(y.device().index()).stream();
  sgmv_decode_dispatch(p, l, xy_kind, w_kind, vec, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace lora_kernels

#endif  // __CUDA_ARCH__
