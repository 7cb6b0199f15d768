// Counter-based dropout for CPU tensors. torch's CPU dropout draws its mask with bernoulli_,
// which outside Intel CPUs runs one mt19937 draw per element on one thread (about a fifth of a
// small ViT training step on this project's AMD machine). Here element i of the contiguous
// tensor keeps its value iff its 16 bits of Philox4x32-10(key = seed, counter = (i >> 3 lo,
// i >> 3 hi, 0, kDropoutStream)) are >= round(p * 2^16) (layout below): any thread computes
// any element's mask, so the loop is parallel and the backward recomputes the mask from
// (seed, p) instead of saving it. Semantics and the plain-PyTorch oracle: lafs_fast/reference.py
// (dropout_keep_mask).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/philox.h"

namespace lafs_fast {
namespace {

constexpr uint32_t kDropoutStream = 0x64726f70u;  // "drop": keeps these words apart from landmark noise

constexpr int kLanes = 8;  // Philox blocks per inner step: written lane-wise so the 10 rounds vectorise

// Philox4x32-10 on kLanes counters at once (the same rounds as philox4x32_10 in common/philox.h).
inline void philox_lanes(uint64_t seed, uint32_t c0[kLanes], uint32_t c1[kLanes], uint32_t c2[kLanes],
                         uint32_t c3[kLanes]) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0[l];
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2[l];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
      c0[l] = n0;
      c1[l] = static_cast<uint32_t>(p1);
      c2[l] = n2;
      c3[l] = static_cast<uint32_t>(p0);
    }
  }
}

// Element i uses 16 bits: half (i & 1) (low first) of word ((i >> 1) & 3) of Philox block i >> 3.
// Values are scaled in float (double for float64, which gradcheck uses).
template <typename scalar_t>
void dropout_kernel(const scalar_t* x, scalar_t* y, int64_t n, uint64_t seed, uint32_t threshold, double p) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - p));
  constexpr int64_t kGroup = 8 * kLanes;  // elements per philox_lanes call
  at::parallel_for(0, (n + kGroup - 1) / kGroup, 256, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
      for (int l = 0; l < kLanes; ++l) {
        const uint64_t blk = static_cast<uint64_t>(g) * kLanes + l;
        c0[l] = static_cast<uint32_t>(blk);
        c1[l] = static_cast<uint32_t>(blk >> 32);
        c2[l] = 0u;
        c3[l] = kDropoutStream;
      }
      philox_lanes(seed, c0, c1, c2, c3);
      uint16_t bits[kGroup];
      for (int l = 0; l < kLanes; ++l) {
        const uint32_t w[4] = {c0[l], c1[l], c2[l], c3[l]};
        for (int j = 0; j < 4; ++j) {
          bits[l * 8 + j * 2] = static_cast<uint16_t>(w[j]);
          bits[l * 8 + j * 2 + 1] = static_cast<uint16_t>(w[j] >> 16);
        }
      }
      const int64_t base = g * kGroup, m = std::min<int64_t>(kGroup, n - base);
      for (int64_t j = 0; j < m; ++j) {
        const acc_t v = static_cast<acc_t>(x[base + j]);
        y[base + j] = static_cast<scalar_t>(bits[j] >= threshold ? v * scale : acc_t(0));
      }
    }
  });
}

at::Tensor philox_dropout_cpu(const at::Tensor& input, double p, int64_t seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "lafs_fast.philox_dropout: p must be in [0, 1), got ", p);
  TORCH_CHECK(input.is_floating_point(), "lafs_fast.philox_dropout: input must be floating point, got ",
              input.scalar_type());
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  if (n == 0) return y;
  // keep iff the element's 16 random bits >= round(p * 2^16): p is quantised to 2^-16.
  const uint32_t threshold = static_cast<uint32_t>(std::nearbyint(p * 65536.0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "philox_dropout_cpu", [&] {
    dropout_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), n,
                             static_cast<uint64_t>(seed), threshold, p);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(lafs_fast, CPU, m) { m.impl("philox_dropout", &philox_dropout_cpu); }

}  // namespace lafs_fast
