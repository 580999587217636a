// xnorconv CUDA kernels. Framework-free: no torch / pybind11 / Python headers (fast nvcc builds).
// The per-thread logic lives in device_logic.h (host-tested); these bodies only add shared memory, the K loop,
// barriers and the mma instruction.
#include <cuda_runtime.h>

#include "device_logic.h"
#include "xnorconv_cuda.h"

namespace xnorconv {
namespace cuda {

namespace {

constexpr int kPackThreads = 256;

__global__ void __launch_bounds__(kPackThreads) pack_activations_kernel(GpuConv p, const float* __restrict__ x,
                                                                        Strides4 s,
                                                                        const float* __restrict__ threshold,
                                                                        uint64_t* __restrict__ packed,
                                                                        int64_t total) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kPackThreads + threadIdx.x;
  if (e < total) pack_activation_word(p, x, s, threshold, packed, e);
}

__global__ void __launch_bounds__(kPackThreads) pack_signs_kernel(GpuConv p, const uint8_t* __restrict__ x, Strides4 s,
                                                                  uint64_t* __restrict__ packed, int64_t total) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kPackThreads + threadIdx.x;
  if (e < total) pack_sign_word(p, x, s, packed, e);
}

__global__ void __launch_bounds__(kPackThreads) pack_weights_kernel(int32_t cg, int32_t taps, int32_t words,
                                                                    const float* __restrict__ weight,
                                                                    uint64_t* __restrict__ bits,
                                                                    int32_t* __restrict__ tap_sum, int64_t total) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kPackThreads + threadIdx.x;
  if (e < total) pack_weight_tap(cg, taps, words, weight, bits, tap_sum, e);
}

__global__ void __launch_bounds__(popc::kThreads, 2) popc_conv_kernel(GpuConv p, const uint64_t* __restrict__ packed,
                                                                   const uint64_t* __restrict__ weight_bits,
                                                                   const int32_t* __restrict__ tap_sum,
                                                                   Epilogue e) {
  __shared__ uint64_t sA[popc::kChunk * popc::kTileP];
  __shared__ uint64_t sW[popc::kChunk * popc::kTileO];
  const int32_t tid = threadIdx.x;
  const int32_t cb = popc::channel_blocks(p);
  const int32_t g = blockIdx.y / cb, channel_block = blockIdx.y % cb;
  int32_t acc[popc::kRegP][popc::kRegO];
  popc::zero(acc);
  const int32_t k_end = k_total(p, p.words);
  for (int32_t k0 = 0; k0 < k_end; k0 += popc::kChunk) {
    load_tile<popc::kTileP, popc::kTileO, popc::kChunk, popc::kThreads>(p, p.words, blockIdx.x, g, channel_block,
                                                                         tid, k0, packed, weight_bits, sA, sW);
    __syncthreads();
    popc::accumulate(tid, sA, sW, acc);
    __syncthreads();
  }
  popc::epilogue(p, blockIdx.x, blockIdx.y, tid, acc, tap_sum, e);
}

// The mma instruction. Each form is emitted only for architectures that have it; elsewhere the kernel body is a
// trap, and kernel_supported() (which asks the runtime which image it would load) keeps the host from launching it.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750 && __CUDA_ARCH__ < 900
#define XNORCONV_HAS_MMA_XOR 1
#else
#define XNORCONV_HAS_MMA_XOR 0
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define XNORCONV_HAS_MMA_AND 1
#else
#define XNORCONV_HAS_MMA_AND 0
#endif

template <bool kAnd>
__device__ __forceinline__ void mma_b1(int32_t (&c)[2], uint32_t a, uint32_t b) {
  if constexpr (kAnd) {
#if XNORCONV_HAS_MMA_AND
    asm volatile("mma.sync.aligned.m8n8k128.row.col.s32.b1.b1.s32.and.popc {%0, %1}, {%2}, {%3}, {%0, %1};\n"
                 : "+r"(c[0]), "+r"(c[1])
                 : "r"(a), "r"(b));
#endif
  } else {
#if XNORCONV_HAS_MMA_XOR
    asm volatile("mma.sync.aligned.m8n8k128.row.col.s32.b1.b1.s32.xor.popc {%0, %1}, {%2}, {%3}, {%0, %1};\n"
                 : "+r"(c[0]), "+r"(c[1])
                 : "r"(a), "r"(b));
#endif
  }
}

template <bool kAnd>
__global__ void __launch_bounds__(tc::kThreads, 4) tc_conv_kernel(GpuConv p, const uint64_t* __restrict__ packed,
                                                               const uint64_t* __restrict__ weight_bits,
                                                               const int32_t* __restrict__ tap_sum,
                                                               Epilogue e) {
#if XNORCONV_HAS_MMA_AND || XNORCONV_HAS_MMA_XOR
  if ((kAnd && !XNORCONV_HAS_MMA_AND) || (!kAnd && !XNORCONV_HAS_MMA_XOR)) {
    __trap();
  } else {
    __shared__ uint64_t sA[tc::kChunk * tc::kTileP];
    __shared__ uint64_t sW[tc::kChunk * tc::kTileO];
    const int32_t tid = threadIdx.x;
    const int32_t cb = tc::channel_blocks(p);
    const int32_t g = blockIdx.y / cb, channel_block = blockIdx.y % cb;
    int32_t acc[tc::kM][tc::kN][2];
    int32_t row_pop[tc::kM];
#pragma unroll
    for (int m = 0; m < tc::kM; ++m) {
      row_pop[m] = 0;
#pragma unroll
      for (int n = 0; n < tc::kN; ++n) acc[m][n][0] = acc[m][n][1] = 0;
    }
    const int32_t k_end = k_total(p, p.act_words_per_group);
    for (int32_t k0 = 0; k0 < k_end; k0 += tc::kChunk) {
      load_tile<tc::kTileP, tc::kTileO, tc::kChunk, tc::kThreads>(p, p.act_words_per_group, blockIdx.x, g,
                                                                   channel_block, tid, k0, packed, weight_bits, sA, sW);
      __syncthreads();
#pragma unroll
      for (int ks = 0; ks < tc::kSteps; ++ks) {
        uint32_t a[tc::kM], b[tc::kN];
#pragma unroll
        for (int m = 0; m < tc::kM; ++m) {
          a[m] = tc::a_fragment(sA, tid, m, ks);
          if (kAnd) row_pop[m] += __popc(a[m]);
        }
#pragma unroll
        for (int n = 0; n < tc::kN; ++n) b[n] = tc::b_fragment(sW, tid, n, ks);
#pragma unroll
        for (int m = 0; m < tc::kM; ++m)
#pragma unroll
          for (int n = 0; n < tc::kN; ++n) mma_b1<kAnd>(acc[m][n], a[m], b[n]);
      }
      __syncthreads();
    }
    if (kAnd) {
      // The 4 lanes of a group hold the 4 quarters of the same A row: sum them.
#pragma unroll
      for (int m = 0; m < tc::kM; ++m) {
        row_pop[m] += __shfl_xor_sync(0xffffffffu, row_pop[m], 1);
        row_pop[m] += __shfl_xor_sync(0xffffffffu, row_pop[m], 2);
      }
    }
    tc::epilogue(p, kAnd, blockIdx.x, blockIdx.y, tid, acc, row_pop, tap_sum, e);
  }
#else
  __trap();
#endif
}

cudaError_t check_grid(int64_t x, int64_t y) {
  if (x < 1 || x > 0x7fffffffLL || y < 1 || y > 65535) return cudaErrorInvalidConfiguration;
  return cudaSuccess;
}

// Launch status: errors of the launch itself (configuration, missing kernel image). Asynchronous faults surface at
// the next synchronising call, as for any CUDA op.
cudaError_t launched() { return cudaGetLastError(); }

}  // namespace

const char* kernel_name(ConvKernel k) {
  switch (k) {
    case ConvKernel::Popcount: return "popcount";
    case ConvKernel::TensorCoreXor: return "tensor_core_xor";
    case ConvKernel::TensorCoreAnd: return "tensor_core_and";
  }
  return "?";
}

bool kernel_supported(ConvKernel k, int device_cc) {
  if (k == ConvKernel::Popcount) return true;
  cudaFuncAttributes attr;
  const cudaError_t err = k == ConvKernel::TensorCoreAnd ? cudaFuncGetAttributes(&attr, tc_conv_kernel<true>)
                                                         : cudaFuncGetAttributes(&attr, tc_conv_kernel<false>);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear: "no kernel image" is an answer here, not an error
    return false;
  }
  // The virtual architecture the loaded image was compiled from (__CUDA_ARCH__ of its device code), which decides
  // whether the body holds the mma instruction or the trap.
  const int ptx = attr.ptxVersion > 0 ? attr.ptxVersion : attr.binaryVersion;
  if (k == ConvKernel::TensorCoreXor) return device_cc >= 75 && device_cc < 90 && ptx >= 75 && ptx < 90;
  return device_cc >= 80 && device_cc < 100 && ptx >= 80;
}

ConvKernel choose_kernel(const GpuConv& p, int device_cc) {
  if (p.cg >= 128) {
    const ConvKernel tc_form = device_cc >= 90 ? ConvKernel::TensorCoreAnd : ConvKernel::TensorCoreXor;
    if (kernel_supported(tc_form, device_cc)) return tc_form;
  }
  return ConvKernel::Popcount;
}

cudaError_t pack_activations(const GpuConv& p, const float* x, Strides4 s, const float* threshold, uint64_t* packed,
                             cudaStream_t stream) {
  const int64_t total = pack_threads(p);
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + kPackThreads - 1) / kPackThreads;
  if (cudaError_t err = check_grid(blocks, 1)) return err;
  pack_activations_kernel<<<static_cast<unsigned>(blocks), kPackThreads, 0, stream>>>(p, x, s, threshold, packed,
                                                                                      total);
  return launched();
}

cudaError_t pack_activation_signs(const GpuConv& p, const uint8_t* x, Strides4 s, uint64_t* packed,
                                  cudaStream_t stream) {
  const int64_t total = pack_threads(p);
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + kPackThreads - 1) / kPackThreads;
  if (cudaError_t err = check_grid(blocks, 1)) return err;
  pack_signs_kernel<<<static_cast<unsigned>(blocks), kPackThreads, 0, stream>>>(p, x, s, packed, total);
  return launched();
}

cudaError_t pack_weights(int64_t out_channels, int32_t cg, int32_t taps, const float* weight, uint64_t* bits,
                         int32_t* tap_sum, cudaStream_t stream) {
  const int64_t total = out_channels * taps;
  if (total == 0) return cudaSuccess;
  const int32_t words = (cg + 63) / 64;
  const int64_t blocks = (total + kPackThreads - 1) / kPackThreads;
  if (cudaError_t err = check_grid(blocks, 1)) return err;
  pack_weights_kernel<<<static_cast<unsigned>(blocks), kPackThreads, 0, stream>>>(cg, taps, words, weight, bits,
                                                                                  tap_sum, total);
  return launched();
}

cudaError_t conv(ConvKernel kernel, const GpuConv& p, const uint64_t* packed, const uint64_t* weight_bits,
                 const int32_t* tap_sum, const Epilogue& e, cudaStream_t stream) {
  if (p.out_pixels == 0) return cudaSuccess;
  if (kernel == ConvKernel::Popcount) {
    const int64_t gx = popc::grid_x(p), gy = popc::grid_y(p);
    if (cudaError_t err = check_grid(gx, gy)) return err;
    popc_conv_kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), popc::kThreads, 0, stream>>>(
        p, packed, weight_bits, tap_sum, e);
    return launched();
  }
  const int64_t gx = tc::grid_x(p), gy = tc::grid_y(p);
  if (cudaError_t err = check_grid(gx, gy)) return err;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  if (kernel == ConvKernel::TensorCoreAnd)
    tc_conv_kernel<true><<<grid, tc::kThreads, 0, stream>>>(p, packed, weight_bits, tap_sum, e);
  else
    tc_conv_kernel<false><<<grid, tc::kThreads, 0, stream>>>(p, packed, weight_bits, tap_sum, e);
  return launched();
}

}  // namespace cuda
}  // namespace xnorconv
