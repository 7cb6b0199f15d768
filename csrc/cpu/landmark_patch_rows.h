// Per-row (per output slot) CPU work of the landmark patch ops, free of torch so it can be
// micro-benchmarked on its own: sampling a patch, and turning a patch gradient into landmark
// and image gradients. The threading, GEMMs and tensor handling live in
// landmark_patch_embed_cpu.cpp. Semantics: lafs_fast/reference.py.
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

// The common case along one axis: all P taps inside the image and on consecutive pixels
// (tap i reads pixels first + i and first + i + 1). Fills the tap weights and returns true
// then; false sends the row to the general path. The weights are bitwise those of axis_taps;
// floor goes through an int32 conversion (exact here: the clamped coordinate is below 2^22).
template <int PP, typename T>
LAFS_INLINE bool regular_axis(T coord, int64_t P_rt, int64_t size, T* __restrict w0, T* __restrict w1,
                         int64_t* first) {
  const int64_t P = PP > 0 ? PP : P_rt;
  if (size >= (int64_t(1) << 22)) return false;
  const T lo = T(-2), hi = static_cast<T>(size + 1);
  auto clamp = [&](T x) { return x < lo ? lo : (x > hi ? hi : x); };
  auto floor_small = [](T x) {
    const T t = static_cast<T>(static_cast<int32_t>(x));
    return t > x ? t - T(1) : t;
  };
  const T f0 = floor_small(clamp(coord + tap_offset<T>(0, P)));
  if (!(f0 >= T(0) && f0 + static_cast<T>(P) <= static_cast<T>(size - 1))) return false;
  bool ok = true;
  for (int64_t i = 0; i < P; ++i) {
    const T x = clamp(coord + tap_offset<T>(i, P));
    const T f = floor_small(x);
    ok = ok && f == f0 + static_cast<T>(i);
    w1[i] = x - f;
    w0[i] = T(1) - w1[i];
  }
  *first = static_cast<int64_t>(f0);
  return ok;
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

  // Row r = slot (b, k): its landmark after gather and noise; false for a zero patch (also for
  // an index out of range, which is never read).
  LAFS_INLINE bool slot(int64_t r, int64_t* b_out, T* lx, T* ly) const {
    const int64_t b = r / K, k = r - b * K;
    const int64_t n = idx ? idx[r] : k;
    *b_out = b;
    const bool ok = n >= 0 && n < N && H > 0 && W > 0;
    const T* p = lm + (b * N + (ok ? n : 0)) * 2;
    return slot_landmark<T>(ok ? p[0] : T(0), ok ? p[1] : T(0), ok, perturb_std, seed, b, k, lx,
                            ly);
  }

  // Reads image b once, sequentially, when the windows of `rows` patches would otherwise miss
  // the cache on most of it: the patches are scattered over the image, and a sequential pass
  // (hardware-prefetched) is far cheaper than their misses (measured: the sampling runs 2x
  // faster on a 112 x 112 x 3 image; software prefetching of the windows did not help).
  LAFS_INLINE void warm_image(int64_t b, int64_t rows) const {
    if (dense_bytes <= 0 || rows * C * (P + 1) * (P + 1) * int64_t(sizeof(S)) < dense_bytes / 2) {
      return;
    }
    const char* base = reinterpret_cast<const char*>(img + b * sB);
    // The image's first byte is its lowest: dense layouts have non-negative strides.
    float acc = 0;
    for (int64_t o = 0; o < dense_bytes; o += 64) acc += static_cast<float>(base[o]);
    g_warm_sink = acc;
  }
};

// ----------------------------------------------------------------------------- general path
// One patch (P*P*C values, token layout (i*P + j)*C + c) into dst.
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
      T* d = dst + (i * P + j) * C;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t o = c * sC;
        d[c] = w00 * static_cast<T>(p00[o]) + w01 * static_cast<T>(p01[o]) +
               w10 * static_cast<T>(p10[o]) + w11 * static_cast<T>(p11[o]);
      }
    }
  }
}

// Landmark gradient of one slot from its patch gradient g (token layout).
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
      const T* gg = g + (i * P + j) * C;
      T sx = 0, sy = 0;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t o = c * sC;
        const T v00 = static_cast<T>(p00[o]), v01 = static_cast<T>(p01[o]);
        const T v10 = static_cast<T>(p10[o]), v11 = static_cast<T>(p11[o]);
        // Along x: d(wx0)/dx = -1, d(wx1)/dx = +1 (inside taps only), weighted by the y taps.
        sx += gg[c] * (ax.d0[i] * (ay.w0[j] * v00 + ay.w1[j] * v01) +
                       ax.d1[i] * (ay.w0[j] * v10 + ay.w1[j] * v11));
        sy += gg[c] * (ax.w0[i] * (ay.d0[j] * v00 + ay.d1[j] * v01) +
                       ax.w1[i] * (ay.d0[j] * v10 + ay.d1[j] * v11));
      }
      gx += sx;
      gy += sy;
    }
  }
  *gx_out = gx;
  *gy_out = gy;
}

// Adds the image gradient of one slot into gimg_b (contiguous (C, H, W) of image b).
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
      const T* gg = g + (i * P + j) * C;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t o = c * HW;
        p00[o] += w00 * gg[c];
        p01[o] += w01 * gg[c];
        p10[o] += w10 * gg[c];
        p11[o] += w11 * gg[c];
      }
    }
  }
}

// ----------------------------------------------------------------------------- regular path
// Per-thread scratch of the row kernels.
template <typename T>
struct RowScratch {
  std::vector<T> a0, a1, b0, b1, h, e, t, accx, accy;
  RowScratch(int64_t P, int64_t C)
      : a0(P), a1(P), b0(P), b1(P), h((P + 1) * P), e((P + 1) * P), t(P * P * C), accx(P),
        accy(P) {}
};

// A patch whose taps are all inside and on consecutive pixels (every patch away from the
// border) is separable: the (P+1) x (P+1) window is interpolated along x row by row
// (contiguous, vectorisable), then along y. The landmark gradient reuses the same rows: x
// differences for d/dx, y differences of the x-interpolated rows for d/dy. Same taps and
// weights as the reference; only the float summation order differs. patch / gp may be null.
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
  T* __restrict t = sc.t.data();
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
      for (int64_t j = 0; j < P; ++j) {
        const T bj0 = b0[j], bj1 = b1[j];
        for (int64_t i = 0; i < P; ++i) t[j * P + i] = bj0 * h[j * P + i] + bj1 * h[(j + 1) * P + i];
      }
      for (int64_t i = 0; i < P; ++i) {
        for (int64_t j = 0; j < P; ++j) patch[(i * P + j) * C + c] = t[j * P + i];
      }
    }
    if (gp) {
      for (int64_t i = 0; i < P; ++i) {
        for (int64_t j = 0; j < P; ++j) t[j * P + i] = gp[(i * P + j) * C + c];
      }
      // One accumulator per i: vectorises without reassociating a reduction.
      for (int64_t j = 0; j < P; ++j) {
        const T bj0 = b0[j], bj1 = b1[j];
        for (int64_t i = 0; i < P; ++i) {
          const T g = t[j * P + i];
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
// whole-vector operations (the compiler splits them into the target's SIMD registers).
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
  T* tt = sc.t.data();  // C * P * P: per channel, [j][i] (vector lanes run along i)
  V H[P + 1], E[P + 1];
  V accx = {}, accy = {};
  if (gp) {
    // Patch gradient into [c][j][i] order from token order ((i * P + j) * C + c), written in
    // the destination's order: the strided loads and sequential stores become vector shuffles,
    // where the source's order (scattered stores) stayed scalar. Measured on the backward rows
    // of B32 N196 P8 C3 (Zen 4, one thread): 2.0 -> 1.6 ms with AVX-512, 2.1 -> 1.9 with AVX2.
    for (int64_t c = 0; c < C; ++c)
      for (int j = 0; j < P; ++j)
        for (int i = 0; i < P; ++i) tt[(c * P + j) * P + i] = gp[(i * P + j) * C + c];
  }
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
      const T* gc = tt + c * P * P;
      for (int j = 0; j < P; ++j) {
        V G;
        load(G, gc + j * P);
        accx += G * (b0[j] * E[j] + b1[j] * E[j + 1]);
        accy += G * (H[j + 1] - H[j]);
      }
    }
    if (patch) {
      T* pc = tt + c * P * P;
      for (int j = 0; j < P; ++j) {
        const V v = b0[j] * H[j] + b1[j] * H[j + 1];
        std::memcpy(pc + j * P, &v, sizeof(V));
      }
    }
  }
  if (patch) {
    T* d = patch;
    for (int i = 0; i < P; ++i)
      for (int j = 0; j < P; ++j)
        for (int64_t c = 0; c < C; ++c) *d++ = tt[(c * P + j) * P + i];
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

// ----------------------------------------------------------------------------- row driver
// The per-row work on rows [begin, end) of a block starting at row r0 (row r at offset
// (r - r0) * L of patch / gp), serially:
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
  for (int64_t r = begin; r < end; ++r) {
    if (r == begin || r % G.K == 0) {
      const int64_t b = r / G.K;
      G.warm_image(b, std::min(end, (b + 1) * G.K) - r);
    }
    T* pr = patch ? patch + (r - r0) * L : nullptr;
    const T* g = gp ? gp + (r - r0) * L : nullptr;
    int64_t b, fx, fy;
    T lx, ly, gx = 0, gy = 0;
    if (!G.slot(r, &b, &lx, &ly)) {
      if (pr) std::fill(pr, pr + L, T(0));
    } else if (!gimg && regular_axis<PP>(lx, P, G.W, sc.a0.data(), sc.a1.data(), &fx) &&
               regular_axis<PP>(ly, P, G.H, sc.b0.data(), sc.b1.data(), &fy)) {
      const S* win = G.img + b * G.sB + fy * G.sH + fx * G.sW;
      T* gg = slot_grad ? &gx : nullptr;
      if (G.sW == 1) {
        regular_row_any<PP, CC, true>(win, G.sC, G.sH, 1, G.C, P, sc, pr,
                                      slot_grad ? g : nullptr, gg, &gy);
      } else {
        regular_row_any<PP, CC, false>(win, G.sC, G.sH, G.sW, G.C, P, sc, pr,
                                       slot_grad ? g : nullptr, gg, &gy);
      }
    } else if (ax.fill(lx, P, G.W, G.sW, 1) && ay.fill(ly, P, G.H, G.sH, G.W)) {
      const S* img_b = G.img + b * G.sB;
      if (pr) sample_row<CC>(img_b, G.sC, G.C, P, ax, ay, pr);
      if (slot_grad) landmark_grad_row<CC>(img_b, G.sC, G.C, P, ax, ay, g, &gx, &gy);
      if (gimg) image_grad_row<CC>(gimg + b * G.C * HW, HW, G.C, P, ax, ay, g);
    } else if (pr) {
      std::fill(pr, pr + L, T(0));
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
