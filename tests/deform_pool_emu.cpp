// CPU emulation of the CUDA kernels in csrc/kernels/deform_pool.cuh, for tests/test_deform.py on machines
// without a GPU: the kernel source compiled unchanged by the host compiler on the emulation of tests/cuda_emu.h
// (threads as fibers, warp barriers for __shfl_xor_sync: a lane that skipped a shuffle aborts the run with
// "deadlock"). Launches run block by block. It checks the kernels' indexing, vector loads, dtype conversions and
// group reductions; not GPU-only behaviour (memory model, the sm_90 float4 atomics, performance). Every value and
// grad_out read, every out store of the library kernels and every atomicAdd is checked against its buffer's bounds
// (vector accesses also for alignment): an out-of-range access aborts the run (exit status != 0).
//
// Usage: deform_pool_emu <in> <out>. <in>: int64 header [kind (0 fp16, 1 bf16, 2 fp32), loc_f32, B, S, Q, H, D,
// L, P, mode (0 the library kernels, 1 the DETR-style baseline, 2 the fused deform_sample kernels), aligned], then
// int64 shapes [L, 2], int64 starts [L], value, loc, attn, grad_out (raw little-endian bytes of their dtypes), and
// in mode 2 fp32 ref [Q, 2] (loc / attn are then the offsets / logits). <out>: out, grad_value (fp32), grad_loc,
// grad_attn (fp32 in mode 2: grad logits).
#include <algorithm>

#include "cuda_emu.h"
#include "kernels/deform_pool.cuh"

using namespace lora_kernels;

// Every block of a 1-D grid of kDeformThreads threads, in order, each thread calling kernel().
static void run_grid(int64_t threads, const std::function<void()>& kernel) {
  const dim3 grid(static_cast<unsigned>((threads + kDeformThreads - 1) / kDeformThreads));
  emu_launch(grid, kDeformThreads, emu_grid_order(grid, false), kernel);
}

// The launcher's choice (csrc/deform_pool.cu launch_one / launch_typed), replicated.
template <typename T, typename TL, int VEC, int TPG, int DC>
static void run_one(const DeformPoolParams& p, bool backward) {
  const int64_t threads = p.B * p.Q * p.H * TPG;
  if (p.ref != nullptr && backward) {
    run_grid(threads, [&] { deform_sample_bwd_kernel<T, TL, VEC, TPG, DC>(p); });
  } else if (p.ref != nullptr) {
    run_grid(threads, [&] { deform_sample_fwd_kernel<T, TL, VEC, TPG, DC>(p); });
  } else if (backward) {
    run_grid(threads, [&] { deform_pool_bwd_kernel<T, TL, VEC, TPG, DC>(p); });
  } else {
    run_grid(threads, [&] { deform_pool_fwd_kernel<T, TL, VEC, TPG, DC>(p); });
  }
}

template <typename T, typename TL>
static void run_typed(const DeformPoolParams& p, bool aligned, bool backward) {
  constexpr int V = kVecElems<T>;
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
  const std::vector<int64_t> h = emu_read<int64_t>(in, 11);
  const int kind = static_cast<int>(h[0]);
  const bool loc_f32 = h[1] != 0;
  DeformPoolParams p{};
  p.B = h[2]; p.S = h[3]; p.Q = h[4]; p.H = h[5]; p.D = h[6]; p.L = h[7]; p.P = h[8];
  const bool baseline = h[9] == 1, fused = h[9] == 2, aligned = h[10] != 0;
  const size_t es = kind == 2 ? 4 : 2, les = (kind == 2 || loc_f32) ? 4 : 2, aes = fused ? 4 : les;
  const size_t nv = p.B * p.S * p.H * p.D, nloc = p.B * p.Q * p.H * p.L * p.P, no = p.B * p.Q * p.H * p.D;
  const std::vector<int64_t> shapes = emu_read<int64_t>(in, 2 * p.L), starts = emu_read<int64_t>(in, p.L);
  // buffers read in the order of the header
  char* value = emu_read_storage(in, nv * es);
  char* loc = emu_read_storage(in, 2 * nloc * les);
  char* attn = emu_read_storage(in, nloc * les);
  char* gout = emu_read_storage(in, no * es);
  const std::vector<float> ref = emu_read<float>(in, fused ? 2 * p.Q : 0);
  if (!in) {
    std::fprintf(stderr, "short input\n");
    return 2;
  }
  char* out = emu_alloc16(no * es);
  std::vector<float> gv(nv, 0.f);
  char* gl = emu_alloc16(2 * nloc * les);
  char* ga = emu_alloc16(nloc * aes);
  std::fill(gl, gl + 2 * nloc * les, 0);
  std::fill(ga, ga + nloc * aes, 0);
  p.value = value; p.shapes = shapes.data(); p.starts = starts.data(); p.loc = loc; p.attn = attn;
  p.out = out; p.grad_out = gout; p.grad_value = gv.data(); p.grad_loc = gl; p.grad_attn = ga;
  p.ref = fused ? ref.data() : nullptr;
  emu_bufs[kBufValue] = {emu_range(value, nv * es)};
  emu_bufs[kBufGradOut] = {emu_range(gout, no * es)};
  emu_bufs[kBufOut] = {emu_range(out, no * es)};
  emu_bufs[kBufAtomics] = {emu_range(gv.data(), 4 * nv)};
  if (baseline) {  // fp32 grad loc / attn, accumulated with atomics
    emu_bufs[kBufAtomics].push_back(emu_range(gl, 4 * 2 * nloc));
    emu_bufs[kBufAtomics].push_back(emu_range(ga, 4 * nloc));
  }
  for (int backward = 0; backward < 2; ++backward) {
    if (baseline) {
      const int64_t n = p.B * p.Q * p.H * p.D;
      if (backward) {
        run_grid(n, [&] { deform_pool_baseline_bwd_kernel(p); });
      } else {
        run_grid(n, [&] { deform_pool_baseline_fwd_kernel(p); });
      }
    } else {
      lora_dispatch_kind(kind, [&](auto tv) {
        using T = typename decltype(tv)::type;
        loc_f32 ? run_typed<T, float>(p, aligned, backward) : run_typed<T, T>(p, aligned, backward);
      });
    }
  }
  std::ofstream o(argv[2], std::ios::binary);
  o.write(out, no * es);
  o.write(reinterpret_cast<const char*>(gv.data()), nv * 4);
  o.write(gl, 2 * nloc * les);
  o.write(ga, nloc * aes);
  return o ? 0 : 1;
}
