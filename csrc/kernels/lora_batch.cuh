// LoRABatch builder: per-token adapter ids -> the int32 `meta` buffer read by the segmented kernels.
//
// Torch-free (raw pointers, int64 sizes); include it from exactly one .cu file. The layout of `meta` and the
// semantics are those of `lora_kernels.batch.MetaLayout` / `build_batch_torch_` (the executable spec):
//
//   meta = [ token_adapter[Tc] | sorted_token_ids[Tc] | active_adapters[A] | seg_start[A] | seg_len[A] |
//            num_active, max_rank, num_valid, num_invalid ]
//
//   key(i) = id_i if 0 <= id_i < N else N              (N = max_adapters; key N = "no adapter", sorts last)
//   token_adapter[i]    = key(i) < N ? id_i : -1       for i < T (entries >= T are left untouched)
//   sorted_token_ids    = stable sort of 0..T-1 by key (ties in token order)
//   active_adapters[k]  = k-th smallest adapter with tokens, -1 for k >= num_active
//   seg_start/seg_len   = its run in sorted_token_ids, 0 for k >= num_active
//   max_rank            = max over s, n of (n active ? ranks[s, n] : 0), n < N; 0 without ranks
//   num_valid / num_invalid = #tokens with key < N / #tokens with id < -1 or id >= N
//
// Algorithm (one CTA of 1024 threads, one launch, no allocation, no host sync, so it is graph-capturable):
//   1. token_adapter and the valid/invalid counts (all threads).
//   2. For each chunk of keys [c0, c0 + C) that fits in shared memory (one chunk unless N + 1 > C):
//      a. histogram into P rows of counters, row w counting only the tokens of walker w (a contiguous range of
//         L tokens, L a multiple of 32);
//      b. block-wide exclusive scan over (key, walker) -> each counter becomes the first output slot of that
//         walker's tokens of that key; active adapters compacted, segments and ranks written on the way;
//      c. stable scatter: warp w walks its token range 32 at a time; __match_any_sync groups equal keys, a
//         lane's slot is cursor[key] + (#equal keys in lower lanes), the group leader advances the cursor.
//         Walkers own disjoint ranges and their cursors were offset by the earlier walkers' counts, so the
//         result is the stable order, deterministically.
//   3. Padding of the active/segment arrays and the four scalars.
// Shared memory is P * C int32 counters (dynamic, up to the device's opt-in limit): C = min(N + 1, cap) and P
// (1..32 parallel walkers) balances the scatter (T / (32 P) steps) against zeroing/scanning P * C counters.
// No global workspace is needed: with N + 1 > cap, step 2 loops over chunks of keys (each re-reading the ids).
//
// tests/test_extension.py also runs this kernel on a CPU emulator (g++, 1024 threads): it rewrites the line
// `extern __shared__ int s_cursor[];` and drops the host launcher from the line starting with the comment
// "Launches the builder" on; keep both.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "layouts.h"

namespace lora_kernels {

constexpr int kBuildBatchThreads = 1024;
// Static shared memory of the kernel plus a margin, subtracted from the opt-in limit.
constexpr int64_t kBuildBatchSmemReserve = 2048;

struct BuildBatchParams {
  int32_t* meta;               // [layouts::MetaLayout{max_tokens, max_active}.size()], contiguous
  const int32_t* adapter_ids;  // [num_tokens], element stride ids_stride
  int64_t ids_stride;
  const int32_t* ranks;        // [rank_slices, >= max_adapters] with strides (rank_stride0, rank_stride1), or null
  int64_t rank_slices;
  int64_t rank_stride0;
  int64_t rank_stride1;
  int64_t num_tokens;    // T <= max_tokens, < 2^31
  int64_t max_tokens;    // Tc
  int64_t max_active;    // A (>= min(T, N) for a well-formed batch; writes beyond A are dropped)
  int64_t max_adapters;  // N, < 2^31 - 1
  int64_t chunk;         // C: keys per shared-memory chunk (set by plan_build_batch)
  int64_t walkers;       // P: parallel scatter warps, 1..32 (set by plan_build_batch)
};

struct BuildBatchPlan {
  int64_t chunk;
  int64_t walkers;
  int64_t smem_bytes;
};

// Chooses C and P for T tokens, N adapters and `smem_optin_bytes` of shared memory per block.
inline BuildBatchPlan plan_build_batch(int64_t num_tokens, int64_t max_adapters, int64_t smem_optin_bytes) {
  int64_t cap = (smem_optin_bytes - kBuildBatchSmemReserve) / 4;
  if (cap < 1024) cap = 1024;  // every CUDA GPU we build for has >= 48 KiB
  const int64_t keys = max_adapters + 1;
  const int64_t chunk = keys < cap ? keys : cap;
  if (num_tokens <= 0) return {chunk, 1, 0};
  int64_t pmax = cap / chunk;
  if (pmax > 32) pmax = 32;
  // Scatter ~ T / (32 P) steps of ~100 cycles; zero + scan ~ P * C / 8 cycles: optimum P = 5 sqrt(T / C).
  int64_t walkers = std::llround(5.0 * std::sqrt(static_cast<double>(num_tokens) / static_cast<double>(chunk)));
  if (walkers > pmax) walkers = pmax;
  if (walkers < 1) walkers = 1;
  return {chunk, walkers, walkers * chunk * static_cast<int64_t>(sizeof(int32_t))};
}

namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;

template <bool kMax>
__device__ __forceinline__ int warp_reduce(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const int u = __shfl_xor_sync(kFullMask, v, o);
    v = kMax ? (u > v ? u : v) : v + u;
  }
  return v;
}

// Sum (or max) over the block; every thread gets the result. Requires blockDim.x == 1024.
template <bool kMax>
__device__ __forceinline__ int block_reduce(int v, int* s_warp) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_reduce<kMax>(v);
  __syncthreads();  // s_warp may still be read by a previous call
  if (lane == 0) s_warp[warp] = v;
  __syncthreads();
  return warp_reduce<kMax>(s_warp[lane]);
}

// Exclusive prefix sum over the block in thread order; `total` gets the sum. Requires blockDim.x == 1024.
__device__ __forceinline__ unsigned long long block_exclusive_scan(unsigned long long v, unsigned long long* s_warp,
                                                                   unsigned long long* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned long long x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long y = __shfl_up_sync(kFullMask, x, o);
    if (lane >= o) x += y;
  }
  __syncthreads();
  if (lane == 31) s_warp[warp] = x;
  __syncthreads();
  const unsigned long long w = s_warp[lane];
  unsigned long long wi = w;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long y = __shfl_up_sync(kFullMask, wi, o);
    if (lane >= o) wi += y;
  }
  const unsigned long long before = __shfl_sync(kFullMask, wi - w, warp);
  *total = __shfl_sync(kFullMask, wi, 31);
  return before + x - v;
}

}  // namespace detail

__global__ void __launch_bounds__(kBuildBatchThreads, 1) lora_build_batch_kernel(const BuildBatchParams p) {
  extern __shared__ int s_cursor[];  // [P][C]
  __shared__ int s_red[32];
  __shared__ unsigned long long s_scan[32];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int T = static_cast<int>(p.num_tokens);
  const int N = static_cast<int>(p.max_adapters);
  const int64_t A = p.max_active;
  const layouts::MetaLayout lay{p.max_tokens, A};  // generated from lora_kernels/layouts.py (META)
  int32_t* const tok = p.meta + lay.token_adapter();
  int32_t* const sorted = p.meta + lay.sorted_token_ids();
  int32_t* const active = p.meta + lay.active_adapters();
  int32_t* const seg_start = p.meta + lay.seg_start();
  int32_t* const seg_len = p.meta + lay.seg_len();

  // 1. token_adapter, counts. Later phases read token_adapter (contiguous) instead of the strided ids.
  // Token loops count in int64: i + kBuildBatchThreads would overflow int32 for T close to 2^31.
  int n_valid = 0, n_invalid = 0;
  for (int64_t i = tid; i < T; i += kBuildBatchThreads) {
    const int32_t id = p.adapter_ids[i * p.ids_stride];
    const bool valid = id >= 0 && id < N;
    n_valid += valid;
    n_invalid += (id < -1 || id >= N);
    tok[i] = valid ? id : -1;
  }
  // The barriers inside block_reduce also publish token_adapter to the whole block.
  n_valid = detail::block_reduce<false>(n_valid, s_red);
  n_invalid = detail::block_reduce<false>(n_invalid, s_red);

  // 2. counting sort, one chunk of keys at a time.
  int rank_max = INT_MIN;
  int tok_base = 0, act_base = 0;  // block-uniform
  const int P = static_cast<int>(p.walkers);
  const int keys = N + 1;
  const int chunk = static_cast<int>(p.chunk);
  const int64_t L = ((static_cast<int64_t>(T) + P - 1) / P + 31) / 32 * 32;  // tokens per walker (int64: T + 31)
  // c0 is int64: c0 + chunk passes 2^31 - 1 on the last chunk when N is close to 2^31.
  for (int64_t c0 = 0; T > 0 && c0 < keys; c0 += chunk) {
    const int C = static_cast<int>(keys - c0 < chunk ? keys - c0 : chunk);
    for (int j = tid; j < P * C; j += kBuildBatchThreads) s_cursor[j] = 0;
    __syncthreads();

    // 2a. histogram per walker.
    for (int64_t i = tid; i < T; i += kBuildBatchThreads) {
      const int t = tok[i];
      const int64_t k = (t < 0 ? N : t) - c0;
      if (k >= 0 && k < C) atomicAdd(&s_cursor[static_cast<int>(i / L) * C + static_cast<int>(k)], 1);
    }
    __syncthreads();

    // 2b. scan. Thread `tid` owns keys [j0, j1); (tokens << 32 | active adapters) are scanned together
    // (tokens < 2^31 and adapters < 2^32, so neither half carries into the other).
    const int per = (C + kBuildBatchThreads - 1) / kBuildBatchThreads;
    const int j0 = min(tid * per, C), j1 = min(j0 + per, C);
    unsigned long long local = 0;
    for (int j = j0; j < j1; ++j) {
      int n = 0;
      for (int w = 0; w < P; ++w) n += s_cursor[w * C + j];
      local += (static_cast<unsigned long long>(n) << 32) | static_cast<unsigned long long>(n > 0 && c0 + j < N);
    }
    unsigned long long chunk_total;
    const unsigned long long excl = detail::block_exclusive_scan(local, s_scan, &chunk_total);
    int pos = tok_base + static_cast<int>(excl >> 32);
    int64_t k = act_base + static_cast<int64_t>(excl & 0xffffffffull);
    for (int j = j0; j < j1; ++j) {
      const int start = pos;
      for (int w = 0; w < P; ++w) {
        const int n = s_cursor[w * C + j];
        s_cursor[w * C + j] = pos;
        pos += n;
      }
      const int a = static_cast<int>(c0 + j);
      if (pos > start && a < N) {
        if (k < A) {
          active[k] = a;
          seg_start[k] = start;
          seg_len[k] = pos - start;
        }
        if (p.ranks != nullptr) {
          for (int64_t s = 0; s < p.rank_slices; ++s) {
            const int r = p.ranks[s * p.rank_stride0 + static_cast<int64_t>(a) * p.rank_stride1];
            rank_max = r > rank_max ? r : rank_max;
          }
        }
        ++k;
      }
    }
    __syncthreads();

    // 2c. stable scatter, one warp per walker.
    const int chunk_tokens = static_cast<int>(chunk_total >> 32);
    if (chunk_tokens > 0 && warp < P) {
      int* const cursor = s_cursor + warp * C;
      const int64_t lo = warp * L;
      const int64_t hi = min(lo + L, static_cast<int64_t>(T));
      int t_next = lo + lane < hi ? tok[lo + lane] : INT_MIN;  // INT_MIN: past the walker's range
      for (int64_t b = lo; b < hi; b += 32) {
        const int t = t_next;
        t_next = b + 32 + lane < hi ? tok[b + 32 + lane] : INT_MIN;
        int key = -1;  // chunk-local key, -1: not in this chunk
        if (t != INT_MIN) {
          const int64_t kk = (t < 0 ? N : t) - c0;
          if (kk >= 0 && kk < C) key = static_cast<int>(kk);
        }
        if (__ballot_sync(detail::kFullMask, key >= 0) == 0) continue;
        const unsigned peers = __match_any_sync(detail::kFullMask, key);
        const int leader = __ffs(peers) - 1;
        int slot = 0;
        if (key >= 0 && lane == leader) {
          slot = cursor[key];
          cursor[key] = slot + __popc(peers);
        }
        slot = __shfl_sync(detail::kFullMask, slot, leader);
        if (key >= 0) sorted[slot + __popc(peers & ((1u << lane) - 1u))] = static_cast<int32_t>(b + lane);
        __syncwarp();  // orders the leader's cursor update before the next step's reads by other lanes
      }
    }
    __syncthreads();
    tok_base += chunk_tokens;
    act_base += static_cast<int>(chunk_total & 0xffffffffull);
  }

  // 3. padding and scalars.
  for (int64_t j = act_base + tid; j < A; j += kBuildBatchThreads) {
    active[j] = -1;
    seg_start[j] = 0;
    seg_len[j] = 0;
  }
  rank_max = detail::block_reduce<true>(rank_max, s_red);
  if (tid == 0) {
    int mr = 0;
    if (p.ranks != nullptr && N > 0 && p.rank_slices > 0) {
      // Inactive adapters contribute 0 (they are masked to 0 in the spec).
      mr = act_base < N ? (rank_max > 0 ? rank_max : 0) : rank_max;
    }
    p.meta[lay.num_active()] = act_base;
    p.meta[lay.max_rank()] = mr;
    p.meta[lay.num_valid()] = n_valid;
    p.meta[lay.num_invalid()] = n_invalid;
  }
}

// Launches the builder on `stream`. `smem_optin_bytes`: the device's cudaDevAttrMaxSharedMemoryPerBlockOptin.
// Fills p.chunk / p.walkers. Returns the launch error (cudaSuccess when queued).
inline cudaError_t launch_lora_build_batch(BuildBatchParams p, int64_t smem_optin_bytes, cudaStream_t stream) {
  const BuildBatchPlan plan = plan_build_batch(p.num_tokens, p.max_adapters, smem_optin_bytes);
  p.chunk = plan.chunk;
  p.walkers = plan.walkers;
  if (plan.smem_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(lora_build_batch_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(plan.smem_bytes));
    if (err != cudaSuccess) return err;
  }
  lora_build_batch_kernel<<<1, kBuildBatchThreads, static_cast<size_t>(plan.smem_bytes), stream>>>(p);
  return cudaGetLastError();
}

}  // namespace lora_kernels
