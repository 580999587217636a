// The output stage (epilogue.h's steps after the exact integer dot), written once for every kernel family: the CPU
// families and the CUDA kernels instantiate it over their own vector trait, so a new fused step is added here and
// in the traits' few primitives, not in seven hand-written copies.
//
// A vector trait V describes one vector of V::kLanes outputs:
//   F                      kLanes floats
//   I                      kLanes int32 (the exact dots)
//   At                     where the lanes go: element indices into out / residual / out_signs (which share the
//                          output's shape and memory format) and which lanes are real
//   At   run(int64_t index, int lanes)           lanes [0, lanes) at elements [index, index + lanes)
//   F    broadcast(float)
//   F    fma(F a, F b, F c)                       a * b + c, rounded once (every family rounds alike)
//   F    to_float(I)
//   F    add(F, F)                                rounded on its own, never fused with a neighbour (GCC fuses
//                                                intrinsics written as vector operators unless built with
//                                                -ffp-contract=off, as setup.py and CMakeLists.txt build the core)
//   F    mul(F, F)                                the same for a product
//   F    prelu(F y, F slope)                      y >= 0 ? y : slope * y (NaN takes the multiply)
//   F    load(const float* base, const At&)       the real lanes (the others are never stored)
//   void store(float* base, const At&, F)         the real lanes only
//   void store_signs(uint8_t* base, const At&, F y, F threshold)
//                                                 byte !(y >= threshold) (1: binarizes to -1; NaN -> 1)
//
// Nothing here needs more than <math.h> and <stdint.h>, so device code includes it too. CPU families include it
// after their ISA target pragma (through kernel_common.h), so that its templates are compiled for that ISA.
#pragma once

#include <math.h>
#include <stdint.h>

#include "epilogue.h"

#if defined(__CUDACC__)
#define XNORCONV_STAGE_INLINE __host__ __device__ __forceinline__
#else
#define XNORCONV_STAGE_INLINE inline __attribute__((always_inline))
#endif

namespace xnorconv {

// The per-output-channel operands of one vector's lanes: one channel's values broadcast (a vector along a
// channel's row) or consecutive channels' values (a vector across the channels of one pixel).
template <class V>
struct ChannelValues {
  typename V::F scale, bias, slope, threshold;
};

// The per-channel operands, each loaded by `load(operand array or nullptr, its neutral value)`: the one place that
// names them, for every way a family loads them (one channel broadcast, or a vector of consecutive channels).
template <class V, class Load>
XNORCONV_STAGE_INLINE ChannelValues<V> load_channel_values(const EpilogueParams& e, const Load& load) {
  return {load(e.scale, 1.0f), load(e.bias, 0.0f), load(e.prelu, 1.0f), load(e.out_threshold, 0.0f)};
}

template <class V>
struct BroadcastChannel {
  int64_t o;
  XNORCONV_STAGE_INLINE typename V::F operator()(const float* operand, float neutral) const {
    return V::broadcast(operand ? operand[o] : neutral);
  }
};

// Output channel o's operands, broadcast to every lane.
template <class V>
XNORCONV_STAGE_INLINE ChannelValues<V> channel_values(const EpilogueParams& e, int64_t o) {
  return load_channel_values<V>(e, BroadcastChannel<V>{o});
}

// y = scale * dot + bias: scale 1 and bias 0 leave the exact dot (every dot of a layer is far below 2^24).
template <class V>
XNORCONV_STAGE_INLINE typename V::F affine(const ChannelValues<V>& c, typename V::I dot) {
  return V::fma(c.scale, V::to_float(dot), c.bias);
}

// The steps after the affine one, as a template argument: a family that instantiates its store loop for a call's
// Steps tests nothing per vector. kAny reads them from the call's EpilogueParams per vector, for every call. The
// fixed kinds have a float output and, with a residual, read it as real_shortcut maps its channels: one channel per
// output channel (kResidual*), or a channel mean (kMean*: the shortcut narrows). In the thin layers, where the
// output stage is most of the work, the per-vector tests cost more than the residual add and the PReLU themselves.
enum class Steps { kPlain, kPrelu, kResidual, kResidualPrelu, kMean, kMeanPrelu, kAny };

// The fixed Steps of a call with out_channels output channels, or kAny.
XNORCONV_STAGE_INLINE Steps fixed_steps(const EpilogueParams& e, int64_t out_channels) {
  if (e.out_signs) return Steps::kAny;
  if (!e.residual) return e.prelu ? Steps::kPrelu : Steps::kPlain;
  // real_shortcut's mapping reads one input channel per output channel unless it narrows.
  if (e.residual_channels > out_channels) return e.prelu ? Steps::kMeanPrelu : Steps::kMean;
  return e.prelu ? Steps::kResidualPrelu : Steps::kResidual;
}

XNORCONV_STAGE_INLINE constexpr bool adds_residual(Steps s) {
  return s == Steps::kResidual || s == Steps::kResidualPrelu || s == Steps::kMean || s == Steps::kMeanPrelu;
}
XNORCONV_STAGE_INLINE constexpr bool applies_prelu(Steps s) {
  return s == Steps::kPrelu || s == Steps::kResidualPrelu || s == Steps::kMeanPrelu;
}

// Where one output channel's residual comes from: `count` channels, channel_step elements apart, whose values at an
// output element's At are loaded from base (base is shifted from the residual tensor so that the output's element
// indices address the residual's), added in channel order and, for more than one, multiplied by `scale`.
struct ResidualSource {
  const float* base;
  int64_t channel_step;
  int32_t count;
  float scale;
};

// real_shortcut's channel mapping (xnorconv_core.h): output channel o of `out` takes the mean of input channels
// [begin, end) of `in`, a single channel when the shortcut widens (out > in).
struct ShortcutChannels {
  int64_t begin, end;
};
XNORCONV_STAGE_INLINE ShortcutChannels shortcut_channels(int64_t in, int64_t out, int64_t o) {
  const int64_t begin = o * in / out;
  return {begin, out > in ? begin + 1 : ((o + 1) * in + out - 1) / out};
}

// The residual of output channel o of image n, for an output of out_channels planes of `plane` elements: the
// residual at the output's own elements, or (residual_channels set) the channels real_shortcut maps onto o.
XNORCONV_STAGE_INLINE ResidualSource residual_source(const EpilogueParams& e, int64_t n, int64_t o,
                                                     int64_t out_channels, int64_t plane) {
  const int64_t in = e.residual_channels;
  if (in == 0 || !e.residual) return {e.residual, 0, 1, 1.0f};
  const ShortcutChannels channels = shortcut_channels(in, out_channels, o);
  const int64_t count = channels.end - channels.begin;
  // Integer arithmetic on the address: the shifted base may lie outside the tensor, the addresses it forms do not.
  const int64_t shift_bytes = ((n * in + channels.begin) - (n * out_channels + o)) * plane * int64_t{sizeof(float)};
  const uintptr_t base = reinterpret_cast<uintptr_t>(e.residual) + static_cast<uintptr_t>(shift_bytes);
  return {reinterpret_cast<const float*>(base), plane, static_cast<int32_t>(count), 1.0f / static_cast<float>(count)};
}

// The residual's value at `at`: real_shortcut's channel mean, added in its order ((r0 + r1) + r2 ...) * scale.
template <class V>
XNORCONV_STAGE_INLINE typename V::F residual_value(const ResidualSource& r, const typename V::At& at) {
  typename V::F sum = V::load(r.base, at);
  if (r.count == 1) return sum;
  for (int32_t j = 1; j < r.count; ++j) sum = V::add(sum, V::load(r.base + j * r.channel_step, at));
  return V::mul(sum, V::broadcast(r.scale));
}

// The steps after the affine one: residual add, PReLU, then the float store or the sign bytes, as S fixes them (or,
// for kAny, as the call's EpilogueParams say). residual() gives this vector's residual (called only when the call
// has one).
template <class V, Steps S, class Residual>
XNORCONV_STAGE_INLINE void finish_with(const EpilogueParams& e, const ChannelValues<V>& c, typename V::F y,
                                       const typename V::At& at, const Residual& residual) {
  constexpr bool any = S == Steps::kAny;
  if (adds_residual(S) || (any && e.residual)) y = V::add(y, residual());
  if (applies_prelu(S) || (any && e.prelu)) y = V::prelu(y, c.slope);
  if (any && e.out_signs) {
    V::store_signs(e.out_signs, at, y, c.threshold);
    return;
  }
  V::store(e.out, at, y);
}

// The residual read at the output's own elements.
template <class V, Steps S = Steps::kAny>
XNORCONV_STAGE_INLINE void finish(const EpilogueParams& e, const ChannelValues<V>& c, typename V::F y,
                                  const typename V::At& at) {
  static_assert(S != Steps::kMean && S != Steps::kMeanPrelu, "a channel mean reads through a ResidualSource");
  finish_with<V, S>(e, c, y, at, [&] { return V::load(e.residual, at); });
}

// The residual from `residual` (residual_source): for callers whose vector holds one channel of an NCHW output.
// kResidual* read one residual channel per output channel: one load.
template <class V, Steps S = Steps::kAny>
XNORCONV_STAGE_INLINE void finish(const EpilogueParams& e, const ChannelValues<V>& c, typename V::F y,
                                  const typename V::At& at, const ResidualSource& residual) {
  finish_with<V, S>(e, c, y, at, [&] {
    return S == Steps::kResidual || S == Steps::kResidualPrelu ? V::load(residual.base, at)
                                                               : residual_value<V>(residual, at);
  });
}

// The one-lane trait: the portable CPU family and the CUDA kernels (one thread, one output). On the device, adds
// and multiplies use the intrinsics the compiler never contracts into an FMA (the CPU rounds each step on its own),
// and operands the kernel only reads go through the read-only data cache.
struct OneLane {
  static constexpr int kLanes = 1;
  using F = float;
  using I = int32_t;
  using At = int64_t;
  static XNORCONV_STAGE_INLINE At run(int64_t index, int) { return index; }
  static XNORCONV_STAGE_INLINE F broadcast(float x) { return x; }
  static XNORCONV_STAGE_INLINE F fma(F a, F b, F c) { return fmaf(a, b, c); }
  static XNORCONV_STAGE_INLINE F to_float(I x) { return static_cast<float>(x); }
  static XNORCONV_STAGE_INLINE F add(F a, F b) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
  }
  static XNORCONV_STAGE_INLINE F mul(F a, F b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
  }
  static XNORCONV_STAGE_INLINE F prelu(F y, F slope) {
#if defined(__CUDA_ARCH__)
    return y >= 0.0f ? y : __fmul_rn(slope, y);
#else
    return y >= 0.0f ? y : slope * y;
#endif
  }
  static XNORCONV_STAGE_INLINE F load(const float* base, At at) {
#if defined(__CUDA_ARCH__)
    return __ldg(base + at);
#else
    return base[at];
#endif
  }
  static XNORCONV_STAGE_INLINE void store(float* base, At at, F y) { base[at] = y; }
  static XNORCONV_STAGE_INLINE void store_signs(uint8_t* base, At at, F y, F threshold) {
    base[at] = static_cast<uint8_t>(!(y >= threshold));
  }
};

}  // namespace xnorconv
