// CPU emulation of the CUDA kernel in csrc/kernels/fused_lora_linear.cuh, for tests/test_fused_lora_linear_emu.py on
// machines without a GPU: the kernel source compiled unchanged by the host compiler on the emulation of
// tests/cuda_emu.h (threads as fibers, block / warp barriers, shuffles, shared memory, checked accesses). Blocks run
// one after another: in grid order (launch 1: the last shrink block finishes h early, later tiles finish themselves,
// earlier ones are finished by the h-finisher), in reverse order (launch 2: block 0 is the h-finisher and the last
// block; it finishes every other tile from the workspace) and in a seeded random order (launch 3). All three must
// give the same bits. Every global access is checked against the buffer it belongs to (x, y, W0, bias, a, b,
// metadata, partials, hfin, base, counters; exact byte extents) and vector accesses for alignment; a violation
// aborts. Not checked: GPU-only behaviour (memory model, performance).
//
// Usage: fused_lora_linear_emu <in> <out>. <in>: int64 header [ka, kw (0 fp16, 1 bf16, 2 fp32), T, S, N, in, out,
// max_rank, merged, has_bias, x_numel, x_off, x_stride, y_numel, y_off, y_stride, w0_numel, w0_off, w0_stride,
// a_numel, a_off, a_slice_stride, a_row_stride, b_numel, b_off, b_stride], int64 cols [S], outs [S], offsets [N],
// int32 ranks [S, N], fp32 scales [S, N], int32 token_adapter [T], then the x, y, w0, bias (out elements when
// has_bias), a, b storages (raw bytes; each tensor is storage + offset with the given strides). <out>: the y storage
// after each of the 3 launches (each from the input y; the counters carry over), int32 counters [1 + tiles] after
// all, int64 [vectorized, tiles, chunks].
#include <algorithm>
#include <random>

#include "cuda_emu.h"
#include "kernels/fused_lora_linear.cuh"

using namespace lora_kernels;

// One launch of the instantiation for dtype kinds ka, kw (0 fp16, 1 bf16, 2 fp32) and the vector variant vec: every
// block of the grid, in the given order.
static void launch(int ka, int kw, bool vec, const FusedLoraLinearParams& p, const FusedLoraLinearLaunch& l,
                   const std::vector<long>& order) {
  lora_dispatch_kind(ka, [&](auto ta) {
    lora_dispatch_kind(kw, [&](auto tw) {
      using TA = typename decltype(ta)::type;
      using TW = typename decltype(tw)::type;
      if (vec) {
        emu_launch(l.grid, l.block.x, order, [&] { fused_lora_linear_kernel<TA, TW, true>(p); });
      } else {
        emu_launch(l.grid, l.block.x, order, [&] { fused_lora_linear_kernel<TA, TW, false>(p); });
      }
    });
  });
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <in> <out>\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  const std::vector<int64_t> h = emu_read<int64_t>(in, 26);
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
  const EmuDecodeMeta meta(in, T, S, N, p.col, p.outs);
  // each tensor starts `off` elements into its storage
  const size_t xb = h[10] * sa, yb = h[13] * sa, wb = h[16] * sw, biasb = has_bias ? OUT * sw : 0, ab = h[19] * sw,
               bb = h[23] * sw;
  char* xs = emu_read_storage(in, xb);
  char* ys = emu_read_storage(in, yb);
  char* ws = emu_read_storage(in, wb);
  char* bis = emu_read_storage(in, biasb);
  char* as = emu_read_storage(in, ab);
  char* bs = emu_read_storage(in, bb);
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
  meta.bind(p);
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
  emu_bufs[kBufX] = {emu_range(xs, xb)};
  emu_bufs[kBufY] = {emu_range(ys, yb)};
  emu_bufs[kBufW0] = {emu_range(ws, wb)};
  emu_bufs[kBufBias] = {emu_range(bis, biasb)};
  emu_bufs[kBufA] = {emu_range(as, ab)};
  emu_bufs[kBufB] = {emu_range(bs, bb)};
  emu_bufs[kBufPartial] = {emu_range(partial.data(), 4 * partial.size())};
  emu_bufs[kBufHfin] = {emu_range(hfin.data(), 4 * hfin.size())};
  emu_bufs[kBufBase] = {emu_range(base.data(), 4 * base.size())};
  emu_bufs[kBufCounter] = {emu_range(counter.data(), 4 * counter.size())};

  std::vector<long> order = emu_grid_order(l.grid, false);
  std::ofstream o(argv[2], std::ios::binary);
  for (int run = 0; run < 3; ++run) {
    if (run == 1) std::reverse(order.begin(), order.end());
    if (run == 2) std::shuffle(order.begin(), order.end(), std::mt19937(12345));
    std::memcpy(ys, y0.data(), yb);
    launch(ka, kw, vec, p, l, order);
    o.write(ys, yb);
  }
  o.write(reinterpret_cast<const char*>(counter.data()), 4 * counter.size());
  const int64_t flags[3] = {vec ? 1 : 0, l.tiles, l.chunks};
  o.write(reinterpret_cast<const char*>(flags), sizeof(flags));
  return o ? 0 : 1;
}
