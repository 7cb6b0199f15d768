// Hot CPU loops compiled twice, for AVX2 (without FMA, so that a*b+c stays two roundings as in
// the PyTorch references) and for the x86-64 baseline, picked at load time by the CPU (GCC
// target_clones / ifunc); elsewhere one baseline build (where the baseline has FMA the compiler
// may contract a*b+c: an ulp, inside the tests' tolerances).
#pragma once

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define LAFS_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define LAFS_MULTIVERSION
#endif

// Helpers called from a multiversioned loop are force-inlined: an out-of-line copy would be
// compiled for the baseline target only and miss the AVX2 clone of its caller.
#define LAFS_INLINE inline __attribute__((always_inline))
