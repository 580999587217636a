// AVX2 kernel family (AVX2 + FMA; no vector popcount). One ymm holds the packed words of 4 consecutive output
// pixels; popcount is the nibble lookup (vpshufb) into byte counters, widened with vpsadbw, which sums the 8 bytes
// of each 64-bit lane, so each lane stays one output pixel. Byte counters hold at most 8 per word, so they are
// widened every 31 words.
//
// XOR commutes with the nibble split (lo(a ^ w) = lo(a) ^ lo(w)), so the split is done once per word of each operand
// instead of once per product: the activations once per task range (prepare), the weights once per channel block
// (block_weights). The inner loop is then 2 XOR + 2 vpshufb + 2 byte adds per 256 binary MACs instead of 8 ops (the
// and/shift/and of the split). All of them compete for the same three vector ALU ports, so the peak rises by 8/6;
// the probe measures it.
//
// Tried, and slower or no better on a core with three vector ALU ports: Harley-Seal carry-save adders
// (5 ops per CSA without vpternlog, about 6 ops per 256 MACs with the XOR, and 3-5 live registers per output),
// scalar popcnt beside the vector loop (popcnt runs on port 1, one of the three vector ports, and its xor/add/load
// uops hit the 6-wide rename limit first).
#include <cstdint>
#include <cstdlib>
#include <new>

#include "xnorconv_core.h"

#if defined(__x86_64__) || defined(_M_X64)
// x86-only header: inside the guard, so that the whole file compiles to nothing on ARM (native or cross).
#include <immintrin.h>

#define XNORCONV_ISA_TARGET "avx2,fma,popcnt,bmi,bmi2"
#include "isa_begin.h"
#include "kernel_common.h"
#include "first_layer_kernel.h"
#include "window_means_kernel.h"

namespace xnorconv {
namespace {

// A buffer kept per thread across calls, so that the split planes cost no allocation (and no page faults) per call.
struct Scratch {
  uint64_t* data = nullptr;
  int64_t capacity = 0;
  uint64_t* get(int64_t words) {
    if (words > capacity) {
      std::free(data);
      capacity = 0;
      data = static_cast<uint64_t*>(std::malloc(static_cast<size_t>(words) * sizeof(uint64_t)));
      // An exception, not an abort: the op layer turns it into a Python error (at::parallel_for rethrows it).
      if (!data) throw std::bad_alloc();
      capacity = words;
    }
    return data;
  }
  ~Scratch() { std::free(data); }
};

constexpr uint64_t kLowNibbles = 0x0F0F0F0F0F0F0F0Full;

// Per-thread buffers of the convolution pass (the tasks of one call may run on several threads), grown as needed and
// kept across calls: the activation nibble planes, the split weights of the current channel block, the word offsets.
thread_local Scratch t_act_planes, t_weight_block, t_offsets;

void split_nibbles(const uint64_t* src, int64_t words, uint64_t* lo, uint64_t* hi);

// The output stage's vector (output_stage.h): the 8 pixels of one strip, of which the first `lanes` are real.
struct Avx2Lanes {
  static constexpr int kLanes = 8;
  using F = __m256;
  using I = __m256i;
  struct At {
    int64_t index;
    int lanes;
  };
  static At run(int64_t index, int lanes) { return {index, lanes}; }
  static F broadcast(float x) { return _mm256_set1_ps(x); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F to_float(I x) { return _mm256_cvtepi32_ps(x); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F pair_sums(F a, F b) {
    // [a's pairs 0-1, b's 0-1 | a's 2-3, b's 2-3] per 128-bit half, then the 64-bit quarters put in order.
    const __m256 sums = _mm256_add_ps(_mm256_shuffle_ps(a, b, 0x88), _mm256_shuffle_ps(a, b, 0xDD));
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(sums), 0xD8));
  }
  static F prelu(F y, F slope) {
    return _mm256_blendv_ps(y, _mm256_mul_ps(y, slope), _mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_NGE_UQ));
  }
  static __m256i real(int lanes) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  // Masked loads and stores never touch the lanes past a partial strip (which may lie past the tensor's end).
  static F load(const float* base, const At& at) {
    return at.lanes == kLanes ? _mm256_loadu_ps(base + at.index) : _mm256_maskload_ps(base + at.index, real(at.lanes));
  }
  static void store(float* base, const At& at, F y) {
    if (at.lanes == kLanes) _mm256_storeu_ps(base + at.index, y);
    else _mm256_maskstore_ps(base + at.index, real(at.lanes), y);
  }
  static void store_signs(uint8_t* base, const At& at, F y, F threshold) {
    const int negative = _mm256_movemask_ps(_mm256_cmp_ps(y, threshold, _CMP_NGE_UQ));
    uint8_t* s = base + at.index;
    for (int lane = 0; lane < at.lanes; ++lane) s[lane] = static_cast<uint8_t>((negative >> lane) & 1);
  }
};

struct Avx2Isa {
  // A strip is 8 pixels, computed as two 4-pixel halves one after the other; a half keeps its kChannels byte
  // counters, its two activation nibble planes, two weight broadcasts, the LUT and two temporaries in the 16 ymm,
  // with nothing spilled. 4 strips x 6 channels was the best of 1..8 strips of 4 or 8 pixels (16 was slower) and
  // 5, 7, 8, 10 channels (8 and more spill counters) in bench_core, interleaved; 2 strips x 4 channels held
  // in registers at once needs the activations as memory operands, which unlaminate and leave the loop issue-bound.
  static constexpr int kStrip = 8, kHalf = 4, kStrips = 4, kChannels = 6;
  static constexpr int kFlushWords = 31;

  // What prepare derives from the call for the blocks of one task range, passed to each block.
  struct Call {
    const uint64_t* packed;      // the packed input that the blocks' act pointers point into
    const uint64_t* low;         // its low nibble plane (same word positions); the high plane follows at +hi_offset
    int64_t hi_offset;
    const int64_t* word_offsets;  // word j = tap * words_per_group + channel word, relative to a strip
    uint64_t* weight_block;       // [word][channel][lo, hi] of the current channel block
    const uint64_t* cached_row;   // its first weight row (reset every range: weights may change in place)
  };

  // Splits the packed activations into nibble planes and flattens the tap offsets and channel words into one
  // offset list, once per task range, into this thread's buffers.
  static Call prepare(const ConvParams& p, const ActivationLayout& l, const uint64_t* packed,
                      const int64_t* tap_offset) {
    const int64_t words = l.total_words, taps = p.taps(), wpg = l.words_per_group;
    uint64_t* planes = t_act_planes.get(2 * words);
    split_nibbles(packed, words, planes, planes + words);
    int64_t* offsets = reinterpret_cast<int64_t*>(t_offsets.get(taps * wpg));
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t k = 0; k < wpg; ++k) offsets[t * wpg + k] = tap_offset[t] + k * l.row_words;
    return {packed, planes, words, offsets, t_weight_block.get(2 * kChannels * taps * wpg), nullptr};
  }

  // One 8-float compare per step; `Threshold` yields the 8 thresholds at offset i.
  template <class Threshold>
  static uint64_t below_impl(const float* x, Threshold threshold, int64_t count) {
    // Packing reads 64 floats of each of 64 channels per block: 64 streams at once, more than the hardware
    // prefetchers follow. Fetch the next 64 floats of this stream, which the pack's next block reads.
    if (count == 64)
      for (int b = 0; b < 256; b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(x + 32) + 128 + b), _MM_HINT_T0);
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

  // The split weights of the block whose channel rows conv_tasks points at, [word][channel][lo, hi], so that the
  // strip loop reads them with one pointer. Split when the channel block changes: conv_tasks walks strip blocks
  // innermost, so this runs once per channel block and task range, into a buffer that stays in L1.
  static const uint64_t* block_weights(const uint64_t* const weight[kChannels], int64_t row, Call& call) {
    if (weight[0] != call.cached_row) {
      uint64_t* dst = call.weight_block;
      for (int64_t j = 0; j < row; ++j)
        for (int v = 0; v < kChannels; ++v) {
          const uint64_t word = weight[v][j];
          dst[2 * (j * kChannels + v)] = word & kLowNibbles;
          dst[2 * (j * kChannels + v) + 1] = (word >> 4) & kLowNibbles;
        }
      call.cached_row = weight[0];
      // The next channel block's rows usually follow these: fetch them while this block's strips run, since the
      // packed weights are read once per call and are cold in a network (other layers ran in between); it matters
      // most on the deep layers, whose weights are largest. A prefetch past the end of the weights is harmless (addresses
      // are computed as integers, so no pointer leaves its array).
      const uintptr_t next = reinterpret_cast<uintptr_t>(weight[kChannels - 1] + row);
      for (int64_t b = 0; b < kChannels * row * 8; b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(next + static_cast<uintptr_t>(b)), _MM_HINT_T0);
    }
    return call.weight_block;
  }

  // tap_offset and word_stride are read through call.word_offsets, which prepare made from them.
  template <bool kNhwc, Steps S>
  static void block(const uint64_t* const act[kStrips], const int64_t* /*tap_offset*/, int64_t taps,
                    int64_t words_per_group, int64_t /*word_stride*/, const uint64_t* const weight[kChannels],
                    const BlockStore<kStrips, kChannels, kStrip>& bs, Call& call) {
    const int64_t words = taps * words_per_group;
    const uint64_t* wb = block_weights(weight, words, call);
    const __m256i depth = _mm256_set1_epi32(bs.depth);
    // A copy of the call's parameters that no store can reach (see the AVX-512 family's store).
    const EpilogueParams e = *bs.epilogue;
    // Each strip of 8 pixels is two ymm halves computed one after the other, each with all kChannels counters in
    // registers (the weights are re-read from L1 per half); the output stage then takes the 8 pixels in one ymm.
    for (int i = 0; i < kStrips; ++i) {
      if (bs.offset[i] < 0) break;  // repeats of the last strip, never stored
      __m256i low[kChannels], high[kChannels];
      const uint64_t* strip = call.low + (act[i] - call.packed);
      half(strip, words, wb, call, low);
      if (bs.lanes[i] > kHalf) half(strip + kHalf, words, wb, call, high);
      else
        for (int v = 0; v < kChannels; ++v) high[v] = _mm256_setzero_si256();
      if constexpr (kNhwc) {
        store_nhwc<S>(low, high, i, bs, e, depth);
      } else {
        for (int v = 0; v < kChannels; ++v) {
          if (!bs.stored(i, v)) continue;
          const ChannelValues<Avx2Lanes> c = bs.values<Avx2Lanes>(v);
          const __m256 y = channel_output(low[v], high[v], depth, bs, c, i, v);
          if constexpr (S != Steps::kAny) finish<Avx2Lanes, S>(e, c, y, {bs.at(i, v), bs.lanes[i]}, bs.residual[v]);
          else finish_rare(e, bs, i, v, y);
        }
      }
    }
  }

  // y = scale * (depth - 2 * count - correction) + bias for the 8 pixels of strip i, channel v.
  static __m256 channel_output(__m256i low, __m256i high, __m256i depth,
                               const BlockStore<kStrips, kChannels, kStrip>& bs, const ChannelValues<Avx2Lanes>& c,
                               int i, int v) {
    // The low dword of each 64-bit count (below 2^31), the low half's 4 pixels then the high half's: two
    // shuffle-port uops (dwords l0 l1 h0 h1 l2 l3 h2 h3, then 64-bit pairs reordered), where shift + blend +
    // vpermd took three and a constant.
    const __m256 pairs = _mm256_shuffle_ps(_mm256_castsi256_ps(low), _mm256_castsi256_ps(high), 0x88);
    const __m256i count = _mm256_permute4x64_epi64(_mm256_castps_si256(pairs), 0xD8);
    __m256i dot = _mm256_sub_epi32(depth, _mm256_add_epi32(count, count));
    if (bs.border[i]) {
      const __m256i classes = _mm256_load_si256(reinterpret_cast<const __m256i*>(bs.lane_class[i]));
      dot = _mm256_sub_epi32(dot, _mm256_i32gather_epi32(bs.class_value[v], classes, 4));
    }
    return affine<Avx2Lanes>(c, dot);
  }

  // NHWC output: a pixel's channels are adjacent in memory, a strip's pixels out_channels apart. The strip's channel
  // vectors (8 pixels each) are transposed into one vector of channels per pixel, each stored (and its residual
  // loaded) with one masked access; the steps after the affine one then run across channels, with the per-channel
  // operands as vectors. Inline: only block<true> calls it (out of line, its reference parameters kept the counts
  // in memory, and the NHWC kernel was 10-20% slower in bench_core).
  template <Steps S>
  static void store_nhwc(const __m256i (&low)[kChannels], const __m256i (&high)[kChannels], int i,
                         const BlockStore<kStrips, kChannels, kStrip>& bs, const EpilogueParams& e,
                         __m256i depth) {
    static_assert(kChannels <= 8, "a pixel's channels of a block fill one vector");
    int channels = 0;  // the block's real channels: a prefix
    while (channels < kChannels && bs.channel_real[channels]) ++channels;
    // The per-channel operands across the lanes (lanes 6 and 7 are never stored), gathered in registers: written
    // lane by lane into an array, the vector load that read them back waited on store forwarding on every strip.
    static_assert(kChannels == 6, "one operand per channel of the block below");
    const ChannelValues<OneLane>* c = bs.operands;
    ChannelValues<Avx2Lanes> across;
    across.scale = across.bias = _mm256_setzero_ps();  // applied before the transpose
    across.slope = _mm256_setr_ps(c[0].slope, c[1].slope, c[2].slope, c[3].slope, c[4].slope, c[5].slope, 0, 0);
    across.threshold = _mm256_setr_ps(c[0].threshold, c[1].threshold, c[2].threshold, c[3].threshold,
                                      c[4].threshold, c[5].threshold, 0, 0);
    __m256 y[8];
    for (int v = 0; v < kChannels; ++v)
      y[v] = channel_output(low[v], high[v], depth, bs, bs.values<Avx2Lanes>(v), i, v);
    for (int v = kChannels; v < 8; ++v) y[v] = _mm256_setzero_ps();
    transpose_8x8(y);
    for (int j = 0; j < bs.lanes[i]; ++j) finish<Avx2Lanes, S>(e, across, y[j], {bs.at(i, 0, j), channels});
  }

  // y[v] (v < 8) holds channel v of 8 pixels; afterwards y[j] holds pixel j's 8 channels (unpack, shuffle, then
  // 128-bit lane pairs).
  static void transpose_8x8(__m256 (&y)[8]) {
    __m256 t[8], u[8];
    for (int k = 0; k < 4; ++k) {
      t[2 * k] = _mm256_unpacklo_ps(y[2 * k], y[2 * k + 1]);
      t[2 * k + 1] = _mm256_unpackhi_ps(y[2 * k], y[2 * k + 1]);
    }
    for (int k = 0; k < 2; ++k) {
      u[4 * k] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
      u[4 * k + 1] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
      u[4 * k + 2] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
      u[4 * k + 3] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
    }
    // u[k] (k < 4): channels 0-3 of pixels k and k + 4 (one per 128-bit lane); u[k + 4]: channels 4-7.
    for (int k = 0; k < 4; ++k) {
      y[k] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x20);
      y[k + 4] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x31);
    }
  }

  // The output stage with its steps tested per vector (sign output, or OutputStage::per_vector_steps), out of line:
  // inlined, it made the strip loop larger and slower on the thin layers, where the output stage is much of the
  // work.
  static __attribute__((noinline)) void finish_rare(const EpilogueParams& e,
                                                    const BlockStore<kStrips, kChannels, kStrip>& bs, int i, int v,
                                                    __m256 y) {
    finish<Avx2Lanes>(e, bs.values<Avx2Lanes>(v), y, {bs.at(i, v), bs.lanes[i]}, bs.residual[v]);
  }

  // Popcount of every nibble value, for vpshufb.
  static __m256i nibble_popcounts() {
    return _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3,
                            4);
  }

  // One channel word of the low and high nibble planes against kChannels split weight words (wb: low, high per
  // channel), added to the byte counters. The kernel's inner step, and what the peak probe repeats.
  static inline __attribute__((always_inline)) void nibble_word(__m256i lut, __m256i lo, __m256i hi,
                                                                const uint64_t* wb, __m256i bytes[kChannels]) {
    for (int v = 0; v < kChannels; ++v) {
      const __m256i wl = _mm256_set1_epi64x(static_cast<long long>(wb[2 * v]));
      const __m256i wh = _mm256_set1_epi64x(static_cast<long long>(wb[2 * v + 1]));
      const __m256i l = _mm256_shuffle_epi8(lut, _mm256_xor_si256(lo, wl));
      const __m256i h = _mm256_shuffle_epi8(lut, _mm256_xor_si256(hi, wh));
      bytes[v] = _mm256_add_epi8(bytes[v], _mm256_add_epi8(l, h));
    }
  }

  // Popcounts of one strip half (4 pixels) against kChannels interleaved split weight rows, 64-bit lane per pixel.
  // Words are read through the flat offset list (tap and channel word in one index, see prepare), in runs of
  // kFlushWords with no other bookkeeping in the loop.
  static void half(const uint64_t* act, int64_t words, const uint64_t* wb, const Call& call,
                   __m256i total[kChannels]) {
    const __m256i lut = nibble_popcounts();
    const uint64_t* hi_plane = act + call.hi_offset;
    const int64_t* offset = call.word_offsets;
    for (int64_t j0 = 0; j0 < words; j0 += kFlushWords) {
      const int64_t j1 = imin(words, j0 + kFlushWords);
      __m256i bytes[kChannels];
      for (int v = 0; v < kChannels; ++v) bytes[v] = _mm256_setzero_si256();
      // Two words per iteration: the loop control is then a tenth of the uops, which a loop this short notices.
#pragma GCC unroll 2
      for (int64_t j = j0; j < j1; ++j) {
        const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(act + offset[j]));
        const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi_plane + offset[j]));
        nibble_word(lut, lo, hi, wb, bytes);
        wb += 2 * kChannels;
      }
      for (int v = 0; v < kChannels; ++v) {
        const __m256i sums = _mm256_sad_epu8(bytes[v], _mm256_setzero_si256());
        total[v] = j0 == 0 ? sums : _mm256_add_epi64(total[v], sums);
      }
    }
  }

  static uint64_t peak_probe(int64_t iterations) {
    // The inner loop of half() with its activations in registers: per round (one word), kChannels pairs of weight
    // broadcasts from memory (loads, as in the kernel: no shuffle-port uop), and per channel two XORs of nibble
    // planes, two lookups and two byte adds, with the vpsadbw widening every kFlushWords rounds. Left out: the
    // kernel's two activation loads and offset load per word, and everything outside the loop.
    const __m256i lut = nibble_popcounts();
    constexpr int kAcc = kChannels;
    __m256i bytes[kAcc], total = _mm256_setzero_si256();
    const __m256i lo = _mm256_set1_epi64x(0x0102030405060708ll), hi = _mm256_set1_epi64x(0x0807060504030201ll);
    alignas(64) uint64_t weights[2 * kChannels];
    for (int v = 0; v < kChannels; ++v) {
      weights[2 * v] = 0x0505030300000F0Full + v;
      weights[2 * v + 1] = 0x0A0A0C0C0F0F0000ull + v;
    }
    const uint64_t* wp = weights;
    for (int64_t it = 0; it < iterations;) {
      for (int v = 0; v < kAcc; ++v) bytes[v] = _mm256_setzero_si256();
      for (int round = 0; round < kFlushWords && it < iterations; ++round, ++it) {
        // An opaque pointer: every round reloads the weights, so no product can be shared between rounds.
        __asm__ volatile("" : "+r"(wp));
        nibble_word(lut, lo, hi, wp, bytes);
      }
      for (int v = 0; v < kAcc; ++v) total = _mm256_add_epi64(total, _mm256_sad_epu8(bytes[v], _mm256_setzero_si256()));
    }
    alignas(32) long long lanes[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), total);
    volatile long long sink = lanes[0] + lanes[1] + lanes[2] + lanes[3];
    (void)sink;
    return static_cast<uint64_t>(iterations) * kAcc * 256;
  }
};

// lo = the low nibble of every byte, hi = the high nibble shifted down: the two vpshufb indices, computed once per
// word here instead of once per (word, output channel) in the inner loop.
void split_nibbles(const uint64_t* src, int64_t words, uint64_t* lo, uint64_t* hi) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  int64_t i = 0;
  for (; i + 4 <= words; i += 4) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + i), _mm256_and_si256(x, mask));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + i), _mm256_and_si256(_mm256_srli_epi16(x, 4), mask));
  }
  for (; i < words; ++i) {
    lo[i] = src[i] & kLowNibbles;
    hi[i] = (src[i] >> 4) & kLowNibbles;
  }
}

}  // namespace

const KernelOps& avx2_kernel() {
  static const KernelOps ops =
      with_window_means<Avx2Lanes>(with_first_layer<Avx2Lanes, 8, 12>(make_kernel_ops<Avx2Isa>("avx2")));
  return ops;
}

}  // namespace xnorconv

#include "isa_end.h"
#endif
