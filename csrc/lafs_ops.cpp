// The contract of every lafs_fast op, in one place. Kernels live in cpu/ and cuda/ and register
// under TORCH_LIBRARY_IMPL; autograd and fake (meta) implementations are registered from Python,
// one module per op family in lafs_fast/ops/, as pytorch/extension-cpp does. Semantics:
// lafs_fast/reference.py (patch ops, dropout) and lafs_fast/ops/photometric.py.
#include <Python.h>
#include <torch/library.h>

// Importing lafs_fast._C runs the static registrations below; it has no Python functions.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(lafs_fast, m) {
  // ---- patch embedding (lafs_fast/ops/patch_embed.py; kernels cpu/landmark_patch_embed_cpu.cpp,
  // cuda/landmark_patch_embed_cuda.cu)
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
  // ---- counter-based dropout (lafs_fast/ops/dropout.py; kernel cpu/counter_dropout_cpu.cpp)
  // x * keep / (1 - p) with keep a hash of (seed, flat index): the backward is the same op on
  // grad_out.
  m.def("counter_dropout(Tensor x, float p, int seed) -> Tensor");
  // ---- photometric augmentation (lafs_fast/ops/photometric.py; kernel cpu/photometric_cpu.cpp)
  // LAFS photometric augmentation of views x (N, 3, H, W) in [-1, 1] with already-drawn
  // per-sample parameters (ops/photometric.py::draw_photometric_params draws them; semantics:
  // ops/photometric.py::apply_photometric_reference). Returns a new contiguous tensor.
  m.def(
      "photometric_augment(Tensor x, Tensor factors, Tensor order, Tensor jitter, "
      "Tensor grayscale, Tensor blur_sigma, Tensor blur, Tensor solarize, float sigma_max, "
      "float solarize_threshold) -> Tensor");
  // ---- CPU instruction-set path (lafs_fast/ops/cpu_isa.py; kernels cpu/cpu_isa.cpp): which
  // multiversioned path (common/multiversion.h) the CPU kernels take.
  // The path in use ("avx512", "avx2", "baseline").
  m.def("cpu_isa() -> str");
  // Every path this CPU can run, best first.
  m.def("cpu_isa_supported() -> str[]");
  // Use `isa` from now on; returns the previous path.
  m.def("set_cpu_isa(str isa) -> str");
}
