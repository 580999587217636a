// Host-only bridge from the core's ConvParams (validated) to the kernels' GpuConv. Used by the torch binding and
// by the host test; no torch headers.
#pragma once

#include "device_logic.h"
#include "xnorconv_core.h"

namespace xnorconv {
namespace cuda {

// Returns false when a size does not fit the kernels' int32 index math (the caller reports it).
inline bool gpu_conv_from(const ConvParams& c, GpuConv& p) {
  const int64_t limit = 0x7fffffffLL;
  const int64_t values[] = {c.batch, c.in_channels, c.in_h, c.in_w, c.out_channels, c.groups, c.kernel_h * c.kernel_w,
                            c.stride_h, c.stride_w, c.pad_top, c.pad_left, c.dilation_h, c.dilation_w};
  for (int64_t v : values)
    if (v > limit) return false;
  p = GpuConv{};
  p.batch = static_cast<int32_t>(c.batch);
  p.in_channels = static_cast<int32_t>(c.in_channels);
  p.in_h = static_cast<int32_t>(c.in_h);
  p.in_w = static_cast<int32_t>(c.in_w);
  p.out_channels = static_cast<int32_t>(c.out_channels);
  p.groups = static_cast<int32_t>(c.groups);
  p.cg = static_cast<int32_t>(c.channels_per_group());
  p.og = static_cast<int32_t>(c.out_channels_per_group());
  p.kernel_h = static_cast<int32_t>(c.kernel_h);
  p.kernel_w = static_cast<int32_t>(c.kernel_w);
  p.stride_h = static_cast<int32_t>(c.stride_h);
  p.stride_w = static_cast<int32_t>(c.stride_w);
  p.pad_top = static_cast<int32_t>(c.pad_top);
  p.pad_left = static_cast<int32_t>(c.pad_left);
  p.dilation_h = static_cast<int32_t>(c.dilation_h);
  p.dilation_w = static_cast<int32_t>(c.dilation_w);
  p.pad_value = static_cast<int32_t>(c.pad_value);
  // Products used in the kernels' int32 math (out index components, tap offsets) stay below the limit too.
  if ((c.in_h + c.pad_top + c.pad_bottom) * c.stride_h > limit || (c.in_w + c.pad_left + c.pad_right) * c.stride_w > limit)
    return false;
  return finish_gpu_conv(p, c.out_h(), c.out_w());
}

}  // namespace cuda
}  // namespace xnorconv
