// Grouped merge / unmerge of LoRA deltas into base weights (torch-free; launched by csrc/merge.cu).
//
// One launch covers every job of a job table built by lora_kernels.ops.merge.build_tables (a job is one slice of
// one layer: rows [row0, row0 + rows) of a row-major W [out, in]); the int64 table columns are layouts::MergeJob's
// (csrc/kernels/layouts.h, generated from lora_kernels/layouts.py, as the Python and Triton J_* columns are). A block is one tile: one row of one job, kMergeCols columns,
// 4 consecutive columns per thread (one code byte when in % 4 == 0). Blocks find their job by a binary search of
// tile_start (first tile of each job, ascending, tile_start[0] == 0).
//
// Per weight, the fp32 delta is a fixed sequence of correctly rounded operations (terms in order, ranks in
// order: d = fl(d + fl(fl(coef * B[k, row]) * A[k, col])) from d = +0), written with __fmul_rn / __fadd_rn so
// the compiler cannot contract (no FMA) or reorder it: merge and unmerge compute the same bits, and they are
// the bits of lora_kernels.reference.merge_delta (the same sequence), so this backend's merged weights and
// codes equal the reference's bit for bit (tests/test_merge_emu.py checks that on a CPU emulation).
//   merge:   W' = rnd(W + d); exact: R = rnd(W' - d), code = 0 (W is R) / 1 (one step above R) / 2 (one step
//            below) / 3 (escape: W is left unwritten and counter[layer] is incremented; the caller collects it).
//   unmerge: R = rnd(W' - d), moved by the code (exact); escapes are left for the caller.
// "Step" = neighbour in the total order of bit patterns (key(): -0 -> -1, +0 -> 0).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "layouts.h"
#include "lora_common.cuh"

namespace lora_kernels {

// Columns of the job table: generated from lora_kernels/layouts.py (MERGE_JOB), as the Python builders' J_* are.
using Job = layouts::MergeJob;

constexpr int kMergeThreads = 256;
constexpr int kMergeCols = 4 * kMergeThreads;  // columns per tile (must match _CUDA_TILE_N in ops/merge/dispatch.py)

// Bit patterns of the weight types (sign and magnitude): Bits, the integer of the same width, and its sign bit.
template <typename T>
struct MergeBits;
template <>
struct MergeBits<float> {
  using Bits = int32_t;
  static constexpr int64_t kSign = 2147483648LL;
  static __device__ __forceinline__ Bits to_bits(float x) { return __float_as_int(x); }
  static __device__ __forceinline__ float from_bits(Bits b) { return __int_as_float(b); }
};
struct MergeBits16 {
  using Bits = short;
  static constexpr int64_t kSign = 32768;
};
template <>
struct MergeBits<__half> : MergeBits16 {
  static __device__ __forceinline__ Bits to_bits(__half x) { return __half_as_short(x); }
  static __device__ __forceinline__ __half from_bits(Bits b) { return __short_as_half(b); }
};
template <>
struct MergeBits<__nv_bfloat16> : MergeBits16 {
  static __device__ __forceinline__ Bits to_bits(__nv_bfloat16 x) { return __bfloat16_as_short(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_bits(Bits b) { return __short_as_bfloat16(b); }
};

// LoraFmt's conversions plus key(): the position of x in the total order of bit patterns (-0 -> -1, +0 -> 0;
// one step = the neighbouring pattern) and from_key(), its inverse.
template <typename T>
struct MergeFmt : LoraFmt<T> {
  static __device__ __forceinline__ int64_t key(T x) {
    const int64_t b = static_cast<int64_t>(MergeBits<T>::to_bits(x));
    const int64_t mag = b & (MergeBits<T>::kSign - 1);
    return b < 0 ? -mag - 1 : mag;
  }
  static __device__ __forceinline__ T from_key(int64_t k) {
    const int64_t mag = k < 0 ? -k - 1 : k;
    using Bits = typename MergeBits<T>::Bits;
    return MergeBits<T>::from_bits(static_cast<Bits>(k < 0 ? mag - MergeBits<T>::kSign : mag));
  }
};

struct MergeGroupedParams {
  const int64_t* jobs;        // [n_jobs, Job::size]
  const int64_t* tile_start;  // [n_jobs]
  int64_t n_jobs;
  const int64_t* terms;  // [n_terms, 2]: storage row offset, rank
  const float* coefs;    // [n_terms]
  int32_t* counter;      // [n_layers] escapes per layer (merge, exact)
  bool exact;
};

template <typename TW, typename TAB, bool kUnmerge>
__global__ void __launch_bounds__(kMergeThreads) merge_grouped_kernel(MergeGroupedParams p) {
  using FW = MergeFmt<TW>;
  using FA = MergeFmt<TAB>;
  const int64_t pid = blockIdx.x;
  int64_t lo = 0, hi = p.n_jobs;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (p.tile_start[mid] <= pid) lo = mid; else hi = mid;
  }
  const int64_t* job = p.jobs + lo * Job::size;
  TW* W = reinterpret_cast<TW*>(static_cast<uintptr_t>(job[Job::W]));
  uint8_t* code = reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(job[Job::code]));
  const TAB* A = reinterpret_cast<const TAB*>(static_cast<uintptr_t>(job[Job::A]));
  const TAB* B = reinterpret_cast<const TAB*>(static_cast<uintptr_t>(job[Job::B]));
  const int64_t row0 = job[Job::row0], in = job[Job::in_features], sa = job[Job::stride_A], sb = job[Job::stride_B];
  const int64_t t0 = job[Job::term0], nt = job[Job::n_terms], ntn = job[Job::col_tiles];
  const bool packed = job[Job::packed] != 0;
  const int64_t t = pid - job[Job::tile0];
  const int64_t row = t / ntn;
  const int64_t col0 = (t - row * ntn) * kMergeCols + 4 * static_cast<int64_t>(threadIdx.x);
  // row < rows holds when total_tiles is the tables' sum; checked anyway: a larger grid must not write past W.
  if (col0 >= in || row >= job[Job::rows]) return;
  const int64_t base = (row0 + row) * in;
  int byte = 0;
  int n_esc = 0;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t c = col0 + e;
    if (c >= in) break;
    float d = 0.0f;
    for (int64_t i = 0; i < nt; ++i) {
      const int64_t off = p.terms[2 * (t0 + i)], r = p.terms[2 * (t0 + i) + 1];
      const float coef = p.coefs[t0 + i];
      for (int64_t k = 0; k < r; ++k) {
        const float bk = __fmul_rn(coef, FA::to_f(B[(off + k) * sb + row]));
        d = __fadd_rn(d, __fmul_rn(bk, FA::to_f(A[(off + k) * sa + c])));
      }
    }
    const int64_t flat = base + c;
    const TW w = W[flat];
    if (kUnmerge) {
      TW back = FW::from_f(__fsub_rn(FW::to_f(w), d));
      if (p.exact) {
        const int cd = (code[flat >> 2] >> (2 * (flat & 3))) & 3;
        if (cd == 3) continue;  // escape: the caller restores it from the escape list
        back = FW::from_key(FW::key(back) + (cd == 1 ? 1 : cd == 2 ? -1 : 0));
      }
      W[flat] = back;
    } else {
      const TW nw = FW::from_f(__fadd_rn(FW::to_f(w), d));
      if (!p.exact) {
        W[flat] = nw;
        continue;
      }
      const TW back = FW::from_f(__fsub_rn(FW::to_f(nw), d));
      const int64_t diff = FW::key(w) - FW::key(back);
      const int cd = diff == 0 ? 0 : diff == 1 ? 1 : diff == -1 ? 2 : 3;
      if (cd != 3) W[flat] = nw; else ++n_esc;  // an escape keeps its original value until the caller saves it
      if (packed) byte |= cd << (2 * e); else code[flat] = static_cast<uint8_t>(cd);
    }
  }
  if (!kUnmerge && p.exact) {
    if (packed) code[(base + col0) >> 2] = static_cast<uint8_t>(byte);
    if (n_esc) atomicAdd(p.counter + job[Job::layer], n_esc);
  }
}

}  // namespace lora_kernels
