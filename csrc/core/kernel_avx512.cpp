// AVX-512 kernel family (F, BW, VL, DQ, VPOPCNTDQ). Vectorised across pixels: one zmm holds the packed words of 8
// consecutive output pixels for one tap and channel word; the weight word of an output channel is broadcast, so
// the inner loop is vpxorq + vpopcntq + vpaddq with no horizontal reduction, and each accumulator lane is one
// output value: the epilogue writes 8 contiguous floats of an NCHW row, or, transposed, a pixel's channels in NHWC.
#include <cstdint>

#include "xnorconv_core.h"

#if defined(__x86_64__) || defined(_M_X64)
// x86-only header: inside the guard, so that the whole file compiles to nothing on ARM (native or cross).
#include <immintrin.h>

#define XNORCONV_ISA_TARGET "avx2,fma,popcnt,bmi,bmi2,avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq"
#include "isa_begin.h"
#include "kernel_common.h"
#include "avx512_binarize.h"
#include "avx512_lanes.h"
#include "first_layer_kernel.h"
#include "window_means_kernel.h"

namespace xnorconv {
namespace {

struct Avx512Isa : Avx512Binarize, NoPreparation {
  // The best of 2x12, 3x7, 3x8, 4x5, 6x4 and 4x6 in bench_core (interleaved): 4 strips x 6 channels = 24 zmm
  // accumulators + 4 activation registers + temporaries, within the 32 zmm, and 4 loads per 24 products.
  static constexpr int kStrip = 8, kStrips = 4, kChannels = 6;

  template <bool kNhwc, Steps S>
  static void block(const uint64_t* const act[kStrips], const int64_t* tap_offset, int64_t taps,
                    int64_t words_per_group, int64_t word_stride, const uint64_t* const weight[kChannels],
                    const BlockStore<kStrips, kChannels, kStrip>& bs, Call&) {
    __m512i acc[kStrips][kChannels];
    // One channel word of every strip (at `offset` from its first pixel) against word j of every weight row; the
    // first word sets the accumulators instead of adding to zeros.
    auto word = [&](int64_t offset, int64_t j, bool first) {
      __m512i x[kStrips];
      for (int i = 0; i < kStrips; ++i) x[i] = _mm512_loadu_si512(act[i] + offset);
      for (int v = 0; v < kChannels; ++v) {
        const __m512i wv = _mm512_set1_epi64(static_cast<long long>(weight[v][j]));
        for (int i = 0; i < kStrips; ++i) {
          const __m512i count = _mm512_popcnt_epi64(_mm512_xor_si512(x[i], wv));
          acc[i][v] = first ? count : _mm512_add_epi64(acc[i][v], count);
        }
      }
    };
    const __m512i low_dwords = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    if (words_per_group == 1 && taps == 1) {
      // One word per product (a 1x1 layer over up to 64 channels): each count is formed where the output stage
      // takes it, from 4 activation and 6 weight registers, instead of 24 accumulators that, with the output
      // stage's operands, spilled to the stack.
      if (bs.depth <= 32) {
        // Every channel's bit in a word's low half: a strip pair's 16 low halves, gathered once into one zmm,
        // give a channel's 16 counts with one xor and one vpopcntd (against two of each and a vpermt2d).
        __m512i pair[kStrips / 2], wv[kChannels];
        for (int k = 0; k < kStrips / 2; ++k)
          pair[k] = _mm512_permutex2var_epi32(_mm512_loadu_si512(act[2 * k] + tap_offset[0]), low_dwords,
                                              _mm512_loadu_si512(act[2 * k + 1] + tap_offset[0]));
        for (int v = 0; v < kChannels; ++v) wv[v] = _mm512_set1_epi32(static_cast<int>(weight[v][0]));
        store<kNhwc, S>([&](int i, int v) { return _mm512_popcnt_epi32(_mm512_xor_si512(pair[i / 2], wv[v])); },
                        bs);
        return;
      }
      __m512i x[kStrips], wv[kChannels];
      for (int i = 0; i < kStrips; ++i) x[i] = _mm512_loadu_si512(act[i] + tap_offset[0]);
      for (int v = 0; v < kChannels; ++v) wv[v] = _mm512_set1_epi64(static_cast<long long>(weight[v][0]));
      store<kNhwc, S>([&](int i, int v) {
        return _mm512_permutex2var_epi32(_mm512_popcnt_epi64(_mm512_xor_si512(x[i], wv[v])), low_dwords,
                                         _mm512_popcnt_epi64(_mm512_xor_si512(x[i + 1], wv[v])));
      }, bs);
      return;
    }
    // Up to 64 channels a tap is one word: one flat loop, without the per-tap setup of an inner loop that would run
    // once per tap, and with the first word peeled so that it sets the accumulators. The nested loop is not peeled:
    // on the deeper layers that made it slower.
    if (words_per_group == 1) {
      word(tap_offset[0], 0, true);
      for (int64_t t = 1; t < taps; ++t) word(tap_offset[t], t, false);
    } else {
      for (auto& s : acc)
        for (auto& c : s) c = _mm512_setzero_si512();
      for (int64_t t = 0, j = 0; t < taps; ++t)
        for (int64_t k = 0; k < words_per_group; ++k, ++j) word(tap_offset[t] + k * word_stride, j, false);
    }
    store<kNhwc, S>([&](int i, int v) { return _mm512_permutex2var_epi32(acc[i][v], low_dwords, acc[i + 1][v]); },
                    bs);
  }

  // The output stage, on pairs of strips; counts(i, v) (i even) gives channel v's counts of strips i and i + 1 as 16
  // dwords in pixel order: the blocks gather the low dwords of two strips' 64-bit counts into one zmm (one vpermt2d,
  // where vpmovqd takes 2 uops per strip), so the integer and float steps run once per 16 outputs, and the NCHW
  // stores, instantiated for the call's fixed Steps, make no per-vector decision. Unrolled, so the accumulators stay
  // in registers (the per-strip loop with its branches spilled all 24 of them). Against one strip at a time it raises
  // the kernel's fraction of peak most on the layers whose blocks are shallow (few channel words per tap, 1x1), where
  // the output stage is a large share of the work.
  template <bool kNhwc, Steps S, class Counts>
  static void store(const Counts& counts, const BlockStore<kStrips, kChannels, kStrip>& bs) {
    const __m512i depth = _mm512_set1_epi32(bs.depth);
    // A copy of the call's parameters that no store can reach: through the reference, the compiler reloaded the
    // output pointer after every vector store (an intrinsic store may alias anything).
    const EpilogueParams e = *bs.epilogue;
    if constexpr (kNhwc)
      store_nhwc<S>(counts, bs, e, depth);
    else
      store_nchw<S>(counts, bs, e, depth);
  }

  template <Steps S, class Counts>
  static void store_nchw(const Counts& counts, const BlockStore<kStrips, kChannels, kStrip>& bs,
                         const EpilogueParams& e, __m512i depth) {
    if (bs.dense) {
      dense_store<S>(counts, bs, e, depth);
      return;
    }
#pragma GCC unroll 4
    for (int i = 0; i < kStrips; i += 2) {
      if (bs.offset[i] < 0) break;  // the block's tail: repeats of the last strip, never stored
      const bool second = bs.offset[i + 1] >= 0;
      const __mmask16 lanes =
          static_cast<__mmask16>(lane_mask(bs.lanes[i]) | (second ? lane_mask(bs.lanes[i + 1]) << 8 : 0));
      const __mmask16 border =
          static_cast<__mmask16>((bs.border[i] ? 0x00FF : 0) | (second && bs.border[i + 1] ? 0xFF00 : 0));
      // Strip i + 1 elsewhere than right after strip i (a new row when out_w is not a multiple of 8): two accesses.
      const bool split = second && bs.offset[i + 1] != bs.offset[i] + kStrip;
#pragma GCC unroll 8
      for (int v = 0; v < kChannels; ++v) {
        if (!bs.channel_real[v]) break;  // past the group's last channel (the block's last channels only)
        const ChannelValues<Avx512Lanes> c = bs.values<Avx512Lanes>(v);
        const __m512 y = output(counts(i, v), depth, border, bs, c, i, v);
        finish<Avx512Lanes, S>(e, c, y, {bs.at(i, v), bs.at(i + 1, v), lanes, split}, bs.residual[v]);
      }
    }
  }

  // NHWC output: a pixel's channels are adjacent in memory, a strip's pixels out_channels apart. The block's 6
  // channel vectors of a strip pair (16 pixels each) are transposed into 8 vectors of [pixel j's channels | pixel
  // j + 8's], each stored (and its residual loaded) with two masked 256-bit accesses: 16 accesses per 96 outputs
  // where scattering the channel vectors took 96. The steps after the affine one then run across channels, with
  // the per-channel operands as vectors.
  template <Steps S, class Counts>
  static void store_nhwc(const Counts& counts, const BlockStore<kStrips, kChannels, kStrip>& bs,
                         const EpilogueParams& e, __m512i depth) {
    static_assert(kChannels <= 8, "a pixel's channels of a block fill one 256-bit half");
    unsigned channels = 0;  // the block's real channels
    for (int v = 0; v < kChannels; ++v) channels |= static_cast<unsigned>(bs.channel_real[v]) << v;
    // The per-channel operands across the lanes [channel 0..5 | channel 0..5], for the steps after the affine one,
    // picked out of the block's operands (4 floats per channel) by one permute each; lanes 6, 7, 14 and 15 are never
    // stored. Written lane by lane into an array instead, the vector load that read them back waited on store
    // forwarding once per block, which made the NHWC output stage of a 1x1 layer cost more than its products.
    static_assert(kChannels == 6 && sizeof(ChannelValues<OneLane>) == 4 * sizeof(float),
                  "the permutes below pick channel v's operand k at float 4v + k of bs.operands");
    const float* operands = &bs.operands[0].scale;
    const __m512 channels_0_3 = _mm512_loadu_ps(operands);
    const __m512 channels_4_5 = _mm512_maskz_loadu_ps(0x00FF, operands + 16);
    const __m512i slopes = _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 0, 0, 2, 6, 10, 14, 18, 22, 0, 0);
    const __m512i thresholds = _mm512_setr_epi32(3, 7, 11, 15, 19, 23, 0, 0, 3, 7, 11, 15, 19, 23, 0, 0);
    ChannelValues<Avx512Lanes> across;
    across.scale = across.bias = _mm512_setzero_ps();  // applied before the transpose
    across.slope = _mm512_permutex2var_ps(channels_0_3, slopes, channels_4_5);
    across.threshold = _mm512_permutex2var_ps(channels_0_3, thresholds, channels_4_5);
    for (int i = 0; i < kStrips; i += 2) {
      if (bs.offset[i] < 0) break;  // the block's tail: repeats of the last strip, never stored
      const bool second = bs.offset[i + 1] >= 0;
      const __mmask16 border =
          static_cast<__mmask16>((bs.border[i] ? 0x00FF : 0) | (second && bs.border[i + 1] ? 0xFF00 : 0));
      __m512 y[8];
      for (int v = 0; v < kChannels; ++v)
        y[v] = output(counts(i, v), depth, border, bs, bs.values<Avx512Lanes>(v), i, v);
      for (int v = kChannels; v < 8; ++v) y[v] = _mm512_setzero_ps();
      transpose_8x16(y);
      for (int j = 0; j < kStrip; ++j) {
        const bool low = j < bs.lanes[i], high = second && j < bs.lanes[i + 1];
        const __mmask16 mask = static_cast<__mmask16>((low ? channels : 0) | (high ? channels << 8 : 0));
        if (!mask) continue;
        const int64_t index = bs.at(i, 0, j), other = high ? bs.at(i + 1, 0, j) : index;
        finish<Avx512Lanes, S>(e, across, y[j], {index, other, mask, true});
      }
    }
  }

  // y[v] (v < 8) holds channel v of 16 pixels; afterwards y[j] holds pixel j's 8 channels in its low half and pixel
  // j + 8's in its high half: the 8x8 transpose of each half (unpack, shuffle, then 128-bit lane pairs).
  static void transpose_8x16(__m512 (&y)[8]) {
    __m512 t[8], u[8];
    for (int k = 0; k < 4; ++k) {
      t[2 * k] = _mm512_unpacklo_ps(y[2 * k], y[2 * k + 1]);
      t[2 * k + 1] = _mm512_unpackhi_ps(y[2 * k], y[2 * k + 1]);
    }
    for (int k = 0; k < 2; ++k) {
      u[4 * k] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
      u[4 * k + 1] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
      u[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
      u[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
    }
    // u[k] (k < 4): channels 0-3 of pixels k, k + 4, k + 8, k + 12 (one per 128-bit lane); u[k + 4]: channels 4-7.
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
    const __m512i later = _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int k = 0; k < 4; ++k) {
      y[k] = _mm512_permutex2var_ps(u[k], first, u[k + 4]);
      y[k + 4] = _mm512_permutex2var_ps(u[k], later, u[k + 4]);
    }
  }

  // Whole blocks (BlockStore::dense): 16 outputs per count vector + integer step (+ corrections on borders) +
  // conversion + FMA (+ S's residual and PReLU) + store, with no per-strip or per-channel test.
  template <Steps S, class Counts>
  static void dense_store(const Counts& counts, const BlockStore<kStrips, kChannels, kStrip>& bs,
                          const EpilogueParams& e, __m512i depth) {
#pragma GCC unroll 4
    for (int i = 0; i < kStrips; i += 2) {
      const __mmask16 border = static_cast<__mmask16>((bs.border[i] ? 0x00FF : 0) | (bs.border[i + 1] ? 0xFF00 : 0));
#pragma GCC unroll 8
      for (int v = 0; v < kChannels; ++v) {
        const ChannelValues<Avx512Lanes> c = bs.values<Avx512Lanes>(v);
        const __m512 y = output(counts(i, v), depth, border, bs, c, i, v);
        finish<Avx512Lanes, S>(e, c, y, {bs.at(i, v), 0, Avx512Lanes::kAll, false}, bs.residual[v]);
      }
    }
  }

  // y = scale * (depth - 2 * count - correction) + bias for strips i and i + 1 (lanes 0-7 and 8-15) of channel v.
  static __m512 output(__m512i count, __m512i depth, __mmask16 border, const BlockStore<kStrips, kChannels, kStrip>& bs,
                       const ChannelValues<Avx512Lanes>& c, int i, int v) {
    __m512i dot = _mm512_sub_epi32(depth, _mm512_add_epi32(count, count));
    if (border) dot = _mm512_sub_epi32(dot, corrections(border, bs, i, v));
    return affine<Avx512Lanes>(c, dot);
  }

  // The zero-padding corrections of strips i and i + 1 of channel v, in the lanes of `border`. Up to 16 classes
  // (3x3 kernels have 9) the channel's values fit one register and one vpermd looks all 16 lanes up; beyond that, a
  // gather.
  static __m512i corrections(__mmask16 border, const BlockStore<kStrips, kChannels, kStrip>& bs, int i, int v) {
    const __m512i classes = _mm512_load_si512(bs.lane_class[i]);
    if (bs.classes <= 16) {
      const __mmask16 present = static_cast<__mmask16>(lane_mask(bs.classes));
      return _mm512_maskz_permutexvar_epi32(border, classes, _mm512_maskz_loadu_epi32(present, bs.class_value[v]));
    }
    return _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), border, classes, bs.class_value[v], 4);
  }

  static unsigned lane_mask(int lanes) { return (1u << lanes) - 1; }

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
  static const KernelOps ops = [] {
    KernelOps k =
        with_window_means<Avx512Lanes>(with_first_layer<Avx512Lanes, 16, 14>(make_kernel_ops<Avx512Isa>("avx512")));
    k.window_max = avx512_window_max;
    k.stride2_window_max = avx512_stride2_window_max;
    k.stride2_width3_pool_row = avx512_stride2_width3_pool_row;
    return k;
  }();
  return ops;
}

}  // namespace xnorconv

#include "isa_end.h"
#endif
