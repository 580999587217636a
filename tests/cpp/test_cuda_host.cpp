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
#include <cstring>
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

// The sign-input pack kernel (bool input: one byte per value, nonzero meaning -1).
std::vector<uint64_t> run_sign_pack(const GpuConv& p, const std::vector<uint8_t>& x, TensorStrides s) {
  std::vector<uint64_t> packed(packed_activation_words(p), 0xBADBADBADBADBADBull);
  const Strides4 st{s.n, s.c, s.h, s.w};
  for (int64_t e = 0; e < pack_threads(p); ++e) pack_sign_word(p, x.data(), st, packed.data(), e);
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
  Epilogue epilogue;  // scale, bias, residual, prelu, float or sign output, NCHW or NHWC
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
        epilogue(p, static_cast<int32_t>(bx), static_cast<int32_t>(by), tid, acc_of(tid), op.tap_sum, op.epilogue);
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
                 op.tap_sum, op.epilogue);
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

// What a case exercises besides the shape. The output stage options follow the op: sign input (bool, taken as
// already binarized), residual + PReLU (per-channel or one shared slope), sign output with or without thresholds,
// and the channels_last layout (input strides and NHWC output / residual, as the binding does for such an input).
struct Options {
  bool channels_last = false;
  bool affine = false;          // scale and bias
  bool input_threshold = false; // with sign_input: the threshold the previous layer binarized with
  bool sign_input = false;
  bool residual = false;
  int prelu = 0;                // 0 none, 1 per output channel, 2 one shared slope (expanded, as the binding does)
  bool out_signs = false;
  bool out_threshold = false;
};

std::string describe(const Options& o) {
  std::string r;
  if (o.channels_last) r += " channels_last";
  if (o.affine) r += " affine";
  if (o.input_threshold) r += " in_threshold";
  if (o.sign_input) r += " sign_input";
  if (o.residual) r += " residual";
  if (o.prelu) r += o.prelu == 1 ? " prelu" : " prelu_shared";
  if (o.out_signs) r += o.out_threshold ? " out_signs+threshold" : " out_signs";
  return r;
}

bool same_float(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);  // NaN payloads may differ per device
  uint32_t x, y;
  std::memcpy(&x, &a, 4);
  std::memcpy(&y, &b, 4);
  return x == y;
}

// The CPU op's result for the same case, from a CPU kernel family of the core (pack or pack_signs, then conv with
// the core's OutputStage), NCHW contiguous: float output in y, or sign bytes in signs.
void cpu_op(const KernelOps& ops, const ConvParams& c, const std::vector<float>& x, const std::vector<uint8_t>& x_signs,
            TensorStrides s, const float* threshold, const std::vector<uint64_t>& bits,
            const std::vector<int32_t>& tap_sum, OutputStage st, std::vector<float>& y, std::vector<uint8_t>& signs) {
  ConvCall call;
  call.params = c;
  if (!x_signs.empty())
    call.input_signs = x_signs.data();
  else
    call.input = x.data();
  call.strides = s;
  call.input_threshold = x_signs.empty() ? threshold : nullptr;
  call.weight_bits = bits.data();
  call.weight_tap_sum = tap_sum.data();
  if (st.out_signs) st.out_signs = signs.data();
  else st.out = y.data();
  call.output = st;
  WordBuffer packed(packed_input_words(ops, c));
  binary_conv2d(ops, call, packed.data(), run_serially);
}

void check_case(const ConvParams& c, const Options& opt, const std::string& shape_label) {
  const std::string label = shape_label + describe(opt);
  GpuConv p;
  EXPECT(validate(c).empty() && gpu_conv_from(c, p), "%s: invalid case", label.c_str());
  if (!validate(c).empty() || !gpu_conv_from(c, p)) return;
  std::vector<float> x(c.batch * c.in_channels * c.in_h * c.in_w), w(c.out_channels * c.channels_per_group() * c.taps());
  fill_signed(x);
  fill_signed(w);
  const bool channels_last = opt.channels_last;
  const TensorStrides s = channels_last
                              ? TensorStrides{c.in_h * c.in_w * c.in_channels, 1, c.in_w * c.in_channels, c.in_channels}
                              : TensorStrides{c.in_channels * c.in_h * c.in_w, c.in_h * c.in_w, c.in_w, 1};
  std::vector<float> scale(c.out_channels), bias(c.out_channels);
  for (auto& e : scale) e = std::uniform_real_distribution<float>(0.1f, 2.0f)(rng);
  for (auto& e : bias) e = std::uniform_real_distribution<float>(-3.0f, 3.0f)(rng);
  const float* sc = opt.affine ? scale.data() : nullptr;
  const float* bi = opt.affine ? bias.data() : nullptr;
  std::vector<float> thresholds(c.in_channels);
  for (auto& e : thresholds) e = std::uniform_real_distribution<float>(-0.5f, 0.5f)(rng);
  if (!thresholds.empty()) thresholds[0] = 0.0f;
  // exact ties x == t must binarize to +1
  if (opt.input_threshold && !x.empty()) x[0] = thresholds[0];
  const float* th = opt.input_threshold ? thresholds.data() : nullptr;
  // The exact integer dot of every output (NCHW), from the direct float64 convolution of the signs.
  const std::vector<double> dot = reference(c, x, s, w, nullptr, nullptr, th);

  // Sign input: the bytes a previous layer's sign output holds for x (binarized with th), at x's strides; any
  // nonzero byte means -1 (a few are 0xFF).
  std::vector<uint8_t> x_signs;
  if (opt.sign_input) {
    x_signs.assign(x.size(), 0);
    for (int64_t n = 0; n < c.batch; ++n)
      for (int64_t ch = 0; ch < c.in_channels; ++ch)
        for (int64_t h = 0; h < c.in_h; ++h)
          for (int64_t col = 0; col < c.in_w; ++col) {
            const int64_t at = n * s.n + ch * s.c + h * s.h + col * s.w;
            x_signs[at] = x[at] >= (th ? th[ch] : 0.0f) ? 0 : (pick(0, 7) == 0 ? 0xFF : 1);
          }
  }

  // Output stage operands. residual in the output's layout (NHWC for a channels_last case) and NCHW for the CPU.
  const int64_t oh = c.out_h(), ow = c.out_w(), plane = oh * ow, outputs = c.batch * c.out_channels * plane;
  auto nhwc_of = [&](int64_t i) {  // NCHW index -> NHWC index
    const int64_t n = i / (c.out_channels * plane), o = (i / plane) % c.out_channels, q = i % plane;
    return (n * plane + q) * c.out_channels + o;
  };
  const bool out_nhwc = channels_last;
  std::vector<float> residual, residual_gpu, slope, out_threshold(c.out_channels);
  if (opt.residual) {
    residual.resize(outputs);
    fill_signed(residual);  // includes 0, -0.0 and NaN
    residual_gpu = residual;
    if (out_nhwc)
      for (int64_t i = 0; i < outputs; ++i) residual_gpu[nhwc_of(i)] = residual[i];
  }
  if (opt.prelu) {
    slope.resize(c.out_channels);
    const float shared = std::uniform_real_distribution<float>(-0.5f, 0.5f)(rng);
    for (auto& e : slope) e = opt.prelu == 2 ? shared : std::uniform_real_distribution<float>(-0.5f, 0.5f)(rng);
  }
  for (auto& e : out_threshold) e = std::uniform_real_distribution<float>(-4.0f, 4.0f)(rng);

  // The specification, in the CPU kernels' float operations: y = fmaf(scale, dot, bias); y += residual;
  // y = y >= 0 ? y : slope * y; sign byte !(y >= threshold).
  std::vector<float> want(outputs);
  std::vector<uint8_t> want_signs(outputs);
  for (int64_t i = 0; i < outputs; ++i) {
    const int64_t o = (i / plane) % c.out_channels;
    float y = std::fma(sc ? sc[o] : 1.0f, static_cast<float>(dot[i]), bi ? bi[o] : 0.0f);
    if (opt.residual) y = y + residual[i];
    if (opt.prelu && !(y >= 0.0f)) y = slope[o] * y;
    want[i] = y;
    want_signs[i] = static_cast<uint8_t>(!(y >= (opt.out_threshold ? out_threshold[o] : 0.0f)));
  }

  // Weight pack kernel == the core's pack_weights (bits and tap sums).
  std::vector<uint64_t> bits;
  std::vector<int32_t> tap_sum;
  run_weight_pack(p, w, bits, tap_sum);
  std::vector<uint64_t> core_bits(weight_words(c));
  std::vector<int32_t> core_tap_sum(c.out_channels * c.taps());
  pack_weights(c, w.data(), core_bits.data(), core_tap_sum.data());
  EXPECT(bits == core_bits && tap_sum == core_tap_sum, "%s: CUDA weight pack differs from the core's", label.c_str());

  // The CPU op (every CPU kernel family usable here) gives exactly the specification: the reference the CUDA
  // results are held to is the CPU op's result, bit for bit.
  OutputStage st;
  st.scale = sc;
  st.bias = bi;
  st.residual = opt.residual ? residual.data() : nullptr;
  st.prelu = opt.prelu ? slope.data() : nullptr;
  if (opt.out_signs) {
    st.out_signs = reinterpret_cast<uint8_t*>(1);  // set by cpu_op
    st.out_threshold = opt.out_threshold ? out_threshold.data() : nullptr;
  }
  for (const auto& name : available_backends()) {
    std::vector<float> y(outputs, NAN);
    std::vector<uint8_t> signs(outputs, 7);
    cpu_op(*find_backend(name), c, x, x_signs, s, th, core_bits, core_tap_sum, st, y, signs);
    int64_t bad = 0;
    for (int64_t i = 0; i < outputs; ++i)
      bad += opt.out_signs ? signs[i] != want_signs[i] : !same_float(y[i], want[i]);
    EXPECT(bad == 0, "%s: the CPU op [%s] differs from the specification in %lld of %lld outputs", label.c_str(),
           name.c_str(), (long long)bad, (long long)outputs);
  }

  const std::vector<uint64_t> packed = opt.sign_input ? run_sign_pack(p, x_signs, s) : run_pack(p, x, s, th);
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
    // Sentinels that no output equals: an output the kernel never writes fails the comparison.
    std::vector<float> got(outputs, 1e30f);
    std::vector<uint8_t> got_signs(outputs, 7);
    Operands op{packed.data(), bits.data(), tap_sum.data(), Epilogue{}};
    op.epilogue.scale = sc;
    op.epilogue.bias = bi;
    op.epilogue.residual = opt.residual ? residual_gpu.data() : nullptr;
    op.epilogue.prelu = opt.prelu ? slope.data() : nullptr;
    if (opt.out_signs) {
      op.epilogue.out_signs = got_signs.data();
      op.epilogue.out_threshold = opt.out_threshold ? out_threshold.data() : nullptr;
    } else {
      op.epilogue.out = got.data();
    }
    op.epilogue.channels_last = out_nhwc ? 1 : 0;
    if (kernel == 0) run_popc(p, op);
    else run_tc(p, kernel == 2, op);
    int64_t bad = 0, first = -1;
    for (int64_t i = 0; i < outputs; ++i) {
      const int64_t at = out_nhwc ? nhwc_of(i) : i;
      const bool ok = opt.out_signs ? got_signs[at] == want_signs[i] : same_float(got[at], want[i]);
      if (!ok) {
        if (first < 0) first = i;
        ++bad;
      }
    }
    const int64_t at = first < 0 ? 0 : (out_nhwc ? nhwc_of(first) : first);
    EXPECT(bad == 0, "%s [%s]: %lld of %lld outputs wrong, first (NCHW index %lld): got %.9g / sign %d, want %.9g / "
           "sign %d", label.c_str(), names[kernel], (long long)bad, (long long)outputs, (long long)first,
           first >= 0 && !opt.out_signs ? got[at] : 0.0, first >= 0 ? got_signs[at] : 0,
           first >= 0 ? want[first] : 0.0, first >= 0 ? want_signs[first] : 0);
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

// Same generator as test_core's random shapes (channel tails up to 150 per group, groups 2-3, stride and
// dilation up to 3 / 2, asymmetric padding, every pad value), plus wider channel counts for the tensor-core tiles.
void test_random_shapes(int count) {
  const PadValue pads[] = {PadValue::Zero, PadValue::PlusOne, PadValue::MinusOne};
  int run = 0;
  for (int iter = 0; iter < count; ++iter) {
    ConvParams p;
    p.groups = pick(0, 4) == 0 ? pick(2, 3) : 1;
    p.batch = pick(1, 2);  // batch 0 has its own test: it compares no output
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
    Options o;
    o.channels_last = pick(0, 3) == 0;
    o.affine = pick(0, 1) == 1;
    o.input_threshold = pick(0, 3) == 0;
    o.sign_input = pick(0, 3) == 0;
    o.residual = pick(0, 2) == 0;
    o.prelu = pick(0, 2) == 0 ? static_cast<int>(pick(1, 2)) : 0;
    o.out_signs = pick(0, 3) == 0;
    o.out_threshold = o.out_signs && pick(0, 3) != 0;
    check_case(p, o, describe(p));
  }
  std::printf("random shapes: %d run\n", run);
}

void test_darknet_shapes() {
  const int64_t shapes[][6] = {{64, 64, 64, 3, 1, 1}, {128, 128, 32, 3, 1, 1}, {256, 256, 16, 3, 1, 1},
                               {512, 512, 8, 3, 1, 1}, {256, 512, 16, 3, 2, 1}, {512, 256, 8, 1, 1, 0}};
  for (const auto& sh : shapes)
    for (PadValue pv : {PadValue::Zero, PadValue::PlusOne, PadValue::MinusOne}) {
      ConvParams p = square_layer(sh[0], sh[1], sh[2], sh[3], sh[4], sh[5]);
      p.pad_value = pv;
      Options o;
      o.affine = true;
      o.input_threshold = pv == PadValue::MinusOne;
      // One of the fused Bi-Real / ReActNet output stages per pad value, on the full-size layers.
      o.residual = pv == PadValue::Zero;
      o.prelu = pv == PadValue::Zero ? 1 : 0;
      o.sign_input = o.out_signs = o.out_threshold = pv == PadValue::PlusOne;
      check_case(p, o, describe(p));
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
    std::vector<uint8_t> x_signs(x.size());
    for (size_t i = 0; i < x.size(); ++i) x_signs[i] = x[i] < 0.0f;
    EXPECT(run_sign_pack(p, x_signs, {c.in_channels * c.in_w, c.in_w, c.in_w, 1}) == packed,
           "channel %lld: the sign pack differs from the float pack", (long long)hot);
    const int64_t g = hot / 130, ch = hot % 130;
    for (int64_t iw = 0; iw < c.in_w; ++iw)
      for (int64_t word = 0; word < 8; ++word) {
        const uint64_t want = word == g * 4 + ch / 64 ? (1ull << (ch % 64)) : 0;
        EXPECT(packed[iw * 8 + word] == want, "channel %lld pixel %lld word %lld: %016llx", (long long)hot,
               (long long)iw, (long long)word, (unsigned long long)packed[iw * 8 + word]);
      }
  }
}

// Every combination of the output stage options (sign input, residual, PReLU per channel / shared, float / sign
// output with and without thresholds, NCHW / channels_last) on shapes that cover both tensor-core tiles' channel
// tails, padding of every kind, stride and groups.
void test_epilogue_matrix() {
  struct Shape {
    int64_t n, c, h, w, o, k, stride, pad, groups;
    PadValue pv;
  };
  const Shape shapes[] = {{2, 130, 5, 7, 70, 3, 1, 1, 1, PadValue::Zero},
                          {1, 2 * 128, 6, 5, 2 * 20, 3, 2, 1, 2, PadValue::MinusOne},
                          {2, 37, 4, 9, 9, 2, 1, 1, 1, PadValue::PlusOne}};
  int run = 0;
  for (const Shape& sh : shapes)
    for (int combo = 0; combo < 2 * 2 * 3 * 3 * 2; ++combo) {
      ConvParams p;
      p.batch = sh.n;
      p.in_channels = sh.c;
      p.in_h = sh.h;
      p.in_w = sh.w;
      p.out_channels = sh.o;
      p.groups = sh.groups;
      p.kernel_h = p.kernel_w = sh.k;
      p.stride_h = p.stride_w = sh.stride;
      p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = sh.pad;
      p.pad_value = sh.pv;
      Options o;
      int r = combo;
      o.sign_input = r % 2;
      r /= 2;
      o.residual = r % 2;
      r /= 2;
      o.prelu = r % 3;
      r /= 3;
      o.out_signs = r % 3 != 0;
      o.out_threshold = r % 3 == 2;
      r /= 3;
      o.channels_last = r % 2;
      o.affine = combo % 5 != 0;
      o.input_threshold = combo % 3 == 0;
      check_case(p, o, describe(p));
      ++run;
    }
  std::printf("epilogue matrix: %d cases run\n", run);
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

// Batch 0 through every stage (weight pack, activation pack, the three kernels, the CPU op), with the fused options:
// nothing to compare, but nothing may be read or written either (the sanitizer build checks that), and the weight
// pack must still equal the core's.
void test_batch_zero() {
  const PadValue pads[] = {PadValue::Zero, PadValue::PlusOne, PadValue::MinusOne};
  for (int variant = 0; variant < 6; ++variant) {
    ConvParams p;
    p.batch = 0;
    p.groups = variant % 2 ? 2 : 1;
    p.in_channels = 140;
    p.out_channels = 70 * p.groups;
    p.in_h = 5;
    p.in_w = 7;
    p.kernel_h = p.kernel_w = 3;
    p.stride_h = p.stride_w = variant == 3 ? 2 : 1;
    p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 1;
    p.pad_value = pads[variant % 3];
    Options o;
    o.channels_last = variant == 1;
    o.affine = true;
    o.input_threshold = variant == 2;
    o.sign_input = variant == 4;
    o.residual = variant == 5;
    o.prelu = variant == 5 ? 1 : 0;
    o.out_signs = variant == 3;
    o.out_threshold = variant == 3;
    check_case(p, o, "batch 0 " + describe(p));
  }
}

int main(int argc, char** argv) {
  const int random_cases = argc > 1 ? std::atoi(argv[1]) : 300;
  test_sign_edge_cases();
  test_bit_order();
  test_limits();
  test_epilogue_matrix();
  test_darknet_shapes();
  test_batch_zero();
  test_random_shapes(random_cases);
  std::printf("%d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
