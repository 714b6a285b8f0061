// Launchers of the deformable pooling kernels (kernels/deform_pool.cuh): argument checks, device guard, current
// stream, dtype and fast-path dispatch. Called only by lora_kernels.ops.deform, which validates the arguments,
// allocates the outputs (the fp32 grad value buffer zeroed) and declares them mutated in the op schemas.
#include "kernels/deform_pool.cuh"

// The launch templates are visible to the device passes too (outside the #ifndef __CUDA_ARCH__ block below):
// nvcc instantiates a templated kernel for a device only where that pass sees the launch.
namespace lora_kernels {
namespace {

// fused: deform_sample (p.ref set; loc / attn are offsets / logits), else deform_pool.
template <typename T, typename TL, int VEC, int TPG, int DC>
void launch_one(const DeformPoolParams& p, bool backward, bool fused, cudaStream_t stream) {
  const int64_t threads = p.B * p.Q * p.H * TPG;
  const dim3 grid(static_cast<unsigned>((threads + kDeformThreads - 1) / kDeformThreads));
  if (fused && backward) {
    deform_sample_bwd_kernel<T, TL, VEC, TPG, DC><<<grid, kDeformThreads, 0, stream>>>(p);
  } else if (fused) {
    deform_sample_fwd_kernel<T, TL, VEC, TPG, DC><<<grid, kDeformThreads, 0, stream>>>(p);
  } else if (backward) {
    deform_pool_bwd_kernel<T, TL, VEC, TPG, DC><<<grid, kDeformThreads, 0, stream>>>(p);
  } else {
    deform_pool_fwd_kernel<T, TL, VEC, TPG, DC><<<grid, kDeformThreads, 0, stream>>>(p);
  }
}

// Fast paths: D = 32 / 64 / 128 with 128-bit channel loads (VEC = 16 / sizeof(T) channels per lane); generic:
// one channel per lane, TPG = D rounded up to a power of two in [4, 32], chunks of TPG channels.
template <typename T, typename TL>
void launch_typed(const DeformPoolParams& p, bool aligned, bool backward, bool fused, cudaStream_t stream) {
  constexpr int V = kVecElems<T>;
  if (aligned && p.D == 32) return launch_one<T, TL, V, 32 / V, 32>(p, backward, fused, stream);
  if (aligned && p.D == 64) return launch_one<T, TL, V, 64 / V, 64>(p, backward, fused, stream);
  if (aligned && p.D == 128) return launch_one<T, TL, V, 128 / V, 128>(p, backward, fused, stream);
  if (p.D <= 4) return launch_one<T, TL, 1, 4, 0>(p, backward, fused, stream);
  if (p.D <= 8) return launch_one<T, TL, 1, 8, 0>(p, backward, fused, stream);
  if (p.D <= 16) return launch_one<T, TL, 1, 16, 0>(p, backward, fused, stream);
  launch_one<T, TL, 1, 32, 0>(p, backward, fused, stream);
}

}  // namespace

// kind: 0 fp16, 1 bf16, 2 fp32 (value); loc_f32: locations / weights (fused: offsets / logits) in fp32 with a
// 16-bit value; fused: the deform_sample kernels (p.ref set). (Not in the anonymous namespace: the device passes
// see it unused.)
inline void deform_dispatch(const DeformPoolParams& p, int kind, bool loc_f32, bool aligned, bool backward,
                            bool baseline, bool fused, cudaStream_t stream) {
  if (baseline) {
    const int64_t n = p.B * p.Q * p.H * p.D;
    const dim3 grid(static_cast<unsigned>((n + kDeformThreads - 1) / kDeformThreads));
    if (backward) {
      deform_pool_baseline_bwd_kernel<<<grid, kDeformThreads, 0, stream>>>(p);
    } else {
      deform_pool_baseline_fwd_kernel<<<grid, kDeformThreads, 0, stream>>>(p);
    }
    return;
  }
  lora_dispatch_kind(kind, [&](auto tag) {
    using T = typename decltype(tag)::type;  // fp32 value: loc_f32 changes nothing (TL = T = float)
    if (loc_f32) {
      launch_typed<T, float>(p, aligned, backward, fused, stream);
    } else {
      launch_typed<T, T>(p, aligned, backward, fused, stream);
    }
  });
}

}  // namespace lora_kernels

#ifndef __CUDA_ARCH__
#include <ATen/core/TensorBase.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

#include "launch_checks.h"
#include "ops.h"

namespace lora_kernels {
namespace {

int kind_of(at::ScalarType st) { return st == at::kHalf ? 0 : st == at::kBFloat16 ? 1 : 2; }

constexpr const char* kOp = "deform_pool";

// Launches the kernels of p (value's dtype kind, loc / attn in fp32 or not) on the current stream of value's device.
void launch_deform(const DeformPoolParams& p, const at::TensorBase& value, bool loc_f32, bool aligned, bool backward,
                   bool baseline, bool fused) {
  launch_on_current_stream(value.device(), [&](cudaStream_t stream) {
    deform_dispatch(p, kind_of(value.scalar_type()), loc_f32, aligned, backward, baseline, fused, stream);
  });
}

// The backward's outputs (checked by the caller): fp32 grad value (empty: not computed), grad loc, grad attn.
void bind_grads(DeformPoolParams& p, const at::TensorBase& grad_value, const at::TensorBase& grad_loc,
                const at::TensorBase& grad_attn, const at::TensorBase& grad_out) {
  p.grad_out = grad_out.const_data_ptr();
  p.grad_value = grad_value.numel() ? grad_value.data_ptr<float>() : nullptr;
  p.grad_loc = grad_loc.data_ptr();
  p.grad_attn = grad_attn.data_ptr();
}

// The backward's 16-byte alignment: value, grad_out and (when computed) grad value.
bool bwd_aligned(const DeformPoolParams& p) {
  return lora_aligned16(p.value) && lora_aligned16(p.grad_out) &&
         (p.grad_value == nullptr || lora_aligned16(p.grad_value));
}

DeformPoolParams make_params(const at::TensorBase& value, const at::TensorBase& shapes, const at::TensorBase& starts,
                             const at::TensorBase& loc, const at::TensorBase& attn) {
  TORCH_CHECK(value.is_cuda(), "deform_pool: value: expected a CUDA tensor, got device ", value.device());
  TORCH_CHECK(value.dim() == 4, "deform_pool: value: expected [B, S, H, D], got ", value.sizes());
  const auto st = value.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "deform_pool: value: expected float32, float16 or bfloat16, got ", st);
  check_dense(kOp, value, value, "value", st);
  check_dense(kOp, shapes, value, "spatial_shapes", at::kLong);
  check_dense(kOp, starts, value, "level_start_index", at::kLong);
  const auto lst = loc.scalar_type() == at::kFloat ? at::kFloat : st;  // value's dtype, or fp32
  check_dense(kOp, loc, value, "sampling_locations", lst);
  check_dense(kOp, attn, value, "attention_weights", lst);
  DeformPoolParams p{};
  p.B = value.size(0);
  p.S = value.size(1);
  p.H = value.size(2);
  p.D = value.size(3);
  TORCH_CHECK(loc.dim() == 6 && loc.size(0) == p.B && loc.size(2) == p.H && loc.size(5) == 2,
              "deform_pool: sampling_locations: expected [B, Q, H, L, P, 2], got ", loc.sizes());
  p.Q = loc.size(1);
  p.L = loc.size(3);
  p.P = loc.size(4);
  TORCH_CHECK(shapes.dim() == 2 && shapes.size(0) == p.L && shapes.size(1) == 2,
              "deform_pool: spatial_shapes: expected [L, 2], got ", shapes.sizes());
  TORCH_CHECK(starts.numel() == p.L, "deform_pool: level_start_index: expected ", p.L, " entries, got ",
              starts.numel());
  TORCH_CHECK(attn.dim() == 5 && attn.size(0) == p.B && attn.size(1) == p.Q && attn.size(2) == p.H &&
                  attn.size(3) == p.L && attn.size(4) == p.P,
              "deform_pool: attention_weights: expected [B, Q, H, L, P], got ", attn.sizes());
  // The launches use one thread per (group, lane) with at most 32 lanes (one per channel in the baseline), in
  // blocks of kDeformThreads along gridDim.x: refuse what would not fit in 2^31 - 1 blocks.
  const int64_t lanes = p.D > 32 ? p.D : 32;
  TORCH_CHECK(p.B * p.Q * p.H <= (static_cast<int64_t>(std::numeric_limits<int32_t>::max()) * kDeformThreads) / lanes,
              "deform_pool: B * Q * H = ", p.B * p.Q * p.H, " is too large for one launch (grid limit)");
  p.value = value.const_data_ptr();
  p.shapes = shapes.const_data_ptr<int64_t>();
  p.starts = starts.const_data_ptr<int64_t>();
  p.loc = loc.const_data_ptr();
  p.attn = attn.const_data_ptr();
  return p;
}

}  // namespace

void deform_pool_fwd_cuda(const at::TensorBase& out, const at::TensorBase& value, const at::TensorBase& shapes,
                          const at::TensorBase& starts, const at::TensorBase& loc, const at::TensorBase& attn,
                          bool baseline) {
  DeformPoolParams p = make_params(value, shapes, starts, loc, attn);
  check_dense(kOp, out, value, "out", value.scalar_type());
  TORCH_CHECK(out.numel() == p.B * p.Q * p.H * p.D, "deform_pool: out: expected [B, Q, H * D], got ", out.sizes());
  if (out.numel() == 0) return;
  p.out = out.data_ptr();
  TORCH_CHECK(!baseline || value.scalar_type() == at::kFloat, "deform_pool baseline: expected float32, got ",
              value.scalar_type());
  const bool aligned = lora_aligned16(p.value) && lora_aligned16(p.out);
  launch_deform(p, value, loc.scalar_type() == at::kFloat, aligned, false, baseline, false);
}

void deform_pool_bwd_cuda(const at::TensorBase& grad_value, const at::TensorBase& grad_loc,
                          const at::TensorBase& grad_attn, const at::TensorBase& grad_out, const at::TensorBase& value,
                          const at::TensorBase& shapes, const at::TensorBase& starts, const at::TensorBase& loc,
                          const at::TensorBase& attn, bool baseline) {
  DeformPoolParams p = make_params(value, shapes, starts, loc, attn);
  const auto gst = baseline ? at::kFloat : loc.scalar_type();
  check_dense(kOp, grad_value, value, "grad_value", at::kFloat);
  check_dense(kOp, grad_loc, value, "grad_loc", gst);
  check_dense(kOp, grad_attn, value, "grad_attn", gst);
  check_dense(kOp, grad_out, value, "grad_out", value.scalar_type());
  TORCH_CHECK(grad_value.numel() == value.numel() || (grad_value.numel() == 0 && !baseline),
              "deform_pool: grad_value: expected ", value.sizes(), " (or empty: not computed), got ",
              grad_value.sizes());
  TORCH_CHECK(grad_loc.numel() == loc.numel(), "deform_pool: grad_loc: expected ", loc.sizes(), ", got ",
              grad_loc.sizes());
  TORCH_CHECK(grad_attn.numel() == attn.numel(), "deform_pool: grad_attn: expected ", attn.sizes(), ", got ",
              grad_attn.sizes());
  TORCH_CHECK(grad_out.numel() == p.B * p.Q * p.H * p.D, "deform_pool: grad_out: expected [B, Q, H * D], got ",
              grad_out.sizes());
  if (grad_out.numel() == 0 || p.L == 0 || p.P == 0) return;
  bind_grads(p, grad_value, grad_loc, grad_attn, grad_out);
  TORCH_CHECK(!baseline || value.scalar_type() == at::kFloat, "deform_pool baseline: expected float32, got ",
              value.scalar_type());
  launch_deform(p, value, loc.scalar_type() == at::kFloat, bwd_aligned(p), true, baseline, false);
}

namespace {

void set_ref(DeformPoolParams& p, const at::TensorBase& ref, const at::TensorBase& value) {
  check_dense(kOp, ref, value, "ref", at::kFloat);
  TORCH_CHECK(ref.dim() == 2 && ref.size(0) == p.Q && ref.size(1) == 2, "deform_sample: ref: expected [", p.Q,
              ", 2], got ", ref.sizes());
  p.ref = ref.const_data_ptr<float>();
}

}  // namespace

// Fused (deform_sample): offsets [B, Q, H, L, P, 2] and logits [B, Q, H, L, P] in place of locations and weights.
void deform_sample_fwd_cuda(const at::TensorBase& out, const at::TensorBase& value, const at::TensorBase& shapes,
                            const at::TensorBase& starts, const at::TensorBase& ref, const at::TensorBase& offsets,
                            const at::TensorBase& logits) {
  DeformPoolParams p = make_params(value, shapes, starts, offsets, logits);
  set_ref(p, ref, value);
  check_dense(kOp, out, value, "out", value.scalar_type());
  TORCH_CHECK(out.numel() == p.B * p.Q * p.H * p.D, "deform_sample: out: expected [B, Q, H * D], got ", out.sizes());
  if (out.numel() == 0) return;
  TORCH_CHECK(p.L > 0 && p.P > 0, "deform_sample: expected L, P >= 1 (the caller zero-fills otherwise)");
  p.out = out.data_ptr();
  const bool aligned = lora_aligned16(p.value) && lora_aligned16(p.out);
  launch_deform(p, value, offsets.scalar_type() == at::kFloat, aligned, false, false, true);
}

void deform_sample_bwd_cuda(const at::TensorBase& grad_value, const at::TensorBase& grad_offsets,
                            const at::TensorBase& grad_logits, const at::TensorBase& grad_out,
                            const at::TensorBase& value, const at::TensorBase& shapes, const at::TensorBase& starts,
                            const at::TensorBase& ref, const at::TensorBase& offsets, const at::TensorBase& logits) {
  DeformPoolParams p = make_params(value, shapes, starts, offsets, logits);
  set_ref(p, ref, value);
  check_dense(kOp, grad_value, value, "grad_value", at::kFloat);
  check_dense(kOp, grad_offsets, value, "grad_offsets", offsets.scalar_type());
  check_dense(kOp, grad_logits, value, "grad_logits", at::kFloat);
  check_dense(kOp, grad_out, value, "grad_out", value.scalar_type());
  TORCH_CHECK(grad_value.numel() == value.numel() || grad_value.numel() == 0, "deform_sample: grad_value: expected ",
              value.sizes(), " (or empty: not computed), got ", grad_value.sizes());
  TORCH_CHECK(grad_offsets.numel() == offsets.numel(), "deform_sample: grad_offsets: expected ", offsets.sizes(),
              ", got ", grad_offsets.sizes());
  TORCH_CHECK(grad_logits.numel() == logits.numel(), "deform_sample: grad_logits: expected ", logits.sizes(),
              ", got ", grad_logits.sizes());
  TORCH_CHECK(grad_out.numel() == p.B * p.Q * p.H * p.D, "deform_sample: grad_out: expected [B, Q, H * D], got ",
              grad_out.sizes());
  if (grad_out.numel() == 0 || p.L == 0 || p.P == 0) return;
  bind_grads(p, grad_value, grad_offsets, grad_logits, grad_out);
  launch_deform(p, value, offsets.scalar_type() == at::kFloat, bwd_aligned(p), true, false, true);
}

}  // namespace lora_kernels
#endif  // __CUDA_ARCH__
