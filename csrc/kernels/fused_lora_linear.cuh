// Decode-time fused LoRA linear (T <= 64 tokens, tuned for T <= 16) in ONE launch: y = x @ W0^T (+ bias) + delta,
// with delta the batched multi-LoRA delta of csrc/kernels/sgmv_decode.cuh (torch-free; a future csrc/*.cu launcher
// includes it; tests/fused_lora_linear_emu.cpp runs it on a CPU emulation).
//
// Semantics. base[t, o] = sum_e x[t, e] * W0[o, e] (+ bias[o]), fp32, W0: [out, in] row-major (w0_stride apart).
// delta exactly as sgmv_decode.cuh: for every slice s (columns [col_s, col_s + out_s) of out), i = token_adapter[t]
// (-1 or any id outside [0, N): no delta), r = ranks[s, i] (0: no delta), A_{s,i} = a[s, off_i : off_i + r, :]
// (rank-paged), B_{s,i} = b[off_i : off_i + r, col_s : col_s + out_s]^T; mixed mode (merged = m >= 0): tokens of m
// get no delta, tokens of j != m get delta_j - delta_m, -1 tokens get -delta_m. h = x @ A^T accumulates in fp32 and
// is rounded to y's dtype (as the Triton / sgmv kernels do), scaled (negated for m's rows): c[k];
// d = sum_k c[k] * B_row_k[o] in fp32; y[t, o] = rnd(base + d): ONE rounding into y, y written exactly once per
// element, no atomics on y. Columns in no slice and tokens without a delta get y = rnd(base).
// Types: TA (x, y), TW (W0, bias, a, b), each fp16 / bf16 / fp32.
//
// Work split. Grid (tiles) with tiles = ceil(out / kFllTile), kFllThreads = 128 threads (4 warps). Block b owns the
// kFllTile = 8 output features [8b, 8b + 8) for all T tokens: warp w streams W0 rows 8b + 2w, 8b + 2w + 1 (two rows
// at once, so each x load feeds two rows) over all of `in`, for up to kFllTokGroup = 16 tokens at once (T > 16:
// further passes over the same rows, from L1 / L2). Lanes read 16-byte segments of W0 (coalesced 512 bytes per warp
// per row and step) and the matching x segments (L1 hits: x is T * in elements, read by every block).
// The shrink is split over the same blocks: `in` is cut into chunks of kFllChunk = 256; a shrink unit is (chunk c,
// token t) (units = chunks * T, u = c * T + t); block b < shrink_blocks (= min(units, tiles)) computes, BEFORE its
// GEMV, units b, b + tiles, ...: the fp32 partial sums over chunk c for every (slice, adapter row) of token t
// (sgmv_decode's scheme: 8 x values per lane in registers, a warp per A row, butterfly reduction), into
// partial[c, t, s, k]. Units this small (<= S * 2 * r rows of 256 elements) keep a shrink block's extra work well
// below its GEMV tile (8 rows of `in`), so h is ready early even when the whole grid runs in one wave.
//
// Protocol (last-arriver only: no block ever waits on another, so the grid needs no co-residency and cannot
// deadlock; counters are int32 in the workspace, zero between calls: the caller zeroes them once at allocation).
//   1. Shrink: each shrink block, after its partials (__threadfence + __syncthreads), does atomicAdd(counter[0], 1);
//      the one that sees shrink_blocks - 1 is the h-finisher: it sums the partials of every chunk in FIXED chunk
//      order into hfin[t, s, k] = c[k] (rounded, scaled), resets counter[0] to 0, fences, and then takes part in
//      every tile's handshake (step 3) as the "h party".
//   2. GEMV: every block computes its tile's base in fp32 (shared memory), writes it to the workspace base[t, o]
//      (fp32, T * out floats), fences, and takes part in its tile's handshake as the "base party".
//   3. Handshake per tile: both parties atomicAdd(counter[1 + b], 1); the one that sees 1 (the second) finishes the
//      tile: y = rnd(base + d) for its 8 columns and T tokens, and resets counter[1 + b] to 0. The tile block
//      finishes from its shared base, the h-finisher from the workspace copy: the same fp32 values, the same d in
//      the same k order, so the bits do not depend on who finishes or on block order (deterministic).
//   Shrink blocks are the lowest block indices (in practice in the first wave) and do their small shrink share
//   first: the h-finisher is usually done before most tiles finish their GEMV, so the tiles finish themselves and
//   the h-finisher's serial share is the few tiles that were faster (worst case all: correct, slower).
//   No delta anywhere (every (t, s) has 0 rows, e.g. all tokens -1): a uniform decision every block makes from the
//   metadata; then the kernel is a plain GEMV (no workspace, no counters).
//
// Bytes model (DRAM, per launch; L2 catches re-reads within the launch): W0 out * in * sw (once: each row is read
// by one warp, T > 16 re-reads it from L1 / L2) + x T * in * sa (re-read per block from L1 / L2) + bias out * sw +
// the active adapters' A rows once (r * in * sw per slice: chunk c of a row is read by one block, once per token
// whose adapter it is; tokens sharing an adapter hit L2) + their B rows once (r * out_s * sw; per token from L2) +
// y T * out * sa (written once) + workspace: base T * out * 4 written (read back only for tiles the h-finisher
// finishes), partials chunks * T * S * rows * 4 written and read once, hfin T * S * rows * 4.
// Overhead vs the base GEMV at in = out = 4096, T = 16, fp16, rank 16: base copy 256 KiB (0.8 % of W0's 32 MiB),
// partials 16 KiB, A + B of 16 distinct adapters 4 MiB (12.5 %; shared adapters: less). L2 (not DRAM) re-reads:
// x by every block, B rows once per token per tile (16-byte segments), hfin by the 8 threads of a token's columns.
// Vector variant (VEC = true, fll_can_vectorize): x, W0 and a 16-byte aligned, `in` and their row strides multiples
// of 16 bytes: W0 / A use V = 16 / sizeof(TW) elements per load and x the same V elements. Otherwise scalar loads
// (odd in, unaligned views). B, bias and y are accessed per element (8 consecutive columns per token per tile).
// Resources (nvcc -Xptxas -v, CUDA 13, tests/test_fused_lora_linear_emu.py): __launch_bounds__(128, 4) caps
// registers at 128; 82..128 used, no spills, 2568 bytes static shared memory, on sm_80 and sm_90a.
// Not measured on a GPU yet: the ~15 % target over the base GEMV is a design goal backed by the bytes model only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "lora_common.cuh"

namespace lora_kernels {

constexpr int kFllThreads = 128;                  // threads per block (4 warps)
constexpr int kFllWarps = kFllThreads / 32;
constexpr int kFllRowsPerWarp = 2;                // W0 rows a warp streams at once (x loads shared by both)
constexpr int kFllTile = kFllWarps * kFllRowsPerWarp;  // output features per block
constexpr int kFllTokGroup = 16;                  // tokens accumulated at once (registers: 2 * 16 accumulators)
constexpr int kFllMaxTokens = 64;                 // shared base holds kFllMaxTokens * kFllTile fp32
constexpr int kFllChunk = 256;                    // elements of `in` per shrink chunk
constexpr int kFllPerLane = kFllChunk / 32;       // x values a lane keeps in registers in the shrink
constexpr int kFllMaxRank = 256;
constexpr int kFllMaxSlices = 8;
// Resident blocks per SM the register allocation must allow (<= 128 registers per thread): 16 warps per SM keep
// enough 16-byte W0 loads in flight; without it ptxas (CUDA 13) picked ~72 registers and spilled in the GEMV.
constexpr int kFllMinBlocks = 4;

// Global accesses go through LORA_CHECK_ACCESS (lora_common.cuh; tests/fused_lora_linear_emu.cpp checks each against
// its buffer): kBufX, kBufY, kBufW0, kBufBias, kBufA, kBufB, kBufMeta, kBufPartial, kBufHfin, kBufBase, kBufCounter.
struct FusedLoraLinearParams {
  const void* x;                 // [T, in] rows x_stride apart (TA)
  void* y;                       // [T, out] rows y_stride apart (TA), fully overwritten
  const void* w0;                // [out, in] rows w0_stride apart (TW)
  const void* bias;              // [out] (TW) or nullptr
  const void* a;                 // [S, R, in] (TW)
  const void* b;                 // [R, out] rows b_stride apart (TW)
  const int64_t* offsets;        // [N] first row of each adapter
  const int32_t* ranks;          // [S, N]
  const float* scales;           // [S, N]
  const int32_t* token_adapter;  // [T]
  float* partial;                // [chunks, T, S, rows_cap] workspace
  float* hfin;                   // [T, S, rows_cap] workspace: rounded, scaled h
  float* base;                   // [T, out] workspace: fp32 base GEMV
  int32_t* counter;              // [1 + tiles], zero between calls
  int64_t T, S, N, in, out, chunks, rows_cap, tiles, shrink_blocks;
  int64_t x_stride, y_stride, w0_stride, a_slice_stride, a_row_stride, b_stride;  // in elements
  int64_t col[kFllMaxSlices], outs[kFllMaxSlices];
  int64_t merged;                // mixed mode: the merged adapter (-1: off)
};

// True when some (token, slice) has adapter rows: the same answer in every block (metadata only).
__device__ __forceinline__ bool fll_any_delta(const FusedLoraLinearParams& p) {
  __shared__ int s_any;
  if (threadIdx.x == 0) s_any = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < p.T * p.S; i += kFllThreads) {
    const LoraRows q = lora_rows<kFllMaxRank>(p, i / p.S, i % p.S);
    if (q.r_i + q.r_m > 0) s_any = 1;  // benign race: every writer stores 1
  }
  __syncthreads();
  return s_any != 0;
}

// Shrink unit (chunk c, token t): partial[c, t, s, k] = sum over the chunk of x[t, e] * A_row_k[e] for every slice.
// Rows are dealt to the warps round robin across slices (rank-1 adapters still use all warps).
template <typename TA, typename TW, bool VEC>
__device__ __forceinline__ void fll_shrink_unit(const FusedLoraLinearParams& p, int64_t c, int64_t t) {
  constexpr int V = kVecElems<TW, VEC>;
  constexpr int G = kFllPerLane / V;  // loads per lane per row
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t c0 = c * kFllChunk;
  int rot = 0;  // rows dealt so far (mod kFllWarps)
  float xv[G][V];
  bool loaded = false;
  for (int64_t s = 0; s < p.S; ++s) {
    const LoraRows q = lora_rows<kFllMaxRank>(p, t, s);
    const int rows = q.r_i + q.r_m;
    if (rows > 0 && !loaded) {  // uniform: x of token t only when it has rows
      lora_shrink_load_x<TA, V, G>(static_cast<const TA*>(p.x) + t * p.x_stride, c0, p.in, lane, xv);
      loaded = true;
    }
    const TW* as = static_cast<const TW*>(p.a) + s * p.a_slice_stride;
    float* part = p.partial + ((c * p.T + t) * p.S + s) * p.rows_cap;
    for (int k = (warp - rot % kFllWarps + kFllWarps) % kFllWarps; k < rows; k += kFllWarps) {
      const float acc = lora_shrink_dot<TW, V, G>(as + lora_row(q, k) * p.a_row_stride, c0, p.in, lane, xv);
      if (lane == 0) lora_ws_store(kBufPartial, part + k, acc);
    }
    rot += rows;
  }
}

// The h-finisher: hfin[t, s, k] = rnd_TA(sum_c partial[c, t, s, k]) * (sc_i | -sc_m), chunks in fixed order.
template <typename TA>
__device__ __forceinline__ void fll_finish_h(const FusedLoraLinearParams& p) {
  for (int64_t i = 0; i < p.T * p.S; ++i) {
    const int64_t t = i / p.S, s = i % p.S;
    const LoraRows q = lora_rows<kFllMaxRank>(p, t, s);
    const int rows = q.r_i + q.r_m;
    for (int k = threadIdx.x; k < rows; k += kFllThreads) {
      float acc = 0.f;
      for (int64_t c = 0; c < p.chunks; ++c) {
        acc += lora_ws_load(kBufPartial, p.partial + ((c * p.T + t) * p.S + s) * p.rows_cap + k);
      }
      lora_ws_store(kBufHfin, p.hfin + i * p.rows_cap + k, lora_scaled_h<TA>(acc, q, k));
    }
  }
}

// Base GEMV of tile b: s_base[t * kFllTile + j] = sum_e x[t, e] * W0[8b + j, e] (+ bias), fp32, for all T tokens.
template <typename TA, typename TW, bool VEC>
__device__ __forceinline__ void fll_gemv_tile(const FusedLoraLinearParams& p, int64_t tile, float* s_base) {
  constexpr int V = kVecElems<TW, VEC>;
  constexpr int R = kFllRowsPerWarp;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t o0 = tile * kFllTile + warp * R;
  const TW* w0 = static_cast<const TW*>(p.w0);
  const TA* xb = static_cast<const TA*>(p.x);
  for (int64_t t0 = 0; t0 < p.T; t0 += kFllTokGroup) {
    const int nt = p.T - t0 < kFllTokGroup ? static_cast<int>(p.T - t0) : kFllTokGroup;
    float acc[R][kFllTokGroup];
#pragma unroll
    for (int j = 0; j < R; ++j) {
#pragma unroll
      for (int u = 0; u < kFllTokGroup; ++u) acc[j][u] = 0.f;
    }
    for (int64_t e = static_cast<int64_t>(lane) * V; e < p.in; e += 32 * V) {
      float wv[R][V];
#pragma unroll
      for (int j = 0; j < R; ++j) {
        if (o0 + j < p.out) {
          lora_load_ro<TW, V>(kBufW0, w0 + (o0 + j) * p.w0_stride + e, wv[j]);
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) wv[j][v] = 0.f;
        }
      }
#pragma unroll
      for (int u = 0; u < kFllTokGroup; ++u) {
        if (u < nt) {
          float xv[V];
          lora_load_ro<TA, V>(kBufX, xb + (t0 + u) * p.x_stride + e, xv);
#pragma unroll
          for (int j = 0; j < R; ++j) {
#pragma unroll
            for (int v = 0; v < V; ++v) acc[j][u] += wv[j][v] * xv[v];
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < R; ++j) {
      float bj = 0.f;
      if (p.bias != nullptr && o0 + j < p.out) {
        bj = LoraFmt<TW>::to_f(lora_ldg(kBufBias, static_cast<const TW*>(p.bias) + o0 + j));
      }
#pragma unroll
      for (int u = 0; u < kFllTokGroup; ++u) {
        if (u < nt) {  // warp-uniform: every lane shuffles
          const float v = lora_lane_sum(acc[j][u]);
          if (lane == 0) s_base[(t0 + u) * kFllTile + warp * R + j] = v + bj;
        }
      }
    }
  }
}

// y for tile b: y[t, o] = rnd(base[t, o] + d[t, o]) with d = sum_k hfin[t, s, k] * B_row_k[o] (s: o's slice).
// base from shared memory (s_base) or, for the h-finisher, from the workspace (ws = true).
template <typename TA, typename TW>
__device__ __forceinline__ void fll_finish_tile(const FusedLoraLinearParams& p, int64_t tile, const float* s_base,
                                                bool ws, bool delta) {
  const TW* bw = static_cast<const TW*>(p.b);
  for (int64_t i = threadIdx.x; i < p.T * kFllTile; i += kFllThreads) {
    const int64_t t = i / kFllTile, o = tile * kFllTile + i % kFllTile;
    if (o >= p.out) continue;
    const float base = ws ? lora_ws_load(kBufBase, p.base + t * p.out + o) : s_base[i];
    float d = 0.f;
    int64_t s = 0;
    while (s < p.S && !(o >= p.col[s] && o < p.col[s] + p.outs[s])) ++s;
    if (delta && s < p.S) {
      const LoraRows q = lora_rows<kFllMaxRank>(p, t, s);
      const float* c = p.hfin + (t * p.S + s) * p.rows_cap;
      for (int k = 0; k < q.r_i + q.r_m; ++k) {
        const float bk = LoraFmt<TW>::to_f(lora_ldg(kBufB, bw + lora_row(q, k) * p.b_stride + o));
        d += lora_ws_load(kBufHfin, c + k) * bk;
      }
    }
    TA* yp = static_cast<TA*>(p.y) + t * p.y_stride + o;
    LORA_CHECK_ACCESS(kBufY, yp, sizeof(TA));
    *yp = LoraFmt<TA>::from_f(base + d);
  }
}

// The h-finisher's side of every tile's handshake: it finishes the tiles whose base party came first.
template <typename TA, typename TW>
__device__ __forceinline__ void fll_h_party(const FusedLoraLinearParams& p) {
  __shared__ int s_second[kFllThreads];
  for (int64_t t0 = 0; t0 < p.tiles; t0 += kFllThreads) {
    const int64_t b = t0 + threadIdx.x;
    s_second[threadIdx.x] = b < p.tiles && lora_count(p.counter + 1 + b, 1) == 1;
    __syncthreads();
    for (int j = 0; j < kFllThreads && t0 + j < p.tiles; ++j) {
      if (!s_second[j]) continue;  // block-uniform
      __threadfence();             // acquire: that tile's base
      fll_finish_tile<TA, TW>(p, t0 + j, nullptr, true, true);
      if (threadIdx.x == 0) lora_reset(p.counter + 1 + t0 + j);
    }
    __syncthreads();  // s_second is rewritten next round
  }
}

// One launch: grid fused_lora_linear_launch(...).grid, kFllThreads threads. See the header comment.
template <typename TA, typename TW, bool VEC>
__global__ void __launch_bounds__(kFllThreads, kFllMinBlocks) fused_lora_linear_kernel(const FusedLoraLinearParams p) {
  const int64_t tile = blockIdx.x;
  __shared__ float s_base[kFllMaxTokens * kFllTile];
  __shared__ int s_flag;
  const bool delta = fll_any_delta(p);
  if (delta && tile < p.shrink_blocks) {
    for (int64_t u = tile; u < p.chunks * p.T; u += p.tiles) fll_shrink_unit<TA, TW, VEC>(p, u / p.T, u % p.T);
    __threadfence();  // release: this block's partials
    __syncthreads();
    if (threadIdx.x == 0) s_flag = lora_count(p.counter, 1) == static_cast<int>(p.shrink_blocks) - 1;
    __syncthreads();
    if (s_flag) {       // block-uniform: the h-finisher
      __threadfence();  // acquire: every block's partials
      fll_finish_h<TA>(p);
      if (threadIdx.x == 0) lora_reset(p.counter);
      __threadfence();  // release: hfin before the handshakes
      __syncthreads();
      fll_h_party<TA, TW>(p);
    }
  }
  fll_gemv_tile<TA, TW, VEC>(p, tile, s_base);
  __syncthreads();
  if (!delta) {  // plain GEMV: finish at once
    fll_finish_tile<TA, TW>(p, tile, s_base, false, false);
    return;
  }
  for (int64_t i = threadIdx.x; i < p.T * kFllTile; i += kFllThreads) {  // publish the base for the h-finisher
    const int64_t o = tile * kFllTile + i % kFllTile;
    if (o < p.out) lora_ws_store(kBufBase, p.base + (i / kFllTile) * p.out + o, s_base[i]);
  }
  __threadfence();  // release: base
  __syncthreads();
  if (threadIdx.x == 0) s_flag = lora_count(p.counter + 1 + tile, 1) == 1;
  __syncthreads();
  if (!s_flag) return;  // block-uniform: the h-finisher will finish this tile
  __threadfence();      // acquire: hfin
  fll_finish_tile<TA, TW>(p, tile, s_base, false, true);
  if (threadIdx.x == 0) lora_reset(p.counter + 1 + tile);
}

// ---- host side (no torch) -------------------------------------------------------------------------------------
struct FusedLoraLinearLaunch {
  dim3 grid;               // (tiles)
  dim3 block;              // kFllThreads
  int64_t tiles;           // ceil(out / kFllTile)
  int64_t chunks;          // ceil(in / kFllChunk)
  int64_t shrink_blocks;   // min(chunks * T, tiles): blocks with shrink units
  int64_t rows_cap;        // rows per (t, s): max_rank (2 * max_rank in mixed mode)
  int64_t partial_floats;  // chunks * T * S * rows_cap
  int64_t hfin_floats;     // T * S * rows_cap
  int64_t base_floats;     // T * out
  int64_t counter_ints;    // 1 + tiles (zeroed once by the caller, zero again after every launch)
  bool ok;                 // false: shapes outside the kernel's limits
};

// Grid / block / workspace for T tokens, S slices, in -> out features, ranks <= max_rank; mixed = merged adapter.
inline FusedLoraLinearLaunch fused_lora_linear_launch(int64_t T, int64_t S, int64_t in, int64_t out,
                                                      int64_t max_rank, bool mixed) {
  FusedLoraLinearLaunch l{};
  l.tiles = out > 0 ? (out + kFllTile - 1) / kFllTile : 0;
  l.chunks = in > 0 ? (in + kFllChunk - 1) / kFllChunk : 0;
  l.shrink_blocks = l.chunks * T < l.tiles ? l.chunks * T : l.tiles;
  l.rows_cap = (mixed ? 2 : 1) * (max_rank > 0 ? max_rank : 0);
  l.partial_floats = l.chunks * T * S * l.rows_cap;
  l.hfin_floats = T * S * l.rows_cap;
  l.base_floats = T * out;
  l.counter_ints = 1 + l.tiles;
  l.ok = T >= 1 && T <= kFllMaxTokens && S >= 1 && S <= kFllMaxSlices && max_rank >= 0 && max_rank <= kFllMaxRank &&
         in >= 1 && l.tiles >= 1 && l.tiles <= 0x7fffffff;
  l.grid = dim3(static_cast<unsigned>(l.tiles), 1, 1);
  l.block = dim3(kFllThreads, 1, 1);
  return l;
}

// Fills the launch-derived fields of p (chunks, rows_cap, tiles, shrink_blocks).
inline void fused_lora_linear_bind(FusedLoraLinearParams& p, const FusedLoraLinearLaunch& l) {
  p.chunks = l.chunks;
  p.rows_cap = l.rows_cap;
  p.tiles = l.tiles;
  p.shrink_blocks = l.shrink_blocks;
}

// True when the VEC = true variant may run: x, W0, a 16-byte aligned and every element offset the vector loads form
// (`in`, row strides) a multiple of 16 bytes in TW (so V = 16 / sizeof(TW) divides them) and in TA (x's loads).
inline bool fll_can_vectorize(const FusedLoraLinearParams& p, int64_t sa, int64_t sw) {
  const auto a16 = lora_aligned16;
  const auto m16 = lora_bytes16;
  return a16(p.x) && a16(p.w0) && a16(p.a) && m16(p.in, sw) && m16(p.in, sa) && m16(p.x_stride, sa) &&
         m16(p.x_stride, sw) && m16(p.w0_stride, sw) && m16(p.a_slice_stride, sw) && m16(p.a_row_stride, sw);
}

}  // namespace lora_kernels
