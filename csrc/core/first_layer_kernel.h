// The float first layer's arithmetic (first_layer.cpp prepares its operands; xnorconv_core.h says what it computes),
// written once over a family's vector trait V (output_stage.h's broadcast, fma, prelu, load and store, and
// run(index, lanes): the lanes [0, lanes) at element index). Each family includes it after its ISA pragma and
// kernel_common.h and instantiates it through with_first_layer<its trait, channels per block, pixels per block>.
//
// Output blocks are kept in registers and written once, bias and PReLU applied. Each is a run of pixels of one
// output row times kChannels output channels, vectorised along whichever the output keeps consecutive:
//   NCHW: V::kLanes pixels in each of kChannels vectors (one per channel). For every input channel and tap, one
//         unaligned load of the prepared row feeds kChannels FMAs with broadcast weights.
//   NHWC: kPixels pixels, each kChannels / V::kLanes vectors of channels. For every input channel and tap, the
//         weights' vectors feed kPixels FMAs each with a broadcast input.
// Both sum every output's taps in the same order (bias, then channel, kernel row, kernel column, each an FMA), so
// every family and both layouts give the same bits.
#pragma once

namespace xnorconv {
namespace {

template <class V, int kChannels, int kPixels>
struct FirstLayerKernel {
  using F = typename V::F;
  static constexpr int kLanes = V::kLanes, kVectors = kChannels / kLanes;
  static_assert(kChannels % kLanes == 0, "an NHWC block holds whole vectors of channels");

  static void rows(const FirstLayerRows& r, int64_t row_begin, int64_t row_end) {
    const FirstLayerShape& s = r.call->shape;
    const int64_t row_stride = s.stride_w * r.row_width;
    // Where each tap's inputs start in the prepared rows, relative to the block's first pixel (no division per tap).
    int64_t tap_offset[kMaxTaps];
    for (int64_t i = 0; i < s.kernel_h; ++i)
      for (int64_t j = 0; j < s.kernel_w; ++j) {
        const int64_t col = j * s.dilation_w;
        tap_offset[i * s.kernel_w + j] =
            i * s.dilation_h * row_stride + col % s.stride_w * r.row_width + col / s.stride_w;
      }
    for (int64_t y = row_begin; y < row_end; ++y)
      for (int64_t c0 = 0; c0 < s.out_channels; c0 += kChannels) {
        if (s.channels_last) nhwc_row(r, tap_offset, y, row_begin, c0);
        else nchw_row(r, tap_offset, y, row_begin, c0);
      }
  }

  // Output row y of channels [c0, c0 + kChannels) in NCHW.
  static void nchw_row(const FirstLayerRows& r, const int64_t* tap_offset, int64_t y, int64_t row_begin, int64_t c0) {
    const FirstLayerShape& s = r.call->shape;
    const int64_t out_w = s.out_width(), taps = s.kernel_h * s.kernel_w;
    const int64_t channel_stride = r.row_count * s.stride_w * r.row_width;
    const float* const band = r.rows + (y - row_begin) * s.stride_h * s.stride_w * r.row_width;
    const int64_t block = c0 / kChannels;
    const float* const bias = r.bias + block * kChannels;
    const int count = static_cast<int>(imin(kChannels, s.out_channels - c0));
    for (int64_t x0 = 0; x0 < out_w; x0 += kLanes) {
      F acc[kChannels];
#pragma GCC unroll 32
      for (int k = 0; k < kChannels; ++k) acc[k] = V::broadcast(bias[k]);
      const float* w = r.weight + block * s.in_channels * taps * kChannels;
      for (int64_t c = 0; c < s.in_channels; ++c) {
        const float* const channel = band + c * channel_stride + x0;
        for (int64_t t = 0; t < taps; ++t, w += kChannels) {
          const F in = V::load(channel + tap_offset[t], V::run(0, kLanes));
#pragma GCC unroll 32
          for (int k = 0; k < kChannels; ++k) acc[k] = V::fma(V::broadcast(w[k]), in, acc[k]);
        }
      }
      const At at = V::run(0, static_cast<int>(imin(kLanes, out_w - x0)));
      float* const dst = r.out + (c0 * r.out_rows + y - row_begin) * out_w + x0;
#pragma GCC unroll 32
      for (int k = 0; k < kChannels; ++k) {
        if (k >= count) break;
        const F v = r.slope ? V::prelu(acc[k], V::broadcast(r.slope[block * kChannels + k])) : acc[k];
        V::store(dst + k * r.out_rows * out_w, at, v);
      }
    }
  }

  // Output row y of channels [c0, c0 + kChannels) in NHWC.
  static void nhwc_row(const FirstLayerRows& r, const int64_t* tap_offset, int64_t y, int64_t row_begin, int64_t c0) {
    const FirstLayerShape& s = r.call->shape;
    const int64_t out_w = s.out_width(), taps = s.kernel_h * s.kernel_w;
    const int64_t channel_stride = r.row_count * s.stride_w * r.row_width;
    const float* const band = r.rows + (y - row_begin) * s.stride_h * s.stride_w * r.row_width;
    const int64_t block = c0 / kChannels;
    const int count = static_cast<int>(imin(kChannels, s.out_channels - c0));
    F bias[kVectors], slope[kVectors];
#pragma GCC unroll 32
    for (int v = 0; v < kVectors; ++v) {
      bias[v] = V::load(r.bias + block * kChannels + v * kLanes, V::run(0, kLanes));
      if (r.slope) slope[v] = V::load(r.slope + block * kChannels + v * kLanes, V::run(0, kLanes));
    }
    for (int64_t x0 = 0; x0 < out_w; x0 += kPixels) {
      F acc[kPixels][kVectors];
#pragma GCC unroll 32
      for (int p = 0; p < kPixels; ++p)
#pragma GCC unroll 32
        for (int v = 0; v < kVectors; ++v) acc[p][v] = bias[v];
      const float* w = r.weight + block * s.in_channels * taps * kChannels;
      for (int64_t c = 0; c < s.in_channels; ++c) {
        const float* const channel = band + c * channel_stride + x0;
        for (int64_t t = 0; t < taps; ++t, w += kChannels) {
          F weight[kVectors];
#pragma GCC unroll 32
          for (int v = 0; v < kVectors; ++v) weight[v] = V::load(w + v * kLanes, V::run(0, kLanes));
          const float* const in = channel + tap_offset[t];
#pragma GCC unroll 32
          for (int p = 0; p < kPixels; ++p) {
            const F x = V::broadcast(in[p]);
#pragma GCC unroll 32
            for (int v = 0; v < kVectors; ++v) acc[p][v] = V::fma(weight[v], x, acc[p][v]);
          }
        }
      }
      const int pixels = static_cast<int>(imin(kPixels, out_w - x0));
      float* const dst = r.out + ((y - row_begin) * out_w + x0) * s.out_channels + c0;
#pragma GCC unroll 32
      for (int p = 0; p < kPixels; ++p) {
        if (p >= pixels) break;
#pragma GCC unroll 32
        for (int v = 0; v < kVectors; ++v) {
          if (v * kLanes >= count) break;
          const F out = r.slope ? V::prelu(acc[p][v], slope[v]) : acc[p][v];
          V::store(dst + p * s.out_channels + v * kLanes, V::run(0, static_cast<int>(imin(kLanes, count - v * kLanes))),
                   out);
        }
      }
    }
  }

  using At = typename V::At;
};

// ops with this family's first layer: blocks of kChannels output channels, and of kPixels pixels in NHWC.
template <class V, int kChannels, int kPixels>
KernelOps with_first_layer(KernelOps ops) {
  ops.first_layer_channels = kChannels;
  ops.first_layer_pixels = V::kLanes > kPixels ? V::kLanes : kPixels;
  ops.first_layer_rows = FirstLayerKernel<V, kChannels, kPixels>::rows;
  return ops;
}

}  // namespace
}  // namespace xnorconv
