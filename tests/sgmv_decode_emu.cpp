// CPU emulation of the CUDA kernel in csrc/kernels/sgmv_decode.cuh, for tests/test_sgmv_decode_emu.py on machines
// without a GPU. The kernel source is compiled unchanged by the host compiler; this file supplies what the device
// would: threadIdx / blockIdx / blockDim, __shared__ (one static copy per kernel instantiation: blocks run one
// after another), __syncthreads (a block barrier), __shfl_xor_sync (a warp barrier over a double-buffered exchange),
// __ldg / __ldcg, atomicAdd / atomicExch on ints, __threadfence (a no-op: blocks do not overlap here).
// The threads of a block are fibers (ucontext) on ONE OS thread, switched round robin at barriers, so a run is
// deterministic and cheap; a pass in which no thread makes progress (a barrier some thread never reaches, e.g. one
// that returned early) aborts with "deadlock". Blocks run one after another, in grid order in the first launch and in
// reverse order in the second, so the last-block protocol is exercised with a different chunk finishing last.
// Every global access goes through SGMV_CHECK_ACCESS and is checked against the buffer it belongs to (x, y, a, b,
// metadata, workspace partials, counters; exact byte extents); accesses of 8 bytes or more (vector loads / stores)
// must be aligned to min(bytes, 16). A violation aborts (exit status != 0). It checks indexing, vector paths, dtype
// conversions, reductions and the counter protocol; not GPU-only behaviour (memory model, performance).
//
// Usage: sgmv_decode_emu <in> <out>. <in>: int64 header [kx, kw, ky (0 fp16, 1 bf16, 2 fp32), T, S, N, in,
// max_rank, merged, x_numel, x_off, x_stride, y_numel, y_off, y_stride, a_numel, a_off, a_slice_stride,
// a_row_stride, b_numel, b_off, b_stride], int64 cols [S], outs [S], offsets [N], int32 ranks [S, N], fp32 scales
// [S, N], int32 token_adapter [T], then the x, y, a, b storages (raw bytes; each tensor is storage + offset with the
// given strides). <out>: y storage after launch 1, y storage after launch 2 (both from the input y, the second with
// the counters launch 1 left), int32 counters [T * S] after both, int64 [vectorized, chunks].
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <vector>

struct EmuDim { unsigned x = 0, y = 0, z = 0; };
EmuDim threadIdx, blockIdx, blockDim;

// ---- fibers and barriers -------------------------------------------------------------------------------------
struct EmuBarrier { int count = 0, arrived = 0; long gen = 0; };
struct EmuFiber { ucontext_t ctx; std::vector<char> stack; bool done = false; int phase = 0; };
static ucontext_t emu_sched;
static std::vector<EmuFiber> emu_fibers;
static int emu_cur = 0;
static long emu_events = 0;
static EmuBarrier emu_block_bar;
static std::vector<EmuBarrier> emu_warp_bar;
static std::vector<float> emu_shfl;  // [warp][2][32]
static const std::function<void()>* emu_kernel = nullptr;

static void emu_yield() { swapcontext(&emu_fibers[emu_cur].ctx, &emu_sched); }
static void emu_wait(EmuBarrier& b) {
  const long g = b.gen;
  ++emu_events;
  if (++b.arrived == b.count) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  while (b.gen == g) emu_yield();
}
inline void __syncthreads() { emu_wait(emu_block_bar); }
inline void __threadfence() {}
inline float __shfl_xor_sync(unsigned, float v, int off) {
  const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  int& ph = emu_fibers[emu_cur].phase;  // double buffer: a fast lane's next write cannot clobber a pending read
  float* buf = &emu_shfl[(2 * w + ph) * 32];
  buf[lane] = v;
  emu_wait(emu_warp_bar[w]);
  const float r = buf[lane ^ off];
  ph ^= 1;
  return r;
}
static void emu_entry() {
  (*emu_kernel)();
  emu_fibers[emu_cur].done = true;
  ++emu_events;
}
static void emu_run_block(unsigned n) {
  emu_block_bar = EmuBarrier{static_cast<int>(n)};
  emu_warp_bar.assign(n / 32, EmuBarrier{32});
  emu_shfl.assign(n / 32 * 64, 0.f);
  for (unsigned i = 0; i < n; ++i) {
    EmuFiber& f = emu_fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &emu_sched;
    makecontext(&f.ctx, emu_entry, 0);
    f.done = false;
    f.phase = 0;
  }
  unsigned alive = n;
  while (alive > 0) {
    const long before = emu_events;
    for (unsigned i = 0; i < n; ++i) {
      if (emu_fibers[i].done) continue;
      emu_cur = static_cast<int>(i);
      threadIdx.x = i;
      swapcontext(&emu_sched, &emu_fibers[i].ctx);
      if (emu_fibers[i].done) --alive;
    }
    if (alive > 0 && emu_events == before) {
      std::fprintf(stderr, "deadlock: block (%u, %u, %u), %u threads stuck at a barrier\n", blockIdx.x, blockIdx.y,
                   blockIdx.z, alive);
      std::abort();
    }
  }
}

// ---- checked memory --------------------------------------------------------------------------------------------
struct EmuRange { const char* lo; const char* hi; };
static std::vector<EmuRange> emu_bufs[7];
static void emu_check(int buf, const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  bool in = false;
  for (const auto& r : emu_bufs[buf]) in = in || (c >= r.lo && c + bytes <= r.hi);
  if (!in) {
    std::fprintf(stderr, "out-of-range access: buffer %d, %zu bytes\n", buf, bytes);
    std::abort();
  }
  const size_t align = bytes >= 16 ? 16 : bytes;
  if (bytes >= 8 && reinterpret_cast<uintptr_t>(p) % align != 0) {
    std::fprintf(stderr, "misaligned %zu-byte access: buffer %d\n", bytes, buf);
    std::abort();
  }
}
#define SGMV_CHECK_ACCESS(buf, ptr, bytes) emu_check((buf), (ptr), (bytes))

template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float __ldcg(const float* p) { return *p; }
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}
inline int atomicExch(int* p, int v) {
  const int old = *p;
  *p = v;
  return old;
}

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#undef __shared__
#define __shared__ static  // one copy shared by the block's fibers (blocks run one after another)
#include "kernels/sgmv_decode.cuh"

using namespace lora_kernels;

template <typename TX, typename TW, typename TY, bool VEC>
static void launch(const SgmvDecodeParams& p, const SgmvDecodeLaunch& l, bool reversed) {
  const std::function<void()> k = [&] { sgmv_decode_kernel<TX, TW, TY, VEC>(p); };
  emu_kernel = &k;
  blockDim.x = l.block.x;
  const long nb = static_cast<long>(l.grid.x) * l.grid.y * l.grid.z;
  for (long i = 0; i < nb; ++i) {
    const long b = reversed ? nb - 1 - i : i;
    blockIdx.x = static_cast<unsigned>(b % l.grid.x);
    blockIdx.y = static_cast<unsigned>(b / l.grid.x % l.grid.y);
    blockIdx.z = static_cast<unsigned>(b / l.grid.x / l.grid.y);
    emu_run_block(l.block.x);
  }
}

template <typename TX, typename TW, typename TY>
static void run3(const SgmvDecodeParams& p, const SgmvDecodeLaunch& l, bool vec, bool reversed) {
  vec ? launch<TX, TW, TY, true>(p, l, reversed) : launch<TX, TW, TY, false>(p, l, reversed);
}
template <typename TX, typename TW>
static void run2(int ky, const SgmvDecodeParams& p, const SgmvDecodeLaunch& l, bool vec, bool rev) {
  ky == 0 ? run3<TX, TW, __half>(p, l, vec, rev)
          : ky == 1 ? run3<TX, TW, __nv_bfloat16>(p, l, vec, rev) : run3<TX, TW, float>(p, l, vec, rev);
}
template <typename TX>
static void run1(int kw, int ky, const SgmvDecodeParams& p, const SgmvDecodeLaunch& l, bool vec, bool rev) {
  kw == 0 ? run2<TX, __half>(ky, p, l, vec, rev)
          : kw == 1 ? run2<TX, __nv_bfloat16>(ky, p, l, vec, rev) : run2<TX, float>(ky, p, l, vec, rev);
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <in> <out>\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  int64_t h[22];
  in.read(reinterpret_cast<char*>(h), sizeof(h));
  const int kx = static_cast<int>(h[0]), kw = static_cast<int>(h[1]), ky = static_cast<int>(h[2]);
  const int64_t T = h[3], S = h[4], N = h[5], IN = h[6], max_rank = h[7], merged = h[8];
  const int64_t sx = kx == 2 ? 4 : 2, sw = kw == 2 ? 4 : 2, sy = ky == 2 ? 4 : 2;
  if (S < 1 || S > kSgmvMaxSlices) {
    std::fprintf(stderr, "bad S\n");
    return 2;
  }
  SgmvDecodeParams p{};
  p.T = T; p.S = S; p.N = N; p.in = IN; p.merged = merged;
  p.x_stride = h[11]; p.y_stride = h[14]; p.a_slice_stride = h[17]; p.a_row_stride = h[18]; p.b_stride = h[21];
  in.read(reinterpret_cast<char*>(p.col), 8 * S);
  in.read(reinterpret_cast<char*>(p.out), 8 * S);
  std::vector<int64_t> offsets(N);
  std::vector<int32_t> ranks(S * N), tok(T);
  std::vector<float> scales(S * N);
  in.read(reinterpret_cast<char*>(offsets.data()), 8 * N);
  in.read(reinterpret_cast<char*>(ranks.data()), 4 * S * N);
  in.read(reinterpret_cast<char*>(scales.data()), 4 * S * N);
  in.read(reinterpret_cast<char*>(tok.data()), 4 * T);
  // 16-byte aligned storages (as the caching allocator gives); each tensor starts `off` elements in.
  auto buf = [](size_t bytes) { return static_cast<char*>(std::aligned_alloc(16, (bytes + 16) / 16 * 16)); };
  const size_t xb = h[9] * sx, yb = h[12] * sy, ab = h[15] * sw, bb = h[19] * sw;
  char* xs = buf(xb);
  char* ys = buf(yb);
  char* as = buf(ab);
  char* bs = buf(bb);
  in.read(xs, xb);
  in.read(ys, yb);
  in.read(as, ab);
  in.read(bs, bb);
  if (!in) {
    std::fprintf(stderr, "short input\n");
    return 2;
  }
  std::vector<char> y0(ys, ys + yb);
  p.x = xs + h[10] * sx;
  p.y = ys + h[13] * sy;
  p.a = as + h[16] * sw;
  p.b = bs + h[20] * sw;
  p.offsets = offsets.data(); p.ranks = ranks.data(); p.scales = scales.data(); p.token_adapter = tok.data();
  const SgmvDecodeLaunch l = sgmv_decode_launch(T, S, IN, max_rank, merged >= 0);
  if (!l.ok) {
    std::fprintf(stderr, "shape outside the kernel's limits\n");
    return 2;
  }
  // NaN partials: a row the last block sums but no block wrote would poison y
  std::vector<float> partial(l.partial_floats, std::nanf(""));
  std::vector<int32_t> counter(l.counter_ints, 0);
  p.partial = partial.data(); p.counter = counter.data(); p.chunks = l.chunks; p.rows_cap = l.rows_cap;
  const bool vec = sgmv_decode_can_vectorize(p, sx, sw, sy);
  auto rng = [](const void* lo, size_t bytes) {
    return EmuRange{static_cast<const char*>(lo), static_cast<const char*>(lo) + bytes};
  };
  emu_bufs[kSgmvBufX] = {rng(xs, xb)};
  emu_bufs[kSgmvBufY] = {rng(ys, yb)};
  emu_bufs[kSgmvBufA] = {rng(as, ab)};
  emu_bufs[kSgmvBufB] = {rng(bs, bb)};
  emu_bufs[kSgmvBufMeta] = {rng(offsets.data(), 8 * N), rng(ranks.data(), 4 * S * N), rng(scales.data(), 4 * S * N),
                            rng(tok.data(), 4 * T)};
  emu_bufs[kSgmvBufPartial] = {rng(partial.data(), 4 * partial.size())};
  emu_bufs[kSgmvBufCounter] = {rng(counter.data(), 4 * counter.size())};
  emu_fibers.resize(kSgmvThreads);
  for (auto& f : emu_fibers) f.stack.resize(1 << 17);

  std::ofstream o(argv[2], std::ios::binary);
  for (int run = 0; run < 2; ++run) {
    std::memcpy(ys, y0.data(), yb);
    if (l.partial_floats > 0 && T > 0) {
      kx == 0 ? run1<__half>(kw, ky, p, l, vec, run == 1)
              : kx == 1 ? run1<__nv_bfloat16>(kw, ky, p, l, vec, run == 1) : run1<float>(kw, ky, p, l, vec, run == 1);
    }
    o.write(ys, yb);
  }
  o.write(reinterpret_cast<const char*>(counter.data()), 4 * counter.size());
  const int64_t flags[2] = {vec ? 1 : 0, l.chunks};
  o.write(reinterpret_cast<const char*>(flags), sizeof(flags));
  return o ? 0 : 1;
}
