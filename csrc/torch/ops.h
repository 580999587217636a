// Shared by the CPU and CUDA bindings: argument checking into ConvParams (messages name the argument and value).
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "xnorconv_core.h"

namespace xnorconv_torch {

xnorconv::ConvParams conv_params(const at::Tensor& input, const at::Tensor& weight_bits,
                                 const at::Tensor& weight_tap_sum, int64_t weight_in_channels,
                                 const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bias,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups, int64_t pad_value,
                                 const c10::optional<at::Tensor>& input_threshold, bool output_signs,
                                 const c10::optional<at::Tensor>& output_threshold);

// input_threshold: None, or float32 (C,) on the input's device.
void check_input_threshold(const c10::optional<at::Tensor>& input_threshold, const at::Tensor& input);
// output_threshold: None, or float32 (O,) on the input's device, only with output_signs.
void check_output_threshold(const c10::optional<at::Tensor>& output_threshold, bool output_signs,
                            int64_t out_channels, const at::Tensor& input);

// The layout rule of the op (and of the fake kernel in xnorconv/_meta.py): a channels_last input gets a
// channels_last output.
inline bool wants_channels_last_output(const at::Tensor& input) {
  return input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous() && input.size(1) > 1;
}

// The C++ signature of xnorconv::binary_conv2d_packed, for typed dispatcher handles to it.
using PackedConvSignature = at::Tensor(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const c10::optional<at::Tensor>&,
    const c10::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, int64_t,
    const c10::optional<at::Tensor>&, bool, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
    const c10::optional<at::Tensor>&);

// residual: None or float32 with the output's shape; prelu_weight: None or float32 (O,) or (1,).
void check_unit_epilogue(const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& prelu_weight,
                         const xnorconv::ConvParams& p, const at::Tensor& input);

// The output stage of one call, for the CPU and the CUDA kernels alike: `params` points into the output and into
// contiguous copies (usually the tensors themselves) held here for the call. nhwc: the output is written (and the
// residual read) in NHWC order; a shared PReLU slope (1,) is expanded to one per output channel.
struct Epilogue {
  at::Tensor scale, bias, residual, prelu, out_threshold;
  xnorconv::EpilogueParams params;
};
Epilogue make_epilogue(const at::Tensor& out, bool output_signs, bool nhwc, const c10::optional<at::Tensor>& scale,
                       const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& output_threshold,
                       const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& prelu_weight);

// The CUDA kernel choice, the GPU half of xnorconv.use_backend: "" (automatic), "popcount" or "tensor_core".
// Starts from XNORCONV_CUDA_KERNEL (read once, at first use), like the CPU's XNORCONV_BACKEND. Compiled into every
// build, so that a CPU-only build can say why a CUDA kernel name does not apply.
std::string set_cuda_kernel_override(const std::string& name);  // "" on success, else an error naming the value
std::string cuda_kernel_override();
// Why XNORCONV_CUDA_KERNEL's value was rejected, or "": the CUDA op raises it rather than silently run another kernel.
std::string cuda_kernel_environment_error();

}  // namespace xnorconv_torch
