// Shared by the C++ test programs: check counting and the naive double-precision reference of the binary
// convolution (the semantics of xnorconv_core.h, computed directly from the floats).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
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

// The oracle is test code, not what the sanitizer build checks, and a naive convolution of the DarkNet layers is
// most of that build's time when instrumented: it is compiled without ASan/UBSan checks (raw pointers and no calls
// in the loop, since an instrumented function is not inlined into an uninstrumented one). Its bounds are the
// ConvParams' own, asserted against the vectors' sizes first.
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 8)
#define XNORCONV_TEST_UNSANITIZED __attribute__((no_sanitize("address", "undefined")))
#else
#define XNORCONV_TEST_UNSANITIZED
#endif

XNORCONV_TEST_UNSANITIZED inline void reference_loop(const ConvParams& p, const float* x, TensorStrides s,
                                                     const float* w, const float* scale, const float* bias,
                                                     const float* threshold, double* y) {
  const int64_t oh = p.out_h(), ow = p.out_w(), cg = p.channels_per_group(), og = p.out_channels_per_group();
  const double pad = static_cast<double>(static_cast<int>(p.pad_value));
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
                double a = pad;
                if (ih >= 0 && ih < p.in_h && iw >= 0 && iw < p.in_w) {
                  const float t = threshold ? threshold[g * cg + c] : 0.0f;
                  a = x[n * s.n + (g * cg + c) * s.c + ih * s.h + iw * s.w] >= t ? 1.0 : -1.0;
                }
                acc += w[((o * cg + c) * p.kernel_h + kh) * p.kernel_w + kw] >= 0.0f ? a : -a;
              }
          y[((n * p.out_channels + o) * oh + i) * ow + j] = (scale ? scale[o] : 1.0) * acc + (bias ? bias[o] : 0.0);
        }
    }
}

// Direct convolution of the signs in double; padded taps are worth pad_value; threshold: per input channel
// (sign(x - t) as x >= t) or nullptr.
inline std::vector<double> reference(const ConvParams& p, const std::vector<float>& x, TensorStrides s,
                                     const std::vector<float>& w, const float* scale, const float* bias,
                                     const float* threshold) {
  std::vector<double> y(p.batch * p.out_channels * p.out_h() * p.out_w());
  const int64_t last_x = p.batch == 0 ? 0 : (p.batch - 1) * s.n + (p.in_channels - 1) * s.c + (p.in_h - 1) * s.h
                                                 + (p.in_w - 1) * s.w;
  if (p.batch > 0 && (last_x >= static_cast<int64_t>(x.size())
                      || static_cast<int64_t>(w.size()) < p.out_channels * p.channels_per_group() * p.taps())) {
    std::fprintf(stderr, "reference: input or weight smaller than the ConvParams say\n");
    std::abort();
  }
  reference_loop(p, x.data(), s, w.data(), scale, bias, threshold, y.data());
  return y;
}

}  // namespace xnorconv_test
