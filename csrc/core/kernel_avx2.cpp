// AVX2 kernel family (AVX2 + FMA; no vector popcount). One ymm holds the packed words of 4 consecutive output
// pixels; popcount is the nibble lookup (vpshufb) into byte counters, widened with vpsadbw, which sums the 8 bytes
// of each 64-bit lane, so each lane stays one output pixel. Byte counters hold at most 8 per word, so they are
// flushed every 31 words.
#include <cstdint>

#include "xnorconv_core.h"

#if defined(__x86_64__) || defined(_M_X64)
// x86-only header: inside the guard, so that the whole file compiles to nothing on ARM (native or cross).
#include <immintrin.h>

#define XNORCONV_ISA_TARGET "avx2,fma,popcnt,bmi,bmi2"
#include "isa_begin.h"
#include "kernel_common.h"

namespace xnorconv {
namespace {

struct Avx2Isa {
  // Measured best of 1x6, 1x8, 1x10, 2x3, 4x2 and 2x4 on Zen 4 (bench_core, interleaved).
  // 2 strips x 4 channels = 8 byte-counter registers + 2 activations + LUT, nibble mask and temporaries: 16 ymm.
  static constexpr int kStrip = 4, kStrips = 2, kChannels = 4;
  static constexpr int kFlushWords = 31;

  // One 8-float compare per step; `Threshold` yields the 8 thresholds at offset i.
  template <class Threshold>
  static uint64_t below_impl(const float* x, Threshold threshold, int64_t count) {
    uint64_t bits = 0;
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) {
      const int m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), threshold.vec(i), _CMP_NGE_UQ));
      bits |= static_cast<uint64_t>(static_cast<unsigned>(m)) << i;
    }
    for (; i < count; ++i) bits |= static_cast<uint64_t>(!(x[i] >= threshold.at(i))) << i;
    return bits;
  }

  struct Uniform {
    float t;
    __m256 vec(int64_t) const { return _mm256_set1_ps(t); }
    float at(int64_t) const { return t; }
  };
  struct PerLane {
    const float* t;
    __m256 vec(int64_t i) const { return _mm256_loadu_ps(t + i); }
    float at(int64_t i) const { return t[i]; }
  };

  static uint64_t below(const float* x, float t, int64_t count) { return below_impl(x, Uniform{t}, count); }

  static uint64_t nonzero(const uint8_t* x, int64_t count) {
    uint64_t bits = 0;
    int64_t i = 0;
    const __m256i zero = _mm256_setzero_si256();
    for (; i + 32 <= count; i += 32) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
      const uint32_t is_zero = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, zero)));
      bits |= static_cast<uint64_t>(~is_zero) << i;
    }
    for (; i < count; ++i) bits |= static_cast<uint64_t>(x[i] != 0) << i;
    return bits;
  }
  static uint64_t below_each(const float* x, const float* t, int64_t count) {
    return below_impl(x, PerLane{t}, count);
  }

  // The portable transpose64's six swap levels on 16 ymm (a[i] in register i / 4, lane i % 4), as in the AVX-512
  // family: distances 32 to 4 pair whole registers, 2 and 1 pair lanes of one register through a permute.
  static void transpose64(uint64_t a[64]) {
    __m256i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(a + 4 * i));
    auto across = [&](int d, int shift, uint64_t mask) {
      const __m256i m = _mm256_set1_epi64x(static_cast<long long>(mask));
      for (int base = 0; base < 16; base += 2 * d)
        for (int i = base; i < base + d; ++i) {
          const __m256i t = _mm256_and_si256(_mm256_xor_si256(_mm256_srli_epi64(r[i], shift), r[i + d]), m);
          r[i] = _mm256_xor_si256(r[i], _mm256_slli_epi64(t, shift));
          r[i + d] = _mm256_xor_si256(r[i + d], t);
        }
    };
    across(8, 32, 0x00000000FFFFFFFFull);
    across(4, 16, 0x0000FFFF0000FFFFull);
    across(2, 8, 0x00FF00FF00FF00FFull);
    across(1, 4, 0x0F0F0F0F0F0F0F0Full);
    // t is formed in the low lane of each pair and moved to the high one by the same permute.
    for (auto& v : r) {
      const __m256i m = _mm256_set1_epi64x(0x3333333333333333ll);
      const __m256i t = _mm256_and_si256(_mm256_xor_si256(_mm256_srli_epi64(v, 2), _mm256_permute4x64_epi64(v, 0x4E)), m);
      v = _mm256_xor_si256(v, _mm256_blend_epi32(_mm256_permute4x64_epi64(t, 0x4E), _mm256_slli_epi64(t, 2), 0x0F));
    }
    for (auto& v : r) {
      const __m256i m = _mm256_set1_epi64x(0x5555555555555555ll);
      const __m256i t = _mm256_and_si256(_mm256_xor_si256(_mm256_srli_epi64(v, 1), _mm256_shuffle_epi32(v, 0x4E)), m);
      v = _mm256_xor_si256(v, _mm256_blend_epi32(_mm256_shuffle_epi32(t, 0x4E), _mm256_slli_epi64(t, 1), 0x33));
    }
    for (int i = 0; i < 16; ++i) _mm256_store_si256(reinterpret_cast<__m256i*>(a + 4 * i), r[i]);
  }

  static void block(const uint64_t* const act[kStrips], const int64_t* tap_offset, int64_t taps,
                    int64_t words_per_group, int64_t word_stride, const uint64_t* const weight[kChannels],
                    const BlockStore<kStrips, kChannels, kStrip>& bs) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low_nibble = _mm256_set1_epi8(0x0F);
    __m256i total[kStrips][kChannels], bytes[kStrips][kChannels];
    for (int i = 0; i < kStrips; ++i)
      for (int v = 0; v < kChannels; ++v) total[i][v] = bytes[i][v] = _mm256_setzero_si256();
    const uint64_t* w[kChannels];
    for (int v = 0; v < kChannels; ++v) w[v] = weight[v];
    int pending = 0;
    auto flush = [&] {
      for (int i = 0; i < kStrips; ++i)
        for (int v = 0; v < kChannels; ++v) {
          total[i][v] = _mm256_add_epi64(total[i][v], _mm256_sad_epu8(bytes[i][v], _mm256_setzero_si256()));
          bytes[i][v] = _mm256_setzero_si256();
        }
      pending = 0;
    };
    for (int64_t t = 0; t < taps; ++t) {
      const uint64_t* a[kStrips];
      for (int i = 0; i < kStrips; ++i) a[i] = act[i] + tap_offset[t];
      for (int64_t k = 0; k < words_per_group; ++k) {
        __m256i x[kStrips];
        for (int i = 0; i < kStrips; ++i)
          x[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[i] + k * word_stride));
        for (int v = 0; v < kChannels; ++v) {
          const __m256i wv = _mm256_set1_epi64x(static_cast<long long>(*w[v]++));
          for (int i = 0; i < kStrips; ++i) {
            const __m256i d = _mm256_xor_si256(x[i], wv);
            const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(d, low_nibble));
            const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(d, 4), low_nibble));
            bytes[i][v] = _mm256_add_epi8(bytes[i][v], _mm256_add_epi8(lo, hi));
          }
        }
        if (++pending == kFlushWords) flush();
      }
    }
    flush();
    for (int i = 0; i < kStrips; ++i)
      for (int v = 0; v < kChannels; ++v)
        if (bs.stored(i, v))
          store(total[i][v], bs.lanes[i], bs.depth, bs.scale[v], bs.bias[v], bs.correction(i, v), bs.out(i, v),
                bs.signs(i, v), bs.threshold[v], bs.residual(i, v), bs.prelu, bs.slope[v]);
  }

  static void store(__m256i counts, int lanes, int32_t depth, float scale, float bias, const int32_t* correction,
                    float* out, uint8_t* signs, float threshold, const float* residual, bool prelu, float slope) {
    // Lanes are 64-bit counts below 2^31: take the low dword of each.
    const __m256i count = _mm256_permutevar8x32_epi32(counts, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
    __m128i dot = _mm_sub_epi32(_mm_set1_epi32(depth), _mm_slli_epi32(_mm256_castsi256_si128(count), 1));
    if (correction) dot = _mm_sub_epi32(dot, _mm_load_si128(reinterpret_cast<const __m128i*>(correction)));
    __m128 y = _mm_fmadd_ps(_mm_set1_ps(scale), _mm_cvtepi32_ps(dot), _mm_set1_ps(bias));
    if (residual) {
      alignas(16) float r[4] = {0, 0, 0, 0};
      for (int lane = 0; lane < lanes; ++lane) r[lane] = residual[lane];
      y = _mm_add_ps(y, _mm_load_ps(r));
    }
    if (prelu) {
      const __m128 negative = _mm_cmp_ps(y, _mm_setzero_ps(), _CMP_NGE_UQ);
      y = _mm_blendv_ps(y, _mm_mul_ps(y, _mm_set1_ps(slope)), negative);
    }
    if (signs) {
      const int negative = _mm_movemask_ps(_mm_cmp_ps(y, _mm_set1_ps(threshold), _CMP_NGE_UQ));
      for (int lane = 0; lane < lanes; ++lane) signs[lane] = static_cast<uint8_t>((negative >> lane) & 1);
    } else if (lanes == 4) {
      _mm_storeu_ps(out, y);
    } else {
      alignas(16) float tmp[4];
      _mm_store_ps(tmp, y);
      for (int lane = 0; lane < lanes; ++lane) out[lane] = tmp[lane];
    }
  }

  static uint64_t peak_probe(int64_t iterations) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low_nibble = _mm256_set1_epi8(0x0F);
    constexpr int kAcc = kStrips * kChannels;
    __m256i bytes[kAcc], total = _mm256_setzero_si256(), x[kStrips];
    for (int i = 0; i < kStrips; ++i) x[i] = _mm256_set1_epi64x(0x0123456789ABCDEFll * (i + 1));
    for (int64_t it = 0; it < iterations;) {
      for (int i = 0; i < kAcc; ++i) bytes[i] = _mm256_setzero_si256();
      for (int round = 0; round < kFlushWords && it < iterations; ++round, ++it) {
        for (int v = 0; v < kChannels; ++v) {
          // A fresh opaque weight per channel, as the kernel's broadcast: no product can be shared.
          __m256i w = _mm256_set1_epi64x(0x5555AAAA3333CCCCll + v);
          __asm__ volatile("" : "+x"(w));
          for (int i = 0; i < kStrips; ++i) {
            const __m256i d = _mm256_xor_si256(x[i], w);
            const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(d, low_nibble));
            const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(d, 4), low_nibble));
            bytes[i * kChannels + v] = _mm256_add_epi8(bytes[i * kChannels + v], _mm256_add_epi8(lo, hi));
          }
        }
      }
      for (int i = 0; i < kAcc; ++i) total = _mm256_add_epi64(total, _mm256_sad_epu8(bytes[i], _mm256_setzero_si256()));
    }
    alignas(32) long long lanes[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), total);
    volatile long long sink = lanes[0] + lanes[1] + lanes[2] + lanes[3];
    (void)sink;
    return static_cast<uint64_t>(iterations) * kAcc * 256;
  }
};

}  // namespace

const KernelOps& avx2_kernel() {
  static const KernelOps ops = make_kernel_ops<Avx2Isa>("avx2");
  return ops;
}

}  // namespace xnorconv

#include "isa_end.h"
#endif
