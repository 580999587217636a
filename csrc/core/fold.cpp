// Column folding for thin inputs (xnorconv_core.h says what it computes and when the op uses it): the folded
// parameters, the bit-layout families' folding pass, the weight's, and the op's weight and buffer sizes that follow.
// Portable code: the pass moves a few words per output pixel, far less than the convolution it shortens.
#include <algorithm>
#include <vector>

#include "xnorconv_core.h"

namespace xnorconv {

namespace {

// ORs channels [0, channels) of one packed pixel (its words src[0, words_for_channels(channels)), bits past
// `channels` 0) into the folded pixel `dst` from channel `at`.
void or_channels(uint64_t* dst, int64_t at, const uint64_t* src, int64_t channels) {
  for (int64_t w = 0; 64 * w < channels; ++w) {
    const int64_t bit = at + 64 * w, shift = bit % 64, bits = std::min<int64_t>(64, channels - 64 * w);
    dst[bit / 64] |= src[w] << shift;
    if (shift != 0 && shift + bits > 64) dst[bit / 64 + 1] |= src[w] >> (64 - shift);
  }
}

}  // namespace

bool folds_columns(const KernelOps& ops, const ConvParams& p) {
  if (!ops.fold_columns || p.groups != 1 || p.kernel_w < 2) return false;
  const ColumnFoldWords words = column_fold_words(p);
  return 4 * words.folded <= 3 * words.unfolded;
}

ConvParams folded_params(const ConvParams& p) {
  ConvParams f = p;
  f.in_channels = p.in_channels * p.kernel_w;
  f.in_w = p.out_w();
  f.kernel_w = 1;
  f.stride_w = 1;
  f.dilation_w = 1;
  f.pad_left = f.pad_right = 0;
  return f;
}

void fold_bit_columns(const ConvParams& p, const ActivationLayout& from, const uint64_t* packed,
                      const ActivationLayout& to, uint64_t* folded, int64_t begin, int64_t end) {
  const int64_t c = p.in_channels, ow = p.out_w(), words = to.words_per_pixel;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / from.rows, r = task % from.rows;
    const uint64_t* src = packed + n * from.image_stride + r * from.row_stride;
    uint64_t* dst = folded + n * to.image_stride + r * to.row_stride;
    // Columns past the last output are read by the last strip and dropped: zeros, so that every word is written.
    for (int64_t w = 0; w < words; ++w) std::fill(dst + w * to.row_words, dst + (w + 1) * to.row_words, 0);
    // Tap k of output column ox reads padded column ox * stride_w + k * dilation_w: phase (k * dilation_w) %
    // stride_w, position ox + (k * dilation_w) / stride_w. So each (tap, word) is one shifted run over the row,
    // loops the compiler vectorises.
    for (int64_t k = 0; k < p.kernel_w; ++k) {
      const int64_t col = k * p.dilation_w;
      const uint64_t* tap = src + (col % from.phases) * from.phase_stride + col / from.phases;
      for (int64_t w = 0; 64 * w < c; ++w) {
        const int64_t at = k * c + 64 * w, bits = std::min<int64_t>(64, c - 64 * w);
        const int64_t shift = at % 64;
        const uint64_t* in = tap + w * from.row_words;
        uint64_t* lo = dst + (at / 64) * to.row_words;
        for (int64_t ox = 0; ox < ow; ++ox) lo[ox] |= in[ox] << shift;
        if (shift == 0 || shift + bits <= 64) continue;
        uint64_t* hi = lo + to.row_words;
        for (int64_t ox = 0; ox < ow; ++ox) hi[ox] |= in[ox] >> (64 - shift);
      }
    }
  }
}

void fold_weight_bits(const ConvParams& p, const uint64_t* bits, uint64_t* folded) {
  const int64_t c = p.in_channels, words = words_for_channels(c), folded_words = words_for_channels(c * p.kernel_w);
  std::fill(folded, folded + p.out_channels * p.kernel_h * folded_words, 0);
  for (int64_t row = 0; row < p.out_channels * p.kernel_h; ++row)  // (o, kh): pack_weights's taps are row-major
    for (int64_t k = 0; k < p.kernel_w; ++k)
      or_channels(folded + row * folded_words, k * c, bits + (row * p.kernel_w + k) * words, c);
}

int64_t packed_input_words(const KernelOps& ops, const ConvParams& p) {
  const int64_t words = ops.layout(p).total_words;
  return folds_columns(ops, p) ? ops.layout(folded_params(p)).total_words + words : words;
}

const uint64_t* family_weight(const KernelOps& ops, const ConvParams& p, const uint64_t* bits, WordBuffer& storage) {
  if (!ops.format_weight) return bits;
  storage.assign(ops.weight_format_words(p), 0);
  ops.format_weight(p, bits, storage.data());
  return storage.data();
}

int64_t conv_weight_words(const KernelOps& ops, const ConvParams& p) {
  if (!folds_columns(ops, p)) return ops.format_weight ? ops.weight_format_words(p) : 0;
  const ConvParams f = folded_params(p);
  return ops.format_weight ? ops.weight_format_words(f) : weight_words(f);
}

void make_conv_weight(const KernelOps& ops, const ConvParams& p, const uint64_t* bits, uint64_t* out) {
  if (!folds_columns(ops, p)) {
    if (ops.format_weight) ops.format_weight(p, bits, out);
    return;
  }
  const ConvParams f = folded_params(p);
  if (!ops.format_weight) {
    fold_weight_bits(p, bits, out);
    return;
  }
  std::vector<uint64_t> folded(weight_words(f));
  fold_weight_bits(p, bits, folded.data());
  ops.format_weight(f, folded.data(), out);
}

const uint64_t* conv_weight(const KernelOps& ops, const ConvParams& p, const uint64_t* bits, WordBuffer& storage) {
  const int64_t words = conv_weight_words(ops, p);
  if (words == 0) return bits;
  storage.assign(words, 0);
  make_conv_weight(ops, p, bits, storage.data());
  return storage.data();
}

}  // namespace xnorconv
