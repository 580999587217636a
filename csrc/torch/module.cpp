// pybind11 module xnorconv._C: importing it loads this library, which registers the ops (TORCH_LIBRARY in ops.cpp).
#include <ATen/Parallel.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/extension.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "ops.h"
#include "xnorconv_core.h"

#ifndef XNORCONV_WITH_CUDA
#define XNORCONV_WITH_CUDA 0
#endif
#ifndef XNORCONV_CUDA_ARCHS
#define XNORCONV_CUDA_ARCHS ""
#endif

namespace {

// The kernel family `backend` names; the process-wide choice (use_backend / XNORCONV_BACKEND) is not touched.
const xnorconv::KernelOps& family(const std::string& backend, const char* caller) {
  std::string error;
  const xnorconv::KernelOps* ops = xnorconv::find_backend(backend, &error);
  TORCH_CHECK(ops, caller, ": ", error);
  return *ops;
}

// Benchmark hooks (used by python -m bench): the kernel's ceiling and the kernel alone on pre-packed input.
double peak_binary_macs_per_second(const std::string& backend, int64_t iterations) {
  const xnorconv::KernelOps& ops = family(backend, "peak_binary_macs_per_second");
  double best = 0;
  for (int r = 0; r < 5; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    const uint64_t macs = ops.peak_probe(iterations);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, macs / s);
  }
  return best;
}

// Median milliseconds of the convolution pass alone (input packed once beforehand), threads from torch.
double conv_kernel_ms(const std::string& backend, const at::Tensor& input, const at::Tensor& weight,
                      std::vector<int64_t> stride, std::vector<int64_t> padding, int64_t pad_value, int64_t reps) {
  xnorconv::ConvParams p;
  p.batch = input.size(0);
  p.in_channels = input.size(1);
  p.in_h = input.size(2);
  p.in_w = input.size(3);
  p.out_channels = weight.size(0);
  p.kernel_h = weight.size(2);
  p.kernel_w = weight.size(3);
  p.stride_h = stride.at(0);
  p.stride_w = stride.at(1);
  p.pad_top = p.pad_bottom = padding.at(0);
  p.pad_left = p.pad_right = padding.at(1);
  p.pad_value = static_cast<xnorconv::PadValue>(pad_value);
  const std::string bad = xnorconv::validate(p);
  TORCH_CHECK(bad.empty(), "conv_kernel_ms: ", bad);
  const xnorconv::KernelOps& ops = family(backend, "conv_kernel_ms");
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  // 64-byte aligned, as the op's buffers are.
  xnorconv::WordBuffer packed(xnorconv::packed_input_words(ops, p)), bits(xnorconv::weight_words(p)), formatted;
  std::vector<int32_t> tap_sum(p.out_channels * p.taps());
  xnorconv::pack_weights(p, w.data_ptr<float>(), bits.data(), tap_sum.data());
  at::Tensor out = at::empty({p.batch, p.out_channels, p.out_h(), p.out_w()}, x.options());
  xnorconv::ConvCall call;
  call.params = p;
  call.input = x.data_ptr<float>();
  call.strides = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  call.weight_bits = bits.data();
  call.weight_tap_sum = tap_sum.data();
  call.output.out = out.data_ptr<float>();
  // What the op keeps across calls (the weight format, the border correction) is made once here too, so that the
  // timed passes are the convolution alone.
  call.formatted_weight = xnorconv::conv_weight(ops, p, bits.data(), formatted);
  xnorconv::ZeroPadCorrection zero_pad;
  if (p.pad_value == xnorconv::PadValue::Zero) {
    zero_pad = xnorconv::zero_pad_correction(p, tap_sum.data());
    call.output.zero_pad = &zero_pad;
  }
  const xnorconv::ParallelFor parallel_for = [](int64_t tasks, int64_t grain, const xnorconv::TaskBody& body) {
    at::parallel_for(0, tasks, grain, body);
  };
  xnorconv::pack_input(ops, call, packed.data(), parallel_for);
  auto pass = [&] { xnorconv::convolve_packed(ops, call, packed.data(), parallel_for); };
  // One untimed pass first: the buffers above are fresh, so a first pass also pays the output's page faults and
  // the misses on weights that were just packed (a large share of a short pass), which is setup, not the kernel's
  // rate.
  pass();
  std::vector<double> times;
  for (int64_t r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    pass();
    times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// torch.ops.xnorconv.binary_conv2d_packed through the dispatcher, with pybind11's argument conversion instead of
// torch.ops' generic one (schema matching and an IValue stack, which cost more per call than a small layer's
// kernel). Every dispatch key still applies (autograd, tracing, fake tensors, Python modes, the profiler);
// only the Python-to-C++ step differs. Called through xnorconv.functional.packed_conv_op() in eager mode.
at::Tensor dispatch_binary_conv2d_packed(const xnorconv_torch::PackedConvArgs& args) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("xnorconv::binary_conv2d_packed", "")
                             .typed<xnorconv_torch::PackedConvSignature>();
  return args.apply([](const auto&... a) { return op.call(a...); });
}

// The same for the .out overload.
at::Tensor dispatch_binary_conv2d_packed_out(const xnorconv_torch::PackedConvArgs& args) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("xnorconv::binary_conv2d_packed", "out")
                             .typed<xnorconv_torch::PackedConvOutSignature>();
  args.apply([&](const auto&... a) { op.call(a..., *args.out); });
  return *args.out;
}

// A frozen layer's call of binary_conv2d_packed with everything but the per-call arguments gathered once
// (FrozenBinaryConv2d's eager fast path): a call converts the input, residual, slopes, shortcut flag and destination
// instead of all 18 arguments, and the layer's checks on its input run here instead of in Python. Inputs it does not
// take (another rank, channel count, dtype or device, smaller than the kernel's reach, a jit trace) get None, and the
// layer then runs its general path, which checks them and raises its errors. The tensors are held by reference, as
// the layer's buffers: in-place updates are seen, replaced buffers make the layer build a new one.
class PreparedBinaryConv {
 public:
  PreparedBinaryConv(at::Tensor weight_bits, at::Tensor weight_tap_sum, int64_t weight_in_channels,
                     c10::optional<at::Tensor> scale, c10::optional<at::Tensor> bias, std::vector<int64_t> stride,
                     std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups, int64_t pad_value,
                     c10::optional<at::Tensor> input_threshold, bool output_signs,
                     c10::optional<at::Tensor> output_threshold, int64_t in_channels, int64_t min_height,
                     int64_t min_width)
      : weight_bits_(std::move(weight_bits)), weight_tap_sum_(std::move(weight_tap_sum)),
        weight_in_channels_(weight_in_channels), scale_(std::move(scale)), bias_(std::move(bias)),
        stride_(std::move(stride)), padding_(std::move(padding)), dilation_(std::move(dilation)), groups_(groups),
        pad_value_(pad_value), input_threshold_(std::move(input_threshold)), output_signs_(output_signs),
        output_threshold_(std::move(output_threshold)), in_channels_(in_channels), min_height_(min_height),
        min_width_(min_width) {}

  py::object operator()(const at::Tensor& input, const c10::optional<at::Tensor>& residual,
                        const c10::optional<at::Tensor>& prelu_weight, bool input_shortcut,
                        c10::optional<at::Tensor> out) const {
    const bool sign_input = input.scalar_type() == at::kBool;
    if (input.dim() != 4 || input.size(1) != in_channels_ || !input.is_cpu() ||
        (!sign_input && input.scalar_type() != at::kFloat) || input.size(2) < min_height_ ||
        input.size(3) < min_width_ || torch::jit::tracer::isTracing())
      return py::none();
    // The op has no derivative; slopes that carry one (a trained nn.PReLU's weight) are read as values.
    c10::optional<at::Tensor> prelu = prelu_weight;
    if (prelu && prelu->requires_grad() && at::GradMode::is_enabled()) prelu = prelu->detach();
    // Sign input comes from a chained producer, which already applied this layer's threshold.
    static const c10::optional<at::Tensor> kNone;
    const xnorconv_torch::PackedConvArgs args{input, weight_bits_, weight_tap_sum_, weight_in_channels_, scale_,
                                              bias_, stride_, padding_, dilation_, groups_, pad_value_,
                                              sign_input ? kNone : input_threshold_, output_signs_,
                                              output_threshold_, residual, prelu, input_shortcut};
    at::Tensor result;
    {
      py::gil_scoped_release no_gil;
      if (out) {
        xnorconv_torch::PackedConvArgs with_out = args;
        with_out.out = &*out;
        result = dispatch_binary_conv2d_packed_out(with_out);
      } else {
        result = dispatch_binary_conv2d_packed(args);
      }
    }
    return py::cast(std::move(result));
  }

 private:
  at::Tensor weight_bits_, weight_tap_sum_;
  int64_t weight_in_channels_;
  c10::optional<at::Tensor> scale_, bias_;
  std::vector<int64_t> stride_, padding_, dilation_;
  int64_t groups_, pad_value_;
  c10::optional<at::Tensor> input_threshold_;
  bool output_signs_;
  c10::optional<at::Tensor> output_threshold_;
  int64_t in_channels_, min_height_, min_width_;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "xnorconv compiled kernels (ops are registered as torch.ops.xnorconv.*)";
  m.def("available_backends", &xnorconv::available_backends, "CPU kernel families usable here, best first");
  m.def("compiled_backends", &xnorconv::compiled_backends, "CPU kernel families compiled into this build");
  m.def("cpu_features", [] { return xnorconv::cpu_features().names(); }, "CPU features detected at runtime");
  m.def("set_backend_override", &xnorconv::set_backend_override,
        "Force a CPU kernel family ('' for automatic); returns an error message or ''");
  m.def("backend_override", &xnorconv::backend_override, "The forced CPU kernel family, or ''");
  m.def("backend_environment_error", &xnorconv::backend_environment_error,
        "Why XNORCONV_BACKEND was ignored, or ''");
  m.def("set_cuda_kernel_override", &xnorconv_torch::set_cuda_kernel_override,
        "Force a CUDA kernel ('popcount', 'tensor_core'; '' or 'auto' for automatic); returns an error message or ''");
  m.def("cuda_kernel_override", &xnorconv_torch::cuda_kernel_override, "The forced CUDA kernel, or ''");
  m.def("cuda_kernel_environment_error", &xnorconv_torch::cuda_kernel_environment_error,
        "Why XNORCONV_CUDA_KERNEL was rejected, or ''");
  m.def("selected_backend", [](int64_t channels, int64_t kernel, int64_t stride, bool channels_last) {
    xnorconv::ConvParams p;
    p.in_channels = p.out_channels = channels;
    p.kernel_h = p.kernel_w = kernel;
    p.stride_h = p.stride_w = stride;
    return std::string(xnorconv::select_kernel(p, channels_last).name);
  }, py::arg("channels"), py::arg("kernel"), py::arg("stride"), py::arg("channels_last") = false,
  "The CPU kernel family the selector picks for a layer (channels in and out, square kernel, stride, output layout)");
  m.def("call_binary_conv2d_packed", xnorconv_torch::packed_conv_kernel<dispatch_binary_conv2d_packed>,
        py::arg("input"), py::arg("weight_bits"),
        py::arg("weight_tap_sum"), py::arg("weight_in_channels"), py::arg("scale"), py::arg("bias"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("groups"), py::arg("pad_value"),
        py::arg("input_threshold") = py::none(), py::arg("output_signs") = false,
        py::arg("output_threshold") = py::none(), py::arg("residual") = py::none(),
        py::arg("prelu_weight") = py::none(), py::arg("input_shortcut") = false,
        py::call_guard<py::gil_scoped_release>(),
        "torch.ops.xnorconv.binary_conv2d_packed with the same arguments, through the dispatcher, called with less "
        "Python overhead");
  m.def("call_binary_conv2d_packed_out", xnorconv_torch::packed_conv_out_kernel<dispatch_binary_conv2d_packed_out>,
        py::arg("input"), py::arg("weight_bits"), py::arg("weight_tap_sum"), py::arg("weight_in_channels"),
        py::arg("scale"), py::arg("bias"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("groups"), py::arg("pad_value"), py::arg("input_threshold"), py::arg("output_signs"),
        py::arg("output_threshold"), py::arg("residual"), py::arg("prelu_weight"), py::arg("input_shortcut"),
        py::arg("out"), py::call_guard<py::gil_scoped_release>(),
        "torch.ops.xnorconv.binary_conv2d_packed.out (every argument positional), as call_binary_conv2d_packed");
  py::class_<PreparedBinaryConv>(m, "PreparedBinaryConv",
                                 "binary_conv2d_packed with a frozen layer's arguments gathered once; called with "
                                 "(input, residual, prelu_weight, input_shortcut, out), it returns the output, or None "
                                 "for an input the layer's general path must check")
      .def(py::init<at::Tensor, at::Tensor, int64_t, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
                    std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>, int64_t, int64_t,
                    c10::optional<at::Tensor>, bool, c10::optional<at::Tensor>, int64_t, int64_t, int64_t>(),
           py::arg("weight_bits"), py::arg("weight_tap_sum"), py::arg("weight_in_channels"), py::arg("scale"),
           py::arg("bias"), py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("groups"),
           py::arg("pad_value"), py::arg("input_threshold"), py::arg("output_signs"), py::arg("output_threshold"),
           py::arg("in_channels"), py::arg("min_height"), py::arg("min_width"))
      .def("__call__", &PreparedBinaryConv::operator(), py::arg("input"), py::arg("residual") = py::none(),
           py::arg("prelu_weight") = py::none(), py::arg("input_shortcut") = false, py::arg("out") = py::none());
  m.def("peak_binary_macs_per_second", &peak_binary_macs_per_second, "Peak probe of a CPU kernel family (best of 5)");
  m.def("conv_kernel_ms", &conv_kernel_ms, "Median ms of the convolution pass alone on pre-packed input");
  m.attr("with_cuda") = static_cast<bool>(XNORCONV_WITH_CUDA);
  m.attr("cuda_archs") = XNORCONV_CUDA_ARCHS;
  m.attr("compiler") = __VERSION__;
}
