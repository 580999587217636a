// pybind11 module xnorconv._C: importing it loads this library, which registers the ops (TORCH_LIBRARY in ops.cpp).
#include <torch/extension.h>

#include "xnorconv_core.h"

#ifndef XNORCONV_WITH_CUDA
#define XNORCONV_WITH_CUDA 0
#endif
#ifndef XNORCONV_CUDA_ARCHS
#define XNORCONV_CUDA_ARCHS ""
#endif

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
  m.def("selected_backend", [](int64_t channels, int64_t kernel) {
    xnorconv::ConvParams p;
    p.in_channels = channels;
    p.kernel_h = p.kernel_w = kernel;
    return std::string(xnorconv::select_kernel(p).name);
  }, "The CPU kernel family the selector picks for a layer");
  m.attr("with_cuda") = static_cast<bool>(XNORCONV_WITH_CUDA);
  m.attr("cuda_archs") = XNORCONV_CUDA_ARCHS;
  m.attr("compiler") = __VERSION__;
}
