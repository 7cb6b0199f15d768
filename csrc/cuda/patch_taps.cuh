// Per-tap math of the CUDA kernels, kept host/device (LAFS_HD) and free of CUDA intrinsics so
// that it can also be compiled and checked on a CPU against lafs_fast/reference.py.
#pragma once
#include <cstdint>

#include "common/bilinear.h"

namespace lafs_fast {
namespace cuda_taps {  // own namespace: no clash with names of the CPU kernels

struct Geom {
  int64_t C, H, W;
  int64_t sB, sC, sH, sW;  // images strides, in elements (any, as given by torch)
  int64_t P, K;            // patch size, slots per image
};

// Token values of tap `tap` (= i*P + j; i along x, j along y) of the patch of one image `ib`
// (images + b*sB) around landmark (lx, ly): writes o[0..C).
template <typename scalar_t, typename acc_t, typename out_t>
LAFS_HD void sample_tap(const scalar_t* ib, const Geom& g, acc_t lx, acc_t ly, int64_t tap, out_t* o) {
  const int64_t i = tap / g.P, j = tap - (tap / g.P) * g.P;
  const AxisTaps<acc_t> tx = axis_taps<acc_t>(lx + tap_offset<acc_t>(i, g.P), g.W);
  const AxisTaps<acc_t> ty = axis_taps<acc_t>(ly + tap_offset<acc_t>(j, g.P), g.H);
  const bool v00 = tx.v0 && ty.v0, v01 = tx.v0 && ty.v1, v10 = tx.v1 && ty.v0, v11 = tx.v1 && ty.v1;
  const acc_t w00 = tx.w0 * ty.w0, w01 = tx.w0 * ty.w1, w10 = tx.w1 * ty.w0, w11 = tx.w1 * ty.w1;
  // Offsets are only dereferenced for valid taps, so no read leaves the image.
  const int64_t ox0 = tx.i0 * g.sW, ox1 = ox0 + g.sW, oy0 = ty.i0 * g.sH, oy1 = oy0 + g.sH;
  for (int64_t c = 0; c < g.C; ++c) {
    const scalar_t* ic = ib + c * g.sC;
    acc_t v = acc_t(0);  // tap order of the reference: (0,0), (0,1), (1,0), (1,1)
    if (v00) v += w00 * static_cast<acc_t>(ic[oy0 + ox0]);
    if (v01) v += w01 * static_cast<acc_t>(ic[oy1 + ox0]);
    if (v10) v += w10 * static_cast<acc_t>(ic[oy0 + ox1]);
    if (v11) v += w11 * static_cast<acc_t>(ic[oy1 + ox1]);
    o[c] = static_cast<out_t>(v);
  }
}

// Backward of sample_tap for grad values gt[0..C): adds d/d(lx, ly) into glx, gly (when want_lm)
// and calls add(ptr, value) for each valid image tap of gimg_b (the contiguous (C, H, W)
// gradient of this image; null when the image gradient is not wanted).
template <typename scalar_t, typename acc_t, typename g_t, typename AddFn>
LAFS_HD void grad_tap(const scalar_t* ib, const Geom& g, acc_t lx, acc_t ly, int64_t tap, const g_t* gt,
                      bool want_lm, acc_t* gimg_b, acc_t& glx, acc_t& gly, AddFn add) {
  const int64_t i = tap / g.P, j = tap - (tap / g.P) * g.P;
  const AxisTaps<acc_t> tx = axis_taps<acc_t>(lx + tap_offset<acc_t>(i, g.P), g.W);
  const AxisTaps<acc_t> ty = axis_taps<acc_t>(ly + tap_offset<acc_t>(j, g.P), g.H);
  const bool v00 = tx.v0 && ty.v0, v01 = tx.v0 && ty.v1, v10 = tx.v1 && ty.v0, v11 = tx.v1 && ty.v1;
  if (!(v00 || v01 || v10 || v11)) return;
  const int64_t ox0 = tx.i0 * g.sW, ox1 = ox0 + g.sW, oy0 = ty.i0 * g.sH, oy1 = oy0 + g.sH;
  const int64_t plane = g.H * g.W;
  for (int64_t c = 0; c < g.C; ++c) {
    const acc_t gv = static_cast<acc_t>(gt[c]);
    if (want_lm) {
      const scalar_t* ic = ib + c * g.sC;
      const acc_t a00 = v00 ? static_cast<acc_t>(ic[oy0 + ox0]) : acc_t(0);
      const acc_t a01 = v01 ? static_cast<acc_t>(ic[oy1 + ox0]) : acc_t(0);
      const acc_t a10 = v10 ? static_cast<acc_t>(ic[oy0 + ox1]) : acc_t(0);
      const acc_t a11 = v11 ? static_cast<acc_t>(ic[oy1 + ox1]) : acc_t(0);
      // d w0 / d coord = -1, d w1 / d coord = +1; taps outside the image read as 0.
      glx += gv * (ty.w0 * (a10 - a00) + ty.w1 * (a11 - a01));
      gly += gv * (tx.w0 * (a01 - a00) + tx.w1 * (a11 - a10));
    }
    if (gimg_b != nullptr) {
      // (y, x) -> y*W + x in the contiguous plane; >= 0 whenever the tap is valid.
      const int64_t q = c * plane + ty.i0 * g.W + tx.i0;
      if (v00) add(gimg_b + q, gv * (tx.w0 * ty.w0));
      if (v01) add(gimg_b + (q + g.W), gv * (tx.w0 * ty.w1));
      if (v10) add(gimg_b + (q + 1), gv * (tx.w1 * ty.w0));
      if (v11) add(gimg_b + (q + g.W + 1), gv * (tx.w1 * ty.w1));
    }
  }
}

}  // namespace cuda_taps
}  // namespace lafs_fast
