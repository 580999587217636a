// The float first layer's arithmetic (first_layer.cpp prepares its operands; xnorconv_core.h says what it computes),
// written once over a family's vector trait V (output_stage.h's broadcast, fma, prelu, load and store, and
// run(index, lanes): the lanes [0, lanes) at element index). Each family includes it after its ISA pragma and
// kernel_common.h and instantiates first_layer_rows<its trait, its channels per block>.
//
// A block is kChannels output channels x V::kLanes consecutive pixels of one output row, kept in registers: for
// every input channel and tap, one unaligned load of the prepared row feeds kChannels FMAs with broadcast weights.
// Every block sums its taps in the same order (channel, kernel row, kernel column), whatever the family.
#pragma once

namespace xnorconv {
namespace {

template <class V, int kChannels, int kVectors>
void first_layer_rows(const FirstLayerRows& r, int64_t row_begin, int64_t row_end) {
  using F = typename V::F;
  constexpr int kLanes = V::kLanes, kPixels = kLanes * kVectors;
  const FirstLayerShape& s = r.call->shape;
  const int64_t out_h = s.out_height(), out_w = s.out_width(), taps = s.kernel_h * s.kernel_w;
  const int64_t row_stride = s.stride_w * r.row_width, channel_stride = r.row_count * row_stride;
  float* const out = r.call->out;
  // Where each tap's inputs start in the prepared rows, relative to the block's first pixel (no division per tap).
  int64_t tap_offset[kMaxTaps];
  for (int64_t i = 0; i < s.kernel_h; ++i)
    for (int64_t j = 0; j < s.kernel_w; ++j) {
      const int64_t col = j * s.dilation_w;
      tap_offset[i * s.kernel_w + j] = i * s.dilation_h * row_stride + col % s.stride_w * r.row_width + col / s.stride_w;
    }
  for (int64_t y = row_begin; y < row_end; ++y) {
    const float* const band = r.rows + (y - row_begin) * s.stride_h * row_stride;
    for (int64_t c0 = 0; c0 < s.out_channels; c0 += kChannels) {
      const int64_t block = c0 / kChannels;
      const float* const block_weight = r.weight + block * s.in_channels * taps * kChannels;
      const float* const bias = r.bias + block * kChannels;
      const int count = static_cast<int>(imin(kChannels, s.out_channels - c0));
      for (int64_t x0 = 0; x0 < out_w; x0 += kPixels) {
        F acc[kVectors][kChannels];
#pragma GCC unroll 32
        for (int v = 0; v < kVectors; ++v)
#pragma GCC unroll 32
          for (int k = 0; k < kChannels; ++k) acc[v][k] = V::broadcast(bias[k]);
        const float* w = block_weight;
        for (int64_t c = 0; c < s.in_channels; ++c) {
          const float* const channel = band + c * channel_stride + x0;
          for (int64_t t = 0; t < taps; ++t, w += kChannels) {
            const float* const at = channel + tap_offset[t];
            F in[kVectors];
#pragma GCC unroll 32
            for (int v = 0; v < kVectors; ++v) in[v] = V::load(at + v * kLanes, V::run(0, kLanes));
#pragma GCC unroll 32
            for (int k = 0; k < kChannels; ++k) {
              const F weight = V::broadcast(w[k]);
#pragma GCC unroll 32
              for (int v = 0; v < kVectors; ++v) acc[v][k] = V::fma(weight, in[v], acc[v][k]);
            }
          }
        }
        if (r.slope) {
#pragma GCC unroll 32
          for (int k = 0; k < kChannels; ++k) {
            const F slope = V::broadcast(r.slope[block * kChannels + k]);
#pragma GCC unroll 32
            for (int v = 0; v < kVectors; ++v) acc[v][k] = V::prelu(acc[v][k], slope);
          }
        }
#pragma GCC unroll 32
        for (int v = 0; v < kVectors; ++v) {
          const int64_t x = x0 + v * kLanes;
          if (x >= out_w) break;
          const int lanes = static_cast<int>(imin(kLanes, out_w - x));
          if (!s.channels_last) {
            float* const dst = out + ((r.image * s.out_channels + c0) * out_h + y) * out_w + x;
#pragma GCC unroll 32
            for (int k = 0; k < kChannels; ++k)
              if (k < count) V::store(dst + k * out_h * out_w, V::run(0, lanes), acc[v][k]);
            continue;
          }
          // NHWC: the pixels of a vector are out_channels apart, so it goes through a tile, one pixel's channels at
          // a time.
          float tile[kChannels][kLanes];
#pragma GCC unroll 32
          for (int k = 0; k < kChannels; ++k) V::store(tile[k], V::run(0, kLanes), acc[v][k]);
          float* const dst = out + ((r.image * out_h + y) * out_w + x) * s.out_channels + c0;
          for (int lane = 0; lane < lanes; ++lane)
            for (int k = 0; k < count; ++k) dst[lane * s.out_channels + k] = tile[k][lane];
        }
      }
    }
  }
}

// ops with this family's first layer.
template <class V, int kChannels, int kVectors>
KernelOps with_first_layer(KernelOps ops) {
  ops.first_layer_channels = kChannels;
  ops.first_layer_pixels = V::kLanes * kVectors;
  ops.first_layer_rows = first_layer_rows<V, kChannels, kVectors>;
  return ops;
}

}  // namespace
}  // namespace xnorconv
