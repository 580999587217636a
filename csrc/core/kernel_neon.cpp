// AArch64 NEON kernel family. Compiles to nothing on other targets.
//
// Vectorised across pixels, like the x86 families: one q register holds the packed words of 2 consecutive output
// pixels for one tap and channel word; the weight word of an output channel is broadcast (vld1q_dup_u64, which
// GCC 12 emits as ldr d + dup: one ASIMD uop). The inner loop
// per (pixel pair, channel) is
//     eor   (veorq_u8)    a ^ w
//     cnt   (vcntq_u8)    popcount of each byte (0..8)
//     uadalp(vpadalq_u8)  add adjacent byte pairs into the u16 accumulator lanes
// so each 64-bit half of an accumulator (4 u16 lanes) belongs to one output pixel and there is no horizontal
// reduction in the loop. A u16 lane gains at most 16 per channel word, so the accumulators are flushed into u32
// totals every kFlushWords = 4095 words (16 * 4095 = 65520 < 65536): for every layer with fewer than 4095 words of
// depth per output (262,080 binary taps) that is once, at the end.
//
// Register blocking: 2 strips x 8 pixels = 8 activation registers, x 2 output channels = 16 u16 accumulators,
// + 2 broadcast weights + eor/cnt temporaries, within the 32 q registers. Per channel word that is 16 products
// (2048 binary MACs) for 16 * 3 + 2 = 50 ASIMD uops on the A72's two ASIMD pipes (see docs/arm.md).
//
// Advanced SIMD is mandatory in AArch64 and enabled by the default -march=armv8-a, so this file needs no target
// pragma and no -m flag: the NEON path runs on every aarch64 CPU.
#if defined(__aarch64__)
#include <arm_neon.h>

#include <cmath>
#include <cstdint>

#include "xnorconv_core.h"
#include "kernel_common.h"
#include "first_layer_kernel.h"
#include "window_means_kernel.h"

namespace xnorconv {
namespace {

// The output stage's vector (output_stage.h): 4 consecutive pixels of a strip, of which the first `lanes` are real,
// `stride` elements apart (1 in NCHW, out_channels in NHWC).
struct NeonLanes {
  static constexpr int kLanes = 4;
  using F = float32x4_t;
  using I = int32x4_t;
  struct At {
    int64_t index;
    int lanes;
    int64_t stride = 1;  // elements between consecutive lanes (the pixels of an NHWC row: out_channels)
  };
  static At run(int64_t index, int lanes) { return {index, lanes, 1}; }
  static F broadcast(float x) { return vdupq_n_f32(x); }
  static F fma(F a, F b, F c) { return vfmaq_f32(c, a, b); }
  static F to_float(I x) { return vcvtq_f32_s32(x); }
  static F add(F a, F b) { return vaddq_f32(a, b); }
  static F mul(F a, F b) { return vmulq_f32(a, b); }
  static F pair_sums(F a, F b) { return vpaddq_f32(a, b); }
  static F prelu(F y, F slope) { return vbslq_f32(vcgeq_f32(y, vdupq_n_f32(0.0f)), y, vmulq_f32(slope, y)); }
  // A partial or strided vector goes through a buffer, so that no lane past the strip's end is read or written.
  static F load(const float* base, const At& at) {
    if (at.lanes == kLanes && at.stride == 1) return vld1q_f32(base + at.index);
    float tmp[kLanes] = {};
    for (int lane = 0; lane < at.lanes; ++lane) tmp[lane] = base[at.index + lane * at.stride];
    return vld1q_f32(tmp);
  }
  static void store(float* base, const At& at, F y) {
    if (at.lanes == kLanes && at.stride == 1) {
      vst1q_f32(base + at.index, y);
      return;
    }
    float tmp[kLanes];
    vst1q_f32(tmp, y);
    for (int lane = 0; lane < at.lanes; ++lane) base[at.index + lane * at.stride] = tmp[lane];
  }
  static void store_signs(uint8_t* base, const At& at, F y, F threshold) {
    uint32_t at_least[kLanes];
    vst1q_u32(at_least, vcgeq_f32(y, threshold));
    for (int lane = 0; lane < at.lanes; ++lane)
      base[at.index + lane * at.stride] = static_cast<uint8_t>(at_least[lane] == 0);
  }
};

struct NeonIsa : NoPreparation {
  static constexpr int kStrip = 8, kStrips = 2, kChannels = 2;
  static constexpr int kRegs = kStrip / 2;  // q registers per strip
  static constexpr int64_t kFlushWords = 4095;
  static_assert(16 * kFlushWords < 65536, "u16 accumulator lanes must not overflow between flushes");

  // Per-pixel u32 totals of one block, filled by flush().
  struct Totals {
    alignas(16) uint32_t count[kStrips][kChannels][kStrip];
  };

  // Bit i = !(x[i] >= t_i) for i < count <= 64 (NaN -> 1; -0.0 >= 0). 16 floats become 16 mask bytes (compare,
  // narrow twice); bytes AND {1,2,..,128,1,..,128}; three rounds of pairwise byte adds then fold 64 mask bytes into
  // the 8 bytes of the result, byte j holding bits 8j..8j+7 (little-endian, so bit i of the word is float i).
  // `Threshold` gives the 4 thresholds at offset i (vector) and the one at i (scalar tail).
  template <class Threshold>
  static uint64_t below_impl(const float* x, Threshold threshold, int64_t count) {
    static const uint8_t kBitWeights[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t weights = vld1q_u8(kBitWeights);
    auto at_least = [&](int64_t i) { return vmovn_u32(vcgeq_f32(vld1q_f32(x + i), threshold.vec(i))); };
    auto block16 = [&](int64_t i) {
      const uint16x8_t lo = vcombine_u16(at_least(i), at_least(i + 4));
      const uint16x8_t hi = vcombine_u16(at_least(i + 8), at_least(i + 12));
      // x >= t is the +1 bit (0); its complement, with NaN >= t false, is the -1 bit.
      return vandq_u8(vmvnq_u8(vcombine_u8(vmovn_u16(lo), vmovn_u16(hi))), weights);
    };
    const int64_t full = count / 16;
    uint8x16_t b[4];
    for (int i = 0; i < 4; ++i) b[i] = i < full ? block16(16 * i) : vdupq_n_u8(0);
    const uint8x16_t q = vpaddq_u8(vpaddq_u8(b[0], b[1]), vpaddq_u8(b[2], b[3]));
    uint64_t bits = vgetq_lane_u64(vreinterpretq_u64_u8(vpaddq_u8(q, q)), 0);
    for (int64_t i = 16 * full; i < count; ++i) bits |= static_cast<uint64_t>(!(x[i] >= threshold.one(i))) << i;
    return bits;
  }

  struct Uniform {
    float t;
    float32x4_t v;
    float32x4_t vec(int64_t) const { return v; }
    float one(int64_t) const { return t; }
  };
  struct PerLane {
    const float* t;
    float32x4_t vec(int64_t i) const { return vld1q_f32(t + i); }
    float one(int64_t i) const { return t[i]; }
  };

  static uint64_t below(const float* x, float t, int64_t count) { return below_impl(x, Uniform{t, vdupq_n_f32(t)}, count); }
  static uint64_t below_each(const float* x, const float* t, int64_t count) { return below_impl(x, PerLane{t}, count); }

  // Sign input (bytes, nonzero = -1): plain loop; the byte test is cheap next to the convolution.
  static uint64_t nonzero(const uint8_t* x, int64_t count) {
    uint64_t bits = 0;
    for (int64_t i = 0; i < count; ++i) bits |= static_cast<uint64_t>(x[i] != 0) << i;
    return bits;
  }

  // u16 accumulators -> per-pixel u32 totals: uaddlp sums lane pairs (2 u32 per pixel), addp the remaining pairs
  // across two registers, giving 4 consecutive pixels in order.
  static void flush(uint16x8_t (&acc)[kStrips][kChannels][kRegs], Totals& out) {
    for (int i = 0; i < kStrips; ++i)
      for (int v = 0; v < kChannels; ++v) {
        for (int r = 0; r < kRegs; r += 2) {
          const uint32x4_t pixels = vpaddq_u32(vpaddlq_u16(acc[i][v][r]), vpaddlq_u16(acc[i][v][r + 1]));
          uint32_t* total = &out.count[i][v][2 * r];
          vst1q_u32(total, vaddq_u32(vld1q_u32(total), pixels));
        }
        for (int r = 0; r < kRegs; ++r) acc[i][v][r] = vdupq_n_u16(0);
      }
  }

  template <bool kNhwc, Steps S>
  static void block(const uint64_t* const act[kStrips], const int64_t* tap_offset, int64_t taps,
                    int64_t words_per_group, int64_t word_stride, const uint64_t* const weight[kChannels],
                    const BlockStore<kStrips, kChannels, kStrip>& bs, Call&) {
    Totals totals;
    for (int i = 0; i < kStrips; ++i)
      for (int v = 0; v < kChannels; ++v)
        for (int lane = 0; lane < kStrip; lane += 4) vst1q_u32(&totals.count[i][v][lane], vdupq_n_u32(0));
    uint16x8_t acc[kStrips][kChannels][kRegs];
    for (int i = 0; i < kStrips; ++i)
      for (int v = 0; v < kChannels; ++v)
        for (int r = 0; r < kRegs; ++r) acc[i][v][r] = vdupq_n_u16(0);
    const uint64_t* w[kChannels];
    for (int v = 0; v < kChannels; ++v) w[v] = weight[v];
    int64_t budget = kFlushWords;
    for (int64_t t = 0; t < taps; ++t) {
      const uint64_t* a[kStrips];
      for (int i = 0; i < kStrips; ++i) a[i] = act[i] + tap_offset[t];
      for (int64_t k = 0; k < words_per_group; ++k) {
        uint8x16_t x[kStrips][kRegs];
        for (int i = 0; i < kStrips; ++i)
          for (int r = 0; r < kRegs; ++r) x[i][r] = vreinterpretq_u8_u64(vld1q_u64(a[i] + k * word_stride + 2 * r));
        for (int v = 0; v < kChannels; ++v) {
          const uint8x16_t wv = vreinterpretq_u8_u64(vld1q_dup_u64(w[v]++));
          for (int i = 0; i < kStrips; ++i)
            for (int r = 0; r < kRegs; ++r) acc[i][v][r] = vpadalq_u8(acc[i][v][r], vcntq_u8(veorq_u8(x[i][r], wv)));
        }
        if (--budget == 0) {
          flush(acc, totals);
          budget = kFlushWords;
        }
      }
    }
    flush(acc, totals);

    // Output stage, on each half of a strip (one q register of 4 pixels).
    const EpilogueParams& e = *bs.epilogue;
    const int32x4_t depth = vdupq_n_s32(bs.depth);
    for (int v = 0; v < kChannels; ++v) {
      const ChannelValues<NeonLanes> c = bs.values<NeonLanes>(v);
      for (int i = 0; i < kStrips; ++i) {
        if (!bs.stored(i, v)) continue;
        for (int h = 0; h < 2 && 4 * h < bs.lanes[i]; ++h) {
          const int32x4_t count = vreinterpretq_s32_u32(vld1q_u32(&totals.count[i][v][4 * h]));
          int32x4_t dot = vsubq_s32(depth, vshlq_n_s32(count, 1));
          if (bs.border[i]) {
            int32_t correction[4];
            for (int lane = 0; lane < 4; ++lane) correction[lane] = bs.correction(i, v, 4 * h + lane);
            dot = vsubq_s32(dot, vld1q_s32(correction));
          }
          const NeonLanes::At at{bs.at(i, v, 4 * h), bs.lanes[i] - 4 * h < 4 ? bs.lanes[i] - 4 * h : 4,
                                 kNhwc ? bs.lane_stride : 1};  // NCHW: the store's contiguous test folds away
          finish<NeonLanes, S>(e, c, affine<NeonLanes>(c, dot), at, bs.residual[v]);
        }
      }
    }
  }

  // The inner loop's mix on registers: per round, each of kChannels weights is broadcast from a general register
  // made opaque to the optimiser (dup, like the kernel's ld1r it costs an ASIMD uop) and XORed with the kStrips *
  // kRegs activation registers; eor + cnt + uadalp per product, flushed to u32 as often as the kernel does.
  static uint64_t peak_probe(int64_t iterations) {
    constexpr int kActs = kStrips * kRegs;
    uint8x16_t x[kActs];
    uint16x8_t acc[kActs][kChannels];
    uint32x4_t total = vdupq_n_u32(0);
    for (int i = 0; i < kActs; ++i) x[i] = vreinterpretq_u8_u64(vdupq_n_u64(0x0123456789ABCDEFull * (i + 1)));
    uint64_t w[kChannels];
    for (int v = 0; v < kChannels; ++v) w[v] = 0x5555AAAA3333CCCCull + v;
    for (int64_t it = 0; it < iterations;) {
      for (auto& a : acc)
        for (auto& c : a) c = vdupq_n_u16(0);
      for (int64_t round = 0; round < kFlushWords && it < iterations; ++round, ++it) {
        for (int v = 0; v < kChannels; ++v) {
          __asm__ volatile("" : "+r"(w[v]));
          const uint8x16_t wv = vreinterpretq_u8_u64(vdupq_n_u64(w[v]));
          for (int i = 0; i < kActs; ++i) acc[i][v] = vpadalq_u8(acc[i][v], vcntq_u8(veorq_u8(x[i], wv)));
        }
      }
      for (auto& a : acc)
        for (auto& c : a) total = vpadalq_u16(total, c);
    }
    volatile uint32_t sink = vaddvq_u32(total);
    (void)sink;
    return static_cast<uint64_t>(iterations) * kActs * kChannels * 128;
  }
};

}  // namespace

const KernelOps& neon_kernel() {
  static const KernelOps ops =
      with_window_means<NeonLanes>(with_first_layer<NeonLanes, 16, 6>(make_kernel_ops<NeonIsa>("neon")));
  return ops;
}

}  // namespace xnorconv

#endif  // __aarch64__
