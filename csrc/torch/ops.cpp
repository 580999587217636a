// Torch binding of the kernel core: op schemas, CPU implementations, argument checks with clear messages.
// The only C++ (with module.cpp and the CUDA glue) that includes torch headers.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <list>
#include <mutex>

#include "xnorconv_core.h"
#include "ops.h"

namespace xnorconv_torch {

using xnorconv::ConvParams;
using xnorconv::PadValue;

namespace {

void check_affine(const c10::optional<at::Tensor>& t, const char* name, int64_t out_channels, const at::Tensor& input) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == out_channels, "binary_conv2d: ", name, " must have shape (",
              out_channels, ",) (one value per output channel), got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kFloat, "binary_conv2d: ", name, " must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->device() == input.device(), "binary_conv2d: ", name, " is on ", t->device(), " but input is on ",
              input.device());
}

}  // namespace

void check_input_threshold(const c10::optional<at::Tensor>& t, const at::Tensor& input) {
  if (!t.has_value()) return;
  TORCH_CHECK(input.scalar_type() != at::kBool,
              "binary_conv2d: input_threshold applies to float input; this input is bool (already binarized)");
  TORCH_CHECK(t->dim() == 1 && t->size(0) == input.size(1), "binary_conv2d: input_threshold must have shape (",
              input.size(1), ",) (one value per input channel), got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kFloat, "binary_conv2d: input_threshold must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->device() == input.device(), "binary_conv2d: input_threshold is on ", t->device(),
              " but input is on ", input.device());
}

void check_output_threshold(const c10::optional<at::Tensor>& t, bool output_signs, int64_t out_channels,
                            const at::Tensor& input) {
  if (!t.has_value()) return;
  TORCH_CHECK(output_signs, "binary_conv2d: output_threshold is only used with output_signs=True");
  TORCH_CHECK(t->dim() == 1 && t->size(0) == out_channels, "binary_conv2d: output_threshold must have shape (",
              out_channels, ",) (one value per output channel), got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kFloat, "binary_conv2d: output_threshold must be float32, got ",
              t->scalar_type());
  TORCH_CHECK(t->device() == input.device(), "binary_conv2d: output_threshold is on ", t->device(),
              " but input is on ", input.device());
}

void check_unit_epilogue(const PackedConvArgs& args, const ConvParams& p) {
  const at::Tensor& input = args.input;
  const c10::optional<at::Tensor> &residual = args.residual, &prelu_weight = args.prelu_weight;
  if (args.input_shortcut) {
    TORCH_CHECK(!residual.has_value(), "binary_conv2d: residual and input_shortcut=True both add a shortcut; pass one");
    TORCH_CHECK(input.scalar_type() == at::kFloat, "binary_conv2d: input_shortcut=True needs the float32 input it "
                "averages, got ", input.scalar_type(), " (a sign input has no real values)");
    TORCH_CHECK(p.stride_h == p.stride_w && (p.stride_h == 1 || p.stride_h == 2),
                "binary_conv2d: input_shortcut=True needs stride 1 or 2, the same on both axes (its window), got (",
                p.stride_h, ", ", p.stride_w, ")");
    const int64_t s = p.stride_h, sh = (p.in_h + s - 1) / s, sw = (p.in_w + s - 1) / s;
    TORCH_CHECK(sh == p.out_h() && sw == p.out_w(), "binary_conv2d: input_shortcut=True needs the output size to be "
                "the input's over the stride, rounded up (", sh, "x", sw, "), got ", p.out_h(), "x", p.out_w(),
                " (input ", input.sizes(), ")");
  }
  if (residual.has_value()) {
    const std::vector<int64_t> shape{p.batch, p.out_channels, p.out_h(), p.out_w()};
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(shape), "binary_conv2d: residual must have the output's shape ",
                at::IntArrayRef(shape), ", got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == at::kFloat, "binary_conv2d: residual must be float32, got ",
                residual->scalar_type());
    TORCH_CHECK(residual->device() == input.device(), "binary_conv2d: residual is on ", residual->device(),
                " but input is on ", input.device());
  }
  if (prelu_weight.has_value()) {
    const int64_t n = prelu_weight->numel();
    TORCH_CHECK(prelu_weight->dim() == 1 && (n == 1 || n == p.out_channels),
                "binary_conv2d: prelu_weight must have shape (", p.out_channels, ",) or (1,), got ",
                prelu_weight->sizes());
    TORCH_CHECK(prelu_weight->scalar_type() == at::kFloat, "binary_conv2d: prelu_weight must be float32, got ",
                prelu_weight->scalar_type());
    TORCH_CHECK(prelu_weight->device() == input.device(), "binary_conv2d: prelu_weight is on ",
                prelu_weight->device(), " but input is on ", input.device());
  }
}

bool check_out_tensor(const PackedConvArgs& args, at::IntArrayRef sizes, at::MemoryFormat format) {
  const at::Tensor& out = *args.out;
  const at::ScalarType dtype = args.output_signs ? at::kBool : at::kFloat;
  TORCH_CHECK(out.sizes() == sizes, "binary_conv2d: out must have the output's shape ", sizes, ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == dtype, "binary_conv2d: out must be ", dtype,
              args.output_signs ? " (output_signs=True)" : "", ", got ", out.scalar_type());
  TORCH_CHECK(out.device() == args.input.device(), "binary_conv2d: out is on ", out.device(), " but input is on ",
              args.input.device());
  auto shares_memory = [&](const at::Tensor& t) {
    const at::MemOverlapStatus status = at::get_overlap_status(out, t);
    return status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial;
  };
  TORCH_CHECK(!shares_memory(args.input), "binary_conv2d: out shares memory with input, which the op still reads "
              "while it writes out; pass a separate tensor");
  TORCH_CHECK(!args.residual.has_value() || !shares_memory(*args.residual), "binary_conv2d: out shares memory with "
              "residual; pass a separate tensor (input_shortcut=True adds a shortcut without one)");
  return out.is_contiguous(format);
}

void torch_parallel_for(int64_t tasks, int64_t grain, const xnorconv::TaskBody& body) {
  at::parallel_for(0, tasks, grain, body);
}

ConvParams conv_params(const PackedConvArgs& args) {
  const at::Tensor &input = args.input, &weight_bits = args.weight_bits, &weight_tap_sum = args.weight_tap_sum;
  const at::IntArrayRef stride = args.stride, padding = args.padding, dilation = args.dilation;
  const int64_t groups = args.groups, pad_value = args.pad_value, weight_in_channels = args.weight_in_channels;
  TORCH_CHECK(input.dim() == 4, "binary_conv2d: input must be 4-D (N, C, H, W), got a ", input.dim(),
              "-D tensor of shape ", input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kBool,
              "binary_conv2d: input must be float32 (binarized by the op) or bool (already binarized: True means -1), "
              "got ", input.scalar_type());
  TORCH_CHECK(weight_bits.dim() == 4 && weight_bits.scalar_type() == at::kLong,
              "binary_conv2d: weight_bits must be the int64 (O, kh, kw, words) tensor from pack_weight, got ",
              weight_bits.scalar_type(), " of shape ", weight_bits.sizes());
  TORCH_CHECK(weight_tap_sum.dim() == 3 && weight_tap_sum.scalar_type() == at::kInt &&
                  weight_tap_sum.sizes() == weight_bits.sizes().slice(0, 3),
              "binary_conv2d: weight_tap_sum must be the int32 (O, kh, kw) tensor from pack_weight, got ",
              weight_tap_sum.scalar_type(), " of shape ", weight_tap_sum.sizes());
  TORCH_CHECK(weight_bits.device() == input.device() && weight_tap_sum.device() == input.device(),
              "binary_conv2d: packed weight is on ", weight_bits.device(), " but input is on ", input.device());
  TORCH_CHECK(stride.size() == 2, "binary_conv2d: stride must have 2 values, got ", stride);
  TORCH_CHECK(dilation.size() == 2, "binary_conv2d: dilation must have 2 values, got ", dilation);
  TORCH_CHECK(padding.size() == 4, "binary_conv2d: padding must have 4 values (top, bottom, left, right), got ", padding);
  TORCH_CHECK(pad_value == 0 || pad_value == 1 || pad_value == -1, "binary_conv2d: pad_value must be 0, 1 or -1, got ",
              pad_value);
  TORCH_CHECK(groups >= 1, "binary_conv2d: groups must be >= 1, got ", groups);
  TORCH_CHECK(weight_in_channels >= 1 &&
                  xnorconv::words_for_channels(weight_in_channels) == weight_bits.size(3),
              "binary_conv2d: weight_in_channels (", weight_in_channels, ") does not match the packed weight's ",
              weight_bits.size(3), " words per tap");
  TORCH_CHECK(input.size(1) == weight_in_channels * groups, "binary_conv2d: input has ", input.size(1),
              " channels but the weight expects ", weight_in_channels * groups, " (", weight_in_channels,
              " per group x groups=", groups, ")");
  const int64_t out_channels = weight_bits.size(0);
  TORCH_CHECK(out_channels % groups == 0, "binary_conv2d: weight has ", out_channels,
              " output channels, not divisible by groups=", groups);
  check_affine(args.scale, "scale", out_channels, input);
  check_affine(args.bias, "bias", out_channels, input);
  check_input_threshold(args.input_threshold, input);
  check_output_threshold(args.output_threshold, args.output_signs, out_channels, input);

  ConvParams p;
  p.batch = input.size(0);
  p.in_channels = input.size(1);
  p.in_h = input.size(2);
  p.in_w = input.size(3);
  p.out_channels = out_channels;
  p.groups = groups;
  p.kernel_h = weight_bits.size(1);
  p.kernel_w = weight_bits.size(2);
  p.stride_h = stride[0];
  p.stride_w = stride[1];
  p.pad_top = padding[0];
  p.pad_bottom = padding[1];
  p.pad_left = padding[2];
  p.pad_right = padding[3];
  p.dilation_h = dilation[0];
  p.dilation_w = dilation[1];
  p.pad_value = static_cast<PadValue>(pad_value);
  const std::string err = xnorconv::validate(p);
  TORCH_CHECK(err.empty(), "binary_conv2d: ", err, " (input shape ", input.sizes(), ")");
  check_unit_epilogue(args, p);
  return p;
}

Epilogue make_epilogue(const at::Tensor& out, bool nhwc, const PackedConvArgs& args) {
  auto contiguous = [](const c10::optional<at::Tensor>& t) { return t.has_value() ? t->contiguous() : at::Tensor(); };
  auto data = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
  Epilogue e;
  e.scale = contiguous(args.scale);
  e.bias = contiguous(args.bias);
  e.out_threshold = contiguous(args.output_threshold);
  if (args.residual.has_value())
    e.residual = args.residual->contiguous(nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (args.prelu_weight.has_value()) {
    // A per-channel weight is read where it is (an expand would make a new view on every call); one shared slope
    // is spread over the channels.
    const at::Tensor& slopes = *args.prelu_weight;
    e.prelu = slopes.numel() == out.size(1) ? slopes.contiguous() : slopes.expand({out.size(1)}).contiguous();
  }
  xnorconv::EpilogueParams& p = e.params;
  p.scale = data(e.scale);
  p.bias = data(e.bias);
  p.residual = data(e.residual);
  p.prelu = data(e.prelu);
  if (args.output_signs) {
    p.out_signs = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
    p.out_threshold = data(e.out_threshold);
  } else {
    p.out = out.data_ptr<float>();
  }
  p.channels_last = nhwc ? 1 : 0;
  return e;
}

namespace {

// Weights as the convolution pass reads them when that is not the packed bits themselves (folded for thin inputs,
// or in a family's own format: the AMX tiles), made from a packed weight once and reused while that tensor lives
// unchanged. The key holds the weight_bits tensor weakly (so its address cannot be reused while the entry
// exists) with its version counter, which every in-place write through torch (copy_, load_state_dict, optimizer
// steps) bumps, and a fingerprint of 64 words spread over the tensor, which also catches a rewrite behind torch's
// back (a numpy view); an edit of a few words that way goes unseen, as it does for autograd.
class FormattedWeightCache {
 public:
  static uint64_t fingerprint(const at::Tensor& bits) {
    const auto* w = reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>());
    const int64_t n = bits.numel();
    uint64_t h = 0x9E3779B97F4A7C15ull;
    for (int64_t i = 0; i < 64; ++i) h = (h ^ w[i * (n - 1) / 63]) * 0x100000001B3ull;
    return h;
  }

  at::Tensor get(const xnorconv::KernelOps& ops, const ConvParams& p, const at::Tensor& bits_in) {
    const int64_t words = xnorconv::conv_weight_words(ops, p);
    const at::Tensor bits = bits_in.contiguous();
    // A tensor made under torch.inference_mode has no version counter (reading it throws): its entries rely on the
    // fingerprint alone, like a rewrite behind torch's back.
    const int64_t version = bits_in.is_inference() ? -1 : static_cast<int64_t>(bits_in._version());
    const uint64_t print = fingerprint(bits);
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end();) {
      if (it->owner.expired()) {
        it = entries_.erase(it);
        continue;
      }
      if (it->owner._unsafe_get_target() == bits_in.unsafeGetTensorImpl() && it->version == version &&
          it->fingerprint == print && it->ops == &ops && it->groups == p.groups &&
          it->in_channels == p.in_channels && it->formatted.numel() == words && it->data == bits_in.data_ptr()) {
        entries_.splice(entries_.begin(), entries_, it);  // most recently used first
        return it->formatted;
      }
      ++it;
    }
    at::Tensor formatted = at::empty({words}, bits.options());
    xnorconv::make_conv_weight(ops, p, reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>()),
                               reinterpret_cast<uint64_t*>(formatted.data_ptr<int64_t>()));
    entries_.push_front({c10::weak_intrusive_ptr<c10::TensorImpl>(bits_in.getIntrusivePtr()), version, print,
                         bits_in.data_ptr(), &ops, p.groups, p.in_channels, formatted});
    if (entries_.size() > kMaxEntries) entries_.pop_back();
    return formatted;
  }

 private:
  struct Entry {
    c10::weak_intrusive_ptr<c10::TensorImpl> owner;
    int64_t version;
    uint64_t fingerprint;
    const void* data;
    const xnorconv::KernelOps* ops;
    int64_t groups, in_channels;
    at::Tensor formatted;
  };
  // Enough for every layer of a large network; entries of freed weights are dropped as soon as they are seen.
  static constexpr size_t kMaxEntries = 512;
  std::mutex mutex_;
  std::list<Entry> entries_;
};

FormattedWeightCache& formatted_weights() {
  static FormattedWeightCache cache;
  return cache;
}

std::tuple<at::Tensor, at::Tensor> pack_weight_cpu(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 4, "pack_weight: weight must be 4-D (O, C/groups, kh, kw), got a ", weight.dim(),
              "-D tensor of shape ", weight.sizes());
  TORCH_CHECK(weight.is_floating_point(), "pack_weight: weight must be a floating-point tensor, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.numel() > 0, "pack_weight: weight must not be empty, got shape ", weight.sizes());
  TORCH_CHECK(weight.size(2) * weight.size(3) <= xnorconv::kMaxTaps, "pack_weight: kernel size (", weight.size(2), ", ",
              weight.size(3), ") has more than ", xnorconv::kMaxTaps, " taps");
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  ConvParams p;
  p.in_channels = w.size(1);
  p.out_channels = w.size(0);
  p.kernel_h = w.size(2);
  p.kernel_w = w.size(3);
  const int64_t words = xnorconv::words_for_channels(p.in_channels);
  at::Tensor bits = at::empty({p.out_channels, p.kernel_h, p.kernel_w, words}, w.options().dtype(at::kLong));
  at::Tensor tap_sum = at::empty({p.out_channels, p.kernel_h, p.kernel_w}, w.options().dtype(at::kInt));
  xnorconv::pack_weights(p, w.data_ptr<float>(), reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>()),
                         tap_sum.data_ptr<int32_t>());
  return {bits, tap_sum};
}

// The packed input lives for one call. Each calling thread keeps one buffer, grown to the largest call up to
// kKeptPackedWords and reused, so that a network's layers do not allocate one each (which, above glibc's mmap
// threshold, the kernel then faults in again on every call); larger calls allocate their own.
constexpr int64_t kKeptPackedWords = int64_t{1} << 20;  // 8 MiB

uint64_t* packed_input_buffer(int64_t words, at::Tensor& own) {
  if (words > kKeptPackedWords) {
    own = at::empty({words}, at::TensorOptions().dtype(at::kLong));
    return reinterpret_cast<uint64_t*>(own.data_ptr<int64_t>());
  }
  thread_local xnorconv::WordBuffer kept;
  if (static_cast<int64_t>(kept.size()) < words) kept.resize(static_cast<size_t>(words));
  return kept.data();
}

// input_shortcut: the output stage adds real_shortcut(input). A stride-1 shortcut reads the input where it is: the
// identity at the output's own elements, and with NCHW output any other channel mapping too, which the output stage
// then computes from the input's channels (EpilogueParams::residual_channels). The others (stride 2, or NHWC output
// with other channels) run real_shortcut into the output itself, for a float output: every family reads an
// element's residual in the vector that then stores that element, so the output stage accumulates onto the
// shortcut (GEMM's beta = 1) with no buffer of its own. A sign output gets a float buffer, held by `holder`.
// (A widening stride-2 shortcut's window means over the input's C channels, in a buffer of their own and mapped in
// the output stage, measured slower than this pass over the output's O channels.)
void add_input_shortcut(const ConvParams& p, const at::Tensor& input, const at::Tensor& out, bool nhwc,
                        xnorconv::EpilogueParams& epilogue, at::Tensor& holder) {
  const at::MemoryFormat format = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = input.contiguous(format);
  if (p.stride_h == 1 && (p.out_channels == p.in_channels || !nhwc)) {
    holder = x;
    epilogue.residual = x.data_ptr<float>();
    epilogue.residual_channels = p.out_channels == p.in_channels ? 0 : p.in_channels;
    return;
  }
  holder = out.scalar_type() == at::kFloat
               ? out
               : at::empty(out.sizes(), out.options().dtype(at::kFloat).memory_format(format));
  const xnorconv::ShortcutShape shape{p.batch, p.in_channels, p.in_h, p.in_w, p.out_channels, p.stride_h, nhwc};
  xnorconv::real_shortcut(shape, x.data_ptr<float>(), holder.data_ptr<float>(), torch_parallel_for);
  epilogue.residual = holder.data_ptr<float>();
}

at::Tensor binary_conv2d_packed_cpu(const PackedConvArgs& args) {
  const ConvParams p = conv_params(args);
  const at::Tensor& input = args.input;
  const bool sign_input = input.scalar_type() == at::kBool;
  // Written as NHWC by families that can, else converted at the end.
  const bool channels_last = wants_channels_last_output(input);
  const xnorconv::KernelOps& ops = xnorconv::select_kernel(p, channels_last);
  const bool write_nhwc = channels_last && ops.channels_last_output;
  const at::MemoryFormat format = write_nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const std::vector<int64_t> sizes{p.batch, p.out_channels, p.out_h(), p.out_w()};
  // The .out overload writes its destination directly when the kernels can (a channel slice of a batch-1
  // concatenation, say); else it computes apart and copies in.
  const bool into_destination = args.out && check_out_tensor(args, sizes, format);
  at::Tensor out = into_destination
                       ? *args.out
                       : at::empty(sizes, input.options()
                                              .dtype(args.output_signs ? at::kBool : at::kFloat)
                                              .memory_format(format));
  auto finished = [&](const at::Tensor& result) {
    if (!args.out) return result;
    if (!into_destination) args.out->copy_(result);
    return *args.out;
  };
  if (p.batch == 0) return finished(channels_last ? out.contiguous(at::MemoryFormat::ChannelsLast) : out);
  // Contiguous copies (usually the tensors themselves) that the raw pointers below point into; they live to the end
  // of the call.
  const at::Tensor threshold = args.input_threshold.has_value() ? args.input_threshold->contiguous() : at::Tensor();
  const at::Tensor bits = args.weight_bits.contiguous(), tap_sum = args.weight_tap_sum.contiguous();
  const at::Tensor formatted =
      xnorconv::conv_weight_words(ops, p) ? formatted_weights().get(ops, p, args.weight_bits) : at::Tensor();
  Epilogue epilogue = make_epilogue(out, write_nhwc, args);
  at::Tensor shortcut;
  if (args.input_shortcut) add_input_shortcut(p, input, out, write_nhwc, epilogue.params, shortcut);

  xnorconv::ConvCall call;
  call.params = p;
  if (sign_input)
    call.input_signs = reinterpret_cast<const uint8_t*>(input.data_ptr<bool>());
  else
    call.input = input.data_ptr<float>();
  call.strides = {input.stride(0), input.stride(1), input.stride(2), input.stride(3)};
  call.input_threshold = threshold.defined() ? threshold.data_ptr<float>() : nullptr;
  call.weight_bits = reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>());
  call.weight_tap_sum = tap_sum.data_ptr<int32_t>();
  call.formatted_weight = formatted.defined() ? reinterpret_cast<const uint64_t*>(formatted.data_ptr<int64_t>())
                                              : nullptr;
  static_cast<xnorconv::EpilogueParams&>(call.output) = epilogue.params;

  at::Tensor own_packed;
  xnorconv::binary_conv2d(ops, call, packed_input_buffer(xnorconv::packed_input_words(ops, p), own_packed),
                          torch_parallel_for);
  return finished(channels_last && !write_nhwc ? out.contiguous(at::MemoryFormat::ChannelsLast) : out);
}

// The op has no derivative: training runs BinaryConv2d's straight-through path instead. Registered on the Autograd
// key, for two reasons. A call that autograd records fails at backward with a message that says so; PyTorch's
// fallback for ops without an autograd kernel gives a deprecation warning and no gradient. And the usual call, which
// records nothing, does not go through that fallback, which boxes every argument: a cost per call that a
// one-pixel layer notices (inference_mode, which skips the fallback too, is the comparison).
at::Tensor call_below_autograd(const PackedConvArgs& args) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("xnorconv::binary_conv2d_packed", "")
                             .typed<PackedConvSignature>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return args.apply([](const auto&... a) { return op.call(a...); });
}

struct NoDerivative : torch::autograd::Function<NoDerivative> {
  static at::Tensor forward(torch::autograd::AutogradContext*, const at::Tensor& input,
                            const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& input_threshold,
                            const c10::optional<at::Tensor>& output_threshold,
                            const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& prelu_weight,
                            const std::function<at::Tensor()>& compute) {
    (void)input, (void)scale, (void)bias, (void)input_threshold, (void)output_threshold, (void)residual,
        (void)prelu_weight;  // passed so that autograd links the output to them
    return compute();
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 const torch::autograd::variable_list&) {
    TORCH_CHECK(false,
                "xnorconv::binary_conv2d_packed has no derivative: train with xnorconv.BinaryConv2d (its "
                "straight-through estimator), or call the packed op under torch.no_grad()");
  }
};

at::Tensor binary_conv2d_packed_autograd(const PackedConvArgs& args) {
  auto compute = [&] { return call_below_autograd(args); };
  auto requires_grad = [](const c10::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); };
  const bool recorded = at::GradMode::is_enabled() &&
                        (args.input.requires_grad() || requires_grad(args.scale) || requires_grad(args.bias) ||
                         requires_grad(args.input_threshold) || requires_grad(args.output_threshold) ||
                         requires_grad(args.residual) || requires_grad(args.prelu_weight));
  if (!recorded) return compute();
  return NoDerivative::apply(args.input, args.scale, args.bias, args.input_threshold, args.output_threshold,
                             args.residual, args.prelu_weight, std::function<at::Tensor()>(compute));
}

// The .out overload writes a tensor autograd may be tracking, so it refuses a call autograd would record (PyTorch's
// rule for out= arguments), and bumps out's version as an in-place op does.
at::Tensor binary_conv2d_packed_out_autograd(const PackedConvArgs& args) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("xnorconv::binary_conv2d_packed", "out")
                             .typed<PackedConvOutSignature>();
  auto requires_grad = [](const c10::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); };
  TORCH_CHECK(!at::GradMode::is_enabled() ||
                  !(args.input.requires_grad() || requires_grad(args.scale) || requires_grad(args.bias) ||
                    requires_grad(args.input_threshold) || requires_grad(args.output_threshold) ||
                    requires_grad(args.residual) || requires_grad(args.prelu_weight) || args.out->requires_grad()),
              "xnorconv::binary_conv2d_packed.out has no derivative and its out= argument cannot be recorded by "
              "autograd: call it under torch.no_grad()");
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    args.apply([&](const auto&... a) { op.call(a..., *args.out); });
  }
  torch::autograd::impl::bump_version(*args.out);
  return *args.out;
}

}  // namespace

namespace {

const char* const kCudaKernelNames[] = {"", "popcount", "tensor_core"};

std::atomic<int>& cuda_kernel_slot() {
  static std::atomic<int> slot{0};
  return slot;
}

std::string& cuda_environment_error() {
  static std::string error;
  return error;
}

void apply_cuda_environment_once() {
  static const bool applied = [] {
    if (const char* env = std::getenv("XNORCONV_CUDA_KERNEL"); env && *env) {
      const std::string err = set_cuda_kernel_override(env);
      if (!err.empty()) cuda_environment_error() = "XNORCONV_CUDA_KERNEL: " + err;
    }
    return true;
  }();
  (void)applied;
}

}  // namespace

std::string set_cuda_kernel_override(const std::string& name) {
  const std::string choice = name == "auto" ? "" : name;
  for (int i = 0; i < 3; ++i)
    if (choice == kCudaKernelNames[i]) {
      cuda_kernel_slot().store(i);
      return {};
    }
  return "CUDA kernel must be 'auto', 'popcount' or 'tensor_core', got '" + name + "'";
}

std::string cuda_kernel_override() {
  apply_cuda_environment_once();
  return kCudaKernelNames[cuda_kernel_slot().load()];
}

std::string cuda_kernel_environment_error() {
  apply_cuda_environment_once();
  return cuda_environment_error();
}

TORCH_LIBRARY(xnorconv, m) {
  m.def("pack_weight(Tensor weight) -> (Tensor weight_bits, Tensor weight_tap_sum)");
  m.def(
      "binary_conv2d_packed(Tensor input, Tensor weight_bits, Tensor weight_tap_sum, int weight_in_channels, "
      "Tensor? scale, Tensor? bias, int[2] stride, int[4] padding, int[2] dilation, int groups, int pad_value, "
      "Tensor? input_threshold=None, bool output_signs=False, Tensor? output_threshold=None, "
      "Tensor? residual=None, Tensor? prelu_weight=None, bool input_shortcut=False) -> Tensor");
  m.def(
      "binary_conv2d_packed.out(Tensor input, Tensor weight_bits, Tensor weight_tap_sum, int weight_in_channels, "
      "Tensor? scale, Tensor? bias, int[2] stride, int[4] padding, int[2] dilation, int groups, int pad_value, "
      "Tensor? input_threshold=None, bool output_signs=False, Tensor? output_threshold=None, "
      "Tensor? residual=None, Tensor? prelu_weight=None, bool input_shortcut=False, *, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(xnorconv, CPU, m) {
  m.impl("pack_weight", &pack_weight_cpu);
  m.impl("binary_conv2d_packed", packed_conv_kernel<binary_conv2d_packed_cpu>);
  m.impl("binary_conv2d_packed.out", packed_conv_out_kernel<binary_conv2d_packed_cpu>);
}

TORCH_LIBRARY_IMPL(xnorconv, Autograd, m) {
  m.impl("binary_conv2d_packed", packed_conv_kernel<binary_conv2d_packed_autograd>);
  m.impl("binary_conv2d_packed.out", packed_conv_out_kernel<binary_conv2d_packed_out_autograd>);
}

}  // namespace xnorconv_torch
