// Decode-time batched multi-LoRA delta (T <= 64 tokens) in ONE launch: a Punica-BGMV-style CUDA-core kernel
// (torch-free; a future csrc/*.cu launcher includes it; tests/sgmv_decode_emu.cpp runs it on a CPU emulation).
//
// Semantics (lora_kernels.reference.add_lora_; mixed mode lora_kernels.ops.sgmv._reference_mixed_):
//   y[t, col_s : col_s + out_s] += scales[s, i] * (x[t] @ A_{s,i}^T) @ B_{s,i}^T   for every slice s < S,
//   i = token_adapter[t] (-1, or any id outside [0, N): row untouched, bit for bit), r = ranks[s, i] (0: untouched),
//   A_{s,i} = a[s, off_i : off_i + r, :]  (a: [S, R, in], rank-paged rows, off_i = offsets[i]),
//   B_{s,i} = b[off_i : off_i + r, col_s : col_s + out_s]^T  (b: [R, sum(out)], "B transposed", row-major).
// Mixed mode (merged = m >= 0, the adapter already merged into the base weight): tokens of m untouched, tokens of
// j != m get delta_j - delta_m, tokens with -1 get -delta_m; a (t, s) entry where both ranks are 0 is untouched.
// Numerics: both products accumulate in fp32; h = x @ A^T is rounded to y's dtype before the second product (what
// the Triton kernel does); d = sum_k (scale_i * h_i[k]) B_i[k] - sum_k (scale_m * h_m[k]) B_m[k] in fp32 (the scale
// folded into h: one accumulator); y = rnd(fp32(y) + d), rounded once.
// Types: TX (x), TW (a and b), TY (y), each fp16 / bf16 / fp32, independently.
//
// Work split. Grid (chunks, S, T), kSgmvThreads = 128 threads (4 warps) per block. Block (c, s, t) is the shrink of
// chunk c (columns [c * kSgmvChunk, (c + 1) * kSgmvChunk) of `in`) for token t and slice s: its rows are the own
// adapter's r_i rows followed, in mixed mode, by the merged adapter's r_m rows (loops to r_i + r_m, never to a padded
// rank: work and bytes per adapter are proportional to its rank). Each lane keeps its 8 x values of the chunk in
// registers; warp w takes rows w, w + 4, ...: per row one (vector) load per lane of A, a dot product, a butterfly
// __shfl_xor_sync reduction, and lane 0 stores the fp32 partial to partial[t, s, c, k].
// Last block finishes: the writers of the partials issue __threadfence(), then (after __syncthreads) thread 0 does
// atomicAdd(&counter[t * S + s], 1); the block that sees chunks - 1 is the last of its (t, s). It sums the partials
// of every chunk in FIXED chunk order (0, 1, ..., chunks - 1: the bits do not depend on which block came last, no
// atomics touch y, so results are deterministic run to run), rounds h to TY into shared memory, resets the counter
// to 0 (so it is zero between calls: the caller zeroes it once at allocation) and computes the expand for
// y[t, col_s : col_s + out_s]: thread j owns VY consecutive columns per step (16-byte loads of y and of the B row
// segment in the vector variant), loops over the r_i (+ r_m) rows of B, and writes y once.
// Why no block spins: nothing waits on another block. The non-last blocks just exit; whichever block arrives last
// (in any schedule, with any number of resident blocks) does the remaining work, so the grid needs no co-residency.
// (t, s) with no rows (token -1 / rank 0; in mixed mode tokens of m, and both ranks 0) exit before the counter: the
// decision is the same in all chunks of that (t, s), so the counter stays 0 for it.
// Vector variant (VEC = true): the host (sgmv_decode_can_vectorize) found x, a, b, y 16-byte aligned and every row
// stride, slice column offset, slice width and `in` a multiple of 16 bytes in every dtype involved; then x / A use
// VX = 16 / sizeof(TX) elements per load (one 16-byte load of x, VX * sizeof(TW) bytes of A) and y / B use
// VY = 16 / sizeof(TY). Otherwise VEC = false: scalar loads everywhere (any shape, any pointer alignment).
// Workspace (sgmv_decode_launch): fp32 partial [T, S, chunks, rows_cap] (rows_cap = max_rank, doubled in mixed
// mode) and int32 counter [T * S], zeroed once by the caller. No host sync, no allocation: graph-capturable.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lora_kernels {

constexpr int kSgmvThreads = 128;                // threads per block (4 warps)
constexpr int kSgmvWarps = kSgmvThreads / 32;
constexpr int kSgmvChunk = 256;                  // elements of `in` per shrink block
constexpr int kSgmvPerLane = kSgmvChunk / 32;    // x values a lane keeps in registers
constexpr int kSgmvMaxRank = 256;                // shared h holds 2 * kSgmvMaxRank fp32 (mixed mode)
constexpr int kSgmvMaxSlices = 8;

// Test hook: tests/sgmv_decode_emu.cpp defines it to check every global access against its buffer.
enum SgmvBuf : int { kSgmvBufX = 0, kSgmvBufY, kSgmvBufA, kSgmvBufB, kSgmvBufMeta, kSgmvBufPartial, kSgmvBufCounter };
#ifndef SGMV_CHECK_ACCESS
#define SGMV_CHECK_ACCESS(buf, ptr, bytes)
#endif

struct SgmvDecodeParams {
  const void* x;               // [T, in] rows x_stride apart (TX)
  void* y;                     // [T, sum(out)] rows y_stride apart (TY)
  const void* a;               // [S, R, in] (TW)
  const void* b;               // [R, sum(out)] rows b_stride apart (TW)
  const int64_t* offsets;      // [N] first row of each adapter
  const int32_t* ranks;        // [S, N]
  const float* scales;         // [S, N]
  const int32_t* token_adapter;  // [T]
  float* partial;              // [T, S, chunks, rows_cap] workspace
  int32_t* counter;            // [T * S], zero between calls
  int64_t T, S, N, in, chunks, rows_cap;
  int64_t x_stride, y_stride, a_slice_stride, a_row_stride, b_stride;  // in elements
  int64_t col[kSgmvMaxSlices], out[kSgmvMaxSlices];
  int64_t merged;              // mixed mode: the merged adapter (-1: off)
};

template <typename T>
struct SgmvFmt;
template <>
struct SgmvFmt<float> {
  static __device__ __forceinline__ float to_f(float x) { return x; }
  static __device__ __forceinline__ float from_f(float x) { return x; }
};
template <>
struct SgmvFmt<__half> {
  static __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_f(float x) { return __float2half_rn(x); }
};
template <>
struct SgmvFmt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
};

// N consecutive elements -> fp32: 16-byte loads when N * sizeof(T) is a multiple of 16, one 8-byte load when it is
// 8, else scalar (the caller guarantees the alignment of the vector cases).
template <typename T, int N>
__device__ __forceinline__ void sgmv_load(int buf, const T* __restrict__ p, float (&v)[N]) {
  SGMV_CHECK_ACCESS(buf, p, N * sizeof(T));
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
#pragma unroll
    for (int q = 0; q < kBytes / 16; ++q) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + q);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < 16 / static_cast<int>(sizeof(T)); ++j) v[q * (16 / sizeof(T)) + j] = SgmvFmt<T>::to_f(e[j]);
    }
  } else if constexpr (kBytes == 8) {
    const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = SgmvFmt<T>::to_f(e[j]);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = SgmvFmt<T>::to_f(__ldg(p + j));
  }
}

// y is read and written by the last blocks only (plain loads: y is not read-only).
template <typename T, int N>
__device__ __forceinline__ void sgmv_load_y(T* p, float (&v)[N]) {
  SGMV_CHECK_ACCESS(kSgmvBufY, p, N * sizeof(T));
  if constexpr (N * sizeof(T) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = SgmvFmt<T>::to_f(e[j]);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) v[j] = SgmvFmt<T>::to_f(p[j]);
  }
}

template <typename T, int N>
__device__ __forceinline__ void sgmv_store_y(T* p, const float (&v)[N]) {
  SGMV_CHECK_ACCESS(kSgmvBufY, p, N * sizeof(T));
  if constexpr (N * sizeof(T) == 16) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int j = 0; j < N; ++j) e[j] = SgmvFmt<T>::from_f(v[j]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) p[j] = SgmvFmt<T>::from_f(v[j]);
  }
}

template <typename T>
__device__ __forceinline__ T sgmv_meta(const T* p) {
  SGMV_CHECK_ACCESS(kSgmvBufMeta, p, sizeof(T));
  return __ldg(p);
}

__device__ __forceinline__ float sgmv_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The rows of one (token, slice): own adapter i (r_i rows from off_i), then the merged adapter m (r_m rows).
struct SgmvRows {
  int64_t off_i, off_m;
  int r_i, r_m;
  float sc_i, sc_m;
};

__device__ __forceinline__ int sgmv_rank(const SgmvDecodeParams& p, int64_t s, int64_t id) {
  const int r = sgmv_meta(p.ranks + s * p.N + id);
  int64_t cap = p.merged >= 0 ? p.rows_cap / 2 : p.rows_cap;
  cap = cap < kSgmvMaxRank ? cap : kSgmvMaxRank;
  return r < 0 ? 0 : (r > cap ? static_cast<int>(cap) : r);  // clamped: never past the workspace or shared h
}

__device__ __forceinline__ SgmvRows sgmv_rows(const SgmvDecodeParams& p, int64_t t, int64_t s) {
  SgmvRows q{0, 0, 0, 0, 0.f, 0.f};
  int64_t id = sgmv_meta(p.token_adapter + t);
  if (id < 0 || id >= p.N) id = -1;
  const int64_t m = p.merged;
  if (m >= 0 && id == m) return q;  // mixed mode: tokens of the merged adapter are untouched
  if (id >= 0) {
    q.r_i = sgmv_rank(p, s, id);
    if (q.r_i > 0) {
      q.off_i = sgmv_meta(p.offsets + id);
      q.sc_i = sgmv_meta(p.scales + s * p.N + id);
    }
  }
  if (m >= 0) {
    q.r_m = sgmv_rank(p, s, m);
    if (q.r_m > 0) {
      q.off_m = sgmv_meta(p.offsets + m);
      q.sc_m = sgmv_meta(p.scales + s * p.N + m);
    }
  }
  return q;
}

template <bool VEC, typename TX, typename TY>
struct SgmvVec {
  static constexpr int X = VEC ? 16 / static_cast<int>(sizeof(TX)) : 1;  // x / A elements per load
  static constexpr int Y = VEC ? 16 / static_cast<int>(sizeof(TY)) : 1;  // y / B elements per load
};

// Shrink of one chunk: partial[k] = sum over the chunk of x[t, e] * A_row_k[e], k < r_i + r_m.
template <typename TX, typename TW, bool VEC>
__device__ __forceinline__ void sgmv_shrink_chunk(const SgmvDecodeParams& p, int64_t t, int64_t s, int64_t c,
                                                  const SgmvRows& q, float* part) {
  constexpr int V = SgmvVec<VEC, TX, TX>::X;
  constexpr int G = kSgmvPerLane / V;  // loads per lane per row
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t c0 = c * kSgmvChunk;
  const TX* xr = static_cast<const TX*>(p.x) + t * p.x_stride;
  float xv[G][V];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const int64_t e = c0 + (static_cast<int64_t>(g) * 32 + lane) * V;
    if (e < p.in) {  // the vector variant has in % V == 0: a group is all in or all out
      sgmv_load<TX, V>(kSgmvBufX, xr + e, xv[g]);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) xv[g][j] = 0.f;
    }
  }
  const TW* as = static_cast<const TW*>(p.a) + s * p.a_slice_stride;
  const int rows = q.r_i + q.r_m;
  for (int k = warp; k < rows; k += kSgmvWarps) {
    const int64_t row = k < q.r_i ? q.off_i + k : q.off_m + (k - q.r_i);
    const TW* ar = as + row * p.a_row_stride;
    float acc = 0.f;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int64_t e = c0 + (static_cast<int64_t>(g) * 32 + lane) * V;
      if (e < p.in) {
        float av[V];
        sgmv_load<TW, V>(kSgmvBufA, ar + e, av);
#pragma unroll
        for (int j = 0; j < V; ++j) acc += xv[g][j] * av[j];
      }
    }
    acc = sgmv_warp_sum(acc);
    if (lane == 0) {
      SGMV_CHECK_ACCESS(kSgmvBufPartial, part + k, sizeof(float));
      part[k] = acc;
    }
  }
}

// Expand of the last block: y[t, col_s + j] = rnd(y + sum_k c[k] * B_row_k[j]) over the r_i + r_m rows, with
// c[k] = sc_i * h_i[k] (own rows) / -sc_m * h_m[k] (merged rows) from shared memory: one accumulator and one loop
// over both adapters' rows (fewer live registers than two accumulators: no spills on sm_90a).
template <typename TW, typename TY, bool VEC>
__device__ __forceinline__ void sgmv_expand(const SgmvDecodeParams& p, int64_t t, int64_t s, const SgmvRows& q,
                                            const float* c) {
  constexpr int V = SgmvVec<VEC, TY, TY>::Y;
  const int64_t col = p.col[s], out = p.out[s];
  const int rows = q.r_i + q.r_m;
  TY* yr = static_cast<TY*>(p.y) + t * p.y_stride + col;
  const TW* bc = static_cast<const TW*>(p.b) + col;
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * V; j < out; j += static_cast<int64_t>(kSgmvThreads) * V) {
    float acc[V], bv[V], yv[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = 0.f;
    for (int k = 0; k < rows; ++k) {
      const int64_t row = k < q.r_i ? q.off_i + k : q.off_m + (k - q.r_i);
      sgmv_load<TW, V>(kSgmvBufB, bc + row * p.b_stride + j, bv);
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] += c[k] * bv[v];
    }
    sgmv_load_y<TY, V>(yr + j, yv);
#pragma unroll
    for (int v = 0; v < V; ++v) yv[v] += acc[v];
    sgmv_store_y<TY, V>(yr + j, yv);
  }
}

// One launch: grid sgmv_decode_launch(...).grid, kSgmvThreads threads. See the header comment.
template <typename TX, typename TW, typename TY, bool VEC>
__global__ void __launch_bounds__(kSgmvThreads) sgmv_decode_kernel(const SgmvDecodeParams p) {
  const int64_t c = blockIdx.x, s = blockIdx.y, t = blockIdx.z;
  const SgmvRows q = sgmv_rows(p, t, s);
  const int rows = q.r_i + q.r_m;
  if (rows == 0) return;  // the same in every chunk of (t, s): nobody counts, the counter stays 0
  float* part = p.partial + ((t * p.S + s) * p.chunks) * p.rows_cap;
  sgmv_shrink_chunk<TX, TW, VEC>(p, t, s, c, q, part + c * p.rows_cap);

  __shared__ int s_last;
  __shared__ float s_h[2 * kSgmvMaxRank];
  __threadfence();  // release, by each writer of a partial: visible device-wide before the count below
  __syncthreads();  // every partial of this block stored and fenced
  int32_t* cnt = p.counter + t * p.S + s;
  if (threadIdx.x == 0) {
    SGMV_CHECK_ACCESS(kSgmvBufCounter, cnt, sizeof(int32_t));
    s_last = atomicAdd(cnt, 1) == static_cast<int>(p.chunks) - 1;
  }
  __syncthreads();
  if (!s_last) return;  // block-uniform
  __threadfence();      // acquire: the other blocks' partials

  // h in fixed chunk order (deterministic), rounded to y's dtype
  for (int k = threadIdx.x; k < rows; k += kSgmvThreads) {
    float acc = 0.f;
    for (int64_t cc = 0; cc < p.chunks; ++cc) {
      const float* src = part + cc * p.rows_cap + k;
      SGMV_CHECK_ACCESS(kSgmvBufPartial, src, sizeof(float));
      acc += __ldcg(src);  // L2: written by other blocks in this launch
    }
    // h rounded to y's dtype, then its scale (negated for the merged adapter's rows)
    s_h[k] = SgmvFmt<TY>::to_f(SgmvFmt<TY>::from_f(acc)) * (k < q.r_i ? q.sc_i : -q.sc_m);
  }
  if (threadIdx.x == 0) {
    SGMV_CHECK_ACCESS(kSgmvBufCounter, cnt, sizeof(int32_t));
    atomicExch(cnt, 0);  // zero for the next call (no block of this launch touches it again)
  }
  __syncthreads();
  sgmv_expand<TW, TY, VEC>(p, t, s, q, s_h);
}

// ---- host side (no torch) -------------------------------------------------------------------------------------
struct SgmvDecodeLaunch {
  dim3 grid;               // (chunks, S, T)
  dim3 block;              // kSgmvThreads
  int64_t chunks;          // ceil(in / kSgmvChunk)
  int64_t rows_cap;        // partial rows per (t, s, chunk): max_rank (2 * max_rank in mixed mode)
  int64_t partial_floats;  // T * S * chunks * rows_cap
  int64_t counter_ints;    // T * S (zeroed once by the caller, zero again after every launch)
  bool ok;                 // false: shapes outside the kernel's limits (S, max_rank, T, chunks)
};

// Grid / block / workspace for T tokens, S slices, `in` features, ranks <= max_rank; mixed = merged adapter given.
inline SgmvDecodeLaunch sgmv_decode_launch(int64_t T, int64_t S, int64_t in, int64_t max_rank, bool mixed) {
  SgmvDecodeLaunch l{};
  l.chunks = in > 0 ? (in + kSgmvChunk - 1) / kSgmvChunk : 0;
  l.rows_cap = (mixed ? 2 : 1) * (max_rank > 0 ? max_rank : 0);
  l.partial_floats = T * S * l.chunks * l.rows_cap;
  l.counter_ints = T * S;
  l.ok = T >= 0 && T <= 65535 && S >= 1 && S <= kSgmvMaxSlices && max_rank >= 0 && max_rank <= kSgmvMaxRank &&
         l.chunks <= 0x7fffffff;
  l.grid = dim3(static_cast<unsigned>(l.chunks), static_cast<unsigned>(S), static_cast<unsigned>(T));
  l.block = dim3(kSgmvThreads, 1, 1);
  return l;
}

// True when the VEC = true variant may run: every base pointer 16-byte aligned and every element offset it forms
// (row strides, slice columns, slice widths, `in`) a multiple of 16 bytes for each dtype involved.
inline bool sgmv_decode_can_vectorize(const SgmvDecodeParams& p, int64_t sx, int64_t sw, int64_t sy) {
  auto a16 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  auto m16 = [](int64_t n, int64_t size) { return (n * size) % 16 == 0; };
  bool ok = a16(p.x) && a16(p.y) && a16(p.a) && a16(p.b) && m16(p.in, sx) && m16(p.in, sw) &&
            m16(p.x_stride, sx) && m16(p.y_stride, sy) && m16(p.a_slice_stride, sw) && m16(p.a_row_stride, sw) &&
            m16(p.b_stride, sw);
  for (int64_t s = 0; s < p.S; ++s) {
    ok = ok && m16(p.col[s], sy) && m16(p.col[s], sw) && m16(p.out[s], sy) && m16(p.out[s], sw);
  }
  return ok;
}

}  // namespace lora_kernels
