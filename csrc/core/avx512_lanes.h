// The output stage's vector (output_stage.h) for the AVX-512 families: 16 floats going to elements
// [index, index + 16), or, split, 8 to [index, index + 8) and 8 to [second, second + 8) (a pair of strips whose
// second starts a new row), under a mask of the real lanes. Included after the family's ISA target pragma and
// kernel_common.h, in an unnamed namespace like avx512_binarize.h, so each TU has its own copy for its ISA.
#pragma once

namespace xnorconv {
namespace {

struct Avx512Lanes {
  static constexpr int kLanes = 16;
  static constexpr __mmask16 kAll = 0xFFFF;
  using F = __m512;
  using I = __m512i;
  struct At {
    int64_t index;
    int64_t second;  // with split only
    __mmask16 mask;
    bool split;
  };
  static At run(int64_t index, int lanes) {
    return {index, 0, lanes >= kLanes ? kAll : static_cast<__mmask16>((1u << lanes) - 1), false};
  }
  static F broadcast(float x) { return _mm512_set1_ps(x); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F to_float(I x) { return _mm512_cvtepi32_ps(x); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F pair_sums(F a, F b) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    return _mm512_add_ps(_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b));
  }
  static F prelu(F y, F slope) {
    return _mm512_mask_mul_ps(y, _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_NGE_UQ), y, slope);
  }
  // A vector known at compile time to be whole (mask kAll, not split), as a dense block stores it, compiles to plain
  // loads and stores; any other mask to masked ones, without a test per vector.
  static bool whole(const At& at) { return __builtin_constant_p(at.mask) && at.mask == kAll; }
  static F load(const float* base, const At& at) {
    if (!at.split)
      return whole(at) ? _mm512_loadu_ps(base + at.index) : _mm512_maskz_loadu_ps(at.mask, base + at.index);
    const __m256 low = _mm256_maskz_loadu_ps(static_cast<__mmask8>(at.mask), base + at.index);
    const __m256 high = _mm256_maskz_loadu_ps(static_cast<__mmask8>(at.mask >> 8), base + at.second);
    return _mm512_insertf32x8(_mm512_castps256_ps512(low), high, 1);
  }
  static void store(float* base, const At& at, F y) {
    if (!at.split) {
      if (whole(at)) _mm512_storeu_ps(base + at.index, y);
      else _mm512_mask_storeu_ps(base + at.index, at.mask, y);
      return;
    }
    _mm256_mask_storeu_ps(base + at.index, static_cast<__mmask8>(at.mask), _mm512_castps512_ps256(y));
    // The high half is extracted into a register first (the empty asm keeps it there): compilers otherwise fuse
    // the extract and the masked store into a masked VEXTRACTF32X8 to memory, which has been seen to fault on
    // masked-off elements lying past the end of the output (an output ending at a page boundary). A masked
    // VMOVUPS, as here, suppresses those faults.
    __m256 high = _mm512_extractf32x8_ps(y, 1);
    __asm__("" : "+v"(high));
    _mm256_mask_storeu_ps(base + at.second, static_cast<__mmask8>(at.mask >> 8), high);
  }
  static void store_signs(uint8_t* base, const At& at, F y, F threshold) {
    const __m128i bytes = _mm_maskz_set1_epi8(_mm512_cmp_ps_mask(y, threshold, _CMP_NGE_UQ), 1);
    if (!at.split) {
      _mm_mask_storeu_epi8(base + at.index, at.mask, bytes);
      return;
    }
    _mm_mask_storeu_epi8(base + at.index, at.mask & 0xFF, bytes);
    _mm_mask_storeu_epi8(base + at.second, at.mask >> 8, _mm_srli_si128(bytes, 8));
  }
};

// SPPF's window maxima (KernelOps::window_max) on 16 lanes. vmaxps(v, m) is v > m ? v : m, the portable loop's
// maximum (ties and signed zeros keep m); a NaN in any tap makes the lane the quiet NaN, as there.
inline void avx512_window_max(const float* in, float* out, int64_t count, int64_t step, int64_t k) {
  const __m512 quiet_nan = _mm512_set1_ps(__builtin_nanf(""));
  for (int64_t e = 0; e < count; e += 16) {
    const __mmask16 real = count - e >= 16 ? Avx512Lanes::kAll : static_cast<__mmask16>((1u << (count - e)) - 1);
    __m512 m = _mm512_maskz_loadu_ps(real, in + e);
    __mmask16 nan = _mm512_cmp_ps_mask(m, m, _CMP_UNORD_Q);
    for (int64_t t = 1; t < k; ++t) {
      const __m512 v = _mm512_maskz_loadu_ps(real, in + e + t * step);
      m = _mm512_max_ps(v, m);
      nan = static_cast<__mmask16>(nan | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q));
    }
    _mm512_mask_storeu_ps(out + e, real, _mm512_mask_mov_ps(m, nan, quiet_nan));
  }
}

// KernelOps::stride2_window_max on 16 outputs at a time: tap t of outputs e..e+15 is the even positions of the 32
// floats from in[2e + t] (one vpermt2ps of two loads). Loads are masked to the row's 2 (count - 1) + k floats; the
// lanes they leave zero feed only outputs that are not stored.
inline void avx512_stride2_window_max(const float* in, float* out, int64_t count, int64_t k) {
  const __m512 quiet_nan = _mm512_set1_ps(__builtin_nanf(""));
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const int64_t length = 2 * (count - 1) + k;
  auto mask_from = [&](int64_t at) {
    const int64_t left = length - at;
    return left >= 16 ? Avx512Lanes::kAll : left <= 0 ? __mmask16{0} : static_cast<__mmask16>((1u << left) - 1);
  };
  auto tap = [&](int64_t at) {
    return _mm512_permutex2var_ps(_mm512_maskz_loadu_ps(mask_from(at), in + at), even,
                                  _mm512_maskz_loadu_ps(mask_from(at + 16), in + at + 16));
  };
  auto whole_tap = [&](int64_t at) {
    return _mm512_permutex2var_ps(_mm512_loadu_ps(in + at), even, _mm512_loadu_ps(in + at + 16));
  };
  // The even taps, then the odd ones: the order of max_pools.cpp's split by phase, which decides which of tied +0
  // and -0 is kept.
  auto outputs = [&](int64_t e, auto load) {
    __m512 m = load(2 * e);
    __mmask16 nan = _mm512_cmp_ps_mask(m, m, _CMP_UNORD_Q);
    for (int64_t i = 1; i < k; ++i) {
      const int64_t t = 2 * i < k ? 2 * i : 2 * (i - (k + 1) / 2) + 1;
      const __m512 v = load(2 * e + t);
      m = _mm512_max_ps(v, m);
      nan = static_cast<__mmask16>(nan | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q));
    }
    return _mm512_mask_mov_ps(m, nan, quiet_nan);
  };
  int64_t e = 0;
  // 16 outputs whose taps all lie in the row: plain loads, without the masks the row's end needs.
  for (; e + 16 <= count && 2 * e + 32 + k - 1 <= length; e += 16) _mm512_storeu_ps(out + e, outputs(e, whole_tap));
  for (; e < count; e += 16) {
    const __mmask16 real = count - e >= 16 ? Avx512Lanes::kAll : static_cast<__mmask16>((1u << (count - e)) - 1);
    _mm512_mask_storeu_ps(out + e, real, outputs(e, tap));
  }
}

// KernelOps::stride2_width3_pool_row: a 3-wide, stride-2 max pool of one NCHW output row straight from the rows its
// windows cover, in registers: the column maxima of 16 image columns at a time (their rows in order, -inf outside
// the image), then each output's taps 0, 2 and 1 among them (the order of avx512_stride2_window_max, so the same
// bits as the two passes max_pools.cpp runs otherwise), then the ReLU. Output block e's windows read columns
// 2e - pad .. 2e - pad + 32: its own two vectors of column maxima and the first lane of the next block's first.
// kRows > 0: that many rows, unrolled (the common windows: 3 rows, 2 at the image's top or bottom edge).
template <int kRows>
inline void avx512_stride2_width3_pool_row_of(const float* const* rows, int64_t row_count, int64_t width,
                                              int64_t pad, float* out, int64_t count, bool relu) {
  const int64_t row_total = kRows > 0 ? kRows : row_count;
  const __m512 quiet_nan = _mm512_set1_ps(__builtin_nanf(""));
  const __m512 minus_inf = _mm512_set1_ps(-__builtin_inff());
  const __m512 zero = _mm512_setzero_ps();
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  // The column maxima of columns c .. c + 15 (c >= 0), -inf past the image's last column.
  auto columns_from = [&](int64_t c) {
    const int64_t left = width - c;
    const __mmask16 in_image =
        left >= 16 ? Avx512Lanes::kAll : left <= 0 ? __mmask16{0} : static_cast<__mmask16>((1u << left) - 1);
    __m512 m = _mm512_mask_loadu_ps(minus_inf, in_image, rows[0] + c);
    __mmask16 nan = _mm512_cmp_ps_mask(m, m, _CMP_UNORD_Q);
    for (int64_t r = 1; r < row_total; ++r) {
      const __m512 v = _mm512_mask_loadu_ps(minus_inf, in_image, rows[r] + c);
      m = _mm512_max_ps(v, m);
      nan = static_cast<__mmask16>(nan | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q));
    }
    return _mm512_mask_mov_ps(m, nan, quiet_nan);
  };
  // Columns c .. c + 15 for c >= -1 (padding is at most 1 for a 3-wide window): column -1 is padding, -inf.
  auto columns = [&](int64_t c) {
    if (c >= 0) return columns_from(c);
    return _mm512_castsi512_ps(
        _mm512_alignr_epi32(_mm512_castps_si512(columns_from(0)), _mm512_castps_si512(minus_inf), 15));
  };
  __m512 first = columns(-pad);
  for (int64_t e = 0; e < count; e += 16) {
    const int64_t c = 2 * e - pad;
    const __m512 second = columns_from(c + 16), next = columns_from(c + 32);
    const __m512 tap0 = _mm512_permutex2var_ps(first, even, second);
    const __m512 tap1 = _mm512_permutex2var_ps(first, odd, second);
    const __m512 tap2 =
        _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(next), _mm512_castps_si512(tap0), 1));
    __m512 m = tap0;
    __mmask16 nan = _mm512_cmp_ps_mask(m, m, _CMP_UNORD_Q);
    m = _mm512_max_ps(tap2, m);
    nan = static_cast<__mmask16>(nan | _mm512_cmp_ps_mask(tap2, tap2, _CMP_UNORD_Q));
    m = _mm512_max_ps(tap1, m);
    nan = static_cast<__mmask16>(nan | _mm512_cmp_ps_mask(tap1, tap1, _CMP_UNORD_Q));
    m = _mm512_mask_mov_ps(m, nan, quiet_nan);
    if (relu) m = _mm512_mask_mov_ps(m, _mm512_cmp_ps_mask(m, zero, _CMP_LT_OQ), zero);  // NaN and -0 stay
    const __mmask16 real = count - e >= 16 ? Avx512Lanes::kAll : static_cast<__mmask16>((1u << (count - e)) - 1);
    _mm512_mask_storeu_ps(out + e, real, m);
    first = next;
  }
}

inline void avx512_stride2_width3_pool_row(const float* const* rows, int64_t row_count, int64_t width, int64_t pad,
                                           float* out, int64_t count, bool relu) {
  switch (row_count) {
    case 3: return avx512_stride2_width3_pool_row_of<3>(rows, row_count, width, pad, out, count, relu);
    case 2: return avx512_stride2_width3_pool_row_of<2>(rows, row_count, width, pad, out, count, relu);
    default: return avx512_stride2_width3_pool_row_of<0>(rows, row_count, width, pad, out, count, relu);
  }
}

}  // namespace
}  // namespace xnorconv
