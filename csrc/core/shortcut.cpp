// The real-valued shortcut (xnorconv_core.h says what it computes): the window mean and the channel mapping in one
// pass over memory, where eager PyTorch makes two to four (row sums, column sums, the scale, then a channel mean or
// k copies into strided views). Contiguous inner loops that the auto-vectoriser handles at the baseline ISA, so this
// file has no ISA flags; the stride-2 NCHW windows, whose even/odd pairs it vectorises poorly there, run the selected
// family's window_means (window_means_kernel.h).
//
// Every layout adds in the same order, so NCHW and NHWC give the same bits: each input channel's window sum
// ((x[r][c] + x[r + 1][c]) + (x[r][c + 1] + x[r + 1][c + 1])) times 1 / (pixels in the window), then those of the
// output channel's input channels added in channel order and multiplied by 1 / (their count).
#include <algorithm>
#include <cstring>
#include <vector>

#include "output_stage.h"
#include "xnorconv_core.h"

namespace xnorconv {

namespace {

// Output elements per task: enough to amortise a task, few enough to split a single image over the threads.
constexpr int64_t kElementsPerTask = 16384;

// The input channels output channel o averages: [begin, end), one channel when the shortcut widens; scale is
// 1 / (end - begin), computed once per call rather than per output.
struct ChannelRange {
  int64_t begin, end;
  float scale;
};

std::vector<ChannelRange> channel_ranges(int64_t in, int64_t out) {
  std::vector<ChannelRange> ranges(static_cast<size_t>(out));
  for (int64_t o = 0; o < out; ++o) {
    const ShortcutChannels c = shortcut_channels(in, out, o);
    ranges[o] = {c.begin, c.end, 1.0f / static_cast<float>(c.end - c.begin)};
  }
  return ranges;
}

int64_t pooled_size(int64_t size, int64_t stride) { return (size + stride - 1) / stride; }

// The full windows of one output row from input rows top and bottom: the family's vector loop, or the portable one.
void full_windows(const KernelOps& ops, const float* top, const float* bottom, float scale, bool accumulate,
                  float* out, int64_t count) {
  if (ops.window_means) {
    ops.window_means(top, bottom, scale, accumulate, out, count);
    return;
  }
  for (int64_t j = 0; j < count; ++j) {
    const float y = ((top[2 * j] + bottom[2 * j]) + (top[2 * j + 1] + bottom[2 * j + 1])) * scale;
    out[j] = accumulate ? out[j] + y : y;
  }
}

// One output plane (image n, the input channels of `range`) of an NCHW shortcut into dst.
void nchw_plane(const KernelOps& ops, const ShortcutShape& s, const float* image, ChannelRange range, float* dst) {
  const int64_t h = s.height, w = s.width, plane = h * w;
  const float channel_scale = range.scale;
  if (s.stride == 1) {
    const float* first = image + range.begin * plane;
    const int64_t count = range.end - range.begin;
    if (count == 1) {
      std::memcpy(dst, first, sizeof(float) * plane);
    } else if (count == 2) {
      const float* second = first + plane;
      for (int64_t p = 0; p < plane; ++p) dst[p] = (first[p] + second[p]) * channel_scale;
    } else {
      for (int64_t p = 0; p < plane; ++p) dst[p] = first[p] + first[plane + p];
      for (int64_t c = 2; c < count - 1; ++c)
        for (int64_t p = 0; p < plane; ++p) dst[p] += first[c * plane + p];
      const float* last = first + (count - 1) * plane;
      for (int64_t p = 0; p < plane; ++p) dst[p] = (dst[p] + last[p]) * channel_scale;
    }
    return;
  }
  const int64_t oh = pooled_size(h, 2), ow = pooled_size(w, 2), full_columns = w / 2;
  // Each window sum straight from the input rows; a later channel of the range adds its means to the first's.
  for (int64_t i = 0; i < oh; ++i) {
    const bool two_rows = 2 * i + 1 < h;
    const float full_scale = two_rows ? 0.25f : 0.5f, edge_scale = two_rows ? 0.5f : 1.0f;
    float* out = dst + i * ow;
    for (int64_t c = range.begin; c < range.end; ++c) {
      const float* top = image + c * plane + 2 * i * w;
      const float* bottom = top + w;
      const bool first = c == range.begin;
      if (two_rows) {
        full_windows(ops, top, bottom, full_scale, !first, out, full_columns);
      } else if (first) {
        for (int64_t j = 0; j < full_columns; ++j) out[j] = (top[2 * j] + top[2 * j + 1]) * full_scale;
      } else {
        for (int64_t j = 0; j < full_columns; ++j) out[j] += (top[2 * j] + top[2 * j + 1]) * full_scale;
      }
      if (full_columns < ow) {  // odd right edge: one column
        const float edge = (two_rows ? top[w - 1] + bottom[w - 1] : top[w - 1]) * edge_scale;
        out[ow - 1] = first ? edge : out[ow - 1] + edge;
      }
    }
    if (range.end - range.begin > 1)
      for (int64_t j = 0; j < ow; ++j) out[j] *= channel_scale;
  }
}

void nchw_shortcut(const KernelOps& ops, const ShortcutShape& s, const float* x, float* out,
                   const ParallelFor& parallel_for) {
  const std::vector<ChannelRange> ranges = channel_ranges(s.in_channels, s.out_channels);
  // Output channels that copy the same input channel (a widening shortcut) form one run: computed once, copied.
  std::vector<int64_t> run_starts;
  for (int64_t o = 0; o < s.out_channels; ++o)
    if (o == 0 || ranges[o].begin != ranges[o - 1].begin || ranges[o].end != ranges[o - 1].end) run_starts.push_back(o);
  run_starts.push_back(s.out_channels);
  const int64_t runs = static_cast<int64_t>(run_starts.size()) - 1;
  const int64_t in_image = s.in_channels * s.height * s.width;
  const int64_t out_plane = pooled_size(s.height, s.stride) * pooled_size(s.width, s.stride);
  const int64_t run_elements = out_plane * std::max<int64_t>(1, s.out_channels / std::max<int64_t>(1, runs));
  parallel_for(s.batch * runs, std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, run_elements)),
               [&](int64_t begin, int64_t end) {
                 for (int64_t task = begin; task < end; ++task) {
                   const int64_t n = task / runs, run = task % runs;
                   const int64_t first = run_starts[run], last = run_starts[run + 1];
                   float* dst = out + (n * s.out_channels + first) * out_plane;
                   nchw_plane(ops, s, x + n * in_image, ranges[first], dst);
                   for (int64_t o = first + 1; o < last; ++o)
                     std::memcpy(dst + (o - first) * out_plane, dst, sizeof(float) * out_plane);
                 }
               });
}

// NHWC: a row of output pixels at a time. The window means of every input channel go to a row buffer (stride 2), and
// the channel mapping then runs over the whole row as one flat array wherever it is uniform: with C = k * O, output
// value q of the row is the mean of the row's values k * q ... k * q + k - 1 (the channels of one pixel are
// consecutive, and so are the pixels); with O = k * C, output values k * q ... k * q + k - 1 copy value q.
void map_channels(const float* means, int64_t pixels, int64_t cin, int64_t cout,
                  const std::vector<ChannelRange>& ranges, float* dst) {
  if (cin == cout) {
    std::memcpy(dst, means, sizeof(float) * pixels * cin);
  } else if (cin % cout == 0) {
    const int64_t k = cin / cout, values = pixels * cout;
    const float scale = 1.0f / static_cast<float>(k);
    if (k == 2) {
      for (int64_t q = 0; q < values; ++q) dst[q] = (means[2 * q] + means[2 * q + 1]) * scale;
    } else {
      for (int64_t q = 0; q < values; ++q) {
        const float* group = means + k * q;
        float total = group[0];
        for (int64_t j = 1; j < k; ++j) total += group[j];
        dst[q] = total * scale;
      }
    }
  } else if (cout % cin == 0) {
    const int64_t k = cout / cin, values = pixels * cin;
    if (k == 2) {
      for (int64_t q = 0; q < values; ++q) dst[2 * q] = dst[2 * q + 1] = means[q];
    } else {
      for (int64_t q = 0; q < values; ++q)
        for (int64_t j = 0; j < k; ++j) dst[k * q + j] = means[q];
    }
  } else {
    for (int64_t p = 0; p < pixels; ++p, means += cin, dst += cout) {
      for (int64_t o = 0; o < cout; ++o) {
        const ChannelRange r = ranges[o];
        float total = means[r.begin];
        for (int64_t c = r.begin + 1; c < r.end; ++c) total += means[c];
        dst[o] = r.end - r.begin > 1 ? total * r.scale : total;
      }
    }
  }
}

// The 2x2 window means of input rows i and i + 1 (just row i at an odd bottom edge), every channel, into means.
void nhwc_window_row(const float* top, bool two_rows, int64_t w, int64_t cin, float* means) {
  const float* bottom = top + w * cin;
  const int64_t full_columns = w / 2;
  const float scale = two_rows ? 0.25f : 0.5f;
  for (int64_t j = 0; j < full_columns; ++j, top += 2 * cin, bottom += 2 * cin, means += cin) {
    const float *right = top + cin, *bottom_right = bottom + cin;
    if (two_rows) {
      for (int64_t c = 0; c < cin; ++c) means[c] = ((top[c] + bottom[c]) + (right[c] + bottom_right[c])) * scale;
    } else {
      for (int64_t c = 0; c < cin; ++c) means[c] = (top[c] + right[c]) * scale;
    }
  }
  if (full_columns * 2 < w) {  // odd right edge: one column
    if (two_rows) {
      for (int64_t c = 0; c < cin; ++c) means[c] = (top[c] + bottom[c]) * 0.5f;
    } else {
      std::memcpy(means, top, sizeof(float) * cin);
    }
  }
}

void nhwc_shortcut(const ShortcutShape& s, const float* x, float* out, const ParallelFor& parallel_for) {
  const std::vector<ChannelRange> ranges = channel_ranges(s.in_channels, s.out_channels);
  const int64_t cin = s.in_channels, cout = s.out_channels, h = s.height, w = s.width;
  const int64_t oh = pooled_size(h, s.stride), ow = pooled_size(w, s.stride);
  parallel_for(s.batch * oh, std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, ow * cout)),
               [&](int64_t begin, int64_t end) {
                 std::vector<float> means(s.stride == 2 ? static_cast<size_t>(ow * cin) : 0);
                 for (int64_t task = begin; task < end; ++task) {
                   const int64_t n = task / oh, i = task % oh;
                   const float* row = x + (n * h + i * s.stride) * w * cin;
                   if (s.stride == 2) {
                     nhwc_window_row(row, 2 * i + 1 < h, w, cin, means.data());
                     row = means.data();
                   }
                   map_channels(row, ow, cin, cout, ranges, out + task * ow * cout);
                 }
               });
}

}  // namespace

void real_shortcut(const KernelOps& ops, const ShortcutShape& s, const float* x, float* out,
                   const ParallelFor& parallel_for) {
  if (s.batch <= 0 || s.in_channels <= 0 || s.out_channels <= 0 || s.height <= 0 || s.width <= 0) return;
  if (s.nhwc)
    nhwc_shortcut(s, x, out, parallel_for);
  else
    nchw_shortcut(ops, s, x, out, parallel_for);
}

void real_shortcut(const ShortcutShape& s, const float* x, float* out, const ParallelFor& parallel_for) {
  real_shortcut(select_float_kernel(), s, x, out, parallel_for);
}

}  // namespace xnorconv
