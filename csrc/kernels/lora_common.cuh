// What the kernels in csrc/kernels/ share (torch-free; every kernel header includes it): fp16 / bf16 / fp32
// conversions, vector loads and stores, lane-group sums, the workspace and counter accesses of the last-arriver
// protocols, the adapter rows of one (token, slice) and the split-`in` shrink of the decode kernels
// (sgmv_decode.cuh, fused_lora_linear.cuh), the checked-access hook of the CPU emulators (tests/cuda_emu.h), and
// on the host the 16-byte checks of the vector variants and the dispatch of a dtype kind to its element type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lora_kernels {

// ---- checked-access hook ---------------------------------------------------------------------------------------
// The buffers a global access may belong to. The helpers below pass every access they make (and the kernels the
// ones they make themselves) to LORA_CHECK_ACCESS(buf, ptr, bytes): empty on the device; tests/cuda_emu.h defines
// it to check the access against the extent of that buffer and vector accesses for alignment.
enum LoraBuf : int {
  kBufX = 0, kBufY, kBufA, kBufB, kBufMeta, kBufPartial, kBufCounter,  // decode kernels
  kBufW0, kBufBias, kBufHfin, kBufBase,                                // fused LoRA linear
  kBufValue, kBufGradOut, kBufOut,                                     // deformable pooling
  kBufAtomics,  // fp32 buffers accumulated with atomicAdd (the emulator checks its atomicAdd(float*) against it)
  kBufCount
};
#ifndef LORA_CHECK_ACCESS
#define LORA_CHECK_ACCESS(buf, ptr, bytes)
#endif

// ---- element types ---------------------------------------------------------------------------------------------
// fp32 <-> element type: exact widening, round-to-nearest-even narrowing.
template <typename T>
struct LoraFmt;
template <>
struct LoraFmt<float> {
  static __device__ __forceinline__ float to_f(float x) { return x; }
  static __device__ __forceinline__ float from_f(float x) { return x; }
};
template <>
struct LoraFmt<__half> {
  static __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_f(float x) { return __float2half_rn(x); }
};
template <>
struct LoraFmt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
};

// Elements of T per access: 16 / sizeof(T) in a vector variant (VEC = true), 1 in the scalar fallback.
template <typename T, bool VEC = true>
inline constexpr int kVecElems = VEC ? 16 / static_cast<int>(sizeof(T)) : 1;

// ---- loads and stores --------------------------------------------------------------------------------------------
// One read-only element (metadata, a weight) through the read-only data path.
template <typename T>
__device__ __forceinline__ T lora_ldg(int buf, const T* p) {
  LORA_CHECK_ACCESS(buf, p, sizeof(T));
  return __ldg(p);
}

// N consecutive read-only elements -> fp32 through the read-only data path: 16-byte loads when N * sizeof(T) is a
// multiple of 16, one 8-byte load when it is 8, else scalar (the caller guarantees the alignment of the vector
// cases).
template <typename T, int N>
__device__ __forceinline__ void lora_load_ro(int buf, const T* __restrict__ p, float (&v)[N]) {
  LORA_CHECK_ACCESS(buf, p, N * sizeof(T));
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
#pragma unroll
    for (int q = 0; q < kBytes / 16; ++q) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + q);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < 16 / static_cast<int>(sizeof(T)); ++j) v[q * (16 / sizeof(T)) + j] = LoraFmt<T>::to_f(e[j]);
    }
  } else if constexpr (kBytes == 8) {
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = LoraFmt<T>::to_f(e[j]);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = LoraFmt<T>::to_f(__ldg(p + j));
  }
}

// N consecutive elements -> fp32 with plain loads (memory that is not read-only for the whole launch, e.g. y): one
// 16-byte load when N * sizeof(T) == 16 (the caller guarantees the alignment), else scalar.
template <typename T, int N>
__device__ __forceinline__ void lora_load(int buf, const T* __restrict__ p, float (&v)[N]) {
  LORA_CHECK_ACCESS(buf, p, N * sizeof(T));
  if constexpr (N * sizeof(T) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = LoraFmt<T>::to_f(e[j]);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = LoraFmt<T>::to_f(p[j]);
  }
}

// fp32 -> N consecutive elements, each rounded once: one 16-byte store when N * sizeof(T) == 16 (the caller
// guarantees the alignment), else scalar.
template <typename T, int N>
__device__ __forceinline__ void lora_store(int buf, T* __restrict__ p, const float (&v)[N]) {
  LORA_CHECK_ACCESS(buf, p, N * sizeof(T));
  if constexpr (N * sizeof(T) == 16) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int j = 0; j < N; ++j) e[j] = LoraFmt<T>::from_f(v[j]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) p[j] = LoraFmt<T>::from_f(v[j]);
  }
}

// ---- workspace and counters of the last-arriver protocols ----------------------------------------------------------
// Workspace written by other blocks of this launch: read through L2 (not the non-coherent read-only path).
__device__ __forceinline__ float lora_ws_load(int buf, const float* p) {
  LORA_CHECK_ACCESS(buf, p, sizeof(float));
  return __ldcg(p);
}
__device__ __forceinline__ void lora_ws_store(int buf, float* p, float v) {
  LORA_CHECK_ACCESS(buf, p, sizeof(float));
  *p = v;
}
// atomicAdd on an int32 counter of the workspace; returns the old value.
__device__ __forceinline__ int lora_count(int32_t* c, int v) {
  LORA_CHECK_ACCESS(kBufCounter, c, sizeof(int32_t));
  return atomicAdd(c, v);
}
// Back to 0 for the next call (the callers zero the counters once, at allocation).
__device__ __forceinline__ void lora_reset(int32_t* c) {
  LORA_CHECK_ACCESS(kBufCounter, c, sizeof(int32_t));
  atomicExch(c, 0);
}

// Sum over each aligned group of kLanes consecutive lanes (a power of two <= 32) by a __shfl_xor_sync butterfly;
// every lane of the group gets the sum. Every lane of the warp must take part.
template <int kLanes = 32>
__device__ __forceinline__ float lora_lane_sum(float v) {
#pragma unroll
  for (int o = kLanes / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- the decode kernels: adapter rows of one (token, slice) and the split-`in` shrink ------------------------------
// Own adapter i = token_adapter[t] (r_i rows from off_i, scale sc_i), then in mixed mode the merged adapter m (r_m
// rows from off_m, scale sc_m): rows k < r_i are i's, the next r_m are m's.
struct LoraRows {
  int64_t off_i, off_m;
  int r_i, r_m;
  float sc_i, sc_m;
};

// Storage row (in a and b) of row k of q.
__device__ __forceinline__ int64_t lora_row(const LoraRows& q, int k) {
  return k < q.r_i ? q.off_i + k : q.off_m + (k - q.r_i);
}

// ranks[s, id], clamped to [0, min(the workspace's rows per adapter, kMaxRank)]: never past the workspace (rows_cap
// is doubled in mixed mode: two adapters per (token, slice)) or a kMaxRank-sized buffer of the kernel.
template <int kMaxRank, typename P>
__device__ __forceinline__ int lora_rank(const P& p, int64_t s, int64_t id) {
  const int r = lora_ldg(kBufMeta, p.ranks + s * p.N + id);
  int64_t cap = p.merged >= 0 ? p.rows_cap / 2 : p.rows_cap;
  cap = cap < kMaxRank ? cap : kMaxRank;
  return r < 0 ? 0 : (r > cap ? static_cast<int>(cap) : r);
}

// The rows of token t in slice s, from the metadata of p (a decode kernel's parameters: token_adapter [T], ranks,
// scales [S, N], offsets [N], merged, rows_cap). Ids outside [0, N) count as -1: no own rows. Mixed mode (merged =
// m >= 0): tokens of m have no rows at all; every other token also gets m's rows.
template <int kMaxRank, typename P>
__device__ __forceinline__ LoraRows lora_rows(const P& p, int64_t t, int64_t s) {
  LoraRows q{0, 0, 0, 0, 0.f, 0.f};
  int64_t id = lora_ldg(kBufMeta, p.token_adapter + t);
  if (id < 0 || id >= p.N) id = -1;
  const int64_t m = p.merged;
  if (m >= 0 && id == m) return q;
  if (id >= 0) {
    q.r_i = lora_rank<kMaxRank>(p, s, id);
    if (q.r_i > 0) {
      q.off_i = lora_ldg(kBufMeta, p.offsets + id);
      q.sc_i = lora_ldg(kBufMeta, p.scales + s * p.N + id);
    }
  }
  if (m >= 0) {
    q.r_m = lora_rank<kMaxRank>(p, s, m);
    if (q.r_m > 0) {
      q.off_m = lora_ldg(kBufMeta, p.offsets + m);
      q.sc_m = lora_ldg(kBufMeta, p.scales + s * p.N + m);
    }
  }
  return q;
}

// c[k] of the expand: h[k] (the fp32 sum of the chunks' partials) rounded to T (what the Triton kernels do), times
// its adapter's scale, negated for the merged adapter's rows.
template <typename T>
__device__ __forceinline__ float lora_scaled_h(float h, const LoraRows& q, int k) {
  return LoraFmt<T>::to_f(LoraFmt<T>::from_f(h)) * (k < q.r_i ? q.sc_i : -q.sc_m);
}

// The shrink's chunk of one token: lane `lane` keeps the G groups of V elements x[e .. e + V), e = c0 + (g * 32 +
// lane) * V, of the chunk that starts at c0 in registers (zero past `in`; the vector variant has in % V == 0, so a
// group is all in or all out).
template <typename T, int V, int G>
__device__ __forceinline__ void lora_shrink_load_x(const T* xr, int64_t c0, int64_t in, int lane,
                                                   float (&xv)[G][V]) {
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const int64_t e = c0 + (static_cast<int64_t>(g) * 32 + lane) * V;
    if (e < in) {
      lora_load_ro<T, V>(kBufX, xr + e, xv[g]);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) xv[g][j] = 0.f;
    }
  }
}

// The chunk's dot product of one A row (ar) with the x values of lora_shrink_load_x, summed over the warp: every
// lane gets sum_e x[e] * ar[e] over the chunk.
template <typename T, int V, int G>
__device__ __forceinline__ float lora_shrink_dot(const T* ar, int64_t c0, int64_t in, int lane,
                                                 const float (&xv)[G][V]) {
  float acc = 0.f;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const int64_t e = c0 + (static_cast<int64_t>(g) * 32 + lane) * V;
    if (e < in) {
      float av[V];
      lora_load_ro<T, V>(kBufA, ar + e, av);
#pragma unroll
      for (int j = 0; j < V; ++j) acc += xv[g][j] * av[j];
    }
  }
  return lora_lane_sum(acc);
}

// ---- host ------------------------------------------------------------------------------------------------------
// The vector variants' conditions: a 16-byte aligned pointer; n elements of `size` bytes a multiple of 16 bytes.
inline bool lora_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
inline bool lora_bytes16(int64_t n, int64_t size) { return (n * size) % 16 == 0; }

// The element type of a dtype kind, as a tag: f(LoraType<T>{}) then takes T as `typename decltype(tag)::type`.
template <typename T>
struct LoraType {
  using type = T;
};

// f(LoraType<T>{}) with T the element type of `kind`: 0 __half, 1 __nv_bfloat16, any other float. A launcher that
// calls it from a non-template function instantiates f's kernels for every kind (also in nvcc's device passes).
template <typename F>
inline void lora_dispatch_kind(int64_t kind, F&& f) {
  switch (kind) {
    case 0: f(LoraType<__half>{}); break;
    case 1: f(LoraType<__nv_bfloat16>{}); break;
    default: f(LoraType<float>{}); break;
  }
}

}  // namespace lora_kernels
