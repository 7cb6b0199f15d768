// Internal invariants of the C++ kernels (memory safety when torch.ops.lafs_fast.* is called
// directly). The user-facing argument errors live in lafs_fast/ops/, one module per op family.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace lafs_fast {

inline void check_patch_args(const at::Tensor& images, const at::Tensor& landmarks,
                             const c10::optional<at::Tensor>& index, int64_t patch_size) {
  TORCH_CHECK(images.dim() == 4, "lafs_fast: images must be (B, C, H, W), got ", images.sizes());
  TORCH_CHECK(landmarks.dim() == 3 && landmarks.size(2) == 2 && landmarks.size(0) == images.size(0),
              "lafs_fast: landmarks must be (B, N, 2) with B = images.size(0), got ", landmarks.sizes());
  TORCH_CHECK(landmarks.device() == images.device(), "lafs_fast: landmarks must be on images' device");
  TORCH_CHECK(patch_size > 0, "lafs_fast: patch_size must be positive, got ", patch_size);
  if (index.has_value()) {
    TORCH_CHECK(index->dim() == 2 && index->size(0) == images.size(0) &&
                    index->scalar_type() == at::kLong && index->device() == images.device(),
                "lafs_fast: index must be int64 (B, K) on images' device, got ", index->sizes());
  }
}

inline void check_weight(const at::Tensor& images, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias, int64_t patch_size) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == patch_size * patch_size * images.size(1),
              "lafs_fast: weight must be (D, P*P*C), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == images.scalar_type() && weight.device() == images.device(),
              "lafs_fast: weight must match images' dtype and device");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                    bias->scalar_type() == images.scalar_type() && bias->device() == images.device(),
                "lafs_fast: bias must be (D,) with images' dtype and device");
  }
}

}  // namespace lafs_fast
