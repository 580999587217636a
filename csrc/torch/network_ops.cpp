// Torch binding of the one-pass float ops around the binary convolutions of the reference networks, for inference:
// xnorconv::real_shortcut (csrc/core/shortcut.cpp), the parameter-free shortcut of Bi-Real / ReActNet / BinaryDNet53
// units; xnorconv::chained_max_pools (csrc/core/max_pools.cpp), SPPF's pools with their concatenation;
// xnorconv::max_pool2d (the same file), a stem's strided max pool with its ReLU; xnorconv::dequantize_max_pool2d
// (the same file), an int8 stem's output pooled and dequantized in one pass; and xnorconv::first_layer_conv
// (csrc/core/first_layer.cpp), the float stem with its bias and PReLU, and optionally its max pool. CPU only and
// without a gradient: xnorconv.functional composes the same values from differentiable aten ops for training and
// other devices, and the CUDA kernels below say so.
#include <cmath>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops.h"
#include "xnorconv_core.h"

namespace xnorconv_torch {

namespace {

at::Tensor real_shortcut_cpu(const at::Tensor& input, int64_t out_channels, int64_t stride) {
  const char* op = "real_shortcut";
  TORCH_CHECK(input.dim() == 4, op, ": input must be 4-D (N, C, H, W), got a ", input.dim(), "-D tensor of shape ",
              input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kFloat, op, ": input must be float32, got ", input.scalar_type());
  TORCH_CHECK(input.size(1) > 0, op, ": input must have at least one channel, got shape ", input.sizes());
  TORCH_CHECK(out_channels > 0, op, ": out_channels must be positive, got ", out_channels);
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);
  const bool nhwc = wants_channels_last_output(input);
  const at::MemoryFormat format = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = input.contiguous(format);
  const xnorconv::ShortcutShape shape{x.size(0), x.size(1), x.size(2), x.size(3), out_channels, stride, nhwc};
  at::Tensor out = at::empty({shape.batch, out_channels, (shape.height + stride - 1) / stride,
                              (shape.width + stride - 1) / stride},
                             x.options().memory_format(format));
  xnorconv::real_shortcut(shape, x.data_ptr<float>(), out.data_ptr<float>(), torch_parallel_for);
  return out;
}

at::Tensor chained_max_pools_cpu(const at::Tensor& input, int64_t kernel_size, int64_t pools) {
  const char* op = "chained_max_pools";
  TORCH_CHECK(input.dim() == 4, op, ": input must be 4-D (N, C, H, W), got a ", input.dim(), "-D tensor of shape ",
              input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kFloat, op, ": input must be float32, got ", input.scalar_type());
  TORCH_CHECK(kernel_size > 0 && kernel_size % 2 == 1, op, ": kernel_size must be a positive odd int, got ",
              kernel_size);
  TORCH_CHECK(pools > 0, op, ": pools must be positive, got ", pools);
  const bool nhwc = wants_channels_last_output(input);
  const at::MemoryFormat format = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = input.contiguous(format);
  const xnorconv::ChainedPoolShape shape{x.size(0), x.size(1), x.size(2), x.size(3), kernel_size, pools, nhwc};
  at::Tensor out = at::empty({shape.batch, (pools + 1) * shape.channels, shape.height, shape.width},
                             x.options().memory_format(format));
  xnorconv::chained_max_pools(shape, x.data_ptr<float>(), out.data_ptr<float>(), torch_parallel_for);
  return out;
}

int64_t pair_entry(const char* op, const char* name, at::IntArrayRef v, int i) {
  TORCH_CHECK(v.size() == 2, op, ": ", name, " must have 2 values (height, width), got ", v);
  return v[i];
}

// The (height, width) pairs every window op of this file takes.
template <typename Shape>
void set_stride_and_padding(Shape& shape, const char* op, at::IntArrayRef stride, at::IntArrayRef padding) {
  shape.stride_h = pair_entry(op, "stride", stride, 0);
  shape.stride_w = pair_entry(op, "stride", stride, 1);
  shape.pad_h = pair_entry(op, "padding", padding, 0);
  shape.pad_w = pair_entry(op, "padding", padding, 1);
}

// The pool of a max pool op over `input` (4-D, N, C, H, W) with its window arguments, checked (the layout and the
// ReLU are the caller's).
xnorconv::MaxPoolShape pool_shape(const char* op, const char* name, const at::Tensor& input,
                                  at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                  bool ceil_mode) {
  xnorconv::MaxPoolShape shape;
  shape.batch = input.size(0);
  shape.channels = input.size(1);
  shape.height = input.size(2);
  shape.width = input.size(3);
  shape.kernel_h = pair_entry(op, "kernel_size", kernel_size, 0);
  shape.kernel_w = pair_entry(op, "kernel_size", kernel_size, 1);
  set_stride_and_padding(shape, op, stride, padding);
  shape.ceil_mode = ceil_mode;
  const std::string error = xnorconv::validate(shape);
  TORCH_CHECK(error.empty(), op, ": ", error, " (", name, " shape ", input.sizes(), ")");
  return shape;
}

at::Tensor max_pool2d_cpu(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, bool ceil_mode, bool relu) {
  const char* op = "max_pool2d";
  TORCH_CHECK(input.dim() == 4, op, ": input must be 4-D (N, C, H, W), got a ", input.dim(), "-D tensor of shape ",
              input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kFloat, op, ": input must be float32, got ", input.scalar_type());
  const bool nhwc = wants_channels_last_output(input);
  const at::MemoryFormat format = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  xnorconv::MaxPoolShape shape = pool_shape(op, "input", input, kernel_size, stride, padding, ceil_mode);
  shape.relu = relu;
  shape.nhwc = nhwc;
  const at::Tensor x = input.contiguous(format);
  at::Tensor out = at::empty({shape.batch, shape.channels, shape.out_height(), shape.out_width()},
                             x.options().memory_format(format));
  xnorconv::max_pool2d(shape, x.data_ptr<float>(), out.data_ptr<float>(), torch_parallel_for);
  return out;
}

at::Tensor dequantize_max_pool2d_cpu(const at::Tensor& levels, double scale, int64_t zero_point,
                                     at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                     bool ceil_mode, bool channels_last) {
  const char* op = "dequantize_max_pool2d";
  TORCH_CHECK(levels.dim() == 4, op, ": levels must be 4-D (N, C, H, W), got a ", levels.dim(),
              "-D tensor of shape ", levels.sizes());
  // A quint8 tensor (PyTorch's int8 convolution's output) is read as the bytes it stores: its levels.
  TORCH_CHECK(levels.scalar_type() == at::kByte || levels.scalar_type() == at::kQUInt8, op,
              ": levels must be uint8 or quint8, got ", levels.scalar_type());
  const float scale_value = static_cast<float>(scale);
  TORCH_CHECK(std::isfinite(scale_value) && scale_value > 0.0f, op,
              ": scale must be a positive finite float32 (a max pool commutes only with an increasing "
              "dequantization), got ", scale);
  TORCH_CHECK(zero_point >= 0 && zero_point <= 255, op, ": zero_point must be in [0, 255] (a uint8 level), got ",
              zero_point);
  xnorconv::MaxPoolShape shape = pool_shape(op, "levels", levels, kernel_size, stride, padding, ceil_mode);
  shape.nhwc = channels_last;
  const at::Tensor x = levels.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = at::empty({shape.batch, shape.channels, shape.out_height(), shape.out_width()},
                             at::TensorOptions().dtype(at::kFloat).memory_format(
                                 channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  xnorconv::dequantize_max_pool2d(shape, static_cast<const uint8_t*>(x.const_data_ptr()), scale_value,
                                  static_cast<int32_t>(zero_point), out.data_ptr<float>(), torch_parallel_for);
  return out;
}

void check_optional_per_channel(const char* op, const char* name, const std::optional<at::Tensor>& t,
                                int64_t out_channels) {
  if (!t) return;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), op, ": ", name,
              " must be a float32 CPU tensor, got ", t->scalar_type(), " on ", t->device());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == out_channels, op, ": ", name, " must have shape (", out_channels,
              ",) (one value per output channel), got ", t->sizes());
}

at::Tensor first_layer_conv_cpu(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& prelu_weight,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                at::OptionalIntArrayRef pool_kernel_size, at::IntArrayRef pool_stride,
                                at::IntArrayRef pool_padding, bool pool_ceil_mode, bool pool_relu) {
  const char* op = "first_layer_conv";
  TORCH_CHECK(input.dim() == 4, op, ": input must be 4-D (N, C, H, W), got a ", input.dim(), "-D tensor of shape ",
              input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kFloat, op, ": input must be float32, got ", input.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(), op,
              ": weight must be a 4-D (out_channels, in_channels, kernel_h, kernel_w) float32 CPU tensor, got ",
              weight.scalar_type(), " of shape ", weight.sizes(), " on ", weight.device());
  TORCH_CHECK(weight.size(1) == input.size(1), op, ": weight has ", weight.size(1),
              " input channels (dim 1) but the input has ", input.size(1), " (input shape ", input.sizes(), ")");
  const int64_t out_channels = weight.size(0);
  check_optional_per_channel(op, "bias", bias, out_channels);
  check_optional_per_channel(op, "prelu_weight", prelu_weight, out_channels);
  const bool nhwc = wants_channels_last_output(input);
  const at::MemoryFormat format = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = input.contiguous(format), w = weight.contiguous();
  xnorconv::FirstLayerShape shape;
  shape.batch = x.size(0);
  shape.in_channels = x.size(1);
  shape.height = x.size(2);
  shape.width = x.size(3);
  shape.out_channels = out_channels;
  shape.kernel_h = w.size(2);
  shape.kernel_w = w.size(3);
  set_stride_and_padding(shape, op, stride, padding);
  shape.dilation_h = pair_entry(op, "dilation", dilation, 0);
  shape.dilation_w = pair_entry(op, "dilation", dilation, 1);
  shape.channels_last = nhwc;
  const std::string error = xnorconv::validate(shape);
  TORCH_CHECK(error.empty(), op, ": ", error, " (input shape ", input.sizes(), ", weight shape ", weight.sizes(),
              ")");
  // The max pool of the output, fused: its input is the convolution's output.
  xnorconv::MaxPoolShape pool;
  if (pool_kernel_size) {
    pool.batch = shape.batch;
    pool.channels = out_channels;
    pool.height = shape.out_height();
    pool.width = shape.out_width();
    pool.kernel_h = pair_entry(op, "pool_kernel_size", *pool_kernel_size, 0);
    pool.kernel_w = pair_entry(op, "pool_kernel_size", *pool_kernel_size, 1);
    pool.stride_h = pair_entry(op, "pool_stride", pool_stride, 0);
    pool.stride_w = pair_entry(op, "pool_stride", pool_stride, 1);
    pool.pad_h = pair_entry(op, "pool_padding", pool_padding, 0);
    pool.pad_w = pair_entry(op, "pool_padding", pool_padding, 1);
    pool.ceil_mode = pool_ceil_mode;
    pool.relu = pool_relu;
    pool.nhwc = nhwc;
    const std::string pool_error = xnorconv::validate_pool(shape, pool);
    TORCH_CHECK(pool_error.empty(), op, ": pool: ", pool_error, " (input shape ", input.sizes(), ", weight shape ",
                weight.sizes(), ")");
  }
  const int64_t out_h = pool_kernel_size ? pool.out_height() : shape.out_height();
  const int64_t out_w = pool_kernel_size ? pool.out_width() : shape.out_width();
  at::Tensor out = at::empty({shape.batch, out_channels, out_h, out_w}, x.options().memory_format(format));
  const at::Tensor b = bias ? bias->contiguous() : at::Tensor(), s = prelu_weight ? prelu_weight->contiguous()
                                                                                   : at::Tensor();
  xnorconv::FirstLayerCall call;
  call.shape = shape;
  call.input = x.data_ptr<float>();
  call.weight = w.data_ptr<float>();
  call.bias = bias ? b.data_ptr<float>() : nullptr;
  call.slope = prelu_weight ? s.data_ptr<float>() : nullptr;
  call.out = out.data_ptr<float>();
  call.pool = pool_kernel_size ? &pool : nullptr;
  call.threads = at::get_num_threads();
  xnorconv::first_layer_conv(xnorconv::select_float_kernel(), call, torch_parallel_for);
  return out;
}

// On CUDA, xnorconv.functional composes these from aten ops: a direct call says so.
at::Tensor real_shortcut_cuda(const at::Tensor&, int64_t, int64_t) {
  TORCH_CHECK(false, "xnorconv::real_shortcut runs on the CPU only; on CUDA, xnorconv.functional.real_shortcut "
              "computes it from aten ops");
}
at::Tensor chained_max_pools_cuda(const at::Tensor&, int64_t, int64_t) {
  TORCH_CHECK(false, "xnorconv::chained_max_pools runs on the CPU only; on CUDA, "
              "xnorconv.functional.chained_max_pools computes it from aten ops");
}
at::Tensor dequantize_max_pool2d_cuda(const at::Tensor&, double, int64_t, at::IntArrayRef, at::IntArrayRef,
                                      at::IntArrayRef, bool, bool) {
  TORCH_CHECK(false, "xnorconv::dequantize_max_pool2d runs on the CPU only, as PyTorch's int8 convolution whose "
              "output it reads does");
}
at::Tensor max_pool2d_cuda(const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool, bool) {
  TORCH_CHECK(false, "xnorconv::max_pool2d runs on the CPU only; on CUDA, xnorconv.functional.max_pool2d composes "
              "F.max_pool2d and F.relu");
}
at::Tensor first_layer_conv_cuda(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                 const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                 at::OptionalIntArrayRef, at::IntArrayRef, at::IntArrayRef, bool, bool) {
  TORCH_CHECK(false, "xnorconv::first_layer_conv runs on the CPU only; on CUDA, xnorconv.functional.first_layer_conv "
              "computes it from aten ops");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xnorconv, m) {
  m.def("real_shortcut(Tensor input, int out_channels, int stride) -> Tensor");
  m.def("chained_max_pools(Tensor input, int kernel_size, int pools) -> Tensor");
  m.def("max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode=False, "
        "bool relu=False) -> Tensor");
  m.def("dequantize_max_pool2d(Tensor levels, float scale, int zero_point, int[2] kernel_size, int[2] stride, "
        "int[2] padding, bool ceil_mode=False, bool channels_last=False) -> Tensor");
  m.def("first_layer_conv(Tensor input, Tensor weight, Tensor? bias, Tensor? prelu_weight, int[2] stride, "
        "int[2] padding, int[2] dilation, int[2]? pool_kernel_size=None, int[2] pool_stride=1, "
        "int[2] pool_padding=0, bool pool_ceil_mode=False, bool pool_relu=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(xnorconv, CPU, m) {
  m.impl("real_shortcut", &real_shortcut_cpu);
  m.impl("chained_max_pools", &chained_max_pools_cpu);
  m.impl("max_pool2d", &max_pool2d_cpu);
  m.impl("dequantize_max_pool2d", &dequantize_max_pool2d_cpu);
  m.impl("first_layer_conv", &first_layer_conv_cpu);
}

// PyTorch's int8 convolution returns quint8 tensors, which dispatch to QuantizedCPU.
TORCH_LIBRARY_IMPL(xnorconv, QuantizedCPU, m) { m.impl("dequantize_max_pool2d", &dequantize_max_pool2d_cpu); }

TORCH_LIBRARY_IMPL(xnorconv, CUDA, m) {
  m.impl("real_shortcut", &real_shortcut_cuda);
  m.impl("chained_max_pools", &chained_max_pools_cuda);
  m.impl("max_pool2d", &max_pool2d_cuda);
  m.impl("dequantize_max_pool2d", &dequantize_max_pool2d_cuda);
  m.impl("first_layer_conv", &first_layer_conv_cuda);
}

}  // namespace xnorconv_torch
