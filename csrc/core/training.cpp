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

// Adds per-task partial sums (task-major, `channels` per task) to each channel's total: in double and in task
// order, so that the totals do not depend on how the tasks were spread over the threads.
void add_task_sums(const std::vector<float>& partial, int64_t channels, std::vector<double>& sums) {
  for (size_t i = 0; i < partial.size(); ++i) sums[i % static_cast<size_t>(channels)] += partial[i];
}

// Runs a pass over every element of the view and writes the per-channel sums of what the pass adds up
// (Pass::kSums of them: channel_sums[k * channels + c], added in double across tasks, in task order, so the result
// does not depend on the threads) to channel_sums, unless it is nullptr. Pass supplies the two loop shapes, both
// branch-free so that they vectorise:
//   void plane(c, first, count, totals): NCHW (inner > 1), `count` consecutive elements of channel c from `first`;
//     writes their kSums sums to totals[k];
//   void row(first, sums): NHWC (inner == 1), one pixel's channels from `first`, adding to sums[k * channels + c].
// A task is a plane (or a chunk of a long one), or a block of pixels.
template <class Pass>
void channel_pass(ChannelView v, const Pass& pass, float* channel_sums, const ParallelFor& parallel_for) {
  constexpr int64_t kSums = Pass::kSums;
  const int64_t channels = v.channels;
  std::vector<double> sums(static_cast<size_t>(kSums * channels), 0.0);
  if (v.outer > 0 && channels > 0 && v.inner > 1) {
    const int64_t chunks_per_plane = (v.inner + kElementsPerTask - 1) / kElementsPerTask;
    const int64_t chunk = (v.inner + chunks_per_plane - 1) / chunks_per_plane;
    const int64_t tasks = v.outer * channels * chunks_per_plane;
    std::vector<float> partial(static_cast<size_t>(tasks * kSums));
    const int64_t grain = std::max<int64_t>(1, kElementsPerTask / chunk);
    parallel_for(tasks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t plane = task / chunks_per_plane;
        const int64_t first = plane * v.inner + (task % chunks_per_plane) * chunk;
        pass.plane(plane % channels, first, std::min(chunk, (plane + 1) * v.inner - first),
                   partial.data() + task * kSums);
      }
    });
    for (int64_t task = 0; task < tasks; ++task)
      for (int64_t k = 0; k < kSums; ++k)
        sums[k * channels + (task / chunks_per_plane) % channels] += partial[task * kSums + k];
  } else if (v.outer > 0 && channels > 0 && v.inner == 1) {
    const int64_t rows_per_task = std::max<int64_t>(1, kElementsPerTask / channels);
    const int64_t tasks = (v.outer + rows_per_task - 1) / rows_per_task;
    std::vector<float> partial(static_cast<size_t>(tasks * kSums * channels), 0.0f);
    parallel_for(tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t last = std::min(v.outer, (task + 1) * rows_per_task);
        for (int64_t row = task * rows_per_task; row < last; ++row)
          pass.row(row * channels, partial.data() + task * kSums * channels);
      }
    });
    add_task_sums(partial, kSums * channels, sums);
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
    add_task_sums(partial, channels, sums);
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
  static constexpr int64_t kSums = 1;
  const float* x;
  const float* threshold;
  float* out;
  int64_t channels, pixels;  // pixels: of an image, for the cross-layout pass

  template <class T>
  T step(int64_t i, T t) const {  // -0.0 >= 0 is true; NaN gives -1
    store(out + i, load<T>(x + i) >= t ? splat<T>(1.0f) : splat<T>(-1.0f));
    return T{};
  }
  void plane(int64_t c, int64_t first, int64_t count, float* totals) const {
    totals[0] = plane_loop(count, threshold[c], [&](int64_t i, auto t) { return step(first + i, t); });
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
  static constexpr int64_t kSums = 1;
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
  void plane(int64_t c, int64_t first, int64_t count, float* totals) const {
    totals[0] = plane_loop(count, threshold[c], [&](int64_t i, auto t) { return step(first + i, t); });
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
  static constexpr int64_t kSums = 1;
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
  void plane(int64_t c, int64_t first, int64_t count, float* totals) const {
    totals[0] = plane_loop(count, weight[c], [&](int64_t i, auto w) { return step(first + i, w); });
  }
  void row(int64_t first, float* sums) const {
    row_loop(channels, weight, sums, [&](int64_t c, auto w) { return step(first + c, w); });
  }
};

// ---- BatchNorm, residual add and PReLU ----

// Count, sum, mean and M2 (the sum of squared deviations from the mean) of part of a channel. Tasks take their
// own mean and M2 in two passes over data in cache, and are merged with Chan et al.'s pairwise update: accurate
// when the mean is large against the spread, where a sum of squares would cancel. The final mean is the sum over
// the count, which an infinite value takes to infinity (the merged mean would reach inf - inf = NaN).
struct Moments {
  double count = 0.0, sum = 0.0, mean = 0.0, m2 = 0.0;
};

inline void merge(Moments& a, const Moments& b) {
  if (b.count == 0.0) return;
  const double n = a.count + b.count, delta = b.mean - a.mean;
  a.sum += b.sum;
  a.mean += delta * (b.count / n);
  a.m2 += b.m2 + delta * delta * (a.count * b.count / n);
  a.count = n;
}

// A task's sums are float over short runs (kSumRun elements of a plane, or rows) added up in double, so that they
// stay accurate over long planes however large the values are.
constexpr int64_t kSumRun = 256;

// Moments of `count` values given their sum, and their sum of squared differences from m, their float mean.
inline Moments moments_of(double count, double sum, double squares_around_m, float m) {
  const double mean = sum / count, off = mean - m;
  const double m2 = squares_around_m - count * off * off;
  return {count, sum, mean, m2 < 0.0 ? 0.0 : m2};  // rounding can take it below 0; NaN stays
}

void moments_pass(ChannelView v, const float* x, float* mean_out, float* var_out, const ParallelFor& parallel_for) {
  const int64_t channels = v.channels;
  std::vector<Moments> total(static_cast<size_t>(channels));
  auto squared_difference = [](auto value, auto center) {
    const auto d = value - center;
    return d * d;
  };
  if (v.outer > 0 && channels > 0 && v.inner > 1) {
    const int64_t chunks_per_plane = (v.inner + kElementsPerTask - 1) / kElementsPerTask;
    const int64_t chunk = (v.inner + chunks_per_plane - 1) / chunks_per_plane;
    const int64_t tasks = v.outer * channels * chunks_per_plane;
    std::vector<Moments> partial(static_cast<size_t>(tasks));
    parallel_for(tasks, std::max<int64_t>(1, kElementsPerTask / chunk), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t plane = task / chunks_per_plane;
        const int64_t first = plane * v.inner + (task % chunks_per_plane) * chunk;
        const int64_t count = std::min(chunk, (plane + 1) * v.inner - first);
        double sum = 0.0, squares = 0.0;
        for (int64_t run = 0; run < count; run += kSumRun)
          sum += plane_loop(std::min(kSumRun, count - run), 0.0f, [&](int64_t i, auto zero) {
            return load<decltype(zero)>(x + first + run + i);
          });
        const float m = static_cast<float>(sum / static_cast<double>(count));
        for (int64_t run = 0; run < count; run += kSumRun)
          squares += plane_loop(std::min(kSumRun, count - run), m, [&](int64_t i, auto mean) {
            return squared_difference(load<decltype(mean)>(x + first + run + i), mean);
          });
        partial[task] = moments_of(static_cast<double>(count), sum, squares, m);
      }
    });
    for (int64_t task = 0; task < tasks; ++task) merge(total[(task / chunks_per_plane) % channels], partial[task]);
  } else if (v.outer > 0 && channels > 0 && v.inner == 1) {
    const int64_t rows_per_task = std::max<int64_t>(1, kElementsPerTask / channels);
    const int64_t tasks = (v.outer + rows_per_task - 1) / rows_per_task;
    std::vector<Moments> partial(static_cast<size_t>(tasks * channels));
    parallel_for(tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> run_sums(static_cast<size_t>(channels)), means(run_sums.size());
      std::vector<double> sums(run_sums.size()), squares(run_sums.size());
      // Adds f(row, c, channel value) over the task's rows to totals[c], per run of kSumRun rows.
      auto add_rows = [&](int64_t first, int64_t last, const float* values, std::vector<double>& totals,
                          const auto& f) {
        std::fill(totals.begin(), totals.end(), 0.0);
        for (int64_t run = first; run < last; run += kSumRun) {
          std::fill(run_sums.begin(), run_sums.end(), 0.0f);
          for (int64_t row = run; row < std::min(last, run + kSumRun); ++row)
            row_loop(channels, values, run_sums.data(), [&](int64_t c, auto value) { return f(row, c, value); });
          for (int64_t c = 0; c < channels; ++c) totals[c] += run_sums[c];
        }
      };
      for (int64_t task = begin; task < end; ++task) {
        const int64_t first = task * rows_per_task, last = std::min(v.outer, first + rows_per_task);
        add_rows(first, last, means.data(), sums, [&](int64_t row, int64_t c, auto like) {  // means: a type here
          return load<decltype(like)>(x + row * channels + c);
        });
        for (int64_t c = 0; c < channels; ++c)
          means[c] = static_cast<float>(sums[c] / static_cast<double>(last - first));
        add_rows(first, last, means.data(), squares, [&](int64_t row, int64_t c, auto mean) {
          return squared_difference(load<decltype(mean)>(x + row * channels + c), mean);
        });
        for (int64_t c = 0; c < channels; ++c)
          partial[task * channels + c] =
              moments_of(static_cast<double>(last - first), sums[c], squares[c], means[c]);
      }
    });
    for (int64_t task = 0; task < tasks; ++task)
      for (int64_t c = 0; c < channels; ++c) merge(total[c], partial[task * channels + c]);
  }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (int64_t c = 0; c < channels; ++c) {
    const Moments& m = total[c];
    mean_out[c] = static_cast<float>(m.count > 0.0 ? m.sum / m.count : nan);
    var_out[c] = static_cast<float>(m.count > 0.0 ? m.m2 / m.count : nan);
  }
}

// Runs step(i, four channel values) over `count` elements from `first` of one NCHW plane (v0..v3: the channel's
// values), or over one NHWC pixel's channels from `first` (p0..p3: per-channel arrays): 4-lane vectors, then
// scalars for the rest.
template <class Step>
inline void plane_each(int64_t first, int64_t count, float v0, float v1, float v2, float v3, const Step& step) {
  const Vec4 a = splat<Vec4>(v0), b = splat<Vec4>(v1), c = splat<Vec4>(v2), d = splat<Vec4>(v3);
  int64_t i = 0;
  for (; i + kVec <= count; i += kVec) step(first + i, a, b, c, d);
  for (; i < count; ++i) step(first + i, v0, v1, v2, v3);
}

template <class Step>
inline void row_each(int64_t first, int64_t channels, const float* p0, const float* p1, const float* p2,
                     const float* p3, const Step& step) {
  int64_t c = 0;
  for (; c + kVec <= channels; c += kVec)
    step(first + c, load<Vec4>(p0 + c), load<Vec4>(p1 + c), load<Vec4>(p2 + c), load<Vec4>(p3 + c));
  for (; c < channels; ++c) step(first + c, p0[c], p1[c], p2[c], p3[c]);
}

// z = (x - mean[c]) * scale[c] + shift[c] (+ residual[i]), stored; out = z where z > 0 (NaN takes the other side,
// as in PyTorch's prelu), else weight[c] * z. Centred first: x - mean is exact for x near the mean, so a mean far
// from zero costs no precision (x * scale + (shift - mean * scale) would cancel).
template <bool kResidual>
struct BatchNormAddPreluPass {
  static constexpr int64_t kSums = 1;
  const float* x;
  const float* mean;
  const float* scale;
  const float* shift;
  const float* residual;
  const float* weight;
  float* z;
  float* out;
  int64_t channels;

  template <class T>
  void step(int64_t i, T m, T a, T b, T w) const {
    T zi = (load<T>(x + i) - m) * a + b;
    if (kResidual) zi += load<T>(residual + i);
    store(z + i, zi);
    store(out + i, zi > splat<T>(0.0f) ? zi : w * zi);
  }
  void plane(int64_t c, int64_t first, int64_t count, float*) const {
    plane_each(first, count, mean[c], scale[c], shift[c], weight[c], [&](int64_t i, auto... v) { step(i, v...); });
  }
  void row(int64_t first, float*) const {
    row_each(first, channels, mean, scale, shift, weight, [&](int64_t i, auto... v) { step(i, v...); });
  }
};

// The backward's first pass: grad_z = PReLU's input gradient (also the residual's), and per channel the sums
// [0] of grad_z, [1] of grad_z * (x - mean[c]) and [2] of z * grad where z <= 0 (PReLU's weight gradient).
struct PreluSumsPass {
  static constexpr int64_t kSums = 3;
  const float* grad;
  const float* z;
  const float* x;
  const float* mean;
  const float* weight;
  float* grad_z;
  int64_t channels;

  template <class T>
  void step(int64_t i, T m, T w, T& sum, T& centered, T& prelu) const {
    const T g = load<T>(grad + i), zi = load<T>(z + i), zero = splat<T>(0.0f);
    const auto positive = zi > zero;
    const T gz = positive ? g : w * g;
    store(grad_z + i, gz);
    sum += gz;
    centered += gz * (load<T>(x + i) - m);
    prelu += positive ? zero : zi * g;
  }
  void plane(int64_t c, int64_t first, int64_t count, float* totals) const {
    const Vec4 m = splat<Vec4>(mean[c]), w = splat<Vec4>(weight[c]);
    Vec4 acc[2][kSums] = {};
    int64_t i = 0;
    for (; i + 2 * kVec <= count; i += 2 * kVec) {
      step(first + i, m, w, acc[0][0], acc[0][1], acc[0][2]);
      step(first + i + kVec, m, w, acc[1][0], acc[1][1], acc[1][2]);
    }
    for (; i + kVec <= count; i += kVec) step(first + i, m, w, acc[0][0], acc[0][1], acc[0][2]);
    float tail[kSums] = {};
    for (; i < count; ++i) step(first + i, mean[c], weight[c], tail[0], tail[1], tail[2]);
    for (int64_t k = 0; k < kSums; ++k) {
      const Vec4 v = acc[0][k] + acc[1][k];
      totals[k] = ((v[0] + v[1]) + (v[2] + v[3])) + tail[k];
    }
  }
  void row(int64_t first, float* sums) const {
    float* sum = sums;
    float* centered = sums + channels;
    float* prelu = sums + 2 * channels;
    int64_t c = 0;
    for (; c + kVec <= channels; c += kVec) {
      Vec4 s = load<Vec4>(sum + c), q = load<Vec4>(centered + c), p = load<Vec4>(prelu + c);
      step(first + c, load<Vec4>(mean + c), load<Vec4>(weight + c), s, q, p);
      store(sum + c, s);
      store(centered + c, q);
      store(prelu + c, p);
    }
    for (; c < channels; ++c) step(first + c, mean[c], weight[c], sum[c], centered[c], prelu[c]);
  }
};

// The backward's second pass: BatchNorm's input gradient from grad_z, per channel
//   with batch statistics:  (grad_z - grad_mean[c] - (x - mean[c]) * k[c]) * a[c]
//   with running statistics: grad_z * a[c]
template <bool kBatchStats>
struct NormGradPass {
  static constexpr int64_t kSums = 1;
  const float* grad_z;
  const float* x;
  const float* mean;
  const float* grad_mean;
  const float* k;
  const float* a;
  float* grad_x;
  int64_t channels;

  template <class T>
  void step(int64_t i, T m, T gm, T kk, T aa) const {
    const T gz = load<T>(grad_z + i);
    store(grad_x + i, kBatchStats ? ((gz - gm) - (load<T>(x + i) - m) * kk) * aa : gz * aa);
  }
  void plane(int64_t c, int64_t first, int64_t count, float*) const {
    plane_each(first, count, mean[c], grad_mean[c], k[c], a[c], [&](int64_t i, auto... v) { step(i, v...); });
  }
  void row(int64_t first, float*) const {
    row_each(first, channels, mean, grad_mean, k, a, [&](int64_t i, auto... v) { step(i, v...); });
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

void channel_moments(ChannelView v, const float* x, float* mean, float* var, const ParallelFor& parallel_for) {
  moments_pass(v, x, mean, var, parallel_for);
}

void batch_norm_add_prelu(ChannelView v, const float* x, const float* mean, const float* invstd,
                          const float* bn_weight, const float* bn_bias, const float* residual, bool shared_weight,
                          const float* prelu_weight, float* z, float* out, const ParallelFor& parallel_for) {
  const ChannelValues w(shared_weight ? nullptr : prelu_weight, v.channels, prelu_weight[0]);
  std::vector<float> scale(static_cast<size_t>(v.channels));
  for (int64_t c = 0; c < v.channels; ++c) scale[c] = bn_weight[c] * invstd[c];
  if (residual)
    channel_pass(v, BatchNormAddPreluPass<true>{x, mean, scale.data(), bn_bias, residual, w.values, z, out,
                                                v.channels},
                 nullptr, parallel_for);
  else
    channel_pass(v, BatchNormAddPreluPass<false>{x, mean, scale.data(), bn_bias, residual, w.values, z, out,
                                                 v.channels},
                 nullptr, parallel_for);
}

void batch_norm_add_prelu_backward(ChannelView v, bool batch_stats, const float* grad, const float* z,
                                   const float* x, const float* mean, const float* invstd, const float* bn_weight,
                                   bool shared_weight, const float* prelu_weight, float* grad_x, float* grad_z,
                                   float* grad_bn_weight, float* grad_bn_bias, float* grad_prelu_weight,
                                   const ParallelFor& parallel_for) {
  const int64_t channels = v.channels;
  const ChannelValues w(shared_weight ? nullptr : prelu_weight, channels, prelu_weight[0]);
  std::vector<float> sums(static_cast<size_t>(3 * channels));
  channel_pass(v, PreluSumsPass{grad, z, x, mean, w.values, grad_z, channels}, sums.data(), parallel_for);
  const float* sum = sums.data();
  const float* centered = sums.data() + channels;
  const float* prelu = sums.data() + 2 * channels;
  const double count = static_cast<double>(v.outer) * static_cast<double>(v.inner);
  std::vector<float> grad_mean(static_cast<size_t>(channels)), k(grad_mean.size()), a(grad_mean.size());
  for (int64_t c = 0; c < channels; ++c) {
    const double s = invstd[c];
    a[c] = static_cast<float>(s * bn_weight[c]);
    grad_mean[c] = static_cast<float>(sum[c] / count);
    k[c] = static_cast<float>(centered[c] * s * s / count);
    grad_bn_weight[c] = static_cast<float>(centered[c] * s);
    grad_bn_bias[c] = sum[c];
  }
  if (batch_stats)
    channel_pass(v, NormGradPass<true>{grad_z, x, mean, grad_mean.data(), k.data(), a.data(), grad_x, channels},
                 nullptr, parallel_for);
  else
    channel_pass(v, NormGradPass<false>{grad_z, x, mean, grad_mean.data(), k.data(), a.data(), grad_x, channels},
                 nullptr, parallel_for);
  if (!shared_weight) {
    std::copy(prelu, prelu + channels, grad_prelu_weight);
    return;
  }
  double total = 0.0;
  for (int64_t c = 0; c < channels; ++c) total += prelu[c];
  grad_prelu_weight[0] = static_cast<float>(total);
}


}  // namespace xnorconv
