// Microbenchmark of the kernel core (no torch): for each usable kernel family and each layer, the time of the
// binarize+pack pass and of the convolution pass on pre-packed input, the binary MAC rate, and its fraction of the
// family's peak measured by its own probe. Runs natively anywhere the core builds (x86, Raspberry Pi, Jetson).
//
//   bench_core [--threads N] [--reps R] [--backend NAME] [--pad-value 1|0|-1] [--nhwc]
//              [--shape cin,cout,hw,k,stride,pad]... [--stem cin,cout,hw,k,stride,pad]...
//              [--shortcut cin,cout,hw,stride]... [--unit] [--unit-offset BYTES]
//
// --nhwc: channels_last input and output (families that cannot write NHWC are skipped), as a frozen model running
// in channels_last calls them.
// --stem: the float first layer (first_layer_conv, with bias and PReLU) instead of the binary layers (both when
// --shape is given too): its time and its fp32 MAC rate as a fraction of the fp32 FMA probe.
// --shortcut: the real-valued shortcut (real_shortcut, NCHW or with --nhwc NHWC) with each family's float loops:
// its time and the bytes it moves (input read, output written) per second.
// --unit: the binary layers end a Bi-Real / ReActNet / BinaryDNet53 unit in their output stage, as a frozen model
// calls them: the input added as the shortcut (NCHW: real_shortcut's channel mapping when cin != cout; NHWC: cin
// must equal cout) and a PReLU. The shortcut starts --unit-offset bytes (default 128, a multiple of 4) past the
// output modulo 4 KiB, as consecutive PyTorch tensors of one size do.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "xnorconv_core.h"

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(__x86_64__)
#include <immintrin.h>
#endif

using namespace xnorconv;
using Clock = std::chrono::steady_clock;

namespace {

// Splits [0, tasks) into `threads` contiguous ranges, like at::parallel_for. With OpenMP (what torch's
// at::parallel_for runs on) the team persists between calls, so a 2-thread figure is the kernel's scaling and not
// the cost of starting threads; without it each call starts and joins threads.
template <class F>
void parallel(int threads, int64_t tasks, F&& f) {
  if (threads <= 1 || tasks <= 1) {
    f(0, tasks);
    return;
  }
  const int64_t chunk = (tasks + threads - 1) / threads;
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads)
  {
    const int64_t b = omp_get_thread_num() * chunk, e = std::min(tasks, b + chunk);
    if (b < e) f(b, e);
  }
#else
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    const int64_t b = t * chunk, e = std::min(tasks, b + chunk);
    if (b < e) pool.emplace_back([&f, b, e] { f(b, e); });
  }
  for (auto& th : pool) th.join();
#endif
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double peak_rate(const KernelOps& ops, int threads) {
  // Long enough (~50 ms) to be stable; best of 10 (the host is shared: a slow round is interference).
  const int64_t iters = 2'000'000;
  double best = 0;
  for (int r = 0; r < 10; ++r) {
    const auto t0 = Clock::now();
    std::vector<uint64_t> macs(threads);
    parallel(threads, threads, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) macs[i] = ops.peak_probe(iters);
    });
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    uint64_t total = 0;
    for (auto m : macs) total += m;
    best = std::max(best, total / s);
  }
  return best;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The fp32 side of the comparison, measured the same way: independent AVX-512 FMAs on registers (16 lanes each).
// Its ratio to the binary probe is this machine's ceiling for binary over fp32 convolution, whatever the core's
// number of FMA ports.
__attribute__((target("avx512f"))) double fp32_fma_probe_once(int64_t iterations) {
  constexpr int kAcc = 16;
  __m512 acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_ps(0.001f * i);
  __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(0.0001f);
  const auto t0 = Clock::now();
  for (int64_t it = 0; it < iterations; ++it) {
    __asm__ volatile("" : "+v"(a), "+v"(b));
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  // Summed through memory: GCC 12 warns inside _mm512_reduce_add_ps's own header code.
  __m512 total = acc[0];
  for (int i = 1; i < kAcc; ++i) total = _mm512_add_ps(total, acc[i]);
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, total);
  float sink = 0;
  for (float lane : lanes) sink += lane;
  volatile float keep = sink;
  (void)keep;
  return static_cast<double>(iterations) * kAcc * 16 / s;
}

double fp32_fma_peak() {
  if (!cpu_features().avx512f) return 0;
  double best = 0;
  for (int r = 0; r < 10; ++r) best = std::max(best, fp32_fma_probe_once(4'000'000));
  return best;
}
#else
double fp32_fma_peak() { return 0; }
#endif

// run() once, its result `out` checked against `want` (the scalar family's: the same bits), then the median ms of
// `reps` runs; -1 if the results differ.
template <class Run>
double checked_median_ms(const Run& run, const std::vector<float>& out, const std::vector<float>& want, int reps) {
  run();
  if (out != want) return -1;
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    run();
    t.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  return median(t);
}

// The float first layer of each shape on `ops`: checked against the scalar family (the same bits), then timed.
int time_stems(const KernelOps& ops, const std::vector<std::vector<int64_t>>& stems, bool nhwc, int reps,
               double fma, const ParallelFor& parallel_for) {
  std::mt19937 rng(11);
  std::normal_distribution<float> dist;
  std::printf("%-26s %10s %12s %8s\n", "stem", "ms", "fp32 GMAC/s", "of FMA");
  for (const auto& v : stems) {
    FirstLayerShape s;
    s.batch = 1;
    s.in_channels = v[0];
    s.out_channels = v[1];
    s.height = s.width = v[2];
    s.kernel_h = s.kernel_w = v[3];
    s.stride_h = s.stride_w = v[4];
    s.pad_h = s.pad_w = v[5];
    s.channels_last = nhwc;
    if (const std::string err = validate(s); !err.empty()) {
      std::fprintf(stderr, "bad stem: %s\n", err.c_str());
      return 2;
    }
    std::vector<float> x(s.in_channels * s.height * s.width), w(s.out_channels * s.in_channels * v[3] * v[3]),
        bias(s.out_channels), slope(s.out_channels, 0.25f);
    for (auto* t : {&x, &w, &bias})
      for (auto& e : *t) e = dist(rng);
    const size_t outputs = static_cast<size_t>(s.out_channels * s.out_height() * s.out_width());
    std::vector<float> out(outputs), want(outputs);
    FirstLayerCall call{s, x.data(), w.data(), bias.data(), slope.data(), want.data()};
    first_layer_conv(scalar_kernel(), call, run_serially);
    call.out = out.data();
    const double ms = checked_median_ms([&] { first_layer_conv(ops, call, parallel_for); }, out, want, reps);
    if (ms < 0) {
      std::fprintf(stderr, "[%s] first layer differs from scalar on this stem\n", ops.name);
      return 1;
    }
    const double rate = static_cast<double>(outputs) * s.in_channels * v[3] * v[3] / (ms * 1e-3);
    char label[64];
    std::snprintf(label, sizeof label, "%lld,%lld,%lld,%lld,%lld,%lld", (long long)v[0], (long long)v[1],
                  (long long)v[2], (long long)v[3], (long long)v[4], (long long)v[5]);
    std::printf("%-26s %10.4f %12.1f", label, ms, rate / 1e9);
    if (fma > 0) std::printf(" %7.0f%%", 100.0 * rate / fma);
    std::printf("\n");
  }
  return 0;
}

// The real shortcut of each shape on `ops`: checked against the scalar family (the same bits), then timed.
int time_shortcuts(const KernelOps& ops, const std::vector<std::vector<int64_t>>& shortcuts, bool nhwc, int reps,
                   const ParallelFor& parallel_for) {
  std::mt19937 rng(13);
  std::normal_distribution<float> dist;
  std::printf("%-26s %10s %10s\n", "shortcut", "ms", "GB/s");
  for (const auto& v : shortcuts) {
    ShortcutShape s;
    s.batch = 1;
    s.in_channels = v[0];
    s.out_channels = v[1];
    s.height = s.width = v[2];
    s.stride = v[3];
    s.nhwc = nhwc;
    if (s.in_channels < 1 || s.out_channels < 1 || s.height < 1 || (s.stride != 1 && s.stride != 2)) {
      std::fprintf(stderr, "bad shortcut: wants positive cin, cout, hw and stride 1 or 2\n");
      return 2;
    }
    const int64_t side = (s.height + s.stride - 1) / s.stride;
    std::vector<float> x(s.in_channels * s.height * s.width), out(s.out_channels * side * side), want(out.size());
    for (auto& e : x) e = dist(rng);
    real_shortcut(scalar_kernel(), s, x.data(), want.data(), run_serially);
    const double ms =
        checked_median_ms([&] { real_shortcut(ops, s, x.data(), out.data(), parallel_for); }, out, want, reps);
    if (ms < 0) {
      std::fprintf(stderr, "[%s] real_shortcut differs from scalar on this shape\n", ops.name);
      return 1;
    }
    const double bytes = sizeof(float) * static_cast<double>(x.size() + out.size());
    char label[64];
    std::snprintf(label, sizeof label, "%lld,%lld,%lld,%lld", (long long)v[0], (long long)v[1], (long long)v[2],
                  (long long)v[3]);
    std::printf("%-26s %10.4f %10.1f\n", label, ms, bytes / (ms * 1e-3) / 1e9);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 1, reps = 50, pad_value = 1;
  bool nhwc = false, unit = false;
  int64_t unit_offset = 128;
  std::string only_backend;
  std::vector<std::vector<int64_t>> shapes, stems, shortcuts;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--threads") && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--reps") && i + 1 < argc) reps = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--backend") && i + 1 < argc) only_backend = argv[++i];
    else if (!std::strcmp(argv[i], "--nhwc")) nhwc = true;
    else if (!std::strcmp(argv[i], "--unit")) unit = true;
    else if (!std::strcmp(argv[i], "--unit-offset") && i + 1 < argc) {
      unit_offset = std::atoll(argv[++i]);
      if (unit_offset < 0 || unit_offset >= 4096 || unit_offset % 4 != 0) {
        std::fprintf(stderr, "--unit-offset wants a multiple of 4 in [0, 4096), got %s\n", argv[i]);
        return 2;
      }
    }
    else if (!std::strcmp(argv[i], "--pad-value") && i + 1 < argc) {
      pad_value = std::atoi(argv[++i]);
      if (pad_value < -1 || pad_value > 1) {
        std::fprintf(stderr, "--pad-value wants 1, 0 or -1\n");
        return 2;
      }
    }
    else if ((!std::strcmp(argv[i], "--shape") || !std::strcmp(argv[i], "--stem")) && i + 1 < argc) {
      const bool stem = !std::strcmp(argv[i], "--stem");
      std::vector<int64_t> s;
      for (char* tok = std::strtok(argv[++i], ","); tok; tok = std::strtok(nullptr, ",")) s.push_back(std::atoll(tok));
      if (s.size() != 6) {
        std::fprintf(stderr, "%s wants cin,cout,hw,k,stride,pad\n", stem ? "--stem" : "--shape");
        return 2;
      }
      (stem ? stems : shapes).push_back(s);
    } else if (!std::strcmp(argv[i], "--shortcut") && i + 1 < argc) {
      std::vector<int64_t> s;
      for (char* tok = std::strtok(argv[++i], ","); tok; tok = std::strtok(nullptr, ",")) s.push_back(std::atoll(tok));
      if (s.size() != 4) {
        std::fprintf(stderr, "--shortcut wants cin,cout,hw,stride\n");
        return 2;
      }
      shortcuts.push_back(s);
    } else {
      std::fprintf(stderr, "usage: %s [--threads N] [--reps R] [--backend NAME] [--pad-value 1|0|-1] [--nhwc] "
                   "[--shape cin,cout,hw,k,stride,pad]... [--stem cin,cout,hw,k,stride,pad]... "
                   "[--shortcut cin,cout,hw,stride]... [--unit] [--unit-offset BYTES]\n",
                   argv[0]);
      return 2;
    }
  }
  if (shapes.empty() && stems.empty() && shortcuts.empty())
    shapes = {{64, 64, 64, 3, 1, 1}, {128, 128, 32, 3, 1, 1}, {256, 256, 16, 3, 1, 1},
              {512, 512, 8, 3, 1, 1}, {256, 512, 16, 3, 2, 1}, {512, 256, 8, 1, 1, 0}};
  std::printf("threads %d, reps %d (median), pad_value %+d, batch 1, %s%s\n", threads, reps, pad_value,
              nhwc ? "NHWC (channels_last) input and output" : "NCHW input and output",
              unit ? ", output stage + input shortcut + PReLU" : "");
  if (unit) std::printf("shortcut %lld bytes past the output modulo 4 KiB\n", static_cast<long long>(unit_offset));
  // Measured once, so that every family's ceiling is a ratio to the same fp32 figure.
  const double fma = fp32_fma_peak();
  if (fma > 0) std::printf("fp32 FMA probe (AVX-512, 1 thread, best of 10): %.1f GFMA/s\n", fma / 1e9);
  std::mt19937 rng(7);
  std::normal_distribution<float> dist;
  std::vector<std::string> backends = available_backends();
  if (!only_backend.empty()) {
    std::string err;
    if (!find_backend(only_backend, &err)) {
      std::fprintf(stderr, "--backend: %s\n", err.c_str());
      return 2;
    }
    backends = {only_backend};
  }
  // Like at::parallel_for: a range no longer than the grain runs on the calling thread.
  const ParallelFor parallel_for = [threads](int64_t tasks, int64_t grain, const TaskBody& body) {
    if (tasks <= grain)
      run_serially(tasks, grain, body);
    else
      parallel(threads, tasks, body);
  };
  for (const auto& name : backends) {
    const KernelOps& ops = *find_backend(name);
    if (!stems.empty()) {
      std::printf("\n[%s] float first layer\n", name.c_str());
      if (const int rc = time_stems(ops, stems, nhwc, reps, fma, parallel_for)) return rc;
    }
    if (!shortcuts.empty()) {
      std::printf("\n[%s] real shortcut\n", name.c_str());
      if (const int rc = time_shortcuts(ops, shortcuts, nhwc, reps, parallel_for)) return rc;
    }
    if (shapes.empty()) continue;
    if (nhwc && !ops.channels_last_output) {
      std::printf("\n[%s] skipped: writes NCHW only\n", name.c_str());
      continue;
    }
    const double peak = peak_rate(ops, threads);
    std::printf("\n[%s] peak probe: %.1f binary GMAC/s", name.c_str(), peak / 1e9);
    if (fma > 0) std::printf(" = %.1fx the fp32 FMA probe (the ceiling of binary over fp32 here)", peak / threads / fma);
    std::printf("\n");
    std::printf("%-26s %10s %10s %12s %8s%s\n", "layer", "pack ms", "conv ms", "conv GMAC/s", "of peak",
                unit ? "  conv ms (steps tested per vector)" : "");
    for (const auto& s : shapes) {
      ConvParams p = square_layer(s[0], s[1], s[2], s[3], s[4], s[5]);
      p.pad_value = static_cast<PadValue>(pad_value);
      if (const std::string err = validate(p); !err.empty()) {
        std::fprintf(stderr, "bad shape: %s\n", err.c_str());
        return 2;
      }
      if (unit && (p.stride_h != 1 || p.out_h() != p.in_h || (nhwc && p.in_channels != p.out_channels))) {
        std::fprintf(stderr, "--unit wants stride 1 and same-size output (and cin == cout with --nhwc)\n");
        return 2;
      }
      std::vector<float> x(p.in_channels * p.in_h * p.in_w), w(p.out_channels * p.in_channels * p.taps());
      for (auto& e : x) e = dist(rng);
      for (auto& e : w) e = dist(rng);
      WordBuffer packed(packed_input_words(ops, p)), bits(weight_words(p)), formatted;
      std::vector<int32_t> tap_sum(p.out_channels * p.taps());
      pack_weights(p, w.data(), bits.data(), tap_sum.data());
      std::vector<float> out(p.out_channels * p.out_h() * p.out_w()), slope(p.out_channels, 0.25f);
      // --unit's shortcut: a copy of the input that starts unit_offset bytes past the output modulo 4 KiB. At the
      // same offset modulo 4 KiB (the default placement of two large vectors), residual loads are falsely taken to
      // depend on output stores 4 KiB away and wait for them: docs/perf/output-steps measures that collision.
      std::vector<float> shortcut(unit ? x.size() + 2048 : 0);
      float* shortcut_input = nullptr;
      if (unit) {
        const uintptr_t offset = reinterpret_cast<uintptr_t>(out.data()) % 4096 + static_cast<uintptr_t>(unit_offset);
        const uintptr_t address = reinterpret_cast<uintptr_t>(shortcut.data());
        shortcut_input = shortcut.data() + (4096 + offset - address % 4096) % 4096 / sizeof(float);
        std::copy(x.begin(), x.end(), shortcut_input);
      }
      ConvCall call;
      call.params = p;
      call.input = x.data();
      call.strides = nhwc ? TensorStrides{p.in_channels * p.in_h * p.in_w, 1, p.in_w * p.in_channels, p.in_channels}
                          : TensorStrides{p.in_channels * p.in_h * p.in_w, p.in_h * p.in_w, p.in_w, 1};
      call.output.channels_last = nhwc;
      call.weight_bits = bits.data();
      call.weight_tap_sum = tap_sum.data();
      call.output.out = out.data();
      if (unit) {
        call.output.residual = shortcut_input;
        call.output.residual_channels = p.in_channels == p.out_channels ? 0 : p.in_channels;
        call.output.prelu = slope.data();
      }
      // Kept across calls by the op (the weight format, the border correction), so made once here too.
      call.formatted_weight = conv_weight(ops, p, bits.data(), formatted);
      const ZeroPadCorrection zero_pad = zero_pad_correction(p, tap_sum.data());
      if (p.pad_value == PadValue::Zero) call.output.zero_pad = &zero_pad;
      // Correctness first: this family against the scalar one on this very layer (NCHW output of both; the NHWC
      // output of the timed call, transposed, as well; with --unit the timed call itself, against the scalar
      // family's run of it).
      {
        std::vector<float> want(out.size()), got(out.size());
        if (unit) {
          ConvCall scalar_call = call;
          WordBuffer scalar_formatted, scalar_packed(packed_input_words(scalar_kernel(), p));
          scalar_call.formatted_weight = conv_weight(scalar_kernel(), p, bits.data(), scalar_formatted);
          scalar_call.output.out = want.data();
          binary_conv2d(scalar_kernel(), scalar_call, scalar_packed.data(), run_serially);
          pack_input(ops, call, packed.data(), parallel_for);
          convolve_packed(ops, call, packed.data(), parallel_for);
          got = out;
        } else {
          binary_conv2d_serial(scalar_kernel(), p, x.data(), call.strides, w.data(), nullptr, nullptr, want.data());
          binary_conv2d_serial(ops, p, x.data(), call.strides, w.data(), nullptr, nullptr, got.data());
        }
        if (nhwc && !unit) {
          pack_input(ops, call, packed.data(), parallel_for);
          convolve_packed(ops, call, packed.data(), parallel_for);
          const int64_t plane = p.out_h() * p.out_w();
          for (int64_t o = 0; o < p.out_channels; ++o)
            for (int64_t q = 0; q < plane; ++q) got[o * plane + q] = out[q * p.out_channels + o];
        }
        if (want != got) {
          std::fprintf(stderr, "[%s] result differs from scalar on this layer\n", name.c_str());
          return 1;
        }
      }
      // With --unit, the convolution pass is also timed (interleaved) with the output stage that tests its steps per
      // vector, which the fixed steps replace.
      ConvCall per_vector = call;
      per_vector.output.per_vector_steps = true;
      std::vector<double> pack_t, conv_t, per_vector_t;
      for (int r = 0; r < reps; ++r) {
        auto t0 = Clock::now();
        pack_input(ops, call, packed.data(), parallel_for);
        auto t1 = Clock::now();
        convolve_packed(ops, call, packed.data(), parallel_for);
        auto t2 = Clock::now();
        pack_t.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
        conv_t.push_back(std::chrono::duration<double, std::milli>(t2 - t1).count());
        if (!unit) continue;
        t0 = Clock::now();
        convolve_packed(ops, per_vector, packed.data(), parallel_for);
        per_vector_t.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
      }
      const double macs = static_cast<double>(p.out_channels) * p.out_h() * p.out_w() * p.depth();
      const double conv_ms = median(conv_t), rate = macs / (conv_ms * 1e-3);
      char label[64];
      std::snprintf(label, sizeof label, "%lld,%lld,%lld,%lld,%lld,%lld", (long long)s[0], (long long)s[1],
                    (long long)s[2], (long long)s[3], (long long)s[4], (long long)s[5]);
      std::printf("%-26s %10.4f %10.4f %12.1f %7.0f%%", label, median(pack_t), conv_ms, rate / 1e9, 100.0 * rate / peak);
      if (unit) std::printf(" %14.4f", median(per_vector_t));
      std::printf("\n");
    }
  }
  return 0;
}
