// The float first layer (xnorconv_core.h says what it computes): what every family shares, which is the checks, the
// tasks, and the operands in the form the arithmetic wants (weights regrouped in the family's channel blocks, input
// rows zero-padded and split by column phase). The arithmetic is each family's first_layer_rows
// (first_layer_kernel.h), so this file has no ISA flags.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "xnorconv_core.h"
#include "max_pool_rows.h"

namespace xnorconv {

namespace {

// Outputs per task: enough to amortise the input rows a task prepares (kernel_h - stride_h of them again for the
// next task), few enough to split one image between the threads.
constexpr int64_t kOutputsPerTask = 16384;

// The weight, bias and slopes in blocks of `channels` output channels: weight[block][c][i][j][channel], zero past
// out_channels, so a block's inner loop reads consecutive broadcasts and never tests for a partial block.
struct BlockedOperands {
  std::vector<float> weight, bias, slope;
};

BlockedOperands blocked_operands(const FirstLayerCall& call, int channels) {
  const FirstLayerShape& s = call.shape;
  const int64_t blocks = (s.out_channels + channels - 1) / channels, taps = s.kernel_h * s.kernel_w;
  const int64_t per_channel = s.in_channels * taps;
  BlockedOperands b;
  b.weight.assign(static_cast<size_t>(blocks * per_channel * channels), 0.0f);
  b.bias.assign(static_cast<size_t>(blocks * channels), 0.0f);
  if (call.slope) b.slope.assign(static_cast<size_t>(blocks * channels), 1.0f);
  for (int64_t o = 0; o < s.out_channels; ++o) {
    const int64_t block = o / channels, lane = o % channels;
    for (int64_t t = 0; t < per_channel; ++t)
      b.weight[static_cast<size_t>((block * per_channel + t) * channels + lane)] = call.weight[o * per_channel + t];
    if (call.bias) b.bias[static_cast<size_t>(o)] = call.bias[o];
    if (call.slope) b.slope[static_cast<size_t>(o)] = call.slope[o];
  }
  return b;
}

// The first multiple-of-`step` index at or above `a` (0 for a <= 0), for counting columns.
int64_t first_at_or_above(int64_t a, int64_t step) { return a <= 0 ? 0 : (a + step - 1) / step; }

// Input rows [first_row, first_row + row_count) of image n (rows counted from -pad_h), zero-padded and split by
// column phase into `rows` (the FirstLayerRows layout). Each phase row is zeros, a strided copy, zeros.
void prepare_rows(const FirstLayerCall& call, int64_t n, int64_t first_row, int64_t row_count, int64_t row_width,
                  float* rows) {
  const FirstLayerShape& s = call.shape;
  const int64_t phases = s.stride_w, pixel_stride = s.channels_last ? s.in_channels : 1;
  for (int64_t c = 0; c < s.in_channels; ++c)
    for (int64_t r = 0; r < row_count; ++r) {
      const int64_t y = first_row + r;
      float* dst = rows + (c * row_count + r) * phases * row_width;
      if (y < 0 || y >= s.height) {
        std::fill(dst, dst + phases * row_width, 0.0f);
        continue;
      }
      const float* const src = call.input + (s.channels_last ? (n * s.height + y) * s.width * s.in_channels + c
                                                             : ((n * s.in_channels + c) * s.height + y) * s.width);
      for (int64_t phase = 0; phase < phases; ++phase, dst += row_width) {
        // Position j holds column j * phases + phase - pad_w: the columns inside the image are [begin, end).
        const int64_t begin = std::min(row_width, first_at_or_above(s.pad_w - phase, phases));
        const int64_t end = std::max(begin, std::min(row_width, first_at_or_above(s.width + s.pad_w - phase, phases)));
        std::fill(dst, dst + begin, 0.0f);
        const float* const from = src + (begin * phases + phase - s.pad_w) * pixel_stride;
        const int64_t step = phases * pixel_stride, count = end - begin;
        if (step == 1) {
          std::memcpy(dst + begin, from, sizeof(float) * static_cast<size_t>(count));
        } else if (step == 2) {  // an NCHW stride-2 stem: a constant step, which the compiler vectorises
          for (int64_t j = 0; j < count; ++j) dst[begin + j] = from[2 * j];
        } else {
          for (int64_t j = 0; j < count; ++j) dst[begin + j] = from[j * step];
        }
        std::fill(dst + end, dst + row_width, 0.0f);
      }
    }
}

}  // namespace

std::string validate(const FirstLayerShape& s) {
  const auto value = [](const char* name, int64_t v) { return std::string(name) + " = " + std::to_string(v); };
  if (s.batch < 0) return "batch must be >= 0, got " + value("batch", s.batch);
  for (const auto& [name, v] : {std::pair<const char*, int64_t>{"in_channels", s.in_channels},
                                {"height", s.height},
                                {"width", s.width},
                                {"out_channels", s.out_channels},
                                {"kernel_h", s.kernel_h},
                                {"kernel_w", s.kernel_w},
                                {"stride_h", s.stride_h},
                                {"stride_w", s.stride_w},
                                {"dilation_h", s.dilation_h},
                                {"dilation_w", s.dilation_w}})
    if (v < 1) return std::string(name) + " must be positive, got " + value(name, v);
  if (s.pad_h < 0 || s.pad_w < 0)
    return "padding must be >= 0, got " + value("pad_h", s.pad_h) + ", " + value("pad_w", s.pad_w);
  if (s.kernel_h * s.kernel_w > kMaxTaps)
    return "kernel_h * kernel_w must be at most " + std::to_string(kMaxTaps) + ", got " +
           std::to_string(s.kernel_h * s.kernel_w);
  if (s.out_height() < 1 || s.out_width() < 1)
    return "the kernel (with dilation) is larger than the padded input: output size " +
           std::to_string(s.out_height()) + " x " + std::to_string(s.out_width());
  return {};
}

namespace {

// The layer's output rows in bands of rows_per_task, each written straight to out.
void unpooled(const KernelOps& ops, const FirstLayerCall& call, const BlockedOperands& blocked, int64_t row_width,
              const ParallelFor& parallel_for) {
  const FirstLayerShape& s = call.shape;
  const int64_t out_h = s.out_height(), out_w = s.out_width();
  const int64_t rows_per_task =
      std::clamp<int64_t>(kOutputsPerTask / std::max<int64_t>(1, out_w * s.out_channels), 1, out_h);
  const int64_t bands = (out_h + rows_per_task - 1) / rows_per_task;
  parallel_for(s.batch * bands, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> rows;  // kept between calls: no allocation (and no page faults) per call
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / bands, row_begin = task % bands * rows_per_task;
      const int64_t row_end = std::min(out_h, row_begin + rows_per_task);
      const int64_t row_count = (row_end - 1 - row_begin) * s.stride_h + (s.kernel_h - 1) * s.dilation_h + 1;
      rows.resize(static_cast<size_t>(s.in_channels * row_count * s.stride_w * row_width));
      prepare_rows(call, n, row_begin * s.stride_h - s.pad_h, row_count, row_width, rows.data());
      float* const out = call.out + (s.channels_last ? (n * out_h + row_begin) * out_w * s.out_channels
                                                     : n * s.out_channels * out_h * out_w + row_begin * out_w);
      const FirstLayerRows operands{&call, blocked.weight.data(), blocked.bias.data(),
                                    call.slope ? blocked.slope.data() : nullptr, rows.data(), row_count, row_width,
                                    out, out_h};
      ops.first_layer_rows(operands, row_begin, row_end);
    }
  });
}

// Pooled output rows computed from this many of the layer's output rows at a time, at most (all channels): enough
// that carrying the rows two groups share costs little, few enough to stay in the core's L2 cache.
constexpr int64_t kPoolGroupOutputs = 65536;

// With a max pool: each task takes a band of one image's pooled rows and computes the layer's output rows they read
// group by group into a buffer (the output's layout, all channels), keeping the rows the next group reads too, and
// pools each group's rows from there.
void pooled(const KernelOps& ops, const FirstLayerCall& call, const BlockedOperands& blocked, int64_t row_width,
            const ParallelFor& parallel_for) {
  const FirstLayerShape& s = call.shape;
  const MaxPoolShape& ps = *call.pool;
  const int64_t out_h = s.out_height(), out_w = s.out_width(), oc = s.out_channels;
  const int64_t pooled_h = ps.out_height(), pooled_w = ps.out_width();
  // Bands per image: enough for every thread to have work, no more (each band computes its first rows again).
  const int64_t bands =
      std::clamp<int64_t>((call.threads + s.batch - 1) / s.batch, 1, std::max<int64_t>(1, pooled_h / 4));
  const int64_t band_rows = (pooled_h + bands - 1) / bands;
  const int64_t fitting = kPoolGroupOutputs / std::max<int64_t>(1, ps.stride_h * out_w * oc);
  const int64_t group = std::clamp<int64_t>(call.pool_group_rows > 0 ? call.pool_group_rows : fitting, 1, band_rows);
  // The layer's output rows pooled rows [p, p + count) read, clipped to the output.
  const auto first_read = [&](int64_t p) { return std::max<int64_t>(0, p * ps.stride_h - ps.pad_h); };
  const auto end_read = [&](int64_t p, int64_t count) {
    return std::min(out_h, (p + count - 1) * ps.stride_h - ps.pad_h + ps.kernel_h);
  };
  const int64_t buffer_rows = (group - 1) * ps.stride_h + ps.kernel_h;
  parallel_for(s.batch * bands, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> rows, buffer;
    buffer.resize(static_cast<size_t>(buffer_rows * out_w * oc));
    // NCHW: channel o's row at buffer[(o * buffer_rows + r) * out_w]; NHWC: row r at buffer[r * out_w * oc].
    const int64_t row_floats = s.channels_last ? out_w * oc : out_w;
    const int64_t planes = s.channels_last ? 1 : oc;
    MaxPoolRows pool(ops, ps, planes);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / bands, p_begin = task % bands * band_rows;
      const int64_t p_end = std::min(pooled_h, p_begin + band_rows);
      int64_t held_first = 0, held_end = 0;  // the output rows in the buffer, from its first row
      for (int64_t p = p_begin; p < p_end; p += group) {
        const int64_t count = std::min(group, p_end - p);
        const int64_t first = first_read(p), last = end_read(p, count);
        // Keep the held rows this group reads again: to the buffer's front.
        const int64_t kept = std::max<int64_t>(0, held_end - std::max(first, held_first));
        if (kept > 0 && first > held_first)
          for (int64_t plane = 0; plane < planes; ++plane) {
            float* const base = buffer.data() + plane * buffer_rows * row_floats;
            std::memmove(base, base + (held_end - kept - held_first) * row_floats,
                         sizeof(float) * static_cast<size_t>(kept * row_floats));
          }
        const int64_t row_begin = first + kept;
        if (row_begin < last) {
          const int64_t row_count = (last - 1 - row_begin) * s.stride_h + (s.kernel_h - 1) * s.dilation_h + 1;
          rows.resize(static_cast<size_t>(s.in_channels * row_count * s.stride_w * row_width));
          prepare_rows(call, n, row_begin * s.stride_h - s.pad_h, row_count, row_width, rows.data());
          const FirstLayerRows operands{&call, blocked.weight.data(), blocked.bias.data(),
                                        call.slope ? blocked.slope.data() : nullptr, rows.data(), row_count,
                                        row_width, buffer.data() + kept * row_floats, buffer_rows};
          ops.first_layer_rows(operands, row_begin, last);
        }
        held_first = first;
        held_end = last;
        for (int64_t q = p; q < p + count; ++q) {
          const int64_t at = s.channels_last ? (n * pooled_h + q) * pooled_w * oc : (n * oc * pooled_h + q) * pooled_w;
          pool.row(buffer.data(), held_first, row_floats, q, call.out + at, buffer_rows * row_floats,
                   pooled_h * pooled_w);
        }
      }
    }
  });
}

}  // namespace

std::string validate_pool(const FirstLayerShape& s, const MaxPoolShape& pool) {
  if (pool.batch != s.batch || pool.channels != s.out_channels || pool.height != s.out_height() ||
      pool.width != s.out_width() || pool.nhwc != s.channels_last)
    return "the pool's input must be the layer's output (batch " + std::to_string(s.batch) + ", " +
           std::to_string(s.out_channels) + " channels, " + std::to_string(s.out_height()) + " x " +
           std::to_string(s.out_width()) + (s.channels_last ? ", NHWC" : ", NCHW") + "), got batch " +
           std::to_string(pool.batch) + ", " + std::to_string(pool.channels) + " channels, " +
           std::to_string(pool.height) + " x " + std::to_string(pool.width) + (pool.nhwc ? ", NHWC" : ", NCHW");
  return validate(pool);
}

void first_layer_conv(const KernelOps& ops, const FirstLayerCall& call, const ParallelFor& parallel_for) {
  const FirstLayerShape& s = call.shape;
  if (s.batch == 0) return;
  const BlockedOperands blocked = blocked_operands(call, ops.first_layer_channels);
  // Tap column j*dilation_w of output pixel x is phase (j*dilation_w) % stride_w at x + (j*dilation_w) / stride_w;
  // a block starting at any pixel of the row reads at most first_layer_pixels positions from there, so no read
  // runs past the row.
  const int64_t row_width = s.out_width() + ops.first_layer_pixels + (s.kernel_w - 1) * s.dilation_w / s.stride_w;
  if (call.pool)
    pooled(ops, call, blocked, row_width, parallel_for);
  else
    unpooled(ops, call, blocked, row_width, parallel_for);
}

}  // namespace xnorconv
