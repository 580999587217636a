// AVX-512 binarization primitives (the `Isa` packing hooks of kernel_common.h), shared by the families that pack
// with AVX-512: included after a TU's target pragma and kernel_common.h, so each TU gets its own copy compiled for
// its ISA (unnamed namespace). The TU includes <immintrin.h> before its pragma, like every standard header.
#pragma once

namespace xnorconv {
namespace {

struct Avx512Binarize {
  // 16-float compares; `Threshold` yields the 16 thresholds at offset i (masked for the tail).
  template <class Threshold>
  static uint64_t below_impl(const float* x, Threshold threshold, int64_t count) {
    if (count == 64) {
      const uint64_t m0 = _mm512_cmp_ps_mask(_mm512_loadu_ps(x), threshold.vec(0, 0xFFFF), _CMP_NGE_UQ);
      const uint64_t m1 = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + 16), threshold.vec(16, 0xFFFF), _CMP_NGE_UQ);
      const uint64_t m2 = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + 32), threshold.vec(32, 0xFFFF), _CMP_NGE_UQ);
      const uint64_t m3 = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + 48), threshold.vec(48, 0xFFFF), _CMP_NGE_UQ);
      return m0 | (m1 << 16) | (m2 << 32) | (m3 << 48);
    }
    uint64_t bits = 0;
    for (int64_t i = 0; i < count; i += 16) {
      const int64_t left = count - i;
      const __mmask16 valid = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(valid, x + i);
      const __mmask16 below = _mm512_mask_cmp_ps_mask(valid, v, threshold.vec(i, valid), _CMP_NGE_UQ);
      bits |= static_cast<uint64_t>(below) << i;
    }
    return bits;
  }

  struct Uniform {
    __m512 t;
    __m512 vec(int64_t, __mmask16) const { return t; }
  };
  struct PerLane {
    const float* t;
    __m512 vec(int64_t i, __mmask16 valid) const { return _mm512_maskz_loadu_ps(valid, t + i); }
  };

  static uint64_t below(const float* x, float t, int64_t count) {
    return below_impl(x, Uniform{_mm512_set1_ps(t)}, count);
  }
  static uint64_t below_each(const float* x, const float* t, int64_t count) {
    return below_impl(x, PerLane{t}, count);
  }

  static uint64_t nonzero(const uint8_t* x, int64_t count) {
    const __mmask64 valid = count >= 64 ? ~0ull : (1ull << count) - 1;
    const __m512i v = _mm512_maskz_loadu_epi8(valid, x);
    return _mm512_test_epi8_mask(v, v);
  }
};

}  // namespace
}  // namespace xnorconv
