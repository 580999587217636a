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

  // The portable transpose64's six swap levels on eight zmm (a[i] in register i / 8, lane i % 8): about 200 vector
  // instructions instead of about 1500 scalar ones. Distances 32, 16 and 8 pair whole registers; 4, 2 and 1 pair
  // lanes of one register, brought together by a permute.
  static void transpose64(uint64_t a[64]) {
    __m512i r[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm512_load_si512(a + 8 * i);
    auto across = [&](int d, int shift, uint64_t mask) {
      const __m512i m = _mm512_set1_epi64(static_cast<long long>(mask));
      for (int base = 0; base < 8; base += 2 * d)
        for (int i = base; i < base + d; ++i) {
          // t = ((r[i] >> shift) ^ r[i + d]) & m
          const __m512i t = _mm512_ternarylogic_epi64(_mm512_srli_epi64(r[i], shift), r[i + d], m, 0x28);
          r[i] = _mm512_xor_si512(r[i], _mm512_slli_epi64(t, shift));
          r[i + d] = _mm512_xor_si512(r[i + d], t);
        }
    };
    across(4, 32, 0x00000000FFFFFFFFull);
    across(2, 16, 0x0000FFFF0000FFFFull);
    across(1, 8, 0x00FF00FF00FF00FFull);
    // Within a register: lane l pairs with lane l + d (l the low lane). t is formed in the low lanes, moved to the
    // high ones by the same permute, then the low lanes take t << shift and the high lanes t.
    auto within = [&](int shift, uint64_t mask, __mmask8 low, auto permute) {
      const __m512i m = _mm512_set1_epi64(static_cast<long long>(mask));
      for (auto& v : r) {
        const __m512i t = _mm512_ternarylogic_epi64(_mm512_srli_epi64(v, shift), permute(v), m, 0x28);
        v = _mm512_xor_si512(v, _mm512_mask_slli_epi64(permute(t), low, t, shift));
      }
    };
    within(4, 0x0F0F0F0F0F0F0F0Full, 0x0F, [](__m512i v) { return _mm512_shuffle_i64x2(v, v, 0x4E); });
    within(2, 0x3333333333333333ull, 0x33, [](__m512i v) { return _mm512_permutex_epi64(v, 0x4E); });
    within(1, 0x5555555555555555ull, 0x55, [](__m512i v) { return _mm512_permutex_epi64(v, 0xB1); });
    for (int i = 0; i < 8; ++i) _mm512_store_si512(a + 8 * i, r[i]);
  }

  // The words packing stores for `count` (at most 64) consecutive pixels of up to 32 channels, channel c's pixels at
  // x + c * channel_stride: out[i] has bit c set where !(pixel i of channel c >= t[c]) (t nullptr: 0). Built
  // directly, without the per-channel 64-bit masks and their 64x64 transpose: per channel and 16 pixels, one compare
  // into a mask and one masked OR of the channel's bit into 32-bit lanes. That is half the vector work of the
  // transpose for 32 channels and less for fewer (the transpose costs the same for 16 channels as for 64); from
  // 33 channels the compares and ORs, on the same ports as the transpose, cost as much: false, the caller
  // transposes.
  static bool pixel_words(const float* x, int64_t channel_stride, const float* t, int64_t channels, int64_t count,
                          uint64_t* out) {
    if (channels > 32) return false;
    __mmask16 valid[4];
    __m512i words[4];
    for (int g = 0; g < 4; ++g) {
      const int64_t left = count - 16 * g;
      valid[g] = left >= 16 ? static_cast<__mmask16>(0xFFFF)
                            : static_cast<__mmask16>(left > 0 ? (1u << left) - 1 : 0u);
      words[g] = _mm512_setzero_si512();
    }
    for (int64_t c = 0; c < channels; ++c) {
      const __m512 threshold = _mm512_set1_ps(t ? t[c] : 0.0f);
      const __m512i bit = _mm512_set1_epi32(static_cast<int>(1u << c));
      const float* row = x + c * channel_stride;
      for (int g = 0; g < 4; ++g) {
        const __mmask16 below = _mm512_mask_cmp_ps_mask(valid[g], _mm512_maskz_loadu_ps(valid[g], row + 16 * g),
                                                        threshold, _CMP_NGE_UQ);
        words[g] = _mm512_mask_or_epi32(words[g], below, words[g], bit);
      }
    }
    for (int g = 0; g < 4; ++g) {
      _mm512_storeu_si512(out + 16 * g, _mm512_cvtepu32_epi64(_mm512_castsi512_si256(words[g])));
      _mm512_storeu_si512(out + 16 * g + 8, _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(words[g], 1)));
    }
    return true;
  }
};

}  // namespace
}  // namespace xnorconv
