// Launcher of the decode LoRA delta (kernels/sgmv_decode.cuh): argument checks, device guard, current stream,
// dtype / vector-variant dispatch. Called by lora_kernels.ops.sgmv (the add_lora_ dispatch, T <= 64, only once
// `lora-bench tune` verified the kernel on this GPU model). One launch, no allocation, no host sync.
//
// Instantiations: x and y of one dtype (fp16 / bf16 / fp32) and the weights in any of the three, each with the
// 16-byte vector variant and the scalar fallback: 18 kernels. (The .cuh supports x, weights and y dtypes
// independently, 54 kernels; an x / y dtype mismatch is rare in serving and each instantiation costs build time,
// so those calls keep the Triton path: the Python gate checks x.dtype == y.dtype, and this launcher refuses them.)
#include "kernels/sgmv_decode.cuh"

// sgmv_decode_dispatch must be visible to nvcc's device passes too: a kernel template is compiled for the GPU only
// where that pass instantiates it (tests/test_extension.py checks the built cubins).
namespace lora_kernels {

// Dtype kinds: 0 fp16, 1 bf16, 2 fp32 (xy_kind: x and y; w_kind: a and b).
inline void sgmv_decode_dispatch(const SgmvDecodeParams& p, const SgmvDecodeLaunch& l, int xy_kind, int w_kind,
                                 bool vec, cudaStream_t stream) {
  lora_dispatch_kind(xy_kind, [&](auto txy) {
    lora_dispatch_kind(w_kind, [&](auto tw) {
      using TXY = typename decltype(txy)::type;
      using TW = typename decltype(tw)::type;
      if (vec) {
        sgmv_decode_kernel<TXY, TW, TXY, true><<<l.grid, l.block, 0, stream>>>(p);
      } else {
        sgmv_decode_kernel<TXY, TW, TXY, false><<<l.grid, l.block, 0, stream>>>(p);
      }
    });
  });
}

}  // namespace lora_kernels

#ifndef __CUDA_ARCH__
#include <ATen/core/TensorBase.h>
#include <c10/util/Exception.h>

#include "launch_checks.h"
#include "ops.h"

namespace lora_kernels {
namespace {

constexpr const char* kOp = "sgmv_decode_";
constexpr int64_t kSgmvMaxTokens = 64;  // the decode kernel's domain: one block per (chunk, slice, token)

}  // namespace

void sgmv_decode_cuda(const at::TensorBase& y, const at::TensorBase& x, const at::TensorBase& a,
                      const at::TensorBase& b, const at::TensorBase& offsets, const at::TensorBase& ranks,
                      const at::TensorBase& scales, const at::TensorBase& token_adapter, at::IntArrayRef outs,
                      int64_t max_rank, int64_t merged, const at::TensorBase& partial,
                      const at::TensorBase& counters) {
  TORCH_CHECK(y.is_cuda(), kOp, ": y: expected a CUDA tensor, got device ", y.device());
  TORCH_CHECK(y.dim() == 2, kOp, ": y: expected a 2-D tensor [T, sum(outs)], got ", y.dim(), "-D");
  TORCH_CHECK(x.dim() == 2, kOp, ": x: expected a 2-D tensor [T, in], got ", x.dim(), "-D");
  TORCH_CHECK(a.dim() == 3, kOp, ": a: expected a 3-D tensor [S, R, in], got ", a.dim(), "-D");
  TORCH_CHECK(b.dim() == 2, kOp, ": b: expected a 2-D tensor [R, sum(outs)], got ", b.dim(), "-D");
  check_on(kOp, x, "x", y);
  check_on(kOp, a, "a", y);
  check_on(kOp, b, "b", y);
  const int xy_kind = check_float_kind(kOp, y, "y"), w_kind = check_float_kind(kOp, a, "a");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), kOp, ": x: expected y's dtype ", y.scalar_type(),
              " (the decode kernel is built for x and y of one dtype), got ", x.scalar_type());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), kOp, ": b: expected a's dtype ", a.scalar_type(), ", got ",
              b.scalar_type());
  check_inner(kOp, y, "y");
  check_inner(kOp, x, "x");
  check_inner(kOp, a, "a");
  check_inner(kOp, b, "b");

  const int64_t T = y.size(0), S = a.size(0), R = a.size(1), in = a.size(2);
  TORCH_CHECK(T <= kSgmvMaxTokens, kOp, ": y: expected at most ", kSgmvMaxTokens,
              " tokens (the decode kernel; larger batches take the Triton path), got ", T);
  TORCH_CHECK(x.size(0) == T && x.size(1) == in, kOp, ": x: expected shape [", T, ", ", in,
              "] (y's T, a's in), got ", x.sizes());
  SgmvDecodeParams p{};
  const int64_t total = check_decode_slices(kOp, outs, S, kSgmvMaxSlices, p.col, p.out);
  TORCH_CHECK(y.size(1) == total, kOp, ": y: expected ", total, " columns (sum of outs ", outs, "), got ",
              y.size(1));
  TORCH_CHECK(T <= 1 || y.stride(0) >= total, kOp, ": y: expected rows that do not overlap (row stride >= ",
              total, "), got strides ", y.strides());
  TORCH_CHECK(b.size(0) == R && b.size(1) == total, kOp, ": b: expected shape [", R, ", ", total,
              "] (a's rows, sum of outs), got ", b.sizes());
  TORCH_CHECK(max_rank >= 0 && max_rank <= kSgmvMaxRank, kOp, ": max_rank: expected 0 <= max_rank <= ",
              kSgmvMaxRank, " (the decode kernel's shared-memory h), got ", max_rank);
  TORCH_CHECK(max_rank <= R, kOp, ": max_rank: expected at most a's ", R, " rows, got ", max_rank);
  const int64_t N = check_decode_meta(kOp, ranks, scales, offsets, token_adapter, S, T, merged, y);

  const SgmvDecodeLaunch l = sgmv_decode_launch(T, S, in, max_rank, merged >= 0);
  TORCH_CHECK(l.ok, kOp, ": shapes outside the decode kernel's limits (T=", T, ", S=", S, ", in=", in,
              ", max_rank=", max_rank, ")");
  check_on(kOp, partial, "partial", y);
  check_on(kOp, counters, "counters", y);
  TORCH_CHECK(partial.scalar_type() == at::kFloat && partial.is_contiguous() && partial.numel() >= l.partial_floats,
              kOp, ": partial: expected a contiguous float32 workspace of at least ", l.partial_floats,
              " elements (T * S * ceil(in / ", kSgmvChunk, ") * max_rank, doubled in mixed mode), got ",
              partial.scalar_type(), " with ", partial.numel(), " elements");
  TORCH_CHECK(counters.scalar_type() == at::kInt && counters.is_contiguous() && counters.numel() >= l.counter_ints,
              kOp, ": counters: expected a contiguous int32 tensor of at least T * S = ", l.counter_ints,
              " elements, zero between calls, got ", counters.scalar_type(), " with ", counters.numel(), " elements");
  if (T == 0 || l.chunks == 0 || l.rows_cap == 0) return;  // nothing to add (and an empty grid is not launchable)

  p.x = x.const_data_ptr();
  p.y = y.data_ptr();
  bind_decode_adapters(p, a, b, offsets, ranks, scales, token_adapter);
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
  p.merged = merged;
  const int64_t sxy = y.element_size(), sw = a.element_size();
  const bool vec = sgmv_decode_can_vectorize(p, sxy, sw, sxy);

  launch_on_current_stream(y.device(), [&](cudaStream_t stream) {
    sgmv_decode_dispatch(p, l, xy_kind, w_kind, vec, stream);
  });
}

}  // namespace lora_kernels

#endif  // __CUDA_ARCH__
