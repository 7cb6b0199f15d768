// CUDA kernels of the lafs_fast ops (semantics: lafs_fast/reference.py).
//
// Design: a slot kernel resolves (index, noise, finiteness) once per output slot; a sampling
// kernel writes bilinear patches of a chunk of slots into a workspace; cuBLAS (through ATen)
// does the GEMMs per chunk, so peak extra memory is bounded by kWorkspaceElems. The backward
// recomputes patches (never saved), and one warp per slot reduces the landmark gradient.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>

#include "common/bilinear.h"
#include "common/checks.h"
#include "common/philox.h"
#include "patch_taps.cuh"

// libdevice's accurate logf/sinf/cosf (errors of 1-2 ulp; not correctly rounded), named
// explicitly. setup.py does not pass --use_fast_math; these calls keep the noise accurate even if
// a build adds it (fast math maps logf to __logf, whose error bound is absolute, not relative,
// near u = 1: sqrt(-2 ln u) could be far off there, or NaN if the sign flips).
extern "C" __device__ float __nv_logf(float);
extern "C" __device__ float __nv_sinf(float);
extern "C" __device__ float __nv_cosf(float);

namespace lafs_fast {
namespace {

using namespace cuda_taps;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride loops cover the rest
constexpr int64_t kWorkspaceElems = int64_t(1) << 25;  // per-chunk patches (and grad-patches) bound

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline unsigned blocks_for(int64_t work, int64_t per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(work, per_block), kMaxBlocks)));
}

// Tests the exponent bits instead of isfinite(): stays right under --use_fast_math too, which
// may assume no inf/NaN (the default build does not use it).
__device__ __forceinline__ bool finite_bits(float v) {
  return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
}
__device__ __forceinline__ bool finite_bits(double v) {
  return (static_cast<unsigned long long>(__double_as_longlong(v)) & 0x7ff0000000000000ull) !=
         0x7ff0000000000000ull;
}

// landmark_noise() of philox.h. The multiplications, additions and the square root are single
// IEEE round-to-nearest operations (__fmul_rn/__fadd_rn/__fsqrt_rn also stop nvcc contracting
// them into FMAs), as in the reference; log/sin/cos are libdevice's (1-2 ulp, see above), so the
// noise can differ from the CPU's libm in the last bits, which the tests' tolerances absorb.
__device__ __forceinline__ void noise_precise(uint64_t seed, int64_t b, int64_t k, float* zx, float* zy) {
  uint32_t c[4] = {static_cast<uint32_t>(k), static_cast<uint32_t>(b), 0u, 0u};
  philox4x32_10(seed, c);
  const float u1 = __fadd_rn(__fmul_rn(static_cast<float>(c[0]), 2.3283064365386963e-10f),
                             1.1641532182693481e-10f);
  const float u2 = __fadd_rn(__fmul_rn(static_cast<float>(c[1]), 2.3283064365386963e-10f),
                             1.1641532182693481e-10f);
  const float radius = __fsqrt_rn(__fmul_rn(-2.0f, __nv_logf(u1)));
  const float angle = __fmul_rn(6.2831853071795865f, u2);
  *zx = __fmul_rn(radius, __nv_cosf(angle));
  *zy = __fmul_rn(radius, __nv_sinf(angle));
}

// Image-gradient taps: atomics on the device (host path only for completeness).
struct AtomicAddFn {
  template <typename T>
  __host__ __device__ __forceinline__ void operator()(T* p, T v) const {
#ifdef __CUDA_ARCH__
    atomicAdd(p, v);
#else
    *p += v;
#endif
  }
};

// Per output slot s = b*K + k: the sampled landmark (gather, noise) and whether it is usable.
// Out-of-range index or non-finite landmark -> ok = 0 (zero patch, zero gradient).
template <typename acc_t>
__global__ void slot_kernel(const acc_t* __restrict__ lm, const int64_t* __restrict__ index,
                            int64_t B, int64_t N, int64_t K, float perturb_std, uint64_t seed,
                            acc_t* __restrict__ slot_lm, uint8_t* __restrict__ slot_ok) {
  const int64_t total = B * K;
  for (int64_t s = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; s < total;
       s += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = s / K, k = s - b * K;
    const int64_t n = index ? index[s] : k;
    bool ok = n >= 0 && n < N;
    acc_t x = 0, y = 0;
    if (ok) {
      x = lm[(b * N + n) * 2];
      y = lm[(b * N + n) * 2 + 1];
      if (perturb_std > 0.0f) {
        float zx, zy;
        noise_precise(seed, b, k, &zx, &zy);
        x += static_cast<acc_t>(__fmul_rn(perturb_std, zx));
        y += static_cast<acc_t>(__fmul_rn(perturb_std, zy));
      }
      ok = finite_bits(x) && finite_bits(y);
    }
    slot_lm[2 * s] = ok ? x : acc_t(0);
    slot_lm[2 * s + 1] = ok ? y : acc_t(0);
    slot_ok[s] = ok ? 1 : 0;
  }
}

// Patches of slots [r0, r0 + rows) into out (rows, P*P*C): one thread per (slot, tap), looping
// over channels, so a warp writes a contiguous span.
template <typename scalar_t, typename acc_t, typename out_t>
__global__ void sample_kernel(const scalar_t* __restrict__ img, Geom g, const acc_t* __restrict__ slot_lm,
                              const uint8_t* __restrict__ slot_ok, out_t* __restrict__ out,
                              int64_t r0, int64_t rows) {
  const int64_t PP = g.P * g.P, width = PP * g.C;
  const int64_t total = rows * PP;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = t / PP, tap = t - row * PP;
    const int64_t s = r0 + row;
    out_t* o = out + row * width + tap * g.C;
    if (!slot_ok[s]) {
      for (int64_t c = 0; c < g.C; ++c) o[c] = static_cast<out_t>(acc_t(0));
      continue;
    }
    sample_tap<scalar_t, acc_t, out_t>(img + (s / g.K) * g.sB, g, slot_lm[2 * s], slot_lm[2 * s + 1], tap, o);
  }
}

// Gradients from grad_patches (rows, P*P*C) of slots [r0, r0 + rows): one warp per slot.
// Landmark gradient: per-lane sums then a shuffle tree, written to grad_slot (B*K, 2): deterministic.
// Image gradient: atomicAdd into a contiguous (B, C, H, W) buffer of acc_t: NOT deterministic
// (float addition order varies run to run).
template <typename scalar_t, typename acc_t, typename g_t>
__global__ void __launch_bounds__(kThreads)
grad_kernel(const scalar_t* __restrict__ img, Geom g, const acc_t* __restrict__ slot_lm,
            const uint8_t* __restrict__ slot_ok, const g_t* __restrict__ gp, int64_t r0, int64_t rows,
            acc_t* __restrict__ grad_slot, acc_t* __restrict__ grad_img) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = blockDim.x >> 5;
  const int64_t PP = g.P * g.P, width = PP * g.C;
  const bool want_lm = grad_slot != nullptr, want_img = grad_img != nullptr;
  // row depends only on the warp, so every branch below on the slot is warp-uniform.
  for (int64_t row = blockIdx.x * warps + (threadIdx.x >> 5); row < rows; row += int64_t(gridDim.x) * warps) {
    const int64_t s = r0 + row;
    acc_t glx = 0, gly = 0;
    if (slot_ok[s]) {
      const int64_t b = s / g.K;
      const acc_t lx = slot_lm[2 * s], ly = slot_lm[2 * s + 1];
      const scalar_t* ib = img + b * g.sB;
      acc_t* gb = want_img ? grad_img + b * g.C * g.H * g.W : nullptr;
      const g_t* grow = gp + row * width;
      for (int64_t tap = lane; tap < PP; tap += 32)
        grad_tap<scalar_t, acc_t, g_t>(ib, g, lx, ly, tap, grow + tap * g.C, want_lm, gb, glx, gly, AtomicAddFn{});
    }
    if (want_lm) {
      for (int off = 16; off > 0; off >>= 1) {
        glx += __shfl_down_sync(0xffffffffu, glx, off);
        gly += __shfl_down_sync(0xffffffffu, gly, off);
      }
      if (lane == 0) {
        grad_slot[2 * s] = glx;
        grad_slot[2 * s + 1] = gly;
      }
    }
  }
}

// grad_lm[b, n] = sum over k with index[b, k] == n of grad_slot[b, k], k ascending: deterministic,
// O(B*N*K) work (fine for LAFS sizes, N, K ~ 200).
template <typename acc_t>
__global__ void index_reduce_kernel(const acc_t* __restrict__ grad_slot, const int64_t* __restrict__ index,
                                    int64_t B, int64_t N, int64_t K, acc_t* __restrict__ grad_lm) {
  const int64_t total = B * N;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = t / N, n = t - b * N;
    const int64_t* idx = index + b * K;
    const acc_t* gs = grad_slot + b * K * 2;
    acc_t gx = 0, gy = 0;
    for (int64_t k = 0; k < K; ++k) {
      if (idx[k] == n) {
        gx += gs[2 * k];
        gy += gs[2 * k + 1];
      }
    }
    grad_lm[2 * t] = gx;
    grad_lm[2 * t + 1] = gy;
  }
}

// ----------------------------------------------------------------------------- host helpers

at::ScalarType compute_dtype(const at::Tensor& images) {
  return images.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Geom make_geom(const at::Tensor& images, int64_t P, int64_t K) {
  Geom g;
  g.C = images.size(1);
  g.H = images.size(2);
  g.W = images.size(3);
  g.sB = images.stride(0);
  g.sC = images.stride(1);
  g.sH = images.stride(2);
  g.sW = images.stride(3);
  g.P = P;
  g.K = K;
  return g;
}

struct Slots {
  at::Tensor lm;  // (B*K, 2) compute dtype
  at::Tensor ok;  // (B*K,) uint8
};

// B*K must be > 0.
Slots make_slots(const at::Tensor& images, const at::Tensor& landmarks, const c10::optional<at::Tensor>& index,
                 int64_t K, double perturb_std, int64_t seed) {
  const auto cdt = compute_dtype(images);
  const int64_t B = images.size(0), N = landmarks.size(1), M = B * K;
  const at::Tensor lm = landmarks.to(cdt).contiguous();  // reference: landmarks.to(dtype) first
  at::Tensor idx;
  if (index.has_value()) idx = index->contiguous();
  Slots out;
  out.lm = at::empty({M, 2}, images.options().dtype(cdt));
  out.ok = at::empty({M}, images.options().dtype(at::kByte));
  const float std_f = perturb_std > 0 ? static_cast<float>(perturb_std) : 0.0f;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(cdt, "lafs_fast_slots", [&] {
    slot_kernel<scalar_t><<<blocks_for(M, kThreads), kThreads, 0, stream>>>(
        lm.data_ptr<scalar_t>(), idx.defined() ? idx.data_ptr<int64_t>() : nullptr, B, N, K, std_f,
        static_cast<uint64_t>(seed), out.lm.data_ptr<scalar_t>(), out.ok.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// patches of slots [r0, r0 + rows) into out (contiguous, >= rows * P*P*C elements, images' dtype).
void launch_sample(const at::Tensor& images, const Geom& g, const Slots& sl, at::Tensor& out, int64_t r0,
                   int64_t rows) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, images.scalar_type(), "lafs_fast_sample", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sample_kernel<scalar_t, acc_t, scalar_t><<<blocks_for(rows * g.P * g.P, kThreads), kThreads, 0, stream>>>(
        images.const_data_ptr<scalar_t>(), g, sl.lm.const_data_ptr<acc_t>(), sl.ok.const_data_ptr<uint8_t>(),
        out.data_ptr<scalar_t>(), r0, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// gp: contiguous (rows, P*P*C) in images' dtype or the compute dtype. grad_slot / grad_img
// (compute dtype, contiguous) may be undefined when not wanted.
void launch_grad(const at::Tensor& images, const Geom& g, const Slots& sl, const at::Tensor& gp, int64_t r0,
                 int64_t rows, at::Tensor& grad_slot, at::Tensor& grad_img) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = blocks_for(rows, kThreads / 32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, images.scalar_type(), "lafs_fast_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* gs = grad_slot.defined() ? grad_slot.data_ptr<acc_t>() : nullptr;
    acc_t* gi = grad_img.defined() ? grad_img.data_ptr<acc_t>() : nullptr;
    if (gp.scalar_type() == images.scalar_type()) {
      grad_kernel<scalar_t, acc_t, scalar_t><<<blocks, kThreads, 0, stream>>>(
          images.const_data_ptr<scalar_t>(), g, sl.lm.const_data_ptr<acc_t>(), sl.ok.const_data_ptr<uint8_t>(),
          gp.const_data_ptr<scalar_t>(), r0, rows, gs, gi);
    } else {
      TORCH_CHECK(gp.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "lafs_fast: internal dtype error");
      grad_kernel<scalar_t, acc_t, acc_t><<<blocks, kThreads, 0, stream>>>(
          images.const_data_ptr<scalar_t>(), g, sl.lm.const_data_ptr<acc_t>(), sl.ok.const_data_ptr<uint8_t>(),
          gp.const_data_ptr<acc_t>(), r0, rows, gs, gi);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// (B*K, 2) slot gradients -> (B, N, 2) landmark gradients in landmarks' dtype.
at::Tensor landmark_grad(const at::Tensor& grad_slot, const at::Tensor& landmarks,
                         const c10::optional<at::Tensor>& index, int64_t B, int64_t K) {
  const int64_t N = landmarks.size(1);
  if (!index.has_value()) return grad_slot.view({B, N, 2}).to(landmarks.scalar_type()).contiguous();
  at::Tensor out = at::empty({B, N, 2}, grad_slot.options());
  if (B * N > 0) {
    const at::Tensor idx = index->contiguous();
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(grad_slot.scalar_type(), "lafs_fast_index_reduce", [&] {
      index_reduce_kernel<scalar_t><<<blocks_for(B * N, kThreads), kThreads, 0, stream>>>(
          grad_slot.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), B, N, K, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return out.to(landmarks.scalar_type()).contiguous();
}

// a @ b with the result in acc (fp32 for bf16/fp16 inputs: cuBLAS accumulates in fp32 anyway).
at::Tensor mm_acc(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  if (a.scalar_type() == acc) return at::mm(a, b);
  if (a.scalar_type() == at::kHalf && at::globalContext().allowFP16AccumulationCuBLAS()) {
    return at::mm(a, b).to(acc);  // ATen refuses fp16 -> fp32 GEMMs in this mode
  }
  return at::mm(a, b, acc);
}

int64_t chunk_rows(int64_t M, int64_t width) {
  return std::max<int64_t>(1, std::min<int64_t>(M, kWorkspaceElems / std::max<int64_t>(width, 1)));
}

// ----------------------------------------------------------------------------- ops

at::Tensor landmark_patches_cuda(const at::Tensor& images, const at::Tensor& landmarks,
                                 const c10::optional<at::Tensor>& index, int64_t patch_size, double perturb_std,
                                 int64_t seed) {
  check_patch_args(images, landmarks, index, patch_size);
  TORCH_CHECK(images.is_cuda(), "lafs_fast: images must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(images.device());
  const int64_t B = images.size(0), C = images.size(1), P = patch_size;
  const int64_t K = index.has_value() ? index->size(1) : landmarks.size(1);
  const int64_t width = P * P * C, M = B * K;
  at::Tensor out = at::empty({B, K, width}, images.options());
  if (M == 0 || width == 0) return out;
  const Slots sl = make_slots(images, landmarks, index, K, perturb_std, seed);
  launch_sample(images, make_geom(images, P, K), sl, out, 0, M);
  return out;
}

std::tuple<at::Tensor, at::Tensor> landmark_patches_backward_cuda(
    const at::Tensor& grad_patches, const at::Tensor& images, const at::Tensor& landmarks,
    const c10::optional<at::Tensor>& index, int64_t patch_size, double perturb_std, int64_t seed,
    std::array<bool, 2> output_mask) {
  check_patch_args(images, landmarks, index, patch_size);
  TORCH_CHECK(images.is_cuda(), "lafs_fast: images must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(images.device());
  const int64_t B = images.size(0), C = images.size(1), P = patch_size;
  const int64_t K = index.has_value() ? index->size(1) : landmarks.size(1);
  const int64_t width = P * P * C, M = B * K;
  TORCH_CHECK(grad_patches.dim() == 3 && grad_patches.size(0) == B && grad_patches.size(1) == K &&
                  grad_patches.size(2) == width && grad_patches.device() == images.device(),
              "lafs_fast: grad_patches must be (B, K, P*P*C) on images' device, got ", grad_patches.sizes());
  const bool need_img = output_mask[0], need_lm = output_mask[1];
  const auto cdt = compute_dtype(images);
  at::Tensor grad_img = need_img ? at::zeros(images.sizes(), images.options().dtype(cdt)) : at::Tensor();
  at::Tensor grad_slot = need_lm ? at::zeros({M, 2}, images.options().dtype(cdt)) : at::Tensor();
  if (M > 0 && width > 0 && (need_img || need_lm)) {
    const at::Tensor gp = grad_patches.to(images.scalar_type()).contiguous();
    const Slots sl = make_slots(images, landmarks, index, K, perturb_std, seed);
    launch_grad(images, make_geom(images, P, K), sl, gp, 0, M, grad_slot, grad_img);
  }
  at::Tensor g_img = need_img ? grad_img.to(images.scalar_type()).contiguous() : images.new_empty({0});
  at::Tensor g_lm = need_lm ? landmark_grad(grad_slot, landmarks, index, B, K) : landmarks.new_empty({0});
  return {g_img, g_lm};
}

at::Tensor landmark_patch_embed_cuda(const at::Tensor& images, const at::Tensor& landmarks, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& index,
                                     int64_t patch_size, double perturb_std, int64_t seed) {
  check_patch_args(images, landmarks, index, patch_size);
  check_weight(images, weight, bias, patch_size);
  TORCH_CHECK(images.is_cuda(), "lafs_fast: images must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(images.device());
  const int64_t B = images.size(0), C = images.size(1), P = patch_size;
  const int64_t K = index.has_value() ? index->size(1) : landmarks.size(1);
  const int64_t width = P * P * C, M = B * K, D = weight.size(0);
  at::Tensor out = at::empty({B, K, D}, images.options());
  if (M == 0 || D == 0) return out;
  if (width == 0) {  // C == 0: an empty patch times weight is 0
    if (bias.has_value()) out.copy_(bias->view({1, 1, D}).expand({B, K, D})); else out.zero_();
    return out;
  }
  const Slots sl = make_slots(images, landmarks, index, K, perturb_std, seed);
  const Geom g = make_geom(images, P, K);
  const int64_t rows_max = chunk_rows(M, width);
  at::Tensor ws = at::empty({rows_max, width}, images.options());
  const at::Tensor wt = weight.t();
  at::Tensor out2d = out.view({M, D});
  for (int64_t r0 = 0; r0 < M; r0 += rows_max) {
    const int64_t rows = std::min(rows_max, M - r0);
    launch_sample(images, g, sl, ws, r0, rows);
    const at::Tensor pc = ws.narrow(0, 0, rows);
    at::Tensor oc = out2d.narrow(0, r0, rows);
    if (bias.has_value()) at::addmm_out(oc, *bias, pc, wt); else at::mm_out(oc, pc, wt);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> landmark_patch_embed_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& landmarks, const at::Tensor& weight,
    const c10::optional<at::Tensor>& index, int64_t patch_size, double perturb_std, int64_t seed,
    std::array<bool, 4> output_mask) {
  check_patch_args(images, landmarks, index, patch_size);
  check_weight(images, weight, c10::nullopt, patch_size);
  TORCH_CHECK(images.is_cuda(), "lafs_fast: images must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(images.device());
  const int64_t B = images.size(0), C = images.size(1), P = patch_size;
  const int64_t K = index.has_value() ? index->size(1) : landmarks.size(1);
  const int64_t width = P * P * C, M = B * K, D = weight.size(0);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == B && grad_out.size(1) == K && grad_out.size(2) == D &&
                  grad_out.device() == images.device(),
              "lafs_fast: grad_out must be (B, K, D) on images' device, got ", grad_out.sizes());
  const bool need_img = output_mask[0], need_lm = output_mask[1], need_w = output_mask[2],
             need_b = output_mask[3];
  const auto cdt = compute_dtype(images);
  const auto st = images.scalar_type();
  const at::Tensor go = grad_out.to(st).contiguous().view({M, D});

  at::Tensor grad_img = need_img ? at::zeros(images.sizes(), images.options().dtype(cdt)) : at::Tensor();
  at::Tensor grad_slot = need_lm ? at::zeros({M, 2}, images.options().dtype(cdt)) : at::Tensor();
  at::Tensor grad_w = need_w ? at::zeros({D, width}, weight.options().dtype(cdt)) : at::Tensor();
  at::Tensor g_b = need_b ? at::sum(go, {0}, false, cdt).to(weight.scalar_type()).contiguous()
                          : weight.new_empty({0});  // ATen's reduction: deterministic

  if (M > 0 && D > 0 && width > 0 && (need_img || need_lm || need_w)) {
    const Slots sl = make_slots(images, landmarks, index, K, perturb_std, seed);
    const Geom g = make_geom(images, P, K);
    const int64_t rows_max = chunk_rows(M, width);
    at::Tensor ws = need_w ? at::empty({rows_max, width}, images.options()) : at::Tensor();
    // Chunks in a fixed order, each a cuBLAS GEMM: grad_weight is deterministic.
    for (int64_t r0 = 0; r0 < M; r0 += rows_max) {
      const int64_t rows = std::min(rows_max, M - r0);
      const at::Tensor gc = go.narrow(0, r0, rows);
      if (need_w) {
        launch_sample(images, g, sl, ws, r0, rows);
        const at::Tensor part = mm_acc(gc.t(), ws.narrow(0, 0, rows), cdt);
        if (r0 == 0) grad_w.copy_(part); else grad_w.add_(part);
      }
      if (need_img || need_lm) {
        const at::Tensor gp = mm_acc(gc, weight, cdt).contiguous();  // (rows, width) compute dtype
        launch_grad(images, g, sl, gp, r0, rows, grad_slot, grad_img);
      }
    }
  }
  at::Tensor g_img = need_img ? grad_img.to(st).contiguous() : images.new_empty({0});
  at::Tensor g_lm = need_lm ? landmark_grad(grad_slot, landmarks, index, B, K) : landmarks.new_empty({0});
  at::Tensor g_w = need_w ? grad_w.to(weight.scalar_type()).contiguous() : weight.new_empty({0});
  return {g_img, g_lm, g_w, g_b};
}

}  // namespace
}  // namespace lafs_fast

TORCH_LIBRARY_IMPL(lafs_fast, CUDA, m) {
  m.impl("landmark_patch_embed", &lafs_fast::landmark_patch_embed_cuda);
  m.impl("landmark_patch_embed_backward", &lafs_fast::landmark_patch_embed_backward_cuda);
  m.impl("landmark_patches", &lafs_fast::landmark_patches_cuda);
  m.impl("landmark_patches_backward", &lafs_fast::landmark_patches_backward_cuda);
}
