// xnorconv CUDA kernels: framework-free host API (raw device pointers + a caller-given cudaStream_t).
// No torch, pybind11 or Python headers here or in kernels.cu. Every function only enqueues work on `stream`
// (no device synchronisation) and returns the launch status (cudaGetLastError() after the launch).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "device_logic.h"

namespace xnorconv {
namespace cuda {

enum class ConvKernel : int {
  Popcount = 0,          // __popcll on CUDA cores: every architecture
  TensorCoreXor = 1,     // mma m8n8k128 .b1 .xor.popc: sm_75 .. sm_89
  TensorCoreAnd = 2,     // mma m8n8k128 .b1 .and.popc: sm_80+, the form used on sm_90
};
const char* kernel_name(ConvKernel k);

// Which kernels the compiled binary can run on the current device (cudaFuncGetAttributes: the kernel image that
// would be loaded was compiled for an architecture where its instruction exists). `device_cc` = 10*major+minor.
bool kernel_supported(ConvKernel k, int device_cc);

// The automatic choice: the tensor-core form of the device when supported and the group has >= 128 channels
// (a 128-bit k-step would otherwise be mostly zeros), else the popcount kernel.
ConvKernel choose_kernel(const GpuConv& p, int device_cc);

// float input (n, c, h, w) with element strides s -> packed words (packed_activation_words(p) of them);
// threshold: per-input-channel binarization threshold [in_channels] (sign(x - t) as x >= t), or nullptr.
cudaError_t pack_activations(const GpuConv& p, const float* x, Strides4 s, const float* threshold, uint64_t* packed,
                             cudaStream_t stream);

// bool (sign) input (n, c, h, w) with element strides s, one byte per value, nonzero meaning -1 -> packed words.
cudaError_t pack_activation_signs(const GpuConv& p, const uint8_t* x, Strides4 s, uint64_t* packed,
                                  cudaStream_t stream);

// float weight [O][cg][kh][kw] contiguous -> bits [O][kh][kw][words], tap_sum [O][kh][kw].
cudaError_t pack_weights(int64_t out_channels, int32_t cg, int32_t taps, const float* weight, uint64_t* bits,
                         int32_t* tap_sum, cudaStream_t stream);

// The output stage (scale, bias, residual, PReLU; float or sign output; NCHW or NHWC) is described by `e`
// (device_logic.h): e.out or e.out_signs is [batch][out_channels][out_h][out_w], contiguous in NCHW or NHWC order.
cudaError_t conv(ConvKernel kernel, const GpuConv& p, const uint64_t* packed, const uint64_t* weight_bits,
                 const int32_t* tap_sum, const Epilogue& e, cudaStream_t stream);

}  // namespace cuda
}  // namespace xnorconv
