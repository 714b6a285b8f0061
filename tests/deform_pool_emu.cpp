// CPU emulation of the CUDA kernels in csrc/kernels/deform_pool.cuh, for tests/test_deform.py on machines
// without a GPU. The kernel source is compiled unchanged by the host compiler; this file supplies what the
// device would: threadIdx / blockIdx / blockDim, __ldg, atomicAdd (float, under a mutex) and __shfl_xor_sync
// (32 std::threads per warp meeting at a std::barrier, so a lane that skipped a shuffle would hang the run,
// which the test's timeout turns into a failure). Launches run block by block, warp by warp. It checks the
// kernels' indexing, vector loads, dtype conversions and group reductions; not GPU-only behaviour (memory
// model, alignment faults, performance). Every value read (DEFORM_CHECK_VALUE_READ) and every atomicAdd is
// checked against its buffer's bounds: an out-of-range access aborts the run (exit status != 0).
//
// Usage: deform_pool_emu <in> <out>. <in>: int64 header [kind (0 fp16, 1 bf16, 2 fp32), loc_f32, B, S, Q, H, D,
// L, P, mode (0 the library kernels, 1 the DETR-style baseline, 2 the fused deform_sample kernels), aligned], then
// int64 shapes [L, 2], int64 starts [L], value, loc, attn, grad_out (raw little-endian bytes of their dtypes), and
// in mode 2 fp32 ref [Q, 2] (loc / attn are then the offsets / logits). <out>: out, grad_value (fp32), grad_loc,
// grad_attn (fp32 in mode 2: grad logits).
#include <algorithm>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

struct EmuDim { unsigned x = 0, y = 0, z = 0; };
thread_local EmuDim threadIdx, blockIdx;
EmuDim blockDim;

struct EmuWarp {
  std::barrier<> bar{32};
  float vals[32];
};
thread_local EmuWarp* emu_warp = nullptr;
std::mutex emu_atomic_mutex;

template <typename T>
inline T __ldg(const T* p) { return *p; }
// Bounds of value and of the fp32 buffers atomicAdd may write (grad value; the baseline's grad loc / attn).
const char* emu_value_lo = nullptr;
const char* emu_value_hi = nullptr;
std::vector<std::pair<const float*, const float*>> emu_atomic_ranges;

inline void emu_check_value_read(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  if (c < emu_value_lo || c + bytes > emu_value_hi) {
    std::fprintf(stderr, "out-of-range value read: byte offset %td of %td\n", c - emu_value_lo,
                 emu_value_hi - emu_value_lo);
    std::abort();
  }
}
#define DEFORM_CHECK_VALUE_READ(ptr, bytes) emu_check_value_read((ptr), (bytes))

inline float atomicAdd(float* p, float v) {
  bool in_range = false;
  for (const auto& r : emu_atomic_ranges) in_range = in_range || (p >= r.first && p < r.second);
  if (!in_range) {
    std::fprintf(stderr, "out-of-range atomicAdd\n");
    std::abort();
  }
  std::lock_guard<std::mutex> lock(emu_atomic_mutex);
  const float old = *p;
  *p = old + v;
  return old;
}
inline float __shfl_xor_sync(unsigned, float v, int off) {
  const int lane = threadIdx.x % 32;
  emu_warp->vals[lane] = v;
  emu_warp->bar.arrive_and_wait();
  const float r = emu_warp->vals[lane ^ off];
  emu_warp->bar.arrive_and_wait();
  return r;
}

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#include "kernels/deform_pool.cuh"

using namespace lora_kernels;

static void emu_launch(unsigned grid, unsigned block, const std::function<void()>& kernel) {
  blockDim.x = block;
  for (unsigned b = 0; b < grid; ++b) {
    for (unsigned w = 0; w < block / 32; ++w) {
      EmuWarp warp;
      std::vector<std::thread> lanes;
      for (unsigned l = 0; l < 32; ++l) {
        lanes.emplace_back([&, b, w, l] {
          blockIdx.x = b;
          threadIdx.x = w * 32 + l;
          emu_warp = &warp;
          kernel();
        });
      }
      for (auto& t : lanes) t.join();
    }
  }
}

// The launcher's choice (csrc/deform_pool.cu launch_typed), replicated.
template <typename T, typename TL, int VEC, int TPG, int DC>
static void run_one(const DeformPoolParams& p, bool backward) {
  const int64_t threads = p.B * p.Q * p.H * TPG;
  const unsigned grid = static_cast<unsigned>((threads + kDeformThreads - 1) / kDeformThreads);
  if (p.ref != nullptr && backward) {
    emu_launch(grid, kDeformThreads, [&] { deform_sample_bwd_kernel<T, TL, VEC, TPG, DC>(p); });
  } else if (p.ref != nullptr) {
    emu_launch(grid, kDeformThreads, [&] { deform_sample_fwd_kernel<T, TL, VEC, TPG, DC>(p); });
  } else if (backward) {
    emu_launch(grid, kDeformThreads, [&] { deform_pool_bwd_kernel<T, TL, VEC, TPG, DC>(p); });
  } else {
    emu_launch(grid, kDeformThreads, [&] { deform_pool_fwd_kernel<T, TL, VEC, TPG, DC>(p); });
  }
}

template <typename T, typename TL>
static void run_typed(const DeformPoolParams& p, bool aligned, bool backward) {
  constexpr int V = 16 / sizeof(T);
  if (aligned && p.D == 32) return run_one<T, TL, V, 32 / V, 32>(p, backward);
  if (aligned && p.D == 64) return run_one<T, TL, V, 64 / V, 64>(p, backward);
  if (aligned && p.D == 128) return run_one<T, TL, V, 128 / V, 128>(p, backward);
  if (p.D <= 4) return run_one<T, TL, 1, 4, 0>(p, backward);
  if (p.D <= 8) return run_one<T, TL, 1, 8, 0>(p, backward);
  if (p.D <= 16) return run_one<T, TL, 1, 16, 0>(p, backward);
  run_one<T, TL, 1, 32, 0>(p, backward);
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <in> <out>\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  int64_t h[11];
  in.read(reinterpret_cast<char*>(h), sizeof(h));
  const int kind = static_cast<int>(h[0]);
  const bool loc_f32 = h[1] != 0;
  DeformPoolParams p{};
  p.B = h[2]; p.S = h[3]; p.Q = h[4]; p.H = h[5]; p.D = h[6]; p.L = h[7]; p.P = h[8];
  const bool baseline = h[9] == 1, fused = h[9] == 2, aligned = h[10] != 0;
  const size_t es = kind == 2 ? 4 : 2, les = (kind == 2 || loc_f32) ? 4 : 2, aes = fused ? 4 : les;
  const size_t nv = p.B * p.S * p.H * p.D, nloc = p.B * p.Q * p.H * p.L * p.P, no = p.B * p.Q * p.H * p.D;
  std::vector<int64_t> shapes(2 * p.L), starts(p.L);
  in.read(reinterpret_cast<char*>(shapes.data()), 16 * p.L);
  in.read(reinterpret_cast<char*>(starts.data()), 8 * p.L);
  // 16-byte aligned buffers (as the caching allocator gives), read in the order of the header.
  auto buf = [](size_t bytes) { return static_cast<char*>(std::aligned_alloc(16, (bytes + 16) / 16 * 16)); };
  char* value = buf(nv * es);
  char* loc = buf(2 * nloc * les);
  char* attn = buf(nloc * les);
  char* gout = buf(no * es);
  in.read(value, nv * es);
  in.read(loc, 2 * nloc * les);
  in.read(attn, nloc * les);
  in.read(gout, no * es);
  std::vector<float> ref(fused ? 2 * p.Q : 0);
  in.read(reinterpret_cast<char*>(ref.data()), 4 * ref.size());
  if (!in) {
    std::fprintf(stderr, "short input\n");
    return 2;
  }
  char* out = buf(no * es);
  std::vector<float> gv(nv, 0.f);
  char* gl = buf(2 * nloc * les);
  char* ga = buf(nloc * aes);
  std::fill(gl, gl + 2 * nloc * les, 0);
  std::fill(ga, ga + nloc * aes, 0);
  p.value = value; p.shapes = shapes.data(); p.starts = starts.data(); p.loc = loc; p.attn = attn;
  p.out = out; p.grad_out = gout; p.grad_value = gv.data(); p.grad_loc = gl; p.grad_attn = ga;
  p.ref = fused ? ref.data() : nullptr;
  emu_value_lo = value;
  emu_value_hi = value + nv * es;
  emu_atomic_ranges = {{gv.data(), gv.data() + nv}};
  if (baseline) {  // fp32 grad loc / attn, accumulated with atomics
    emu_atomic_ranges.push_back({reinterpret_cast<const float*>(gl), reinterpret_cast<const float*>(gl) + 2 * nloc});
    emu_atomic_ranges.push_back({reinterpret_cast<const float*>(ga), reinterpret_cast<const float*>(ga) + nloc});
  }
  for (int backward = 0; backward < 2; ++backward) {
    if (baseline) {
      const int64_t n = p.B * p.Q * p.H * p.D;
      const unsigned grid = static_cast<unsigned>((n + kDeformThreads - 1) / kDeformThreads);
      if (backward) {
        emu_launch(grid, kDeformThreads, [&] { deform_pool_baseline_bwd_kernel(p); });
      } else {
        emu_launch(grid, kDeformThreads, [&] { deform_pool_baseline_fwd_kernel(p); });
      }
    } else if (kind == 0) {
      loc_f32 ? run_typed<__half, float>(p, aligned, backward) : run_typed<__half, __half>(p, aligned, backward);
    } else if (kind == 1) {
      loc_f32 ? run_typed<__nv_bfloat16, float>(p, aligned, backward)
              : run_typed<__nv_bfloat16, __nv_bfloat16>(p, aligned, backward);
    } else {
      run_typed<float, float>(p, aligned, backward);
    }
  }
  std::ofstream o(argv[2], std::ios::binary);
  o.write(out, no * es);
  o.write(reinterpret_cast<const char*>(gv.data()), nv * 4);
  o.write(gl, 2 * nloc * les);
  o.write(ga, nloc * aes);
  return o ? 0 : 1;
}
