// Counter-based dropout for CPU tensors. torch's CPU dropout draws its mask with bernoulli_,
// which outside Intel CPUs runs one mt19937 draw per element on one thread (about a fifth of a
// small ViT training step on this project's AMD machine). Here the mask of element i (flat index
// of the contiguous tensor) is a pure function of (seed, i): any thread computes any element, the
// loop vectorises (8 or 16 lanes of 32-bit integer maths), and the backward recomputes the mask
// instead of saving it. The function (oracle: lafs_fast/reference.py, dropout_keep_mask):
//   (k0, k1) = the two 32-bit halves of splitmix64(seed)
//   h = mix32(mix32(lo32(i) ^ k0) ^ hi32(i) ^ k1)     mix32 = Wellons' lowbias32 integer hash
//   keep iff h >= round(p * 2^32);  y = x * (keep ? 1 / (1 - p) : 0)
// A hash, not Philox: dropout needs independent-looking bits, not a stream with proven
// period; Philox's ten 64-bit-product rounds per 4 words cost 5x more here (measured).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/multiversion.h"

namespace lafs_fast {
namespace {

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

// One contiguous range [begin, end); values are scaled in acc_t (float, double for float64,
// which gradcheck uses). The select picks the factor, then one unconditional multiply: branch-free,
// so the loop vectorises.
template <typename scalar_t, typename acc_t>
LAFS_INLINE void dropout_range(const scalar_t* x, scalar_t* y, int64_t begin, int64_t end, uint32_t k0,
                               uint32_t k1, uint32_t threshold, acc_t scale) {
  for (int64_t i = begin; i < end; ++i) {
    const uint64_t u = static_cast<uint64_t>(i);
    const uint32_t h = mix32(mix32(static_cast<uint32_t>(u) ^ k0) ^ static_cast<uint32_t>(u >> 32) ^ k1);
    const acc_t factor = h >= threshold ? scale : acc_t(0);
    y[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * factor);
  }
}

// dropout_range_isa(IsaTag, ...): dropout_range compiled for each instruction-set path
// (common/multiversion.h): 16 lanes of 32-bit integer maths with AVX-512, 8 with AVX2.
LAFS_ISA_WRAPPERS(dropout_range_isa, dropout_range)

template <typename scalar_t>
void dropout_kernel(const scalar_t* x, scalar_t* y, int64_t n, uint64_t seed, uint32_t threshold, double p) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - p));
  const uint64_t key = splitmix64(seed);
  const uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  with_cpu_isa([&](auto isa) {
    at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
      dropout_range_isa(isa, x, y, begin, end, k0, k1, threshold, scale);
    });
  });
}

at::Tensor counter_dropout_cpu(const at::Tensor& input, double p, int64_t seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "lafs_fast.counter_dropout: p must be in [0, 1), got ", p);
  TORCH_CHECK(input.is_floating_point(), "lafs_fast.counter_dropout: input must be floating point, got ",
              input.scalar_type());
  const at::Tensor x = input.contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t n = x.numel();
  if (n == 0) return y;
  // round(p * 2^32); p < 1 keeps it below 2^32 except within 2^-33 of 1.
  const double t = std::nearbyint(p * 4294967296.0);
  const uint32_t threshold = t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "counter_dropout_cpu", [&] {
    dropout_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), n,
                             static_cast<uint64_t>(seed), threshold, p);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(lafs_fast, CPU, m) { m.impl("counter_dropout", &counter_dropout_cpu); }

}  // namespace lafs_fast
