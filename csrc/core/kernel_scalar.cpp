// Portable kernel family: plain C++, always compiled, always last in the selector. It is also the baseline every
// vector family is tested against in the C++ tests.
#include <cstdint>

#include "xnorconv_core.h"
#include "kernel_common.h"
#include "first_layer_kernel.h"

namespace xnorconv {
namespace {

struct ScalarIsa : NoPreparation {
  static constexpr int kStrip = 8, kStrips = 1, kChannels = 4;

  static uint64_t below(const float* x, float t, int64_t count) {
    uint64_t bits = 0;
    for (int64_t i = 0; i < count; ++i) bits |= static_cast<uint64_t>(!(x[i] >= t)) << i;
    return bits;
  }

  static uint64_t nonzero(const uint8_t* x, int64_t count) {
    uint64_t bits = 0;
    for (int64_t i = 0; i < count; ++i) bits |= static_cast<uint64_t>(x[i] != 0) << i;
    return bits;
  }

  static uint64_t below_each(const float* x, const float* t, int64_t count) {
    uint64_t bits = 0;
    for (int64_t i = 0; i < count; ++i) bits |= static_cast<uint64_t>(!(x[i] >= t[i])) << i;
    return bits;
  }

  template <bool kNhwc, Steps S>  // the lanes' stride is bs.lane_stride either way
  static void block(const uint64_t* const act[kStrips], const int64_t* tap_offset, int64_t taps,
                    int64_t words_per_group, int64_t word_stride, const uint64_t* const weight[kChannels],
                    const BlockStore<kStrips, kChannels, kStrip>& bs, Call&) {
    uint32_t count[kStrips][kChannels][kStrip] = {};
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t w = 0; w < words_per_group; ++w)
        for (int i = 0; i < kStrips; ++i) {
          const uint64_t* a = act[i] + tap_offset[t] + w * word_stride;
          for (int v = 0; v < kChannels; ++v) {
            const uint64_t wv = weight[v][t * words_per_group + w];
            for (int lane = 0; lane < kStrip; ++lane)
              count[i][v][lane] += static_cast<uint32_t>(__builtin_popcountll(a[lane] ^ wv));
          }
        }
    const EpilogueParams& e = *bs.epilogue;
    for (int i = 0; i < kStrips; ++i)
      for (int v = 0; v < kChannels; ++v) {
        if (!bs.stored(i, v)) continue;
        const ChannelValues<OneLane> c = bs.values<OneLane>(v);
        for (int lane = 0; lane < bs.lanes[i]; ++lane) {
          int32_t dot = bs.depth - 2 * static_cast<int32_t>(count[i][v][lane]);
          if (bs.border[i]) dot -= bs.correction(i, v, lane);
          finish<OneLane, S>(e, c, affine<OneLane>(c, dot), bs.at(i, v, lane), bs.residual[v]);
        }
      }
  }

  static uint64_t peak_probe(int64_t iterations) {
    constexpr int kAcc = 8;
    uint64_t acc[kAcc] = {}, x[kAcc];
    for (int i = 0; i < kAcc; ++i) x[i] = 0x0123456789ABCDEFull * (i + 1);
    uint64_t w = 0x5555AAAA3333CCCCull;
    for (int64_t it = 0; it < iterations; ++it) {
      __asm__ volatile("" : "+r"(w));
      for (int i = 0; i < kAcc; ++i) acc[i] += static_cast<uint64_t>(__builtin_popcountll(x[i] ^ w));
    }
    volatile uint64_t sink = 0;
    for (int i = 0; i < kAcc; ++i) sink = sink + acc[i];
    return static_cast<uint64_t>(iterations) * kAcc * 64;
  }
};

}  // namespace

const KernelOps& scalar_kernel() {
  static const KernelOps ops = with_first_layer<OneLane, 8, 2>(make_kernel_ops<ScalarIsa>("scalar"));
  return ops;
}

}  // namespace xnorconv
