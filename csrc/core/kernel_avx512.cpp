// AVX-512 kernel family (F, BW, VL, DQ, VPOPCNTDQ). Vectorised across pixels: one zmm holds the packed words of 8
// consecutive output pixels for one tap and channel word; the weight word of an output channel is broadcast, so
// the inner loop is vpxorq + vpopcntq + vpaddq with no horizontal reduction, and each accumulator lane is one
// output value: the epilogue writes 8 contiguous floats of an NCHW row.
#include <cstdint>

#include "xnorconv_core.h"

#if defined(__x86_64__) || defined(_M_X64)
// x86-only header: inside the guard, so that the whole file compiles to nothing on ARM (native or cross).
#include <immintrin.h>

#define XNORCONV_ISA_TARGET "avx2,fma,popcnt,bmi,bmi2,avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq"
#include "isa_begin.h"
#include "kernel_common.h"

namespace xnorconv {
namespace {

struct Avx512Isa {
  // Measured best of 2x12, 3x7, 3x8, 4x5, 6x4 and 4x6 on Zen 4 (bench_core, interleaved).
  // 4 strips x 6 channels = 24 zmm accumulators + 4 activation registers + temporaries, within the 32 zmm.
  static constexpr int kStrip = 8, kStrips = 4, kChannels = 6;

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

  static void block(const uint64_t* const act[kStrips], const int64_t* tap_offset, int64_t taps,
                    int64_t words_per_group, int64_t word_stride, const uint64_t* const weight[kChannels],
                    const BlockStore<kStrips, kChannels, kStrip>& bs) {
    __m512i acc[kStrips][kChannels];
    for (auto& s : acc)
      for (auto& c : s) c = _mm512_setzero_si512();
    const uint64_t* w[kChannels];
    for (int v = 0; v < kChannels; ++v) w[v] = weight[v];
    for (int64_t t = 0; t < taps; ++t) {
      const uint64_t* a[kStrips];
      for (int i = 0; i < kStrips; ++i) a[i] = act[i] + tap_offset[t];
      for (int64_t k = 0; k < words_per_group; ++k) {
        __m512i x[kStrips];
        for (int i = 0; i < kStrips; ++i) x[i] = _mm512_loadu_si512(a[i] + k * word_stride);
        for (int v = 0; v < kChannels; ++v) {
          const __m512i wv = _mm512_set1_epi64(static_cast<long long>(*w[v]++));
          for (int i = 0; i < kStrips; ++i)
            acc[i][v] = _mm512_add_epi64(acc[i][v], _mm512_popcnt_epi64(_mm512_xor_si512(x[i], wv)));
        }
      }
    }
    const __m256i depth = _mm256_set1_epi32(bs.depth);
    for (int v = 0; v < kChannels; ++v) {
      const __m256 scale = _mm256_set1_ps(bs.scale[v]), bias = _mm256_set1_ps(bs.bias[v]);
      for (int i = 0; i < kStrips; ++i) {
        if (!bs.stored(i, v)) continue;
        const __m256i count = _mm512_cvtepi64_epi32(acc[i][v]);
        __m256i dot = _mm256_sub_epi32(depth, _mm256_add_epi32(count, count));
        if (bs.correction(i, v))
          dot = _mm256_sub_epi32(dot, _mm256_load_si256(reinterpret_cast<const __m256i*>(bs.correction(i, v))));
        __m256 y = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), bias);
        const __mmask8 lanes = static_cast<__mmask8>((1u << bs.lanes[i]) - 1);
        if (const float* r = bs.residual(i, v)) y = _mm256_add_ps(y, _mm256_maskz_loadu_ps(lanes, r));
        if (bs.prelu) {
          const __mmask8 negative = _mm256_cmp_ps_mask(y, _mm256_setzero_ps(), _CMP_NGE_UQ);
          y = _mm256_mask_mul_ps(y, negative, y, _mm256_set1_ps(bs.slope[v]));
        }
        if (uint8_t* signs = bs.signs(i, v)) {
          const __mmask8 negative = _mm256_cmp_ps_mask(y, _mm256_set1_ps(bs.threshold[v]), _CMP_NGE_UQ);
          _mm_mask_storeu_epi8(signs, lanes, _mm_maskz_set1_epi8(negative, 1));
        } else {
          _mm256_mask_storeu_ps(bs.out(i, v), lanes, y);
        }
      }
    }
  }

  static uint64_t peak_probe(int64_t iterations) {
    // kStrips x kProbeChannels products per round, each with its own weight register so that nothing can be
    // shared between them (5 channels rather than 6 keeps accumulators + operands within the 32 registers).
    constexpr int kProbeChannels = 5, kAcc = kStrips * kProbeChannels;
    __m512i acc[kAcc], x[kStrips], w[kProbeChannels];
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_setzero_si512();
    for (int i = 0; i < kStrips; ++i) x[i] = _mm512_set1_epi64(0x0123456789ABCDEFll * (i + 1));
    for (int v = 0; v < kProbeChannels; ++v) w[v] = _mm512_set1_epi64(0x5555AAAA3333CCCCll + v);
    for (int64_t it = 0; it < iterations; ++it) {
      // Opaque to the optimiser, so every round really executes.
      for (int v = 0; v < kProbeChannels; ++v) __asm__ volatile("" : "+v"(w[v]));
      for (int v = 0; v < kProbeChannels; ++v)
        for (int i = 0; i < kStrips; ++i)
          acc[i * kProbeChannels + v] = _mm512_add_epi64(acc[i * kProbeChannels + v],
                                                         _mm512_popcnt_epi64(_mm512_xor_si512(x[i], w[v])));
    }
    __m512i sum = _mm512_setzero_si512();
    for (int i = 0; i < kAcc; ++i) sum = _mm512_add_epi64(sum, acc[i]);
    volatile long long sink = _mm512_reduce_add_epi64(sum);
    (void)sink;
    return static_cast<uint64_t>(iterations) * kAcc * 512;
  }
};

}  // namespace

const KernelOps& avx512_kernel() {
  static const KernelOps ops = make_kernel_ops<Avx512Isa>("avx512");
  return ops;
}

}  // namespace xnorconv

#include "isa_end.h"
#endif
