// Per-thread and per-tile logic of the CUDA kernels, as __host__ __device__ functions.
//
// Framework-free (no torch, pybind11 or Python headers, no CUDA headers needed): kernels.cu calls these from its
// __global__ functions, and tests/cpp/test_cuda_host.cpp (plain g++, XNC_HD defined empty) calls the very same
// functions for every block and every thread of a launch, phase by phase between the kernel's __syncthreads(),
// and compares the result with the reference. Each kernel body in kernels.cu is only: shared arrays, the K loop,
// barriers, and calls into this file (plus the mma instruction itself, which the host test emulates).
//
// GPU packed activation layout ("NHWC words"), written by the pack kernel:
//   packed[((n * H + ih) * W + iw) * act_words_per_pixel + g * act_words_per_group + w]
//   word w of group g holds channels [g*Cg + 64*w, g*Cg + 64*w + 64) of pixel (n, ih, iw), channel at bit c % 64,
//   1 meaning sign -1 (same bit order as the CPU core and the packed weights). act_words_per_group is the weight's
//   words per tap rounded up to even, so that a 128-bit tensor-core k-step (two words) never straddles groups;
//   bits and words past the group's channels are 0. The image is NOT padded: the conv kernels load a zero word
//   for a tap that falls into the padding, and the epilogue turns the counts into the pad_value semantics:
//
//   raw  = sum over taps t, words w of popcount(a'[t][w] XOR wt[t][w])     a' = activation bits, 0 on padded taps
//   dot  = Cg * taps - 2 * raw + (pad_value - 1) * sum over padded taps t of tap_sum[o][t]
//
//   Why: a zero word is sign +1 everywhere, so raw is exactly the pad_value = +1 convolution; switching a padded
//   tap from +1 to pad_value changes the dot by (pad_value - 1) * sum_c sign(w[o][c][t]) = (pad_value - 1) * tap_sum.
//   The AND-form tensor core (sm_90) gives and = sum popcount(a' AND wt) instead; since
//   popcount(a XOR b) = popcount(a) + popcount(b) - 2 popcount(a AND b), raw = pop_a + pop_w[o] - 2 * and, where
//   pop_a is the popcount of the warp's A rows (summed by the kernel) and pop_w[o] = (Cg * taps - sum_t tap_sum)/2.
//
// Weights: the op's packed weight [O][kh][kw][words] (int64 words, the CPU layout) is used as is.
#pragma once

#include <math.h>
#include <stdint.h>

#include "output_stage.h"

#if defined(__CUDACC__)
#define XNC_HD __host__ __device__ __forceinline__
#define XNC_UNROLL _Pragma("unroll")
#define XNC_UNROLL_2 _Pragma("unroll 2")
#define XNC_HD_NOINLINE __host__ __device__ __forceinline__
#else
#define XNC_HD inline
#define XNC_UNROLL
#define XNC_UNROLL_2
#define XNC_HD_NOINLINE inline
#endif

namespace xnorconv {
namespace cuda {

// All sizes as int32 (GPU integer division is much cheaper in 32 bits); the binding checks that every count and
// the element counts of the packed input and of the output fit (fits_int32), and addresses are formed in int64.
struct GpuConv {
  int32_t batch, in_channels, in_h, in_w;
  int32_t out_channels, groups, cg, og;  // cg = in_channels / groups, og = out_channels / groups
  int32_t kernel_h, kernel_w, taps;
  int32_t stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w;
  int32_t out_h, out_w;
  int32_t pad_value;           // 0, 1 or -1
  int32_t words;               // weight words per tap = ceil(cg / 64)
  int32_t act_words_per_group; // words rounded up to even
  int32_t act_words_per_pixel; // groups * act_words_per_group
  int32_t out_pixels;          // batch * out_h * out_w
};

// Fills the derived fields; the caller sets the primary ones. Returns false when a count does not fit int32.
inline bool finish_gpu_conv(GpuConv& p, int64_t out_h, int64_t out_w) {
  const int64_t words = (p.cg + 63) / 64;
  const int64_t awpg = (words + 1) / 2 * 2;
  const int64_t awpp = awpg * p.groups;
  const int64_t out_pixels = static_cast<int64_t>(p.batch) * out_h * out_w;
  const int64_t packed_words = static_cast<int64_t>(p.batch) * p.in_h * p.in_w * awpp;
  const int64_t out_elems = out_pixels * p.out_channels;
  const int64_t limit = 0x7fffffffLL;
  if (out_h > limit || out_w > limit || out_pixels > limit || packed_words > limit || out_elems > limit) return false;
  p.out_h = static_cast<int32_t>(out_h);
  p.out_w = static_cast<int32_t>(out_w);
  p.taps = p.kernel_h * p.kernel_w;
  p.words = static_cast<int32_t>(words);
  p.act_words_per_group = static_cast<int32_t>(awpg);
  p.act_words_per_pixel = static_cast<int32_t>(awpp);
  p.out_pixels = static_cast<int32_t>(out_pixels);
  return true;
}

inline int64_t packed_activation_words(const GpuConv& p) {
  return static_cast<int64_t>(p.batch) * p.in_h * p.in_w * p.act_words_per_pixel;
}

XNC_HD int popcount64(uint64_t x) {
#if defined(__CUDA_ARCH__)
  return __popcll(x);
#else
  return __builtin_popcountll(x);
#endif
}

XNC_HD int popcount32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Packing
// ---------------------------------------------------------------------------------------------------------------

// sign bit of one value: 1 for -1 (x < 0 or NaN), 0 for +1 (x >= 0, -0.0 included).
XNC_HD uint64_t sign_bit(float x) { return (x >= 0.0f) ? 0ull : 1ull; }
// With a per-input-channel threshold t (the op's input_threshold, ReActNet's RSign): sign(x - t), computed as
// x >= t like the CPU core (NaN -> -1).
XNC_HD uint64_t sign_bit(float x, float t) { return (x >= t) ? 0ull : 1ull; }

// Activation pack: one thread per packed word. Thread e (0 <= e < pack_threads(p)) handles pixel e % pixels and
// word e / pixels of that pixel, so consecutive threads read consecutive pixels (coalesced for NCHW inputs).
inline int64_t pack_threads(const GpuConv& p) { return packed_activation_words(p); }

// Strides in elements of the float input indexed (n, c, h, w), any memory format.
struct Strides4 {
  int64_t n, c, h, w;
};

// Where thread e of the pack writes, and which input channels it reads (the float and the sign pack share it).
struct PackSite {
  int64_t word;           // index of the packed word written
  int64_t base;           // element offset of channel g * cg of pixel (n, h, col) in the input
  int32_t channel0;       // g * cg + 64 * w: the input channel of bit 0 (for the threshold)
  int32_t count;          // channels in this word (0 .. 64; 0 for the even-padding word)
};

XNC_HD PackSite pack_site(const GpuConv& p, Strides4 s, int64_t e) {
  const int32_t pixels = p.batch * p.in_h * p.in_w;  // fits: packed words fit int32
  const int32_t pix = static_cast<int32_t>(e % pixels);
  const int32_t word_of_pixel = static_cast<int32_t>(e / pixels);
  const int32_t g = word_of_pixel / p.act_words_per_group;
  const int32_t w = word_of_pixel % p.act_words_per_group;
  const int32_t n = pix / (p.in_h * p.in_w);
  const int32_t hw = pix % (p.in_h * p.in_w);
  const int32_t h = hw / p.in_w, col = hw % p.in_w;
  PackSite r;
  r.word = static_cast<int64_t>(pix) * p.act_words_per_pixel + word_of_pixel;
  r.channel0 = g * p.cg + 64 * w;
  int32_t count = p.cg - 64 * w;
  r.count = count < 0 ? 0 : (count > 64 ? 64 : count);
  r.base = n * s.n + h * s.h + col * s.w + static_cast<int64_t>(r.channel0) * s.c;
  return r;
}

// threshold: [in_channels] or nullptr (0).
XNC_HD void pack_activation_word(const GpuConv& p, const float* x, Strides4 s, const float* threshold,
                                 uint64_t* packed, int64_t e) {
  const PackSite site = pack_site(p, s, e);
  const float* base = x + site.base;
  uint64_t bits = 0;
  if (threshold) {
    const float* t = threshold + site.channel0;
    for (int32_t c = 0; c < site.count; ++c) bits |= sign_bit(base[c * s.c], t[c]) << c;
  } else {
    for (int32_t c = 0; c < site.count; ++c) bits |= sign_bit(base[c * s.c]) << c;
  }
  packed[site.word] = bits;
}

// The same for an input that is already binarized (a torch.bool tensor, or another layer's sign output): one byte
// per value, nonzero meaning -1, as the CPU core's pack_signs.
XNC_HD void pack_sign_word(const GpuConv& p, const uint8_t* x, Strides4 s, uint64_t* packed, int64_t e) {
  const PackSite site = pack_site(p, s, e);
  const uint8_t* base = x + site.base;
  uint64_t bits = 0;
  for (int32_t c = 0; c < site.count; ++c) bits |= static_cast<uint64_t>(base[c * s.c] != 0) << c;
  packed[site.word] = bits;
}

// Weight pack (the CUDA implementation of the pack_weight op): one thread per (o, tap); weight is float
// [O][Cg][kh][kw] contiguous; writes the words of that tap and tap_sum[o][tap] = sum_c sign(w).
XNC_HD void pack_weight_tap(int32_t cg, int32_t taps, int32_t words, const float* weight, uint64_t* packed,
                            int32_t* tap_sum, int64_t e) {
  const int64_t o = e / taps;
  const int32_t t = static_cast<int32_t>(e % taps);
  int32_t negatives = 0;
  for (int32_t w = 0; w < words; ++w) {
    uint64_t bits = 0;
    int32_t c_end = 64 * w + 64;
    if (c_end > cg) c_end = cg;
    for (int32_t c = 64 * w; c < c_end; ++c) {
      const uint64_t b = sign_bit(weight[(o * cg + c) * taps + t]);
      bits |= b << (c % 64);
      negatives += static_cast<int32_t>(b);
    }
    packed[(o * taps + t) * words + w] = bits;
  }
  tap_sum[o * taps + t] = cg - 2 * negatives;
}

// ---------------------------------------------------------------------------------------------------------------
// Index math and tap validity
// ---------------------------------------------------------------------------------------------------------------

struct OutPixel {
  int32_t n, oh, ow;
};

XNC_HD OutPixel decode_pixel(const GpuConv& p, int32_t pixel) {
  const int32_t per_image = p.out_h * p.out_w;
  OutPixel r;
  r.n = pixel / per_image;
  const int32_t rem = pixel % per_image;
  r.oh = rem / p.out_w;
  r.ow = rem % p.out_w;
  return r;
}

// Input row/column of tap (kh, kw) of an output pixel; valid when inside the (unpadded) input.
XNC_HD bool tap_input(const GpuConv& p, const OutPixel& q, int32_t kh, int32_t kw, int32_t& ih, int32_t& iw) {
  ih = q.oh * p.stride_h - p.pad_top + kh * p.dilation_h;
  iw = q.ow * p.stride_w - p.pad_left + kw * p.dilation_w;
  return ih >= 0 && ih < p.in_h && iw >= 0 && iw < p.in_w;
}

// The K dimension of the implicit GEMM: k = tap * k_words_per_tap + w. k_words_per_tap is p.words for the
// popcount kernel and p.act_words_per_group (even) for the tensor-core kernel; words w >= p.words are zero.
XNC_HD int32_t k_total(const GpuConv& p, int32_t k_words_per_tap) { return p.taps * k_words_per_tap; }

// Activation word k of output pixel `pixel` in group g: 0 past the end, on padded taps and on even-padding words.
XNC_HD uint64_t activation_word(const GpuConv& p, int32_t k_words_per_tap, int32_t pixel, int32_t g, int32_t k,
                                const uint64_t* packed) {
  if (pixel >= p.out_pixels || k >= k_total(p, k_words_per_tap)) return 0;
  const int32_t t = k / k_words_per_tap, w = k % k_words_per_tap;
  if (w >= p.words) return 0;
  const OutPixel q = decode_pixel(p, pixel);
  int32_t ih, iw;
  if (!tap_input(p, q, t / p.kernel_w, t % p.kernel_w, ih, iw)) return 0;
  const int64_t pix = (static_cast<int64_t>(q.n) * p.in_h + ih) * p.in_w + iw;
  return packed[pix * p.act_words_per_pixel + g * p.act_words_per_group + w];
}

// Weight word k of output channel j (index within group g): 0 past the group's channels or past the end.
XNC_HD uint64_t weight_word(const GpuConv& p, int32_t k_words_per_tap, int32_t g, int32_t j, int32_t k,
                            const uint64_t* weight_bits) {
  if (j >= p.og || k >= k_total(p, k_words_per_tap)) return 0;
  const int32_t t = k / k_words_per_tap, w = k % k_words_per_tap;
  if (w >= p.words) return 0;
  const int64_t o = static_cast<int64_t>(g) * p.og + j;
  return weight_bits[(o * p.taps + t) * p.words + w];
}

// Shared-memory tile load (one phase of a block, between barriers): thread `tid` of `threads` fills its share of
// sA[kc][TP] (pixels of this block) and sW[kc][TO] (output channels of this block) for K words [k0, k0 + KC).
template <int TP, int TO, int KC, int THREADS>
XNC_HD void load_tile(const GpuConv& p, int32_t k_words_per_tap, int32_t pixel_block, int32_t g,
                      int32_t channel_block, int32_t tid, int32_t k0, const uint64_t* packed,
                      const uint64_t* weight_bits, uint64_t* sA, uint64_t* sW) {
  for (int32_t e = tid; e < KC * TP; e += THREADS) {
    const int32_t kk = e / TP, px = e % TP;
    sA[e] = activation_word(p, k_words_per_tap, pixel_block * TP + px, g, k0 + kk, packed);
  }
  for (int32_t e = tid; e < KC * TO; e += THREADS) {
    const int32_t kk = e / TO, oc = e % TO;
    sW[e] = weight_word(p, k_words_per_tap, g, channel_block * TO + oc, k0 + kk, weight_bits);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Epilogue (fused output stage)
// ---------------------------------------------------------------------------------------------------------------

XNC_HD bool interior_pixel(const GpuConv& p, const OutPixel& q) {
  const int32_t ih0 = q.oh * p.stride_h - p.pad_top, iw0 = q.ow * p.stride_w - p.pad_left;
  return ih0 >= 0 && ih0 + (p.kernel_h - 1) * p.dilation_h < p.in_h && iw0 >= 0 &&
         iw0 + (p.kernel_w - 1) * p.dilation_w < p.in_w;
}

// Sum of tap_sum[o][t] over the taps of output pixel q that fall into the padding. Border pixels only (not
// inlined on the device: it is the rare path and would otherwise cost registers in every epilogue).
XNC_HD_NOINLINE int32_t padded_tap_sum(const GpuConv& p, OutPixel q, const int32_t* tap_sum, int64_t o) {
  int32_t sum = 0;
  for (int32_t kh = 0; kh < p.kernel_h; ++kh)
    for (int32_t kw = 0; kw < p.kernel_w; ++kw) {
      int32_t ih, iw;
      if (!tap_input(p, q, kh, kw, ih, iw)) sum += tap_sum[o * p.taps + kh * p.kernel_w + kw];
    }
  return sum;
}

// popcount of all weight bits of output channel o (the AND-form correction), from tap_sum.
XNC_HD_NOINLINE int32_t weight_popcount(const GpuConv& p, const int32_t* tap_sum, int64_t o) {
  int32_t sum = 0;
  for (int32_t t = 0; t < p.taps; ++t) sum += tap_sum[o * p.taps + t];
  return (p.cg * p.taps - sum) / 2;
}

XNC_HD int32_t dot_from_xor(const GpuConv& p, int32_t raw_xor, int32_t padded_sum) {
  return p.cg * p.taps - 2 * raw_xor + (p.pad_value - 1) * padded_sum;
}

// The fused output stage: the CPU families' (csrc/core/output_stage.h, over its one-lane trait), so every output
// is bit-identical to the CPU op's: y = fmaf(scale[o], dot, bias[o]), + residual, PReLU, then the float store or
// the sign byte. prelu holds one slope per output channel (the binding expands a shared (1,) slope).
using Epilogue = ::xnorconv::EpilogueParams;

// One output pixel of the epilogue: decoded once, then store_output() for each of the thread's channels.
struct PixelOut {
  OutPixel q;
  bool interior;
  int64_t base;         // offset of y[n][0][oh][ow]
  int64_t channel_step; // offset between consecutive channels: out_h * out_w (NCHW) or 1 (NHWC)
};

XNC_HD PixelOut pixel_out(const GpuConv& p, const Epilogue& e, int32_t pixel) {
  PixelOut r;
  r.q = decode_pixel(p, pixel);
  r.interior = interior_pixel(p, r.q);
  if (e.channels_last) {
    r.channel_step = 1;
    r.base = static_cast<int64_t>(pixel) * p.out_channels;  // pixel = (n * out_h + oh) * out_w + ow
  } else {
    r.channel_step = static_cast<int64_t>(p.out_h) * p.out_w;
    r.base = static_cast<int64_t>(r.q.n) * p.out_channels * r.channel_step + static_cast<int64_t>(r.q.oh) * p.out_w +
             r.q.ow;
  }
  return r;
}

// Output channel o of pixel px: the dot from the raw XOR count and the padding, then the output stage.
XNC_HD void store_output(const GpuConv& p, const PixelOut& px, int64_t o, int32_t raw_xor, const int32_t* tap_sum,
                         const Epilogue& e) {
  const int32_t padded = px.interior ? 0 : padded_tap_sum(p, px.q, tap_sum, o);
  const ChannelValues<OneLane> c = channel_values<OneLane>(e, o);
  finish<OneLane>(e, c, affine<OneLane>(c, dot_from_xor(p, raw_xor, padded)), px.base + o * px.channel_step);
}

// ---------------------------------------------------------------------------------------------------------------
// Popcount kernel (__popcll on CUDA cores, every architecture)
//   block: 256 threads = 16 (pixels) x 16 (channels); tile 64 pixels x 64 output channels of one group;
//   each thread accumulates 4 pixels (tx + 16 i) x 4 channels (ty + 16 j) in registers;
//   K loop in chunks of 8 words through shared memory (sA 8x64, sW 8x64 words = 8 KiB).
//   grid: x = pixel blocks, y = groups * channel blocks.
// ---------------------------------------------------------------------------------------------------------------
namespace popc {
constexpr int kThreads = 256, kTileP = 64, kTileO = 64, kChunk = 8, kRegP = 4, kRegO = 4;

XNC_HD int32_t channel_blocks(const GpuConv& p) { return (p.og + kTileO - 1) / kTileO; }
inline int64_t grid_x(const GpuConv& p) { return (static_cast<int64_t>(p.out_pixels) + kTileP - 1) / kTileP; }
inline int64_t grid_y(const GpuConv& p) { return static_cast<int64_t>(p.groups) * channel_blocks(p); }

XNC_HD void zero(int32_t acc[kRegP][kRegO]) {
  XNC_UNROLL
  for (int i = 0; i < kRegP; ++i)
    XNC_UNROLL
    for (int j = 0; j < kRegO; ++j) acc[i][j] = 0;
}

XNC_HD void accumulate(int32_t tid, const uint64_t* sA, const uint64_t* sW, int32_t acc[kRegP][kRegO]) {
  const int32_t tx = tid % 16, ty = tid / 16;
  XNC_UNROLL_2
  for (int kk = 0; kk < kChunk; ++kk) {
    uint64_t a[kRegP], w[kRegO];
    XNC_UNROLL
    for (int i = 0; i < kRegP; ++i) a[i] = sA[kk * kTileP + tx + 16 * i];
    XNC_UNROLL
    for (int j = 0; j < kRegO; ++j) w[j] = sW[kk * kTileO + ty + 16 * j];
    XNC_UNROLL
    for (int i = 0; i < kRegP; ++i)
      XNC_UNROLL
      for (int j = 0; j < kRegO; ++j) acc[i][j] += popcount64(a[i] ^ w[j]);
  }
}

XNC_HD void epilogue(const GpuConv& p, int32_t block_x, int32_t block_y, int32_t tid,
                     const int32_t acc[kRegP][kRegO], const int32_t* tap_sum, const Epilogue& e) {
  const int32_t cb = channel_blocks(p);
  const int32_t g = block_y / cb, channel_block = block_y % cb;
  const int32_t tx = tid % 16, ty = tid / 16;
  XNC_UNROLL
  for (int i = 0; i < kRegP; ++i) {
    const int32_t pixel = block_x * kTileP + tx + 16 * i;
    if (pixel >= p.out_pixels) continue;
    const PixelOut px = pixel_out(p, e, pixel);
    XNC_UNROLL
    for (int j = 0; j < kRegO; ++j) {
      const int32_t jo = channel_block * kTileO + ty + 16 * j;
      if (jo < p.og) store_output(p, px, static_cast<int64_t>(g) * p.og + jo, acc[i][j], tap_sum, e);
    }
  }
}
}  // namespace popc

// ---------------------------------------------------------------------------------------------------------------
// Binary tensor-core kernel: mma.sync.aligned.m8n8k128.row.col.s32.b1.b1.s32.{xor,and}.popc
//   (XOR form on sm_75..sm_89; AND form on sm_80+ and the only one used on sm_90).
//   A = 8 output pixels x 128 bits (row-major), B = 128 bits x 8 output channels (column-major), C = 8x8 int32.
//   Fragments per the PTX ISA for m8n8k128 .b1: lane l holds A row l/4, bits [32 (l%4), 32 (l%4) + 32) of the
//   k-step; B column l/4, the same bits; C row l/4, columns 2 (l%4) and 2 (l%4) + 1.
//   block: 128 threads = 4 warps in a 2 (pixels) x 2 (channels) grid; warp tile 16 pixels (2 m-tiles) x
//   32 channels (4 n-tiles); block tile 32 pixels x 64 channels; K loop in chunks of 8 words (4 k-steps of 128
//   bits; a k-step is two words of one tap, hence the even act_words_per_group).
// ---------------------------------------------------------------------------------------------------------------
namespace tc {
constexpr int kThreads = 128, kTileP = 32, kTileO = 64, kChunk = 8, kM = 2, kN = 4;
constexpr int kSteps = kChunk / 2;

XNC_HD int32_t channel_blocks(const GpuConv& p) { return (p.og + kTileO - 1) / kTileO; }
inline int64_t grid_x(const GpuConv& p) { return (static_cast<int64_t>(p.out_pixels) + kTileP - 1) / kTileP; }
inline int64_t grid_y(const GpuConv& p) { return static_cast<int64_t>(p.groups) * channel_blocks(p); }

XNC_HD int32_t warp_m(int32_t tid) { return (tid / 32) % 2; }
XNC_HD int32_t warp_n(int32_t tid) { return (tid / 32) / 2; }

// A fragment (32 bits) of m-tile m for k-step ks, from sA[kChunk][kTileP].
XNC_HD uint32_t a_fragment(const uint64_t* sA, int32_t tid, int32_t m, int32_t ks) {
  const int32_t lane = tid % 32;
  const int32_t row = warp_m(tid) * 16 + m * 8 + lane / 4;
  const int32_t quarter = lane % 4;
  const uint64_t word = sA[(ks * 2 + quarter / 2) * kTileP + row];
  return static_cast<uint32_t>(word >> (32 * (quarter % 2)));
}

// B fragment (32 bits) of n-tile n for k-step ks, from sW[kChunk][kTileO].
XNC_HD uint32_t b_fragment(const uint64_t* sW, int32_t tid, int32_t n, int32_t ks) {
  const int32_t lane = tid % 32;
  const int32_t col = warp_n(tid) * 32 + n * 8 + lane / 4;
  const int32_t quarter = lane % 4;
  const uint64_t word = sW[(ks * 2 + quarter / 2) * kTileO + col];
  return static_cast<uint32_t>(word >> (32 * (quarter % 2)));
}

// Block-tile coordinates of accumulator element i (0, 1) of tile (m, n) held by thread tid.
XNC_HD int32_t c_pixel(int32_t tid, int32_t m) { return warp_m(tid) * 16 + m * 8 + (tid % 32) / 4; }
XNC_HD int32_t c_channel(int32_t tid, int32_t n, int32_t i) { return warp_n(tid) * 32 + n * 8 + (tid % 4) * 2 + i; }

// acc[m][n][i] is the raw XOR count (XOR form) or AND count (AND form); row_pop[m] is, for the AND form, the
// popcount of the thread's A row of m-tile m summed over the whole K loop (after the 4-lane reduction).
XNC_HD void epilogue(const GpuConv& p, bool and_form, int32_t block_x, int32_t block_y, int32_t tid,
                     const int32_t acc[kM][kN][2], const int32_t row_pop[kM], const int32_t* tap_sum,
                     const Epilogue& e) {
  const int32_t cb = channel_blocks(p);
  const int32_t g = block_y / cb, channel_block = block_y % cb;
  XNC_UNROLL
  for (int m = 0; m < kM; ++m) {
    const int32_t pixel = block_x * kTileP + c_pixel(tid, m);
    if (pixel >= p.out_pixels) continue;
    const PixelOut px = pixel_out(p, e, pixel);
    XNC_UNROLL
    for (int n = 0; n < kN; ++n)
      XNC_UNROLL
      for (int i = 0; i < 2; ++i) {
        const int32_t jo = channel_block * kTileO + c_channel(tid, n, i);
        if (jo >= p.og) continue;
        const int64_t o = static_cast<int64_t>(g) * p.og + jo;
        const int32_t raw =
            and_form ? row_pop[m] + weight_popcount(p, tap_sum, o) - 2 * acc[m][n][i] : acc[m][n][i];
        store_output(p, px, o, raw, tap_sum, e);
      }
  }
}
}  // namespace tc

}  // namespace cuda
}  // namespace xnorconv
