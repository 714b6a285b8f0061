// CPU emulation of the CUDA kernel in csrc/kernels/sgmv_decode.cuh, for tests/test_sgmv_decode_emu.py on machines
// without a GPU: the kernel source compiled unchanged by the host compiler on the emulation of tests/cuda_emu.h
// (threads as fibers, block / warp barriers, shuffles, shared memory, checked accesses). Blocks run one after
// another, in grid order in the first launch and in reverse order in the second, so the last-block protocol is
// exercised with a different chunk finishing last. Every global access is checked against the buffer it belongs to
// (x, y, a, b, metadata, workspace partials, counters; exact byte extents) and vector accesses for alignment; a
// violation aborts (exit status != 0). It checks indexing, vector paths, dtype conversions, reductions and the counter
// protocol; not GPU-only behaviour (memory model, performance).
//
// Usage: sgmv_decode_emu <in> <out>. <in>: int64 header [kx, kw, ky (0 fp16, 1 bf16, 2 fp32), T, S, N, in,
// max_rank, merged, x_numel, x_off, x_stride, y_numel, y_off, y_stride, a_numel, a_off, a_slice_stride,
// a_row_stride, b_numel, b_off, b_stride], int64 cols [S], outs [S], offsets [N], int32 ranks [S, N], fp32 scales
// [S, N], int32 token_adapter [T], then the x, y, a, b storages (raw bytes; each tensor is storage + offset with the
// given strides). <out>: y storage after launch 1, y storage after launch 2 (both from the input y, the second with
// the counters launch 1 left), int32 counters [T * S] after both, int64 [vectorized, chunks].
#include "cuda_emu.h"
#include "kernels/sgmv_decode.cuh"

using namespace lora_kernels;

// One launch of the instantiation for dtype kinds kx, kw, ky (0 fp16, 1 bf16, 2 fp32) and the vector variant vec:
// every block, in grid order or reversed.
static void launch(int kx, int kw, int ky, bool vec, const SgmvDecodeParams& p, const SgmvDecodeLaunch& l,
                   bool reversed) {
  const std::vector<long> order = emu_grid_order(l.grid, reversed);
  lora_dispatch_kind(kx, [&](auto tx) {
    lora_dispatch_kind(kw, [&](auto tw) {
      lora_dispatch_kind(ky, [&](auto ty) {
        using TX = typename decltype(tx)::type;
        using TW = typename decltype(tw)::type;
        using TY = typename decltype(ty)::type;
        if (vec) {
          emu_launch(l.grid, l.block.x, order, [&] { sgmv_decode_kernel<TX, TW, TY, true>(p); });
        } else {
          emu_launch(l.grid, l.block.x, order, [&] { sgmv_decode_kernel<TX, TW, TY, false>(p); });
        }
      });
    });
  });
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <in> <out>\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  const std::vector<int64_t> h = emu_read<int64_t>(in, 22);
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
  const EmuDecodeMeta meta(in, T, S, N, p.col, p.out);
  // each tensor starts `off` elements into its storage
  const size_t xb = h[9] * sx, yb = h[12] * sy, ab = h[15] * sw, bb = h[19] * sw;
  char* xs = emu_read_storage(in, xb);
  char* ys = emu_read_storage(in, yb);
  char* as = emu_read_storage(in, ab);
  char* bs = emu_read_storage(in, bb);
  if (!in) {
    std::fprintf(stderr, "short input\n");
    return 2;
  }
  std::vector<char> y0(ys, ys + yb);
  p.x = xs + h[10] * sx;
  p.y = ys + h[13] * sy;
  p.a = as + h[16] * sw;
  p.b = bs + h[20] * sw;
  meta.bind(p);
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
  emu_bufs[kBufX] = {emu_range(xs, xb)};
  emu_bufs[kBufY] = {emu_range(ys, yb)};
  emu_bufs[kBufA] = {emu_range(as, ab)};
  emu_bufs[kBufB] = {emu_range(bs, bb)};
  emu_bufs[kBufPartial] = {emu_range(partial.data(), 4 * partial.size())};
  emu_bufs[kBufCounter] = {emu_range(counter.data(), 4 * counter.size())};

  std::ofstream o(argv[2], std::ios::binary);
  for (int run = 0; run < 2; ++run) {
    std::memcpy(ys, y0.data(), yb);
    if (l.partial_floats > 0 && T > 0) launch(kx, kw, ky, vec, p, l, run == 1);
    o.write(ys, yb);
  }
  o.write(reinterpret_cast<const char*>(counter.data()), 4 * counter.size());
  const int64_t flags[2] = {vec ? 1 : 0, l.chunks};
  o.write(reinterpret_cast<const char*>(flags), sizeof(flags));
  return o ? 0 : 1;
}
