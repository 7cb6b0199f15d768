// CPU kernel of lafs_fast::photometric_augment (schema: lafs_ops.cpp; semantics, and the oracle of
// the tests: lafs_fast/ops/photometric.py::apply_photometric_reference).
//
// The reference runs ~60 full-tensor elementwise passes over all N views. Here one thread takes a
// whole sample (3 x H x W; 147 KiB for 112 x 112 float32, so it stays in L2) and applies its
// already-drawn parameters in place in the output: the per-pixel ops (colour jitter in the
// sample's order, grayscale, and, without blur, solarize and the [-1, 1] map) run on blocks of
// kBlock pixels that stay in L1, one op after the other over the block (branch-free inner loops
// the compiler vectorises). Contrast blends with the mean gray level of the image at that point,
// so a sample with contrast takes two block passes (the first also sums the gray level); blur
// adds a horizontal and a vertical pass (solarize and the [-1, 1] map fused into the vertical
// one). Samples are independent: the result does not depend on the thread count.
//
// Every value is computed with the reference's operations in the reference's order and dtype
// (no fast-math; no FMA contraction on x86-64, see common/multiversion.h), so most values are
// bit-identical. The differences: the summation order of the gray mean (here in double), of the
// 3x3 channel mix and of the blur taps, and exp() vs. torch's vectorised exp for the blur weights
// -- an ulp or so, which the float32 HSV hue step (rounded at magnitudes up to 11) can turn into
// ~1e-6 (tests/test_views_photometric.py derives the tolerances).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "common/multiversion.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace lafs_fast {
namespace cpu {
namespace {

// Pixels per block of the per-pixel passes: 3 channels x 256 x 8 bytes = 6 KiB at most (L1).
constexpr int64_t kBlock = 256;
// Op codes of ops/photometric.py (BRIGHTNESS, CONTRAST, SATURATION, HUE).
constexpr int64_t kBrightness = 0, kContrast = 1, kSaturation = 2, kHue = 3;
constexpr double kGrayWeights[3] = {0.2989, 0.587, 0.114};  // photometric.GRAY_WEIGHTS

// LAFS_INLINE, LAFS_ISA_WRAPPERS: common/multiversion.h (AVX-512, AVX2 and baseline paths).

template <typename T>
LAFS_INLINE T clamp01(T v) {
  return std::min(std::max(v, T(0)), T(1));
}

// c ? a : b on values already computed, as bit operations. Without -fno-trapping-math (value-
// neutral, but we keep the default flags) GCC will not if-convert `c ? x - y : x` once it has sunk
// the subtraction into a branch, and the loop stays scalar; a bitwise blend has no branch to sink.
template <typename T>
LAFS_INLINE T select(bool c, T a, T b) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  const U m = U(0) - static_cast<U>(c);
  return std::bit_cast<T>((std::bit_cast<U>(a) & m) | (std::bit_cast<U>(b) & ~m));
}

// Everything one sample needs, already converted to the compute dtype T.
template <typename T>
struct Sample {
  const T* x;        // input (3, H, W), contiguous
  T* out;            // output (3, H, W), contiguous
  int64_t hw;
  int64_t ops[4];    // jitter ops in order (hue dropped when its shift is 0)
  int n_ops;
  T factor[4];       // brightness, contrast, saturation, hue
  bool gray, blur, solar;
  bool clamp_input;  // y = (x + 1) / 2 is clamped first unless a linear op comes first
  T threshold;
};

// ---------------------------------------------------------------------------- per-pixel ops
// Each works on n <= kBlock pixels of the three channel rows r, g, b (in place).

template <typename T>
LAFS_INLINE void scale_clamp(T* __restrict r, T* __restrict g, T* __restrict b, int64_t n, T f,
                             T off) {
  // brightness (off = 0: the reference adds an exact zero) and contrast: clamp(f * y + off)
  for (int64_t i = 0; i < n; ++i) {
    r[i] = clamp01(f * r[i] + off);
    g[i] = clamp01(f * g[i] + off);
    b[i] = clamp01(f * b[i] + off);
  }
}

template <typename T>
LAFS_INLINE void saturation(T* __restrict r, T* __restrict g, T* __restrict b, int64_t n, T s) {
  // the reference's matrix s * I + (1 - s) * [w; w; w] (rows = gray weights), then clamp
  const T one_s = T(1) - s;
  const T o0 = one_s * T(kGrayWeights[0]), o1 = one_s * T(kGrayWeights[1]),
          o2 = one_s * T(kGrayWeights[2]);
  const T d0 = s + o0, d1 = s + o1, d2 = s + o2;
  for (int64_t i = 0; i < n; ++i) {
    const T vr = r[i], vg = g[i], vb = b[i];
    r[i] = clamp01(d0 * vr + o1 * vg + o2 * vb);
    g[i] = clamp01(o0 * vr + d1 * vg + o2 * vb);
    b[i] = clamp01(o0 * vr + o1 * vg + d2 * vb);
  }
}

// torch.remainder(a, 1) for |a| < 2^31: fmod (a - trunc(a), exact) then + 1 when negative.
template <typename T>
LAFS_INLINE T remainder1(T a) {
  const T t = a - T(static_cast<int32_t>(a));
  return select(t < T(0), t + T(1), t);
}

// torch.remainder(k, 6) for k in [0, 12): k - 6 is exact there (Sterbenz).
template <typename T>
LAFS_INLINE T remainder6(T k) {
  return select(k >= T(6), k - T(6), k);
}

template <typename T>
LAFS_INLINE T hsv_channel(T v, T vs, T h6, T n) {
  const T k = remainder6(n + h6);
  // clamp(min(k, 4 - k), 0, 1) as blends: with std::min/max GCC threads the clamped-to-0 path into
  // a separate `vs * 0` branch and the loop no longer vectorises
  const T m = std::min(k, T(4) - k);
  const T c = select(m < T(0), T(0), select(m > T(1), T(1), m));
  return clamp01(v - vs * c);
}

template <typename T>
LAFS_INLINE void hue_shift(T* __restrict r, T* __restrict g, T* __restrict b, int64_t n, T hue) {
  // photometric.adjust_hue: RGB -> HSV, h = (h + hue) mod 1, HSV -> RGB by the closed form
  // c_n = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6; clamped by the next stage.
  for (int64_t i = 0; i < n; ++i) {
    const T vr = r[i], vg = g[i], vb = b[i];
    const T maxc = std::max(std::max(vr, vg), vb);
    const T minc = std::min(std::min(vr, vg), vb);
    const T cr = maxc - minc;
    const T s = cr / select(maxc == T(0), T(1), maxc);
    const T crd = select(cr == T(0), T(1), cr);
    // h = bc - gc (r is the max), (2 + rc) - bc (g), (4 + gc) - rc (b), with xc = (maxc - x) / crd:
    // the numerators are picked first, so two divisions instead of three, same roundings.
    const bool is_r = maxc == vr;
    const bool is_g = (maxc == vg) & !is_r;
    const T dr = maxc - vr, dg = maxc - vg, db = maxc - vb;
    const T num_a = select(is_r, db, select(is_g, dr, dg));
    const T num_b = select(is_r, dg, select(is_g, db, dr));
    const T off = select(is_r, T(0), select(is_g, T(2), T(4)));
    const T h = (off + num_a / crd) - num_b / crd;
    const T h6 = T(6) * remainder1(h / T(6) + hue);
    const T vs = maxc * s;
    r[i] = hsv_channel(maxc, vs, h6, T(5));
    g[i] = hsv_channel(maxc, vs, h6, T(3));
    b[i] = hsv_channel(maxc, vs, h6, T(1));
  }
}

template <typename T>
LAFS_INLINE void to_gray(T* __restrict r, T* __restrict g, T* __restrict b, int64_t n) {
  const T w0 = T(kGrayWeights[0]), w1 = T(kGrayWeights[1]), w2 = T(kGrayWeights[2]);
  for (int64_t i = 0; i < n; ++i) {
    const T v = (r[i] * w0 + g[i] * w1) + b[i] * w2;
    r[i] = v;
    g[i] = v;
    b[i] = v;
  }
}

// Sum of the gray level over the block, in double with 8 independent lanes (vectorisable without
// reassociation).
template <typename T>
LAFS_INLINE void gray_sum(const T* __restrict r, const T* __restrict g, const T* __restrict b,
                     int64_t n, double* __restrict acc) {
  const T w0 = T(kGrayWeights[0]), w1 = T(kGrayWeights[1]), w2 = T(kGrayWeights[2]);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) {
      acc[j] += static_cast<double>((r[i + j] * w0 + g[i + j] * w1) + b[i + j] * w2);
    }
  }
  for (; i < n; ++i) acc[0] += static_cast<double>((r[i] * w0 + g[i] * w1) + b[i] * w2);
}

// Solarize (y >= threshold -> 1 - y) when on, then y * 2 - 1, from src to dst.
template <typename T>
LAFS_INLINE void finish(const T* __restrict src, T* __restrict dst, int64_t n, bool solar,
                        T thr) {
  if (solar) {
    for (int64_t i = 0; i < n; ++i) {
      const T v = src[i];
      dst[i] = select(v >= thr, T(1) - v, v) * T(2) - T(1);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i] * T(2) - T(1);
  }
}

template <typename T>
LAFS_INLINE void finish_inplace(T* __restrict p, int64_t n, bool solar, T thr) {
  if (solar) {
    for (int64_t i = 0; i < n; ++i) {
      const T v = p[i];
      p[i] = select(v >= thr, T(1) - v, v) * T(2) - T(1);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) p[i] = p[i] * T(2) - T(1);
  }
}

template <typename T>
LAFS_INLINE void apply_op(int64_t op, T* r, T* g, T* b, int64_t n, const Sample<T>& s,
                          T contrast_offset) {
  switch (op) {
    case kBrightness: scale_clamp(r, g, b, n, s.factor[kBrightness], T(0)); break;
    case kContrast: scale_clamp(r, g, b, n, s.factor[kContrast], contrast_offset); break;
    case kSaturation: saturation(r, g, b, n, s.factor[kSaturation]); break;
    default: hue_shift(r, g, b, n, s.factor[kHue]); break;
  }
}

// ---------------------------------------------------------------------------- per-pixel passes
// Pass over the image in blocks of kBlock pixels, in place in s.out (a block of the three
// channels stays in L1 across the ops): the first pass writes y = (x + 1) / 2 (clamped unless a
// linear op comes first), later passes start from the y of the previous one; apply
// ops[begin, end); then either sum the gray level (a contrast step follows) or, in the last pass,
// grayscale + (without blur) solarize and the map to [-1, 1].
template <typename T>
LAFS_INLINE void pixel_pass_body(const Sample<T>& s, bool first, int begin, int end,
                                 T contrast_offset, bool last, double* gray_acc) {
  const int64_t hw = s.hw;
  for (int64_t p0 = 0; p0 < hw; p0 += kBlock) {
    const int64_t n = std::min(kBlock, hw - p0);
    T* r = s.out + p0;
    T* g = r + hw;
    T* b = r + 2 * hw;
    if (first) {
      const T* xr = s.x + p0;
      const T* xg = xr + hw;
      const T* xb = xr + 2 * hw;
      if (s.clamp_input) {
        for (int64_t i = 0; i < n; ++i) {
          r[i] = clamp01((xr[i] + T(1)) * T(0.5));
          g[i] = clamp01((xg[i] + T(1)) * T(0.5));
          b[i] = clamp01((xb[i] + T(1)) * T(0.5));
        }
      } else {
        for (int64_t i = 0; i < n; ++i) {
          r[i] = (xr[i] + T(1)) * T(0.5);
          g[i] = (xg[i] + T(1)) * T(0.5);
          b[i] = (xb[i] + T(1)) * T(0.5);
        }
      }
    }
    for (int k = begin; k < end; ++k) apply_op(s.ops[k], r, g, b, n, s, contrast_offset);
    if (!last) {  // a contrast step follows: sum the gray level of y
      gray_sum(r, g, b, n, gray_acc);
      continue;
    }
    if (s.gray) to_gray(r, g, b, n);
    if (!s.blur) {  // else the blur passes read y and finish
      finish_inplace(r, n, s.solar, s.threshold);
      finish_inplace(g, n, s.solar, s.threshold);
      finish_inplace(b, n, s.solar, s.threshold);
    }
  }
}

// ---------------------------------------------------------------------------- blur
// Separable Gaussian on each channel of s.out (y in [0, 1]) with taps k[0..2r]: rows into
// `plane` (H x W), then columns back into s.out with solarize and the [-1, 1] map. Out-of-range
// indices map by reflection (reflect = true, needs r < H, W) or clamping (replicate), as F.pad.
LAFS_INLINE int64_t pad_index(int64_t i, int64_t n, bool reflect) {
  if (reflect) return i < 0 ? -i : (i >= n ? 2 * (n - 1) - i : i);
  return i < 0 ? 0 : (i >= n ? n - 1 : i);
}

// dst[j] = sum_t k[t] * rows[t][off + j] for j < NV * L, the taps summed in order 0..taps-1 (as
// the reference's conv). GCC vector types of VB bytes (64: one AVX-512 register; 32: one AVX2
// register, two SSE2 ones in the baseline path) keep the NV sums in registers across the taps:
// independent chains that hide the add latency, one store per output. Elementwise IEEE ops: the
// same results as scalar code, whatever the width.
template <int NV, int VB, typename T>
LAFS_INLINE void taps_chunk(const T* const* rows, int64_t off, const T* k, int64_t taps, T* dst) {
  typedef T V __attribute__((vector_size(VB)));
  constexpr int L = VB / sizeof(T);
  V a[NV];
  for (int v = 0; v < NV; ++v) {
    V x;
    std::memcpy(&x, rows[0] + off + v * L, sizeof(V));
    a[v] = k[0] * x;
  }
  for (int64_t t = 1; t < taps; ++t) {
    const T kt = k[t];
    const T* rt = rows[t] + off;
    for (int v = 0; v < NV; ++v) {
      V x;
      std::memcpy(&x, rt + v * L, sizeof(V));
      a[v] += kt * x;
    }
  }
  std::memcpy(dst, a, sizeof(a));
}

template <typename T>
LAFS_INLINE void taps_scalar(const T* const* rows, int64_t off, const T* k, int64_t taps, T* dst) {
  T a = k[0] * rows[0][off];
  for (int64_t t = 1; t < taps; ++t) a += k[t] * rows[t][off];
  *dst = a;
}

template <int VB, typename T>
LAFS_INLINE void taps_row(const T* const* rows, const T* k, int64_t taps, int64_t W, T* dst) {
  constexpr int L = VB / sizeof(T);
  int64_t x = 0;
  for (; x + 4 * L <= W; x += 4 * L) taps_chunk<4, VB>(rows, x, k, taps, dst + x);
  for (; x + L <= W; x += L) taps_chunk<1, VB>(rows, x, k, taps, dst + x);
  for (; x < W; ++x) taps_scalar(rows, x, k, taps, dst + x);
}

// rows: scratch for 2r + 1 row pointers; line: W + 2r values; plane: H x W values. VB: the
// vector width in bytes of the taps.
template <int VB, typename T>
LAFS_INLINE void blur_pass_body(std::integral_constant<int, VB>, const Sample<T>& s, int64_t H,
                                int64_t W, const T* k, int64_t r, bool reflect, T* plane,
                                T* line, T* acc, const T** rows) {
  const int64_t taps = 2 * r + 1;
  for (int64_t c = 0; c < 3; ++c) {
    T* img = s.out + c * H * W;
    for (int64_t t = 0; t < taps; ++t) rows[t] = line + t;
    for (int64_t y = 0; y < H; ++y) {  // horizontal, from the padded row
      const T* src = img + y * W;
      for (int64_t j = 0; j < r; ++j) {
        line[j] = src[pad_index(j - r, W, reflect)];
        line[r + W + j] = src[pad_index(W + j, W, reflect)];
      }
      std::memcpy(line + r, src, W * sizeof(T));
      taps_row<VB>(rows, k, taps, W, plane + y * W);
    }
    for (int64_t y = 0; y < H; ++y) {  // vertical, then solarize + [-1, 1]
      for (int64_t t = 0; t < taps; ++t) rows[t] = plane + pad_index(y - r + t, H, reflect) * W;
      taps_row<VB>(rows, k, taps, W, acc);
      finish(acc, img + y * W, W, s.solar, s.threshold);
    }
  }
}

// pixel_pass(IsaTag, ...) / blur_pass(IsaTag, ...): the passes compiled for each path.
LAFS_ISA_WRAPPERS(pixel_pass, pixel_pass_body)
LAFS_ISA_WRAPPERS(blur_pass, blur_pass_body)

// Vector bytes of the blur taps on each path.
template <CpuIsa I>
constexpr int blur_vector_bytes(IsaTag<I>) {
  return I == CpuIsa::kAvx512 ? 64 : 32;
}

// ---------------------------------------------------------------------------- driver
template <typename T>
void photometric_impl(const at::Tensor& x, at::Tensor& out, const at::Tensor& factors,
                      const at::Tensor& order, const at::Tensor& jitter, const at::Tensor& gray,
                      const at::Tensor& sigma, const at::Tensor& blur, const at::Tensor& solar,
                      double sigma_max, double threshold) {
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), hw = H * W;
  const int64_t r = static_cast<int64_t>(std::ceil(3 * sigma_max));
  const int64_t taps = 2 * r + 1;
  const bool reflect = std::min(H, W) > r;
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const T* fp = factors.const_data_ptr<T>();
  const T* sp = sigma.const_data_ptr<T>();
  const int64_t* ordp = order.const_data_ptr<int64_t>();
  const bool* jp = jitter.const_data_ptr<bool>();
  const bool* gp = gray.const_data_ptr<bool>();
  const bool* bp = blur.const_data_ptr<bool>();
  const bool* solp = solar.const_data_ptr<bool>();

  // a chunk of at least ~64K values: small batches of small images are not worth a thread
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (3 * hw));
  with_cpu_isa([&](auto isa) {
    constexpr int VB = blur_vector_bytes(decltype(isa){});
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      std::vector<T> k(taps), plane, line, acc;
      std::vector<const T*> rows(taps);
      for (int64_t n = begin; n < end; ++n) {
        Sample<T> s;
        s.x = xp + n * 3 * hw;
        s.out = op + n * 3 * hw;
        s.hw = hw;
        s.gray = gp[n];
        s.blur = bp[n];
        s.solar = solp[n];
        s.threshold = static_cast<T>(threshold);  // torch compares with the scalar cast to T
        for (int i = 0; i < 4; ++i) s.factor[i] = fp[n * 4 + i];
        s.n_ops = 0;
        // The reference runs 3 clamping stages before the hue step (the ops before hue, padded
        // with identities) and 3 after: the first stage is the first op unless hue (or nothing)
        // comes first, and then an identity stage clamps y. It matters for inputs outside [-1, 1].
        s.clamp_input = !(jp[n] && ordp[n * 4] != kHue);
        if (jp[n]) {
          for (int i = 0; i < 4; ++i) {
            const int64_t o = ordp[n * 4 + i];
            if (o == kHue && s.factor[kHue] == T(0)) continue;  // the reference skips hue 0
            s.ops[s.n_ops++] = o;
          }
        }
        if (!(jp[n] || s.gray || s.blur || s.solar)) {  // untouched: the clean bytes
          std::memcpy(s.out, s.x, 3 * hw * sizeof(T));
          continue;
        }
        int ci = s.n_ops;  // position of contrast, if any
        for (int i = 0; i < s.n_ops; ++i) {
          if (s.ops[i] == kContrast) ci = i;
        }
        if (ci == s.n_ops) {
          pixel_pass(isa, s, true, 0, s.n_ops, T(0), true, nullptr);
        } else {
          double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          pixel_pass(isa, s, true, 0, ci, T(0), false, lanes);
          double sum = 0;
          for (double v : lanes) sum += v;
          const T mean = static_cast<T>(sum / static_cast<double>(hw));
          const T offset = (T(1) - s.factor[kContrast]) * mean;
          pixel_pass(isa, s, false, ci, s.n_ops, offset, true, nullptr);
        }
        if (s.blur) {
          // photometric.gaussian_blur: exp(-0.5 (d / sigma)^2) over d = -r..r, normalised
          const T sig = std::max(sp[n], static_cast<T>(1e-6));
          T ksum = 0;
          for (int64_t t = 0; t < taps; ++t) {
            const T q = static_cast<T>(t - r) / sig;
            k[t] = std::exp(T(-0.5) * (q * q));
            ksum += k[t];
          }
          for (int64_t t = 0; t < taps; ++t) k[t] /= ksum;
          if (plane.empty()) {
            plane.resize(hw);
            line.resize(W + 2 * r);
            acc.resize(W);
          }
          blur_pass(isa, std::integral_constant<int, VB>{}, s, H, W, k.data(), r, reflect,
                    plane.data(), line.data(), acc.data(), rows.data());
        }
      }
    });
  });
}

void check_param(const at::Tensor& t, const char* name, int64_t N, int64_t cols) {
  const bool ok = cols == 0 ? (t.dim() == 1 && t.size(0) == N)
                            : (t.dim() == 2 && t.size(0) == N && t.size(1) == cols);
  TORCH_CHECK(ok, "lafs_fast.photometric_augment: ", name, " must have shape (", N,
              cols ? ", " : "", cols ? std::to_string(cols) : std::string(), "), got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "lafs_fast.photometric_augment: ", name, " must be on the CPU");
}

at::Tensor photometric_augment_cpu(const at::Tensor& x_in, const at::Tensor& factors_in,
                                   const at::Tensor& order_in, const at::Tensor& jitter_in,
                                   const at::Tensor& gray_in, const at::Tensor& sigma_in,
                                   const at::Tensor& blur_in, const at::Tensor& solar_in,
                                   double sigma_max, double threshold) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.size(1) == 3,
              "lafs_fast.photometric_augment: x must be (N, 3, H, W), got ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "lafs_fast.photometric_augment: x must be float32 or float64, got ",
              x_in.scalar_type());
  TORCH_CHECK(x_in.device().is_cpu(), "lafs_fast.photometric_augment: x must be on the CPU");
  TORCH_CHECK(std::isfinite(sigma_max) && sigma_max >= 0 && sigma_max <= 1e4,
              "lafs_fast.photometric_augment: sigma_max must be in [0, 1e4], got ", sigma_max);
  const int64_t N = x_in.size(0);
  check_param(factors_in, "factors", N, 4);
  check_param(order_in, "order", N, 4);
  check_param(jitter_in, "jitter", N, 0);
  check_param(gray_in, "grayscale", N, 0);
  check_param(sigma_in, "blur_sigma", N, 0);
  check_param(blur_in, "blur", N, 0);
  check_param(solar_in, "solarize", N, 0);
  const auto dt = x_in.scalar_type();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor factors = factors_in.to(dt).contiguous();
  const at::Tensor sigma = sigma_in.to(dt).contiguous();
  const at::Tensor order = order_in.to(at::kLong).contiguous();
  const at::Tensor jitter = jitter_in.to(at::kBool).contiguous();
  const at::Tensor gray = gray_in.to(at::kBool).contiguous();
  const at::Tensor blur = blur_in.to(at::kBool).contiguous();
  const at::Tensor solar = solar_in.to(at::kBool).contiguous();
  {  // samples with jitter on: order rows must be permutations of 0..3, hue shifts bounded
    const int64_t* o = order.const_data_ptr<int64_t>();
    const at::Tensor hue_shift = factors.select(1, kHue).to(at::kDouble).contiguous();
    const double* h = hue_shift.const_data_ptr<double>();
    const bool* j = jitter.const_data_ptr<bool>();
    for (int64_t n = 0; n < N; ++n) {
      if (!j[n]) continue;
      int seen = 0;
      for (int i = 0; i < 4; ++i) {
        const int64_t v = o[n * 4 + i];
        TORCH_CHECK(v >= 0 && v < 4, "lafs_fast.photometric_augment: order values must be in 0..3");
        seen |= 1 << v;
      }
      TORCH_CHECK(seen == 15, "lafs_fast.photometric_augment: order row ", n,
                  " is not a permutation of 0..3");
      // remainder1 truncates through int32 (torchvision itself requires |hue| <= 0.5)
      const double hue = h[n];
      TORCH_CHECK(std::abs(hue) <= 1000, "lafs_fast.photometric_augment: hue shift of sample ", n,
                  " must be finite and in [-1000, 1000], got ", hue);
    }
  }
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(dt, "lafs_fast_photometric_augment", [&] {
    photometric_impl<scalar_t>(x, out, factors, order, jitter, gray, sigma, blur, solar,
                               sigma_max, threshold);
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace lafs_fast

TORCH_LIBRARY_IMPL(lafs_fast, CPU, m) {
  m.impl("photometric_augment", &lafs_fast::cpu::photometric_augment_cpu);
}
