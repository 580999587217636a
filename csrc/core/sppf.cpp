// SPPF's chained max pools (xnorconv_core.h says what they compute): the three 5x5 pools and the concatenation in
// one pass over memory per pool, where eager PyTorch converts to channels_last and back (its NCHW max pooling is
// many times slower), pools twice per pool through max_pool2d_with_indices, and concatenates. Memory-bound loops
// over contiguous rows (NCHW) or channels (NHWC), which the auto-vectoriser handles at the baseline ISA, so this
// file has no ISA flags; the window maxima run the selected family's window_max where it has one (AVX-512).
#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "xnorconv_core.h"

namespace xnorconv {

namespace {

// Output elements per task: enough to amortise a task, few enough to split a single image over the threads.
constexpr int64_t kElementsPerTask = 16384;
// NHWC tasks take blocks of this many channels.
constexpr int64_t kChannelBlock = 64;

// PyTorch's max-pooling rule: v replaces the running maximum m if greater, or if NaN (NaN propagates).
inline float take_max(float m, float v) { return (v > m) | (v != v) ? v : m; }

// The pools work on a padded copy of the image: (h + 2r) rows x (w + 2r) pixels x `depth` floats per pixel (1 for an
// NCHW plane, a block of channels for NHWC), with -inf in the padding. Every window then has k = 2r + 1 taps and
// each pass is one flat loop over memory at a fixed offset per tap, long enough to vectorise, rows and pixels alike.
// A -inf padding tap never changes the result: PyTorch starts each window at -inf.
struct PaddedImage {
  int64_t h, w, depth, radius;
  int64_t pixel() const { return depth; }
  int64_t row() const { return (w + 2 * radius) * depth; }
  int64_t size() const { return (h + 2 * radius) * row(); }
  int64_t interior(int64_t i, int64_t j) const { return (i + radius) * row() + (j + radius) * depth; }
};

// out[e] = the max over taps t < K, in order, of in[e + t * step], for e < count: one pass for the common sizes.
// Written as a plain maximum (v > m ? v : m, one max instruction) plus a NaN flag, which the vectoriser turns into
// far fewer instructions per tap than take_max's select; the same result, ties and NaN included.
template <int K>
void window_max_of(const float* __restrict in, float* __restrict out, int64_t count, int64_t step) {
  for (int64_t e = 0; e < count; ++e) {
    float m = in[e];
    bool nan = m != m;
    for (int t = 1; t < K; ++t) {
      const float v = in[e + t * step];
      m = v > m ? v : m;
      nan |= v != v;
    }
    out[e] = nan ? std::numeric_limits<float>::quiet_NaN() : m;
  }
}

void window_max(const KernelOps& ops, const float* __restrict in, float* __restrict out, int64_t count,
                int64_t step, int64_t k) {
  if (ops.window_max) {
    ops.window_max(in, out, count, step, k);
    return;
  }
  switch (k) {
    case 3: return window_max_of<3>(in, out, count, step);
    case 5: return window_max_of<5>(in, out, count, step);
    case 7: return window_max_of<7>(in, out, count, step);
    default: break;
  }
  std::memcpy(out, in, sizeof(float) * count);
  for (int64_t t = 1; t < k; ++t) {
    const float* __restrict tap = in + t * step;
    for (int64_t e = 0; e < count; ++e) out[e] = take_max(out[e], tap[e]);
  }
  // A NaN window gives the quiet NaN, as window_max_of and every family's window_max do: the same bits.
  for (int64_t e = 0; e < count; ++e)
    if (out[e] != out[e]) out[e] = std::numeric_limits<float>::quiet_NaN();
}

// One pool of `padded` (interior filled, padding -inf): a 1 x k pool along the rows into `rows`, then a k x 1 pool
// down the columns into `cols`, where pixel (i, j) is at cols[i * row + j * pixel].
void pool_padded(const KernelOps& ops, const PaddedImage& g, const float* padded, float* rows, float* cols) {
  const int64_t k = 2 * g.radius + 1;
  // rows[e] is the 1 x k pool of the window starting at e (so centred at e + r pixels); the last (k - 1) pixels'
  // windows would run past the buffer: they lie in the right padding of the last row and are never read.
  const int64_t row_count = g.size() - (k - 1) * g.pixel();
  window_max(ops, padded, rows, row_count, g.pixel(), k);
  std::fill(rows + row_count, rows + g.size(), -std::numeric_limits<float>::infinity());
  window_max(ops, rows, cols, g.h * g.row(), g.row(), k);
}

// `count` pixels of `depth` floats each, from src (pixels src_pixel floats apart) to dst (dst_pixel apart).
void copy_pixels(const float* __restrict src, int64_t src_pixel, float* __restrict dst, int64_t dst_pixel,
                 int64_t count, int64_t depth) {
  if (src_pixel == depth && dst_pixel == depth) {
    std::memcpy(dst, src, sizeof(float) * count * depth);
    return;
  }
  for (int64_t q = 0; q < count; ++q)
    for (int64_t c = 0; c < depth; ++c) dst[q * dst_pixel + c] = src[q * src_pixel + c];
}

// A pooled image's rows, from `cols` to dst (pixels dst_pixel floats apart, rows dst_row apart).
void copy_pooled(const PaddedImage& g, const float* cols, float* dst, int64_t dst_pixel, int64_t dst_row) {
  for (int64_t i = 0; i < g.h; ++i)
    copy_pixels(cols + i * g.row(), g.pixel(), dst + i * dst_row, dst_pixel, g.w, g.depth);
}

// The chain of pools of one image's plane (NCHW) or channel block (NHWC): `image` is x's first float of it (pixels
// src_pixel apart), `out` the concatenation's first float of slot 0 (pixels out_pixel apart, slots slot apart).
void chain(const KernelOps& ops, const ChainedPoolShape& s, const PaddedImage& g, const float* image,
           int64_t src_pixel, float* out, int64_t out_pixel, int64_t slot, std::vector<float>& buffers) {
  const size_t size = static_cast<size_t>(g.size());
  if (buffers.size() < 3 * size) buffers.assign(3 * size, -std::numeric_limits<float>::infinity());
  float *padded = buffers.data(), *rows = padded + size, *cols = rows + size;
  std::fill(padded, padded + size, -std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < g.h; ++i) {
    const float* src = image + i * g.w * src_pixel;
    copy_pixels(src, src_pixel, padded + g.interior(i, 0), g.pixel(), g.w, g.depth);
    copy_pixels(src, src_pixel, out + i * g.w * out_pixel, out_pixel, g.w, g.depth);
  }
  for (int64_t p = 1; p <= s.pools; ++p) {
    pool_padded(ops, g, padded, rows, cols);
    copy_pooled(g, cols, out + p * slot, out_pixel, g.w * out_pixel);
    if (p < s.pools) copy_pooled(g, cols, padded + g.interior(0, 0), g.pixel(), g.row());
  }
}

void nchw_pools(const KernelOps& ops, const ChainedPoolShape& s, const float* x, float* out,
                const ParallelFor& parallel_for) {
  const int64_t plane = s.height * s.width;
  const PaddedImage g{s.height, s.width, 1, s.kernel / 2};
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, plane * (s.pools + 1)));
  parallel_for(s.batch * s.channels, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buffers;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / s.channels, c = task % s.channels;
      chain(ops, s, g, x + task * plane, 1, out + (n * (s.pools + 1) * s.channels + c) * plane, 1,
            s.channels * plane, buffers);
    }
  });
}

void nhwc_pools(const KernelOps& ops, const ChainedPoolShape& s, const float* x, float* out,
                const ParallelFor& parallel_for) {
  const int64_t pixels = s.height * s.width, out_pixel = (s.pools + 1) * s.channels;
  const int64_t blocks = (s.channels + kChannelBlock - 1) / kChannelBlock;
  parallel_for(s.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffers;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = (task % blocks) * kChannelBlock;
      const PaddedImage g{s.height, s.width, std::min(kChannelBlock, s.channels - c0), s.kernel / 2};
      chain(ops, s, g, x + n * pixels * s.channels + c0, s.channels, out + n * pixels * out_pixel + c0, out_pixel,
            s.channels, buffers);
    }
  });
}

}  // namespace

void chained_max_pools(const KernelOps& ops, const ChainedPoolShape& s, const float* x, float* out,
                       const ParallelFor& parallel_for) {
  if (s.batch <= 0 || s.channels <= 0 || s.height <= 0 || s.width <= 0) return;
  if (s.nhwc)
    nhwc_pools(ops, s, x, out, parallel_for);
  else
    nchw_pools(ops, s, x, out, parallel_for);
}

void chained_max_pools(const ChainedPoolShape& s, const float* x, float* out, const ParallelFor& parallel_for) {
  chained_max_pools(select_float_kernel(), s, x, out, parallel_for);
}

}  // namespace xnorconv
