// CPU emulation of the CUDA kernel in csrc/kernels/fused_lora_linear.cuh, for tests/test_fused_lora_linear_emu.py on
// machines without a GPU (the machinery is the one of tests/sgmv_decode_emu.cpp, copied). The kernel source is
// compiled unchanged by the host compiler; this file supplies what the device would: threadIdx / blockIdx /
// blockDim, __shared__ (one static copy per instantiation: blocks run one after another), __syncthreads (a block
// barrier), __shfl_xor_sync (a warp barrier over a double-buffered exchange), __ldg / __ldcg, atomicAdd /
// atomicExch on ints, __threadfence (a no-op: blocks do not overlap here).
// The threads of a block are fibers (ucontext) on ONE OS thread, switched round robin at barriers; a pass in which
// no thread makes progress aborts with "deadlock". Blocks run one after another: in grid order (launch 1: the last
// shrink block finishes h early, later tiles finish themselves, earlier ones are finished by the h-finisher), in
// reverse order (launch 2: block 0 is the h-finisher and the last block; it finishes every other tile from the
// workspace) and in a seeded random order (launch 3). All three must give the same bits.
// Every global access goes through FLL_CHECK_ACCESS and is checked against the buffer it belongs to (x, y, W0, bias,
// a, b, metadata, partials, hfin, base, counters; exact byte extents); accesses of 8 bytes or more must be aligned
// to min(bytes, 16). A violation aborts. Not checked: GPU-only behaviour (memory model, performance).
//
// Usage: fused_lora_linear_emu <in> <out>. <in>: int64 header [ka, kw (0 fp16, 1 bf16, 2 fp32), T, S, N, in, out,
// max_rank, merged, has_bias, x_numel, x_off, x_stride, y_numel, y_off, y_stride, w0_numel, w0_off, w0_stride,
// a_numel, a_off, a_slice_stride, a_row_stride, b_numel, b_off, b_stride], int64 cols [S], outs [S], offsets [N],
// int32 ranks [S, N], fp32 scales [S, N], int32 token_adapter [T], then the x, y, w0, bias (out elements when
// has_bias), a, b storages (raw bytes; each tensor is storage + offset with the given strides). <out>: the y storage
// after each of the 3 launches (each from the input y; the counters carry over), int32 counters [1 + tiles] after
// all, int64 [vectorized, tiles, chunks].
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
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
static std::vector<EmuRange> emu_bufs[16];  // >= kFllBufCount
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
#define FLL_CHECK_ACCESS(buf, ptr, bytes) emu_check((buf), (ptr), (bytes))

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
#include "kernels/fused_lora_linear.cuh"
static_assert(lora_kernels::kFllBufCount <= 16, "emu_bufs is too small");

using namespace lora_kernels;

// Runs every block of the grid, in the given order.
template <typename TA, typename TW, bool VEC>
static void launch(const FusedLoraLinearParams& p, const FusedLoraLinearLaunch& l, const std::vector<long>& order) {
  const std::function<void()> k = [&] { fused_lora_linear_kernel<TA, TW, VEC>(p); };
  emu_kernel = &k;
  blockDim.x = l.block.x;
  for (const long b : order) {
    blockIdx.x = static_cast<unsigned>(b);
    emu_run_block(l.block.x);
  }
}

template <typename TA, typename TW>
static void run2(const FusedLoraLinearParams& p, const FusedLoraLinearLaunch& l, bool vec,
                 const std::vector<long>& order) {
  vec ? launch<TA, TW, true>(p, l, order) : launch<TA, TW, false>(p, l, order);
}
template <typename TA>
static void run1(int kw, const FusedLoraLinearParams& p, const FusedLoraLinearLaunch& l, bool vec,
                 const std::vector<long>& order) {
  kw == 0 ? run2<TA, __half>(p, l, vec, order)
          : kw == 1 ? run2<TA, __nv_bfloat16>(p, l, vec, order) : run2<TA, float>(p, l, vec, order);
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <in> <out>\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  int64_t h[26];
  in.read(reinterpret_cast<char*>(h), sizeof(h));
  const int ka = static_cast<int>(h[0]), kw = static_cast<int>(h[1]);
  const int64_t T = h[2], S = h[3], N = h[4], IN = h[5], OUT = h[6], max_rank = h[7], merged = h[8];
  const bool has_bias = h[9] != 0;
  const int64_t sa = ka == 2 ? 4 : 2, sw = kw == 2 ? 4 : 2;
  if (S < 1 || S > kFllMaxSlices) {
    std::fprintf(stderr, "bad S\n");
    return 2;
  }
  FusedLoraLinearParams p{};
  p.T = T; p.S = S; p.N = N; p.in = IN; p.out = OUT; p.merged = merged;
  p.x_stride = h[12]; p.y_stride = h[15]; p.w0_stride = h[18]; p.a_slice_stride = h[21]; p.a_row_stride = h[22];
  p.b_stride = h[25];
  in.read(reinterpret_cast<char*>(p.col), 8 * S);
  in.read(reinterpret_cast<char*>(p.outs), 8 * S);
  std::vector<int64_t> offsets(N);
  std::vector<int32_t> ranks(S * N), tok(T);
  std::vector<float> scales(S * N);
  in.read(reinterpret_cast<char*>(offsets.data()), 8 * N);
  in.read(reinterpret_cast<char*>(ranks.data()), 4 * S * N);
  in.read(reinterpret_cast<char*>(scales.data()), 4 * S * N);
  in.read(reinterpret_cast<char*>(tok.data()), 4 * T);
  // 16-byte aligned storages (as the caching allocator gives); each tensor starts `off` elements in.
  auto buf = [](size_t bytes) { return static_cast<char*>(std::aligned_alloc(16, (bytes + 16) / 16 * 16)); };
  const size_t xb = h[10] * sa, yb = h[13] * sa, wb = h[16] * sw, biasb = has_bias ? OUT * sw : 0, ab = h[19] * sw,
               bb = h[23] * sw;
  char* xs = buf(xb);
  char* ys = buf(yb);
  char* ws = buf(wb);
  char* bis = buf(biasb);
  char* as = buf(ab);
  char* bs = buf(bb);
  in.read(xs, xb);
  in.read(ys, yb);
  in.read(ws, wb);
  in.read(bis, biasb);
  in.read(as, ab);
  in.read(bs, bb);
  if (!in) {
    std::fprintf(stderr, "short input\n");
    return 2;
  }
  std::vector<char> y0(ys, ys + yb);
  p.x = xs + h[11] * sa;
  p.y = ys + h[14] * sa;
  p.w0 = ws + h[17] * sw;
  p.bias = has_bias ? bis : nullptr;
  p.a = as + h[20] * sw;
  p.b = bs + h[24] * sw;
  p.offsets = offsets.data(); p.ranks = ranks.data(); p.scales = scales.data(); p.token_adapter = tok.data();
  const FusedLoraLinearLaunch l = fused_lora_linear_launch(T, S, IN, OUT, max_rank, merged >= 0);
  if (!l.ok) {
    std::fprintf(stderr, "shape outside the kernel's limits\n");
    return 2;
  }
  fused_lora_linear_bind(p, l);
  // NaN workspace: a value the kernel reads but no block wrote would poison y
  std::vector<float> partial(l.partial_floats, std::nanf("")), hfin(l.hfin_floats, std::nanf("")),
      base(l.base_floats, std::nanf(""));
  std::vector<int32_t> counter(l.counter_ints, 0);
  p.partial = partial.data(); p.hfin = hfin.data(); p.base = base.data(); p.counter = counter.data();
  const bool vec = fll_can_vectorize(p, sa, sw);
  auto rng = [](const void* lo, size_t bytes) {
    return EmuRange{static_cast<const char*>(lo), static_cast<const char*>(lo) + bytes};
  };
  emu_bufs[kFllBufX] = {rng(xs, xb)};
  emu_bufs[kFllBufY] = {rng(ys, yb)};
  emu_bufs[kFllBufW0] = {rng(ws, wb)};
  emu_bufs[kFllBufBias] = {rng(bis, biasb)};
  emu_bufs[kFllBufA] = {rng(as, ab)};
  emu_bufs[kFllBufB] = {rng(bs, bb)};
  emu_bufs[kFllBufMeta] = {rng(offsets.data(), 8 * N), rng(ranks.data(), 4 * S * N), rng(scales.data(), 4 * S * N),
                           rng(tok.data(), 4 * T)};
  emu_bufs[kFllBufPartial] = {rng(partial.data(), 4 * partial.size())};
  emu_bufs[kFllBufHfin] = {rng(hfin.data(), 4 * hfin.size())};
  emu_bufs[kFllBufBase] = {rng(base.data(), 4 * base.size())};
  emu_bufs[kFllBufCounter] = {rng(counter.data(), 4 * counter.size())};
  emu_fibers.resize(kFllThreads);
  for (auto& f : emu_fibers) f.stack.resize(1 << 17);

  std::vector<long> order(l.tiles);
  for (long i = 0; i < l.tiles; ++i) order[i] = i;
  std::ofstream o(argv[2], std::ios::binary);
  for (int run = 0; run < 3; ++run) {
    if (run == 1) std::reverse(order.begin(), order.end());
    if (run == 2) std::shuffle(order.begin(), order.end(), std::mt19937(12345));
    std::memcpy(ys, y0.data(), yb);
    ka == 0 ? run1<__half>(kw, p, l, vec, order)
            : ka == 1 ? run1<__nv_bfloat16>(kw, p, l, vec, order) : run1<float>(kw, p, l, vec, order);
    o.write(ys, yb);
  }
  o.write(reinterpret_cast<const char*>(counter.data()), 4 * counter.size());
  const int64_t flags[3] = {vec ? 1 : 0, l.tiles, l.chunks};
  o.write(reinterpret_cast<const char*>(flags), sizeof(flags));
  return o ? 0 : 1;
}
