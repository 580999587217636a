// CPU feature detection and the one kernel selector.
#include <atomic>
#include <cstdlib>
#include <sstream>

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
};

// Best first; scalar last and always usable.
const Family kFamilies[] = {
#if defined(__x86_64__) || defined(_M_X64)
    {"avx512", avx512_kernel,
     [](const CpuFeatures& f) {
       return f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512vpopcntdq && f.avx2 && f.fma;
     }},
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

std::vector<std::string> CpuFeatures::names() const {
  std::vector<std::string> n;
  const std::pair<const char*, bool> all[] = {{"avx2", avx2}, {"fma", fma}, {"popcnt", popcnt}, {"bmi2", bmi2},
                                              {"avx512f", avx512f}, {"avx512bw", avx512bw}, {"avx512vl", avx512vl},
                                              {"avx512dq", avx512dq}, {"avx512vpopcntdq", avx512vpopcntdq},
                                              {"neon", neon}};
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

std::string set_backend_override(const std::string& name) {
  if (name.empty() || name == "auto") {
    override_slot().store(nullptr);
    return {};
  }
  for (const auto& f : kFamilies) {
    if (name != f.name) continue;
    if (!f.usable(cpu_features()))
      return "backend '" + name + "' is compiled but not supported by this CPU; available: " + join(available_backends());
    override_slot().store(&f.ops());
    return {};
  }
  return "unknown backend '" + name + "'; available: " + join(available_backends());
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

const KernelOps& select_kernel(const ConvParams&) {
  apply_environment_once();
  if (const KernelOps* ops = override_slot().load()) return *ops;
  for (const auto& f : kFamilies)
    if (f.usable(cpu_features())) return f.ops();
  return scalar_kernel();  // unreachable: scalar is always usable
}

}  // namespace xnorconv
