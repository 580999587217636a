// Torch binding of the one-pass float ops around the binary convolutions of the reference networks, for inference:
// xnorconv::real_shortcut (csrc/core/shortcut.cpp), the parameter-free shortcut of Bi-Real / ReActNet / BinaryDNet53
// units, and xnorconv::chained_max_pools (csrc/core/sppf.cpp), SPPF's pools with their concatenation. CPU only and
// without a gradient: xnorconv.functional composes the same values from differentiable aten ops for training and
// other devices, and the CUDA kernels below say so.
#include <ATen/ATen.h>
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

// On CUDA, xnorconv.functional composes these from aten ops: a direct call says so.
at::Tensor real_shortcut_cuda(const at::Tensor&, int64_t, int64_t) {
  TORCH_CHECK(false, "xnorconv::real_shortcut runs on the CPU only; on CUDA, xnorconv.functional.real_shortcut "
              "computes it from aten ops");
}
at::Tensor chained_max_pools_cuda(const at::Tensor&, int64_t, int64_t) {
  TORCH_CHECK(false, "xnorconv::chained_max_pools runs on the CPU only; on CUDA, "
              "xnorconv.functional.chained_max_pools computes it from aten ops");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(xnorconv, m) {
  m.def("real_shortcut(Tensor input, int out_channels, int stride) -> Tensor");
  m.def("chained_max_pools(Tensor input, int kernel_size, int pools) -> Tensor");
}

TORCH_LIBRARY_IMPL(xnorconv, CPU, m) {
  m.impl("real_shortcut", &real_shortcut_cpu);
  m.impl("chained_max_pools", &chained_max_pools_cpu);
}

TORCH_LIBRARY_IMPL(xnorconv, CUDA, m) {
  m.impl("real_shortcut", &real_shortcut_cuda);
  m.impl("chained_max_pools", &chained_max_pools_cuda);
}

}  // namespace xnorconv_torch
