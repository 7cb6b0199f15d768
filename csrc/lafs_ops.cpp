// The contract of every lafs_fast op, in one place. Kernels live in cpu/ and cuda/ and register
// under TORCH_LIBRARY_IMPL; autograd and fake (meta) implementations are registered from Python
// (lafs_fast/ops.py), as pytorch/extension-cpp does. Semantics: lafs_fast/reference.py.
#include <Python.h>
#include <torch/library.h>

// Importing lafs_fast._C runs the static registrations below; it has no Python functions.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(lafs_fast, m) {
  // tokens (B, K, D) = patches(images, landmarks[index] + noise) @ weight.T + bias
  m.def(
      "landmark_patch_embed(Tensor images, Tensor landmarks, Tensor weight, Tensor? bias, "
      "Tensor? index, int patch_size, float perturb_std, int seed) -> Tensor");
  // Gradients for (images, landmarks, weight, bias); an entry whose mask is false comes back
  // as an empty tensor. Patches are recomputed, never saved.
  m.def(
      "landmark_patch_embed_backward(Tensor grad_out, Tensor images, Tensor landmarks, "
      "Tensor weight, Tensor? index, int patch_size, float perturb_std, int seed, "
      "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // patches (B, K, P*P*C) in the LAFS token layout
  m.def(
      "landmark_patches(Tensor images, Tensor landmarks, Tensor? index, int patch_size, "
      "float perturb_std, int seed) -> Tensor");
  // Gradients for (images, landmarks); masked entries come back empty.
  m.def(
      "landmark_patches_backward(Tensor grad_patches, Tensor images, Tensor landmarks, "
      "Tensor? index, int patch_size, float perturb_std, int seed, bool[2] output_mask) "
      "-> (Tensor, Tensor)");
  // x * keep / (1 - p) with keep a hash of (seed, flat index) (cpu/philox_dropout_cpu.cpp):
  // the backward is the same op on grad_out (lafs_fast/dropout.py).
  m.def("philox_dropout(Tensor x, float p, int seed) -> Tensor");
  // LAFS photometric augmentation of views x (N, 3, H, W) in [-1, 1] with already-drawn
  // per-sample parameters (lafs_fast/views.py::photometric_augment draws them; semantics:
  // views.apply_photometric_reference). Returns a new contiguous tensor.
  m.def(
      "photometric_augment(Tensor x, Tensor factors, Tensor order, Tensor jitter, "
      "Tensor grayscale, Tensor blur_sigma, Tensor blur, Tensor solarize, float sigma_max, "
      "float solarize_threshold) -> Tensor");
}
