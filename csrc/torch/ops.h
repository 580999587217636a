// Shared by the CPU and CUDA bindings: argument checking into ConvParams (messages name the argument and value).
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "xnorconv_core.h"

namespace xnorconv_torch {

// The C++ signature of xnorconv::binary_conv2d_packed: the dispatcher's kernels and typed handles have this type.
using PackedConvSignature = at::Tensor(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const c10::optional<at::Tensor>&,
    const c10::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, int64_t,
    const c10::optional<at::Tensor>&, bool, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
    const c10::optional<at::Tensor>&, bool);

// The .out overload's: the same arguments, then the tensor written. It returns nothing (a custom op that returned
// its mutated argument could not be functionalized for torch.compile and torch.export).
template <class Signature>
struct WithOutTensor;
template <class... Args>
struct WithOutTensor<at::Tensor(Args...)> {
  using type = void(Args..., at::Tensor&);
};
using PackedConvOutSignature = WithOutTensor<PackedConvSignature>::type;

// The arguments of one call of xnorconv::binary_conv2d_packed, in schema order: the one place C++ names them (a new
// fused option is a member here, a schema argument in ops.cpp, a field of EpilogueParams and a step of
// output_stage.h). References into the caller's arguments, valid for the call.
struct PackedConvArgs {
  const at::Tensor& input;
  const at::Tensor& weight_bits;
  const at::Tensor& weight_tap_sum;
  int64_t weight_in_channels;
  const c10::optional<at::Tensor>& scale;
  const c10::optional<at::Tensor>& bias;
  at::IntArrayRef stride, padding, dilation;
  int64_t groups, pad_value;
  const c10::optional<at::Tensor>& input_threshold;
  bool output_signs;
  const c10::optional<at::Tensor>& output_threshold;
  const c10::optional<at::Tensor>& residual;
  const c10::optional<at::Tensor>& prelu_weight;
  bool input_shortcut;
  // The .out overload's destination (not an argument of the default overload, so not passed by apply).
  at::Tensor* out = nullptr;

  // f(the arguments in schema order): a call through a typed dispatcher handle.
  template <class F>
  decltype(auto) apply(F&& f) const {
    return f(input, weight_bits, weight_tap_sum, weight_in_channels, scale, bias, stride, padding, dilation, groups,
             pad_value, input_threshold, output_signs, output_threshold, residual, prelu_weight, input_shortcut);
  }
};

// packed_conv_kernel<Impl>: a function of PackedConvSignature (what the dispatcher registers) that gathers its
// arguments into PackedConvArgs and calls Impl.
template <at::Tensor (*Impl)(const PackedConvArgs&), class Signature>
struct PackedConvKernel;
template <at::Tensor (*Impl)(const PackedConvArgs&), class... Args>
struct PackedConvKernel<Impl, at::Tensor(Args...)> {
  static at::Tensor call(Args... args) { return Impl(PackedConvArgs{args...}); }
};
template <at::Tensor (*Impl)(const PackedConvArgs&)>
constexpr auto packed_conv_kernel = &PackedConvKernel<Impl, PackedConvSignature>::call;

// packed_conv_out_kernel<Impl>: the .out overload's function; Impl writes args.out.
template <at::Tensor (*Impl)(const PackedConvArgs&), class Signature>
struct PackedConvOutKernel;
template <at::Tensor (*Impl)(const PackedConvArgs&), class... Args>
struct PackedConvOutKernel<Impl, at::Tensor(Args...)> {
  static void call(Args... args, at::Tensor& out) {
    PackedConvArgs a{args...};
    a.out = &out;
    Impl(a);
  }
};
template <at::Tensor (*Impl)(const PackedConvArgs&)>
constexpr auto packed_conv_out_kernel = &PackedConvOutKernel<Impl, PackedConvSignature>::call;

// The .out overload's rule for its destination: the output's shape, dtype and device, and no memory shared with
// the tensors the op reads. Returns whether the op can write it directly (contiguous in `format`, the layout the
// kernels write); otherwise the result is computed apart and copied in.
bool check_out_tensor(const PackedConvArgs& args, at::IntArrayRef sizes, at::MemoryFormat format);

// Every argument check of the op, into ConvParams; messages name the argument and value.
// The core's threading hook: torch's pool, so the ops follow torch.get_num_threads().
void torch_parallel_for(int64_t tasks, int64_t grain, const xnorconv::TaskBody& body);

xnorconv::ConvParams conv_params(const PackedConvArgs& args);

// The layout rule of the op (and of the fake kernel in xnorconv/_meta.py): a channels_last input gets a
// channels_last output.
inline bool wants_channels_last_output(const at::Tensor& input) {
  return input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous() && input.size(1) > 1;
}

// The output stage of one call, for the CPU and the CUDA kernels alike: `params` points into the output and into
// contiguous copies (usually the tensors themselves) held here for the call. nhwc: the output is written (and the
// residual read) in NHWC order; a shared PReLU slope (1,) is expanded to one per output channel.
struct Epilogue {
  at::Tensor scale, bias, residual, prelu, out_threshold;
  xnorconv::EpilogueParams params;
};
Epilogue make_epilogue(const at::Tensor& out, bool nhwc, const PackedConvArgs& args);

// The CUDA kernel choice, the GPU half of xnorconv.use_backend: "" (automatic), "popcount" or "tensor_core".
// Starts from XNORCONV_CUDA_KERNEL (read once, at first use), like the CPU's XNORCONV_BACKEND. Compiled into every
// build, so that a CPU-only build can say why a CUDA kernel name does not apply.
std::string set_cuda_kernel_override(const std::string& name);  // "" on success, else an error naming the value
std::string cuda_kernel_override();
// Why XNORCONV_CUDA_KERNEL's value was rejected, or "": the CUDA op raises it rather than silently run another kernel.
std::string cuda_kernel_environment_error();

}  // namespace xnorconv_torch
