// Kernel-core tests (no torch): every compiled-and-usable kernel family against a naive float reference of the
// binary semantics, over random shapes, plus the packed bit order and the layout invariants.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#if defined(__unix__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "xnorconv_core.h"
#include "test_support.h"

using namespace xnorconv;
using namespace xnorconv_test;

namespace {


std::mt19937_64 rng(1234);

int64_t pick(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }

void fill_signed(std::vector<float>& v) {
  std::normal_distribution<float> d;
  for (auto& e : v) {
    e = d(rng);
    // Exact zeros and negative zeros are +1: make sure they occur.
    if (pick(0, 30) == 0) e = pick(0, 1) ? 0.0f : -0.0f;
  }
}

enum class Layout { Nchw, ChannelsLast, RowPadded, ColumnStrided };

// x_shift / w_shift move the normal samples (e.g. -3 / +3: almost every XOR bit set, the worst case for narrow
// accumulators).
void check_case(const ConvParams& p, Layout layout, bool with_affine, const std::string& label,
                bool with_threshold = false, float x_shift = 0.0f, float w_shift = 0.0f) {
  const std::string err = validate(p);
  EXPECT(err.empty(), "%s: validate: %s", label.c_str(), err.c_str());
  if (!err.empty()) return;
  // RowPadded: rows 3 floats apart more than their width (a sliced tensor), which takes the packer's row path.
  // ColumnStrided: every other column of a twice-as-wide tensor (x[..., ::2]), the row path with a pixel stride.
  const int64_t column = layout == Layout::ColumnStrided ? 2 : 1;
  const int64_t row = layout == Layout::RowPadded ? p.in_w + 3 : p.in_w * column;
  std::vector<float> x(p.batch * p.in_channels * p.in_h * row), w(p.out_channels * p.channels_per_group() * p.taps());
  fill_signed(x);
  fill_signed(w);
  for (auto& e : x) e += x_shift;
  for (auto& e : w) e += w_shift;
  TensorStrides s = layout == Layout::ChannelsLast
                        ? TensorStrides{p.in_h * p.in_w * p.in_channels, 1, p.in_w * p.in_channels, p.in_channels}
                        : TensorStrides{p.in_channels * p.in_h * row, p.in_h * row, row, column};
  std::vector<float> scale(p.out_channels), bias(p.out_channels);
  for (auto& e : scale) e = std::uniform_real_distribution<float>(0.1f, 2.0f)(rng);
  for (auto& e : bias) e = std::uniform_real_distribution<float>(-3.0f, 3.0f)(rng);
  const float* sc = with_affine ? scale.data() : nullptr;
  const float* bi = with_affine ? bias.data() : nullptr;
  std::vector<float> thresholds(p.in_channels);
  for (auto& e : thresholds) e = std::uniform_real_distribution<float>(-1.0f, 1.0f)(rng);
  if (!thresholds.empty()) thresholds[0] = 0.0f;
  const float* th = with_threshold ? thresholds.data() : nullptr;
  const std::vector<double> want = reference(p, x, s, w, sc, bi, th);
  for (const auto& name : available_backends()) {
    const KernelOps& ops = *find_backend(name);
    std::vector<float> got(want.size(), NAN);
    binary_conv2d_serial(ops, p, x.data(), s, w.data(), sc, bi, got.data(), th);
    int64_t bad = 0, first = -1;
    for (size_t i = 0; i < want.size(); ++i) {
      const double tol = with_affine ? 1e-5 * (1.0 + std::fabs(want[i])) : 0.0;
      if (!(std::fabs(got[i] - want[i]) <= tol)) {
        if (first < 0) first = static_cast<int64_t>(i);
        ++bad;
      }
    }
    EXPECT(bad == 0, "%s [%s]: %lld of %zu outputs wrong, first at %lld: got %g want %g", label.c_str(), name.c_str(),
           static_cast<long long>(bad), want.size(), static_cast<long long>(first),
           first >= 0 ? got[first] : 0.0, first >= 0 ? want[first] : 0.0);
  }
}

std::string describe(const ConvParams& p) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "N%lld C%lld H%lld W%lld O%lld g%lld k%lldx%lld s%lldx%lld pad(%lld,%lld,%lld,%lld) d%lldx%lld pv%d",
                (long long)p.batch, (long long)p.in_channels, (long long)p.in_h, (long long)p.in_w,
                (long long)p.out_channels, (long long)p.groups, (long long)p.kernel_h, (long long)p.kernel_w,
                (long long)p.stride_h, (long long)p.stride_w, (long long)p.pad_top, (long long)p.pad_bottom,
                (long long)p.pad_left, (long long)p.pad_right, (long long)p.dilation_h, (long long)p.dilation_w,
                static_cast<int>(p.pad_value));
  return buf;
}

void test_random_shapes(int count) {
  const PadValue pads[] = {PadValue::Zero, PadValue::PlusOne, PadValue::MinusOne};
  for (int iter = 0; iter < count; ++iter) {
    ConvParams p;
    p.groups = pick(0, 4) == 0 ? pick(2, 3) : 1;
    p.batch = pick(1, 2);  // batch 0 has its own test: it compares no output
    p.in_channels = p.groups * pick(1, 150);
    p.out_channels = p.groups * pick(1, 20);
    p.kernel_h = pick(1, 4);
    p.kernel_w = pick(1, 4);
    p.stride_h = pick(1, 3);
    p.stride_w = pick(1, 3);
    p.dilation_h = pick(1, 2);
    p.dilation_w = pick(1, 2);
    p.pad_top = pick(0, 2);
    p.pad_bottom = pick(0, 2);
    p.pad_left = pick(0, 2);
    p.pad_right = pick(0, 2);
    p.pad_value = pads[iter % 3];
    p.in_h = pick(1, 19);
    p.in_w = pick(1, 40);
    if (!validate(p).empty()) continue;  // kernel larger than the padded input
    const Layout layouts[] = {Layout::Nchw, Layout::Nchw, Layout::ChannelsLast, Layout::RowPadded,
                              Layout::ColumnStrided};
    const bool threshold = pick(0, 2) == 0;
    check_case(p, layouts[pick(0, 4)], pick(0, 1) == 1, describe(p) + (threshold ? " threshold" : ""), threshold);
  }
}

void test_darknet_shapes() {
  // The benchmark's layers (batch 1), so a failure there is caught here first.
  const int64_t shapes[][6] = {{64, 64, 64, 3, 1, 1}, {128, 128, 32, 3, 1, 1}, {256, 256, 16, 3, 1, 1},
                               {512, 512, 8, 3, 1, 1}, {256, 512, 16, 3, 2, 1}, {512, 256, 8, 1, 1, 0}};
  for (const auto& s : shapes)
    for (PadValue pv : {PadValue::Zero, PadValue::PlusOne, PadValue::MinusOne}) {
      ConvParams p = square_layer(s[0], s[1], s[2], s[3], s[4], s[5]);
      p.pad_value = pv;
      check_case(p, Layout::Nchw, true, describe(p));
    }
}

// Depth past any narrow accumulator's range: 171 words x 49 taps = 8379 words per output, with nearly every XOR bit
// set, so a 16-bit lane (16 per word) would overflow twice over without its periodic flush (NEON flushes every 4095
// words; AVX2's byte counters every 31). Padding 3 on a 4x4 input: most taps of most outputs are padded.
void test_deep_accumulation() {
  for (PadValue pv : {PadValue::Zero, PadValue::MinusOne}) {
    ConvParams p;
    p.batch = 1;
    p.in_channels = 64 * 171 - 5;
    p.out_channels = 3;
    p.in_h = p.in_w = 4;
    p.kernel_h = p.kernel_w = 7;
    p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 3;
    p.pad_value = pv;
    check_case(p, Layout::Nchw, false, "deep " + describe(p), false, -3.0f, 3.0f);
  }
}

// More zero-padding classes than one vector register holds (the AVX-512 family looks up to 16 up with a permute,
// more with a gather): a 9x9 kernel with padding 4 on a 6x6 input puts every output row and column in its own
// class, 7 x 7 = 49 with "none"; 13 output channels and odd widths give tail channels and split strips.
void test_many_padding_classes() {
  for (int64_t w : {6, 11}) {
    ConvParams p;
    p.batch = 1;
    p.in_channels = 70;
    p.out_channels = 13;
    p.in_h = 6;
    p.in_w = w;
    p.kernel_h = p.kernel_w = 9;
    p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 4;
    p.pad_value = PadValue::Zero;
    check_case(p, Layout::Nchw, false, "many padding classes " + describe(p));
  }
}

// Pins the documented bit order: channel c of a pixel is bit c % 64 of word c / 64; a negative value is a 1.
void test_bit_order() {
  ConvParams p;
  p.batch = 1;
  p.in_channels = 130;
  p.out_channels = 1;
  p.in_h = 1;
  p.in_w = 3;
  p.pad_value = PadValue::PlusOne;
  const ActivationLayout l = activation_layout(p);
  EXPECT(l.words_per_pixel == 3, "130 channels need 3 words, layout says %lld", (long long)l.words_per_pixel);
  for (const auto& name : available_backends()) {
    const KernelOps& ops = *find_backend(name);
    const bool bytes = ops.layout != activation_layout;  // AMX: one int8 per value, 64 per (pixel, word)
    const ActivationLayout fl = ops.layout(p);
    for (int64_t hot = 0; hot < p.in_channels; ++hot) {
      std::vector<float> x(p.in_channels * p.in_w, 1.0f);
      for (int64_t iw = 0; iw < p.in_w; ++iw) x[hot * p.in_w + iw] = -1.0f;
      std::vector<uint64_t> packed(fl.total_words, 0xDEADBEEFull);
      ops.pack(p, fl, x.data(), {p.in_channels * p.in_w, p.in_w, p.in_w, 1}, nullptr, packed.data(), 0,
               ops.pack_tasks(p, fl));
      for (int64_t iw = 0; iw < p.in_w; ++iw)
        for (int64_t word = 0; word < 3; ++word) {
          if (bytes) {
            // Byte c % 64 of position iw in word c / 64's plane; planes hold image_stride / words_per_pixel words.
            const auto* plane = reinterpret_cast<const int8_t*>(packed.data()) +
                                word * (fl.image_stride * 8 / fl.words_per_pixel) + iw * 64;
            for (int64_t k = 0; k < 64 && 64 * word + k < p.in_channels; ++k) {
              const int want = 64 * word + k == hot ? -1 : 1;
              EXPECT(plane[k] == want, "[%s] channel %lld pixel %lld byte %lld: got %d want %d", name.c_str(),
                     (long long)hot, (long long)iw, (long long)(64 * word + k), plane[k], want);
            }
            continue;
          }
          const uint64_t want = word == hot / 64 ? (1ull << (hot % 64)) : 0;
          const uint64_t got = packed[word * l.row_words + iw];
          EXPECT(got == want, "[%s] channel %lld pixel %lld word %lld: got %016llx want %016llx", name.c_str(),
                 (long long)hot, (long long)iw, (long long)word, (unsigned long long)got, (unsigned long long)want);
        }
    }
  }
  // Weights use the same order.
  std::vector<float> w(p.in_channels, 1.0f);
  w[70] = -1.0f;
  std::vector<uint64_t> pw(3);
  int32_t tap_sum = 0;
  pack_weights(p, w.data(), pw.data(), &tap_sum);
  EXPECT(pw[0] == 0 && pw[1] == (1ull << 6) && pw[2] == 0, "weight bit order: %llx %llx %llx", (unsigned long long)pw[0],
         (unsigned long long)pw[1], (unsigned long long)pw[2]);
  EXPECT(tap_sum == 128, "tap_sum of 129 positives and 1 negative: got %d", tap_sum);
}

// Every family's packing writes the same words as the portable one (padding and tail bits included): pins the
// per-ISA transposes and the stepped scatter of the plane path on planes of many 64-pixel blocks.
void test_pack_matches_scalar(int cases) {
  const PadValue pads[] = {PadValue::Zero, PadValue::PlusOne, PadValue::MinusOne};
  // The first cases pin the channel counts around the AVX-512 packer's switch of method (words built directly up to
  // 32 channels, the 64x64 transpose above) and a full word; the rest are random.
  const int64_t edge_channels[] = {1, 17, 32, 33, 64};
  const int edges = static_cast<int>(sizeof edge_channels / sizeof edge_channels[0]);
  for (int iter = 0; iter < cases + edges; ++iter) {
    ConvParams p;
    p.batch = pick(1, 2);
    p.groups = pick(0, 3) == 0 ? 2 : 1;
    p.in_channels = p.groups * (iter < edges ? edge_channels[iter] : pick(1, 140));
    p.out_channels = p.groups;
    p.kernel_h = p.kernel_w = pick(1, 3);
    p.stride_h = pick(1, 2);
    p.stride_w = pick(1, 3);
    p.pad_top = pick(0, 2);
    p.pad_bottom = pick(0, 2);
    p.pad_left = pick(0, 2);
    p.pad_right = pick(0, 2);
    p.pad_value = pads[iter % 3];
    p.in_h = pick(3, 40);
    p.in_w = pick(3, 70);
    if (!validate(p).empty()) continue;
    const ActivationLayout l = activation_layout(p);
    std::vector<float> x(p.batch * p.in_channels * p.in_h * p.in_w), th(p.in_channels);
    fill_signed(x);
    for (auto& e : th) e = std::uniform_real_distribution<float>(-0.5f, 0.5f)(rng);
    x[pick(0, static_cast<int64_t>(x.size()) - 1)] = NAN;
    const bool channels_last = pick(0, 3) == 0;
    const TensorStrides s = channels_last
                                ? TensorStrides{p.in_h * p.in_w * p.in_channels, 1, p.in_w * p.in_channels, p.in_channels}
                                : TensorStrides{p.in_channels * p.in_h * p.in_w, p.in_h * p.in_w, p.in_w, 1};
    const float* t = pick(0, 1) ? th.data() : nullptr;
    std::vector<uint64_t> want(l.total_words, 0x5A5A5A5A5A5A5A5Aull);
    scalar_kernel().pack(p, l, x.data(), s, t, want.data(), 0, scalar_kernel().pack_tasks(p, l));
    for (const auto& name : available_backends()) {
      const KernelOps& ops = *find_backend(name);
      // Word-for-word comparison needs the bit layout; AMX's int8 packing is checked through its convolutions
      // (and its byte order by test_bit_order).
      if (ops.layout != activation_layout) continue;
      std::vector<uint64_t> got(l.total_words, 0xA5A5A5A5A5A5A5A5ull);
      ops.pack(p, l, x.data(), s, t, got.data(), 0, ops.pack_tasks(p, l));
      int64_t bad = 0, first = -1;
      for (size_t i = 0; i < want.size(); ++i)
        if (got[i] != want[i] && bad++ == 0) first = static_cast<int64_t>(i);
      EXPECT(bad == 0, "pack %s%s [%s]: %lld of %zu words differ from scalar, first at %lld", describe(p).c_str(),
             channels_last ? " channels_last" : "", name.c_str(), static_cast<long long>(bad), want.size(),
             static_cast<long long>(first));
    }
  }
}

bool same_correction(const ZeroPadCorrection& a, const ZeroPadCorrection& b) {
  return a.row_class == b.row_class && a.col_class == b.col_class && a.value == b.value &&
         a.col_classes == b.col_classes && a.classes == b.classes;
}

// The memoised zero-pad correction always equals a fresh one: for other geometries with the same tap sums, for tap
// sums changed in place at the same address, after eviction, and from several threads at once.
void test_zero_pad_cache() {
  struct Case {
    ConvParams p;
    std::vector<int32_t> tap_sum;
  };
  auto make = [](int64_t o, int64_t k, int64_t hw, int64_t stride, int64_t pad) {
    Case c;
    c.p.batch = 1;
    c.p.in_channels = 70;
    c.p.out_channels = o;
    c.p.in_h = hw;
    c.p.in_w = hw + 3;
    c.p.kernel_h = c.p.kernel_w = k;
    c.p.stride_h = c.p.stride_w = stride;
    c.p.pad_top = c.p.pad_left = pad;
    c.p.pad_bottom = c.p.pad_right = pad + (hw % 2);
    c.tap_sum.resize(o * k * k);
    for (auto& t : c.tap_sum) t = static_cast<int32_t>(pick(-70, 70) / 2 * 2);
    return c;
  };
  std::vector<Case> cases;
  for (int i = 0; i < 12; ++i) cases.push_back(make(pick(1, 40), pick(1, 5), pick(5, 12), pick(1, 2), pick(0, 2)));
  // Same tap sums, other geometry: a separate entry.
  Case other = cases[0];
  other.p.pad_top += 1;
  cases.push_back(other);
  for (const Case& c : cases) {
    EXPECT(validate(c.p).empty(), "zero-pad cache case: %s", validate(c.p).c_str());
    for (int rep = 0; rep < 2; ++rep)
      EXPECT(same_correction(*cached_zero_pad_correction(c.p, c.tap_sum.data()),
                             zero_pad_correction(c.p, c.tap_sum.data())),
             "cached zero-pad correction differs from a fresh one: %s (call %d)", describe(c.p).c_str(), rep);
  }
  // Changed in place: same address, same geometry, other values.
  Case& c = cases[1];
  const auto before = cached_zero_pad_correction(c.p, c.tap_sum.data());
  c.tap_sum[c.tap_sum.size() - 1] += 2;
  c.tap_sum[0] -= 4;
  const auto after = cached_zero_pad_correction(c.p, c.tap_sum.data());
  EXPECT(same_correction(*after, zero_pad_correction(c.p, c.tap_sum.data())),
         "zero-pad cache served a stale entry for tap sums changed in place: %s", describe(c.p).c_str());
  // Another address holding the same values shares the entry.
  const std::vector<int32_t> copy = c.tap_sum;
  EXPECT(cached_zero_pad_correction(c.p, copy.data()) == after, "zero-pad cache: equal tap sums elsewhere missed");
  // Evict everything, then every case is computed again, correctly.
  for (size_t i = 0; i < kZeroPadCacheEntries + 4; ++i) {
    Case filler = make(3, 3, 6, 1, 1);
    filler.tap_sum[0] = static_cast<int32_t>(1000 + i);
    cached_zero_pad_correction(filler.p, filler.tap_sum.data());
  }
  for (const Case& k : cases)
    EXPECT(same_correction(*cached_zero_pad_correction(k.p, k.tap_sum.data()),
                           zero_pad_correction(k.p, k.tap_sum.data())),
           "zero-pad correction after eviction: %s", describe(k.p).c_str());
  // Threads: lookups, misses and evictions racing, each result checked against its fresh value.
  std::vector<ZeroPadCorrection> fresh;
  for (const Case& k : cases) fresh.push_back(zero_pad_correction(k.p, k.tap_sum.data()));
  std::vector<int> wrong(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      std::mt19937 local(t);
      for (int i = 0; i < 3000; ++i) {
        if (i % 50 == 0) {  // a burst of new entries, evicting others
          for (int f = 0; f < 20; ++f) {
            std::vector<int32_t> sums(9, static_cast<int32_t>(local() % 100000));
            ConvParams q = cases[0].p;
            q.out_channels = 1;
            q.kernel_h = q.kernel_w = 3;
            cached_zero_pad_correction(q, sums.data());
          }
        }
        const size_t j = local() % cases.size();
        wrong[t] += !same_correction(*cached_zero_pad_correction(cases[j].p, cases[j].tap_sum.data()), fresh[j]);
      }
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT(wrong[t] == 0, "zero-pad cache, thread %d: %d wrong results", t, wrong[t]);
}

// Each edge value on its own output, at several bit positions: column j of the input holds value j at channel c0 and
// +1 at every other channel; a 1x1 conv with all-+1 weights gives y[j] = (C - 1) + sign(value j). A sum over the
// values would let two opposite mistakes cancel.
void test_sign_edge_cases() {
  const float values[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1e-30f, -1e-30f, 1.4e-45f, -1.4e-45f};
  const float signs[] = {1, 1, 1, -1, -1, 1, -1, 1, -1};  // +0, -0, +inf: +1; -inf, NaN (NaN >= 0 is false): -1
  constexpr int64_t kValues = sizeof values / sizeof values[0], kC = 70;
  ConvParams p;
  p.batch = 1;
  p.in_channels = kC;
  p.out_channels = 1;
  p.in_h = 1;
  p.in_w = kValues;
  const std::vector<float> w(kC, 1.0f);
  for (const bool channels_last : {false, true}) {
    const TensorStrides s = channels_last ? TensorStrides{kC * kValues, 1, kC * kValues, kC}
                                          : TensorStrides{kC * kValues, kValues, kValues, 1};
    for (const int64_t c0 : {0, 5, 63, 64, 69}) {
      std::vector<float> x(kC * kValues, 1.0f);
      for (int64_t j = 0; j < kValues; ++j) x[c0 * s.c + j * s.w] = values[j];
      for (const auto& name : available_backends()) {
        std::vector<float> y(kValues, 1e30f);
        binary_conv2d_serial(*find_backend(name), p, x.data(), s, w.data(), nullptr, nullptr, y.data());
        for (int64_t j = 0; j < kValues; ++j)
          EXPECT(y[j] == kC - 1 + signs[j], "[%s] %s, channel %lld: value %g binarized to %g, want %g", name.c_str(),
                 channels_last ? "channels_last" : "NCHW", (long long)c0, values[j], y[j] - (kC - 1), signs[j]);
      }
    }
  }
}

// Batch 0: every family packs and convolves nothing. The input is a one-element buffer (a read past it is an
// AddressSanitizer error in the sanitizer build) and the output buffer's sentinels must stay untouched.
void test_batch_zero() {
  const PadValue pads[] = {PadValue::Zero, PadValue::PlusOne, PadValue::MinusOne};
  for (int variant = 0; variant < 6; ++variant) {
    ConvParams p;
    p.batch = 0;
    p.groups = variant % 2 ? 2 : 1;
    p.in_channels = 70;
    p.out_channels = 6;
    p.in_h = 5;
    p.in_w = 7;
    p.kernel_h = p.kernel_w = variant == 5 ? 1 : 3;
    p.stride_h = p.stride_w = variant == 3 ? 2 : 1;
    p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = variant == 5 ? 0 : 1;
    p.pad_value = pads[variant % 3];
    EXPECT(validate(p).empty(), "batch 0, %s: validate: %s", describe(p).c_str(), validate(p).c_str());
    const std::vector<float> x(1, 1.0f), w(p.out_channels * p.channels_per_group() * p.taps(), 1.0f);
    const std::vector<float> scale(p.out_channels, 2.0f), bias(p.out_channels, 1.0f), t(p.in_channels, 0.0f);
    for (const auto& name : available_backends()) {
      std::vector<float> out(16, 1e30f);
      binary_conv2d_serial(*find_backend(name), p, x.data(), {p.in_channels * p.in_h * p.in_w, p.in_h * p.in_w, p.in_w, 1},
                           w.data(), variant == 4 ? scale.data() : nullptr, variant == 4 ? bias.data() : nullptr,
                           out.data(), variant == 2 ? t.data() : nullptr);
      EXPECT(std::all_of(out.begin(), out.end(), [](float v) { return v == 1e30f; }),
             "[%s] batch 0, %s: the output buffer was written", name.c_str(), describe(p).c_str());
    }
  }
}

// Sign output (y < threshold, as bytes) fed back as sign input must equal the float path with that threshold.
// NHWC output (OutputStage::channels_last): the same values as the NCHW output y, element for element, for the
// float output (plain, and with residual + PReLU, the residual NHWC too) and the sign bytes.
void check_nhwc_output(const KernelOps& ops, const ConvParams& p, const ActivationLayout& l, const uint64_t* packed,
                       const uint64_t* pw, const ZeroPadCorrection& zp, const std::vector<float>& scale,
                       const std::vector<float>& bias, const std::vector<float>& y, const std::string& name) {
  const int64_t c = p.out_channels, hw = p.out_h() * p.out_w();
  auto nhwc = [&](size_t i) {  // NCHW element i's NHWC index
    const int64_t n = i / (c * hw), o = (i / hw) % c, pixel = i % hw;
    return (n * hw + pixel) * c + o;
  };
  std::vector<float> residual(y.size()), residual_nhwc(y.size()), slope(c), out(y.size(), NAN);
  fill_signed(residual);
  for (size_t i = 0; i < y.size(); ++i) residual_nhwc[nhwc(i)] = residual[i];
  for (auto& e : slope) e = std::uniform_real_distribution<float>(-0.5f, 0.5f)(rng);
  std::vector<float> thresholds(c);
  for (auto& e : thresholds) e = std::uniform_real_distribution<float>(-4.0f, 4.0f)(rng);
  // Variant 3: variant 1 with the residual in the output buffer itself (the op's input_shortcut writes it there).
  // Variants 4 and 5: the residual alone, PReLU alone (each a fixed Steps of its own, output_stage.h).
  // Runs 6-11: variants 0-5 through the output stage that tests its steps per vector.
  for (int run = 0; run < 12; ++run) {
    const int variant = run % 6;
    const bool per_vector = run >= 6;
    const bool adds_residual = variant == 1 || variant == 3 || variant == 4;
    const bool prelu = variant == 1 || variant == 3 || variant == 5;
    OutputStage st;
    st.scale = scale.data();
    st.bias = bias.data();
    st.zero_pad = &zp;
    st.channels_last = 1;
    st.per_vector_steps = per_vector;
    std::vector<uint8_t> signs(y.size(), 7);
    if (adds_residual) st.residual = residual_nhwc.data();
    if (prelu) st.prelu = slope.data();
    if (variant == 3) {
      out = residual_nhwc;
      st.residual = out.data();
    }
    if (variant == 2) {
      st.out_signs = signs.data();
      st.out_threshold = thresholds.data();
    } else {
      st.out = out.data();
    }
    ops.conv(p, l, packed, pw, st, 0, ops.conv_tasks(p, l));
    int64_t wrong = 0;
    for (size_t i = 0; i < y.size(); ++i) {
      const int64_t o = (i / hw) % c;
      float e = y[i];
      if (adds_residual) e += residual[i];
      if (prelu && !(e >= 0.0f)) e *= slope[o];
      wrong += variant == 2 ? signs[nhwc(i)] != static_cast<uint8_t>(!(e >= thresholds[o])) : out[nhwc(i)] != e;
    }
    const char* variants[] = {"plain", "residual + PReLU", "signs", "residual in the output + PReLU", "residual",
                              "PReLU"};
    EXPECT(wrong == 0, "[%s] NHWC output (%s%s) %s: %lld of %zu outputs wrong", name.c_str(), variants[variant],
           per_vector ? ", steps tested per vector" : "", describe(p).c_str(), static_cast<long long>(wrong), y.size());
  }
}

void test_sign_io(int cases) {
  for (int iter = 0; iter < cases; ++iter) {
    ConvParams p;
    p.batch = pick(1, 2);
    p.groups = pick(0, 3) == 0 ? 2 : 1;
    p.in_channels = p.groups * pick(1, 90);
    p.out_channels = p.groups * pick(1, 20);
    p.in_h = pick(3, 12);
    p.in_w = pick(3, 20);
    p.kernel_h = p.kernel_w = pick(0, 2) == 0 ? 1 : 3;  // 1x1 too: the thin layers take other paths
    p.stride_h = p.stride_w = pick(1, 2);
    p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 1;
    p.pad_value = static_cast<PadValue>(pick(-1, 1));
    std::vector<float> x(p.batch * p.in_channels * p.in_h * p.in_w), w(p.out_channels * p.channels_per_group() * 9);
    std::vector<float> t(p.in_channels), scale(p.out_channels), bias(p.out_channels), out_t(p.out_channels);
    fill_signed(x);
    fill_signed(w);
    for (auto& e : t) e = std::uniform_real_distribution<float>(-0.5f, 0.5f)(rng);
    for (auto& e : scale) e = std::uniform_real_distribution<float>(0.1f, 2.0f)(rng);
    for (auto& e : bias) e = std::uniform_real_distribution<float>(-3.0f, 3.0f)(rng);
    for (auto& e : out_t) e = std::uniform_real_distribution<float>(-4.0f, 4.0f)(rng);
    const TensorStrides s{p.in_channels * p.in_h * p.in_w, p.in_h * p.in_w, p.in_w, 1};
    std::vector<uint8_t> x_signs(x.size());
    for (size_t i = 0; i < x.size(); ++i) x_signs[i] = !(x[i] >= t[(i / (p.in_h * p.in_w)) % p.in_channels]);
    std::vector<uint64_t> bits(weight_words(p));
    WordBuffer formatted;
    std::vector<int32_t> tap_sum(p.out_channels * 9);
    pack_weights(p, w.data(), bits.data(), tap_sum.data());
    const ZeroPadCorrection zp = zero_pad_correction(p, tap_sum.data());
    for (const auto& name : available_backends()) {
      const KernelOps& ops = *find_backend(name);
      const ActivationLayout l = ops.layout(p);
      std::vector<uint64_t> packed(l.total_words);
      const uint64_t* pw = family_weight(ops, p, bits.data(), formatted);
      std::vector<float> y(p.batch * p.out_channels * p.out_h() * p.out_w());
      binary_conv2d_serial(ops, p, x.data(), s, w.data(), scale.data(), bias.data(), y.data(), t.data());
      ops.pack_signs(p, l, x_signs.data(), s, packed.data(), 0, ops.pack_tasks(p, l));
      OutputStage st;
      st.scale = scale.data();
      st.bias = bias.data();
      st.zero_pad = &zp;
      std::vector<float> y2(y.size());
      st.out = y2.data();
      ops.conv(p, l, packed.data(), pw, st, 0, ops.conv_tasks(p, l));
      EXPECT(y2 == y, "[%s] sign input differs from float input with the same threshold", name.c_str());
      // Each of the output stage's fixed Steps against the same float operations, in the same order, done here:
      // the residual and PReLU alone and together, a narrowing residual's channel mean (residual_channels: the
      // channels real_shortcut maps onto each output channel) alone and with PReLU; each also through the output
      // stage that tests its steps per vector.
      std::vector<float> residual(y.size()), slope(p.out_channels);
      fill_signed(residual);
      for (auto& e : slope) e = std::uniform_real_distribution<float>(-0.5f, 0.5f)(rng);
      const int64_t plane_size = p.out_h() * p.out_w();
      const auto expected = [&](const float* added, const float* prelu) {
        std::vector<float> want(y.size());
        for (size_t i = 0; i < y.size(); ++i) {
          float e = y[i];
          if (added) e = e + added[i];
          if (prelu && !(e >= 0.0f)) e *= prelu[(i / plane_size) % p.out_channels];
          want[i] = e;
        }
        return want;
      };
      {
        const int64_t channels = 2 * p.out_channels;
        std::vector<float> source(p.batch * channels * plane_size), mapped(y.size());
        fill_signed(source);
        const ShortcutShape shape{p.batch, channels, p.out_h(), p.out_w(), p.out_channels, 1, false};
        real_shortcut(scalar_kernel(), shape, source.data(), mapped.data(), run_serially);
        struct StepsCase {
          const char* what;
          const float* residual;
          int64_t residual_channels;
          const float* added;  // what the output stage adds at each output element
          const float* prelu;
        };
        const StepsCase steps_cases[] = {{"residual alone", residual.data(), 0, residual.data(), nullptr},
                                         {"PReLU alone", nullptr, 0, nullptr, slope.data()},
                                         {"residual + PReLU", residual.data(), 0, residual.data(), slope.data()},
                                         {"channel mean alone", source.data(), channels, mapped.data(), nullptr},
                                         {"channel mean + PReLU", source.data(), channels, mapped.data(),
                                          slope.data()}};
        for (const StepsCase& c : steps_cases) {
          const std::vector<float> want = expected(c.added, c.prelu);
          for (const bool per_vector : {false, true}) {
            std::vector<float> got(y.size());
            st.per_vector_steps = per_vector;
            st.residual = c.residual;
            st.residual_channels = c.residual_channels;
            st.prelu = c.prelu;
            st.out = got.data();
            ops.conv(p, l, packed.data(), pw, st, 0, ops.conv_tasks(p, l));
            int64_t wrong = 0;
            for (size_t i = 0; i < y.size(); ++i) wrong += got[i] != want[i];
            EXPECT(wrong == 0, "[%s] %s in the output stage%s: %lld outputs wrong (%s)", name.c_str(), c.what,
                   per_vector ? " (steps tested per vector)" : "", static_cast<long long>(wrong), describe(p).c_str());
          }
        }
        st.residual_channels = 0;
        st.per_vector_steps = false;
      }
      // The residual in the output itself (the op's input_shortcut writes it there): each element is read by the
      // vector that then stores it, so the result is the same.
      std::vector<float> in_place = residual;
      st.out = in_place.data();
      st.residual = in_place.data();
      st.prelu = slope.data();
      ops.conv(p, l, packed.data(), pw, st, 0, ops.conv_tasks(p, l));
      EXPECT(in_place == expected(residual.data(), slope.data()),
             "[%s] residual in the output buffer: %s differs from a separate residual", name.c_str(),
             describe(p).c_str());
      // The other channel mappings (an uneven mean, copies when the shortcut widens) give the same bits as
      // real_shortcut's mapping applied first.
      for (const int64_t channels : {2 * p.out_channels + 1, (p.out_channels + 1) / 2}) {
        std::vector<float> source(p.batch * channels * plane_size), mapped(y.size()), got(y.size()), want(y.size());
        fill_signed(source);
        const ShortcutShape shape{p.batch, channels, p.out_h(), p.out_w(), p.out_channels, 1, false};
        real_shortcut(scalar_kernel(), shape, source.data(), mapped.data(), run_serially);
        st.residual = mapped.data();
        st.out = want.data();
        ops.conv(p, l, packed.data(), pw, st, 0, ops.conv_tasks(p, l));
        st.residual = source.data();
        st.residual_channels = channels;
        st.out = got.data();
        ops.conv(p, l, packed.data(), pw, st, 0, ops.conv_tasks(p, l));
        st.residual_channels = 0;
        EXPECT(got == want, "[%s] residual of %lld channels mapped in the output stage: %s differs from the mapped "
               "residual", name.c_str(), static_cast<long long>(channels), describe(p).c_str());
      }
      st.residual = nullptr;
      st.prelu = nullptr;
      std::vector<uint8_t> signs(y.size(), 7);
      st.out = nullptr;
      st.out_signs = signs.data();
      st.out_threshold = out_t.data();
      ops.conv(p, l, packed.data(), pw, st, 0, ops.conv_tasks(p, l));
      int64_t bad = 0;
      for (size_t i = 0; i < y.size(); ++i)
        bad += signs[i] != static_cast<uint8_t>(!(y[i] >= out_t[(i / plane_size) % p.out_channels]));
      EXPECT(bad == 0, "[%s] %lld sign outputs wrong", name.c_str(), static_cast<long long>(bad));
      if (ops.channels_last_output) check_nhwc_output(ops, p, l, packed.data(), pw, zp, scale, bias, y, name);
    }
  }
}

// The convolution pass run as several task ranges (as threads run it: each range a separate call) must write exactly
// what one call over all tasks writes: families may prepare per-call state for the tasks of their range only. In both
// output layouts, and the NHWC output must be the NCHW one transposed (NHWC blocks scatter a pixel's channels).
void test_task_ranges(int cases) {
  for (int iter = 0; iter < cases; ++iter) {
    ConvParams p;
    p.batch = pick(1, 3);
    p.groups = pick(0, 2) == 0 ? pick(2, 3) : 1;
    p.in_channels = p.groups * pick(1, 140);
    // One case in four wide and large (a few hundred channels and pixels): many channel and strip blocks per range.
    const bool large = iter % 4 == 0;
    p.out_channels = p.groups * (large ? pick(150, 300) : pick(1, 30));
    p.in_h = large ? pick(12, 20) : pick(1, 14);
    p.in_w = large ? pick(12, 30) : pick(1, 25);
    p.kernel_h = p.kernel_w = pick(0, 1) ? 3 : 1;
    p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = p.kernel_h / 2;
    p.stride_h = p.stride_w = large ? 1 : pick(1, 2);
    p.pad_value = static_cast<PadValue>(pick(-1, 1));
    if (!validate(p).empty()) continue;
    std::vector<float> x(p.batch * p.in_channels * p.in_h * p.in_w);
    std::vector<float> w(p.out_channels * p.channels_per_group() * p.taps());
    fill_signed(x);
    fill_signed(w);
    const TensorStrides s{p.in_channels * p.in_h * p.in_w, p.in_h * p.in_w, p.in_w, 1};
    std::vector<uint64_t> bits(weight_words(p));
    std::vector<int32_t> tap_sum(p.out_channels * p.taps());
    pack_weights(p, w.data(), bits.data(), tap_sum.data());
    const ZeroPadCorrection zp = zero_pad_correction(p, tap_sum.data());
    const int64_t plane = p.out_h() * p.out_w();
    for (const auto& name : available_backends()) {
      const KernelOps& ops = *find_backend(name);
      const ActivationLayout l = ops.layout(p);
      WordBuffer packed(l.total_words), formatted;
      const uint64_t* pw = family_weight(ops, p, bits.data(), formatted);
      ops.pack(p, l, x.data(), s, nullptr, packed.data(), 0, ops.pack_tasks(p, l));
      const size_t outputs = p.batch * p.out_channels * plane;
      std::vector<float> nchw(outputs, NAN);
      for (bool nhwc : {false, true}) {
        if (nhwc && !ops.channels_last_output) continue;
        OutputStage st;
        st.zero_pad = &zp;
        st.channels_last = nhwc;
        std::vector<float> whole(outputs, NAN), pieces(outputs, NAN);
        const int64_t tasks = ops.conv_tasks(p, l);
        st.out = whole.data();
        ops.conv(p, l, packed.data(), pw, st, 0, tasks);
        st.out = pieces.data();
        for (int64_t b = tasks; b > 0;) {  // ranges of random sizes, last first
          const int64_t a = b - pick(1, std::max<int64_t>(1, tasks / 3));
          ops.conv(p, l, packed.data(), pw, st, std::max<int64_t>(a, 0), b);
          b = std::max<int64_t>(a, 0);
        }
        EXPECT(pieces == whole, "[%s] %s %s: task ranges run apart differ from one call", name.c_str(),
               nhwc ? "NHWC" : "NCHW", describe(p).c_str());
        if (!nhwc) {
          nchw = whole;
          continue;
        }
        bool same = true;  // the NHWC output is the NCHW one, transposed
        for (int64_t n = 0; n < p.batch; ++n)
          for (int64_t c = 0; c < p.out_channels; ++c)
            for (int64_t i = 0; i < plane; ++i)
              same &= whole[(n * plane + i) * p.out_channels + c] == nchw[(n * p.out_channels + c) * plane + i];
        EXPECT(same, "[%s] %s: NHWC output differs from the NCHW output", name.c_str(), describe(p).c_str());
      }
    }
  }
}

// The training path's elementwise passes (training.cpp) against a scalar evaluation of their definitions: every
// layout (NCHW, NHWC, and NCHW with the other operand in NHWC), the 4 x 4 tiles' channel and pixel tails, NaN,
// infinities and -0.0; sums against double sums, and the same sums whatever the task ranges.
float ste_factor_of(SteKind kind, float d) {
  const float a = std::fabs(d);
  if (kind == SteKind::clipped) return a <= 1.0f ? 1.0f : 0.0f;
  if (kind == SteKind::identity) return std::isfinite(d) ? 1.0f : 0.0f;
  const float slope = 2.0f - 2.0f * a;
  return slope > 0.0f ? slope : 0.0f;
}

bool same_float(float a, float b) { return (std::isnan(a) && std::isnan(b)) || a == b; }

bool close_sum(double got, double want, double scale) {
  return (std::isnan(got) && std::isnan(want)) || got == want || std::fabs(got - want) <= 1e-5 * std::max(1.0, scale);
}

// A pass's scalar evaluation over NCHW data: each element's value, and per channel (channel 0 only when `shared`)
// the sum of the elements' terms and of their magnitudes (the scale a float sum's rounding is judged against).
struct Expected {
  std::vector<float> values;
  std::vector<double> sums, scale;
};

template <class Element>  // element(k, ch) -> (value, term)
Expected evaluate_nchw(int64_t n, int64_t c, int64_t hw, bool shared, const Element& element) {
  Expected e{std::vector<float>(static_cast<size_t>(n * c * hw)), std::vector<double>(c, 0.0),
             std::vector<double>(c, 0.0)};
  for (int64_t i = 0; i < n; ++i)
    for (int64_t ch = 0; ch < c; ++ch)
      for (int64_t p = 0; p < hw; ++p) {
        const int64_t k = (i * c + ch) * hw + p;
        const auto [value, term] = element(k, ch);
        e.values[k] = value;
        e.sums[shared ? 0 : ch] += term;
        e.scale[shared ? 0 : ch] += std::fabs(term);
      }
  return e;
}

bool same_floats(const std::vector<float>& got, const std::vector<float>& want) {
  return got.size() == want.size() && std::equal(got.begin(), got.end(), want.begin(), same_float);
}

bool close_sums(const std::vector<float>& got, const Expected& want, int64_t count) {
  for (int64_t ch = 0; ch < count; ++ch)
    if (!close_sum(got[ch], want.sums[ch], want.scale[ch])) return false;
  return true;
}

// Task ranges of random sizes, in random order: the sums must not depend on how the tasks are split.
void random_pieces(int64_t tasks, int64_t, const TaskBody& body) {
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (int64_t a = 0; a < tasks;) {
    const int64_t b = std::min(tasks, a + pick(1, std::max<int64_t>(1, tasks / 3)));
    ranges.emplace_back(a, b);
    a = b;
  }
  std::shuffle(ranges.begin(), ranges.end(), rng);
  for (const auto& r : ranges) body(r.first, r.second);
}

std::vector<float> nhwc_of(const std::vector<float>& v, int64_t n, int64_t c, int64_t hw) {  // NCHW -> NHWC
  std::vector<float> out(v.size());
  for (int64_t i = 0; i < n; ++i)
    for (int64_t ch = 0; ch < c; ++ch)
      for (int64_t p = 0; p < hw; ++p) out[(i * hw + p) * c + ch] = v[(i * c + ch) * hw + p];
  return out;
}

void test_training_passes(int cases) {
  const ParallelFor pieces = random_pieces;
  const float specials[] = {0.0f, -0.0f, NAN, INFINITY, -INFINITY, 1.0f, -1.0f, 1e-40f};
  for (int iter = 0; iter < cases; ++iter) {
    const int64_t n = pick(1, 3), c = pick(1, 70), hw = pick(0, 3) == 0 ? pick(257, 600) : pick(1, 40);
    const size_t size = static_cast<size_t>(n * c * hw);
    std::vector<float> x(size), g(size), t(c), w(c);
    std::normal_distribution<float> normal(0.0f, 1.5f);
    for (auto& v : x) v = pick(0, 20) == 0 ? specials[pick(0, 7)] : normal(rng);
    for (auto& v : g) v = pick(0, 50) == 0 ? specials[pick(0, 4)] : normal(rng);
    for (auto& v : t) v = normal(rng) * 0.3f;
    for (auto& v : w) v = normal(rng) * 0.3f;
    auto nhwc_of = [&](const std::vector<float>& v) { return ::nhwc_of(v, n, c, hw); };
    const std::vector<float> x_nhwc = nhwc_of(x), g_nhwc = nhwc_of(g);
    const ChannelView nchw{n, c, hw}, nhwc{n * hw, c, 1};

    // binary_signs: NCHW, NHWC, NCHW -> NHWC
    std::vector<float> want_signs(size), out(size);
    for (size_t i = 0; i < size; ++i) want_signs[i] = x[i] >= t[(i / hw) % c] ? 1.0f : -1.0f;
    binary_signs(nchw, x.data(), t.data(), out.data(), false, pieces);
    EXPECT(out == want_signs, "binary_signs NCHW (c %lld, hw %lld)", (long long)c, (long long)hw);
    binary_signs(nhwc, x_nhwc.data(), t.data(), out.data(), false, pieces);
    EXPECT(out == nhwc_of(want_signs), "binary_signs NHWC (c %lld, hw %lld)", (long long)c, (long long)hw);
    binary_signs(nchw, x.data(), t.data(), out.data(), true, pieces);
    EXPECT(out == nhwc_of(want_signs), "binary_signs NCHW -> NHWC (c %lld, hw %lld)", (long long)c, (long long)hw);

    // ste_input_grad: NCHW, NHWC, NCHW with an NHWC gradient; sums per channel
    for (SteKind kind : {SteKind::clipped, SteKind::identity, SteKind::approx}) {
      const Expected want = evaluate_nchw(n, c, hw, false, [&](int64_t k, int64_t ch) {
        const float value = g[k] * ste_factor_of(kind, x[k] - t[ch]);
        return std::make_pair(value, static_cast<double>(value));
      });
      const int layouts = 3;
      for (int layout = 0; layout < layouts; ++layout) {
        std::vector<float> got(size), sums(c);
        if (layout == 0)
          ste_input_grad(nchw, kind, g.data(), false, x.data(), t.data(), got.data(), sums.data(), pieces);
        if (layout == 1)
          ste_input_grad(nhwc, kind, g_nhwc.data(), false, x_nhwc.data(), t.data(), got.data(), sums.data(), pieces);
        if (layout == 2)
          ste_input_grad(nchw, kind, g_nhwc.data(), true, x.data(), t.data(), got.data(), sums.data(), pieces);
        EXPECT(same_floats(got, layout == 1 ? nhwc_of(want.values) : want.values),
               "ste_input_grad kind %d layout %d (c %lld, hw %lld)", (int)kind, layout, (long long)c, (long long)hw);
        EXPECT(close_sums(sums, want, c), "ste_input_grad sums kind %d layout %d (c %lld, hw %lld)", (int)kind,
               layout, (long long)c, (long long)hw);
        std::vector<float> again(size), sums_again(c);  // another split of the tasks: the same sums, bit for bit
        if (layout == 0)
          ste_input_grad(nchw, kind, g.data(), false, x.data(), t.data(), again.data(), sums_again.data(), pieces);
        if (layout == 2)
          ste_input_grad(nchw, kind, g_nhwc.data(), true, x.data(), t.data(), again.data(), sums_again.data(), pieces);
        if (layout != 1)
          EXPECT(std::equal(sums.begin(), sums.end(), sums_again.begin(), same_float),
                 "ste_input_grad sums depend on the task split (layout %d)", layout);
      }
    }

    // prelu_backward: per channel and shared slope, NCHW and NHWC
    for (bool shared : {false, true}) {
      const Expected want = evaluate_nchw(n, c, hw, shared, [&](int64_t k, int64_t ch) {
        const float slope = w[shared ? 0 : ch];
        return x[k] > 0.0f ? std::make_pair(g[k], 0.0) : std::make_pair(slope * g[k], double(x[k] * g[k]));
      });
      for (int layout = 0; layout < 2; ++layout) {
        std::vector<float> got(size), sums(c);
        prelu_backward(layout ? nhwc : nchw, shared, layout ? g_nhwc.data() : g.data(),
                       layout ? x_nhwc.data() : x.data(), w.data(), got.data(), sums.data(), pieces);
        EXPECT(same_floats(got, layout ? nhwc_of(want.values) : want.values),
               "prelu_backward shared %d layout %d (c %lld, hw %lld)", (int)shared, layout, (long long)c,
               (long long)hw);
        EXPECT(close_sums(sums, want, shared ? 1 : c), "prelu_backward sums shared %d layout %d (c %lld, hw %lld)",
               (int)shared, layout, (long long)c, (long long)hw);
      }
    }
  }
}

// BatchNorm + residual + PReLU: the moments against double sums, the forward pass and the backward's gradients
// and sums against a scalar evaluation of their formulas, in both layouts, with random task splits.
void test_batch_norm_passes(int cases) {
  const ParallelFor pieces = random_pieces;
  for (int iter = 0; iter < cases; ++iter) {
    const int64_t n = pick(1, 3), c = pick(1, 40), hw = pick(0, 3) == 0 ? pick(257, 2000) : pick(2, 40);
    const size_t size = static_cast<size_t>(n * c * hw);
    const double count = static_cast<double>(n * hw);
    const bool shared = pick(0, 3) == 0, batch_stats = pick(0, 3) != 0;
    std::normal_distribution<float> normal(0.0f, 1.5f);
    const float offset = pick(0, 2) == 0 ? 500.0f : 0.0f;  // a mean far from zero: no cancellation allowed
    std::vector<float> x(size), r(size), g(size), beta(c), gamma(c), slope(c);
    for (auto& v : x) v = normal(rng) + offset;
    for (auto& v : r) v = normal(rng);
    for (auto& v : g) v = normal(rng);
    for (int64_t ch = 0; ch < c; ++ch) {
      beta[ch] = normal(rng);
      gamma[ch] = normal(rng);
      slope[ch] = normal(rng) * 0.3f;
    }
    const ChannelView nchw{n, c, hw}, nhwc{n * hw, c, 1};
    const std::vector<float> x_nhwc = nhwc_of(x, n, c, hw), r_nhwc = nhwc_of(r, n, c, hw),
                             g_nhwc = nhwc_of(g, n, c, hw);

    // moments
    std::vector<double> want_mean(c, 0.0), want_var(c, 0.0);
    for (size_t k = 0; k < size; ++k) want_mean[(k / hw) % c] += x[k] / count;
    for (size_t k = 0; k < size; ++k) {
      const double d = x[k] - want_mean[(k / hw) % c];
      want_var[(k / hw) % c] += d * d / count;
    }
    std::vector<float> mean(c), var(c), invstd(c);
    for (int layout = 0; layout < 2; ++layout) {
      channel_moments(layout ? nhwc : nchw, layout ? x_nhwc.data() : x.data(), mean.data(), var.data(), pieces);
      bool ok = true;
      for (int64_t ch = 0; ch < c; ++ch)
        ok = ok && std::fabs(mean[ch] - want_mean[ch]) <= 1e-6 * std::max(1.0, std::fabs(want_mean[ch])) &&
             std::fabs(var[ch] - want_var[ch]) <= 1e-4 * want_var[ch] + 1e-7;
      EXPECT(ok, "channel_moments layout %d (n %lld, c %lld, hw %lld, offset %g)", layout, (long long)n,
             (long long)c, (long long)hw, offset);
    }
    for (int64_t ch = 0; ch < c; ++ch) invstd[ch] = 1.0f / std::sqrt(var[ch] + 1e-5f);

    // forward: z = (x - mean) * gamma * invstd + beta + r, out = prelu(z)
    const float* w = slope.data();
    auto slope_of = [&](int64_t ch) { return w[shared ? 0 : ch]; };
    const Expected z_want = evaluate_nchw(n, c, hw, false, [&](int64_t k, int64_t ch) {
      return std::make_pair((x[k] - mean[ch]) * (gamma[ch] * invstd[ch]) + beta[ch] + r[k], 0.0);
    });
    const Expected out_want = evaluate_nchw(n, c, hw, false, [&](int64_t k, int64_t ch) {
      const float z = z_want.values[k];
      return std::make_pair(z > 0.0f ? z : slope_of(ch) * z, 0.0);
    });
    for (int layout = 0; layout < 2; ++layout) {
      std::vector<float> z(size), out(size);
      batch_norm_add_prelu(layout ? nhwc : nchw, layout ? x_nhwc.data() : x.data(), mean.data(), invstd.data(),
                           gamma.data(), beta.data(), layout ? r_nhwc.data() : r.data(), shared, w, z.data(),
                           out.data(), pieces);
      // FMA contraction may round (x - mean) * scale + beta once instead of twice
      bool ok = true;
      const std::vector<float> zw = layout ? nhwc_of(z_want.values, n, c, hw) : z_want.values,
                               ow = layout ? nhwc_of(out_want.values, n, c, hw) : out_want.values;
      for (size_t k = 0; k < size; ++k)
        ok = ok && std::fabs(z[k] - zw[k]) <= 1e-5f * (1.0f + std::fabs(zw[k])) &&
             out[k] == (z[k] > 0.0f ? z[k] : w[shared ? 0 : (layout ? k % c : (k / hw) % c)] * z[k]);
      EXPECT(ok, "batch_norm_add_prelu layout %d (c %lld, hw %lld)", layout, (long long)c, (long long)hw);
    }

    // backward, from the z the forward stored (NCHW)
    std::vector<float> z(size), out(size);
    batch_norm_add_prelu(nchw, x.data(), mean.data(), invstd.data(), gamma.data(), beta.data(), r.data(), shared, w,
                         z.data(), out.data(), pieces);
    const Expected gz_want = evaluate_nchw(n, c, hw, shared, [&](int64_t k, int64_t ch) {
      return z[k] > 0.0f ? std::make_pair(g[k], 0.0) : std::make_pair(slope_of(ch) * g[k], double(z[k] * g[k]));
    });
    const Expected centered = evaluate_nchw(n, c, hw, false, [&](int64_t k, int64_t ch) {
      const double gz = gz_want.values[k];
      return std::make_pair(0.0f, gz * (x[k] - mean[ch]));
    });
    const Expected gz_sums = evaluate_nchw(n, c, hw, false, [&](int64_t k, int64_t) {
      return std::make_pair(0.0f, double(gz_want.values[k]));
    });
    const Expected gx_want = evaluate_nchw(n, c, hw, false, [&](int64_t k, int64_t ch) {
      const double s = invstd[ch], a = s * gamma[ch], gz = gz_want.values[k];
      const double gx = batch_stats ? (gz - gz_sums.sums[ch] / count -
                                       (x[k] - mean[ch]) * centered.sums[ch] * s * s / count) * a
                                    : gz * a;
      return std::make_pair(static_cast<float>(gx), 0.0);
    });
    const std::vector<float> z_nhwc = nhwc_of(z, n, c, hw);
    for (int layout = 0; layout < 2; ++layout) {
      std::vector<float> gx(size), gz(size), grad_gamma(c), grad_beta(c), grad_slope(c);
      batch_norm_add_prelu_backward(layout ? nhwc : nchw, batch_stats, layout ? g_nhwc.data() : g.data(),
                                    layout ? z_nhwc.data() : z.data(), layout ? x_nhwc.data() : x.data(),
                                    mean.data(), invstd.data(), gamma.data(), shared, w, gx.data(), gz.data(),
                                    grad_gamma.data(), grad_beta.data(), grad_slope.data(), pieces);
      EXPECT(same_floats(gz, layout ? nhwc_of(gz_want.values, n, c, hw) : gz_want.values),
             "batch_norm_add_prelu_backward grad_z layout %d (c %lld, hw %lld)", layout, (long long)c, (long long)hw);
      const std::vector<float> gxw = layout ? nhwc_of(gx_want.values, n, c, hw) : gx_want.values;
      const std::vector<double> gx_scale = [&] {  // per element, the size of the terms its rounding is judged on
        std::vector<double> v(size);
        for (int64_t i = 0; i < n; ++i)
          for (int64_t ch = 0; ch < c; ++ch)
            for (int64_t p = 0; p < hw; ++p) {
              const int64_t k = (i * c + ch) * hw + p;
              v[layout ? (i * hw + p) * c + ch : k] = std::fabs(gx_want.values[k]) + 1.0;
            }
        return v;
      }();
      bool ok = true;
      for (size_t k = 0; k < size; ++k) ok = ok && std::fabs(gx[k] - gxw[k]) <= 2e-4 * gx_scale[k];
      EXPECT(ok, "batch_norm_add_prelu_backward grad_x layout %d batch_stats %d (c %lld, hw %lld)", layout,
             (int)batch_stats, (long long)c, (long long)hw);
      bool sums_ok = close_sums(grad_beta, gz_sums, c) && close_sums(grad_slope, gz_want, shared ? 1 : c);
      for (int64_t ch = 0; ch < c; ++ch)  // x - mean is rounded to float: by up to 1.2e-7 * offset
        sums_ok = sums_ok && close_sum(grad_gamma[ch], centered.sums[ch] * invstd[ch],
                                       (centered.scale[ch] + 1e-2 * offset * gz_sums.scale[ch]) * invstd[ch]);
      EXPECT(sums_ok, "batch_norm_add_prelu_backward sums layout %d (c %lld, hw %lld)", layout, (long long)c,
             (long long)hw);
    }
  }
}

// The real-valued shortcut (shortcut.cpp) against its definition evaluated in double: random shapes with odd edges
// (ceil mode's partial windows), every channel mapping (identity, k-to-1 means, k-fold repeats, and the adaptive
// ranges of non-divisible counts), both strides; NHWC must give NCHW's bits, whatever the task ranges, and every
// family's window_means the portable loop's (rows past a vector of outputs included).
void test_real_shortcut(int cases) {
  const ParallelFor pieces = random_pieces;
  const int64_t channel_choices[] = {1, 2, 3, 4, 6, 7, 8, 12, 16, 32, 48, 64};
  for (int iter = 0; iter < cases; ++iter) {
    ShortcutShape s;
    s.batch = pick(1, 3);
    s.in_channels = channel_choices[pick(0, 11)];
    s.out_channels = channel_choices[pick(0, 11)];
    s.stride = pick(1, 2);
    s.height = pick(1, 13);
    s.width = pick(0, 3) == 0 ? pick(30, 70) : pick(1, 13);
    const int64_t c = s.in_channels, o = s.out_channels, h = s.height, w = s.width;
    const int64_t oh = (h + s.stride - 1) / s.stride, ow = (w + s.stride - 1) / s.stride;
    std::vector<float> x(static_cast<size_t>(s.batch * c * h * w));
    std::normal_distribution<float> normal(0.0f, 2.0f);
    for (auto& v : x) v = normal(rng);
    std::vector<float> want(static_cast<size_t>(s.batch * o * oh * ow));
    for (int64_t n = 0; n < s.batch; ++n)
      for (int64_t oc = 0; oc < o; ++oc) {
        const int64_t begin = oc * c / o, end = o > c ? begin + 1 : ((oc + 1) * c + o - 1) / o;
        for (int64_t i = 0; i < oh; ++i)
          for (int64_t j = 0; j < ow; ++j) {
            double total = 0.0;
            int64_t count = 0;
            for (int64_t ch = begin; ch < end; ++ch)
              for (int64_t y = i * s.stride; y < std::min(h, (i + 1) * s.stride); ++y)
                for (int64_t xx = j * s.stride; xx < std::min(w, (j + 1) * s.stride); ++xx, ++count)
                  total += x[((n * c + ch) * h + y) * w + xx];
            // Every window of a channel range has the same pixel count, so this is the mean of the window means.
            want[((n * o + oc) * oh + i) * ow + j] = static_cast<float>(total / static_cast<double>(count));
          }
      }
    std::vector<float> got(want.size()), got_nhwc(want.size());
    real_shortcut(s, x.data(), got.data(), pieces);
    bool ok = true;
    for (size_t k = 0; k < want.size(); ++k)
      ok = ok && std::fabs(got[k] - want[k]) <= 1e-5f * std::max(1.0f, std::fabs(want[k]));
    s.nhwc = true;
    real_shortcut(s, nhwc_of(x, s.batch, c, h * w).data(), got_nhwc.data(), pieces);
    EXPECT(ok, "real_shortcut NCHW (n %lld, %lld -> %lld, stride %lld, %lldx%lld)", (long long)s.batch,
           (long long)c, (long long)o, (long long)s.stride, (long long)h, (long long)w);
    EXPECT(same_floats(got_nhwc, nhwc_of(got, s.batch, o, oh * ow)),
           "real_shortcut NHWC differs from NCHW (n %lld, %lld -> %lld, stride %lld, %lldx%lld)", (long long)s.batch,
           (long long)c, (long long)o, (long long)s.stride, (long long)h, (long long)w);
    s.nhwc = false;
    for (const auto& name : available_backends()) {
      std::vector<float> family(want.size());
      real_shortcut(*find_backend(name), s, x.data(), family.data(), pieces);
      EXPECT(same_floats(family, got), "[%s] real_shortcut NCHW differs from the selected family's (%lld -> %lld, "
             "stride %lld, %lldx%lld)", name.c_str(), (long long)c, (long long)o, (long long)s.stride, (long long)h,
             (long long)w);
    }
  }
}

// SPPF's chained max pools (max_pools.cpp) against a direct k x k window scan of each pool's input with PyTorch's rule
// (the first of equal values, NaN propagating), signed zeros and NaN included; NHWC must give NCHW's bits.
void test_chained_max_pools(int cases) {
  const ParallelFor pieces = random_pieces;
  const int64_t channel_choices[] = {1, 2, 3, 16, 64, 70};
  for (int iter = 0; iter < cases; ++iter) {
    ChainedPoolShape s;
    s.batch = pick(1, 2);
    s.channels = channel_choices[pick(0, 5)];
    s.height = pick(1, 17);
    s.width = pick(1, 17);
    s.kernel = 2 * pick(0, 4) + 1;
    s.pools = pick(1, 3);
    const int64_t c = s.channels, h = s.height, w = s.width, r = s.kernel / 2, plane = h * w;
    std::vector<float> x(static_cast<size_t>(s.batch * c * plane));
    std::normal_distribution<float> normal;
    for (auto& v : x) {
      const int64_t kind = pick(0, 40);
      v = kind == 0 ? std::numeric_limits<float>::quiet_NaN() : kind == 1 ? 0.0f : kind == 2 ? -0.0f : normal(rng);
    }
    // want: slot 0 is x; slot p is the window scan of slot p - 1 (NCHW).
    const int64_t slots = s.pools + 1;
    std::vector<float> want(static_cast<size_t>(s.batch * slots * c * plane));
    for (int64_t n = 0; n < s.batch; ++n)
      for (int64_t ch = 0; ch < c; ++ch) {
        std::copy(x.begin() + (n * c + ch) * plane, x.begin() + (n * c + ch + 1) * plane,
                  want.begin() + (n * slots * c + ch) * plane);
        for (int64_t p = 1; p < slots; ++p) {
          const float* src = want.data() + ((n * slots + p - 1) * c + ch) * plane;
          float* dst = want.data() + ((n * slots + p) * c + ch) * plane;
          std::vector<float> rows(static_cast<size_t>(plane));
          for (int64_t i = 0; i < h; ++i)  // 1 x k, then k x 1: the composition the op reproduces
            for (int64_t j = 0; j < w; ++j) {
              float m = -std::numeric_limits<float>::infinity();
              for (int64_t t = std::max<int64_t>(0, j - r); t < std::min(w, j + r + 1); ++t) {
                const float v = src[i * w + t];
                if (v > m || std::isnan(v)) m = v;
              }
              rows[i * w + j] = m;
            }
          for (int64_t i = 0; i < h; ++i)
            for (int64_t j = 0; j < w; ++j) {
              float m = -std::numeric_limits<float>::infinity();
              for (int64_t t = std::max<int64_t>(0, i - r); t < std::min(h, i + r + 1); ++t) {
                const float v = rows[t * w + j];
                if (v > m || std::isnan(v)) m = v;
              }
              dst[i * w + j] = m;
            }
        }
      }
    auto same_bits = [](const std::vector<float>& a, const std::vector<float>& b) {
      if (a.size() != b.size()) return false;
      for (size_t k = 0; k < a.size(); ++k)
        if (std::isnan(a[k]) ? !std::isnan(b[k]) : (std::isnan(b[k]) || std::signbit(a[k]) != std::signbit(b[k]) ||
                                                    a[k] != b[k]))
          return false;
      return true;
    };
    std::vector<float> got(want.size()), got_nhwc(want.size());
    chained_max_pools(s, x.data(), got.data(), pieces);
    EXPECT(same_bits(got, want), "chained_max_pools NCHW (n %lld, c %lld, %lldx%lld, k %lld, pools %lld)",
           (long long)s.batch, (long long)c, (long long)h, (long long)w, (long long)s.kernel, (long long)s.pools);
    s.nhwc = true;
    chained_max_pools(s, nhwc_of(x, s.batch, c, plane).data(), got_nhwc.data(), pieces);
    EXPECT(same_bits(got_nhwc, nhwc_of(want, s.batch, slots * c, plane)),
           "chained_max_pools NHWC (n %lld, c %lld, %lldx%lld, k %lld, pools %lld)", (long long)s.batch,
           (long long)c, (long long)h, (long long)w, (long long)s.kernel, (long long)s.pools);
    // Every family's window_max gives the selected one's bits (the quiet NaN included), in both layouts.
    for (const auto& name : available_backends()) {
      std::vector<float> family(want.size());
      s.nhwc = false;
      chained_max_pools(*find_backend(name), s, x.data(), family.data(), pieces);
      EXPECT(same_bits(family, got), "[%s] chained_max_pools NCHW differs from the selected family's (c %lld, "
             "%lldx%lld, k %lld)", name.c_str(), (long long)c, (long long)h, (long long)w, (long long)s.kernel);
      s.nhwc = true;
      chained_max_pools(*find_backend(name), s, nhwc_of(x, s.batch, c, plane).data(), family.data(), pieces);
      EXPECT(same_bits(family, got_nhwc), "[%s] chained_max_pools NHWC differs from the selected family's (c "
             "%lld, %lldx%lld, k %lld)", name.c_str(), (long long)c, (long long)h, (long long)w, (long long)s.kernel);
    }
  }
}

// A random max pool window: kernel sides up to max_kernel, strides up to 3, padding up to half the kernel.
void pick_pool_window(MaxPoolShape& s, int max_kernel) {
  s.kernel_h = pick(1, max_kernel);
  s.kernel_w = pick(1, max_kernel);
  s.stride_h = pick(1, 3);
  s.stride_w = pick(1, 3);
  s.pad_h = pick(0, static_cast<int>(s.kernel_h / 2));
  s.pad_w = pick(0, static_cast<int>(s.kernel_w / 2));
}

// Window (i, j) of `s`'s maximum of value(a, b) over its taps inside the image, NaN propagating, floored at 0 with
// s.relu: the direct scan the pool tests compare against.
template <class Value>
float reference_window_max(const MaxPoolShape& s, int64_t i, int64_t j, Value value) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t a = i * s.stride_h - s.pad_h; a < i * s.stride_h - s.pad_h + s.kernel_h; ++a)
    for (int64_t b = j * s.stride_w - s.pad_w; b < j * s.stride_w - s.pad_w + s.kernel_w; ++b) {
      if (a < 0 || a >= s.height || b < 0 || b >= s.width) continue;
      const float v = value(a, b);
      if (v > m || std::isnan(v)) m = v;
    }
  return s.relu && m < 0.0f ? 0.0f : m;
}

// A random pool for the max_pool2d tests: 1-2 images of one of `channel_choices` channels, a random window, rows of
// up to 17 or (one in four) 75 pixels (several vectors of outputs, and a stride-2 row's tail past a whole one),
// ceil_mode and relu at random.
MaxPoolShape random_pool(const std::vector<int64_t>& channel_choices) {
  MaxPoolShape s;
  s.batch = pick(1, 2);
  s.channels = channel_choices[static_cast<size_t>(pick(0, static_cast<int>(channel_choices.size()) - 1))];
  pick_pool_window(s, 5);
  s.height = pick(static_cast<int>(s.kernel_h), 17);
  s.width = pick(static_cast<int>(s.kernel_w), pick(0, 3) == 0 ? 75 : 17);
  s.ceil_mode = pick(0, 1) == 1;
  s.relu = pick(0, 1) == 1;
  EXPECT(validate(s).empty(), "random pool shape rejected: %s", validate(s).c_str());
  return s;
}

// max_pool2d (max_pools.cpp) against a direct scan of each window inside the image (the padding ignored, NaN
// propagating): random kernels, strides, paddings up to half the kernel, ceil_mode and relu, both layouts. Values and
// NaN positions must match (a tie of +0 and -0 may keep either); every family must give the selected one's bits.
void test_max_pool2d(int cases) {
  const ParallelFor pieces = random_pieces;
  auto same_values = [](const std::vector<float>& a, const std::vector<float>& b) {
    if (a.size() != b.size()) return false;
    for (size_t k = 0; k < a.size(); ++k)
      if (std::isnan(a[k]) != std::isnan(b[k]) || (!std::isnan(a[k]) && a[k] != b[k])) return false;
    return true;
  };
  auto same_bits = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0;
  };
  for (int iter = 0; iter < cases; ++iter) {
    MaxPoolShape s = random_pool({1, 2, 3, 16, 64, 70});
    const int64_t c = s.channels, h = s.height, w = s.width, plane = h * w;
    const int64_t oh = s.out_height(), ow = s.out_width(), out_plane = oh * ow;
    std::vector<float> x(static_cast<size_t>(s.batch * c * plane));
    std::normal_distribution<float> normal;
    for (auto& v : x) {
      const int64_t kind = pick(0, 40);
      v = kind == 0 ? std::numeric_limits<float>::quiet_NaN() : kind == 1 ? 0.0f : kind == 2 ? -0.0f
          : kind == 3 ? -std::numeric_limits<float>::infinity() : normal(rng);
    }
    std::vector<float> want(static_cast<size_t>(s.batch * c * out_plane));
    for (int64_t q = 0; q < s.batch * c; ++q)
      for (int64_t i = 0; i < oh; ++i)
        for (int64_t j = 0; j < ow; ++j)
          want[q * out_plane + i * ow + j] =
              reference_window_max(s, i, j, [&](int64_t a, int64_t b) { return x[q * plane + a * w + b]; });
    std::vector<float> got(want.size()), got_nhwc(want.size());
    s.nhwc = false;
    max_pool2d(s, x.data(), got.data(), pieces);
    EXPECT(same_values(got, want), "max_pool2d NCHW (c %lld, %lldx%lld, k %lldx%lld, s %lldx%lld, p %lldx%lld, ceil "
           "%d, relu %d)", (long long)c, (long long)h, (long long)w, (long long)s.kernel_h, (long long)s.kernel_w,
           (long long)s.stride_h, (long long)s.stride_w, (long long)s.pad_h, (long long)s.pad_w, s.ceil_mode, s.relu);
    s.nhwc = true;
    max_pool2d(s, nhwc_of(x, s.batch, c, plane).data(), got_nhwc.data(), pieces);
    EXPECT(same_values(got_nhwc, nhwc_of(want, s.batch, c, out_plane)), "max_pool2d NHWC (c %lld, %lldx%lld, k "
           "%lldx%lld, s %lldx%lld, p %lldx%lld, ceil %d, relu %d)", (long long)c, (long long)h, (long long)w,
           (long long)s.kernel_h, (long long)s.kernel_w, (long long)s.stride_h, (long long)s.stride_w,
           (long long)s.pad_h, (long long)s.pad_w, s.ceil_mode, s.relu);
    for (const auto& name : available_backends()) {
      std::vector<float> family(want.size());
      s.nhwc = false;
      max_pool2d(*find_backend(name), s, x.data(), family.data(), pieces);
      EXPECT(same_bits(family, got), "[%s] max_pool2d NCHW differs from the selected family's", name.c_str());
      s.nhwc = true;
      max_pool2d(*find_backend(name), s, nhwc_of(x, s.batch, c, plane).data(), family.data(), pieces);
      EXPECT(same_bits(family, got_nhwc), "[%s] max_pool2d NHWC differs from the selected family's", name.c_str());
    }
  }
  MaxPoolShape bad;
  bad.batch = bad.channels = bad.height = bad.width = 4;
  bad.kernel_h = bad.kernel_w = 3;
  bad.pad_h = 2;
  EXPECT(validate(bad).find("padding must be >= 0 and at most half the kernel size") != std::string::npos,
         "max_pool2d validate: %s", validate(bad).c_str());
}

// dequantize_max_pool2d (max_pools.cpp) against a direct scan of each window's dequantized levels: random windows,
// channel counts around the byte transpose's blocks of 8 and the pool's chunks of 64, rows of several blocks,
// relu, both output layouts (levels are NHWC), the same bits.
void test_dequantize_max_pool2d(int cases) {
  const ParallelFor pieces = random_pieces;
  for (int iter = 0; iter < cases; ++iter) {
    MaxPoolShape s = random_pool({1, 3, 8, 16, 64, 70, 130});
    const float scale = std::uniform_real_distribution<float>(1e-3f, 2.0f)(rng);
    const int32_t zero_point = pick(0, 255);
    const int64_t c = s.channels, h = s.height, w = s.width;
    const int64_t oh = s.out_height(), ow = s.out_width();
    std::vector<uint8_t> levels(static_cast<size_t>(s.batch * h * w * c));
    for (auto& v : levels) v = static_cast<uint8_t>(pick(0, 255));
    std::vector<float> want(static_cast<size_t>(s.batch * c * oh * ow));  // NCHW
    for (int64_t n = 0; n < s.batch; ++n)
      for (int64_t ch = 0; ch < c; ++ch)
        for (int64_t i = 0; i < oh; ++i)
          for (int64_t j = 0; j < ow; ++j)
            want[static_cast<size_t>(((n * c + ch) * oh + i) * ow + j)] =
                reference_window_max(s, i, j, [&](int64_t a, int64_t b) {
                  const int32_t level = levels[static_cast<size_t>(((n * h + a) * w + b) * c + ch)];
                  return scale * static_cast<float>(level - zero_point);
                });
    std::vector<float> got(want.size());
    s.nhwc = false;
    dequantize_max_pool2d(s, levels.data(), scale, zero_point, got.data(), pieces);
    EXPECT(std::memcmp(got.data(), want.data(), sizeof(float) * want.size()) == 0,
           "dequantize_max_pool2d NCHW (c %lld, %lldx%lld, k %lldx%lld, s %lldx%lld, p %lldx%lld, ceil %d, relu %d)",
           (long long)c, (long long)h, (long long)w, (long long)s.kernel_h, (long long)s.kernel_w,
           (long long)s.stride_h, (long long)s.stride_w, (long long)s.pad_h, (long long)s.pad_w, s.ceil_mode, s.relu);
    s.nhwc = true;
    dequantize_max_pool2d(s, levels.data(), scale, zero_point, got.data(), pieces);
    const std::vector<float> want_nhwc = nhwc_of(want, s.batch, c, oh * ow);
    EXPECT(std::memcmp(got.data(), want_nhwc.data(), sizeof(float) * want.size()) == 0,
           "dequantize_max_pool2d NHWC (c %lld, %lldx%lld, k %lldx%lld, s %lldx%lld, p %lldx%lld, ceil %d, relu %d)",
           (long long)c, (long long)h, (long long)w, (long long)s.kernel_h, (long long)s.kernel_w,
           (long long)s.stride_h, (long long)s.stride_w, (long long)s.pad_h, (long long)s.pad_w, s.ceil_mode, s.relu);
  }
}

void test_validate_messages() {
  ConvParams p;
  p.batch = 1;
  p.in_channels = 6;
  p.out_channels = 4;
  p.groups = 4;
  p.in_h = p.in_w = 5;
  EXPECT(validate(p).find("in_channels (6) must be divisible by groups (4)") != std::string::npos, "got '%s'",
         validate(p).c_str());
  p.groups = 1;
  p.kernel_h = p.kernel_w = 7;
  EXPECT(validate(p).find("larger than the padded input") != std::string::npos, "got '%s'", validate(p).c_str());
  EXPECT(!set_backend_override("nonsense").empty(), "unknown backend accepted");
  std::string error;
  EXPECT(find_backend("nonsense", &error) == nullptr && error.find("unknown backend 'nonsense'") != std::string::npos,
         "find_backend('nonsense'): got '%s'", error.c_str());
  // The override is what the selector returns for every layer, and find_backend leaves it alone.
  const std::string before = backend_override();
  EXPECT(set_backend_override("scalar").empty(), "scalar refused");
  for (const auto& name : available_backends())
    EXPECT(find_backend(name) && find_backend(name)->name == name, "find_backend('%s') returned another family",
           name.c_str());
  EXPECT(std::string(select_kernel(p).name) == "scalar", "selector ignored the override: %s", select_kernel(p).name);
  EXPECT(backend_override() == "scalar", "find_backend changed the override to '%s'", backend_override().c_str());
  set_backend_override(before);
}

// On aarch64 the NEON family must be compiled, usable, and the selector's first choice (never silently scalar).
#if defined(__unix__)
// Buffers that end exactly where an inaccessible page begins: a vector access past the end of a tensor, even by
// lanes that a mask turns off, faults there instead of touching whatever memory follows.
template <class T>
struct PageEndBuffer {
  size_t bytes = 0, mapped = 0;
  void* base = nullptr;
  T* data = nullptr;
  explicit PageEndBuffer(size_t count) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    bytes = count * sizeof(T);
    mapped = (bytes + page - 1) / page * page + page;
    base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) std::abort();
    char* guard = static_cast<char*>(base) + mapped - page;
    mprotect(guard, page, PROT_NONE);
    data = reinterpret_cast<T*>(guard - bytes);
  }
  ~PageEndBuffer() { munmap(base, mapped); }
  PageEndBuffer(const PageEndBuffer&) = delete;
  PageEndBuffer& operator=(const PageEndBuffer&) = delete;
};

// Every family's output stage, with the output, the residual and the sign bytes each ending at a page boundary, in
// both layouts: the vector stores and loads at a tensor's end must touch nothing past it (a 64 -> 32 1x1 layer at
// 32x32 with an NHWC residual crashed the AVX-512 family's NHWC store this way).
void test_output_at_page_end() {
  for (const auto& shape : std::vector<std::array<int64_t, 5>>{{64, 32, 32, 1, 1}, {16, 13, 9, 3, 1}, {70, 37, 11, 3, 2}}) {
    const ConvParams p = square_layer(shape[0], shape[1], shape[2], shape[3], shape[4], shape[3] / 2);
    std::vector<float> x(p.in_channels * p.in_h * p.in_w), w(p.out_channels * p.in_channels * p.taps());
    fill_signed(x);
    fill_signed(w);
    const TensorStrides s{p.in_channels * p.in_h * p.in_w, p.in_h * p.in_w, p.in_w, 1};
    std::vector<uint64_t> bits(weight_words(p));
    std::vector<int32_t> tap_sum(p.out_channels * p.taps());
    pack_weights(p, w.data(), bits.data(), tap_sum.data());
    const size_t outputs = static_cast<size_t>(p.out_channels * p.out_h() * p.out_w());
    std::vector<float> slope(p.out_channels, 0.25f);
    for (const auto& name : available_backends()) {
      const KernelOps& ops = *find_backend(name);
      for (int nhwc = 0; nhwc < (ops.channels_last_output ? 2 : 1); ++nhwc)
        for (int signs = 0; signs < 2; ++signs) {
          PageEndBuffer<float> out(outputs), residual(outputs);
          PageEndBuffer<uint8_t> out_signs(outputs);
          std::fill(residual.data, residual.data + outputs, 0.5f);
          std::fill(out.data, out.data + outputs, NAN);
          ConvCall call;
          call.params = p;
          call.input = x.data();
          call.strides = s;
          call.weight_bits = bits.data();
          call.weight_tap_sum = tap_sum.data();
          call.output.residual = residual.data;
          call.output.prelu = slope.data();
          call.output.channels_last = nhwc;
          if (signs) call.output.out_signs = out_signs.data;
          else call.output.out = out.data;
          WordBuffer packed(packed_input_words(ops, p));
          binary_conv2d(ops, call, packed.data(), run_serially);  // a stray access past an end is a crash here
          if (!signs) {
            bool finite = true;
            for (size_t i = 0; i < outputs; ++i) finite &= std::isfinite(out.data[i]);
            EXPECT(finite, "[%s] %s, %s output at a page end: values not written", name.c_str(),
                   describe(p).c_str(), nhwc ? "NHWC" : "NCHW");
          }
        }
    }
  }
}
#endif

#if defined(__unix__)
// The float first layer (first_layer.cpp) on every family against a float64 direct convolution, over random shapes
// (strides, dilations, paddings, widths that are not whole vectors), with and without bias and PReLU, both layouts,
// split into task ranges of any size. Every family sums the taps in the same order with fused multiply-adds, so all
// of them, and both layouts, give the same bits; the outputs end at a page boundary, so a store past the end
// crashes.
// The layer of `call` with a random max pool fused, against max_pool2d of its output `unpooled`: the same bits, for
// any thread count (the bands it splits an image into).
void check_fused_pool(const KernelOps& ops, FirstLayerCall call, const float* unpooled, const ParallelFor& pieces) {
  const FirstLayerShape& s = call.shape;
  MaxPoolShape pool;
  pool.batch = s.batch;
  pool.channels = s.out_channels;
  pool.height = s.out_height();
  pool.width = s.out_width();
  pool.nhwc = s.channels_last;
  pick_pool_window(pool, 3);
  pool.ceil_mode = pick(0, 1) == 1;
  pool.relu = pick(0, 1) == 1;
  if (!validate_pool(s, pool).empty()) return;  // the kernel is larger than this output
  const size_t count = static_cast<size_t>(s.batch * s.out_channels * pool.out_height() * pool.out_width());
  std::vector<float> want(count);
  max_pool2d(ops, pool, unpooled, want.data(), pieces);
  PageEndBuffer<float> got(count);
  std::fill(got.data, got.data + count, NAN);
  call.pool = &pool;
  call.threads = pick(1, 4);
  call.pool_group_rows = pick(0, 3);
  call.out = got.data;
  first_layer_conv(ops, call, pieces);
  EXPECT(std::memcmp(got.data, want.data(), sizeof(float) * count) == 0,
         "first layer [%s %s] with a fused %lldx%lld/%lldx%lld pad %lld,%lld ceil %d relu %d pool (%lld threads, "
         "groups of %lld) differs from max_pool2d of its output (O%lld %lldx%lld)",
         ops.name, s.channels_last ? "NHWC" : "NCHW", (long long)pool.kernel_h, (long long)pool.kernel_w,
         (long long)pool.stride_h, (long long)pool.stride_w, (long long)pool.pad_h, (long long)pool.pad_w,
         pool.ceil_mode, pool.relu, (long long)call.threads, (long long)call.pool_group_rows,
         (long long)s.out_channels, (long long)pool.height, (long long)pool.width);
}

void test_first_layer(int cases) {
  const ParallelFor pieces = random_pieces;
  for (int iter = 0; iter < cases; ++iter) {
    FirstLayerShape s;
    s.batch = pick(1, 2);
    s.in_channels = pick(1, 4);
    s.out_channels = pick(1, 40);
    s.kernel_h = pick(1, 7);
    s.kernel_w = pick(1, 7);
    s.stride_h = pick(1, 3);
    s.stride_w = pick(1, 3);
    s.dilation_h = pick(1, 2);
    s.dilation_w = pick(1, 2);
    s.pad_h = pick(0, 3);
    s.pad_w = pick(0, 3);
    s.height = pick(1, 24);
    s.width = pick(1, 45);
    if (!validate(s).empty()) {
      --iter;
      continue;
    }
    const int64_t c = s.in_channels, o = s.out_channels, oh = s.out_height(), ow = s.out_width();
    const int64_t taps = s.kernel_h * s.kernel_w;
    std::vector<float> x(static_cast<size_t>(s.batch * c * s.height * s.width)), weight(o * c * taps), bias(o),
        slope(o);
    fill_signed(x);
    fill_signed(weight);
    fill_signed(bias);
    for (auto& v : slope) v = std::uniform_real_distribution<float>(-0.5f, 0.5f)(rng);
    const bool with_bias = pick(0, 3) != 0, with_slope = pick(0, 1) == 1;
    std::vector<double> want(static_cast<size_t>(s.batch * o * oh * ow)), bound(want.size());
    for (int64_t n = 0; n < s.batch; ++n)
      for (int64_t oc = 0; oc < o; ++oc)
        for (int64_t i = 0; i < oh; ++i)
          for (int64_t j = 0; j < ow; ++j) {
            double total = with_bias ? bias[oc] : 0.0, magnitude = std::fabs(total);
            for (int64_t ch = 0; ch < c; ++ch)
              for (int64_t ki = 0; ki < s.kernel_h; ++ki)
                for (int64_t kj = 0; kj < s.kernel_w; ++kj) {
                  const int64_t y = i * s.stride_h - s.pad_h + ki * s.dilation_h;
                  const int64_t xx = j * s.stride_w - s.pad_w + kj * s.dilation_w;
                  if (y < 0 || y >= s.height || xx < 0 || xx >= s.width) continue;
                  const double term = static_cast<double>(weight[(oc * c + ch) * taps + ki * s.kernel_w + kj]) *
                                      x[((n * c + ch) * s.height + y) * s.width + xx];
                  total += term;
                  magnitude += std::fabs(term);
                }
            if (with_slope && !(total >= 0.0)) {
              total *= slope[oc];
              magnitude *= std::fabs(slope[oc]);
            }
            const size_t at = static_cast<size_t>(((n * o + oc) * oh + i) * ow + j);
            want[at] = total;
            bound[at] = 1e-6 * (magnitude + 1e-30);
          }
    std::vector<float> first_bits;
    std::string first_family;
    for (const auto& name : available_backends()) {
      const KernelOps& ops = *find_backend(name);
      for (int nhwc = 0; nhwc < 2; ++nhwc) {
        PageEndBuffer<float> out(want.size());
        std::fill(out.data, out.data + want.size(), NAN);
        const std::vector<float> input = nhwc ? nhwc_of(x, s.batch, c, s.height * s.width) : x;
        FirstLayerCall call;
        call.shape = s;
        call.shape.channels_last = nhwc;
        call.input = input.data();
        call.weight = weight.data();
        call.bias = with_bias ? bias.data() : nullptr;
        call.slope = with_slope ? slope.data() : nullptr;
        call.out = out.data;
        first_layer_conv(ops, call, pieces);
        check_fused_pool(ops, call, out.data, pieces);
        std::vector<float> got(out.data, out.data + want.size());
        if (nhwc) {  // back to NCHW
          std::vector<float> nchw(got.size());
          for (int64_t n = 0; n < s.batch; ++n)
            for (int64_t p = 0; p < oh * ow; ++p)
              for (int64_t oc = 0; oc < o; ++oc) nchw[(n * o + oc) * oh * ow + p] = got[(n * oh * ow + p) * o + oc];
          got.swap(nchw);
        }
        int64_t bad = 0, first = -1;
        for (size_t k = 0; k < want.size(); ++k)
          if (!(std::fabs(got[k] - want[k]) <= bound[k])) {
            if (first < 0) first = static_cast<int64_t>(k);
            ++bad;
          }
        EXPECT(bad == 0,
               "first layer [%s %s] N%lld C%lld %lldx%lld O%lld k%lldx%lld s%lldx%lld pad %lld,%lld d%lldx%lld "
               "bias %d prelu %d: %lld of %zu wrong, first at %lld: got %g want %g",
               name.c_str(), nhwc ? "NHWC" : "NCHW", (long long)s.batch, (long long)c, (long long)s.height,
               (long long)s.width, (long long)o, (long long)s.kernel_h, (long long)s.kernel_w, (long long)s.stride_h,
               (long long)s.stride_w, (long long)s.pad_h, (long long)s.pad_w, (long long)s.dilation_h,
               (long long)s.dilation_w, with_bias, with_slope, (long long)bad, want.size(), (long long)first,
               first >= 0 ? got[first] : 0.0, first >= 0 ? want[first] : 0.0);
        if (first_bits.empty()) {
          first_bits = got;
          first_family = name;
        } else {
          EXPECT(same_floats(got, first_bits), "first layer [%s %s]: other bits than [%s NCHW]", name.c_str(),
                 nhwc ? "NHWC" : "NCHW", first_family.c_str());
        }
      }
    }
  }
  FirstLayerShape bad;
  bad.batch = 1;
  bad.in_channels = 3;
  bad.out_channels = 8;
  bad.height = bad.width = 4;
  bad.kernel_h = bad.kernel_w = 7;
  EXPECT(validate(bad).find("larger than the padded input") != std::string::npos, "first layer: 7x7 over 4x4: '%s'",
         validate(bad).c_str());
  bad.kernel_h = bad.kernel_w = 3;
  bad.stride_w = 0;
  EXPECT(validate(bad).find("stride_w") != std::string::npos, "first layer: stride_w 0: '%s'", validate(bad).c_str());
}
#endif

// Thin inputs fold their kernel columns into channels (fold.cpp): where that applies, that the folded call gives
// the reference's sums on every family, with the packing and folding passes split into task ranges of any size,
// and that the selector leaves thin layers to the bit families.
void test_column_folding(int cases) {
  const KernelOps& scalar = *find_backend("scalar");
  ConvParams p;
  p.batch = 1;
  p.in_h = p.in_w = 8;
  p.out_channels = 8;
  p.kernel_h = p.kernel_w = 3;
  p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 1;
  for (int64_t c : {1, 16, 21, 32, 48, 64, 80}) {
    p.in_channels = c;
    // At least a quarter of the words saved: 3 -> 1 up to 21 channels, 3 -> 2 up to 42, 6 -> 4 at 80.
    const bool want = c != 48 && c != 64;
    EXPECT(folds_columns(scalar, p) == want, "%lld channels 3x3: folds_columns %d, want %d", static_cast<long long>(c),
           folds_columns(scalar, p), want);
    const ConvParams f = folded_params(p);
    EXPECT(f.out_h() == p.out_h() && f.out_w() == p.out_w() && f.depth() == p.depth() && validate(f).empty(),
           "%lld channels: the folded convolution has another shape or depth", static_cast<long long>(c));
  }
  p.in_channels = 16;
  p.kernel_w = 1;
  EXPECT(!folds_columns(scalar, p), "a kernel one column wide folds");
  p.kernel_w = 3;
  p.in_channels = p.out_channels = 32;
  p.groups = 2;
  EXPECT(!folds_columns(scalar, p), "a grouped convolution folds");

  for (int iter = 0; iter < cases; ++iter) {
    ConvParams q;
    q.batch = pick(1, 2);
    q.in_channels = pick(1, 90);
    q.out_channels = pick(1, 40);
    q.kernel_h = pick(1, 3);
    q.kernel_w = pick(2, 5);
    q.stride_h = pick(1, 3);
    q.stride_w = pick(1, 3);
    q.dilation_h = pick(1, 2);
    q.dilation_w = pick(1, 2);
    q.pad_top = pick(0, 2);
    q.pad_bottom = pick(0, 2);
    q.pad_left = pick(0, 2);
    q.pad_right = pick(0, 2);
    q.pad_value = static_cast<PadValue>(pick(-1, 1));
    q.in_h = pick(1, 12);
    q.in_w = pick(1, 30);
    if (!validate(q).empty() || !folds_columns(scalar, q)) continue;
    std::vector<float> x(q.batch * q.in_channels * q.in_h * q.in_w), w(q.out_channels * q.in_channels * q.taps());
    fill_signed(x);
    fill_signed(w);
    const TensorStrides s{q.in_channels * q.in_h * q.in_w, q.in_h * q.in_w, q.in_w, 1};
    const std::vector<double> want = reference(q, x, s, w, nullptr, nullptr, nullptr);
    std::vector<uint64_t> bits(weight_words(q));
    std::vector<int32_t> tap_sum(q.out_channels * q.taps());
    pack_weights(q, w.data(), bits.data(), tap_sum.data());
    const int64_t chunk = pick(1, 3);
    const ParallelFor in_chunks = [chunk](int64_t tasks, int64_t, const TaskBody& body) {
      for (int64_t b = 0; b < tasks; b += chunk) body(b, std::min(b + chunk, tasks));
    };
    for (const auto& name : available_backends()) {
      const KernelOps& ops = *find_backend(name);
      std::vector<float> got(want.size(), NAN);
      ConvCall call;
      call.params = q;
      call.input = x.data();
      call.strides = s;
      call.weight_bits = bits.data();
      call.weight_tap_sum = tap_sum.data();
      call.output.out = got.data();
      WordBuffer packed(packed_input_words(ops, q));
      binary_conv2d(ops, call, packed.data(), in_chunks);
      int64_t bad = 0;
      for (size_t i = 0; i < want.size(); ++i) bad += got[i] != want[i];
      EXPECT(bad == 0, "%s [%s] in task ranges of %lld: %lld of %zu outputs wrong", describe(q).c_str(),
             name.c_str(), static_cast<long long>(chunk), static_cast<long long>(bad), want.size());
    }
  }

#if (defined(__x86_64__) || defined(_M_X64)) && XNORCONV_HAVE_AMX
  const std::vector<std::string> available = available_backends();
  if (std::find(available.begin(), available.end(), "amx") != available.end()) {
    backend_override();  // applies XNORCONV_BACKEND (read once), so that clearing the override below is final
    const std::string before = backend_override();
    set_backend_override("");
    p.groups = 1;
    p.in_channels = 16;
    EXPECT(std::string(select_kernel(p).name) == "avx512", "16 channels 3x3 stride 1: selector picked '%s', want "
           "'avx512' (folded)", select_kernel(p).name);
    p.in_channels = 32;
    EXPECT(std::string(select_kernel(p).name) == "amx", "32 channels 3x3 stride 1: selector picked '%s', want 'amx'",
           select_kernel(p).name);
    // Strided 3x3 from 64 channels: the tiles with NHWC output only.
    ConvParams q = p;
    q.in_channels = 64;
    q.stride_h = q.stride_w = 2;
    EXPECT(std::string(select_kernel(q, true).name) == "amx" && std::string(select_kernel(q, false).name) == "avx512",
           "64 channels 3x3 stride 2: selector picked '%s' (NHWC) and '%s' (NCHW), want 'amx' and 'avx512'",
           select_kernel(q, true).name, select_kernel(q, false).name);
    q.in_channels = 32;
    EXPECT(std::string(select_kernel(q, true).name) == "avx512", "32 channels 3x3 stride 2 NHWC: selector picked "
           "'%s', want 'avx512'", select_kernel(q, true).name);
    // 1x1 layers: the tiles with NHWC output below 1024 channels in and out.
    ConvParams pointwise = square_layer(64, 128, 56, 1, 2, 0);
    EXPECT(std::string(select_kernel(pointwise, true).name) == "amx"
               && std::string(select_kernel(pointwise, false).name) == "avx512",
           "64 -> 128 1x1 stride 2: selector picked '%s' (NHWC) and '%s' (NCHW), want 'amx' and 'avx512'",
           select_kernel(pointwise, true).name, select_kernel(pointwise, false).name);
    for (const ConvParams& wide : {square_layer(1024, 512, 7, 1, 1, 0), square_layer(512, 1024, 14, 1, 2, 0)}) {
      EXPECT(std::string(select_kernel(wide, true).name) == "avx512", "%s NHWC: selector picked '%s', want "
             "'avx512'", describe(wide).c_str(), select_kernel(wide, true).name);
    }
    set_backend_override(before);
  }
#endif
}

void test_preferred_backend() {
#if defined(__aarch64__)
  const std::vector<std::string> available = available_backends();
  EXPECT(!available.empty() && available.front() == "neon", "aarch64: first available backend is '%s', want 'neon'",
         available.empty() ? "" : available.front().c_str());
  EXPECT(cpu_features().neon, "aarch64: cpu_features().neon is false");
  backend_override();  // applies XNORCONV_BACKEND (read once), so that clearing the override below is final
  set_backend_override("");
  ConvParams p;
  p.batch = 1;
  p.in_channels = p.out_channels = 64;
  p.in_h = p.in_w = 8;
  p.kernel_h = p.kernel_w = 3;
  EXPECT(std::string(select_kernel(p).name) == "neon", "aarch64: selector picked '%s', want 'neon'",
         select_kernel(p).name);
  std::printf("aarch64: selector picks %s\n", select_kernel(p).name);
#endif
}

}  // namespace

int main(int argc, char** argv) {
  const int random_cases = argc > 1 ? std::atoi(argv[1]) : 400;
  std::printf("backends:");
  for (const auto& b : available_backends()) std::printf(" %s", b.c_str());
  std::printf("\n");
  test_preferred_backend();
  test_bit_order();
  test_sign_edge_cases();
  test_batch_zero();
  test_pack_matches_scalar(random_cases / 4 + 8);
  test_zero_pad_cache();
  test_validate_messages();
  test_sign_io(random_cases / 10 + 4);
  test_task_ranges(random_cases / 10 + 4);
  test_training_passes(random_cases / 10 + 8);
  test_batch_norm_passes(random_cases / 10 + 8);
  test_real_shortcut(random_cases / 4 + 8);
  test_chained_max_pools(random_cases / 8 + 8);
  test_max_pool2d(random_cases / 4 + 8);
  test_dequantize_max_pool2d(random_cases / 4 + 8);
  test_column_folding(random_cases / 4 + 8);
#if defined(__unix__)
  test_output_at_page_end();
  test_first_layer(random_cases / 4 + 8);
#endif
  test_darknet_shapes();
  test_deep_accumulation();
  test_many_padding_classes();
  test_random_shapes(random_cases);
  std::printf("%d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
