// Elementwise passes of the straight-through training path (xnorconv_core.h says what each computes). Each is one
// pass over memory where eager PyTorch makes four to seven, and all are memory-bound: 4-lane vectors at the
// baseline ISA (below) are as fast here as wider per-ISA code would be, so this file has no ISA flags.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "xnorconv_core.h"

namespace xnorconv {

namespace {

// Elements per task: enough to amortise a task, few enough to split a single image over the threads.
constexpr int64_t kElementsPerTask = 16384;
constexpr float kInfinity = std::numeric_limits<float>::infinity();

// Runs a pass over every element of the view and writes each channel's sum of what the pass adds up (added in
// double across tasks, in task order, so the result does not depend on the threads) to channel_sums, unless it is
// nullptr. Pass supplies the two loop shapes, both branch-free so that they vectorise:
//   float plane(c, first, count): NCHW (inner > 1), `count` consecutive elements of channel c from `first`;
//     returns their sum;
//   void row(first, sums): NHWC (inner == 1), one pixel's channels from `first`, adding each to sums[c].
// A task is a plane (or a chunk of a long one), or a block of pixels.
template <class Pass>
void channel_pass(ChannelView v, const Pass& pass, float* channel_sums, const ParallelFor& parallel_for) {
  const int64_t channels = v.channels;
  std::vector<double> sums(static_cast<size_t>(channels), 0.0);
  if (v.outer > 0 && channels > 0 && v.inner > 1) {
    const int64_t chunks_per_plane = (v.inner + kElementsPerTask - 1) / kElementsPerTask;
    const int64_t chunk = (v.inner + chunks_per_plane - 1) / chunks_per_plane;
    const int64_t tasks = v.outer * channels * chunks_per_plane;
    std::vector<float> partial(static_cast<size_t>(tasks));
    const int64_t grain = std::max<int64_t>(1, kElementsPerTask / chunk);
    parallel_for(tasks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t plane = task / chunks_per_plane;
        const int64_t first = plane * v.inner + (task % chunks_per_plane) * chunk;
        partial[task] = pass.plane(plane % channels, first, std::min(chunk, (plane + 1) * v.inner - first));
      }
    });
    for (int64_t task = 0; task < tasks; ++task) sums[(task / chunks_per_plane) % channels] += partial[task];
  } else if (v.outer > 0 && channels > 0 && v.inner == 1) {
    const int64_t rows_per_task = std::max<int64_t>(1, kElementsPerTask / channels);
    const int64_t tasks = (v.outer + rows_per_task - 1) / rows_per_task;
    std::vector<float> partial(static_cast<size_t>(tasks * channels), 0.0f);
    parallel_for(tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t last = std::min(v.outer, (task + 1) * rows_per_task);
        for (int64_t row = task * rows_per_task; row < last; ++row)
          pass.row(row * channels, partial.data() + task * channels);
      }
    });
    for (int64_t task = 0; task < tasks; ++task)
      for (int64_t c = 0; c < channels; ++c) sums[c] += partial[task * channels + c];
  }
  if (channel_sums) std::copy(sums.begin(), sums.end(), channel_sums);
}

// The passes are written once for a scalar and for a 4-lane vector (GCC / Clang vector extensions: SSE2 on any
// x86-64, NEON on aarch64), so that they vectorise without relying on the auto-vectoriser, which gives up on the
// selects and the reductions here. Memory-bound, so 4 lanes are enough.
using Vec4 = float __attribute__((vector_size(16)));
constexpr int64_t kVec = 4;

template <class T>
inline T load(const float* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class T>
inline void store(float* p, T v) {
  std::memcpy(p, &v, sizeof v);
}
template <class T>
inline T splat(float s) {
  return T{} + s;
}
// rows[k] = lanes of row k -> rows[j] = lane j of every row (a 4 x 4 transpose in registers).
inline void transpose4(Vec4 rows[4]) {
#if defined(__clang__)
  const Vec4 t0 = __builtin_shufflevector(rows[0], rows[1], 0, 4, 1, 5);
  const Vec4 t1 = __builtin_shufflevector(rows[0], rows[1], 2, 6, 3, 7);
  const Vec4 t2 = __builtin_shufflevector(rows[2], rows[3], 0, 4, 1, 5);
  const Vec4 t3 = __builtin_shufflevector(rows[2], rows[3], 2, 6, 3, 7);
  rows[0] = __builtin_shufflevector(t0, t2, 0, 1, 4, 5);
  rows[1] = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
  rows[2] = __builtin_shufflevector(t1, t3, 0, 1, 4, 5);
  rows[3] = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
#else
  using Mask = int32_t __attribute__((vector_size(16)));
  const Vec4 t0 = __builtin_shuffle(rows[0], rows[1], Mask{0, 4, 1, 5});
  const Vec4 t1 = __builtin_shuffle(rows[0], rows[1], Mask{2, 6, 3, 7});
  const Vec4 t2 = __builtin_shuffle(rows[2], rows[3], Mask{0, 4, 1, 5});
  const Vec4 t3 = __builtin_shuffle(rows[2], rows[3], Mask{2, 6, 3, 7});
  rows[0] = __builtin_shuffle(t0, t2, Mask{0, 1, 4, 5});
  rows[1] = __builtin_shuffle(t0, t2, Mask{2, 3, 6, 7});
  rows[2] = __builtin_shuffle(t1, t3, Mask{0, 1, 4, 5});
  rows[3] = __builtin_shuffle(t1, t3, Mask{2, 3, 6, 7});
#endif
}


// Runs step<T>(i, channel value) over `count` consecutive elements of one channel (NCHW plane), and returns the
// sum of what it returns, in four vector accumulators.
template <class Step>
inline float plane_loop(int64_t count, float channel_value, const Step& step) {
  const Vec4 value = splat<Vec4>(channel_value);
  Vec4 acc0{}, acc1{}, acc2{}, acc3{};
  int64_t i = 0;
  for (; i + 4 * kVec <= count; i += 4 * kVec) {
    acc0 += step(i, value);
    acc1 += step(i + kVec, value);
    acc2 += step(i + 2 * kVec, value);
    acc3 += step(i + 3 * kVec, value);
  }
  for (; i + kVec <= count; i += kVec) acc0 += step(i, value);
  const Vec4 acc = (acc0 + acc1) + (acc2 + acc3);
  float total = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  for (; i < count; ++i) total += step(i, channel_value);
  return total;
}

// Runs step<T>(c, channel values at c) over one pixel's channels (NHWC row), adding each result to sums[c].
template <class Step>
inline void row_loop(int64_t channels, const float* channel_values, float* sums, const Step& step) {
  int64_t c = 0;
  for (; c + kVec <= channels; c += kVec)
    store(sums + c, load<Vec4>(sums + c) + step(c, load<Vec4>(channel_values + c)));
  for (; c < channels; ++c) sums[c] += step(c, channel_values[c]);
}

// The same pass between an NCHW operand and an NHWC one (v: the NCHW view): one pass instead of a layout conversion
// and a pass. pass.tile(c, nchw_index, nhwc_index, acc) handles 4 channels x 4 pixels (4 vectors of 4 pixels on the
// NCHW side, 4 of 4 channels on the NHWC side, transposed in registers), adding channel c + j's results to acc[j];
// pass.cross(c, nchw_index, nhwc_index) one element, returning what it adds to channel c's sum. A task is a block
// of kCrossPixels pixels of one image, all channels: long enough that each channel's run on the NCHW side (1 KB)
// streams with the hardware prefetcher (32-pixel runs took three times as long), short enough that the block's
// NHWC lines stay in L1 while the 4 channel tiles that share them pass.
constexpr int64_t kCrossPixels = 256;

template <class Pass>
void cross_layout_pass(ChannelView v, const Pass& pass, float* channel_sums, const ParallelFor& parallel_for) {
  const int64_t channels = v.channels, pixels = v.inner;
  std::vector<double> sums(static_cast<size_t>(channels), 0.0);
  if (v.outer > 0 && channels > 0 && pixels > 0) {
    const int64_t blocks = (pixels + kCrossPixels - 1) / kCrossPixels;
    const int64_t tasks = v.outer * blocks;
    std::vector<float> partial(static_cast<size_t>(tasks * channels));
    const int64_t grain = std::max<int64_t>(1, kElementsPerTask / (kCrossPixels * channels));
    parallel_for(tasks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / blocks, first = (task % blocks) * kCrossPixels;
        const int64_t count = std::min(kCrossPixels, pixels - first);
        float* totals = partial.data() + task * channels;
        int64_t c = 0;
        for (; c + kVec <= channels; c += kVec) {  // 4 x 4 tiles
          const int64_t nchw = (n * channels + c) * pixels + first, nhwc = (n * pixels + first) * channels + c;
          Vec4 acc[kVec] = {};
          int64_t p = 0;
          for (; p + kVec <= count; p += kVec) pass.tile(c, nchw + p, nhwc + p * channels, acc);
          for (int64_t j = 0; j < kVec; ++j) {
            float total = (acc[j][0] + acc[j][1]) + (acc[j][2] + acc[j][3]);
            for (int64_t q = p; q < count; ++q)
              total += pass.cross(c + j, nchw + j * pixels + q, nhwc + q * channels + j);
            totals[c + j] = total;
          }
        }
        for (; c < channels; ++c) {  // the last channels, one at a time
          const int64_t nchw = (n * channels + c) * pixels + first, nhwc = (n * pixels + first) * channels + c;
          float total = 0.0f;
          for (int64_t p = 0; p < count; ++p) total += pass.cross(c, nchw + p, nhwc + p * channels);
          totals[c] = total;
        }
      }
    });
    for (int64_t task = 0; task < tasks; ++task)
      for (int64_t c = 0; c < channels; ++c) sums[c] += partial[task * channels + c];
  }
  if (channel_sums) std::copy(sums.begin(), sums.end(), channel_sums);
}

// x - t with t = 0 when there is no threshold is x itself (-0 - 0 = -0, NaN stays NaN), so one code path serves
// both; the passes get a zero per channel instead of a null threshold.
struct ChannelValues {
  std::vector<float> storage;
  const float* values;
  ChannelValues(const float* given, int64_t channels, float fill)
      : storage(given ? 0 : static_cast<size_t>(channels), fill), values(given ? given : storage.data()) {}
};

struct SignsPass {
  const float* x;
  const float* threshold;
  float* out;
  int64_t channels, pixels;  // pixels: of an image, for the cross-layout pass

  template <class T>
  T step(int64_t i, T t) const {  // -0.0 >= 0 is true; NaN gives -1
    store(out + i, load<T>(x + i) >= t ? splat<T>(1.0f) : splat<T>(-1.0f));
    return T{};
  }
  float plane(int64_t c, int64_t first, int64_t count) const {
    return plane_loop(count, threshold[c], [&](int64_t i, auto t) { return step(first + i, t); });
  }
  void row(int64_t first, float* sums) const {
    row_loop(channels, threshold, sums, [&](int64_t c, auto t) { return step(first + c, t); });
  }
  // x NCHW, out NHWC
  void tile(int64_t c, int64_t nchw, int64_t nhwc, Vec4*) const {
    Vec4 v[kVec];
    for (int64_t j = 0; j < kVec; ++j)
      v[j] = load<Vec4>(x + nchw + j * pixels) >= splat<Vec4>(threshold[c + j]) ? splat<Vec4>(1.0f)
                                                                                 : splat<Vec4>(-1.0f);
    transpose4(v);
    for (int64_t k = 0; k < kVec; ++k) store(out + nhwc + k * channels, v[k]);
  }
  float cross(int64_t c, int64_t nchw, int64_t nhwc) const {
    out[nhwc] = x[nchw] >= threshold[c] ? 1.0f : -1.0f;
    return 0.0f;
  }
};

template <SteKind kind, class T>
inline T ste_factor(T d) {
  const T zero = splat<T>(0.0f), one = splat<T>(1.0f);
  const T a = d < zero ? -d : d;  // -0.0 stays -0.0, which compares as 0
  if (kind == SteKind::clipped) return a <= one ? one : zero;  // NaN compares false: 0
  if (kind == SteKind::identity) return a < splat<T>(kInfinity) ? one : zero;  // 0 for NaN and +-inf
  const T slope = splat<T>(-2.0f) * a + splat<T>(2.0f);  // -2a is exact: rounds like 2 - 2|d|, FMA or not
  return slope > zero ? slope : zero;  // NaN and |d| >= 1 (infinities too) give 0
}

// A product, not a select: an infinite or NaN gradient times a zero factor stays NaN, as in the unfused form.
template <SteKind kind>
struct SteGradPass {
  const float* grad;
  const float* x;
  const float* threshold;
  float* out;
  int64_t channels, pixels;  // pixels: of an image, for the cross-layout pass

  template <class T>
  T step(int64_t i, T t) const {
    const T v = load<T>(grad + i) * ste_factor<kind>(load<T>(x + i) - t);
    store(out + i, v);
    return v;
  }
  float plane(int64_t c, int64_t first, int64_t count) const {
    return plane_loop(count, threshold[c], [&](int64_t i, auto t) { return step(first + i, t); });
  }
  void row(int64_t first, float* sums) const {
    row_loop(channels, threshold, sums, [&](int64_t c, auto t) { return step(first + c, t); });
  }
  // grad NHWC, x and out NCHW
  void tile(int64_t c, int64_t nchw, int64_t nhwc, Vec4* acc) const {
    Vec4 g[kVec], in[kVec];
    for (int64_t k = 0; k < kVec; ++k) g[k] = load<Vec4>(grad + nhwc + k * channels);
    // Every load before the first store: x and out have the same offsets within a page, so a load after a store
    // to the other tensor's matching address would wait for it (4K aliasing).
    for (int64_t j = 0; j < kVec; ++j) in[j] = load<Vec4>(x + nchw + j * pixels);
    transpose4(g);
    for (int64_t j = 0; j < kVec; ++j) {
      const Vec4 v = g[j] * ste_factor<kind>(in[j] - splat<Vec4>(threshold[c + j]));
      store(out + nchw + j * pixels, v);
      acc[j] += v;
    }
  }
  float cross(int64_t c, int64_t nchw, int64_t nhwc) const {
    const float v = grad[nhwc] * ste_factor<kind>(x[nchw] - threshold[c]);
    out[nchw] = v;
    return v;
  }
};

template <SteKind kind>
void ste_input_grad_as(ChannelView v, const float* grad, bool grad_nhwc, const float* x, const float* threshold,
                       float* grad_x, float* threshold_sums, const ParallelFor& parallel_for) {
  const ChannelValues t(threshold, v.channels, 0.0f);
  const SteGradPass<kind> pass{grad, x, t.values, grad_x, v.channels, v.inner};
  if (grad_nhwc)
    cross_layout_pass(v, pass, threshold_sums, parallel_for);
  else
    channel_pass(v, pass, threshold_sums, parallel_for);
}

// PReLU's gradient: grad where z > 0 (NaN takes the other side, as in PyTorch's prelu), else weight * grad; and
// the weight's: z * grad where z <= 0, else 0.
struct PreluGradPass {
  const float* grad;
  const float* z;
  const float* weight;
  float* out;
  int64_t channels;

  template <class T>
  T step(int64_t i, T w) const {
    const T g = load<T>(grad + i), zi = load<T>(z + i), zero = splat<T>(0.0f);
    const auto positive = zi > zero;
    store(out + i, positive ? g : w * g);
    return positive ? zero : zi * g;
  }
  float plane(int64_t c, int64_t first, int64_t count) const {
    return plane_loop(count, weight[c], [&](int64_t i, auto w) { return step(first + i, w); });
  }
  void row(int64_t first, float* sums) const {
    row_loop(channels, weight, sums, [&](int64_t c, auto w) { return step(first + c, w); });
  }
};

}  // namespace

void binary_signs(ChannelView v, const float* x, const float* threshold, float* out, bool out_nhwc,
                  const ParallelFor& parallel_for) {
  const ChannelValues t(threshold, v.channels, 0.0f);
  const SignsPass pass{x, t.values, out, v.channels, v.inner};
  if (out_nhwc)
    cross_layout_pass(v, pass, nullptr, parallel_for);
  else
    channel_pass(v, pass, nullptr, parallel_for);
}

void ste_input_grad(ChannelView v, SteKind ste, const float* grad, bool grad_nhwc, const float* x,
                    const float* threshold, float* grad_x, float* threshold_sums, const ParallelFor& parallel_for) {
  switch (ste) {
    case SteKind::clipped:
      return ste_input_grad_as<SteKind::clipped>(v, grad, grad_nhwc, x, threshold, grad_x, threshold_sums,
                                                 parallel_for);
    case SteKind::identity:
      return ste_input_grad_as<SteKind::identity>(v, grad, grad_nhwc, x, threshold, grad_x, threshold_sums,
                                                  parallel_for);
    case SteKind::approx:
      return ste_input_grad_as<SteKind::approx>(v, grad, grad_nhwc, x, threshold, grad_x, threshold_sums,
                                                parallel_for);
  }
}

void prelu_backward(ChannelView v, bool shared_weight, const float* grad, const float* z, const float* weight,
                    float* grad_z, float* weight_sums, const ParallelFor& parallel_for) {
  // A shared weight is one slope for every channel: the pass still sums per channel, then adds the channels up.
  const ChannelValues w(shared_weight ? nullptr : weight, v.channels, weight[0]);
  std::vector<float> per_channel(static_cast<size_t>(v.channels));
  channel_pass(v, PreluGradPass{grad, z, w.values, grad_z, v.channels}, weight_sums ? per_channel.data() : nullptr,
               parallel_for);
  if (!weight_sums) return;
  if (!shared_weight) {
    std::copy(per_channel.begin(), per_channel.end(), weight_sums);
    return;
  }
  double total = 0.0;
  for (float s : per_channel) total += s;
  weight_sums[0] = static_cast<float>(total);
}

}  // namespace xnorconv
