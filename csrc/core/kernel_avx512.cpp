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
#include "avx512_binarize.h"

namespace xnorconv {
namespace {

struct Avx512Isa : Avx512Binarize {
  // Measured best of 2x12, 3x7, 3x8, 4x5, 6x4 and 4x6 on Zen 4 (bench_core, interleaved).
  // 4 strips x 6 channels = 24 zmm accumulators + 4 activation registers + temporaries, within the 32 zmm.
  static constexpr int kStrip = 8, kStrips = 4, kChannels = 6;

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
    // Summed by hand: GCC 12 warns inside _mm512_reduce_add_epi64's own header code.
    alignas(64) long long lanes[8];
    _mm512_store_si512(lanes, sum);
    volatile long long sink = lanes[0] + lanes[1] + lanes[2] + lanes[3] + lanes[4] + lanes[5] + lanes[6] + lanes[7];
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
