// AMX kernel family (AMX-TILE + AMX-INT8; AVX-512 packs and runs the output stage). The +-1 products of a binary
// convolution are int8 products, and the tile unit's TDPBSSD (a 16x16 int32 tile += 16x64 int8 . 64x16 int8)
// does several times the MACs per cycle of the VPOPCNTQ loop (the peak probes of the two families measure the ratio
// on the CPU at hand: bench_core prints both). Results are exact: an int32 sum of +-1 products, with
// no popcount identity needed.
//
// Activation layout: one int8 per value, +1 / -1, and 0 for pad_value 0 padding (so zero padding is exact and
// needs no border correction), pad_value itself otherwise:
//   [N][row phase (stride_h)][column phase (stride_w)][channel word (64 channels)][position][64 bytes]
// Padded input pixel (R, J) lives in phase (R % stride_h, J % stride_w) at position (R / stride_h) * phase_cols +
// J / stride_w. Output pixel (oy, ox) is computed at the "wide" position q = oy * phase_cols + ox: every tap
// (kh, kw) then reads position q + (kh*dh / sh) * phase_cols + kw*dw / sw of phase ((kh*dh) % sh, (kw*dw) % sw),
// so 16 consecutive output positions are 16 consecutive 64-byte rows, one tile load, for any stride or dilation.
// Positions with ox >= out_w are computed and dropped (phase_cols - out_w per row: 2 of 66 on a 64-wide 3x3 layer).
// Bytes of channels past a group's end are 0, so that the weights need no zeros there.
//
// Weight format (format_weight, made once per weight from pack_weights's bits): still one bit per weight (an int8
// copy of a 512x512 3x3 layer would not fit in L2), reordered so that each 64-bit word is one row of TDPBSSD's B
// tile: per group, per block of 16 output channels, per tap, per channel word, 16 words, word k holding at bit
// 4 * o + i the sign of input channel 4 * k + i for output channel o of the block. A task expands one channel word's
// taps into int8 tiles (one blend per row, in L1) and applies them to all its output positions.
#include <cstdint>
#include <new>

#include "xnorconv_core.h"

#if XNORCONV_HAVE_AMX
#include <immintrin.h>

#define XNORCONV_ISA_TARGET \
  "avx2,fma,popcnt,bmi,bmi2,avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,amx-tile,amx-int8"
#include "isa_begin.h"
#include "kernel_common.h"
#include "avx512_binarize.h"
#include "avx512_lanes.h"
#include "first_layer_kernel.h"
#include "window_means_kernel.h"

namespace xnorconv {
namespace {

constexpr int64_t kTileRows = 16;        // output positions (and channels) per tile
constexpr int64_t kTileBytes = 1024;     // 16 rows x 64 bytes
constexpr int64_t kBlockPositions = 32;  // a block: 2 A tiles (positions) x 2 B tiles (channels), 4 accumulators
constexpr int64_t kBlockChannels = 32;
// A task covers up to this many position blocks of one channel block: their accumulators stay in L2 between
// channel words, while one word's expanded weights (kTapChunk taps x 2 tiles) stay in L1.
constexpr int64_t kTaskBlocks = 32;
constexpr int64_t kTapChunk = 9;

struct AmxGeometry {
  int64_t sh, sw, wpg, wpp;
  int64_t phase_rows, phase_cols;  // positions per phase: phase_rows x phase_cols, then slack
  int64_t positions;               // per (phase, word) plane
  int64_t out_positions;           // wide positions up to the last output: (out_h - 1) * phase_cols + out_w
  int64_t position_blocks;         // of kBlockPositions
  int64_t plane_bytes, image_bytes;
  int64_t channel_blocks;          // of kBlockChannels, per group
  int64_t task_chunks;             // tasks per (image, group, channel block)
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

AmxGeometry amx_geometry(const ConvParams& p) {
  AmxGeometry g;
  g.sh = p.stride_h;
  g.sw = p.stride_w;
  g.wpg = words_for_channels(p.channels_per_group());
  g.wpp = p.groups * g.wpg;
  const int64_t oh = p.out_h(), ow = p.out_w();
  // Only the padded rows and columns some output reads are stored.
  g.phase_rows = ceil_div((oh - 1) * p.stride_h + (p.kernel_h - 1) * p.dilation_h + 1, g.sh);
  g.phase_cols = ceil_div((ow - 1) * p.stride_w + (p.kernel_w - 1) * p.dilation_w + 1, g.sw);
  g.out_positions = (oh - 1) * g.phase_cols + ow;
  g.position_blocks = ceil_div(g.out_positions, kBlockPositions);
  const int64_t max_offset =
      ((p.kernel_h - 1) * p.dilation_h / g.sh) * g.phase_cols + (p.kernel_w - 1) * p.dilation_w / g.sw;
  // Slack: the last block's tile rows past the last output still read (and compute garbage that is dropped).
  const int64_t read_end = g.position_blocks * kBlockPositions + max_offset;
  g.positions = g.phase_rows * g.phase_cols > read_end ? g.phase_rows * g.phase_cols : read_end;
  g.plane_bytes = g.positions * 64;
  g.image_bytes = g.sh * g.sw * g.wpp * g.plane_bytes;
  g.channel_blocks = ceil_div(p.out_channels_per_group(), kBlockChannels);
  g.task_chunks = ceil_div(g.position_blocks, kTaskBlocks);
  return g;
}

ActivationLayout amx_layout(const ConvParams& p) {
  const AmxGeometry g = amx_geometry(p);
  ActivationLayout l;
  l.words_per_group = g.wpg;
  l.words_per_pixel = g.wpp;
  l.rows = g.phase_rows * g.sh;
  l.phases = g.sw;
  l.row_words = g.phase_cols;
  l.image_stride = g.image_bytes / 8;
  l.total_words = p.batch * l.image_stride;
  return l;
}

// Packing target of kernel_common.h's pack_rows: 64 bytes per (pixel, channel word), expanded from the bits.
struct ByteSink {
  const ConvParams& p;
  AmxGeometry g;
  int8_t* base;
  int64_t rows, words_per_group;
  __m512i plus, minus, pad;
  __mmask64 tail;  // the real channels of the group's last word (bytes past them stay 0)

  ByteSink(const ConvParams& params, uint64_t* packed)
      : p(params), g(amx_geometry(params)), base(reinterpret_cast<int8_t*>(packed)) {
    rows = g.phase_rows * g.sh;
    words_per_group = g.wpg;
    plus = _mm512_set1_epi8(1);
    minus = _mm512_set1_epi8(-1);
    pad = _mm512_set1_epi8(static_cast<char>(static_cast<int>(params.pad_value)));
    const int64_t last = params.channels_per_group() - 64 * (g.wpg - 1);
    tail = last == 64 ? ~0ull : (1ull << last) - 1;
  }

  __mmask64 channels(int64_t word_in_group) const { return word_in_group == g.wpg - 1 ? tail : ~0ull; }
  // Stride 1 needs no division: the common case.
  int64_t row_phase(int64_t r) const { return g.sh == 1 ? 0 : r % g.sh; }
  int64_t col_phase(int64_t j) const { return g.sw == 1 ? 0 : j % g.sw; }
  int64_t row_in_phase(int64_t r) const { return g.sh == 1 ? r : r / g.sh; }
  int64_t col_in_phase(int64_t j) const { return g.sw == 1 ? j : j / g.sw; }
  int8_t* plane(int64_t n, int64_t row_phase, int64_t col_phase, int64_t word) const {
    return base + n * g.image_bytes + ((row_phase * g.sw + col_phase) * g.wpp + word) * g.plane_bytes;
  }
  void put(int64_t n, int64_t r, int64_t word, int64_t word_in_group, int64_t j, uint64_t bits) const {
    if (j >= g.sw * g.phase_cols) return;  // a column no output reads
    int8_t* dst = plane(n, row_phase(r), col_phase(j), word) + (row_in_phase(r) * g.phase_cols + col_in_phase(j)) * 64;
    _mm512_storeu_si512(dst, _mm512_maskz_mov_epi8(channels(word_in_group), _mm512_mask_blend_epi8(bits, plus, minus)));
  }
  void put_run(int64_t n, int64_t r, int64_t word, int64_t word_in_group, int64_t j, const uint64_t* bits,
               int64_t count) const {
    const int64_t end = imin(j + count, g.sw * g.phase_cols), row = row_in_phase(r) * g.phase_cols;
    const __mmask64 real = channels(word_in_group);
    int8_t* first = plane(n, row_phase(r), 0, word) + row * 64;
    const int64_t phase_bytes = g.wpp * g.plane_bytes;
    for (int64_t ph = col_phase(j), pos = col_in_phase(j); j < end; ++j, ++bits) {
      _mm512_storeu_si512(first + ph * phase_bytes + pos * 64,
                          _mm512_maskz_mov_epi8(real, _mm512_mask_blend_epi8(*bits, plus, minus)));
      if (++ph == g.sw) {
        ph = 0;
        ++pos;
      }
    }
  }
  void pad_row(int64_t n, int64_t r, int64_t word, int64_t word_in_group, bool real_row) const {
    const int64_t row = row_in_phase(r);
    const __m512i fill = _mm512_maskz_mov_epi8(channels(word_in_group), pad);
    for (int64_t ph = 0; ph < g.sw; ++ph) {
      int8_t* pl = plane(n, row_phase(r), ph, word);
      int8_t* dst = pl + row * g.phase_cols * 64;
      int64_t lo = 0, hi = 0;
      if (real_row) real_positions(p, g.sw, g.phase_cols, ph, lo, hi);
      for (int64_t pos = 0; pos < lo; ++pos) _mm512_storeu_si512(dst + pos * 64, fill);
      for (int64_t pos = hi; pos < g.phase_cols; ++pos) _mm512_storeu_si512(dst + pos * 64, fill);
      // The plane's last row also clears the slack, so that every byte a tile reads is defined.
      if (row == g.phase_rows - 1)
        for (int64_t pos = g.phase_rows * g.phase_cols; pos < g.positions; ++pos)
          _mm512_storeu_si512(pl + pos * 64, _mm512_setzero_si512());
    }
  }
};

int64_t amx_pack_tasks(const ConvParams& p, const ActivationLayout& l) { return p.batch * (l.rows + flat_blocks(p)); }

void amx_pack(const ConvParams& p, const ActivationLayout&, const float* x, TensorStrides s, const float* threshold,
              uint64_t* packed, int64_t begin, int64_t end) {
  pack_rows(p, x, s, FloatSource<Avx512Binarize>{threshold}, ByteSink(p, packed), begin, end);
}

void amx_pack_signs(const ConvParams& p, const ActivationLayout&, const uint8_t* x, TensorStrides s,
                    uint64_t* packed, int64_t begin, int64_t end) {
  pack_rows(p, x, s, SignSource<Avx512Binarize>{}, ByteSink(p, packed), begin, end);
}

// Words of one group's formatted weight: channel blocks x 2 tiles x taps x words x 16 rows.
int64_t weight_words_per_group(const ConvParams& p, const AmxGeometry& g) {
  return g.channel_blocks * (kBlockChannels / kTileRows) * p.taps() * g.wpg * kTileRows;
}

int64_t amx_weight_words(const ConvParams& p) { return p.groups * weight_words_per_group(p, amx_geometry(p)); }

void amx_format_weight(const ConvParams& p, const uint64_t* bits, uint64_t* out) {
  const AmxGeometry g = amx_geometry(p);
  const int64_t og = p.out_channels_per_group(), taps = p.taps();
  const int64_t blocks = g.channel_blocks * (kBlockChannels / kTileRows);
  for (int64_t grp = 0; grp < p.groups; ++grp)
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t w = 0; w < g.wpg; ++w)
          for (int64_t k = 0; k < kTileRows; ++k) {
            uint64_t row = 0;
            for (int64_t col = 0; col < kTileRows; ++col) {
              const int64_t o = b * kTileRows + col;
              if (o >= og) continue;  // computed, never stored
              const uint64_t word = bits[((grp * og + o) * taps + t) * g.wpg + w];
              row |= ((word >> (4 * k)) & 0xF) << (4 * col);
            }
            *out++ = row;
          }
}

// LDTILECFG's 64-byte operand: palette 1, every tile 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int i = 0; i < 8; ++i) {
      colsb[i] = 64;
      rows[i] = kTileRows;
    }
  }
};

// In-place transpose of 16x16 int32 (row i = register i).
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4 * G + k] now holds, in 128-bit lane L, rows 4G..4G+3 of column 4L + k: column i is lane i / 4 of
  // r[i % 4], r[4 + i % 4], r[8 + i % 4], r[12 + i % 4], in that order.
  for (int i = 0; i < 4; ++i) {
    const __m512i a = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88), b = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);
    const __m512i c = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88),
                  d = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
    t[i] = _mm512_shuffle_i32x4(a, c, 0x88);
    t[i + 8] = _mm512_shuffle_i32x4(a, c, 0xDD);
    t[i + 4] = _mm512_shuffle_i32x4(b, d, 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(b, d, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// The output pixels of 16 wide positions: runs of consecutive lanes that land in one output row.
struct Segments {
  int count = 0;
  __mmask16 mask[kTileRows];
  int64_t offset[kTileRows];  // output offset of lane 0 if it were in the run's row (may be negative)
};

Segments segments_of(int64_t q0, const AmxGeometry& g, int64_t out_h, int64_t out_w) {
  Segments s;
  int64_t oy = q0 / g.phase_cols, ox = q0 - oy * g.phase_cols;
  int lane = 0;
  while (lane < kTileRows && oy < out_h) {
    if (ox < out_w) {
      const int n = static_cast<int>(imin(out_w - ox, kTileRows - lane));
      s.mask[s.count] = static_cast<__mmask16>(((1u << n) - 1) << lane);
      s.offset[s.count] = oy * out_w + ox - lane;
      ++s.count;
      lane += n;
      ox += n;
    } else {
      const int64_t skip = imin(g.phase_cols - ox, kTileRows - lane);
      lane += static_cast<int>(skip);
      ox = 0;
      ++oy;
    }
  }
  return s;
}

int64_t amx_conv_tasks(const ConvParams& p, const ActivationLayout&) {
  const AmxGeometry g = amx_geometry(p);
  return p.batch * p.groups * g.channel_blocks * g.task_chunks;
}

// The operands of output channels [first, first + 16) under `real`, one channel per lane, each absent operand as its
// neutral value.
ChannelValues<Avx512Lanes> channel_vector(const EpilogueParams& e, int64_t first, __mmask16 real) {
  return load_channel_values<Avx512Lanes>(e, [&](const float* operand, float neutral) {
    return operand ? _mm512_maskz_loadu_ps(real, operand + first) : _mm512_set1_ps(neutral);
  });
}

// NHWC output: each tile row is 16 channels of one output pixel, stored as they are.
void store_block_nhwc(const ConvParams& p, const AmxGeometry& g, const OutputStage& st, int64_t n, int64_t grp,
                      int64_t cb, int64_t pb, const int32_t (*c)[kTileRows][kTileRows]) {
  const int64_t og = p.out_channels_per_group(), oh = p.out_h(), ow = p.out_w(), oc = p.out_channels;
  const EpilogueParams e = st;  // a local copy: see store_block
  for (int h = 0; h < 2; ++h) {
    const int64_t o0 = cb * kBlockChannels + h * kTileRows;
    if (o0 >= og) break;
    const __mmask16 real = static_cast<__mmask16>((1u << imin(kTileRows, og - o0)) - 1);
    const int64_t first = grp * og + o0;
    const ChannelValues<Avx512Lanes> values = channel_vector(e, first, real);
    for (int m = 0; m < 2; ++m) {
      const int64_t q0 = pb * kBlockPositions + m * kTileRows;
      int64_t oy = q0 / g.phase_cols, ox = q0 - oy * g.phase_cols;
      for (int i = 0; i < kTileRows; ++i, ++ox) {
        if (ox == g.phase_cols) {
          ox = 0;
          ++oy;
        }
        if (oy >= oh) break;
        if (ox >= ow) continue;  // a wide position past the row's end
        const __m512 y = affine<Avx512Lanes>(values, _mm512_load_si512(c[2 * m + h][i]));
        finish<Avx512Lanes>(e, values, y, {((n * oh + oy) * ow + ox) * oc + first, 0, real, false});
      }
    }
  }
}

// The output stage of one block: c[2 * m + h][position][channel] for position tile m and channel tile h. The
// affine step runs on the tile's rows (16 channels of one position, with a vector of 16 scales), then the
// transpose makes each channel's 16 positions a vector to store along its NCHW row, each run of it in place under
// its lane mask, from where lane 0 would land. kMappedResidual: the call's residual_channels is set (a separate
// instance, so that the usual stage's code is not compiled around it: that made it slower).
template <bool kMappedResidual>
void store_block(const ConvParams& p, const AmxGeometry& g, const OutputStage& st, int64_t n, int64_t grp,
                 int64_t cb, int64_t pb, const int32_t (*c)[kTileRows][kTileRows]) {
  const int64_t og = p.out_channels_per_group(), oh = p.out_h(), ow = p.out_w(), plane_size = oh * ow;
  const bool plain = fixed_steps(st, p.out_channels) == Steps::kPlain;
  for (int m = 0; m < 2; ++m) {
    const int64_t q0 = pb * kBlockPositions + m * kTileRows;
    if (q0 >= g.out_positions) break;
    const Segments seg = segments_of(q0, g, oh, ow);
    for (int h = 0; h < 2; ++h) {
      const int64_t o0 = cb * kBlockChannels + h * kTileRows;
      if (o0 >= og) break;
      const int channels = static_cast<int>(imin(kTileRows, og - o0));
      const __mmask16 real = static_cast<__mmask16>((1u << channels) - 1);
      const int64_t first = grp * og + o0;
      const ChannelValues<Avx512Lanes> across = channel_vector(st, first, real);
      __m512i y[kTileRows];
      for (int i = 0; i < kTileRows; ++i)
        y[i] = _mm512_castps_si512(affine<Avx512Lanes>(across, _mm512_load_si512(c[2 * m + h][i])));
      transpose16(y);  // y[v] = channel o0 + v over the 16 positions
      // The common case in a loop of its own, without the other cases' code (the thin layers notice it).
      if (plain) {
        for (int v = 0; v < channels; ++v) {
          const int64_t plane = (n * p.out_channels + first + v) * plane_size;
          for (int sgi = 0; sgi < seg.count; ++sgi)
            finish<Avx512Lanes, Steps::kPlain>(st, across, _mm512_castsi512_ps(y[v]),
                                      {plane + seg.offset[sgi], 0, seg.mask[sgi], false});
        }
        continue;
      }
      // A local copy of the parameters: the masked stores (intrinsics, which may alias anything) could change `st`
      // as far as the compiler knows, so it reloaded every operand pointer after each store, which made the fused
      // residual and PReLU cost several times what they cost in the AVX-512 family.
      const EpilogueParams e = st;
      for (int v = 0; v < channels; ++v) {
        const int64_t plane = (n * p.out_channels + first + v) * plane_size;
        const ChannelValues<Avx512Lanes> along = channel_values<Avx512Lanes>(e, first + v);
        if (kMappedResidual) {
          const ResidualSource residual = residual_source(e, n, first + v, p.out_channels, plane_size);
          for (int sgi = 0; sgi < seg.count; ++sgi)
            finish<Avx512Lanes>(e, along, _mm512_castsi512_ps(y[v]),
                                {plane + seg.offset[sgi], 0, seg.mask[sgi], false}, residual);
          continue;
        }
        for (int sgi = 0; sgi < seg.count; ++sgi)
          finish<Avx512Lanes>(e, along, _mm512_castsi512_ps(y[v]), {plane + seg.offset[sgi], 0, seg.mask[sgi], false});
      }
    }
  }
}

void amx_conv(const ConvParams& p, const ActivationLayout&, const uint64_t* packed_input,
              const uint64_t* packed_weight, const OutputStage& st, int64_t begin, int64_t end) {
  if (begin >= end) return;
  const AmxGeometry g = amx_geometry(p);
  const int64_t taps = p.taps(), og = p.out_channels_per_group();
  int64_t tap_base[kMaxTaps];
  for (int64_t kh = 0, t = 0; kh < p.kernel_h; ++kh)
    for (int64_t kw = 0; kw < p.kernel_w; ++kw, ++t) {
      const int64_t dy = kh * p.dilation_h, dx = kw * p.dilation_w;
      tap_base[t] = ((dy % g.sh) * g.sw + dx % g.sw) * g.wpp * g.plane_bytes +
                    ((dy / g.sh) * g.phase_cols + dx / g.sw) * 64;
    }
  const auto* x = reinterpret_cast<const int8_t*>(packed_input);
  const int64_t group_words = weight_words_per_group(p, g), tile_words = taps * g.wpg * kTileRows;
  // Accumulators of a task's blocks between channel-word chunks (not needed when one chunk covers all of K).
  const bool chunked = g.wpg > 1 || taps > kTapChunk;
  constexpr size_t kSavedBytes = kTaskBlocks * 4 * kTileBytes;
  auto* saved = chunked ? static_cast<int32_t*>(::operator new(kSavedBytes, std::align_val_t(64))) : nullptr;
  alignas(64) int8_t b_tiles[2][kTapChunk][kTileBytes];
  // Two result buffers: a block's output stage runs after the next block's tile work is issued, so that the
  // vector units store one block while the tile unit computes the next.
  alignas(64) int32_t c[2][4][kTileRows][kTileRows];
  const __m512i plus = _mm512_set1_epi8(1), minus = _mm512_set1_epi8(-1);
  const auto store =
      st.channels_last ? store_block_nhwc : st.residual_channels ? store_block<true> : store_block<false>;
  const TileConfig config;
  _tile_loadconfig(&config);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t chunk = task % g.task_chunks;
    int64_t rest = task / g.task_chunks;
    const int64_t cb = rest % g.channel_blocks;
    rest /= g.channel_blocks;
    const int64_t grp = rest % p.groups, n = rest / p.groups;
    const int64_t pb_begin = chunk * kTaskBlocks, pb_end = imin(pb_begin + kTaskBlocks, g.position_blocks);
    const int8_t* image = x + n * g.image_bytes + grp * g.wpg * g.plane_bytes;
    const uint64_t* wbits = packed_weight + grp * group_words + cb * 2 * tile_words;
    int64_t pending = -1;  // block whose results wait in c[pending & 1] for the output stage
    for (int64_t k = 0; k < g.wpg; ++k)
      for (int64_t t0 = 0; t0 < taps; t0 += kTapChunk) {
        const int64_t tn = imin(kTapChunk, taps - t0);
        const bool first = k == 0 && t0 == 0, last = k == g.wpg - 1 && t0 + tn == taps;
        // This chunk's weights as int8 tiles, one blend per row.
        for (int h = 0; h < 2; ++h)
          for (int64_t t = 0; t < tn; ++t) {
            const uint64_t* rows = wbits + h * tile_words + ((t0 + t) * g.wpg + k) * kTileRows;
            for (int64_t r = 0; r < kTileRows; ++r)
              _mm512_store_si512(b_tiles[h][t] + r * 64, _mm512_mask_blend_epi8(rows[r], plus, minus));
          }
        for (int64_t pb = pb_begin; pb < pb_end; ++pb) {
          int32_t* keep = chunked ? saved + (pb - pb_begin) * 4 * kTileRows * kTileRows : nullptr;
          if (first) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
          } else {
            _tile_loadd(0, keep, 64);
            _tile_loadd(1, keep + 256, 64);
            _tile_loadd(2, keep + 512, 64);
            _tile_loadd(3, keep + 768, 64);
          }
          const int8_t* a = image + k * g.plane_bytes + pb * kBlockPositions * 64;
          // A block's second position tile or channel tile can lie wholly past the outputs (the last block of a
          // small image, 16 channels left): its products are skipped, the dropped results left stale.
          const bool second_positions = pb * kBlockPositions + kTileRows < g.out_positions;
          const bool second_channels = cb * kBlockChannels + kTileRows < og;
          if (second_positions && second_channels) {
            for (int64_t t = 0; t < tn; ++t) {
              const int8_t* at = a + tap_base[t0 + t];
              _tile_loadd(4, at, 64);
              _tile_loadd(5, at + kTileBytes, 64);
              _tile_loadd(6, b_tiles[0][t], 64);
              _tile_loadd(7, b_tiles[1][t], 64);
              _tile_dpbssd(0, 4, 6);
              _tile_dpbssd(1, 4, 7);
              _tile_dpbssd(2, 5, 6);
              _tile_dpbssd(3, 5, 7);
            }
          } else {
            for (int64_t t = 0; t < tn; ++t) {
              const int8_t* at = a + tap_base[t0 + t];
              _tile_loadd(4, at, 64);
              _tile_loadd(6, b_tiles[0][t], 64);
              _tile_dpbssd(0, 4, 6);
              if (second_channels) {
                _tile_loadd(7, b_tiles[1][t], 64);
                _tile_dpbssd(1, 4, 7);
              }
              if (second_positions) {
                _tile_loadd(5, at + kTileBytes, 64);
                _tile_dpbssd(2, 5, 6);
              }
            }
          }
          if (last && pending >= 0) store(p, g, st, n, grp, cb, pending, c[pending & 1]);
          int32_t* dst = last ? &c[pb & 1][0][0][0] : keep;
          _tile_stored(0, dst, 64);
          _tile_stored(1, dst + 256, 64);
          _tile_stored(2, dst + 512, 64);
          _tile_stored(3, dst + 768, 64);
          if (last) pending = pb;
        }
      }
    if (pending >= 0) store(p, g, st, n, grp, cb, pending, c[pending & 1]);
  }
  _tile_release();
  if (saved) ::operator delete(saved, std::align_val_t(64));
}

uint64_t amx_peak_probe(int64_t iterations) {
  const TileConfig config;
  _tile_loadconfig(&config);
  alignas(64) int8_t a[kTileBytes], b[kTileBytes];
  for (int i = 0; i < kTileBytes; ++i) {
    a[i] = static_cast<int8_t>(i % 3 - 1);
    b[i] = static_cast<int8_t>(i % 5 == 0 ? -1 : 1);
  }
  // The kernel's mix: 2 x 2 accumulator tiles, each A and B tile used twice.
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, a, 64);
  _tile_loadd(5, a, 64);
  _tile_loadd(6, b, 64);
  _tile_loadd(7, b, 64);
  for (int64_t it = 0; it < iterations; ++it) {
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  alignas(64) int32_t sink[kTileRows * kTileRows];
  _tile_stored(0, sink, 64);
  _tile_release();
  volatile int32_t keep = sink[0];
  (void)keep;
  return static_cast<uint64_t>(iterations) * 4 * kTileRows * kTileRows * 64;
}

}  // namespace

const KernelOps& amx_kernel() {
  static const KernelOps ops = [] {
    KernelOps k{"amx", amx_pack_tasks, amx_pack, amx_pack_signs, amx_conv_tasks, amx_conv, amx_peak_probe};
    k.layout = amx_layout;
    k.weight_format_words = amx_weight_words;
    k.format_weight = amx_format_weight;
    k.exact_zero_padding = true;
    k.channels_last_output = true;
    k.window_max = avx512_window_max;  // float work is AVX-512's
    k.stride2_window_max = avx512_stride2_window_max;
    k.stride2_width3_pool_row = avx512_stride2_width3_pool_row;
    return with_window_means<Avx512Lanes>(with_first_layer<Avx512Lanes, 16, 14>(k));
  }();
  return ops;
}

}  // namespace xnorconv

#include "isa_end.h"
#endif
