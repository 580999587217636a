// The whole convolution on top of a kernel family: packing, the pad_value 0 correction, the weight format and the
// convolution pass, with the caller's threading. The torch binding, the C++ benchmark and the C++ tests all run
// the op through here, so what one of them runs is what the others test.
#include "xnorconv_core.h"

namespace xnorconv {

namespace {

// Packing splits across threads only when the input is large enough to repay waking them: a pass over a few
// thousand words takes microseconds, about what waking a second thread costs. The threshold lies between the
// DarkNet layers that pack faster on one thread (256 channels x 16x16) and those that pack faster on two
// (64 x 64x64); python -m bench --scaling shows where a change moves it.
int64_t pack_grain(const ConvParams& p, int64_t tasks) {
  constexpr int64_t kParallelPackValues = 96 * 1024;
  return p.batch * p.in_channels * p.in_h * p.in_w < kParallelPackValues ? tasks : 1;
}

}  // namespace

void run_serially(int64_t tasks, int64_t, const TaskBody& body) {
  if (tasks > 0) body(0, tasks);
}

void pack_input(const KernelOps& ops, const ConvCall& call, uint64_t* packed_input, const ParallelFor& parallel_for) {
  const ConvParams& p = call.params;
  if (p.batch == 0) return;
  const ActivationLayout layout = ops.layout(p);
  const bool fold = folds_columns(ops, p);
  const ActivationLayout folded = fold ? ops.layout(folded_params(p)) : layout;
  // A folded call packs p's layout behind the folded one, then folds it forward.
  uint64_t* packed = fold ? packed_input + folded.total_words : packed_input;
  const int64_t tasks = ops.pack_tasks(p, layout);
  parallel_for(tasks, pack_grain(p, tasks), [&](int64_t begin, int64_t end) {
    if (call.input_signs)
      ops.pack_signs(p, layout, call.input_signs, call.strides, packed, begin, end);
    else
      ops.pack(p, layout, call.input, call.strides, call.input_threshold, packed, begin, end);
  });
  if (!fold) return;
  const int64_t fold_tasks = column_fold_tasks(p, layout);
  parallel_for(fold_tasks, pack_grain(p, fold_tasks), [&](int64_t begin, int64_t end) {
    ops.fold_columns(p, layout, packed, folded, packed_input, begin, end);
  });
}

void convolve_packed(const KernelOps& ops, const ConvCall& call, const uint64_t* packed_input,
                     const ParallelFor& parallel_for) {
  const ConvParams& p = call.params;
  if (p.batch == 0) return;
  OutputStage stage = call.output;
  std::shared_ptr<const ZeroPadCorrection> zero_pad;
  if (p.pad_value == PadValue::Zero && !ops.exact_zero_padding && !stage.zero_pad) {
    zero_pad = cached_zero_pad_correction(p, call.weight_tap_sum);
    stage.zero_pad = zero_pad.get();
  }
  WordBuffer storage;
  const uint64_t* weight = call.formatted_weight ? call.formatted_weight
                                                 : conv_weight(ops, p, call.weight_bits, storage);
  // The kernel runs the folded convolution; the border correction above is p's, whose sums it computes.
  const ConvParams kernel_params = folds_columns(ops, p) ? folded_params(p) : p;
  const ActivationLayout layout = ops.layout(kernel_params);
  parallel_for(ops.conv_tasks(kernel_params, layout), 1, [&](int64_t begin, int64_t end) {
    ops.conv(kernel_params, layout, packed_input, weight, stage, begin, end);
  });
}

void binary_conv2d(const KernelOps& ops, const ConvCall& call, uint64_t* packed_input,
                   const ParallelFor& parallel_for) {
  pack_input(ops, call, packed_input, parallel_for);
  convolve_packed(ops, call, packed_input, parallel_for);
}

void binary_conv2d_serial(const KernelOps& ops, const ConvParams& p, const float* input, TensorStrides strides,
                          const float* weight, const float* scale, const float* bias, float* out,
                          const float* threshold) {
  std::vector<uint64_t> bits(weight_words(p));
  std::vector<int32_t> tap_sum(p.out_channels * p.taps());
  pack_weights(p, weight, bits.data(), tap_sum.data());
  ConvCall call;
  call.params = p;
  call.input = input;
  call.strides = strides;
  call.input_threshold = threshold;
  call.weight_bits = bits.data();
  call.weight_tap_sum = tap_sum.data();
  call.output.scale = scale;
  call.output.bias = bias;
  call.output.out = out;
  WordBuffer packed(packed_input_words(ops, p));
  binary_conv2d(ops, call, packed.data(), run_serially);
}

}  // namespace xnorconv
