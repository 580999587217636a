// Host test of the CUDA kernels' logic (plain g++, no GPU, no nvcc): every __host__ __device__ function of
// csrc/cuda/device_logic.h is run for every block and every thread of the launch the binding would make, phase by
// phase between the kernel's barriers, exactly as kernels.cu sequences them; the tensor-core instruction
// (mma.m8n8k128 .b1 xor/and .popc) is emulated from its PTX fragment layout. Results are compared with a direct
// double-precision convolution of the signs, over the same random shape matrix as test_core (channel tails,
// stride, dilation, groups, every pad_value, batch 0, channels_last strides) plus the benchmark's layers.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "device_logic.h"
#include "gpu_conv_from_core.h"
#include "xnorconv_core.h"
#include "test_support.h"

using namespace xnorconv;
using namespace xnorconv_test;
using namespace xnorconv::cuda;

namespace {


// ---- launches, simulated on the host ----

std::vector<uint64_t> run_pack(const GpuConv& p, const std::vector<float>& x, TensorStrides s,
                               const float* threshold = nullptr) {
  std::vector<uint64_t> packed(packed_activation_words(p), 0xBADBADBADBADBADBull);
  const Strides4 st{s.n, s.c, s.h, s.w};
  for (int64_t e = 0; e < pack_threads(p); ++e) pack_activation_word(p, x.data(), st, threshold, packed.data(), e);
  return packed;
}

void run_weight_pack(const GpuConv& p, const std::vector<float>& w, std::vector<uint64_t>& bits,
                     std::vector<int32_t>& tap_sum) {
  bits.assign(static_cast<size_t>(p.out_channels) * p.taps * p.words, 0xBADBADBADBADBADBull);
  tap_sum.assign(static_cast<size_t>(p.out_channels) * p.taps, -12345);
  for (int64_t e = 0; e < static_cast<int64_t>(p.out_channels) * p.taps; ++e)
    pack_weight_tap(p.cg, p.taps, p.words, w.data(), bits.data(), tap_sum.data(), e);
}

struct Operands {
  const uint64_t* packed;
  const uint64_t* bits;
  const int32_t* tap_sum;
  const float* scale;
  const float* bias;
  float* out;
};

void run_popc(const GpuConv& p, const Operands& op) {
  using namespace popc;
  std::vector<uint64_t> sA(kChunk * kTileP), sW(kChunk * kTileO);
  std::vector<int32_t> acc(kThreads * kRegP * kRegO);
  auto acc_of = [&](int tid) { return reinterpret_cast<int32_t(*)[kRegO]>(&acc[tid * kRegP * kRegO]); };
  const int32_t k_end = k_total(p, p.words);
  for (int64_t by = 0; by < grid_y(p); ++by)
    for (int64_t bx = 0; bx < grid_x(p); ++bx) {
      const int32_t cb = channel_blocks(p), g = static_cast<int32_t>(by) / cb, channel_block = static_cast<int32_t>(by) % cb;
      for (int tid = 0; tid < kThreads; ++tid) zero(acc_of(tid));
      for (int32_t k0 = 0; k0 < k_end; k0 += kChunk) {
        std::fill(sA.begin(), sA.end(), 0xFEEDull);  // stale shared memory must be overwritten every chunk
        std::fill(sW.begin(), sW.end(), 0xBEEFull);
        for (int tid = 0; tid < kThreads; ++tid)
          load_tile<kTileP, kTileO, kChunk, kThreads>(p, p.words, static_cast<int32_t>(bx), g, channel_block, tid, k0,
                                                      op.packed, op.bits, sA.data(), sW.data());
        // __syncthreads()
        for (int tid = 0; tid < kThreads; ++tid) accumulate(tid, sA.data(), sW.data(), acc_of(tid));
        // __syncthreads()
      }
      for (int tid = 0; tid < kThreads; ++tid)
        epilogue(p, static_cast<int32_t>(bx), static_cast<int32_t>(by), tid, acc_of(tid), op.tap_sum, op.scale,
                 op.bias, op.out);
    }
}

// mma.sync.aligned.m8n8k128.row.col.s32.b1.b1.s32.{xor,and}.popc for one warp, from the PTX fragment layout:
// lane l supplies A row l/4 bits [32 (l%4), +32) and B column l/4 the same bits; receives C row l/4,
// columns 2 (l%4) + {0, 1}.
void emulate_mma(bool and_form, const uint32_t a[32], const uint32_t b[32], int32_t c[32][2]) {
  for (int r = 0; r < 8; ++r)
    for (int col = 0; col < 8; ++col) {
      int32_t sum = 0;
      for (int q = 0; q < 4; ++q) {
        const uint32_t x = a[r * 4 + q], y = b[col * 4 + q];
        sum += __builtin_popcount(and_form ? (x & y) : (x ^ y));
      }
      const int lane = r * 4 + col / 2;
      c[lane][col % 2] += sum;
    }
}

void run_tc(const GpuConv& p, bool and_form, const Operands& op) {
  using namespace tc;
  std::vector<uint64_t> sA(kChunk * kTileP), sW(kChunk * kTileO);
  struct Thread {
    int32_t acc[kM][kN][2];
    int32_t row_pop[kM];
  };
  std::vector<Thread> th(kThreads);
  const int32_t k_end = k_total(p, p.act_words_per_group);
  for (int64_t by = 0; by < grid_y(p); ++by)
    for (int64_t bx = 0; bx < grid_x(p); ++bx) {
      const int32_t cb = channel_blocks(p), g = static_cast<int32_t>(by) / cb, channel_block = static_cast<int32_t>(by) % cb;
      for (auto& t : th) t = Thread{};
      for (int32_t k0 = 0; k0 < k_end; k0 += kChunk) {
        std::fill(sA.begin(), sA.end(), 0xFEEDull);
        std::fill(sW.begin(), sW.end(), 0xBEEFull);
        for (int tid = 0; tid < kThreads; ++tid)
          load_tile<kTileP, kTileO, kChunk, kThreads>(p, p.act_words_per_group, static_cast<int32_t>(bx), g,
                                                      channel_block, tid, k0, op.packed, op.bits, sA.data(), sW.data());
        // __syncthreads()
        for (int warp = 0; warp < kThreads / 32; ++warp)
          for (int ks = 0; ks < kSteps; ++ks) {
            uint32_t a[kM][32], b[kN][32];
            for (int lane = 0; lane < 32; ++lane) {
              const int tid = warp * 32 + lane;
              for (int m = 0; m < kM; ++m) {
                a[m][lane] = a_fragment(sA.data(), tid, m, ks);
                if (and_form) th[tid].row_pop[m] += __builtin_popcount(a[m][lane]);
              }
              for (int n = 0; n < kN; ++n) b[n][lane] = b_fragment(sW.data(), tid, n, ks);
            }
            for (int m = 0; m < kM; ++m)
              for (int n = 0; n < kN; ++n) {
                int32_t c[32][2] = {};
                emulate_mma(and_form, a[m], b[n], c);
                for (int lane = 0; lane < 32; ++lane)
                  for (int i = 0; i < 2; ++i) th[warp * 32 + lane].acc[m][n][i] += c[lane][i];
              }
          }
        // __syncthreads()
      }
      if (and_form)  // __shfl_xor_sync 1 then 2: every lane of a quad gets the quad's sum
        for (int warp = 0; warp < kThreads / 32; ++warp)
          for (int m = 0; m < kM; ++m)
            for (int quad = 0; quad < 8; ++quad) {
              int32_t sum = 0;
              for (int q = 0; q < 4; ++q) sum += th[warp * 32 + quad * 4 + q].row_pop[m];
              for (int q = 0; q < 4; ++q) th[warp * 32 + quad * 4 + q].row_pop[m] = sum;
            }
      for (int tid = 0; tid < kThreads; ++tid)
        epilogue(p, and_form, static_cast<int32_t>(bx), static_cast<int32_t>(by), tid, th[tid].acc, th[tid].row_pop,
                 op.tap_sum, op.scale, op.bias, op.out);
    }
}

std::mt19937_64 rng(4321);
int64_t pick(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }

void fill_signed(std::vector<float>& v) {
  std::normal_distribution<float> d;
  for (auto& e : v) {
    e = d(rng);
    const int64_t r = pick(0, 40);
    if (r == 0) e = 0.0f;
    if (r == 1) e = -0.0f;
    if (r == 2) e = NAN;
  }
}

void check_case(const ConvParams& c, bool channels_last, bool with_affine, bool with_threshold,
                const std::string& label) {
  GpuConv p;
  EXPECT(validate(c).empty() && gpu_conv_from(c, p), "%s: invalid case", label.c_str());
  if (!validate(c).empty() || !gpu_conv_from(c, p)) return;
  std::vector<float> x(c.batch * c.in_channels * c.in_h * c.in_w), w(c.out_channels * c.channels_per_group() * c.taps());
  fill_signed(x);
  fill_signed(w);
  const TensorStrides s = channels_last
                              ? TensorStrides{c.in_h * c.in_w * c.in_channels, 1, c.in_w * c.in_channels, c.in_channels}
                              : TensorStrides{c.in_channels * c.in_h * c.in_w, c.in_h * c.in_w, c.in_w, 1};
  std::vector<float> scale(c.out_channels), bias(c.out_channels);
  for (auto& e : scale) e = std::uniform_real_distribution<float>(0.1f, 2.0f)(rng);
  for (auto& e : bias) e = std::uniform_real_distribution<float>(-3.0f, 3.0f)(rng);
  const float* sc = with_affine ? scale.data() : nullptr;
  const float* bi = with_affine ? bias.data() : nullptr;
  std::vector<float> thresholds(c.in_channels);
  for (auto& e : thresholds) e = std::uniform_real_distribution<float>(-0.5f, 0.5f)(rng);
  if (!thresholds.empty()) thresholds[0] = 0.0f;
  // exact ties x == t must binarize to +1
  if (with_threshold && !x.empty()) x[0] = thresholds[0];
  const float* th = with_threshold ? thresholds.data() : nullptr;
  const std::vector<double> want = reference(c, x, s, w, sc, bi, th);

  // Weight pack kernel == the core's pack_weights (bits and tap sums).
  std::vector<uint64_t> bits;
  std::vector<int32_t> tap_sum;
  run_weight_pack(p, w, bits, tap_sum);
  std::vector<uint64_t> core_bits(weight_words(c));
  std::vector<int32_t> core_tap_sum(c.out_channels * c.taps());
  pack_weights(c, w.data(), core_bits.data(), core_tap_sum.data());
  EXPECT(bits == core_bits && tap_sum == core_tap_sum, "%s: CUDA weight pack differs from the core's", label.c_str());

  const std::vector<uint64_t> packed = run_pack(p, x, s, th);
  // Every packed word is a sign word of the documented layout (tail bits zero, even-padding words zero).
  int64_t bad_words = 0;
  for (int64_t n = 0; n < c.batch; ++n)
    for (int64_t h = 0; h < c.in_h; ++h)
      for (int64_t col = 0; col < c.in_w; ++col)
        for (int64_t g = 0; g < c.groups; ++g)
          for (int64_t wd = 0; wd < p.act_words_per_group; ++wd) {
            uint64_t expect = 0;
            for (int64_t b = 0; b < 64; ++b) {
              const int64_t ch = 64 * wd + b;
              if (ch >= p.cg) break;
              const float v = x[n * s.n + (g * p.cg + ch) * s.c + h * s.h + col * s.w];
              if (!(v >= (th ? th[g * p.cg + ch] : 0.0f))) expect |= 1ull << b;
            }
            const uint64_t got = packed[((n * c.in_h + h) * c.in_w + col) * p.act_words_per_pixel + g * p.act_words_per_group + wd];
            bad_words += got != expect;
          }
  EXPECT(bad_words == 0, "%s: %lld packed activation words wrong", label.c_str(), (long long)bad_words);

  const char* names[] = {"popcount", "tensor_core_xor", "tensor_core_and"};
  for (int kernel = 0; kernel < 3; ++kernel) {
    std::vector<float> got(want.size(), NAN);
    const Operands op{packed.data(), bits.data(), tap_sum.data(), sc, bi, got.data()};
    if (kernel == 0) run_popc(p, op);
    else run_tc(p, kernel == 2, op);
    int64_t bad = 0, first = -1;
    for (size_t i = 0; i < want.size(); ++i) {
      const double tol = with_affine ? 1e-5 * (1.0 + std::fabs(want[i])) : 0.0;
      if (!(std::fabs(got[i] - want[i]) <= tol)) {
        if (first < 0) first = static_cast<int64_t>(i);
        ++bad;
      }
    }
    EXPECT(bad == 0, "%s [%s]: %lld of %zu outputs wrong, first at %lld: got %g want %g", label.c_str(), names[kernel],
           (long long)bad, want.size(), (long long)first, first >= 0 ? got[first] : 0.0, first >= 0 ? want[first] : 0.0);
  }
}

std::string describe(const ConvParams& p) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "N%lld C%lld H%lld W%lld O%lld g%lld k%lldx%lld s%lldx%lld pad(%lld,%lld,%lld,%lld) d%lldx%lld pv%d",
                (long long)p.batch, (long long)p.in_channels, (long long)p.in_h, (long long)p.in_w,
                (long long)p.out_channels, (long long)p.groups, (long long)p.kernel_h, (long long)p.kernel_w,
                (long long)p.stride_h, (long long)p.stride_w, (long long)p.pad_top, (long long)p.pad_bottom,
                (long long)p.pad_left, (long long)p.pad_right, (long long)p.dilation_h, (long long)p.dilation_w,
                static_cast<int>(p.pad_value));
  return buf;
}

// Same generator as test_core's random shapes (channel tails up to 150 per group, groups 2-3, batch 0, stride and
// dilation up to 3 / 2, asymmetric padding, every pad value), plus wider channel counts for the tensor-core tiles.
void test_random_shapes(int count) {
  const PadValue pads[] = {PadValue::Zero, PadValue::PlusOne, PadValue::MinusOne};
  int run = 0;
  for (int iter = 0; iter < count; ++iter) {
    ConvParams p;
    p.groups = pick(0, 4) == 0 ? pick(2, 3) : 1;
    p.batch = pick(0, 6) == 0 ? 0 : pick(1, 2);
    p.in_channels = p.groups * (pick(0, 5) == 0 ? pick(150, 300) : pick(1, 150));
    p.out_channels = p.groups * (pick(0, 5) == 0 ? pick(60, 140) : pick(1, 20));
    p.kernel_h = pick(1, 4);
    p.kernel_w = pick(1, 4);
    p.stride_h = pick(1, 3);
    p.stride_w = pick(1, 3);
    p.dilation_h = pick(1, 2);
    p.dilation_w = pick(1, 2);
    p.pad_top = pick(0, 2);
    p.pad_bottom = pick(0, 2);
    p.pad_left = pick(0, 2);
    p.pad_right = pick(0, 2);
    p.pad_value = pads[iter % 3];
    p.in_h = pick(1, 19);
    p.in_w = pick(1, 40);
    if (!validate(p).empty()) continue;
    ++run;
    check_case(p, pick(0, 3) == 0, pick(0, 1) == 1, pick(0, 3) == 0, describe(p));
  }
  std::printf("random shapes: %d run\n", run);
}

void test_darknet_shapes() {
  const int64_t shapes[][6] = {{64, 64, 64, 3, 1, 1}, {128, 128, 32, 3, 1, 1}, {256, 256, 16, 3, 1, 1},
                               {512, 512, 8, 3, 1, 1}, {256, 512, 16, 3, 2, 1}, {512, 256, 8, 1, 1, 0}};
  for (const auto& sh : shapes)
    for (PadValue pv : {PadValue::Zero, PadValue::PlusOne, PadValue::MinusOne}) {
      ConvParams p;
      p.batch = 1;
      p.in_channels = sh[0];
      p.out_channels = sh[1];
      p.in_h = p.in_w = sh[2];
      p.kernel_h = p.kernel_w = sh[3];
      p.stride_h = p.stride_w = sh[4];
      p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = sh[5];
      p.pad_value = pv;
      check_case(p, false, true, pv == PadValue::MinusOne, describe(p));
    }
}

// Pins the GPU activation layout's bit order with one-hot inputs: channel c of group g is bit c % 64 of word
// g * act_words_per_group + c / 64 of its pixel; a negative value is a 1.
void test_bit_order() {
  ConvParams c;
  c.batch = 1;
  c.in_channels = 2 * 130;
  c.groups = 2;
  c.out_channels = 2;
  c.in_h = 1;
  c.in_w = 2;
  GpuConv p;
  EXPECT(gpu_conv_from(c, p), "bit-order case");
  EXPECT(p.words == 3 && p.act_words_per_group == 4 && p.act_words_per_pixel == 8, "layout %d %d %d", p.words,
         p.act_words_per_group, p.act_words_per_pixel);
  for (int64_t hot = 0; hot < c.in_channels; ++hot) {
    std::vector<float> x(c.in_channels * c.in_w, 1.0f);
    for (int64_t iw = 0; iw < c.in_w; ++iw) x[hot * c.in_w + iw] = -1.0f;
    const std::vector<uint64_t> packed = run_pack(p, x, {c.in_channels * c.in_w, c.in_w, c.in_w, 1});
    const int64_t g = hot / 130, ch = hot % 130;
    for (int64_t iw = 0; iw < c.in_w; ++iw)
      for (int64_t word = 0; word < 8; ++word) {
        const uint64_t want = word == g * 4 + ch / 64 ? (1ull << (ch % 64)) : 0;
        EXPECT(packed[iw * 8 + word] == want, "channel %lld pixel %lld word %lld: %016llx", (long long)hot,
               (long long)iw, (long long)word, (unsigned long long)packed[iw * 8 + word]);
      }
  }
}

void test_sign_edge_cases() {
  // +0, -0, +inf -> +1; NaN, -inf -> -1.
  EXPECT(sign_bit(0.0f) == 0 && sign_bit(-0.0f) == 0 && sign_bit(INFINITY) == 0, "sign of +0/-0/inf");
  EXPECT(sign_bit(NAN) == 1 && sign_bit(-INFINITY) == 1 && sign_bit(-1e-30f) == 1, "sign of nan/-inf/negative");
}

void test_limits() {
  ConvParams c;
  c.batch = 70000;
  c.in_channels = 64;
  c.out_channels = 1024;
  c.in_h = c.in_w = 64;
  GpuConv p;
  EXPECT(!gpu_conv_from(c, p), "an output of 2^38 elements must be refused by the int32 index math check");
}

}  // namespace

int main(int argc, char** argv) {
  const int random_cases = argc > 1 ? std::atoi(argv[1]) : 300;
  test_sign_edge_cases();
  test_bit_order();
  test_limits();
  test_darknet_shapes();
  test_random_shapes(random_cases);
  std::printf("%d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
