// Max pooling (xnorconv_core.h says what each computes): SPPF's chained pools with their concatenation, and
// max_pool2d, the strided pool after a network's stem. Each runs one pass over memory per pool: eager PyTorch
// converts SPPF to channels_last and back (its NCHW max pooling is many times slower), pools twice per pool through
// max_pool2d_with_indices and concatenates, and its strided pool keeps an index per output. Memory-bound loops over
// contiguous rows (NCHW) or channels (NHWC), which the auto-vectoriser handles at the baseline ISA, so this file has
// no ISA flags; the window maxima run the selected family's window_max where it has one (AVX-512).
#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "xnorconv_core.h"
#include "max_pool_rows.h"

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

// ---- max_pool2d ----

namespace {

int64_t floor_div(int64_t a, int64_t b) { return a / b - (a % b != 0 && (a < 0) != (b < 0)); }

// PyTorch's pooling_output_shape with dilation 1.
int64_t pooled_size(int64_t in, int64_t kernel, int64_t pad, int64_t stride, bool ceil_mode) {
  int64_t out = floor_div(in + 2 * pad - kernel + (ceil_mode ? stride - 1 : 0), stride) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;  // the last window must start inside the image
  return out;
}

void floor_at_zero(float* out, int64_t count) {
  for (int64_t e = 0; e < count; ++e) out[e] = out[e] < 0.0f ? 0.0f : out[e];  // NaN < 0 is false: NaN stays
}

}  // namespace

// NCHW rows: 3-wide windows at stride 2 (a stem's pool) are one stride2_width3_pool_row where the family has it,
// straight from the input rows; else the column maxima go into a padded row first, and with stride 1 its windows
// are one window_max, with stride 2 one stride2_window_max where the family has it; otherwise the padded row is
// split by column phase (phase r holds padded pixels r, r + stride, ...), where a window's taps of one phase are
// consecutive: each phase's window maxima, then the maximum over the phases.
// NHWC rows: one window_max over the channels of each output pixel.
MaxPoolRows::MaxPoolRows(const KernelOps& ops, const MaxPoolShape& s, int64_t planes)
    : ops_(ops), s_(s), depth_(s.nhwc ? s.channels : 1), planes_(planes) {
  const int64_t out_w = s.out_width(), sw = s.stride_w;
  pixels_ = std::max((out_w - 1) * sw + s.kernel_w, s.pad_w + 1);
  interior_ = std::min(s.width, pixels_ - s.pad_w);
  phase_length_ = out_w + (s.kernel_w - 1) / sw;  // phase pixels any window reads
  phases_ = std::min(sw, s.kernel_w);             // phases with taps
  phase_split_ = !s.nhwc && (sw > 2 || (sw == 2 && !ops.stride2_window_max));
  fused_row_ = !s.nhwc && sw == 2 && s.kernel_w == 3 && s.kernel_h <= kMaxFusedRows && ops.stride2_width3_pool_row;
  if (fused_row_) return;  // no scratch
  // -inf in the padding, never overwritten.
  padded_.assign(static_cast<size_t>(planes * pixels_ * depth_), -std::numeric_limits<float>::infinity());
  if (phase_split_) {
    split_.resize(static_cast<size_t>(phases_ * phase_length_));
    maxima_.resize(static_cast<size_t>(phases_ * out_w));
  }
}

void MaxPoolRows::row(const float* rows, int64_t first_row, int64_t row_stride, int64_t oy, float* out,
                      int64_t plane_stride, int64_t out_plane_stride) {
  const MaxPoolShape& s = s_;
  const int64_t out_w = s.out_width(), sw = s.stride_w, depth = depth_;
  const int64_t top = oy * s.stride_h - s.pad_h;
  const int64_t first = std::max<int64_t>(top, 0), last = std::min(top + s.kernel_h, s.height);  // rows in the image
  if (fused_row_) {
    // Column and row maxima in registers, from the input rows: no padded row in between.
    for (int64_t plane = 0; plane < planes_; ++plane) {
      const float* window_rows[kMaxFusedRows];
      for (int64_t y = first; y < last; ++y)
        window_rows[y - first] = rows + plane * plane_stride + (y - first_row) * row_stride;
      ops_.stride2_width3_pool_row(window_rows, last - first, s.width, s.pad_w, out + plane * out_plane_stride,
                                   out_w, s.relu);
    }
    return;
  }
  // The maxima down the columns of the window's rows inside the image, into the padded rows: every plane's before
  // any is pooled along the row, so that those reads do not wait on the stores just made.
  for (int64_t plane = 0; plane < planes_; ++plane)
    window_max(ops_, rows + plane * plane_stride + (first - first_row) * row_stride,
               padded_.data() + (plane * pixels_ + s.pad_w) * depth, interior_ * depth, row_stride, last - first);
  for (int64_t plane = 0; plane < planes_; ++plane) {
    const float* const padded = padded_.data() + plane * pixels_ * depth;
    float* const dst = out + plane * out_plane_stride;
    if (s.nhwc) {
      if (sw == 1) {
        window_max(ops_, padded, dst, out_w * depth, depth, s.kernel_w);
      } else {
        for (int64_t ox = 0; ox < out_w; ++ox)
          window_max(ops_, padded + ox * sw * depth, dst + ox * depth, depth, depth, s.kernel_w);
      }
    } else if (sw == 1) {
      window_max(ops_, padded, dst, out_w, 1, s.kernel_w);
    } else if (!phase_split_) {
      ops_.stride2_window_max(padded, dst, out_w, s.kernel_w);
    } else {
      for (int64_t r = 0; r < phases_; ++r) {
        float* phase = split_.data() + r * phase_length_;
        const int64_t taps = (s.kernel_w - r + sw - 1) / sw;
        for (int64_t j = 0; j < out_w + taps - 1; ++j) phase[j] = padded[j * sw + r];
        window_max(ops_, phase, maxima_.data() + r * out_w, out_w, 1, taps);
      }
      window_max(ops_, maxima_.data(), dst, out_w, out_w, phases_);
    }
    if (s.relu) floor_at_zero(dst, out_w * depth);
  }
}

namespace {

void nhwc_max_pool(const KernelOps& ops, const MaxPoolShape& s, const float* x, float* out,
                   const ParallelFor& parallel_for) {
  const int64_t out_h = s.out_height(), out_w = s.out_width(), c = s.channels;
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, out_w * c));
  parallel_for(s.batch * out_h, grain, [&](int64_t begin, int64_t end) {
    MaxPoolRows pool(ops, s);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / out_h, oy = task % out_h;
      pool.row(x + n * s.height * s.width * c, 0, s.width * c, oy, out + task * out_w * c);
    }
  });
}

void nchw_max_pool(const KernelOps& ops, const MaxPoolShape& s, const float* x, float* out,
                   const ParallelFor& parallel_for) {
  const int64_t out_h = s.out_height(), out_w = s.out_width();
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, out_w));
  parallel_for(s.batch * s.channels * out_h, grain, [&](int64_t begin, int64_t end) {
    MaxPoolRows pool(ops, s);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t plane = task / out_h, oy = task % out_h;
      pool.row(x + plane * s.height * s.width, 0, s.width, oy, out + task * out_w);
    }
  });
}

}  // namespace

int64_t MaxPoolShape::out_height() const { return pooled_size(height, kernel_h, pad_h, stride_h, ceil_mode); }
int64_t MaxPoolShape::out_width() const { return pooled_size(width, kernel_w, pad_w, stride_w, ceil_mode); }

std::string validate(const MaxPoolShape& s) {
  const auto value = [](const char* name, int64_t v) { return std::string(name) + " = " + std::to_string(v); };
  for (const auto& [name, v] : {std::pair<const char*, int64_t>{"batch", s.batch},
                                {"channels", s.channels},
                                {"height", s.height},
                                {"width", s.width}})
    if (v < 0) return std::string(name) + " must be >= 0, got " + value(name, v);
  for (const auto& [name, v] : {std::pair<const char*, int64_t>{"kernel_h", s.kernel_h},
                                {"kernel_w", s.kernel_w},
                                {"stride_h", s.stride_h},
                                {"stride_w", s.stride_w}})
    if (v < 1) return std::string(name) + " must be positive, got " + value(name, v);
  if (s.pad_h < 0 || s.pad_w < 0 || 2 * s.pad_h > s.kernel_h || 2 * s.pad_w > s.kernel_w)
    return "padding must be >= 0 and at most half the kernel size, got " + value("pad_h", s.pad_h) + ", " +
           value("pad_w", s.pad_w) + " for " + value("kernel_h", s.kernel_h) + ", " + value("kernel_w", s.kernel_w);
  if (s.height < 1 || s.width < 1 || s.out_height() < 1 || s.out_width() < 1)
    return "the kernel is larger than the padded input (" + value("height", s.height) + ", " +
           value("width", s.width) + "): output size " + std::to_string(s.out_height()) + " x " +
           std::to_string(s.out_width());
  return {};
}

void max_pool2d(const KernelOps& ops, const MaxPoolShape& s, const float* x, float* out,
                const ParallelFor& parallel_for) {
  if (s.batch == 0 || s.channels == 0) return;
  if (s.nhwc)
    nhwc_max_pool(ops, s, x, out, parallel_for);
  else
    nchw_max_pool(ops, s, x, out, parallel_for);
}

void max_pool2d(const MaxPoolShape& s, const float* x, float* out, const ParallelFor& parallel_for) {
  max_pool2d(select_float_kernel(), s, x, out, parallel_for);
}

// ---- dequantize_max_pool2d ----

namespace {

// Output row oy of one image's levels (NHWC, `s`'s geometry) as window maxima: for each output pixel, its channels'
// maxima over the window's taps inside the image (a level is never below 0, so padding could not win), in chunks of
// 64 channels, each over all the taps before it is stored. Plain arguments and restrict pointers: stores of bytes may
// alias anything, so bounds read through a reference would be reloaded after every store, and the loops would not
// vectorise.
void level_window_maxima(const uint8_t* __restrict image, uint8_t* __restrict maxima, int64_t oy, int64_t height,
                         int64_t width, int64_t c, int64_t out_w, int64_t kernel_h, int64_t kernel_w,
                         int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w) {
  constexpr int64_t kChunk = 64;
  const int64_t y0 = std::max<int64_t>(0, oy * stride_h - pad_h);
  const int64_t y1 = std::min(height, oy * stride_h - pad_h + kernel_h);
  for (int64_t ox = 0; ox < out_w; ++ox) {
    const int64_t x0 = std::max<int64_t>(0, ox * stride_w - pad_w);
    const int64_t x1 = std::min(width, ox * stride_w - pad_w + kernel_w);
    const uint8_t* const first = image + (y0 * width + x0) * c;
    for (int64_t e0 = 0; e0 < c; e0 += kChunk) {
      const int64_t count = std::min(kChunk, c - e0);
      uint8_t m[kChunk];
      std::memcpy(m, first + e0, static_cast<size_t>(count));
      for (int64_t y = y0; y < y1; ++y)
        for (int64_t x = y == y0 ? x0 + 1 : x0; x < x1; ++x) {
          const uint8_t* __restrict const tap = image + (y * width + x) * c + e0;
          if (count == kChunk) {
            for (int64_t e = 0; e < kChunk; ++e) m[e] = m[e] < tap[e] ? tap[e] : m[e];
          } else {
            for (int64_t e = 0; e < count; ++e) m[e] = m[e] < tap[e] ? tap[e] : m[e];
          }
        }
      std::memcpy(maxima + ox * c + e0, m, static_cast<size_t>(count));
    }
  }
}

// scale * (level - zero_point) for `count` consecutive levels: the product of a float and a small integer, rounded
// once, which is what PyTorch's dequantize computes.
void dequantize_levels(const uint8_t* __restrict levels, float* __restrict dst, int64_t count, float scale,
                       int32_t zero_point) {
  for (int64_t e = 0; e < count; ++e)
    dst[e] = scale * static_cast<float>(static_cast<int32_t>(levels[e]) - zero_point);
}

// Bytes (i, j) = from[i * from_stride + j] into to[j * to_stride + i], for i, j < 8: eight 64-bit rows (byte j of
// row i is element (i, j) on the little-endian CPUs built for), the off-diagonal blocks of 4, then of 2, then of 1
// swapped by masked shifts. A byte at a time, the transpose took longer than the pool and the conversion together.
inline void transpose_8x8(const uint8_t* from, int64_t from_stride, uint8_t* to, int64_t to_stride) {
  uint64_t a[8];
  for (int i = 0; i < 8; ++i) std::memcpy(&a[i], from + i * from_stride, sizeof(uint64_t));
  const auto swap = [&a](int i, int d, int shift, uint64_t mask) {
    const uint64_t t = ((a[i] >> shift) ^ a[i + d]) & mask;
    a[i] ^= t << shift;
    a[i + d] ^= t;
  };
  for (int i = 0; i < 4; ++i) swap(i, 4, 32, 0x00000000FFFFFFFFull);
  for (int i : {0, 1, 4, 5}) swap(i, 2, 16, 0x0000FFFF0000FFFFull);
  for (int i : {0, 2, 4, 6}) swap(i, 1, 8, 0x00FF00FF00FF00FFull);
  for (int i = 0; i < 8; ++i) std::memcpy(to + i * to_stride, &a[i], sizeof(uint64_t));
}

// [pixels][c] bytes into [c][pixels], so that each NCHW channel row dequantizes from consecutive levels: 8x8 blocks,
// then the edges a byte at a time.
void transpose_levels(const uint8_t* __restrict from, uint8_t* __restrict to, int64_t pixels, int64_t c) {
  const int64_t whole_pixels = pixels / 8 * 8, whole_channels = c / 8 * 8;
  for (int64_t p = 0; p < whole_pixels; p += 8)
    for (int64_t ch = 0; ch < whole_channels; ch += 8)
      transpose_8x8(from + p * c + ch, c, to + ch * pixels + p, pixels);
  for (int64_t ch = 0; ch < c; ++ch)
    for (int64_t p = ch < whole_channels ? whole_pixels : 0; p < pixels; ++p) to[ch * pixels + p] = from[p * c + ch];
}

}  // namespace

void dequantize_max_pool2d(const MaxPoolShape& s, const uint8_t* levels, float scale, int32_t zero_point, float* out,
                           const ParallelFor& parallel_for) {
  if (s.batch == 0 || s.channels == 0) return;
  const int64_t out_h = s.out_height(), out_w = s.out_width(), c = s.channels;
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, out_w * c));
  parallel_for(s.batch * out_h, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> maxima(static_cast<size_t>(out_w * c)), by_channel(s.nhwc ? 0 : maxima.size());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / out_h, oy = task % out_h;
      level_window_maxima(levels + n * s.height * s.width * c, maxima.data(), oy, s.height, s.width, c, out_w,
                          s.kernel_h, s.kernel_w, s.stride_h, s.stride_w, s.pad_h, s.pad_w);
      if (s.nhwc) {
        float* const row = out + task * out_w * c;
        dequantize_levels(maxima.data(), row, out_w * c, scale, zero_point);
        if (s.relu) floor_at_zero(row, out_w * c);
        continue;
      }
      transpose_levels(maxima.data(), by_channel.data(), out_w, c);
      for (int64_t ch = 0; ch < c; ++ch) {
        float* const row = out + ((n * c + ch) * out_h + oy) * out_w;
        dequantize_levels(by_channel.data() + ch * out_w, row, out_w, scale, zero_point);
        if (s.relu) floor_at_zero(row, out_w);
      }
    }
  });
}

}  // namespace xnorconv
