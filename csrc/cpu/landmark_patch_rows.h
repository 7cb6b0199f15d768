// Per-row (per output slot) CPU work of the landmark patch ops, free of torch so it can be
// micro-benchmarked on its own: sampling a patch, and turning a patch gradient into landmark
// and image gradients. The threading, GEMMs and tensor handling live in
// landmark_patch_embed_cpu.cpp. Semantics: lafs_fast/reference.py.
//
// Patch layout of the row kernels: planar, value (i, j, c) (i along x, j along y, channel c) at
// (c * P + j) * P + i, the image's own order: a window row interpolates into P consecutive
// values, so patches are written (and patch gradients read) as whole vectors. The fused op
// multiplies planar patches by the weight with its columns permuted to match; landmark_patches
// and its backward use the LAFS token layout (i * P + j) * C + c, converted row by row
// (Geometry::token_layout).
//
// Instruction sets: process_range is compiled once per path (AVX-512, AVX2, baseline;
// common/multiversion.h) through process_range_isa; everything it runs per row is LAFS_INLINE so
// that it is compiled into each path.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

// bilinear.h calls isfinite/floor unqualified (CUDA-style); on the host they live in std.
namespace lafs_fast {
using std::floor;
using std::isfinite;
}  // namespace lafs_fast

#include "common/bilinear.h"
#include "common/multiversion.h"
#include "common/philox.h"

namespace lafs_fast {
namespace cpu {

// Compute dtype: float64 for float64 images, float32 otherwise.
template <typename S>
using acc_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

// Bilinear taps of the P patch positions along one axis (the general case: any position),
// validity folded into the weights (weight 0, index clamped into the image as the reference's
// gather does) so the inner loops are branch-free.
template <typename T>
struct AxisTable {
  std::vector<int64_t> o0, o1;  // tap offsets in the image (clamped index * image stride)
  std::vector<int64_t> g0, g1;  // the same in the contiguous gradient buffer
  std::vector<T> w0, w1;        // tap weights, 0 outside the image
  std::vector<T> d0, d1;        // d weight / d coord: -1 / +1 inside, 0 outside

  explicit AxisTable(int64_t P) : o0(P), o1(P), g0(P), g1(P), w0(P), w1(P), d0(P), d1(P) {}

  // Returns whether any tap is inside (otherwise the patch and its gradients are zero).
  LAFS_INLINE bool fill(T coord, int64_t P, int64_t size, int64_t stride, int64_t gstride) {
    bool any = false;
    for (int64_t i = 0; i < P; ++i) {
      const AxisTaps<T> t = axis_taps<T>(coord + tap_offset<T>(i, P), size);
      const int64_t c0 = std::min<int64_t>(std::max<int64_t>(t.i0, 0), size - 1);
      const int64_t c1 = std::min<int64_t>(std::max<int64_t>(t.i0 + 1, 0), size - 1);
      o0[i] = c0 * stride;
      o1[i] = c1 * stride;
      g0[i] = c0 * gstride;
      g1[i] = c1 * gstride;
      w0[i] = t.v0 ? t.w0 : T(0);
      w1[i] = t.v1 ? t.w1 : T(0);
      d0[i] = t.v0 ? T(-1) : T(0);
      d1[i] = t.v1 ? T(1) : T(0);
      any = any || t.v0 || t.v1;
    }
    return any;
  }
};

// The separable cases along one axis: the P taps on consecutive pixels (tap i reads pixels
// first + i and first + i + 1), all inside the image (kInside) or some outside (kPadded: the row
// is sampled from a zero-padded copy of its window, which gives the same values and landmark
// gradients as zero weights on the outside taps). kGeneral (a landmark far outside, a huge
// image, or rounding that breaks the run of pixels) sends the row to the per-tap path. The
// weights of the taps inside are bitwise those of axis_taps; axis_taps' clamp to
// [-2, size + 1] only moves taps whose two pixels are outside (zero in the padded window, so
// their weights do not matter), and is skipped here. floor goes through an int32 conversion
// (exact: the coordinate is within P + 4 of an image below 2^22 pixels).
enum AxisCase : int { kGeneral = 0, kInside = 1, kPadded = 2 };

template <int PP, typename T>
LAFS_INLINE int regular_axis(T coord, int64_t P_rt, int64_t size, T* __restrict w0, T* __restrict w1,
                         int64_t* first) {
  const int64_t P = PP > 0 ? PP : P_rt;
  if (size >= (int64_t(1) << 22) || P >= (int64_t(1) << 20)) return kGeneral;
  if (!(coord >= -static_cast<T>(P + 4) && coord <= static_cast<T>(size + P + 4))) return kGeneral;
  auto floor_small = [](T x) {
    const T t = static_cast<T>(static_cast<int32_t>(x));
    return t > x ? t - T(1) : t;
  };
  const T f0 = floor_small(coord + tap_offset<T>(0, P));
  bool ok = true;
  for (int64_t i = 0; i < P; ++i) {
    const T x = coord + tap_offset<T>(i, P);
    const T f = floor_small(x);
    ok = ok && f == f0 + static_cast<T>(i);
    w1[i] = x - f;
    w0[i] = T(1) - w1[i];
  }
  *first = static_cast<int64_t>(f0);
  if (!ok) return kGeneral;
  return f0 >= T(0) && f0 + static_cast<T>(P) <= static_cast<T>(size - 1) ? kInside : kPadded;
}

// Whether no lane of the comparison mask m (PP lanes) is set, by halving: OR of the two halves
// until one lane is left.
template <int N, typename M>
LAFS_INLINE bool no_lane_set(const M& m) {
  if constexpr (N == 1) {
    return m[0] == 0;
  } else {
    typedef std::remove_cv_t<std::remove_reference_t<decltype(m[0])>> E;
    typedef E H __attribute__((vector_size(sizeof(E) * (N / 2))));
    H lo, hi;
    std::memcpy(&lo, &m, sizeof(H));
    std::memcpy(&hi, reinterpret_cast<const char*>(&m) + sizeof(H), sizeof(H));
    if constexpr (N % 2 == 1) {
      if (m[N - 1] != 0) return false;
    }
    return no_lane_set<N / 2>(lo | hi);
  }
}

// regular_axis with P known at compile time, as whole-vector operations on the P taps (same
// operations per lane, so bitwise the same weights).
template <int PP, typename T>
LAFS_INLINE int regular_axis_vec(T coord, int64_t size, T* __restrict w0, T* __restrict w1,
                                 int64_t* first) {
  typedef T V __attribute__((vector_size(sizeof(T) * PP)));
  typedef int32_t VI __attribute__((vector_size(sizeof(int32_t) * PP)));
  if (size >= (int64_t(1) << 22)) return kGeneral;
  if (!(coord >= -static_cast<T>(PP + 4) && coord <= static_cast<T>(size + PP + 4))) return kGeneral;
  V off, iota;
  for (int i = 0; i < PP; ++i) {
    off[i] = tap_offset<T>(i, PP);
    iota[i] = static_cast<T>(i);
  }
  const V x = coord + off;
  const V t = __builtin_convertvector(__builtin_convertvector(x, VI), V);
  const V f = t > x ? t - T(1) : t;
  const T f0 = f[0];
  // Every tap on pixel f0 + i: the lanes' mismatches OR-ed as integers, in halves (a vector
  // reduction; a lane-by-lane test stayed scalar).
  const auto bad = f != f0 + iota;
  if (!no_lane_set<PP>(bad)) return kGeneral;
  const V v1 = x - f, v0 = T(1) - v1;
  std::memcpy(w1, &v1, sizeof(V));
  std::memcpy(w0, &v0, sizeof(V));
  *first = static_cast<int64_t>(f0);
  return f0 >= T(0) && f0 + static_cast<T>(PP) <= static_cast<T>(size - 1) ? kInside : kPadded;
}

template <int PP, typename T>
LAFS_INLINE int regular_axis_any(T coord, int64_t P, int64_t size, T* w0, T* w1, int64_t* first) {
  if constexpr (PP > 0) {
    return regular_axis_vec<PP>(coord, size, w0, w1, first);
  } else {
    return regular_axis<PP>(coord, P, size, w0, w1, first);
  }
}

// Where warm_image leaves its sum, so the reads are not optimised away.
inline thread_local volatile float g_warm_sink;

// Read-only view of the op arguments shared by all row kernels.
template <typename S>
struct Geometry {
  using T = acc_t<S>;
  const S* img;
  int64_t sB, sC, sH, sW;  // image strides (elements)
  int64_t B, C, H, W, N, K, P, L;
  const T* lm;             // (B, N, 2) landmarks in the compute dtype, contiguous
  const int64_t* idx;      // (B, K) contiguous, or null
  float perturb_std;
  uint64_t seed;
  int64_t dense_bytes = 0;  // bytes of one image when it is dense and L2-sized, else 0
  bool token_layout = false;  // patch / patch-gradient rows in the token layout (else planar)

  // Row r = slot (b, k): its landmark after gather and noise; false for a zero patch (also for
  // an index out of range, which is never read).
  LAFS_INLINE bool slot(int64_t r, int64_t b, int64_t k, T* lx, T* ly) const {
    const int64_t n = idx ? idx[r] : k;
    const bool ok = n >= 0 && n < N && H > 0 && W > 0;
    const T* p = lm + (b * N + (ok ? n : 0)) * 2;
    return slot_landmark<T>(ok ? p[0] : T(0), ok ? p[1] : T(0), ok, perturb_std, seed, b, k, lx,
                            ly);
  }

  // Reads image b once, sequentially, when the windows of `rows` patches would otherwise miss
  // the cache on most of it: the patches are scattered over the image, and a sequential pass
  // (hardware-prefetched) is far cheaper than their misses (measured: the sampling runs 2x
  // faster on a 112 x 112 x 3 image; software prefetching of the windows did not help).
  LAFS_INLINE bool worth_warming(int64_t rows) const {
    return dense_bytes > 0 && rows * C * (P + 1) * (P + 1) * int64_t(sizeof(S)) >= dense_bytes / 2;
  }
  LAFS_INLINE void warm_image(int64_t b, int64_t rows) const {
    if (!worth_warming(rows)) return;
    const char* base = reinterpret_cast<const char*>(img + b * sB);
    // The image's first byte is its lowest: dense layouts have non-negative strides. Four
    // independent accumulators: the loads overlap (one chain of float adds was latency-bound,
    // ~40 cycles per patch on a cached image).
    int acc[4] = {0, 0, 0, 0};
    int64_t o = 0;
    for (; o + 256 <= dense_bytes; o += 256) {
      for (int u = 0; u < 4; ++u) acc[u] |= base[o + 64 * u];
    }
    for (; o < dense_bytes; o += 64) acc[0] |= base[o];
    g_warm_sink = static_cast<float>(acc[0] | acc[1] | acc[2] | acc[3]);
  }

  // Slice `part` of `parts` of image b's cache lines, prefetched: spread over the rows of the
  // image before it, the next image arrives while they compute (a blocking warm_image pass
  // cost about a third of the sampling time on images in L3).
  LAFS_INLINE void prefetch_slice(int64_t b, int64_t part, int64_t parts) const {
    const char* base = reinterpret_cast<const char*>(img + b * sB);
    const int64_t lines = (dense_bytes + 63) / 64;
    const int64_t l1 = lines * (part + 1) / parts;
    for (int64_t l = lines * part / parts; l < l1; ++l) __builtin_prefetch(base + 64 * l, 0, 2);
  }
};

// ----------------------------------------------------------------------------- general path
// One patch (P*P*C values, planar layout) into dst.
template <int CC, typename S, typename T>
LAFS_INLINE void sample_row(const S* img_b, int64_t sC, int64_t C_rt, int64_t P,
                       const AxisTable<T>& ax, const AxisTable<T>& ay, T* dst) {
  const int64_t C = CC > 0 ? CC : C_rt;
  for (int64_t i = 0; i < P; ++i) {
    const T a0 = ax.w0[i], a1 = ax.w1[i];
    const S* px0 = img_b + ax.o0[i];
    const S* px1 = img_b + ax.o1[i];
    for (int64_t j = 0; j < P; ++j) {
      // Same products and summation order as the reference: (x0,y0), (x0,y1), (x1,y0), (x1,y1).
      const T w00 = a0 * ay.w0[j], w01 = a0 * ay.w1[j], w10 = a1 * ay.w0[j], w11 = a1 * ay.w1[j];
      const S* p00 = px0 + ay.o0[j];
      const S* p01 = px0 + ay.o1[j];
      const S* p10 = px1 + ay.o0[j];
      const S* p11 = px1 + ay.o1[j];
      T* d = dst + j * P + i;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t o = c * sC;
        d[c * P * P] = w00 * static_cast<T>(p00[o]) + w01 * static_cast<T>(p01[o]) +
               w10 * static_cast<T>(p10[o]) + w11 * static_cast<T>(p11[o]);
      }
    }
  }
}

// Landmark gradient of one slot from its patch gradient g (planar layout).
template <int CC, typename S, typename T>
LAFS_INLINE void landmark_grad_row(const S* img_b, int64_t sC, int64_t C_rt, int64_t P,
                              const AxisTable<T>& ax, const AxisTable<T>& ay, const T* g,
                              T* gx_out, T* gy_out) {
  const int64_t C = CC > 0 ? CC : C_rt;
  T gx = 0, gy = 0;
  for (int64_t i = 0; i < P; ++i) {
    const S* px0 = img_b + ax.o0[i];
    const S* px1 = img_b + ax.o1[i];
    for (int64_t j = 0; j < P; ++j) {
      const S* p00 = px0 + ay.o0[j];
      const S* p01 = px0 + ay.o1[j];
      const S* p10 = px1 + ay.o0[j];
      const S* p11 = px1 + ay.o1[j];
      const T* gg = g + j * P + i;
      T sx = 0, sy = 0;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t o = c * sC;
        const T v00 = static_cast<T>(p00[o]), v01 = static_cast<T>(p01[o]);
        const T v10 = static_cast<T>(p10[o]), v11 = static_cast<T>(p11[o]);
        // Along x: d(wx0)/dx = -1, d(wx1)/dx = +1 (inside taps only), weighted by the y taps.
        const T gc = gg[c * P * P];
        sx += gc * (ax.d0[i] * (ay.w0[j] * v00 + ay.w1[j] * v01) +
                       ax.d1[i] * (ay.w0[j] * v10 + ay.w1[j] * v11));
        sy += gc * (ax.w0[i] * (ay.d0[j] * v00 + ay.d1[j] * v01) +
                       ax.w1[i] * (ay.d0[j] * v10 + ay.d1[j] * v11));
      }
      gx += sx;
      gy += sy;
    }
  }
  *gx_out = gx;
  *gy_out = gy;
}

// Adds the image gradient of one slot (patch gradient g, planar) into gimg_b (contiguous
// (C, H, W) of image b).
template <int CC, typename T>
LAFS_INLINE void image_grad_row(T* gimg_b, int64_t HW, int64_t C_rt, int64_t P,
                           const AxisTable<T>& ax, const AxisTable<T>& ay, const T* g) {
  const int64_t C = CC > 0 ? CC : C_rt;
  for (int64_t i = 0; i < P; ++i) {
    const T a0 = ax.w0[i], a1 = ax.w1[i];
    T* px0 = gimg_b + ax.g0[i];
    T* px1 = gimg_b + ax.g1[i];
    for (int64_t j = 0; j < P; ++j) {
      const T w00 = a0 * ay.w0[j], w01 = a0 * ay.w1[j], w10 = a1 * ay.w0[j], w11 = a1 * ay.w1[j];
      T* p00 = px0 + ay.g0[j];
      T* p01 = px0 + ay.g1[j];
      T* p10 = px1 + ay.g0[j];
      T* p11 = px1 + ay.g1[j];
      const T* gg = g + j * P + i;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t o = c * HW;
        const T gc = gg[c * P * P];
        p00[o] += w00 * gc;
        p01[o] += w01 * gc;
        p10[o] += w10 * gc;
        p11[o] += w11 * gc;
      }
    }
  }
}

// ----------------------------------------------------------------------------- regular path
// Per-thread scratch of the row kernels.
template <typename T>
struct RowScratch {
  std::vector<T> a0, a1, b0, b1, h, e, accx, accy;
  std::vector<T> row, grow;  // one planar patch / patch gradient (token-layout conversions)
  std::vector<T> win;        // a zero-padded (C, P + 1, P + 1) window (border patches)
  RowScratch(int64_t P, int64_t C)
      : a0(P), a1(P), b0(P), b1(P), h((P + 1) * P), e((P + 1) * P), accx(P), accy(P),
        row(P * P * C), grow(P * P * C), win(C * (P + 1) * (P + 1)) {}
};

// Copies the (P + 1) x (P + 1) window at pixel (fx, fy) of every channel of one image into win
// ((C, P + 1, P + 1), contiguous), zero outside the image.
template <int PP, int CC, bool UNIT_W, typename S, typename T>
LAFS_INLINE void padded_window(const S* img_b, int64_t sC, int64_t sH, int64_t sW_rt, int64_t H,
                               int64_t W, int64_t fx, int64_t fy, int64_t P_rt, int64_t C_rt,
                               T* __restrict win) {
  const int64_t Q = (PP > 0 ? PP : P_rt) + 1, C = CC > 0 ? CC : C_rt;
  const int64_t sW = UNIT_W ? 1 : sW_rt;
  const bool cols_in = fx >= 0 && fx + Q <= W;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t r = 0; r < Q; ++r) {
      T* __restrict dst = win + (c * Q + r) * Q;
      const int64_t y = fy + r;
      if (y < 0 || y >= H) {
        for (int64_t i = 0; i < Q; ++i) dst[i] = T(0);
        continue;
      }
      const S* src = img_b + c * sC + y * sH;
      if (cols_in) {  // only rows outside (a patch at the top or bottom border)
        for (int64_t i = 0; i < Q; ++i) dst[i] = static_cast<T>(src[(fx + i) * sW]);
        continue;
      }
      for (int64_t i = 0; i < Q; ++i) {  // clamped read, then select: no read outside
        const int64_t x = fx + i;
        const T v = static_cast<T>(src[std::min(std::max<int64_t>(x, 0), W - 1) * sW]);
        dst[i] = x >= 0 && x < W ? v : T(0);
      }
    }
  }
}

// A patch whose taps are all inside and on consecutive pixels (every patch away from the
// border) is separable: the (P+1) x (P+1) window is interpolated along x row by row
// (contiguous, vectorisable), then along y. The landmark gradient reuses the same rows: x
// differences for d/dx, y differences of the x-interpolated rows for d/dy. Same taps and
// weights as the reference; only the float summation order differs. patch / gp (planar) may
// be null.
template <int PP, int CC, bool UNIT_W, typename S, typename T>
LAFS_INLINE void regular_row(const S* win0, int64_t sC, int64_t sH, int64_t sW_rt, int64_t C_rt,
                        int64_t P_rt, RowScratch<T>& sc, T* __restrict patch,
                        const T* __restrict gp, T* gx_out, T* gy_out) {
  const int64_t P = PP > 0 ? PP : P_rt;
  const int64_t C = CC > 0 ? CC : C_rt;
  const int64_t sW = UNIT_W ? 1 : sW_rt;
  const T* __restrict a0 = sc.a0.data();
  const T* __restrict a1 = sc.a1.data();
  const T* __restrict b0 = sc.b0.data();
  const T* __restrict b1 = sc.b1.data();
  T* __restrict h = sc.h.data();
  T* __restrict e = sc.e.data();
  T* __restrict accx = sc.accx.data();
  T* __restrict accy = sc.accy.data();
  if (gp) {
    for (int64_t i = 0; i < P; ++i) accx[i] = accy[i] = T(0);
  }
  for (int64_t c = 0; c < C; ++c) {
    const S* win = win0 + c * sC;
    for (int64_t r = 0; r <= P; ++r) {
      const S* __restrict row = win + r * sH;
      if (gp) {
        for (int64_t i = 0; i < P; ++i) {
          const T v0 = static_cast<T>(row[i * sW]), v1 = static_cast<T>(row[(i + 1) * sW]);
          h[r * P + i] = a0[i] * v0 + a1[i] * v1;
          e[r * P + i] = v1 - v0;
        }
      } else {
        for (int64_t i = 0; i < P; ++i) {
          h[r * P + i] =
              a0[i] * static_cast<T>(row[i * sW]) + a1[i] * static_cast<T>(row[(i + 1) * sW]);
        }
      }
    }
    if (patch) {
      T* pc = patch + c * P * P;
      for (int64_t j = 0; j < P; ++j) {
        const T bj0 = b0[j], bj1 = b1[j];
        for (int64_t i = 0; i < P; ++i) pc[j * P + i] = bj0 * h[j * P + i] + bj1 * h[(j + 1) * P + i];
      }
    }
    if (gp) {
      const T* gc = gp + c * P * P;
      // One accumulator per i: vectorises without reassociating a reduction.
      for (int64_t j = 0; j < P; ++j) {
        const T bj0 = b0[j], bj1 = b1[j];
        for (int64_t i = 0; i < P; ++i) {
          const T g = gc[j * P + i];
          accx[i] += g * (bj0 * e[j * P + i] + bj1 * e[(j + 1) * P + i]);
          accy[i] += g * (h[(j + 1) * P + i] - h[j * P + i]);
        }
      }
    }
  }
  if (gp) {
    T gx = 0, gy = 0;
    for (int64_t i = 0; i < P; ++i) {
      gx += accx[i];
      gy += accy[i];
    }
    *gx_out = gx;
    *gy_out = gy;
  }
}

// The same with P known at compile time, on GCC/Clang vector extensions: one vector holds the
// P values of a window row along x, so both interpolations and the landmark-gradient sums are
// whole-vector operations (the compiler splits them into the target's SIMD registers), and
// the planar patch is written as whole vectors.
template <int PP, int CC, bool UNIT_W, typename S, typename T>
LAFS_INLINE void regular_row_vec(const S* win0, int64_t sC, int64_t sH, int64_t sW_rt, int64_t C_rt,
                            RowScratch<T>& sc, T* __restrict patch, const T* __restrict gp,
                            T* gx_out, T* gy_out) {
  constexpr int P = PP;
  typedef T V __attribute__((vector_size(sizeof(T) * PP)));
  const int64_t C = CC > 0 ? CC : C_rt;
  const int64_t sW = UNIT_W ? 1 : sW_rt;
  // Through a reference: returning vectors wider than the target's registers warns (-Wpsabi).
  auto load = [](V& v, const T* p) { std::memcpy(&v, p, sizeof(V)); };
  V A0, A1;
  load(A0, sc.a0.data());
  load(A1, sc.a1.data());
  const T* b0 = sc.b0.data();
  const T* b1 = sc.b1.data();
  V H[P + 1], E[P + 1];
  V accx = {}, accy = {};
  for (int64_t c = 0; c < C; ++c) {
    const S* win = win0 + c * sC;
    for (int r = 0; r <= P; ++r) {
      const S* row = win + r * sH;
      V x0, x1;
      if constexpr (UNIT_W && std::is_same_v<S, T>) {
        load(x0, row);
        load(x1, row + 1);
      } else {
        T buf[P + 1];
        for (int i = 0; i <= P; ++i) buf[i] = static_cast<T>(row[i * sW]);
        load(x0, buf);
        load(x1, buf + 1);
      }
      H[r] = A0 * x0 + A1 * x1;
      if (gp) E[r] = x1 - x0;
    }
    if (gp) {
      const T* gc = gp + c * P * P;
      for (int j = 0; j < P; ++j) {
        V G;
        load(G, gc + j * P);
        accx += G * (b0[j] * E[j] + b1[j] * E[j + 1]);
        accy += G * (H[j + 1] - H[j]);
      }
    }
    if (patch) {
      T* pc = patch + c * P * P;
      for (int j = 0; j < P; ++j) {
        const V v = b0[j] * H[j] + b1[j] * H[j + 1];
        std::memcpy(pc + j * P, &v, sizeof(V));
      }
    }
  }
  if (gp) {
    T gx = 0, gy = 0;
    for (int i = 0; i < P; ++i) {
      gx += accx[i];
      gy += accy[i];
    }
    *gx_out = gx;
    *gy_out = gy;
  }
}

template <int PP, int CC, bool UNIT_W, typename S, typename T>
LAFS_INLINE void regular_row_any(const S* win0, int64_t sC, int64_t sH, int64_t sW, int64_t C,
                            int64_t P, RowScratch<T>& sc, T* patch, const T* gp, T* gx_out,
                            T* gy_out) {
  if constexpr (PP > 0) {
    regular_row_vec<PP, CC, UNIT_W>(win0, sC, sH, sW, C, sc, patch, gp, gx_out, gy_out);
  } else {
    regular_row<PP, CC, UNIT_W>(win0, sC, sH, sW, C, P, sc, patch, gp, gx_out, gy_out);
  }
}

// Layout conversions of one row: token (i * P + j) * C + c <-> planar (c * P + j) * P + i.
// Written in the destination's order (sequential stores; the strided loads become shuffles).
template <int PP, int CC, typename T>
LAFS_INLINE void planar_to_token(const T* __restrict src, T* __restrict dst, int64_t P_rt,
                                 int64_t C_rt) {
  const int64_t P = PP > 0 ? PP : P_rt, C = CC > 0 ? CC : C_rt;
  for (int64_t i = 0; i < P; ++i)
    for (int64_t j = 0; j < P; ++j)
      for (int64_t c = 0; c < C; ++c) *dst++ = src[(c * P + j) * P + i];
}

template <int PP, int CC, typename T>
LAFS_INLINE void token_to_planar(const T* __restrict src, T* __restrict dst, int64_t P_rt,
                                 int64_t C_rt) {
  const int64_t P = PP > 0 ? PP : P_rt, C = CC > 0 ? CC : C_rt;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < P; ++j)
      for (int64_t i = 0; i < P; ++i) *dst++ = src[(i * P + j) * C + c];
}

// ----------------------------------------------------------------------------- row driver
// The per-row work on rows [begin, end) of a block starting at row r0 (row r at offset
// (r - r0) * L of patch / gp; planar, or token layout when G.token_layout), serially:
//   patch     (may be null): the sampled patches;
//   slot_grad (may be null): the landmark gradient of each slot (row r at 2 * r), from gp;
//   gimg      (may be null): image gradients added into the contiguous (B, C, H, W) buffer.
// PP / CC: the patch size / channel count when known at compile time, else 0.
template <int PP, int CC, typename S>
LAFS_INLINE void process_range(std::integral_constant<int, PP>, std::integral_constant<int, CC>,
                               const Geometry<S>& G, int64_t begin, int64_t end, int64_t r0,
                               acc_t<S>* patch, const acc_t<S>* gp, acc_t<S>* slot_grad,
                               acc_t<S>* gimg) {
  using T = acc_t<S>;
  const int64_t HW = G.H * G.W, L = G.L, P = G.P;
  RowScratch<T> sc(P, G.C);
  AxisTable<T> ax(P), ay(P);
  const bool token = G.token_layout;
  int64_t b = begin / G.K, k = begin - b * G.K;  // slot of row r, advanced with r
  int64_t k0 = k;  // first slot of image b in this range: the prefetch is spread over [k0, K)
  bool prefetch_next = b + 1 < G.B && G.worth_warming(std::min(end, (b + 2) * G.K) - (b + 1) * G.K);
  for (int64_t r = begin; r < end; ++r, ++k) {
    if (k == G.K) {
      k = 0;
      ++b;
    }
    // The first image is read ahead in one pass, every later one while the one before it is
    // sampled.
    if (r == begin) G.warm_image(b, std::min(end, (b + 1) * G.K) - r);
    if (k == 0 && r != begin) k0 = 0;
    if (prefetch_next) G.prefetch_slice(b + 1, k - k0, G.K - k0);
    if (k == G.K - 1) {
      prefetch_next = b + 2 < G.B && G.worth_warming(std::min(end, (b + 3) * G.K) - (b + 2) * G.K);
    }
    T* const out = patch ? patch + (r - r0) * L : nullptr;
    T* const pr = out && token ? sc.row.data() : out;  // planar destination
    const T* g = gp ? gp + (r - r0) * L : nullptr;
    T lx, ly, gx = 0, gy = 0;
    const bool live = G.slot(r, b, k, &lx, &ly);
    if (g && token && live) {
      token_to_planar<PP, CC>(g, sc.grow.data(), P, G.C);
      g = sc.grow.data();
    }
    int64_t fx, fy;
    // Image gradients take the per-tap path (they scatter into the taps' pixels).
    const int cx = live && !gimg ? regular_axis_any<PP>(lx, P, G.W, sc.a0.data(), sc.a1.data(), &fx)
                                 : kGeneral;
    const int cy = cx != kGeneral ? regular_axis_any<PP>(ly, P, G.H, sc.b0.data(), sc.b1.data(), &fy)
                                  : kGeneral;
    const T* gr = slot_grad ? g : nullptr;
    T* gg = slot_grad ? &gx : nullptr;
    bool wrote = false;
    if (!live) {
    } else if (cx == kInside && cy == kInside) {
      const S* win = G.img + b * G.sB + fy * G.sH + fx * G.sW;
      if (G.sW == 1) {
        regular_row_any<PP, CC, true>(win, G.sC, G.sH, 1, G.C, P, sc, pr, gr, gg, &gy);
      } else {
        regular_row_any<PP, CC, false>(win, G.sC, G.sH, G.sW, G.C, P, sc, pr, gr, gg, &gy);
      }
      wrote = true;
    } else if (cx != kGeneral && cy != kGeneral) {
      const int64_t Q = P + 1;
      T* win = sc.win.data();
      if (G.sW == 1) {
        padded_window<PP, CC, true>(G.img + b * G.sB, G.sC, G.sH, 1, G.H, G.W, fx, fy, P, G.C, win);
      } else {
        padded_window<PP, CC, false>(G.img + b * G.sB, G.sC, G.sH, G.sW, G.H, G.W, fx, fy, P, G.C,
                                     win);
      }
      regular_row_any<PP, CC, true>(static_cast<const T*>(win), Q * Q, Q, 1, G.C, P, sc, pr, gr,
                                    gg, &gy);
      wrote = true;
    } else if (ax.fill(lx, P, G.W, G.sW, 1) && ay.fill(ly, P, G.H, G.sH, G.W)) {
      const S* img_b = G.img + b * G.sB;
      if (pr) sample_row<CC>(img_b, G.sC, G.C, P, ax, ay, pr);
      if (slot_grad) landmark_grad_row<CC>(img_b, G.sC, G.C, P, ax, ay, g, &gx, &gy);
      if (gimg) image_grad_row<CC>(gimg + b * G.C * HW, HW, G.C, P, ax, ay, g);
      wrote = true;
    }
    if (out) {
      if (!wrote) {
        std::fill(out, out + L, T(0));
      } else if (token) {
        planar_to_token<PP, CC>(pr, out, P, G.C);
      }
    }
    if (slot_grad) {
      slot_grad[2 * r] = gx;
      slot_grad[2 * r + 1] = gy;
    }
  }
}

// process_range_isa(IsaTag, pp, cc, G, ...): process_range compiled for each path.
LAFS_ISA_WRAPPERS(process_range_isa, process_range)

// Calls f(integral_constant<PP>, integral_constant<CC>) with the patch size and channel count
// as compile-time constants for the common shapes (fully unrolled loops), 0 / 0 otherwise.
template <typename F>
void with_shape(int64_t P, int64_t C, F&& f) {
  using std::integral_constant;
  if (C == 3) {
    if (P == 8) return f(integral_constant<int, 8>{}, integral_constant<int, 3>{});
    if (P == 16) return f(integral_constant<int, 16>{}, integral_constant<int, 3>{});
    if (P == 4) return f(integral_constant<int, 4>{}, integral_constant<int, 3>{});
  } else if (C == 1) {
    if (P == 8) return f(integral_constant<int, 8>{}, integral_constant<int, 1>{});
    if (P == 16) return f(integral_constant<int, 16>{}, integral_constant<int, 1>{});
    if (P == 4) return f(integral_constant<int, 4>{}, integral_constant<int, 1>{});
  }
  return f(integral_constant<int, 0>{}, integral_constant<int, 0>{});
}

}  // namespace cpu
}  // namespace lafs_fast
