// Bilinear taps along one axis, following grid_sample (align_corners=False, zero padding) in
// pixel units: pixel i's centre is coordinate i. Shared by the CPU and CUDA kernels.
#pragma once
#include <cmath>
#include <cstdint>

#include "philox.h"

namespace lafs_fast {

#if !defined(__CUDACC__) && !defined(__HIPCC__)
using std::floor;  // host builds: the unqualified calls below must find the std overloads
using std::isfinite;
#endif

template <typename T>
struct AxisTaps {
  int64_t i0;    // floor(coord); the taps are i0 and i0 + 1
  T w0, w1;      // weights of the two taps (d w0 / d coord = -1, d w1 / d coord = +1)
  bool v0, v1;   // whether each tap lies inside [0, size)
};

// `coord` must be finite. Clamping to [-2, size + 1] changes no value or gradient (all taps are
// outside there) and keeps the float->int conversion of huge coordinates defined.
template <typename T>
LAFS_HD AxisTaps<T> axis_taps(T coord, int64_t size) {
  const T lo = T(-2), hi = static_cast<T>(size + 1);
  coord = coord < lo ? lo : (coord > hi ? hi : coord);
  const T f = floor(coord);
  AxisTaps<T> t;
  t.i0 = static_cast<int64_t>(f);
  t.w1 = coord - f;
  t.w0 = T(1) - t.w1;
  t.v0 = t.i0 >= 0 && t.i0 < size;
  t.v1 = t.i0 + 1 >= 0 && t.i0 + 1 < size;
  return t;
}

// Offset of patch tap i from its landmark: i - P/2 - 0.5 (exact in float).
template <typename T>
LAFS_HD T tap_offset(int64_t i, int64_t patch_size) {
  return static_cast<T>(i) - (static_cast<T>(patch_size) * T(0.5) + T(0.5));
}

// The landmark sampled by output slot (b, k): gather through `index`, add the noise.
// Returns false when it is not finite or the index is out of range (zero patch, zero gradient).
template <typename T>
LAFS_HD bool slot_landmark(const T lx_in, const T ly_in, bool index_ok, float perturb_std,
                           uint64_t seed, int64_t b, int64_t k, T* lx, T* ly) {
  if (!index_ok) return false;
  T x = lx_in, y = ly_in;
  if (perturb_std > 0.0f) {
    float zx, zy;
    landmark_noise(seed, b, k, &zx, &zy);
    x += static_cast<T>(perturb_std * zx);
    y += static_cast<T>(perturb_std * zy);
  }
  *lx = x;
  *ly = y;
  return isfinite(x) && isfinite(y);
}

}  // namespace lafs_fast
