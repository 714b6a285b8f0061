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

#include <cuda_runtime.h>

#include <cstdint>

#include "lora_common.cuh"

namespace lora_kernels {

constexpr int kSgmvThreads = 128;                // threads per block (4 warps)
constexpr int kSgmvWarps = kSgmvThreads / 32;
constexpr int kSgmvChunk = 256;                  // elements of `in` per shrink block
constexpr int kSgmvPerLane = kSgmvChunk / 32;    // x values a lane keeps in registers
constexpr int kSgmvMaxRank = 256;                // shared h holds 2 * kSgmvMaxRank fp32 (mixed mode)
constexpr int kSgmvMaxSlices = 8;

// Global accesses go through LORA_CHECK_ACCESS (lora_common.cuh; tests/sgmv_decode_emu.cpp checks each against its
// buffer): kBufX, kBufY, kBufA, kBufB, kBufMeta, kBufPartial, kBufCounter.
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

// Shrink of one chunk: partial[k] = sum over the chunk of x[t, e] * A_row_k[e], k < r_i + r_m.
template <typename TX, typename TW, bool VEC>
__device__ __forceinline__ void sgmv_shrink_chunk(const SgmvDecodeParams& p, int64_t t, int64_t s, int64_t c,
                                                  const LoraRows& q, float* part) {
  constexpr int V = kVecElems<TX, VEC>;
  constexpr int G = kSgmvPerLane / V;  // loads per lane per row
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t c0 = c * kSgmvChunk;
  float xv[G][V];
  lora_shrink_load_x<TX, V, G>(static_cast<const TX*>(p.x) + t * p.x_stride, c0, p.in, lane, xv);
  const TW* as = static_cast<const TW*>(p.a) + s * p.a_slice_stride;
  const int rows = q.r_i + q.r_m;
  for (int k = warp; k < rows; k += kSgmvWarps) {
    const float acc = lora_shrink_dot<TW, V, G>(as + lora_row(q, k) * p.a_row_stride, c0, p.in, lane, xv);
    if (lane == 0) lora_ws_store(kBufPartial, part + k, acc);
  }
}

// Expand of the last block: y[t, col_s + j] = rnd(y + sum_k c[k] * B_row_k[j]) over the r_i + r_m rows, with
// c[k] = sc_i * h_i[k] (own rows) / -sc_m * h_m[k] (merged rows) from shared memory: one accumulator and one loop
// over both adapters' rows (fewer live registers than two accumulators: no spills on sm_90a).
template <typename TW, typename TY, bool VEC>
__device__ __forceinline__ void sgmv_expand(const SgmvDecodeParams& p, int64_t t, int64_t s, const LoraRows& q,
                                            const float* c) {
  constexpr int V = kVecElems<TY, VEC>;
  const int64_t col = p.col[s], out = p.out[s];
  const int rows = q.r_i + q.r_m;
  TY* yr = static_cast<TY*>(p.y) + t * p.y_stride + col;
  const TW* bc = static_cast<const TW*>(p.b) + col;
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * V; j < out; j += static_cast<int64_t>(kSgmvThreads) * V) {
    float acc[V], bv[V], yv[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = 0.f;
    for (int k = 0; k < rows; ++k) {
      lora_load_ro<TW, V>(kBufB, bc + lora_row(q, k) * p.b_stride + j, bv);
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] += c[k] * bv[v];
    }
    lora_load<TY, V>(kBufY, yr + j, yv);  // y is read and written by the last blocks only (plain loads)
#pragma unroll
    for (int v = 0; v < V; ++v) yv[v] += acc[v];
    lora_store<TY, V>(kBufY, yr + j, yv);
  }
}

// One launch: grid sgmv_decode_launch(...).grid, kSgmvThreads threads. See the header comment.
template <typename TX, typename TW, typename TY, bool VEC>
__global__ void __launch_bounds__(kSgmvThreads) sgmv_decode_kernel(const SgmvDecodeParams p) {
  const int64_t c = blockIdx.x, s = blockIdx.y, t = blockIdx.z;
  const LoraRows q = lora_rows<kSgmvMaxRank>(p, t, s);
  const int rows = q.r_i + q.r_m;
  if (rows == 0) return;  // the same in every chunk of (t, s): nobody counts, the counter stays 0
  float* part = p.partial + ((t * p.S + s) * p.chunks) * p.rows_cap;
  sgmv_shrink_chunk<TX, TW, VEC>(p, t, s, c, q, part + c * p.rows_cap);

  __shared__ int s_last;
  __shared__ float s_h[2 * kSgmvMaxRank];
  __threadfence();  // release, by each writer of a partial: visible device-wide before the count below
  __syncthreads();  // every partial of this block stored and fenced
  int32_t* cnt = p.counter + t * p.S + s;
  if (threadIdx.x == 0) s_last = lora_count(cnt, 1) == static_cast<int>(p.chunks) - 1;
  __syncthreads();
  if (!s_last) return;  // block-uniform
  __threadfence();      // acquire: the other blocks' partials

  // h in fixed chunk order (deterministic), rounded to y's dtype, then scaled
  for (int k = threadIdx.x; k < rows; k += kSgmvThreads) {
    float acc = 0.f;
    for (int64_t cc = 0; cc < p.chunks; ++cc) acc += lora_ws_load(kBufPartial, part + cc * p.rows_cap + k);
    s_h[k] = lora_scaled_h<TY>(acc, q, k);
  }
  if (threadIdx.x == 0) lora_reset(cnt);  // zero for the next call (no block of this launch touches it again)
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
  const auto a16 = lora_aligned16;
  const auto m16 = lora_bytes16;
  bool ok = a16(p.x) && a16(p.y) && a16(p.a) && a16(p.b) && m16(p.in, sx) && m16(p.in, sw) &&
            m16(p.x_stride, sx) && m16(p.y_stride, sy) && m16(p.a_slice_stride, sw) && m16(p.a_row_stride, sw) &&
            m16(p.b_stride, sw);
  for (int64_t s = 0; s < p.S; ++s) {
    ok = ok && m16(p.col[s], sy) && m16(p.col[s], sw) && m16(p.out[s], sy) && m16(p.out[s], sw);
  }
  return ok;
}

}  // namespace lora_kernels
