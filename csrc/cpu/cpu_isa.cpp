// Which instruction-set path the multiversioned CPU kernels take (common/multiversion.h), and
// the kernels of the ops that report and force it (schemas in lafs_ops.cpp):
//   lafs_fast::cpu_isa() -> str                 the path in use ("avx512", "avx2", "baseline")
//   lafs_fast::cpu_isa_supported() -> str[]     every path this CPU can run, best first
//   lafs_fast::set_cpu_isa(str isa) -> str      use `isa` from now on; returns the previous path
// The default is the best supported path, capped by LAFS_FAST_CPU_ISA (read at the first use).
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/multiversion.h"

namespace lafs_fast {
namespace {

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

CpuIsa best_supported() {
#if LAFS_X86_MULTIVERSION
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return CpuIsa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2")) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kBaseline;
}

// Parses a path name; `what` names the source of the value in the error.
CpuIsa parse_isa(const std::string& name, const char* what) {
  for (CpuIsa isa : {CpuIsa::kAvx512, CpuIsa::kAvx2, CpuIsa::kBaseline}) {
    if (name == isa_name(isa)) return isa;
  }
  TORCH_CHECK(false, "lafs_fast: ", what, " must be one of avx512, avx2, baseline, got '", name,
              "'");
}

// -1: not resolved yet (the environment is read on the first use, not at load time, so that a
// bad value surfaces as an error of a kernel call rather than of the import).
std::atomic<int> g_active{-1};

CpuIsa from_environment() {
  const CpuIsa best = best_supported();
  const char* env = std::getenv("LAFS_FAST_CPU_ISA");
  if (env == nullptr || env[0] == '\0') return best;
  const CpuIsa wanted = parse_isa(env, "LAFS_FAST_CPU_ISA");
  if (static_cast<int>(wanted) > static_cast<int>(best)) {
    TORCH_WARN("lafs_fast: LAFS_FAST_CPU_ISA=", env, " is not supported by this CPU; using ",
               isa_name(best));
    return best;
  }
  return wanted;
}

std::string cpu_isa_op() { return isa_name(active_cpu_isa()); }

std::vector<std::string> cpu_isa_supported_op() {
  std::vector<std::string> out;
  for (int i = static_cast<int>(best_supported()); i >= 0; --i) {
    out.emplace_back(isa_name(static_cast<CpuIsa>(i)));
  }
  return out;
}

std::string set_cpu_isa_op(std::string name) {
  const CpuIsa wanted = parse_isa(name, "set_cpu_isa's isa");
  TORCH_CHECK(static_cast<int>(wanted) <= static_cast<int>(best_supported()),
              "lafs_fast.set_cpu_isa: this CPU does not support ", name, " (best: ",
              isa_name(best_supported()), ")");
  const std::string previous = isa_name(active_cpu_isa());
  g_active.store(static_cast<int>(wanted));
  return previous;
}

}  // namespace

CpuIsa active_cpu_isa() {
  int v = g_active.load(std::memory_order_relaxed);
  if (v < 0) {
    // Racing first calls all compute the same value; a throw leaves the state unresolved.
    int expected = -1;
    g_active.compare_exchange_strong(expected, static_cast<int>(from_environment()));
    v = g_active.load();
  }
  return static_cast<CpuIsa>(v);
}

}  // namespace lafs_fast

// No tensor arguments, so no backend key to dispatch on: one kernel for every backend (the
// dispatcher sends tensor-less calls to the CompositeImplicitAutograd kernel).
TORCH_LIBRARY_IMPL(lafs_fast, CompositeImplicitAutograd, m) {
  m.impl("cpu_isa", &lafs_fast::cpu_isa_op);
  m.impl("cpu_isa_supported", &lafs_fast::cpu_isa_supported_op);
  m.impl("set_cpu_isa", &lafs_fast::set_cpu_isa_op);
}
