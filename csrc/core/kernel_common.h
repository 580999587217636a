// Shared skeleton of the CPU kernel families. Each per-ISA translation unit includes this file *after* its own
// target pragma: everything here lives in an unnamed namespace, so each TU gets its own copy compiled for its ISA
// with internal linkage, and no AVX-512 instance of an inline function can be picked by the linker for code that
// runs on an older CPU.
//
// An ISA policy `Isa` provides
//   kStrip, kStrips, kChannels         strip width (pixels per vector), strips and output channels per block
//   uint64_t below(const float* x, float t, int64_t count)             bit i = !(x[i] >= t), i < count <= 64, contiguous
//   uint64_t below_each(const float* x, const float* t, int64_t count)  bit i = !(x[i] >= t[i]), likewise
//   uint64_t nonzero(const uint8_t* x, int64_t count)                  bit i = x[i] != 0, likewise
//   struct Call; static Call prepare(const ConvParams&, const ActivationLayout&, const uint64_t* packed,
//                                    const int64_t* tap_offset)
//        whatever the family derives once per task range from the call (split planes, offset lists): run before the
//        range's first block, on the thread that runs it; families that need nothing inherit NoPreparation
//   template <bool kNhwc, Steps S>
//   void block(const uint64_t* const act[kStrips], const int64_t* tap_offset, int64_t taps, int64_t words_per_group,
//              int64_t word_stride, const uint64_t* const weight[kChannels], const BlockStore<kStrips, kChannels>&,
//              Call&)
//        accumulates one block of kStrips strips x kChannels output channels and writes it through the output
//        stage, keeping the accumulators in registers; act[i] points into `packed`, and everything a block reads
//        comes from its arguments (no state left behind by other code). kNhwc is the call's output layout
//        (bs.lane_stride != 1), fixed per call: each layout's instance is compiled without the other's output
//        stage, since a family's NHWC stage takes its accumulators by reference, and with that stage reachable
//        the compiler kept them in memory for the NCHW stores too. S is the call's steps after the affine one
//        (output_stage.h's fixed_steps), fixed per call likewise: the family passes it to finish<V, S> wherever its
//        stores can take it
//   uint64_t peak_probe(int64_t iterations)                   see KernelOps::peak_probe
// and may provide
//   void transpose64(uint64_t a[64])   the same result as the portable transpose64 below, in vector registers
//                                      (a[] is 64-byte aligned); packing NCHW input spends most of its time there
//
// Standard-library templates are instantiated here only over this file's own unnamed-namespace types (the
// per-thread std::vector<StripBlock> of conv_tasks), so that, like everything else here, they have internal
// linkage; never over plain types (no std::fill, std::min, std::vector<uint64_t>): such an instantiation, compiled
// under the ISA pragma, could be emitted as a COMDAT copy that the linker then shares with other TUs. A family's
// object file therefore defines no weak symbol (`nm --defined-only` shows none).
#pragma once

#include <cstdint>
#include <vector>

#include "output_stage.h"
#include "xnorconv_core.h"

namespace xnorconv {
namespace {

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// The Isa::prepare of families whose blocks read the packed input and the tap offsets as they are.
struct NoPreparation {
  struct Call {};
  static Call prepare(const ConvParams&, const ActivationLayout&, const uint64_t*, const int64_t*) { return {}; }
};

// In-place transpose of a 64x64 bit matrix: afterwards bit c of a[i] is what bit i of a[c] was.
inline void transpose64(uint64_t a[64]) {
  static constexpr uint64_t kMasks[6] = {0x00000000FFFFFFFFull, 0x0000FFFF0000FFFFull, 0x00FF00FF00FF00FFull,
                                         0x0F0F0F0F0F0F0F0Full, 0x3333333333333333ull, 0x5555555555555555ull};
  int level = 0;
  for (int j = 32; j != 0; j >>= 1, ++level) {
    const uint64_t m = kMasks[level];
    for (int base = 0; base < 64; base += 2 * j)
      for (int i = base; i < base + j; ++i) {
        const uint64_t t = ((a[i] >> j) ^ a[i + j]) & m;
        a[i] ^= t << j;
        a[i + j] ^= t;
      }
  }
}

// Isa::transpose64 where the family has one, else the portable version.
template <class Isa>
auto transpose_block(uint64_t a[64], int) -> decltype(Isa::transpose64(a)) {
  return Isa::transpose64(a);
}
template <class Isa>
void transpose_block(uint64_t a[64], long) {
  transpose64(a);
}

// The bits a padding pixel carries in word `word` of a group: 1 in every real channel for pad_value -1.
inline uint64_t pad_word(const ConvParams& p, int64_t word) {
  if (p.pad_value != PadValue::MinusOne) return 0;
  const int64_t channels = imin(64, p.channels_per_group() - 64 * word);
  return channels == 64 ? ~0ull : ((1ull << channels) - 1);
}

// Packing tasks per image: one per padded row (padding, and in row mode the row's data), then, in plane mode,
// one per block of 64 flat pixels of the HW plane.
inline bool plane_mode(const ConvParams& p, TensorStrides s) {
  // Width-contiguous rows that follow each other: 64 consecutive floats of a channel may span several rows, so
  // small images need few transposes.
  return s.w == 1 && s.h == p.in_w && !(s.c == 1 && p.in_channels > 1);
}

inline int64_t flat_blocks(const ConvParams& p) { return (p.in_h * p.in_w + 63) / 64; }

inline int64_t pack_task_count(const ConvParams& p, const ActivationLayout& l) {
  // The strides are not known here, so plane blocks are always counted; in row mode they are no-ops.
  return p.batch * (l.rows + flat_blocks(p));
}

template <class Isa>
uint64_t below_strided(const float* x, int64_t stride, float t, int64_t count) {
  if (stride == 1) return Isa::below(x, t, count);
  uint64_t bits = 0;
  for (int64_t i = 0; i < count; ++i) bits |= static_cast<uint64_t>(!(x[i * stride] >= t)) << i;
  return bits;
}

// block[i] = the packed word of pixel i (i < count <= 64) of `channels` (<= 64) channels from c0, channel c's
// pixels at x + c * channel_stride + i * pixel_stride: one run of pixels per channel, then the 64x64 bit transpose.
template <class Source>
void transposed_words(const Source& source, const typename Source::T* x, int64_t channel_stride,
                      int64_t pixel_stride, int64_t c0, int64_t channels, int64_t count, uint64_t block[64]) {
  for (int64_t c = 0; c < channels; ++c) block[c] = source.run(x + c * channel_stride, pixel_stride, c0 + c, count);
  for (int64_t c = channels; c < 64; ++c) block[c] = 0;
  Source::transpose(block);
}
// The same words from unit-stride pixels through Isa::pixel_words, where the family has it: it builds the words
// directly for the channel counts where that costs less, and returns false for the others.
template <class Isa, class Source>
auto pixel_words(const Source& source, const float* x, int64_t channel_stride, int64_t c0, int64_t channels,
                 int64_t count, uint64_t block[64], int)
    -> decltype(void(Isa::pixel_words(x, channel_stride, x, channels, count, block))) {
  if (!Isa::pixel_words(x, channel_stride, source.threshold ? source.threshold + c0 : nullptr, channels, count, block))
    transposed_words(source, x, channel_stride, 1, c0, channels, count, block);
}
template <class Isa, class Source>
void pixel_words(const Source& source, const float* x, int64_t channel_stride, int64_t c0, int64_t channels,
                 int64_t count, uint64_t block[64], long) {
  transposed_words(source, x, channel_stride, 1, c0, channels, count, block);
}

// What packing reads: floats compared with a per-channel threshold, or bytes that are already signs. run() packs
// `count` pixels of channel c, `stride` elements apart; words() fills a block as transposed_words does.
template <class Isa>
struct FloatSource {
  using T = float;
  const float* threshold;  // per input channel, or nullptr for 0
  uint64_t run(const float* x, int64_t stride, int64_t c, int64_t count) const {
    return below_strided<Isa>(x, stride, threshold ? threshold[c] : 0.0f, count);
  }
  uint64_t across_channels(const float* x, int64_t c0, int64_t count) const {
    return threshold ? Isa::below_each(x, threshold + c0, count) : Isa::below(x, 0.0f, count);
  }
  static void transpose(uint64_t a[64]) { transpose_block<Isa>(a, 0); }
  void words(const float* x, int64_t channel_stride, int64_t pixel_stride, int64_t c0, int64_t channels,
             int64_t count, uint64_t block[64]) const {
    if (pixel_stride == 1)
      pixel_words<Isa>(*this, x, channel_stride, c0, channels, count, block, 0);
    else
      transposed_words(*this, x, channel_stride, pixel_stride, c0, channels, count, block);
  }
};

template <class Isa>
struct SignSource {
  using T = uint8_t;
  uint64_t run(const uint8_t* x, int64_t stride, int64_t, int64_t count) const {
    if (stride == 1) return Isa::nonzero(x, count);
    uint64_t bits = 0;
    for (int64_t i = 0; i < count; ++i) bits |= static_cast<uint64_t>(x[i * stride] != 0) << i;
    return bits;
  }
  uint64_t across_channels(const uint8_t* x, int64_t, int64_t count) const { return Isa::nonzero(x, count); }
  static void transpose(uint64_t a[64]) { transpose_block<Isa>(a, 0); }
  void words(const uint8_t* x, int64_t channel_stride, int64_t pixel_stride, int64_t c0, int64_t channels,
             int64_t count, uint64_t block[64]) const {
    transposed_words(*this, x, channel_stride, pixel_stride, c0, channels, count, block);
  }
};

// Positions [lo, hi) of phase `ph` that hold real input columns, of `positions` per phase; the others hold
// padding.
inline void real_positions(const ConvParams& p, int64_t phases, int64_t positions, int64_t ph, int64_t& lo,
                           int64_t& hi) {
  auto ceil_div = [](int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); };
  lo = ceil_div(p.pad_left - ph, phases);
  hi = ceil_div(p.pad_left + p.in_w - ph, phases);
  lo = lo < 0 ? 0 : (lo > positions ? positions : lo);
  hi = hi < lo ? lo : (hi > positions ? positions : hi);
}

// Where packing stores, in the bit layout (ActivationLayout): one word per (pixel, channel word).
// A sink provides rows (padded input rows to write), words_per_group, put(n, r, word, word_in_group, j, bits) for
// a real pixel's bits at padded row r and padded column j, put_run() for `count` consecutive pixels of one row, and
// pad_row() for every position of row r that is not a real input pixel.
struct BitSink {
  const ConvParams& p;
  const ActivationLayout& l;
  uint64_t* packed;
  int64_t rows, words_per_group;

  BitSink(const ConvParams& params, const ActivationLayout& layout, uint64_t* out)
      : p(params), l(layout), packed(out), rows(layout.rows), words_per_group(layout.words_per_group) {}

  void put(int64_t n, int64_t r, int64_t word, int64_t, int64_t j, uint64_t bits) const {
    if (j < l.phases * l.row_words)
      packed[n * l.image_stride + r * l.row_stride + (j % l.phases) * l.phase_stride + word * l.row_words +
             j / l.phases] = bits;
  }
  // `count` consecutive columns from j: phase and position stepped, not divided per pixel.
  // The layout's fields are read into locals first: through the reference, every store to `row` could alias them,
  // and the loop reloaded them per word (a fifth of the packing pass of the 512 -> 256 1x1 layer at 8x8).
  void put_run(int64_t n, int64_t r, int64_t word, int64_t, int64_t j, const uint64_t* bits, int64_t count) const {
    const int64_t phases = l.phases, phase_stride = l.phase_stride;
    uint64_t* row = packed + n * l.image_stride + r * l.row_stride + word * l.row_words;
    const int64_t end = imin(j + count, phases * l.row_words);
    if (phases == 1) {
      for (; j < end; ++j) row[j] = *bits++;
      return;
    }
    for (int64_t ph = j % phases, pos = j / phases; j < end; ++j, ++bits) {
      row[ph * phase_stride + pos] = *bits;
      if (++ph == phases) {
        ph = 0;
        ++pos;
      }
    }
  }
  void pad_row(int64_t n, int64_t r, int64_t word, int64_t word_in_group, bool real_row) const {
    const uint64_t pad = pad_word(p, word_in_group);
    const int64_t phases = l.phases, phase_stride = l.phase_stride, row_words = l.row_words;  // as in put_run
    uint64_t* row = packed + n * l.image_stride + r * l.row_stride + word * row_words;
    for (int64_t ph = 0; ph < phases; ++ph) {
      uint64_t* dst = row + ph * phase_stride;
      int64_t lo = 0, hi = 0;
      if (real_row) real_positions(p, phases, row_words, ph, lo, hi);
      for (int64_t pos = 0; pos < lo; ++pos) dst[pos] = pad;
      for (int64_t pos = hi; pos < row_words; ++pos) dst[pos] = pad;
    }
  }
};

template <class Source, class Sink>
void pack_rows(const ConvParams& p, const typename Source::T* x, TensorStrides s, Source source, const Sink& sink,
               int64_t begin, int64_t end) {
  const int64_t cg = p.channels_per_group(), wpg = sink.words_per_group, rows = sink.rows;
  const bool channels_contiguous = s.c == 1 && s.w != 1;
  const bool plane = plane_mode(p, s);
  const int64_t tasks_per_image = rows + flat_blocks(p);
  alignas(64) uint64_t block[64];
  // Within an image, row tasks (padding; in row mode also the data) and plane blocks alternate, so that
  // contiguous task ranges (one per thread) get a fair share of both.
  const int64_t blocks = flat_blocks(p), paired = 2 * imin(rows, blocks);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / tasks_per_image, k = task % tasks_per_image;
    const bool is_row = k < paired ? k % 2 == 0 : rows > blocks;
    const int64_t index = k < paired ? k / 2 : k - paired / 2;
    if (!is_row) {
      if (!plane) continue;
      // Plane mode: 64 flat pixels of every channel word, transposed once, scattered to their rows.
      const int64_t f0 = index * 64, count = imin(64, p.in_h * p.in_w - f0);
      const int64_t ih0 = f0 / p.in_w, iw0 = f0 - ih0 * p.in_w;
      for (int64_t g = 0; g < p.groups; ++g)
        for (int64_t w = 0; w < wpg; ++w) {
          const int64_t c0 = g * cg + 64 * w, channels = imin(64, cg - 64 * w);
          source.words(x + n * s.n + c0 * s.c + f0, s.c, 1, c0, channels, count, block);
          // Scattered one image row at a time: a run of consecutive columns steps through phases and positions.
          for (int64_t i = 0, ih = ih0, iw = iw0; i < count; ++ih, iw = 0) {
            const int64_t run = imin(count - i, p.in_w - iw);
            if (ih + p.pad_top < rows) sink.put_run(n, ih + p.pad_top, g * wpg + w, w, iw + p.pad_left, block + i, run);
            i += run;
          }
        }
      continue;
    }
    const int64_t r = index, ih = r - p.pad_top;
    const bool real_row = ih >= 0 && ih < p.in_h;
    for (int64_t g = 0; g < p.groups; ++g)
      for (int64_t w = 0; w < wpg; ++w) {
        const int64_t word = g * wpg + w;
        sink.pad_row(n, r, word, w, real_row);
        if (!real_row || plane) continue;
        const int64_t c0 = g * cg + 64 * w, channels = imin(64, cg - 64 * w);
        const auto* src = x + n * s.n + c0 * s.c + ih * s.h;
        if (channels_contiguous) {
          for (int64_t iw = 0; iw < p.in_w; ++iw)
            sink.put(n, r, word, w, iw + p.pad_left, source.across_channels(src + iw * s.w, c0, channels));
          continue;
        }
        for (int64_t iw0 = 0; iw0 < p.in_w; iw0 += 64) {
          const int64_t count = imin(64, p.in_w - iw0);
          source.words(src + iw0 * s.w, s.c, s.w, c0, channels, count, block);
          sink.put_run(n, r, word, w, iw0 + p.pad_left, block, count);
        }
      }
  }
}

// Where and how a block writes: for strip i and channel v, lanes [0, lanes[i]) of the output at elements
// at(i, v) + lane * lane_stride (of epilogue->out, ->residual and ->out_signs, which share the output's shape and
// memory format) get the output stage (output_stage.h) of y = scale[v] * (depth - 2 * popcount - correction) +
// bias[v]. A strip's lanes are consecutive pixels of a row: 1 element apart in NCHW, out_channels apart in NHWC.
// Strips past the last one and channels past the group's last are computed but not stored. Stored per channel
// (channel_offset) and per strip (offset), so that setting up a block costs P + V entries, not P * V.
template <int P, int V, int SW>
struct BlockStore {
  const EpilogueParams* epilogue;  // the call's output stage
  int64_t channel_offset[V];       // element offset of channel v's first output (its plane in NCHW)
  bool channel_real[V];            // false past the group's last channel
  int64_t offset[P];               // strip i's element offset from its channel's, or -1 past the last strip
  int64_t lane_stride;             // elements between a strip's consecutive pixels: 1 (NCHW) or out_channels (NHWC)
  int lanes[P];
  bool border[P];  // strip i reads padding (pad_value 0): correction(i, v, lane) applies
  ChannelValues<OneLane> operands[V];  // channel v's scale, bias, PReLU slope and sign threshold
  ResidualSource residual[V];          // where channel v's residual comes from (NCHW; see residual_source)
  int32_t depth;
  // pad_value 0 (read for border strips only): lane_class[i][lane] is the padding class of strip i's lane
  // (ZeroPadCorrection; 0 for none), class_value[v][class] what channel v's dot loses in that class. A strip costs
  // SW class indices to set up, not SW * V corrections; vector families look the values up in registers, which
  // makes the border strips of pad_value 0 cheaper than a per-lane correction loop.
  alignas(64) int32_t lane_class[P][SW];
  const int32_t* class_value[V];
  int32_t classes;
  // Float NCHW output, and every strip and channel of this block is real and stored whole, with each pair of strips
  // (0-1, 2-3) contiguous in its plane: a family may then store without per-strip or per-channel tests (border
  // strips still get their corrections).
  bool dense;

  bool stored(int i, int v) const { return offset[i] >= 0 && channel_real[v]; }
  int64_t at(int i, int v) const { return channel_offset[v] + offset[i]; }
  int64_t at(int i, int v, int lane) const { return at(i, v) + lane * lane_stride; }
  int32_t correction(int i, int v, int lane) const { return class_value[v][lane_class[i][lane]]; }
  // Channel v's operands broadcast to the lanes of trait L.
  template <class L>
  ChannelValues<L> values(int v) const {
    const ChannelValues<OneLane>& c = operands[v];
    return {L::broadcast(c.scale), L::broadcast(c.bias), L::broadcast(c.slope), L::broadcast(c.threshold)};
  }
};

struct TaskSpace {
  int64_t strips_per_row, strips, strip_blocks, channel_blocks, tasks;
};

template <class Isa>
TaskSpace conv_task_space(const ConvParams& p) {
  TaskSpace t;
  t.strips_per_row = (p.out_w() + Isa::kStrip - 1) / Isa::kStrip;
  t.strips = p.out_h() * t.strips_per_row;
  t.strip_blocks = (t.strips + Isa::kStrips - 1) / Isa::kStrips;
  t.channel_blocks = (p.out_channels_per_group() + Isa::kChannels - 1) / Isa::kChannels;
  // Strip blocks innermost: a block's weights stay in L1 while the (small) packed input streams from L2.
  t.tasks = p.batch * p.groups * t.channel_blocks * t.strip_blocks;
  return t;
}

template <class Isa>
int64_t conv_task_count(const ConvParams& p, const ActivationLayout&) {
  return conv_task_space<Isa>(p).tasks;
}

// The strip side of a block (P strips of SW output pixels): where its strips read and write, and their padding
// classes. It depends on the strip block alone, not on the channel block or the image.
template <int P, int SW>
struct StripBlock {
  alignas(64) int32_t lane_class[P][SW];  // valid where border[i]
  int64_t act[P];                          // first packed word of strip i, from the image's (group's) first word
  int64_t offset[P];                       // strip i's first pixel in its plane, or -1 past the last strip
  int lanes[P];
  bool border[P];
  bool any_border;
  bool dense;  // every strip real and full, pairs contiguous (the strip side of BlockStore::dense)
};

// Strip block sb: strips sb * P ... sb * P + P - 1 in row-major strip order. Past the last strip the last one is
// repeated (computed but not stored), so that a block never branches on tails.
template <int P, int SW>
void strip_block_setup(const ConvParams& p, const ActivationLayout& l, const TaskSpace& ts,
                       const ZeroPadCorrection* zp, int64_t sb, StripBlock<P, SW>& out) {
  const int64_t ow_count = p.out_w();
  out.any_border = false;
  for (int i = 0; i < P; ++i) {
    const int64_t strip = sb * P + i;
    const bool real = strip < ts.strips;
    const int64_t s = real ? strip : ts.strips - 1;
    const int64_t oh = s / ts.strips_per_row, ow = (s % ts.strips_per_row) * SW;
    out.act[i] = oh * p.stride_h * l.row_stride + ow;
    out.offset[i] = real ? oh * ow_count + ow : -1;
    out.lanes[i] = static_cast<int>(imin(SW, ow_count - ow));
    out.border[i] = false;
    if (zp && real) {
      const int32_t row_base = zp->row_class[oh] * static_cast<int32_t>(zp->col_classes);
      const int32_t* col = zp->col_class.data() + ow;  // col_class has kStripWidth zeros past out_w
      int32_t any = row_base;
      for (int lane = 0; lane < SW; ++lane) any |= col[lane];
      out.border[i] = any != 0;
      if (out.border[i])
        for (int lane = 0; lane < SW; ++lane) out.lane_class[i][lane] = row_base + col[lane];
      out.any_border |= out.border[i];
    }
  }
  out.dense = true;
  for (int i = 0; i < P; ++i) out.dense &= out.offset[i] >= 0 && out.lanes[i] == SW;
  for (int i = 0; i + 1 < P; i += 2) out.dense &= out.offset[i + 1] == out.offset[i] + SW;
}

// Strip blocks set up once per call when a task range visits them more than once (it walks all strip blocks of
// one channel block, then of the next): on a shallow layer (a 1x1 layer over a few channel words) a block's
// setup is otherwise a large share of the kernel's time. Above this many strip
// blocks the table would outgrow L2, and a block is then deep or wide enough for its setup not to matter.
constexpr int64_t kMaxCachedStripBlocks = 1024;

template <class Isa, bool kNhwc, Steps S>
void conv_tasks_in(const ConvParams& p, const ActivationLayout& l, const uint64_t* x, const uint64_t* w,
                   const OutputStage& st, int64_t begin, int64_t end) {
  constexpr int SW = Isa::kStrip, P = Isa::kStrips, V = Isa::kChannels;
  const TaskSpace ts = conv_task_space<Isa>(p);
  int64_t offsets[kMaxTaps];
  tap_offsets(p, l, offsets);
  const int64_t oh_count = p.out_h(), ow_count = p.out_w(), og = p.out_channels_per_group();
  const int64_t taps = p.taps(), wpg = l.words_per_group, weight_row = taps * wpg;
  const ZeroPadCorrection* zp = p.pad_value == PadValue::Zero ? st.zero_pad : nullptr;
  // NHWC output (kNhwc): a pixel's channels are adjacent, so a channel's offset is its index and a pixel's is scaled
  // by the channel count (the strip side is cached in pixels, the same for both layouts).
  BlockStore<P, V, SW> bs;
  bs.epilogue = &st;
  bs.lane_stride = kNhwc ? p.out_channels : 1;
  bs.depth = static_cast<int32_t>(p.depth());
  bs.classes = zp ? static_cast<int32_t>(zp->classes) : 1;
  for (int v = 0; v < V; ++v) bs.class_value[v] = nullptr;

  // More tasks than strip blocks: consecutive tasks cycle through the strip blocks, so the range visits every one
  // of them, some more than once; each is set up here once.
  const bool cache_strips = end - begin > ts.strip_blocks && ts.strip_blocks <= kMaxCachedStripBlocks;
  // Kept per thread and reused, not allocated per call (at most kMaxCachedStripBlocks entries); a thread runs one
  // range at a time, and the table is rebuilt for each.
  thread_local std::vector<StripBlock<P, SW>> strip_cache;
  if (cache_strips) {
    if (strip_cache.size() < static_cast<size_t>(ts.strip_blocks)) strip_cache.resize(ts.strip_blocks);
    for (int64_t i = 0; i < ts.strip_blocks; ++i) strip_block_setup<P, SW>(p, l, ts, zp, i, strip_cache[i]);
  }
  StripBlock<P, SW> strip_scratch;
  typename Isa::Call call = Isa::prepare(p, l, x, offsets);

  // Task index = ((n * groups + g) * channel_blocks + cb) * strip_blocks + sb, walked without divisions; the
  // channel side of the block is rebuilt only when cb changes.
  int64_t sb = begin % ts.strip_blocks, rest = begin / ts.strip_blocks;
  int64_t cb = rest % ts.channel_blocks;
  rest /= ts.channel_blocks;
  int64_t g = rest % p.groups, n = rest / p.groups;
  bool channels_stale = true, channels_real = false;
  const uint64_t* wrow[V];
  for (int64_t task = begin; task < end; ++task) {
    if (channels_stale) {
      for (int v = 0; v < V; ++v) {
        // Past the group's last channel, repeat it: computed but not stored.
        const bool real = cb * V + v < og;
        const int64_t channel = g * og + imin(cb * V + v, og - 1);
        wrow[v] = w + channel * weight_row;
        bs.channel_offset[v] = kNhwc ? n * p.out_channels * oh_count * ow_count + channel
                                    : (n * p.out_channels + channel) * oh_count * ow_count;
        bs.channel_real[v] = real;
        bs.operands[v] = channel_values<OneLane>(st, channel);
        bs.residual[v] = residual_source(st, n, channel, p.out_channels, oh_count * ow_count);
        if (zp) bs.class_value[v] = zp->value.data() + channel * zp->classes;
      }
      channels_real = (cb + 1) * V <= og;
      channels_stale = false;
    }
    const StripBlock<P, SW>* strips = &strip_scratch;
    if (cache_strips)
      strips = &strip_cache[static_cast<size_t>(sb)];
    else
      strip_block_setup<P, SW>(p, l, ts, zp, sb, strip_scratch);
    const uint64_t* act[P];
    const uint64_t* image = x + n * l.image_stride + g * wpg * l.row_words;
    for (int i = 0; i < P; ++i) {
      act[i] = image + strips->act[i];
      bs.offset[i] = strips->offset[i] < 0 ? -1 : strips->offset[i] * bs.lane_stride;
      bs.lanes[i] = strips->lanes[i];
      bs.border[i] = strips->border[i];
    }
    bs.dense = !st.out_signs && !kNhwc && channels_real && strips->dense;
    if (strips->any_border)
      for (int i = 0; i < P; ++i)
        if (strips->border[i])
          for (int lane = 0; lane < SW; ++lane) bs.lane_class[i][lane] = strips->lane_class[i][lane];
    Isa::template block<kNhwc, S>(act, offsets, taps, wpg, l.row_words, wrow, bs, call);

    if (++sb == ts.strip_blocks) {
      sb = 0;
      channels_stale = true;
      if (++cb == ts.channel_blocks) {
        cb = 0;
        if (++g == p.groups) {
          g = 0;
          ++n;
        }
      }
    }
  }
}

// conv_tasks_in for the call's fixed steps (output_stage.h's fixed_steps). NHWC output never maps residual channels
// (EpilogueParams::residual_channels is NCHW only), so it has no channel-mean instance.
template <class Isa, bool kNhwc>
void conv_tasks_with_steps(const ConvParams& p, const ActivationLayout& l, const uint64_t* x, const uint64_t* w,
                           const OutputStage& st, int64_t begin, int64_t end) {
  switch (st.per_vector_steps ? Steps::kAny : fixed_steps(st, p.out_channels)) {
    case Steps::kPlain: return conv_tasks_in<Isa, kNhwc, Steps::kPlain>(p, l, x, w, st, begin, end);
    case Steps::kPrelu: return conv_tasks_in<Isa, kNhwc, Steps::kPrelu>(p, l, x, w, st, begin, end);
    case Steps::kResidual: return conv_tasks_in<Isa, kNhwc, Steps::kResidual>(p, l, x, w, st, begin, end);
    case Steps::kResidualPrelu: return conv_tasks_in<Isa, kNhwc, Steps::kResidualPrelu>(p, l, x, w, st, begin, end);
    case Steps::kMean:
      if constexpr (!kNhwc) return conv_tasks_in<Isa, false, Steps::kMean>(p, l, x, w, st, begin, end);
      break;
    case Steps::kMeanPrelu:
      if constexpr (!kNhwc) return conv_tasks_in<Isa, false, Steps::kMeanPrelu>(p, l, x, w, st, begin, end);
      break;
    case Steps::kAny:
      break;
  }
  conv_tasks_in<Isa, kNhwc, Steps::kAny>(p, l, x, w, st, begin, end);
}

template <class Isa>
void conv_tasks(const ConvParams& p, const ActivationLayout& l, const uint64_t* x, const uint64_t* w,
                const OutputStage& st, int64_t begin, int64_t end) {
  if (begin >= end) return;
  if (st.channels_last)
    conv_tasks_with_steps<Isa, true>(p, l, x, w, st, begin, end);
  else
    conv_tasks_with_steps<Isa, false>(p, l, x, w, st, begin, end);
}

template <class Isa>
void pack_floats(const ConvParams& p, const ActivationLayout& l, const float* x, TensorStrides s,
                 const float* threshold, uint64_t* packed, int64_t begin, int64_t end) {
  pack_rows(p, x, s, FloatSource<Isa>{threshold}, BitSink(p, l, packed), begin, end);
}

template <class Isa>
void pack_signs(const ConvParams& p, const ActivationLayout& l, const uint8_t* x, TensorStrides s, uint64_t* packed,
                int64_t begin, int64_t end) {
  pack_rows(p, x, s, SignSource<Isa>{}, BitSink(p, l, packed), begin, end);
}

template <class Isa>
KernelOps make_kernel_ops(const char* name) {
  KernelOps ops{name,           pack_task_count, pack_floats<Isa>, pack_signs<Isa>, conv_task_count<Isa>,
                conv_tasks<Isa>, Isa::peak_probe};
  ops.layout = activation_layout;
  ops.channels_last_output = true;  // BlockStore addresses NHWC outputs through its lane stride
  ops.fold_columns = fold_bit_columns;
  return ops;
}

}  // namespace
}  // namespace xnorconv
