// The full 2x2 windows of real_shortcut's stride-2 NCHW pool (shortcut.cpp), written once over a family's vector
// trait V (output_stage.h's broadcast, add, mul, load, store and run), which adds one primitive:
//   F pair_sums(F a, F b)   [a0 + a1, a2 + a3, ..., b0 + b1, b2 + b3, ...]: the sums of the consecutive pairs of
//                           the 2 * kLanes floats of a then b
// Each output is ((top[2j] + bottom[2j]) + (top[2j + 1] + bottom[2j + 1])) * scale: the row sums first, then the
// pair, as the portable loop and the NHWC path add, so every family gives the same bits. Included by each family
// after its ISA pragma (the AVX-512 one serves the AMX family too) and installed by with_window_means.
#pragma once

namespace xnorconv {
namespace {

template <class V>
void window_means(const float* top, const float* bottom, float scale, bool accumulate, float* out, int64_t count) {
  using F = typename V::F;
  constexpr int kLanes = V::kLanes;
  const F factor = V::broadcast(scale);
  for (int64_t j = 0; j < count; j += kLanes) {
    const int lanes = count - j < kLanes ? static_cast<int>(count - j) : kLanes;
    // Inputs 2j ... 2j + 2 * lanes - 1: a first vector and what is left of them in a second (none read past).
    const int first = 2 * lanes < kLanes ? 2 * lanes : kLanes, second = 2 * lanes - first;
    const int64_t at = 2 * j;
    const F low = V::add(V::load(top, V::run(at, first)), V::load(bottom, V::run(at, first)));
    const F high = V::add(V::load(top, V::run(at + kLanes, second)), V::load(bottom, V::run(at + kLanes, second)));
    F y = V::mul(V::pair_sums(low, high), factor);
    const auto where = V::run(j, lanes);
    if (accumulate) y = V::add(V::load(out, where), y);
    V::store(out, where, y);
  }
}

template <class V>
KernelOps with_window_means(KernelOps ops) {
  ops.window_means = window_means<V>;
  return ops;
}

}  // namespace
}  // namespace xnorconv
