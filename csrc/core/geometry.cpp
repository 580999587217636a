// Layout arithmetic, weight packing and the pad_value-0 border correction: portable code that runs once per
// weight or once per call, so it is kept out of the per-ISA files.
#include <algorithm>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <sstream>
#include <utility>

#include "xnorconv_core.h"

namespace xnorconv {

namespace {

int64_t conv_out_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad_lo, int64_t pad_hi, int64_t dilation) {
  const int64_t span = dilation * (kernel - 1) + 1;
  const int64_t padded = in + pad_lo + pad_hi;
  if (padded < span) return 0;
  return (padded - span) / stride + 1;
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A stream made only when there is something to say: validate() runs on every call, and constructing an
// ostringstream (locale included) costs microseconds when the caches are cold.
struct LazyMessage {
  std::unique_ptr<std::ostringstream> stream;
  template <class T>
  LazyMessage& operator<<(const T& value) {
    if (!stream) stream = std::make_unique<std::ostringstream>();
    *stream << value;
    return *this;
  }
  std::string str() const { return stream ? stream->str() : std::string(); }
};

}  // namespace

int64_t ConvParams::out_h() const { return conv_out_size(in_h, kernel_h, stride_h, pad_top, pad_bottom, dilation_h); }
int64_t ConvParams::out_w() const { return conv_out_size(in_w, kernel_w, stride_w, pad_left, pad_right, dilation_w); }

std::string validate(const ConvParams& p) {
  LazyMessage err;
  if (p.batch < 0) err << "batch size must be >= 0, got " << p.batch;
  else if (p.in_channels < 1) err << "in_channels must be >= 1, got " << p.in_channels;
  else if (p.out_channels < 1) err << "out_channels must be >= 1, got " << p.out_channels;
  else if (p.groups < 1) err << "groups must be >= 1, got " << p.groups;
  else if (p.in_channels % p.groups) err << "in_channels (" << p.in_channels << ") must be divisible by groups (" << p.groups << ")";
  else if (p.out_channels % p.groups) err << "out_channels (" << p.out_channels << ") must be divisible by groups (" << p.groups << ")";
  else if (p.kernel_h < 1 || p.kernel_w < 1) err << "kernel_size must be >= 1, got (" << p.kernel_h << ", " << p.kernel_w << ")";
  else if (p.stride_h < 1 || p.stride_w < 1) err << "stride must be >= 1, got (" << p.stride_h << ", " << p.stride_w << ")";
  else if (p.dilation_h < 1 || p.dilation_w < 1) err << "dilation must be >= 1, got (" << p.dilation_h << ", " << p.dilation_w << ")";
  else if (p.pad_top < 0 || p.pad_bottom < 0 || p.pad_left < 0 || p.pad_right < 0)
    err << "padding must be >= 0, got (top " << p.pad_top << ", bottom " << p.pad_bottom << ", left " << p.pad_left << ", right " << p.pad_right << ")";
  else if (p.in_h < 0 || p.in_w < 0) err << "input size must be >= 0, got (" << p.in_h << ", " << p.in_w << ")";
  else if (p.pad_value != PadValue::Zero && p.pad_value != PadValue::PlusOne && p.pad_value != PadValue::MinusOne)
    err << "pad_value must be 0, 1 or -1, got " << static_cast<int>(p.pad_value);
  else if (p.taps() > kMaxTaps)
    err << "kernel_size (" << p.kernel_h << ", " << p.kernel_w << ") has more than " << kMaxTaps << " taps";
  else if (p.out_h() < 1 || p.out_w() < 1)
    err << "kernel size (" << p.kernel_h << ", " << p.kernel_w << ") with dilation (" << p.dilation_h << ", " << p.dilation_w
        << ") is larger than the padded input (" << p.in_h + p.pad_top + p.pad_bottom << ", " << p.in_w + p.pad_left + p.pad_right << ")";
  return err.str();
}

ActivationLayout activation_layout(const ConvParams& p) {
  ActivationLayout l;
  l.words_per_group = words_for_channels(p.channels_per_group());
  l.words_per_pixel = p.groups * l.words_per_group;
  const int64_t oh = p.out_h(), ow = p.out_w();
  l.rows = std::max((oh - 1) * p.stride_h + (p.kernel_h - 1) * p.dilation_h + 1, p.pad_top + p.in_h);
  l.phases = p.stride_w;
  // Strips may run up to kStripWidth - 1 pixels past the last output column.
  const int64_t read_extent = round_up(ow, kStripWidth) + ((p.kernel_w - 1) * p.dilation_w) / p.stride_w + 1;
  const int64_t input_extent = (p.pad_left + p.in_w + p.stride_w - 1) / p.stride_w;
  l.row_words = round_up(std::max(read_extent, input_extent), 8);
  l.phase_stride = l.words_per_pixel * l.row_words;
  l.row_stride = l.phases * l.phase_stride;
  l.image_stride = l.rows * l.row_stride;
  l.total_words = p.batch * l.image_stride;
  return l;
}

void tap_offsets(const ConvParams& p, const ActivationLayout& l, int64_t* offsets) {
  for (int64_t kh = 0; kh < p.kernel_h; ++kh)
    for (int64_t kw = 0; kw < p.kernel_w; ++kw) {
      const int64_t col = kw * p.dilation_w;
      *offsets++ = kh * p.dilation_h * l.row_stride + (col % p.stride_w) * l.phase_stride + col / p.stride_w;
    }
}

void pack_weights(const ConvParams& p, const float* weight, uint64_t* packed, int32_t* tap_sum) {
  const int64_t cg = p.channels_per_group(), taps = p.taps(), words = words_for_channels(cg);
  for (int64_t o = 0; o < p.out_channels; ++o)
    for (int64_t t = 0; t < taps; ++t) {
      uint64_t* dst = packed + (o * taps + t) * words;
      int64_t negatives = 0;
      for (int64_t w = 0; w < words; ++w) {
        uint64_t bits = 0;
        const int64_t c_end = std::min<int64_t>(cg, 64 * (w + 1));
        for (int64_t c = 64 * w; c < c_end; ++c) {
          const bool negative = !(weight[(o * cg + c) * taps + t] >= 0.0f);
          bits |= static_cast<uint64_t>(negative) << (c % 64);
          negatives += negative;
        }
        dst[w] = bits;
      }
      tap_sum[o * taps + t] = static_cast<int32_t>(cg - 2 * negatives);
    }
}

namespace {

// For each output index, the range [lo, hi] of kernel indices that land inside the input (empty: lo > hi),
// grouped into classes; the full range is class 0. There are only a handful of classes (about 2 * pad + 1).
std::vector<int32_t> tap_range_classes(int64_t out, int64_t in, int64_t kernel, int64_t stride, int64_t pad,
                                       int64_t dilation, std::vector<std::pair<int64_t, int64_t>>& ranges) {
  ranges.assign(1, {0, kernel - 1});
  std::vector<int32_t> cls(out);
  for (int64_t o = 0; o < out; ++o) {
    int64_t lo = kernel, hi = -1;
    for (int64_t k = 0; k < kernel; ++k) {
      const int64_t i = o * stride - pad + k * dilation;
      if (i >= 0 && i < in) {
        lo = std::min(lo, k);
        hi = k;
      }
    }
    const auto range = std::make_pair(lo, hi);
    const auto it = std::find(ranges.begin(), ranges.end(), range);
    cls[o] = static_cast<int32_t>(it - ranges.begin());
    if (it == ranges.end()) ranges.push_back(range);
  }
  return cls;
}

}  // namespace

ZeroPadCorrection zero_pad_correction(const ConvParams& p, const int32_t* tap_sum) {
  ZeroPadCorrection z;
  std::vector<std::pair<int64_t, int64_t>> row_ranges, col_ranges;
  z.row_class = tap_range_classes(p.out_h(), p.in_h, p.kernel_h, p.stride_h, p.pad_top, p.dilation_h, row_ranges);
  z.col_class = tap_range_classes(p.out_w(), p.in_w, p.kernel_w, p.stride_w, p.pad_left, p.dilation_w, col_ranges);
  z.col_class.resize(z.col_class.size() + kStripWidth, 0);
  z.col_classes = static_cast<int64_t>(col_ranges.size());
  z.classes = static_cast<int64_t>(row_ranges.size()) * z.col_classes;
  const int64_t o_count = p.out_channels, taps = p.taps();
  z.value.assign(o_count * z.classes, 0);
  if (z.classes == 1) return z;  // no output reads padding
  for (size_t rc = 0; rc < row_ranges.size(); ++rc)
    for (size_t cc = 0; cc < col_ranges.size(); ++cc) {
      const int64_t cls = static_cast<int64_t>(rc) * z.col_classes + static_cast<int64_t>(cc);
      for (int64_t kh = 0; kh < p.kernel_h; ++kh)
        for (int64_t kw = 0; kw < p.kernel_w; ++kw) {
          const bool padded = kh < row_ranges[rc].first || kh > row_ranges[rc].second ||
                              kw < col_ranges[cc].first || kw > col_ranges[cc].second;
          if (!padded) continue;
          const int64_t t = kh * p.kernel_w + kw;
          for (int64_t o = 0; o < o_count; ++o) z.value[o * z.classes + cls] += tap_sum[o * taps + t];
        }
    }
  return z;
}

namespace {

// What zero_pad_correction reads besides the tap sums.
struct ZeroPadKey {
  int64_t v[12];
  explicit ZeroPadKey(const ConvParams& p)
      : v{p.in_h,     p.in_w,     p.out_channels, p.kernel_h,   p.kernel_w,     p.stride_h,
          p.stride_w, p.pad_top,  p.pad_bottom,   p.pad_left,   p.pad_right,    p.dilation_h * 65536 + p.dilation_w} {}
  bool operator==(const ZeroPadKey& o) const { return std::memcmp(v, o.v, sizeof v) == 0; }
};

struct ZeroPadEntry {
  ZeroPadKey key;
  const int32_t* address;        // where the tap sums were read: checked first, never trusted alone
  std::vector<int32_t> tap_sum;  // the values the result was computed from
  std::shared_ptr<const ZeroPadCorrection> result;
};

}  // namespace

std::shared_ptr<const ZeroPadCorrection> cached_zero_pad_correction(const ConvParams& p, const int32_t* tap_sum) {
  static std::mutex mutex;
  static std::list<ZeroPadEntry> entries;  // most recently used first
  const ZeroPadKey key(p);
  const size_t count = static_cast<size_t>(p.out_channels * p.taps());
  const size_t bytes = count * sizeof(int32_t);
  auto matches = [&](const ZeroPadEntry& e) {
    return e.key == key && e.tap_sum.size() == count && std::memcmp(e.tap_sum.data(), tap_sum, bytes) == 0;
  };
  {
    std::lock_guard<std::mutex> lock(mutex);
    // Same address first: a layer called again finds its entry with one comparison of its values.
    auto hit = std::find_if(entries.begin(), entries.end(),
                            [&](const ZeroPadEntry& e) { return e.address == tap_sum && matches(e); });
    if (hit == entries.end()) hit = std::find_if(entries.begin(), entries.end(), matches);
    if (hit != entries.end()) {
      hit->address = tap_sum;
      entries.splice(entries.begin(), entries, hit);
      return hit->result;
    }
  }
  // Computed outside the lock; two threads missing on the same key both compute it, and both entries are valid.
  auto result = std::make_shared<const ZeroPadCorrection>(zero_pad_correction(p, tap_sum));
  ZeroPadEntry entry{key, tap_sum, std::vector<int32_t>(tap_sum, tap_sum + count), result};
  std::lock_guard<std::mutex> lock(mutex);
  entries.push_front(std::move(entry));
  if (entries.size() > kZeroPadCacheEntries) entries.pop_back();
  return result;
}

}  // namespace xnorconv
