// Shared by the C++ test programs: check counting and the naive double-precision reference of the binary
// convolution (the semantics of xnorconv_core.h, computed directly from the floats).
#pragma once

#include <cstdint>
#include <cstdio>
#include <vector>

#include "xnorconv_core.h"

namespace xnorconv_test {

using xnorconv::ConvParams;
using xnorconv::TensorStrides;

inline int failures = 0, checks = 0;

#define EXPECT(cond, ...)                                            \
  do {                                                               \
    ++xnorconv_test::checks;                                         \
    if (!(cond)) {                                                   \
      ++xnorconv_test::failures;                                     \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__);               \
      std::printf(__VA_ARGS__);                                      \
      std::printf("\n");                                             \
    }                                                                \
  } while (0)

inline double sign_of(float x, float t = 0.0f) { return x >= t ? 1.0 : -1.0; }

// Direct convolution of the signs in double; padded taps are worth pad_value; threshold: per input channel
// (sign(x - t) as x >= t) or nullptr.
inline std::vector<double> reference(const ConvParams& p, const std::vector<float>& x, TensorStrides s,
                                     const std::vector<float>& w, const float* scale, const float* bias,
                                     const float* threshold) {
  const int64_t oh = p.out_h(), ow = p.out_w(), cg = p.channels_per_group(), og = p.out_channels_per_group();
  std::vector<double> y(p.batch * p.out_channels * oh * ow);
  for (int64_t n = 0; n < p.batch; ++n)
    for (int64_t o = 0; o < p.out_channels; ++o) {
      const int64_t g = o / og;
      for (int64_t i = 0; i < oh; ++i)
        for (int64_t j = 0; j < ow; ++j) {
          double acc = 0;
          for (int64_t c = 0; c < cg; ++c)
            for (int64_t kh = 0; kh < p.kernel_h; ++kh)
              for (int64_t kw = 0; kw < p.kernel_w; ++kw) {
                const int64_t ih = i * p.stride_h - p.pad_top + kh * p.dilation_h;
                const int64_t iw = j * p.stride_w - p.pad_left + kw * p.dilation_w;
                const double a = (ih < 0 || ih >= p.in_h || iw < 0 || iw >= p.in_w)
                                     ? static_cast<double>(static_cast<int>(p.pad_value))
                                     : sign_of(x[n * s.n + (g * cg + c) * s.c + ih * s.h + iw * s.w],
                                               threshold ? threshold[g * cg + c] : 0.0f);
                acc += a * sign_of(w[((o * cg + c) * p.kernel_h + kh) * p.kernel_w + kw]);
              }
          y[((n * p.out_channels + o) * oh + i) * ow + j] = (scale ? scale[o] : 1.0) * acc + (bias ? bias[o] : 0.0);
        }
    }
  return y;
}

}  // namespace xnorconv_test
