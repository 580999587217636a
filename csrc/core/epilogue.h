// The output stage's parameters: one plain struct for the CPU kernel families (OutputStage, xnorconv_core.h) and the
// CUDA kernels (cuda::Epilogue, csrc/cuda/device_logic.h), filled by one function in the torch binding. Plain data
// and <stdint.h> only, so that nvcc and device code can include it.
//
// y = scale[o] * dot + bias[o]; then y += residual (a real-valued shortcut: the output's shape and memory format, or
// with residual_channels set, an NCHW tensor of that many channels mapped onto the output's as real_shortcut maps
// them);
// then y = y >= 0 ? y : prelu[o] * y; then either the float y is stored, or the sign byte !(y >= out_threshold[o])
// (1 where y binarizes to -1 for a following binary layer).
#pragma once

#include <stdint.h>

namespace xnorconv {

struct EpilogueParams {
  const float* scale = nullptr;          // [O] or nullptr for 1
  const float* bias = nullptr;           // [O] or nullptr for 0
  const float* residual = nullptr;       // the output's shape and memory format, or nullptr
  const float* prelu = nullptr;          // [O] negative slopes, or nullptr for none
  float* out = nullptr;                  // float output (unused with out_signs)
  uint8_t* out_signs = nullptr;          // sign output bytes, or nullptr for the float output
  const float* out_threshold = nullptr;  // [O] or nullptr for 0, with out_signs
  int32_t channels_last = 0;             // out / out_signs / residual are NHWC contiguous instead of NCHW
  // 0: the residual has the output's channels. Else (NCHW output only) it has this many channels C, with the
  // output's batch, height and width, and output channel o of O adds the mean of residual channels
  // [floor(o * C / O), ceil((o + 1) * C / O)) when O <= C, or residual channel floor(o * C / O) when O > C
  // (real_shortcut's channel mapping, xnorconv_core.h): a shortcut that the output stage reads from the layer's
  // input, or from its window means, instead of from a pass that writes every output channel first.
  int64_t residual_channels = 0;
};

}  // namespace xnorconv
