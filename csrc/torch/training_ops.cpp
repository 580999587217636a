// Torch binding of the training path's elementwise passes (csrc/core/training.cpp): the backward of the
// straight-through estimator and of PReLU, and the signs the weight gradient is computed from. CPU only: on other
// devices xnorconv/_autograd.py composes the same values from aten ops, and the CUDA kernels below say so.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "ops.h"
#include "xnorconv_core.h"

namespace xnorconv_torch {

namespace {

// A tensor of shape (N, C, *) as the core's channel view: NHWC when it is a channels_last 4-D tensor (and not also
// NCHW-contiguous), else NCHW. `memory_format` is the layout every operand is brought to and the outputs get.
struct ChannelLayout {
  xnorconv::ChannelView view;
  at::MemoryFormat memory_format;
};

ChannelLayout channel_layout(const at::Tensor& t) {
  ChannelLayout layout;
  const int64_t n = t.size(0), c = t.size(1), inner = c == 0 ? 0 : t.numel() / std::max<int64_t>(1, n * c);
  if (t.dim() == 4 && wants_channels_last_output(t)) {
    layout.view = {n * inner, c, 1};
    layout.memory_format = at::MemoryFormat::ChannelsLast;
  } else {
    layout.view = {n, c, inner};
    layout.memory_format = at::MemoryFormat::Contiguous;
  }
  return layout;
}

void check_float(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but input is on ", like.device());
}

void check_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.dim() >= 2, op, ": input must have a batch and a channel dimension (N, C, ...), got a ",
              input.dim(), "-D tensor of shape ", input.sizes());
  check_float(op, "input", input, input);
}

void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& input) {
  check_float(op, "grad", grad, input);
  TORCH_CHECK(grad.sizes() == input.sizes(), op, ": grad must have the input's shape ", input.sizes(), ", got ",
              grad.sizes());
}

// The threshold as a contiguous (C,) tensor, or an undefined tensor for none.
at::Tensor channel_threshold(const char* op, const c10::optional<at::Tensor>& threshold, const at::Tensor& input) {
  if (!threshold.has_value()) return at::Tensor();
  check_float(op, "threshold", *threshold, input);
  TORCH_CHECK(threshold->dim() == 1 && threshold->size(0) == input.size(1), op, ": threshold must have shape (",
              input.size(1), ",) (one value per input channel), got ", threshold->sizes());
  return threshold->contiguous();
}

xnorconv::SteKind ste_kind(c10::string_view ste) {
  if (ste == "clipped") return xnorconv::SteKind::clipped;
  if (ste == "identity") return xnorconv::SteKind::identity;
  TORCH_CHECK(ste == "approx", "ste_input_grad: ste must be 'clipped', 'identity' or 'approx', got '",
              std::string(ste), "'");
  return xnorconv::SteKind::approx;
}

const float* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// The output's layout: `memory_format` if given (contiguous_format or channels_last), else the input's.
at::Tensor binary_signs_cpu(const at::Tensor& input, const c10::optional<at::Tensor>& threshold,
                            c10::optional<at::MemoryFormat> memory_format) {
  check_input("binary_signs", input);
  const at::Tensor t = channel_threshold("binary_signs", threshold, input);
  TORCH_CHECK(!memory_format.has_value() || *memory_format == at::MemoryFormat::Contiguous ||
                  (*memory_format == at::MemoryFormat::ChannelsLast && input.dim() == 4),
              "binary_signs: memory_format must be torch.contiguous_format, or torch.channels_last for a 4-D input, "
              "got ", *memory_format, " for a ", input.dim(), "-D input");
  const ChannelLayout layout = channel_layout(input);
  const at::MemoryFormat wanted = memory_format.value_or(layout.memory_format);
  const bool convert = wanted != layout.memory_format;
  if (convert && wanted == at::MemoryFormat::Contiguous)  // rare: from NHWC, signs in NHWC, then converted
    return binary_signs_cpu(input, threshold, c10::nullopt).contiguous();
  const at::Tensor x = input.contiguous(layout.memory_format);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(wanted));
  xnorconv::binary_signs(layout.view, x.data_ptr<float>(), data_or_null(t), out.data_ptr<float>(), convert,
                         torch_parallel_for);
  return out;
}

// grad_input in the input's layout; grad is read in its own layout when that is channels_last and the input's is
// NCHW (the gradient of a convolution computed on channels_last operands), else brought to the input's.
std::tuple<at::Tensor, at::Tensor> ste_input_grad_cpu(const at::Tensor& grad, const at::Tensor& input,
                                                       const c10::optional<at::Tensor>& threshold,
                                                       c10::string_view ste) {
  const xnorconv::SteKind kind = ste_kind(ste);
  check_input("ste_input_grad", input);
  check_grad("ste_input_grad", grad, input);
  const at::Tensor t = channel_threshold("ste_input_grad", threshold, input);
  const ChannelLayout layout = channel_layout(input);
  const bool grad_nhwc = layout.memory_format == at::MemoryFormat::Contiguous && input.dim() == 4 &&
                         wants_channels_last_output(grad);
  const at::Tensor x = input.contiguous(layout.memory_format);
  const at::Tensor g = grad_nhwc ? grad : grad.contiguous(layout.memory_format);
  at::Tensor grad_input = at::empty(x.sizes(), x.options().memory_format(layout.memory_format));
  at::Tensor grad_threshold = at::empty({t.defined() ? input.size(1) : 0}, x.options());
  xnorconv::ste_input_grad(layout.view, kind, g.data_ptr<float>(), grad_nhwc, x.data_ptr<float>(), data_or_null(t),
                           grad_input.data_ptr<float>(), t.defined() ? grad_threshold.data_ptr<float>() : nullptr,
                           torch_parallel_for);
  return {grad_input, grad_threshold.neg_()};  // d(x - t)/dt = -1
}

std::tuple<at::Tensor, at::Tensor> prelu_backward_cpu(const at::Tensor& grad, const at::Tensor& input,
                                                       const at::Tensor& weight) {
  check_input("prelu_backward", input);
  check_grad("prelu_backward", grad, input);
  check_float("prelu_backward", "weight", weight, input);
  const int64_t channels = input.size(1);
  TORCH_CHECK(weight.dim() == 1 && (weight.numel() == 1 || weight.numel() == channels),
              "prelu_backward: weight must have shape (1,) or (", channels, ",) (one slope per input channel), got ",
              weight.sizes());
  const ChannelLayout layout = channel_layout(input);
  const at::Tensor z = input.contiguous(layout.memory_format), g = grad.contiguous(layout.memory_format);
  const at::Tensor w = weight.contiguous();
  at::Tensor grad_input = at::empty_like(z, z.options(), layout.memory_format);
  at::Tensor grad_weight = at::empty_like(w, at::MemoryFormat::Contiguous);
  xnorconv::prelu_backward(layout.view, w.numel() == 1, g.data_ptr<float>(), z.data_ptr<float>(), w.data_ptr<float>(),
                           grad_input.data_ptr<float>(), grad_weight.data_ptr<float>(), torch_parallel_for);
  return {grad_input, grad_weight};
}

// A (C,) float32 operand, contiguous.
at::Tensor channel_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  check_float(op, name, t, input);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == input.size(1), op, ": ", name, " must have shape (", input.size(1),
              ",) (one value per channel), got ", t.sizes());
  return t.contiguous();
}

at::Tensor prelu_slopes(const char* op, const at::Tensor& weight, const at::Tensor& input) {
  check_float(op, "prelu_weight", weight, input);
  TORCH_CHECK(weight.dim() == 1 && (weight.numel() == 1 || weight.numel() == input.size(1)), op,
              ": prelu_weight must have shape (1,) or (", input.size(1), ",) (one slope per channel), got ",
              weight.sizes());
  return weight.contiguous();
}

std::tuple<at::Tensor, at::Tensor> channel_moments_cpu(const at::Tensor& input) {
  check_input("channel_moments", input);
  const ChannelLayout layout = channel_layout(input);
  const at::Tensor x = input.contiguous(layout.memory_format);
  at::Tensor mean = at::empty({input.size(1)}, x.options()), var = at::empty({input.size(1)}, x.options());
  xnorconv::channel_moments(layout.view, x.data_ptr<float>(), mean.data_ptr<float>(), var.data_ptr<float>(),
                            torch_parallel_for);
  return {mean, var};
}

// (out, z), both in the input's layout.
std::tuple<at::Tensor, at::Tensor> batch_norm_add_prelu_cpu(const at::Tensor& input, const at::Tensor& mean,
                                                             const at::Tensor& invstd, const at::Tensor& weight,
                                                             const at::Tensor& bias,
                                                             const c10::optional<at::Tensor>& residual,
                                                             const at::Tensor& prelu_weight) {
  const char* op = "batch_norm_add_prelu";
  check_input(op, input);
  const at::Tensor m = channel_vector(op, "mean", mean, input), s = channel_vector(op, "invstd", invstd, input);
  const at::Tensor gamma = channel_vector(op, "weight", weight, input), beta = channel_vector(op, "bias", bias, input);
  const at::Tensor w = prelu_slopes(op, prelu_weight, input);
  const ChannelLayout layout = channel_layout(input);
  const at::Tensor x = input.contiguous(layout.memory_format);
  at::Tensor r;
  if (residual.has_value()) {
    check_float(op, "residual", *residual, input);
    TORCH_CHECK(residual->sizes() == input.sizes(), op, ": residual must have the input's shape ", input.sizes(),
                ", got ", residual->sizes());
    r = residual->contiguous(layout.memory_format);
  }
  at::Tensor out = at::empty_like(x, x.options(), layout.memory_format);
  at::Tensor z = at::empty_like(x, x.options(), layout.memory_format);
  xnorconv::batch_norm_add_prelu(layout.view, x.data_ptr<float>(), m.data_ptr<float>(), s.data_ptr<float>(),
                                 gamma.data_ptr<float>(), beta.data_ptr<float>(), data_or_null(r), w.numel() == 1,
                                 w.data_ptr<float>(), z.data_ptr<float>(), out.data_ptr<float>(), torch_parallel_for);
  return {out, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_add_prelu_backward_cpu(
    const at::Tensor& grad, const at::Tensor& z, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& prelu_weight, bool batch_stats) {
  const char* op = "batch_norm_add_prelu_backward";
  check_input(op, input);
  check_grad(op, grad, input);
  check_float(op, "z", z, input);
  TORCH_CHECK(z.sizes() == input.sizes(), op, ": z must have the input's shape ", input.sizes(), ", got ", z.sizes());
  const at::Tensor m = channel_vector(op, "mean", mean, input), s = channel_vector(op, "invstd", invstd, input);
  const at::Tensor gamma = channel_vector(op, "weight", weight, input);
  const at::Tensor w = prelu_slopes(op, prelu_weight, input);
  const ChannelLayout layout = channel_layout(input);
  const at::Tensor x = input.contiguous(layout.memory_format), g = grad.contiguous(layout.memory_format),
                   zc = z.contiguous(layout.memory_format);
  at::Tensor grad_input = at::empty_like(x, x.options(), layout.memory_format);
  at::Tensor grad_residual = at::empty_like(x, x.options(), layout.memory_format);
  at::Tensor grad_weight = at::empty_like(gamma), grad_bias = at::empty_like(gamma), grad_prelu = at::empty_like(w);
  xnorconv::batch_norm_add_prelu_backward(
      layout.view, batch_stats, g.data_ptr<float>(), zc.data_ptr<float>(), x.data_ptr<float>(), m.data_ptr<float>(),
      s.data_ptr<float>(), gamma.data_ptr<float>(), w.numel() == 1, w.data_ptr<float>(),
      grad_input.data_ptr<float>(), grad_residual.data_ptr<float>(), grad_weight.data_ptr<float>(),
      grad_bias.data_ptr<float>(), grad_prelu.data_ptr<float>(), torch_parallel_for);
  return {grad_input, grad_residual, grad_weight, grad_bias, grad_prelu};
}

// On CUDA the training path composes the same values from aten ops (xnorconv/_autograd.py): a direct call says so.
[[noreturn]] void cpu_only(const char* op) {
  TORCH_CHECK(false, "xnorconv::", op, " runs on the CPU only; on CUDA, BinaryConv2d's training path, "
              "xnorconv.functional.prelu and xnorconv.functional.batch_norm_add_prelu compute it from aten ops");
}

at::Tensor binary_signs_cuda(const at::Tensor&, const c10::optional<at::Tensor>&, c10::optional<at::MemoryFormat>) {
  cpu_only("binary_signs");
}
std::tuple<at::Tensor, at::Tensor> ste_input_grad_cuda(const at::Tensor&, const at::Tensor&,
                                                        const c10::optional<at::Tensor>&, c10::string_view) {
  cpu_only("ste_input_grad");
}
std::tuple<at::Tensor, at::Tensor> prelu_backward_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  cpu_only("prelu_backward");
}
std::tuple<at::Tensor, at::Tensor> channel_moments_cuda(const at::Tensor&) { cpu_only("channel_moments"); }
std::tuple<at::Tensor, at::Tensor> batch_norm_add_prelu_cuda(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                              const at::Tensor&, const at::Tensor&,
                                                              const c10::optional<at::Tensor>&, const at::Tensor&) {
  cpu_only("batch_norm_add_prelu");
}
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_add_prelu_backward_cuda(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, bool) {
  cpu_only("batch_norm_add_prelu_backward");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xnorconv, m) {
  m.def("binary_signs(Tensor input, Tensor? threshold=None, MemoryFormat? memory_format=None) -> Tensor");
  m.def("ste_input_grad(Tensor grad, Tensor input, Tensor? threshold, str ste) "
        "-> (Tensor grad_input, Tensor grad_threshold)");
  m.def("prelu_backward(Tensor grad, Tensor input, Tensor weight) -> (Tensor grad_input, Tensor grad_weight)");
  m.def("channel_moments(Tensor input) -> (Tensor mean, Tensor var)");
  m.def("batch_norm_add_prelu(Tensor input, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, "
        "Tensor? residual, Tensor prelu_weight) -> (Tensor out, Tensor z)");
  m.def("batch_norm_add_prelu_backward(Tensor grad, Tensor z, Tensor input, Tensor mean, Tensor invstd, "
        "Tensor weight, Tensor prelu_weight, bool batch_stats) -> (Tensor grad_input, Tensor grad_residual, "
        "Tensor grad_weight, Tensor grad_bias, Tensor grad_prelu_weight)");
}

TORCH_LIBRARY_IMPL(xnorconv, CPU, m) {
  m.impl("binary_signs", &binary_signs_cpu);
  m.impl("ste_input_grad", &ste_input_grad_cpu);
  m.impl("prelu_backward", &prelu_backward_cpu);
  m.impl("channel_moments", &channel_moments_cpu);
  m.impl("batch_norm_add_prelu", &batch_norm_add_prelu_cpu);
  m.impl("batch_norm_add_prelu_backward", &batch_norm_add_prelu_backward_cpu);
}

TORCH_LIBRARY_IMPL(xnorconv, CUDA, m) {
  m.impl("binary_signs", &binary_signs_cuda);
  m.impl("ste_input_grad", &ste_input_grad_cuda);
  m.impl("prelu_backward", &prelu_backward_cuda);
  m.impl("channel_moments", &channel_moments_cuda);
  m.impl("batch_norm_add_prelu", &batch_norm_add_prelu_cuda);
  m.impl("batch_norm_add_prelu_backward", &batch_norm_add_prelu_backward_cuda);
}

}  // namespace xnorconv_torch
