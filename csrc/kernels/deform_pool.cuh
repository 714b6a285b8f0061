// Multi-scale deformable pooling (VCE / Deformable-DETR's MSDeformAttn core), forward and backward (torch-free;
// launched by csrc/deform_pool.cu).
//
// Semantics (lora_kernels.reference.deform_pool, grid_sample(align_corners=False, zeros) on 2 * loc - 1):
//   out[b, q, h, d] = sum_{l, p} a[b, q, h, l, p] * bilinear_l(value[b, start_l + ., h, d], x, y),
//   x = loc_x * W_l - 0.5, y = loc_y * H_l - 0.5, zero outside the image.
// Layouts (all contiguous): value [B, S, H, D]; shapes int64 [L, 2] (H_l, W_l); starts int64 [L];
// loc [B, Q, H, L, P, 2]; attn [B, Q, H, L, P]; out / grad_out [B, Q, H * D]. Types: value / out / grad_out T
// (fp32, fp16, bf16); loc / attn and their gradients TL (T, or fp32 with a 16-bit T: full-precision locations).
//
// Work split (DCNv4's "flash" layout): a group of TPG consecutive lanes (TPG | 32) owns one (b, q, h); each lane
// holds VEC consecutive channels (one 128-bit load per corner in the fast paths: D = TPG * VEC with D = 32, 64,
// 128 and VEC = 16 / sizeof(T)); the generic path (any D) has VEC = 1, TPG = 32 and loops over channel chunks.
// The location, weight, bilinear corner weights and corner offsets are computed once per (q, h, l, p) by each lane
// and used for all its channels; nothing of size B*Q*H*L*P*D is ever stored.
//
// A sample is skipped (zero value, zero gradients) unless -1 <= x < W_l and -1 <= y < H_l (outside that box every
// corner is padding; NaN/Inf locations fail the comparisons): the reference's documented non-finite behaviour.
// A corner whose value row start_l + y * W_l + x is outside [0, S) counts as outside the image too (zero value,
// zero gradients), in every kernel here: level metadata passed unvalidated (validate=False) that points outside
// value contributes nothing and is never read, or written by the backward's atomics, out of range.
//
// Backward: per (q, h, l, p) each lane forms its channels' partial sums of grad attn / grad loc, reduced over the
// group with __shfl_xor_sync (no atomics, no shared memory; lane 0 of the group writes); grad value is scattered
// with fp32 atomicAdd (float4 atomics on sm_90 in the fast paths) into a zeroed, 16-byte aligned fp32 buffer
// [B, S, H, D] (the caller casts it): the order of the atomics, and so the last bits of grad value, may change
// run to run. grad_value == nullptr skips it (the deterministic mode computes it without atomics).
//
// Fused form (deform_sample_*_kernel, VCE's sampling step; lora_kernels.reference.deform_sample): the same kernels
// with the location and weight arithmetic inside (DeformSampler<TL, true>): loc / attn hold the offsets
// [B, Q, H, L, P, 2] (pixels of each level) and the logits [B, Q, H, L * P]; per (b, q, h) the kernel forms
// loc = ref[q] + offset / (W_l, H_l) (IEEE division) and a = softmax of the L * P logits (max, then sum of exp; fp32).
// Backward: grad offsets = grad loc / (W_l, H_l); grad logits (fp32 buffer) = a * (grad a - sum_j a_j grad a_j),
// formed by lane 0 of the group after its loop over the samples.
//
// The Deformable-DETR-style baseline kernels at the end (deform_pool_baseline_*): fp32 only, one thread per
// (b, q, h, d), scalar loads, location and weight re-read per channel, atomics for every gradient. They exist
// only as the benchmark's stand-in for the op the official VCE code runs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "lora_common.cuh"

namespace lora_kernels {

constexpr int kDeformThreads = 256;

// Reads of value (the row guard below protects them), of grad_out and the stores of out go through
// LORA_CHECK_ACCESS (lora_common.cuh; tests/deform_pool_emu.cpp checks each against its buffer): kBufValue,
// kBufGradOut, kBufOut.
struct DeformPoolParams {
  const void* value;
  const int64_t* shapes;
  const int64_t* starts;
  const void* loc;
  const void* attn;
  void* out;             // forward output [B, Q, H * D]
  const void* grad_out;  // backward input [B, Q, H * D]
  float* grad_value;     // backward, fp32 [B, S, H, D], zeroed by the caller; nullptr: not computed (the
                         // deterministic mode computes it separately, without atomics)
  void* grad_loc;        // backward [B, Q, H, L, P, 2]
  void* grad_attn;       // backward [B, Q, H, L, P]; fused: grad logits, always fp32
  const float* ref;      // fused only (deform_sample): reference points [Q, 2] (x, y); loc / attn are then the
                         // offsets and logits, grad_loc / grad_attn their gradients
  int64_t B, S, Q, H, D, L, P;
};

// A value read of one row's VEC channels (the reads the row guard protects) and one fp32 value read (the baseline).
template <typename T, int VEC>
__device__ __forceinline__ void deform_load_value(const T* p, float (&v)[VEC]) {
  lora_load<T, VEC>(kBufValue, p, v);
}

__device__ __forceinline__ float deform_value_read(const float* p) {
  LORA_CHECK_ACCESS(kBufValue, p, sizeof(float));
  return *p;
}

// p[j] += scale * v[j] for j < VEC, atomically per element. sm_90+: 128-bit float4 atomics when VEC % 4 == 0 (the
// caller guarantees 16-byte alignment: the fast paths only), a quarter of the atomic instructions.
template <int VEC>
__device__ __forceinline__ void deform_atomic_add(float* p, const float (&v)[VEC], float scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int k = 0; k < VEC / 4; ++k) {
      atomicAdd(reinterpret_cast<float4*>(p) + k,
                make_float4(scale * v[4 * k], scale * v[4 * k + 1], scale * v[4 * k + 2], scale * v[4 * k + 3]));
    }
  } else  // NOLINT(readability/braces): the scalar loop below is this else branch on sm_90
#endif
  {
#pragma unroll
    for (int j = 0; j < VEC; ++j) atomicAdd(p + j, scale * v[j]);
  }
}

// Geometry of one sample: corner weights (already multiplied by nothing), element offsets of the four corners
// relative to value + (b * S * H + h) * D (in units of rows of H * D), and which corners are inside.
struct DeformSample {
  bool ok;          // inside the box where any corner can be in the image
  float fx, fy;     // fractional parts
  int64_t row00;    // pixel row index (start + y0 * W + x0) of corner 00, may be out of range when masked
  int64_t wl;       // W_l
  bool in00, in01, in10, in11;  // inside the image and the corner's row inside [0, S)
};

__device__ __forceinline__ bool deform_row_ok(int64_t row, int64_t S) { return row >= 0 && row < S; }

__device__ __forceinline__ DeformSample deform_geometry(float lx, float ly, int64_t hl, int64_t wl, int64_t st,
                                                        int64_t S) {
  DeformSample s;
  const float wf = static_cast<float>(wl), hf = static_cast<float>(hl);
  const float x = lx * wf - 0.5f, y = ly * hf - 0.5f;
  s.ok = (x >= -1.f) && (x < wf) && (y >= -1.f) && (y < hf);  // false for NaN / Inf
  const float xs = s.ok ? x : 0.f, ys = s.ok ? y : 0.f;
  const float x0f = floorf(xs), y0f = floorf(ys);
  s.fx = xs - x0f;
  s.fy = ys - y0f;
  const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
  s.wl = wl;
  s.row00 = st + y0 * wl + x0;
  const bool ix0 = x0 >= 0, ix1 = x0 + 1 < wl, iy0 = y0 >= 0, iy1 = y0 + 1 < hl;
  s.in00 = s.ok && iy0 && ix0 && deform_row_ok(s.row00, S);
  s.in01 = s.ok && iy0 && ix1 && deform_row_ok(s.row00 + 1, S);
  s.in10 = s.ok && iy1 && ix0 && deform_row_ok(s.row00 + wl, S);
  s.in11 = s.ok && iy1 && ix1 && deform_row_ok(s.row00 + wl + 1, S);
  return s;
}

// Where the samples of one (b, q, h) come from. FUSED = false (deform_pool): locations and weights are read.
// FUSED = true (deform_sample): loc = ref[q] + offset / (W_l, H_l) and a = softmax over the L * P logits, in fp32
// (the max and the sum of exp are formed once per group, here).
template <typename TL, bool FUSED>
struct DeformSampler {
  const TL* loc;
  const TL* attn;
  float rx = 0.f, ry = 0.f, mx = 0.f, sum = 1.f;

  __device__ __forceinline__ DeformSampler(const DeformPoolParams& p, int64_t group)
      : loc(static_cast<const TL*>(p.loc)), attn(static_cast<const TL*>(p.attn)) {
    if constexpr (FUSED) {
      const int64_t q = (group / p.H) % p.Q, n = p.L * p.P;
      rx = p.ref[2 * q];
      ry = p.ref[2 * q + 1];
      const TL* lg = attn + group * n;
      mx = n > 0 ? LoraFmt<TL>::to_f(lg[0]) : 0.f;
      for (int64_t i = 1; i < n; ++i) mx = fmaxf(mx, LoraFmt<TL>::to_f(lg[i]));
      sum = 0.f;
      for (int64_t i = 0; i < n; ++i) sum += expf(LoraFmt<TL>::to_f(lg[i]) - mx);
    }
  }
  // Normalised location (x, y) of sample idx (= (group * L + l) * P + p) on a level of W x H.
  __device__ __forceinline__ void location(int64_t idx, int64_t wl, int64_t hl, float& lx, float& ly) const {
    lx = LoraFmt<TL>::to_f(loc[2 * idx]);
    ly = LoraFmt<TL>::to_f(loc[2 * idx + 1]);
    if constexpr (FUSED) {
      lx = rx + lx / static_cast<float>(wl);
      ly = ry + ly / static_cast<float>(hl);
    }
  }
  // Geometry of sample idx on a level of W x H (start row st; value has S rows).
  __device__ __forceinline__ DeformSample geometry(int64_t idx, int64_t wl, int64_t hl, int64_t st, int64_t S) const {
    float lx, ly;
    location(idx, wl, hl, lx, ly);
    return deform_geometry(lx, ly, hl, wl, st, S);
  }
  __device__ __forceinline__ float weight(int64_t idx) const {
    const float v = LoraFmt<TL>::to_f(attn[idx]);
    if constexpr (FUSED) {
      return expf(v - mx) / sum;
    } else {
      return v;
    }
  }
};

// Forward. DC: the head dim when fixed at compile time (fast paths, D == TPG * VEC), 0 for the generic path.
template <typename T, typename TL, int VEC, int TPG, int DC, bool FUSED>
__device__ __forceinline__ void deform_fwd_body(const DeformPoolParams& p) {
  const int64_t n_groups = p.B * p.Q * p.H;
  const int64_t group = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / TPG;
  if (group >= n_groups) return;  // whole groups exit together; the forward has no shuffles
  const int lane = threadIdx.x % TPG;
  const int64_t D = DC ? DC : p.D;
  const int64_t H = p.H, L = p.L, P = p.P;
  const int64_t b = group / (p.Q * H), h = group % H;
  const T* vbase = static_cast<const T*>(p.value) + (b * p.S * H + h) * D;
  const DeformSampler<TL, FUSED> src(p, group);
  T* out = static_cast<T*>(p.out) + group * D;
  const int64_t hd = H * D;
  for (int64_t c0 = static_cast<int64_t>(lane) * VEC; c0 < D; c0 += TPG * VEC) {
    float acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t hl = __ldg(p.shapes + 2 * l), wl = __ldg(p.shapes + 2 * l + 1), st = __ldg(p.starts + l);
      for (int64_t pt = 0; pt < P; ++pt) {
        const int64_t idx = (group * L + l) * P + pt;
        const DeformSample s = src.geometry(idx, wl, hl, st, p.S);
        if (!s.ok) continue;
        const float a = src.weight(idx);
        const float w[4] = {a * (1.f - s.fx) * (1.f - s.fy), a * s.fx * (1.f - s.fy), a * (1.f - s.fx) * s.fy,
                            a * s.fx * s.fy};
        const bool in[4] = {s.in00, s.in01, s.in10, s.in11};
        const int64_t rows[4] = {s.row00, s.row00 + 1, s.row00 + wl, s.row00 + wl + 1};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (!in[k]) continue;
          float v[VEC];
          deform_load_value<T, VEC>(vbase + rows[k] * hd + c0, v);
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[j] = fmaf(w[k], v[j], acc[j]);
        }
      }
    }
    lora_store<T, VEC>(kBufOut, out + c0, acc);
  }
}

// Backward. Every lane of a warp reaches every shuffle: groups past the end compute on a clamped group and do
// not write.
template <typename T, typename TL, int VEC, int TPG, int DC, bool FUSED>
__device__ __forceinline__ void deform_bwd_body(const DeformPoolParams& p) {
  using TA = typename std::conditional<FUSED, float, TL>::type;  // grad logits: fp32 (the softmax pass re-reads)
  const int64_t n_groups = p.B * p.Q * p.H;
  const int64_t raw_group = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / TPG;
  const bool live = raw_group < n_groups;
  const int64_t group = live ? raw_group : n_groups - 1;
  const int lane = threadIdx.x % TPG;
  const int64_t D = DC ? DC : p.D;
  const int64_t H = p.H, L = p.L, P = p.P;
  const int64_t b = group / (p.Q * H), h = group % H;
  const int64_t hd = H * D;
  const int64_t vofs = (b * p.S * H + h) * D;
  const T* vbase = static_cast<const T*>(p.value) + vofs;
  float* gvbase = p.grad_value != nullptr ? p.grad_value + vofs : nullptr;
  const DeformSampler<TL, FUSED> src(p, group);
  const T* gout = static_cast<const T*>(p.grad_out) + group * D;
  TL* gloc = static_cast<TL*>(p.grad_loc);
  TA* gattn = static_cast<TA*>(p.grad_attn);
  float dot = 0.f;  // fused: sum_j a_j * grad a_j over the group's samples (the softmax backward)
  constexpr bool kOneChunk = DC != 0;
  float g1[VEC];  // the lane's grad_out channels when they fit in one chunk (fast paths)
  if (kOneChunk) lora_load<T, VEC>(kBufGradOut, gout + lane * VEC, g1);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t hl = __ldg(p.shapes + 2 * l), wl = __ldg(p.shapes + 2 * l + 1), st = __ldg(p.starts + l);
    for (int64_t pt = 0; pt < P; ++pt) {
      const int64_t idx = (group * L + l) * P + pt;
      const DeformSample s = src.geometry(idx, wl, hl, st, p.S);
      const float a = src.weight(idx);
      float ga = 0.f, gx = 0.f, gy = 0.f;
      if (s.ok) {
        const float w00 = (1.f - s.fx) * (1.f - s.fy), w01 = s.fx * (1.f - s.fy), w10 = (1.f - s.fx) * s.fy,
                    w11 = s.fx * s.fy;
        for (int64_t c0 = static_cast<int64_t>(lane) * VEC; c0 < D; c0 += TPG * VEC) {
          float g[VEC];
          if (kOneChunk) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) g[j] = g1[j];
          } else {
            lora_load<T, VEC>(kBufGradOut, gout + c0, g);
          }
          float v00[VEC], v01[VEC], v10[VEC], v11[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) v00[j] = v01[j] = v10[j] = v11[j] = 0.f;
          if (s.in00) deform_load_value<T, VEC>(vbase + s.row00 * hd + c0, v00);
          if (s.in01) deform_load_value<T, VEC>(vbase + (s.row00 + 1) * hd + c0, v01);
          if (s.in10) deform_load_value<T, VEC>(vbase + (s.row00 + wl) * hd + c0, v10);
          if (s.in11) deform_load_value<T, VEC>(vbase + (s.row00 + wl + 1) * hd + c0, v11);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const float val = w00 * v00[j] + w01 * v01[j] + w10 * v10[j] + w11 * v11[j];
            ga = fmaf(g[j], val, ga);
            gx = fmaf(g[j], (1.f - s.fy) * (v01[j] - v00[j]) + s.fy * (v11[j] - v10[j]), gx);
            gy = fmaf(g[j], (1.f - s.fx) * (v10[j] - v00[j]) + s.fx * (v11[j] - v01[j]), gy);
          }
          if (live && gvbase != nullptr) {
            float ag[VEC];
#pragma unroll
            for (int j = 0; j < VEC; ++j) ag[j] = a * g[j];
            if (s.in00) deform_atomic_add<VEC>(gvbase + s.row00 * hd + c0, ag, w00);
            if (s.in01) deform_atomic_add<VEC>(gvbase + (s.row00 + 1) * hd + c0, ag, w01);
            if (s.in10) deform_atomic_add<VEC>(gvbase + (s.row00 + wl) * hd + c0, ag, w10);
            if (s.in11) deform_atomic_add<VEC>(gvbase + (s.row00 + wl + 1) * hd + c0, ag, w11);
          }
        }
      }
      ga = lora_lane_sum<TPG>(ga);
      gx = lora_lane_sum<TPG>(gx);
      gy = lora_lane_sum<TPG>(gy);
      if (live && lane == 0) {
        if constexpr (FUSED) {  // d loc / d offset = 1 / W_l (1 / H_l) cancels the W_l (H_l) of d x / d loc
          gattn[idx] = ga;  // grad a, turned into grad logit below
          dot = fmaf(a, ga, dot);
          gloc[2 * idx] = LoraFmt<TL>::from_f(gx * a);
          gloc[2 * idx + 1] = LoraFmt<TL>::from_f(gy * a);
        } else {
          gattn[idx] = LoraFmt<TL>::from_f(ga);
          gloc[2 * idx] = LoraFmt<TL>::from_f(gx * a * static_cast<float>(wl));
          gloc[2 * idx + 1] = LoraFmt<TL>::from_f(gy * a * static_cast<float>(hl));
        }
      }
    }
  }
  if constexpr (FUSED) {  // softmax backward; the same lane wrote these entries above
    if (live && lane == 0) {
      for (int64_t i = group * L * P; i < (group + 1) * L * P; ++i) gattn[i] = src.weight(i) * (gattn[i] - dot);
    }
  }
}

// The four entry kernels, one per body and form (FUSED: the deform_sample kernels).
#define LORA_DEFORM_KERNEL(name, body, fused)                                  \
  template <typename T, typename TL, int VEC, int TPG, int DC>                 \
  __global__ void __launch_bounds__(kDeformThreads) name(DeformPoolParams p) { \
    body<T, TL, VEC, TPG, DC, fused>(p);                                       \
  }
LORA_DEFORM_KERNEL(deform_pool_fwd_kernel, deform_fwd_body, false)
LORA_DEFORM_KERNEL(deform_sample_fwd_kernel, deform_fwd_body, true)
LORA_DEFORM_KERNEL(deform_pool_bwd_kernel, deform_bwd_body, false)
LORA_DEFORM_KERNEL(deform_sample_bwd_kernel, deform_bwd_body, true)
#undef LORA_DEFORM_KERNEL

// ---- baseline: Deformable-DETR's layout (fp32, one thread per output channel) -----------------------------------
// v points at the level's first row (start_l); rows st + ... outside [0, S) read as zero (unvalidated metadata).
__device__ __forceinline__ float deform_baseline_bilinear(const float* v, int64_t hl, int64_t wl, int64_t hd,
                                                          int64_t st, int64_t S, float y, float x) {
  const int64_t y0 = static_cast<int64_t>(floorf(y)), x0 = static_cast<int64_t>(floorf(x));
  const float fy = y - y0, fx = x - x0;
  const int64_t r00 = y0 * wl + x0;
  float r = 0.f;
  if (y0 >= 0 && x0 >= 0 && deform_row_ok(st + r00, S)) r += (1 - fy) * (1 - fx) * deform_value_read(v + r00 * hd);
  if (y0 >= 0 && x0 + 1 < wl && deform_row_ok(st + r00 + 1, S)) r += (1 - fy) * fx * deform_value_read(v + (r00 + 1) * hd);
  if (y0 + 1 < hl && x0 >= 0 && deform_row_ok(st + r00 + wl, S)) r += fy * (1 - fx) * deform_value_read(v + (r00 + wl) * hd);
  if (y0 + 1 < hl && x0 + 1 < wl && deform_row_ok(st + r00 + wl + 1, S)) r += fy * fx * deform_value_read(v + (r00 + wl + 1) * hd);
  return r;
}

__global__ void __launch_bounds__(kDeformThreads) deform_pool_baseline_fwd_kernel(DeformPoolParams p) {
  const int64_t n = p.B * p.Q * p.H * p.D;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t d = i % p.D, group = i / p.D, h = group % p.H, b = group / (p.Q * p.H);
  const int64_t hd = p.H * p.D;
  const float* vb = static_cast<const float*>(p.value) + b * p.S * hd + h * p.D + d;
  const float* loc = static_cast<const float*>(p.loc);
  const float* attn = static_cast<const float*>(p.attn);
  float acc = 0.f;
  for (int64_t l = 0; l < p.L; ++l) {
    const int64_t hl = p.shapes[2 * l], wl = p.shapes[2 * l + 1], st = p.starts[l];
    const float* v = vb + st * hd;
    for (int64_t pt = 0; pt < p.P; ++pt) {
      const int64_t idx = (group * p.L + l) * p.P + pt;
      const float y = loc[2 * idx + 1] * hl - 0.5f, x = loc[2 * idx] * wl - 0.5f;
      if (y >= -1.f && x >= -1.f && y < hl && x < wl) {
        acc += attn[idx] * deform_baseline_bilinear(v, hl, wl, hd, st, p.S, y, x);
      }
    }
  }
  static_cast<float*>(p.out)[i] = acc;
}

// grad_loc / grad_attn must be zeroed (fp32): every channel adds its share with atomicAdd (the "_gm" variant).
__global__ void __launch_bounds__(kDeformThreads) deform_pool_baseline_bwd_kernel(DeformPoolParams p) {
  const int64_t n = p.B * p.Q * p.H * p.D;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t d = i % p.D, group = i / p.D, h = group % p.H, b = group / (p.Q * p.H);
  const int64_t hd = p.H * p.D;
  const int64_t ofs = b * p.S * hd + h * p.D + d;
  const float* vb = static_cast<const float*>(p.value) + ofs;
  float* gvb = p.grad_value + ofs;
  const float* loc = static_cast<const float*>(p.loc);
  const float* attn = static_cast<const float*>(p.attn);
  float* gloc = static_cast<float*>(p.grad_loc);
  float* gattn = static_cast<float*>(p.grad_attn);
  const float g = static_cast<const float*>(p.grad_out)[i];
  for (int64_t l = 0; l < p.L; ++l) {
    const int64_t hl = p.shapes[2 * l], wl = p.shapes[2 * l + 1], st = p.starts[l];
    const float* v = vb + st * hd;
    float* gv = gvb + st * hd;
    for (int64_t pt = 0; pt < p.P; ++pt) {
      const int64_t idx = (group * p.L + l) * p.P + pt;
      const float y = loc[2 * idx + 1] * hl - 0.5f, x = loc[2 * idx] * wl - 0.5f;
      if (!(y >= -1.f && x >= -1.f && y < hl && x < wl)) continue;
      const float a = attn[idx];
      const int64_t y0 = static_cast<int64_t>(floorf(y)), x0 = static_cast<int64_t>(floorf(x));
      const float fy = y - y0, fx = x - x0;
      float v00 = 0, v01 = 0, v10 = 0, v11 = 0;
      const int64_t q00 = st + y0 * wl + x0;  // value rows of the corners: outside [0, S) reads as zero
      const bool i00 = y0 >= 0 && x0 >= 0 && deform_row_ok(q00, p.S),
                 i01 = y0 >= 0 && x0 + 1 < wl && deform_row_ok(q00 + 1, p.S),
                 i10 = y0 + 1 < hl && x0 >= 0 && deform_row_ok(q00 + wl, p.S),
                 i11 = y0 + 1 < hl && x0 + 1 < wl && deform_row_ok(q00 + wl + 1, p.S);
      const int64_t r00 = (y0 * wl + x0) * hd, r01 = r00 + hd, r10 = r00 + wl * hd, r11 = r10 + hd;
      if (i00) { v00 = deform_value_read(v + r00); atomicAdd(gv + r00, (1 - fy) * (1 - fx) * a * g); }
      if (i01) { v01 = deform_value_read(v + r01); atomicAdd(gv + r01, (1 - fy) * fx * a * g); }
      if (i10) { v10 = deform_value_read(v + r10); atomicAdd(gv + r10, fy * (1 - fx) * a * g); }
      if (i11) { v11 = deform_value_read(v + r11); atomicAdd(gv + r11, fy * fx * a * g); }
      const float val = (1 - fy) * (1 - fx) * v00 + (1 - fy) * fx * v01 + fy * (1 - fx) * v10 + fy * fx * v11;
      atomicAdd(gattn + idx, g * val);
      atomicAdd(gloc + 2 * idx, g * a * wl * ((1 - fy) * (v01 - v00) + fy * (v11 - v10)));
      atomicAdd(gloc + 2 * idx + 1, g * a * hl * ((1 - fx) * (v10 - v00) + fx * (v11 - v01)));
    }
  }
}

}  // namespace lora_kernels
