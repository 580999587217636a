// CUDA implementations of the xnorconv ops: argument checks (shared with the CPU path through conv_params), device
// guard, launches on the current stream with every launch checked. No device synchronisation. Compiled only when
// setup.py builds with CUDA (XNORCONV_WITH_CUDA); the kernels themselves live in csrc/cuda (no torch headers).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <string>

#include "gpu_conv_from_core.h"
#include "ops.h"
#include "xnorconv_core.h"
#include "xnorconv_cuda.h"

namespace xnorconv_torch {

namespace {

namespace xc = xnorconv::cuda;

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "xnorconv CUDA ", what, " launch failed: ", cudaGetErrorString(err),
              (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction)
                  ? " (this build has no kernel image for the device; rebuild with its architecture in "
                    "TORCH_CUDA_ARCH_LIST)"
                  : "");
}

int device_cc(const at::Tensor& t) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(t.device().index());
  return prop->major * 10 + prop->minor;
}

// The kernel use_backend (or XNORCONV_CUDA_KERNEL) forces, else the automatic choice. A forced tensor_core on a
// device or build without it is an error, as is an environment value that names no kernel.
xc::ConvKernel pick_kernel(const xc::GpuConv& p, int cc) {
  const std::string env_error = cuda_kernel_environment_error();
  TORCH_CHECK(env_error.empty(), "binary_conv2d: ", env_error);
  const std::string choice = cuda_kernel_override();
  if (choice.empty()) return xc::choose_kernel(p, cc);
  if (choice == "popcount") return xc::ConvKernel::Popcount;
  const xc::ConvKernel k = cc >= 90 ? xc::ConvKernel::TensorCoreAnd : xc::ConvKernel::TensorCoreXor;
  TORCH_CHECK(xc::kernel_supported(k, cc), "binary_conv2d: the CUDA kernel tensor_core (", xc::kernel_name(k),
              ") is not available on this device (compute capability ", cc / 10, ".", cc % 10, ") with this build");
  return k;
}

std::tuple<at::Tensor, at::Tensor> pack_weight_cuda(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 4, "pack_weight: weight must be 4-D (O, C/groups, kh, kw), got a ", weight.dim(),
              "-D tensor of shape ", weight.sizes());
  TORCH_CHECK(weight.is_floating_point(), "pack_weight: weight must be a floating-point tensor, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.numel() > 0, "pack_weight: weight must not be empty, got shape ", weight.sizes());
  TORCH_CHECK(weight.size(2) * weight.size(3) <= xnorconv::kMaxTaps, "pack_weight: kernel size (", weight.size(2),
              ", ", weight.size(3), ") has more than ", xnorconv::kMaxTaps, " taps");
  TORCH_CHECK(weight.size(1) <= 0x7fffffff && weight.size(0) * weight.size(2) * weight.size(3) <= 0x7fffffff,
              "pack_weight: weight of shape ", weight.sizes(), " is too large for the CUDA kernels");
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const int64_t out_channels = w.size(0), cg = w.size(1), taps = w.size(2) * w.size(3);
  const int64_t words = xnorconv::words_for_channels(cg);
  at::Tensor bits = at::empty({out_channels, w.size(2), w.size(3), words}, w.options().dtype(at::kLong));
  at::Tensor tap_sum = at::empty({out_channels, w.size(2), w.size(3)}, w.options().dtype(at::kInt));
  check_launch(xc::pack_weights(out_channels, static_cast<int32_t>(cg), static_cast<int32_t>(taps),
                                w.data_ptr<float>(), reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>()),
                                tap_sum.data_ptr<int32_t>(), at::cuda::getCurrentCUDAStream()),
               "weight pack");
  return {bits, tap_sum};
}

at::Tensor binary_conv2d_packed_cuda(const PackedConvArgs& args) {
  const xnorconv::ConvParams c = conv_params(args);
  TORCH_CHECK(!args.input_shortcut, "binary_conv2d: input_shortcut=True runs on the CPU only; on CUDA, pass "
              "residual=xnorconv.functional.real_shortcut(input, out_channels, stride) (FrozenBinaryConv2d does)");
  const at::Tensor& input = args.input;
  const bool sign_input = input.scalar_type() == at::kBool;
  // The epilogue writes a channels_last output as such (NHWC), reading the residual in the same order.
  const bool channels_last = wants_channels_last_output(input);
  const at::MemoryFormat format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty({c.batch, c.out_channels, c.out_h(), c.out_w()},
                             input.options().dtype(args.output_signs ? at::kBool : at::kFloat).memory_format(format));
  if (c.batch == 0) return out;
  xc::GpuConv p;
  TORCH_CHECK(xc::gpu_conv_from(c, p), "binary_conv2d: input of shape ", input.sizes(), " with ", c.out_channels,
              " output channels is too large for the CUDA kernels (packed input and output must each have fewer "
              "than 2^31 elements)");
  const int cc = device_cc(input);
  const xc::ConvKernel kernel = pick_kernel(p, cc);
  TORCH_CHECK(p.groups * static_cast<int64_t>(kernel == xc::ConvKernel::Popcount ? xc::popc::channel_blocks(p)
                                                                                 : xc::tc::channel_blocks(p)) <= 65535,
              "binary_conv2d: groups=", c.groups, " with ", c.out_channels_per_group(),
              " output channels per group exceeds the CUDA grid limit (65535 channel blocks)");

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor bits = args.weight_bits.contiguous();
  const at::Tensor tap_sum = args.weight_tap_sum.contiguous();
  const at::Tensor threshold =
      args.input_threshold.has_value() ? args.input_threshold->contiguous() : at::Tensor();
  const Epilogue epilogue = make_epilogue(out, channels_last, args);

  at::Tensor packed = at::empty({xc::packed_activation_words(p)}, input.options().dtype(at::kLong));
  auto* packed_ptr = reinterpret_cast<uint64_t*>(packed.data_ptr<int64_t>());
  const xc::Strides4 strides{input.stride(0), input.stride(1), input.stride(2), input.stride(3)};
  if (sign_input)
    check_launch(xc::pack_activation_signs(p, reinterpret_cast<const uint8_t*>(input.data_ptr<bool>()), strides,
                                           packed_ptr, stream),
                 "sign pack");
  else
    check_launch(xc::pack_activations(p, input.data_ptr<float>(), strides,
                                      threshold.defined() ? threshold.data_ptr<float>() : nullptr, packed_ptr, stream),
                 "activation pack");
  check_launch(xc::conv(kernel, p, packed_ptr, reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>()),
                        tap_sum.data_ptr<int32_t>(), epilogue.params, stream),
               xc::kernel_name(kernel));
  return out;
}

// The .out overload on CUDA: computed apart and copied in (the CUDA kernels allocate their output).
at::Tensor binary_conv2d_packed_cuda_out(const PackedConvArgs& args) {
  const xnorconv::ConvParams c = conv_params(args);
  const at::MemoryFormat format =
      wants_channels_last_output(args.input) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  check_out_tensor(args, {c.batch, c.out_channels, c.out_h(), c.out_w()}, format);
  PackedConvArgs computed = args;
  computed.out = nullptr;
  args.out->copy_(binary_conv2d_packed_cuda(computed));
  return *args.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(xnorconv, CUDA, m) {
  m.impl("pack_weight", &pack_weight_cuda);
  m.impl("binary_conv2d_packed", packed_conv_kernel<binary_conv2d_packed_cuda>);
  m.impl("binary_conv2d_packed.out", packed_conv_out_kernel<binary_conv2d_packed_cuda_out>);
}

}  // namespace xnorconv_torch
