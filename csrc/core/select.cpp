// CPU feature detection and the one kernel selector.
#include <atomic>
#include <cstdlib>
#include <sstream>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif
#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "xnorconv_core.h"

namespace xnorconv {

namespace {

CpuFeatures detect() {
  CpuFeatures f;
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  // libgcc/compiler-rt also check XCR0, so AVX/AVX-512 are reported only when the OS saves their registers.
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.popcnt = __builtin_cpu_supports("popcnt");
  f.bmi2 = __builtin_cpu_supports("bmi2");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512dq = __builtin_cpu_supports("avx512dq");
  f.avx512vpopcntdq = __builtin_cpu_supports("avx512vpopcntdq");
  // AMX: CPUID.(7,0):EDX bits 24 (tile) and 25 (int8), and the OS must save the tile state (XCR0 bits 17, 18,
  // readable once CPUID.1:ECX.OSXSAVE says xgetbv is enabled).
  unsigned eax = 0, ebx = 0, ecx = 0, leaf7_edx = 0, leaf1_ecx = 0, edx = 0;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &leaf7_edx) && __get_cpuid(1, &eax, &ebx, &leaf1_ecx, &edx) &&
      (leaf1_ecx >> 27 & 1)) {
    unsigned xcr0_lo = 0, xcr0_hi = 0;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    const bool tile_state = (xcr0_lo >> 17 & 1) && (xcr0_lo >> 18 & 1);
    f.amx_tile = tile_state && (leaf7_edx >> 24 & 1);
    f.amx_int8 = f.amx_tile && (leaf7_edx >> 25 & 1);
  }
#endif
#if defined(__aarch64__)
  f.neon = true;  // Advanced SIMD is mandatory in AArch64.
#endif
  return f;
}

struct Family {
  const char* name;
  const KernelOps& (*ops)();
  bool (*usable)(const CpuFeatures&);
  // Layers (and output layouts) the automatic choice gives this family (nullptr: all); a forced backend takes every
  // layer.
  bool (*suits)(const ConvParams&, bool nhwc_output) = nullptr;
};

#if defined(__x86_64__) || defined(_M_X64)
bool avx512_usable(const CpuFeatures& f) {
  return f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512vpopcntdq && f.avx2 && f.fma;
}

// The tile path wins where every output sums a window of 2x2 or more (3x3 layers from 16 channels up): there each
// tile load feeds many products. With NCHW output, 1x1 layers stay with the bit families: the tiles' 8x wider
// packed input (a byte per sign) and transposing output stage cost more than their faster products save. With NHWC
// output (no transposes) the tiles take 1x1 layers below 1024 channels in and out, where they measured faster than
// the AVX-512 family with its NHWC output stage; from 1024 channels the bit family's products win again.
// Strided 3x3 layers from 64 channels go to the tiles when the output is NHWC (they then pack and convolve in
// about 0.6x the bit families' time), not when it is NCHW, where a layer that also computes its shortcut in the
// output stage measured slower.
// docs/perf/resnet-blocks (amx-strided/, amx-pointwise/) has the runs; `bench_core --backend amx` against
// `--backend avx512`, with and without --nhwc, shows the boundary on a CPU with AMX: revisit it there when either
// family changes.
// Thin inputs are the exception: with its columns folded into channels (fold.cpp), a bit family reads a third of
// the words of a 3x3 layer over 16 channels and outruns the tiles. Folded tiles gain less than the folding pass
// costs (a 64-byte row per pixel to move, where a bit family moves a word), so the AMX family does not fold; where
// folding saves less than half the words (3x3 over 32 channels) the two families measure even.
bool amx_suits(const ConvParams& p, bool nhwc_output) {
  const ColumnFoldWords words = column_fold_words(p);
  const bool thin = p.groups == 1 && 2 * words.folded <= words.unfolded;
  const bool strided = p.stride_h != 1 || p.stride_w != 1;
  if (thin) return false;
  if (p.kernel_h == 1 && p.kernel_w == 1)
    return nhwc_output && p.channels_per_group() < 1024 && p.out_channels_per_group() < 1024;
  if (p.taps() < 4) return false;
  return strided ? nhwc_output && p.channels_per_group() >= 64 : p.channels_per_group() >= 16;
}
#endif

// Best first; scalar last and always usable.
const Family kFamilies[] = {
#if defined(__x86_64__) || defined(_M_X64)
#if XNORCONV_HAVE_AMX
    {"amx", amx_kernel,
     [](const CpuFeatures& f) { return avx512_usable(f) && f.amx_tile && f.amx_int8 && request_amx_permission(); },
     amx_suits},
#endif
    {"avx512", avx512_kernel, avx512_usable},
    {"avx2", avx2_kernel, [](const CpuFeatures& f) { return f.avx2 && f.fma; }},
#endif
#if defined(__aarch64__)
    {"neon", neon_kernel, [](const CpuFeatures& f) { return f.neon; }},
#endif
    {"scalar", scalar_kernel, [](const CpuFeatures&) { return true; }},
};

std::atomic<const KernelOps*>& override_slot() {
  static std::atomic<const KernelOps*> slot{nullptr};
  return slot;
}

std::string join(const std::vector<std::string>& names) {
  std::string s;
  for (const auto& n : names) s += (s.empty() ? "'" : ", '") + n + "'";
  return s;
}

// The environment variable is read once, at first use; a bad value is reported then (by select_kernel's caller
// through backend_override_error()).
std::string& env_error() {
  static std::string error;
  return error;
}

void apply_environment_once() {
  static const bool applied = [] {
    if (const char* env = std::getenv("XNORCONV_BACKEND"); env && *env) {
      const std::string err = set_backend_override(env);
      if (!err.empty()) env_error() = "XNORCONV_BACKEND: " + err;
    }
    return true;
  }();
  (void)applied;
}

}  // namespace

#if defined(__x86_64__) || defined(_M_X64)
bool request_amx_permission() {
  static const bool granted = [] {
#if defined(__linux__)
    // Linux >= 5.16 keeps the 8 KB tile state off until a process asks for it; without the grant the first tile
    // instruction faults. XFEATURE_XTILEDATA = 18.
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;  // no known way to ask for the tile state elsewhere: AMX stays off
#endif
  }();
  return granted;
}
#endif

std::vector<std::string> CpuFeatures::names() const {
  std::vector<std::string> n;
  const std::pair<const char*, bool> all[] = {{"avx2", avx2}, {"fma", fma}, {"popcnt", popcnt}, {"bmi2", bmi2},
                                              {"avx512f", avx512f}, {"avx512bw", avx512bw}, {"avx512vl", avx512vl},
                                              {"avx512dq", avx512dq}, {"avx512vpopcntdq", avx512vpopcntdq},
                                              {"amx_tile", amx_tile}, {"amx_int8", amx_int8}, {"neon", neon}};
  for (const auto& [name, present] : all)
    if (present) n.emplace_back(name);
  return n;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

std::vector<std::string> available_backends() {
  std::vector<std::string> names;
  for (const auto& f : kFamilies)
    if (f.usable(cpu_features())) names.emplace_back(f.name);
  return names;
}

std::vector<std::string> compiled_backends() {
  std::vector<std::string> names;
  for (const auto& f : kFamilies) names.emplace_back(f.name);
  return names;
}

const KernelOps* find_backend(const std::string& name, std::string* error) {
  for (const auto& f : kFamilies) {
    if (name != f.name) continue;
    if (f.usable(cpu_features())) return &f.ops();
    if (error)
      *error = "backend '" + name + "' is compiled but not supported by this CPU; available: " +
               join(available_backends());
    return nullptr;
  }
  if (error) *error = "unknown backend '" + name + "'; available: " + join(available_backends());
  return nullptr;
}

std::string set_backend_override(const std::string& name) {
  if (name.empty() || name == "auto") {
    override_slot().store(nullptr);
    return {};
  }
  std::string error;
  const KernelOps* ops = find_backend(name, &error);
  if (ops) override_slot().store(ops);
  return error;
}

std::string backend_override() {
  apply_environment_once();
  const KernelOps* ops = override_slot().load();
  return ops ? ops->name : "";
}

std::string backend_environment_error() {
  apply_environment_once();
  return env_error();
}

const KernelOps& select_kernel(const ConvParams& p, bool nhwc_output) {
  apply_environment_once();
  if (const KernelOps* ops = override_slot().load()) return *ops;
  for (const auto& f : kFamilies)
    if (f.usable(cpu_features()) && (!f.suits || f.suits(p, nhwc_output))) return f.ops();
  return scalar_kernel();  // unreachable: scalar is always usable
}

const KernelOps& select_float_kernel() {
  apply_environment_once();
  if (const KernelOps* ops = override_slot().load()) return *ops;
  for (const auto& f : kFamilies)
    if (f.usable(cpu_features())) return f.ops();
  return scalar_kernel();  // unreachable: scalar is always usable
}

}  // namespace xnorconv
