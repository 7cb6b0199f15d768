// The keep mask of lafs_fast's counter-based dropout, shared by every CPU kernel that drops
// (counter_dropout_cpu.cpp, gelu_dropout_cpu.cpp), so they draw the same mask for the same
// (seed, flat index). Oracle: lafs_fast/reference.py, dropout_keep_mask:
//   (k0, k1) = the two 32-bit halves of splitmix64(seed)
//   h = mix32(mix32(lo32(i) ^ k0) ^ hi32(i) ^ k1)     mix32 = Wellons' lowbias32 integer hash
//   keep iff h >= round(p * 2^32)
// A hash, not Philox: dropout needs independent-looking bits, not a stream with proven period;
// Philox's ten 64-bit-product rounds per 4 words cost 5x more here (measured).
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "common/multiversion.h"

namespace lafs_fast {

LAFS_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

inline uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Everything a loop needs to decide keep(i): the two key halves and the threshold. Plain data,
// passed by value into the multiversioned loops.
struct CounterMask {
  uint32_t k0, k1, threshold;

  LAFS_INLINE bool keep(int64_t i) const {
    const uint64_t u = static_cast<uint64_t>(i);
    return mix32(mix32(static_cast<uint32_t>(u) ^ k0) ^ static_cast<uint32_t>(u >> 32) ^ k1) >= threshold;
  }
};

// p in [0, 1) (the caller checks); the threshold is round(p * 2^32), which p < 1 keeps below 2^32
// except within 2^-33 of 1.
inline CounterMask counter_mask(int64_t seed, double p) {
  const uint64_t key = splitmix64(static_cast<uint64_t>(seed));
  const double t = std::nearbyint(p * 4294967296.0);
  const uint32_t threshold = t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
  return CounterMask{static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32), threshold};
}

}  // namespace lafs_fast
