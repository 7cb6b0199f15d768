// Hot CPU loops compiled for several x86-64 instruction sets and picked at run time:
//   avx512   AVX-512 F/BW/VL/DQ, 512-bit vectors preferred;
//   avx2     AVX2 (256-bit);
//   baseline x86-64 (SSE2), and the only build elsewhere.
// No path contracts a*b+c into an FMA (avx2 does not enable FMA; AVX-512 would, so its target
// turns contraction off), so every path rounds as the PyTorch references do and the paths agree
// bitwise wherever they run the same operations in the same order.
//
// The path in use is the best the CPU supports, capped by the environment variable
// LAFS_FAST_CPU_ISA=avx512|avx2|baseline (read once, at the first kernel call) or set by the op
// lafs_fast::set_cpu_isa (tests force each path the machine supports; cpu/cpu_isa.cpp).
//
// How a kernel is multiversioned: its body is a LAFS_INLINE function (and everything it calls in
// the hot loop is LAFS_INLINE too), and thin wrappers marked LAFS_TARGET_AVX512 /
// LAFS_TARGET_AVX2 / nothing call it; the body is inlined into each wrapper and compiled for the
// wrapper's target. lafs_fast::with_cpu_isa(f) runs f(isa_tag) with a compile-time tag of the
// active path, for the wrappers to switch on.
#pragma once

#include <type_traits>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define LAFS_X86_MULTIVERSION 1
#define LAFS_TARGET_AVX2 __attribute__((target("avx2")))
#define LAFS_TARGET_AVX512                                                                  \
  __attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512"), \
                 optimize("fp-contract=off")))
#else
#define LAFS_X86_MULTIVERSION 0
#define LAFS_TARGET_AVX2
#define LAFS_TARGET_AVX512
#endif

// Helpers called from a multiversioned loop are force-inlined: an out-of-line copy would be
// compiled for the baseline target only and miss the wider clone of its caller.
#define LAFS_INLINE inline __attribute__((always_inline))

namespace lafs_fast {

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The path the kernels use now (cpu/cpu_isa.cpp). Throws (c10::Error) when LAFS_FAST_CPU_ISA
// names no path.
CpuIsa active_cpu_isa();

template <CpuIsa I>
using IsaTag = std::integral_constant<CpuIsa, I>;

// Runs f(IsaTag<active path>{}). The three calls are distinct instantiations, so f can pass the
// tag on to a wrapper compiled for that target.
template <typename F>
decltype(auto) with_cpu_isa(F&& f) {
#if LAFS_X86_MULTIVERSION
  switch (active_cpu_isa()) {
    case CpuIsa::kAvx512: return f(IsaTag<CpuIsa::kAvx512>{});
    case CpuIsa::kAvx2: return f(IsaTag<CpuIsa::kAvx2>{});
    default: break;
  }
#endif
  return f(IsaTag<CpuIsa::kBaseline>{});
}

}  // namespace lafs_fast

// Defines NAME(IsaTag, args...): three overloads (avx512, avx2, baseline) that forward args to
// the LAFS_INLINE function (template) BODY, each compiled for its tag's target. BODY's template
// arguments must be deducible from args (pass compile-time values as std::integral_constant).
#define LAFS_ISA_WRAPPERS(NAME, BODY)                                   \
  template <typename... A>                                              \
  LAFS_TARGET_AVX512 void NAME(::lafs_fast::IsaTag<::lafs_fast::CpuIsa::kAvx512>, A&&... a) { \
    BODY(static_cast<A&&>(a)...);                                       \
  }                                                                     \
  template <typename... A>                                              \
  LAFS_TARGET_AVX2 void NAME(::lafs_fast::IsaTag<::lafs_fast::CpuIsa::kAvx2>, A&&... a) { \
    BODY(static_cast<A&&>(a)...);                                       \
  }                                                                     \
  template <typename... A>                                              \
  void NAME(::lafs_fast::IsaTag<::lafs_fast::CpuIsa::kBaseline>, A&&... a) { \
    BODY(static_cast<A&&>(a)...);                                       \
  }
