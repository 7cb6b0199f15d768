// Counter-based landmark noise shared by the CPU and CUDA kernels.
// The algorithm is the one documented in lafs_fast/reference.py (the oracle):
// Philox 4x32-10 (Random123), key = (seed lo, seed hi), counter = (k, b, 0, 0);
// u = r * 2^-32 + 2^-33; Box-Muller on (r0, r1) -> (z_x, z_y), all in float32.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LAFS_HD __host__ __device__ __forceinline__
#else
#define LAFS_HD inline
#endif

namespace lafs_fast {

LAFS_HD void philox4x32_10(uint64_t seed, uint32_t c[4]) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c[0];
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
  }
}

// Standard-normal pair for output slot (b, k).
LAFS_HD void landmark_noise(uint64_t seed, int64_t b, int64_t k, float* zx, float* zy) {
  uint32_t c[4] = {static_cast<uint32_t>(k), static_cast<uint32_t>(b), 0u, 0u};
  philox4x32_10(seed, c);
  const float u1 = static_cast<float>(c[0]) * 2.3283064365386963e-10f + 1.1641532182693481e-10f;
  const float u2 = static_cast<float>(c[1]) * 2.3283064365386963e-10f + 1.1641532182693481e-10f;
  const float radius = sqrtf(-2.0f * logf(u1));
  const float angle = 6.2831853071795865f * u2;
  *zx = radius * cosf(angle);
  *zy = radius * sinf(angle);
}

}  // namespace lafs_fast
