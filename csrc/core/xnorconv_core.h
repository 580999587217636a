// xnorconv kernel core: framework-free C++17 (no torch, no Python).
//
// Binary semantics (the single source of truth; csrc/torch and the Python reference follow it):
//   sign(x) = +1 if x >= 0 else -1   (-0.0 -> +1, NaN -> -1 because NaN >= 0 is false)
//   with a per-input-channel threshold t (ReActNet's RSign, fused into packing): sign(x - t), computed as x >= t
//   bit(x)  = 0 for +1, 1 for -1      (so equal signs XOR to 0)
//   dot     = K - 2 * popcount(a XOR w), K = number of taps that count
//
// Packed layouts (all words are uint64_t):
//   activations  [N][rows][phases][words_per_pixel][row_words]
//     - rows are padded input rows: padded row r holds input row r - pad_top
//     - the padded input column j lives in phase j % stride_w at position j / stride_w, so for every kernel tap
//       the columns read by consecutive output pixels are consecutive words (vector loads, any stride)
//     - word w of a pixel holds channels [64*w, 64*w+64) of its group, channel c at bit c % 64;
//       group g owns words [g*words_per_group, (g+1)*words_per_group)
//     - bits past the group's channel count are 0; padding pixels hold the pad bit (1 for pad_value -1,
//       else 0) in every real channel bit
//   weights      [O][kernel_h][kernel_w][words_per_group], same bit order; tail bits 0
//
// pad_value 0 is computed as pad_value +1 (bit 0, free) followed by an exact integer correction on the border
// outputs: each padded tap (kh, kw) of output channel o contributed tap_sum[o][kh][kw] = sum_c sign(w[o][c][kh][kw]),
// which is subtracted again (see ZeroPadCorrection).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <new>
#include <memory>
#include <string>
#include <vector>

#include "epilogue.h"

namespace xnorconv {

enum class PadValue : int { Zero = 0, PlusOne = 1, MinusOne = -1 };

struct ConvParams {
  int64_t batch = 0, in_channels = 0, in_h = 0, in_w = 0;
  int64_t out_channels = 0, groups = 1;
  int64_t kernel_h = 1, kernel_w = 1;
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_top = 0, pad_bottom = 0, pad_left = 0, pad_right = 0;
  int64_t dilation_h = 1, dilation_w = 1;
  PadValue pad_value = PadValue::Zero;

  int64_t channels_per_group() const { return in_channels / groups; }
  int64_t out_channels_per_group() const { return out_channels / groups; }
  int64_t out_h() const;
  int64_t out_w() const;
  int64_t taps() const { return kernel_h * kernel_w; }
  // Number of +-1 products per output value (padded taps included, as +1/-1 constants).
  int64_t depth() const { return channels_per_group() * taps(); }
};

// A batch-1 layer with a square input, kernel, stride and padding on every side (pad_value 0), the shape the
// benchmarks and tests describe layers by: cin,cout,hw,k,stride,pad.
inline ConvParams square_layer(int64_t in_channels, int64_t out_channels, int64_t size, int64_t kernel,
                               int64_t stride, int64_t pad) {
  ConvParams p;
  p.batch = 1;
  p.in_channels = in_channels;
  p.out_channels = out_channels;
  p.in_h = p.in_w = size;
  p.kernel_h = p.kernel_w = kernel;
  p.stride_h = p.stride_w = stride;
  p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = pad;
  return p;
}

// Returns an empty string when the parameters describe a valid convolution, else a message naming the argument.
std::string validate(const ConvParams& p);

// Output pixels are computed in strips of up to kStripWidth consecutive pixels of one output row; the packed
// buffers carry enough slack that a strip never reads outside them.
constexpr int64_t kStripWidth = 16;
// Largest kernel_h * kernel_w accepted (validate() says so): lets kernels keep tap offsets on the stack.
constexpr int64_t kMaxTaps = 1024;

inline int64_t words_for_channels(int64_t channels) { return (channels + 63) / 64; }

struct ActivationLayout {
  int64_t words_per_group = 0;  // ceil(C/groups / 64)
  int64_t words_per_pixel = 0;  // groups * words_per_group
  int64_t rows = 0;             // padded rows
  int64_t phases = 0;           // stride_w
  int64_t row_words = 0;        // words per (row, phase, word index): positions along the row
  int64_t phase_stride = 0;     // words_per_pixel * row_words
  int64_t row_stride = 0;       // phases * phase_stride
  int64_t image_stride = 0;     // rows * row_stride
  int64_t total_words = 0;      // batch * image_stride
};
ActivationLayout activation_layout(const ConvParams& p);

// Word offset of tap (kh, kw) relative to the word of the output pixel's top-left input position
// (padded row oh*stride_h, phase 0, position ow): rows * row_stride + phase * phase_stride + position.
// Writes p.taps() (<= kMaxTaps) offsets.
void tap_offsets(const ConvParams& p, const ActivationLayout& layout, int64_t* offsets);

inline int64_t weight_words(const ConvParams& p) {
  return p.out_channels * p.taps() * words_for_channels(p.channels_per_group());
}

// Packs float weights [O][C/groups][kh][kw] (contiguous) into the weight layout, and writes
// tap_sum[o][kh][kw] = sum_c sign(w) (needed by pad_value 0). Done once per weight, so it is plain portable code.
void pack_weights(const ConvParams& p, const float* weight, uint64_t* packed, int32_t* tap_sum);

// Border correction for pad_value 0. Rows (and columns) fall into classes by which kernel rows (columns) land in
// the padding; class 0 is "none". An output's class is row_class * col_classes + col_class, and
// value[o * classes + class] is what the +1-padded dot of output channel o must lose there (channel-major: one
// channel's few values are adjacent, so a vector kernel loads them at once). col_class has out_w + kStripWidth
// entries (zeros past out_w).
struct ZeroPadCorrection {
  std::vector<int32_t> row_class, col_class, value;
  int64_t col_classes = 1, classes = 1;
};
ZeroPadCorrection zero_pad_correction(const ConvParams& p, const int32_t* tap_sum);
// The same, memoised: a call with the geometry and tap sums of a recent call (compared value by value, so a weight
// changed in place, or another weight at the same address, is never served a stale entry) shares its result.
// Thread-safe; keeps at most kZeroPadCacheEntries results (least recently used dropped first).
constexpr size_t kZeroPadCacheEntries = 64;
std::shared_ptr<const ZeroPadCorrection> cached_zero_pad_correction(const ConvParams& p, const int32_t* tap_sum);

// Strides (in elements) of an NCHW-indexed float tensor, any memory format.
struct TensorStrides {
  int64_t n, c, h, w;
};

// The fused output stage of the CPU families: the epilogue (epilogue.h; out, out_signs and residual NCHW
// contiguous, or NHWC with channels_last, which only families with channels_last_output honour) and the pad_value 0
// border correction it applies first.
struct OutputStage : EpilogueParams {
  const ZeroPadCorrection* zero_pad = nullptr;  // required for PadValue::Zero when any tap can be padded
  // Run the output stage that tests its steps per vector (Steps::kAny) whatever the call's fixed steps (in the
  // families built on kernel_common.h; AMX has an output stage of its own): the same bits, for test_core to check
  // that path with every step and for bench_core to time what fixed steps save.
  bool per_vector_steps = false;
};

// One CPU kernel family. Work is split into independent tasks so the caller owns threading (the torch layer uses
// at::parallel_for, which follows torch.get_num_threads()); run(begin, end) does tasks [begin, end).
struct FirstLayerRows;  // the float first layer's operands, below

struct KernelOps {
  const char* name;
  // Binarize + pack; every word of the layout is written (padding included). threshold: one per input channel, or
  // nullptr for 0.
  int64_t (*pack_tasks)(const ConvParams&, const ActivationLayout&);
  void (*pack)(const ConvParams&, const ActivationLayout&, const float* input, TensorStrides strides,
               const float* threshold, uint64_t* packed, int64_t begin, int64_t end);
  // The same for an input that is already binarized: bytes, nonzero meaning -1 (a sign output, or a torch.bool
  // tensor). Same tasks as pack.
  void (*pack_signs)(const ConvParams&, const ActivationLayout&, const uint8_t* input, TensorStrides strides,
                     uint64_t* packed, int64_t begin, int64_t end);
  int64_t (*conv_tasks)(const ConvParams&, const ActivationLayout&);
  void (*conv)(const ConvParams&, const ActivationLayout&, const uint64_t* packed_input,
               const uint64_t* packed_weight, const OutputStage&, int64_t begin, int64_t end);
  // Peak probe: the inner loop's instruction mix (XOR, popcount, accumulate) on registers only, for `iterations`
  // rounds; returns the binary MACs it performed. Timing it gives this family's ceiling on the running CPU, against
  // which the benchmark reports each kernel's fraction (the ceiling is measured, never assumed).
  uint64_t (*peak_probe)(int64_t iterations);
  // The family's activation layout: activation_layout() (the bit layout above) for the XNOR-popcount families;
  // the AMX family packs one int8 (+1 / -1 / 0) per value instead (see kernel_amx.cpp). pack, pack_signs and conv
  // take buffers of layout(p).total_words words.
  ActivationLayout (*layout)(const ConvParams&) = nullptr;
  // Families that read weights in their own format (made once per weight from pack_weights's bits): its size in
  // words, and the conversion. nullptr: conv reads the bits as they are.
  int64_t (*weight_format_words)(const ConvParams&) = nullptr;
  void (*format_weight)(const ConvParams&, const uint64_t* weight_bits, uint64_t* out) = nullptr;
  // True when pad_value 0 is computed exactly by the kernel itself: OutputStage::zero_pad is then not needed.
  bool exact_zero_padding = false;
  // True when conv honours OutputStage::channels_last (writes NHWC directly).
  bool channels_last_output = false;
  // Column folding (see folds_columns), nullptr where the family has none: writes tasks [begin, end) of
  // column_fold_tasks into `folded` (layout `to` of folded_params(p)) from `packed` (layout `from` of p).
  void (*fold_columns)(const ConvParams& p, const ActivationLayout& from, const uint64_t* packed,
                       const ActivationLayout& to, uint64_t* folded, int64_t begin, int64_t end) = nullptr;
  // The float first layer (first_layer.cpp): output rows [row_begin, row_end) of one image from its prepared input
  // rows, in blocks of first_layer_channels output channels; a block reads up to first_layer_pixels pixels along
  // the row (past the row's end, into the prepared rows' zeros). Every family has one.
  int first_layer_channels = 0, first_layer_pixels = 0;
  void (*first_layer_rows)(const FirstLayerRows& rows, int64_t row_begin, int64_t row_end) = nullptr;
  // The full 2x2 windows of one output row of real_shortcut's stride-2 NCHW pool (shortcut.cpp): for j < count,
  // y = ((top[2j] + bottom[2j]) + (top[2j + 1] + bottom[2j + 1])) * scale, stored to out[j], or added to it with
  // accumulate. nullptr: shortcut.cpp's portable loop (the same bits).
  void (*window_means)(const float* top, const float* bottom, float scale, bool accumulate, float* out,
                       int64_t count) = nullptr;
  // Window maxima (max_pools.cpp: SPPF's pools and max_pool2d): for e < count, out[e] = the maximum of
  // in[e + t * step] over taps t < k with PyTorch's rule (NaN propagates, as the quiet NaN), the same bits as
  // max_pools.cpp's portable loop, which a nullptr leaves in use.
  void (*window_max)(const float* in, float* out, int64_t count, int64_t step, int64_t k) = nullptr;
  // The windows of a row pooled with stride 2 (max_pool2d's NCHW rows, the stem pool's case): for e < count,
  // out[e] = the maximum of in[2 * e + t] over taps t < k with the same rule and bits, reading nothing at or past
  // in[2 * (count - 1) + k]. nullptr: max_pools.cpp splits the row by column phase and runs window_max on each.
  void (*stride2_window_max)(const float* in, float* out, int64_t count, int64_t k) = nullptr;
  // A whole NCHW output row of a max pool with 3-wide windows at column stride 2 (the stem pool's), from the input
  // rows its windows cover (rows[0 .. row_count), each `width` floats): for e < count, out[e] = the maximum over
  // those rows, then over columns 2e - pad + 0, 2, 1 (in that order), of the inputs, -inf outside [0, width), with
  // the same rule and bits as max_pools.cpp's column pass then stride2_window_max; then floored at zero (NaN and -0
  // kept) when relu. pad is 0 or 1; nothing outside the rows' `width` floats is read. nullptr: those passes.
  void (*stride2_width3_pool_row)(const float* const* rows, int64_t row_count, int64_t width, int64_t pad,
                                  float* out, int64_t count, bool relu) = nullptr;
};

// ---- column folding for thin inputs (fold.cpp) ----
// A thin input fills a fraction of each word it is packed into: a 3x3 layer over 16 channels uses 16 of 64 bits per
// tap, so three quarters of every XOR + popcount (every AMX multiply) is padding. The kernel_w taps of a kernel row
// read kernel_w columns of one padded input row; stored side by side in one pixel's channels they are one tap:
//   X'(r, ox)[k * C + c] = X(r, ox * stride_w + k * dilation_w)[c]   (padded row r, output column ox, C channels)
// and the convolution of X' with kernel kernel_h x 1 and stride (stride_h, 1), against the weight folded the same
// way, gives the same sums, padded taps included (they hold the pad bit, or AMX's pad byte). The pad_value 0
// correction stays the unfolded convolution's.
// Words a bit family reads per output and kernel row: kernel_w taps of ceil(C / 64) words unfolded, ceil(C *
// kernel_w / 64) folded (one group; the AMX selector weighs them too).
struct ColumnFoldWords {
  int64_t unfolded, folded;
};
inline ColumnFoldWords column_fold_words(const ConvParams& p) {
  return {p.kernel_w * words_for_channels(p.in_channels), words_for_channels(p.in_channels * p.kernel_w)};
}
// True when the family folds and folding saves at least a quarter of the words the kernel reads per output.
bool folds_columns(const KernelOps& ops, const ConvParams& p);
// The folded convolution: C * kernel_w channels, kernel (kernel_h, 1), stride (stride_h, 1), out_w input columns,
// no column padding; rows, output size and depth() are p's.
ConvParams folded_params(const ConvParams& p);
inline int64_t column_fold_tasks(const ConvParams& p, const ActivationLayout& from) { return p.batch * from.rows; }
// fold_columns of the bit-layout families (activation_layout on both sides).
void fold_bit_columns(const ConvParams& p, const ActivationLayout& from, const uint64_t* packed,
                      const ActivationLayout& to, uint64_t* folded, int64_t begin, int64_t end);
// pack_weights's bits of p, folded: bit k * C + c of row kh is bit c of tap (kh, k). weight_words(folded_params(p)).
void fold_weight_bits(const ConvParams& p, const uint64_t* bits, uint64_t* folded);

// 64-byte aligned storage, as the torch CPU allocator gives the op: AMX tile loads of rows that straddle cache
// lines run at half speed, so tests and benchmarks use this for packed buffers.
template <class T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* ptr, size_t) { ::operator delete(ptr, std::align_val_t(64)); }
  bool operator==(const CacheLineAllocator&) const { return true; }
  bool operator!=(const CacheLineAllocator&) const { return false; }
};
using WordBuffer = std::vector<uint64_t, CacheLineAllocator<uint64_t>>;

// The weight as ops.conv reads it for p itself: `bits`, or the family's own format made from them into `storage`.
const uint64_t* family_weight(const KernelOps& ops, const ConvParams& p, const uint64_t* bits, WordBuffer& storage);

// ---- kernel families (defined only where compiled; see select.cpp) ----
const KernelOps& scalar_kernel();
// The AMX family needs compiler support for its intrinsics (GCC 11, Clang 12); older compilers build without it.
#if (defined(__x86_64__) || defined(_M_X64)) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define XNORCONV_HAVE_AMX 1
#else
#define XNORCONV_HAVE_AMX 0
#endif

#if defined(__x86_64__) || defined(_M_X64)
const KernelOps& avx2_kernel();
const KernelOps& avx512_kernel();
#if XNORCONV_HAVE_AMX
const KernelOps& amx_kernel();
#endif
// Asks the OS for the AMX tile state (Linux: arch_prctl ARCH_REQ_XCOMP_PERM, once per process); false when the OS
// refuses or has no such request, and then AMX instructions must not run.
bool request_amx_permission();
#endif
#if defined(__aarch64__)
const KernelOps& neon_kernel();
#endif

struct CpuFeatures {
  bool avx2 = false, fma = false, popcnt = false, bmi2 = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, avx512vpopcntdq = false;
  bool amx_tile = false, amx_int8 = false;  // CPU and OS (XCR0) support; the process permission is separate
  bool neon = false;
  std::vector<std::string> names() const;
};
const CpuFeatures& cpu_features();  // detected once, cached

// Kernel families usable on this CPU, best first; always ends with "scalar".
std::vector<std::string> available_backends();
// Names of all families compiled into this build (usable or not).
std::vector<std::string> compiled_backends();

// The one selector. With no override, picks the best available family for p: the first in backends() order whose
// sweet spot includes p and the output layout (AMX takes windows of 2x2 or more over 16+ channels per group,
// strided ones from 64 channels and with NHWC output only, but not the thin inputs that folding shrinks to half the
// words or less; and, with NHWC output only, 1x1 layers below 1024 channels in and out: amx_suits in select.cpp).
// The override ("" = none) comes from set_backend_override() or, initially, the XNORCONV_BACKEND environment
// variable.
const KernelOps& select_kernel(const ConvParams& p, bool nhwc_output = false);
// The family that runs float work (the first layer): the override, else the best usable family.
const KernelOps& select_float_kernel();
// Returns an empty string on success, else an error naming the value and the available backends.
std::string set_backend_override(const std::string& name);
std::string backend_override();
// Non-empty when XNORCONV_BACKEND names a backend that is unknown or unusable here (then it is ignored).
std::string backend_environment_error();

// ---- the whole convolution: the one entry the torch binding, the C++ benchmark and the C++ tests call ----

// One call of the op as raw pointers, built once at the schema boundary (csrc/torch/ops.cpp) or by a C++ caller.
struct ConvCall {
  ConvParams params;
  const float* input = nullptr;          // float input, NCHW-indexed through `strides` (any memory format); or
  const uint8_t* input_signs = nullptr;  // an already binarized input: bytes, nonzero meaning -1
  TensorStrides strides{};
  const float* input_threshold = nullptr;  // [in_channels] or nullptr for 0; float input only
  const uint64_t* weight_bits = nullptr;   // pack_weights's layout
  const int32_t* weight_tap_sum = nullptr;  // pack_weights's tap sums; read for pad_value 0
  // The weight in the family's own format when the caller keeps it (the torch layer caches it per weight tensor);
  // nullptr: made from weight_bits for this call.
  const uint64_t* formatted_weight = nullptr;
  // Everything but zero_pad, which the convolution fills in (memoised) unless the caller did.
  OutputStage output;
};

// The caller's threading: body(begin, end) over ranges covering tasks [0, tasks), each at least `grain` tasks long
// (the last may be shorter). The torch layer passes at::parallel_for; run_serially is one call on this thread.
using TaskBody = std::function<void(int64_t begin, int64_t end)>;
using ParallelFor = std::function<void(int64_t tasks, int64_t grain, const TaskBody& body)>;
void run_serially(int64_t tasks, int64_t grain, const TaskBody& body);

// Words of packed input the family needs for these parameters (the buffer binary_conv2d and pack_input fill; a
// folded call packs into its second part, then folds into its first).
int64_t packed_input_words(const KernelOps& ops, const ConvParams& p);
// The weight as the op's convolution pass reads it (ConvCall::formatted_weight): folded when the call folds, then
// in the family's own format if it has one. conv_weight_words is 0 when that is pack_weights's bits as they are;
// conv_weight returns `bits` then, else makes the weight into `storage`. (The torch layer keeps it cached instead;
// see csrc/torch/ops.cpp.)
int64_t conv_weight_words(const KernelOps& ops, const ConvParams& p);
void make_conv_weight(const KernelOps& ops, const ConvParams& p, const uint64_t* bits, uint64_t* out);
const uint64_t* conv_weight(const KernelOps& ops, const ConvParams& p, const uint64_t* bits, WordBuffer& storage);

// The op: binarize and pack the input into `packed_input` (packed_input_words of them, 64-byte aligned for AMX),
// then the convolution pass with the fused output stage. Nothing is written for batch 0.
void binary_conv2d(const KernelOps& ops, const ConvCall& call, uint64_t* packed_input, const ParallelFor& parallel_for);
// Its two passes, for benchmarks that time them apart.
void pack_input(const KernelOps& ops, const ConvCall& call, uint64_t* packed_input, const ParallelFor& parallel_for);
void convolve_packed(const KernelOps& ops, const ConvCall& call, const uint64_t* packed_input,
                     const ParallelFor& parallel_for);

// ---- elementwise passes of the straight-through training path (training.cpp) ----
// A float tensor seen as [outer][channels][inner], contiguous: NCHW is (N, C, H*W), NHWC is (N*H*W, C, 1).
struct ChannelView {
  int64_t outer = 0, channels = 0, inner = 0;
};

// The surrogate whose derivative the input gradient takes (xnorconv/_autograd.py's module docstring).
enum class SteKind { clipped, identity, approx };

// v describes x; the other operands share its layout, except that, for an NCHW x (v = (N, C, H*W)), out_nhwc and
// grad_nhwc put that operand in NHWC instead: the pass then converts the layout on the way.
// Sums are added per fixed block of the tensor and then in block order: the same result on any number of threads.

// out = +1 where x >= threshold[c] (threshold nullptr: 0), else -1: the packed kernel's sign rule, as floats.
void binary_signs(ChannelView v, const float* x, const float* threshold, float* out, bool out_nhwc,
                  const ParallelFor& parallel_for);

// grad_x = grad * s'(d), d = x - threshold[c] (threshold nullptr: d = x), with s' 1{|d| <= 1} (clipped),
// 1{d finite} (identity) or max(2 - 2|d|, 0) (approx), 0 for NaN d; and, unless threshold_sums is nullptr,
// threshold_sums[c] = the sum of channel c's grad_x (the threshold's gradient is its negation).
void ste_input_grad(ChannelView v, SteKind ste, const float* grad, bool grad_nhwc, const float* x,
                    const float* threshold, float* grad_x, float* threshold_sums, const ParallelFor& parallel_for);

// PReLU's backward: grad_z = grad where z > 0, else weight[c] * grad; unless weight_sums is nullptr, weight_sums[c]
// = the sum of channel c's z * grad where z <= 0 (or NaN). shared_weight: one weight for all channels, and one sum.
void prelu_backward(ChannelView v, bool shared_weight, const float* grad, const float* z, const float* weight,
                    float* grad_z, float* weight_sums, const ParallelFor& parallel_for);

// The tail of a Bi-Real / ReActNet / BinaryDNet53 unit in training, out = PReLU(BatchNorm(x) + residual), in two
// passes over memory each way where eager PyTorch makes about eight:
// mean[c] and var[c] (biased) of channel c of x; NaN for an empty channel.
void channel_moments(ChannelView v, const float* x, float* mean, float* var, const ParallelFor& parallel_for);

// z = (x - mean[c]) * bn_weight[c] * invstd[c] + bn_bias[c] (+ residual, unless nullptr): BatchNorm with mean and
// invstd = 1 / sqrt(var + eps); out = z where z > 0, else prelu_weight[c] * z (shared_weight: prelu_weight[0]).
void batch_norm_add_prelu(ChannelView v, const float* x, const float* mean, const float* invstd,
                          const float* bn_weight, const float* bn_bias, const float* residual, bool shared_weight,
                          const float* prelu_weight, float* z, float* out, const ParallelFor& parallel_for);

// The gradients of out = PReLU(BatchNorm(x) + residual) from grad = dL/dout and the forward's z, mean and invstd
// (per channel; batch_stats: BatchNorm normalised with these statistics of x itself, so they depend on x, as in
// training; else they are constants, the running ones): grad_x, grad_z (= dL/dz, the residual's gradient too),
// grad_bn_weight[c], grad_bn_bias[c], and PReLU's grad_prelu_weight (one value when shared_weight).
void batch_norm_add_prelu_backward(ChannelView v, bool batch_stats, const float* grad, const float* z,
                                   const float* x, const float* mean, const float* invstd, const float* bn_weight,
                                   bool shared_weight, const float* prelu_weight, float* grad_x, float* grad_z,
                                   float* grad_bn_weight, float* grad_bn_bias, float* grad_prelu_weight,
                                   const ParallelFor& parallel_for);

// ---- the real-valued shortcut of Bi-Real / ReActNet / BinaryDNet53 units (shortcut.cpp) ----
// x is (batch, in_channels, height, width), NCHW or NHWC (nhwc), and out the same layout with out_channels and
// ceil(height / stride) x ceil(width / stride) pixels. out[o] at pixel (i, j) is the mean of x over the input
// channels [floor(o * C / O), ceil((o + 1) * C / O)) (C = in_channels, O = out_channels) when O <= C, or channel
// floor(o * C / O) when O > C, and over the stride x stride window from (i * stride, j * stride), clipped to the
// image: average pooling without padding in ceil mode, then adaptive average pooling along the channels (a k-to-1
// mean when C = k * O, each channel repeated k times when O = k * C). stride is 1 or 2. One pass over x and out.
struct ShortcutShape {
  int64_t batch = 0, in_channels = 0, height = 0, width = 0, out_channels = 0, stride = 1;
  bool nhwc = false;
};
void real_shortcut(const ShortcutShape& s, const float* x, float* out, const ParallelFor& parallel_for);
// The same with a given family's window_means (real_shortcut uses select_float_kernel()'s); every family gives the
// same bits.
void real_shortcut(const KernelOps& ops, const ShortcutShape& s, const float* x, float* out,
                   const ParallelFor& parallel_for);

// ---- SPPF's chained max pools (max_pools.cpp) ----
// x is (batch, channels, height, width), NCHW or NHWC (nhwc); out is (batch, (pools + 1) * channels, height, width)
// in the same layout, the concatenation SPPF's last conv reads: channels [0, C) are x, and channels [p * C, (p + 1) *
// C) the kernel x kernel max pool (stride 1, padding kernel / 2, odd kernel) of channels [(p - 1) * C, p * C). Each
// pool runs as a 1 x kernel then a kernel x 1 pool, windows scanned in index order with PyTorch's rule (a value
// replaces the maximum if greater, or if NaN): the same bits as F.max_pool2d through those two separable pools.
struct ChainedPoolShape {
  int64_t batch = 0, channels = 0, height = 0, width = 0, kernel = 5, pools = 3;
  bool nhwc = false;
};
void chained_max_pools(const ChainedPoolShape& s, const float* x, float* out, const ParallelFor& parallel_for);
// The same with a given family's window_max (chained_max_pools uses select_float_kernel()'s); the same bits.
void chained_max_pools(const KernelOps& ops, const ChainedPoolShape& s, const float* x, float* out,
                       const ParallelFor& parallel_for);

// ---- max pooling (max_pools.cpp): F.max_pool2d with dilation 1, and relu(F.max_pool2d(x)) in the same pass ----
// The stem pool of ResNet-style networks (3x3, stride 2, padding 1 over the stem's output): PyTorch's CPU kernel
// keeps an index per output and is many times slower on NCHW maps. Windows ignore the padding and follow PyTorch's
// output size (ceil_mode included: a last window that starts in the right padding is dropped). A window's maximum
// is taken as v > m ? v : m and is the quiet NaN when any tap is NaN: the same values as F.max_pool2d, NaN
// included (signed zeros aside, which compare equal). relu floors the result at 0 (NaN stays NaN): a max
// commutes with a ReLU, so this is relu(max_pool2d(x)) = max_pool2d(relu(x)) without a pass of its own.
// x and out are NCHW, or NHWC when nhwc.
struct MaxPoolShape {
  int64_t batch = 0, channels = 0, height = 0, width = 0;
  int64_t kernel_h = 1, kernel_w = 1, stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0;
  bool ceil_mode = false, relu = false, nhwc = false;
  int64_t out_height() const;
  int64_t out_width() const;
};
// Empty when s describes a valid pool, else a message naming the argument and its value.
std::string validate(const MaxPoolShape& s);
void max_pool2d(const MaxPoolShape& s, const float* x, float* out, const ParallelFor& parallel_for);
// The same with a given family's window_max (max_pool2d uses select_float_kernel()'s); the same bits.
void max_pool2d(const KernelOps& ops, const MaxPoolShape& s, const float* x, float* out,
                const ParallelFor& parallel_for);

// ---- an int8 layer's output to float32, through its max pool (max_pools.cpp) ----
// PyTorch's int8 convolution writes an NHWC map of uint8 levels, level q standing for scale * (q - zero_point). The
// float map is max_pool2d of those values, computed as the dequantization of max_pool2d(levels) (dequantization
// increases with the level): the pool on the bytes, then one conversion per output, written NCHW, or NHWC when
// s.nhwc (levels are always NHWC). A 1x1 window at stride 1 is the dequantization alone, in either layout. The
// same values as PyTorch's quantized max pool then dequantize (a product of two floats rounded once); s.relu floors
// them at 0. scale must be positive (a finite float) and zero_point in [0, 255]; windows and output size as
// max_pool2d (validate(MaxPoolShape)).
void dequantize_max_pool2d(const MaxPoolShape& s, const uint8_t* levels, float scale, int32_t zero_point, float* out,
                           const ParallelFor& parallel_for);

// ---- the float first layer of a binary network (first_layer.cpp) ----
// Once its binary convolutions are packed, a binary network's float stem (a convolution over the 3 channels of the
// image, often followed by BatchNorm and PReLU / ReLU) is among its largest costs, and general float convolutions
// are slow on so few input channels. This one vectorises along the output row: each vector of output pixels of one
// row is a register-blocked sum of kernel_h x kernel_w x in_channels unaligned loads times broadcast weights, from
// zero-padded copies of the input rows split by column phase (like the packed activations: for any stride, the
// inputs of consecutive output pixels are consecutive), with the bias and the activation applied once.
//   out[n][o][y][x] = act_o(bias[o] + sum_{c, i, j} weight[o][c][i][j] * in[n][c][y*sh - ph + i*dh][x*sw - pw + j*dw])
//   act_o(v) = v >= 0 ? v : slope[o] * v (PReLU; slope nullptr: the identity), taps outside the image are 0.
// x and out are NCHW, or NHWC when channels_last; weight is [O][C][kh][kw] contiguous; bias and slope nullptr or O
// values. Float rounding differs from other convolutions' only in the order of the additions.
struct FirstLayerShape {
  int64_t batch = 0, in_channels = 0, height = 0, width = 0, out_channels = 0;
  int64_t kernel_h = 1, kernel_w = 1, stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dilation_h = 1,
          dilation_w = 1;
  bool channels_last = false;
  int64_t out_height() const { return (height + 2 * pad_h - dilation_h * (kernel_h - 1) - 1) / stride_h + 1; }
  int64_t out_width() const { return (width + 2 * pad_w - dilation_w * (kernel_w - 1) - 1) / stride_w + 1; }
};
// Empty when s describes a valid first layer, else a message naming the argument and its value.
std::string validate(const FirstLayerShape& s);
// pool: the max pool of the layer's output (a stem's conv -> activation -> max pool), or nullptr. Its batch,
// channels, height, width and layout are the layer's output's, and out then holds the pooled output: the layer
// keeps a few rows of its own output per thread and pools them as it goes, so its output never goes through memory.
// threads: how many threads parallel_for runs on; with a pool an image is split into at most that many bands of
// rows, since each band computes again the rows of the layer's output that it shares with the next.
// pool_group_rows: the pooled rows whose input rows a band computes at a time (0: as many as fit a buffer of a few
// hundred KB; tests set it small, so that the rows groups share are carried over more often).
struct FirstLayerCall {
  FirstLayerShape shape;
  const float *input = nullptr, *weight = nullptr, *bias = nullptr, *slope = nullptr;
  float* out = nullptr;
  const MaxPoolShape* pool = nullptr;
  int64_t threads = 1, pool_group_rows = 0;
};
// What a family's first_layer_rows reads: the call, its weights, bias and slopes regrouped in blocks of the
// family's channels (zero past out_channels), and one image's input rows from row_begin * stride_h - pad_h on,
// zero-padded and split by column phase: rows[((c * row_count + r) * stride_w + phase) * row_width + j] is input
// column j * stride_w + phase - pad_w of that row (0 outside the image). Output row row_begin + y goes to `out`:
// channel o's pixel x at out[(o * out_rows + y) * out_width + x] (NCHW, out_rows rows per channel plane) or
// out[(y * out_width + x) * out_channels + o] (NHWC): the image's output from row row_begin, or a pool's band.
struct FirstLayerRows {
  const FirstLayerCall* call = nullptr;
  const float *weight = nullptr, *bias = nullptr, *slope = nullptr;  // [block][c][i][j][channels], [block][channels]
  const float* rows = nullptr;
  int64_t row_count = 0, row_width = 0;
  float* out = nullptr;
  int64_t out_rows = 0;
};
// Empty when pool can follow a layer of shape s (its input is the layer's output, and it is valid), else a message.
std::string validate_pool(const FirstLayerShape& s, const MaxPoolShape& pool);
// The layer on the given family (select_float_kernel() picks one).
void first_layer_conv(const KernelOps& ops, const FirstLayerCall& call, const ParallelFor& parallel_for);

// A usable kernel family by name, leaving the process-wide choice (set_backend_override) alone: for tests and
// benchmarks that run each family in turn. nullptr, with the reason in *error, for an unknown or unusable name.
const KernelOps* find_backend(const std::string& name, std::string* error = nullptr);

// The whole op from float weights, on this thread: for the C++ tests and benchmarks (no torch there).
// input is NCHW-indexed with the given strides; out is NCHW contiguous.
void binary_conv2d_serial(const KernelOps& ops, const ConvParams& p, const float* input, TensorStrides strides,
                          const float* weight, const float* scale, const float* bias, float* out,
                          const float* threshold = nullptr);

}  // namespace xnorconv
