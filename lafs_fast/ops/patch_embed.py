"""The landmark patch ops: landmark_patch_embed, landmark_patches and multicrop_embed (argument
checks, backend choice, fake kernels, autograd, and the registration of the Triton ops).

Backends (``backend=`` or the environment variable LAFS_FAST_BACKEND when ``backend="auto"``):
  reference  plain PyTorch (lafs_fast.reference): the oracle, and the fallback without _C
  cpu        C++/OpenMP kernels of lafs_fast._C (CPU tensors)
  cuda       CUDA kernels of lafs_fast._C (CUDA tensors)
  triton     Triton kernels (lafs_fast.kernels); on CPU only under TRITON_INTERPRET=1
  auto       cuda for CUDA tensors, cpu for CPU tensors, reference when _C is missing
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ._common import EXTENSION_STATUS, HAS_EXTENSION, env_backend, has_kernel

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- argument checks
def check_patch_inputs(images: Tensor, landmarks: Tensor, index: Optional[Tensor],
                       patch_size: int, perturb_std: float, check_index_values: bool = True) -> None:
    """The one place where user-facing argument errors are raised (every backend calls it).
    check_index_values=False skips the range check of a CUDA index (a host sync per call) for a
    caller that built the index itself; CPU indices are always checked (no sync there)."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (B, C, H, W) tensor, got shape "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images)}")
    if images.dtype not in FLOAT_DTYPES:
        raise ValueError(f"images must be float32, bfloat16, float16 or float64, got {images.dtype}")
    B, C, H, W = images.shape
    if C < 1 or H < 1 or W < 1:
        raise ValueError(f"images must have C, H, W >= 1, got shape {tuple(images.shape)}")
    if not isinstance(landmarks, Tensor) or landmarks.dim() != 3 or landmarks.shape[-1] != 2:
        raise ValueError(f"landmarks must be a (B, N, 2) tensor of (x, y) pixels, got shape "
                         f"{tuple(landmarks.shape) if isinstance(landmarks, Tensor) else type(landmarks)}")
    if landmarks.shape[0] != B:
        raise ValueError(f"landmarks batch {landmarks.shape[0]} != images batch {B}")
    if not landmarks.is_floating_point():
        raise ValueError(f"landmarks must be a floating-point tensor, got {landmarks.dtype}")
    if landmarks.device != images.device:
        raise ValueError(f"landmarks are on {landmarks.device} but images on {images.device}")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if not (perturb_std >= 0.0) or perturb_std == float("inf"):
        raise ValueError(f"perturb_std must be finite and >= 0, got {perturb_std!r}")
    if index is not None:
        if not isinstance(index, Tensor) or index.dim() != 2 or index.shape[0] != B:
            raise ValueError(f"index must be a (B, K) = ({B}, K) int64 tensor, got shape "
                             f"{tuple(index.shape) if isinstance(index, Tensor) else type(index)}")
        if index.dtype != torch.int64:
            raise ValueError(f"index must be int64, got {index.dtype}")
        if index.device != images.device:
            raise ValueError(f"index is on {index.device} but images on {images.device}")
        N = landmarks.shape[1]
        # Data-dependent: on CUDA a host sync (the GPU queue drains every call). Skipped while
        # torch.compile traces, for meta tensors (shape-only runs), and on CUDA when the caller
        # vouches for the index (check_index_values=False); the fused kernels read an out-of-range
        # slot as a zero patch anyway, so a skipped check cannot read outside the landmarks.
        if (index.numel() and index.device.type != "meta" and not torch.compiler.is_compiling()
                and (check_index_values or index.device.type == "cpu")):
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= N:
                raise ValueError(f"index values must lie in [0, {N}) (N landmarks), got [{lo}, {hi}]")


def check_weight_inputs(images: Tensor, weight: Tensor, bias: Optional[Tensor], patch_size: int) -> None:
    C = images.shape[1]
    width = patch_size * patch_size * C
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != width:
        raise ValueError(f"weight must be (D, P*P*C) = (D, {width}) for P={patch_size}, C={C}, got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight)}")
    if weight.dtype != images.dtype or weight.device != images.device:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) must match images "
                         f"({images.dtype}, {images.device})")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be ({weight.shape[0]},), got "
                             f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias)}")
        if bias.dtype != images.dtype or bias.device != images.device:
            raise ValueError(f"bias ({bias.dtype}, {bias.device}) must match images "
                             f"({images.dtype}, {images.device})")


def resolve_seed(seed: Optional[int], perturb_std: float) -> int:
    """seed=None draws a fresh one from torch's default (CPU) generator: no device sync."""
    if seed is None:
        if perturb_std == 0:
            return 0
        return int(torch.randint(0, 2**62, (1,)).item())
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must lie in [0, 2**63), got {seed}")
    return seed


def resolve_backend(backend: str, device: torch.device, needs_image_grad: Optional[bool] = None) -> str:
    backend = env_backend(backend)
    if backend == "auto" and device.type == "cuda" and torch.are_deterministic_algorithms_enabled():
        # The CUDA and Triton kernels sum the IMAGE gradient with atomics (run-to-run rounding
        # differences); their forward, landmark, weight and bias gradients are deterministic.
        # Under torch.use_deterministic_algorithms, a call whose backward may need the image
        # gradient (grad mode on; needs_image_grad None = unknown) goes to the reference ops,
        # whose gather backward torch makes deterministic. Cost: no fusion, the patches
        # materialised and kept for backward (B*K*P*P*C values per call), several times the
        # fused op's time (3.6x its forward on CPU; on GPU not measured yet). Callers that pass
        # needs_image_grad=images.requires_grad keep the fused kernels whenever images need no
        # gradient, which is every training step (images are inputs). An explicit backend is
        # honoured as asked.
        if needs_image_grad or (needs_image_grad is None and torch.is_grad_enabled()):
            return "reference"
    if backend == "auto":
        wanted = "cuda" if device.type == "cuda" else "cpu"
        if has_kernel("landmark_patch_embed", wanted.upper()):
            return wanted
        if wanted == "cuda" and importlib.util.find_spec("triton") is not None:
            return "triton"
        _warn_fallback(f"no {wanted} kernel ({EXTENSION_STATUS})")
        return "reference"
    if backend in ("cpu", "cuda"):
        if not HAS_EXTENSION:
            raise RuntimeError(f"backend={backend!r} needs lafs_fast._C: {EXTENSION_STATUS}")
        if device.type != backend:
            raise ValueError(f"backend={backend!r} got tensors on {device}")
        if backend == "cuda" and not has_kernel("landmark_patch_embed", "CUDA"):
            raise RuntimeError("lafs_fast._C was built without CUDA kernels: rebuild with "
                               "LAFS_FAST_CUDA=1 pip install --no-build-isolation .")
    return backend


_warned = False


def _warn_fallback(why):
    global _warned
    if not _warned:
        warnings.warn(f"lafs_fast: using the slow reference ops: {why}")
        _warned = True


# ----------------------------------------------------------------------------- public entry points
def landmark_patch_embed(images: Tensor, landmarks: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                         *, patch_size: int = 8, index: Optional[Tensor] = None, perturb_std: float = 0.0,
                         seed: Optional[int] = None, backend: str = "auto") -> Tensor:
    """Tokens (B, K, D): a P x P bilinear patch around every (indexed, perturbed) landmark times
    ``weight.T`` (+ ``bias``), in one pass. See docs/ops.md, "The landmark patch convention".

    images (B, C, H, W) float32/bfloat16/float16 (float64 for gradcheck), any strides;
    landmarks (B, N, 2) pixel (x, y); weight (D, P*P*C); bias (D,); index (B, K) int64 in [0, N)
    (repeats allowed), K = N when None; perturb_std: sigma in pixels of the Gaussian noise drawn
    per (seed, b, k, axis); seed=None draws one from torch's default generator.
    """
    check_patch_inputs(images, landmarks, index, patch_size, perturb_std)
    check_weight_inputs(images, weight, bias, patch_size)
    seed = resolve_seed(seed, perturb_std)
    backend = resolve_backend(backend, images.device, needs_image_grad=images.requires_grad)
    return _embed(backend, images, landmarks, weight, bias, index, patch_size, float(perturb_std), seed)


def _embed(backend, images, landmarks, weight, bias, index, patch_size, perturb_std, seed):
    """landmark_patch_embed on a resolved backend with checked arguments."""
    if backend == "reference":
        return reference.landmark_patch_embed(images, landmarks, weight, bias, index, patch_size,
                                              perturb_std, seed)
    if backend == "triton":
        register_triton_ops()
        return torch.ops.lafs_fast.landmark_patch_embed_triton(
            images, landmarks, weight, bias, index, int(patch_size), float(perturb_std), int(seed))
    return torch.ops.lafs_fast.landmark_patch_embed(images, landmarks, weight, bias, index,
                                                    patch_size, perturb_std, seed)


def landmark_patches(images: Tensor, landmarks: Tensor, *, patch_size: int = 8,
                     index: Optional[Tensor] = None, perturb_std: float = 0.0,
                     seed: Optional[int] = None, backend: str = "auto") -> Tensor:
    """The sampled patches (B, K, P*P*C) in the token layout (for pictures and tests)."""
    check_patch_inputs(images, landmarks, index, patch_size, perturb_std)
    seed = resolve_seed(seed, perturb_std)
    backend = resolve_backend(backend, images.device, needs_image_grad=images.requires_grad)
    if backend == "reference":
        return reference.landmark_patches(images, landmarks, index, patch_size, float(perturb_std), seed)
    if backend == "triton":
        register_triton_ops()
        return torch.ops.lafs_fast.landmark_patches_triton(images, landmarks, index, int(patch_size),
                                                           float(perturb_std), int(seed))
    return torch.ops.lafs_fast.landmark_patches(images, landmarks, index, patch_size,
                                                float(perturb_std), seed)


LOCAL_SEED_SALT = 1 << 62  # local views draw from key seed ^ salt: a stream apart from the global one


def multicrop_embed(global_images: Tensor, global_landmarks: Tensor, local_images: Tensor,
                    local_landmarks: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                    teacher_weight: Tensor, teacher_bias: Optional[Tensor], *,
                    local_index: Optional[Tensor] = None, patch_size: int = 8, perturb_std: float = 0.0,
                    seed: Optional[int] = None, backend: str = "auto",
                    check_index: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The tokens of one LAFS step in two calls, with no loop over views.

    global_images (G*B, C, H, W) with global_landmarks (G*B, N, 2): every landmark in order;
    local_images (L*B, C, h, w) with local_landmarks (L*B, N, 2) and local_index (L*B, K): the
    shuffled subset (check_index=False: the caller drew local_index itself, as the pretrainer
    does, so its values are not checked on CUDA, sparing a host sync per step). Returns
    (student_global (G*B, N, Ds), student_local (L*B, K, Ds), teacher_global (G*B, N, Dt)).
    Each global patch is sampled once and multiplied by the student and teacher weights in the
    same GEMM (teacher_student_embed); the teacher tokens carry no gradient, and the backward
    computes the student's gradients only. Perturbation noise is
    keyed by (seed, row, slot) for the global views and by (seed ^ 2**62, row, slot) for the local.
    """
    check_patch_inputs(global_images, global_landmarks, None, patch_size, perturb_std)
    check_patch_inputs(local_images, local_landmarks, local_index, patch_size, perturb_std, check_index)
    check_weight_inputs(global_images, student_weight, student_bias, patch_size)
    check_weight_inputs(global_images, teacher_weight, teacher_bias, patch_size)
    if local_images.dtype != global_images.dtype or local_images.shape[1] != global_images.shape[1]:
        raise ValueError("local_images must have global_images' dtype and channel count")
    seed = resolve_seed(seed, perturb_std)
    backend = resolve_backend(backend, global_images.device,
                              needs_image_grad=global_images.requires_grad or local_images.requires_grad)
    student_global, teacher_global = torch.ops.lafs_fast.teacher_student_embed(
        global_images, global_landmarks, student_weight, student_bias, teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(), patch_size, float(perturb_std), seed,
        backend)
    student_local = _embed(backend, local_images, local_landmarks, student_weight, student_bias, local_index,
                           patch_size, float(perturb_std), seed ^ LOCAL_SEED_SALT)
    return student_global, student_local, teacher_global.detach()


@torch.library.custom_op("lafs_fast::teacher_student_embed", mutates_args=())
def teacher_student_embed(images: Tensor, landmarks: Tensor, student_weight: Tensor,
                          student_bias: Optional[Tensor], teacher_weight: Tensor,
                          teacher_bias: Optional[Tensor], patch_size: int, perturb_std: float, seed: int,
                          backend: str) -> tuple[Tensor, Tensor]:
    """Student and teacher tokens of the same patches: one sampling pass, one GEMM with the
    stacked weights [student; teacher]."""
    Ds = student_weight.shape[0]
    weight = torch.cat([student_weight, teacher_weight])
    if student_bias is None and teacher_bias is None:
        bias = None
    else:
        zeros = lambda w: w.new_zeros(w.shape[0])  # noqa: E731
        bias = torch.cat([student_bias if student_bias is not None else zeros(student_weight),
                          teacher_bias if teacher_bias is not None else zeros(teacher_weight)])
    with torch.no_grad():
        out = _embed(backend, images, landmarks, weight, bias, None, patch_size, perturb_std, seed)
    # clone, not contiguous(): a slice that is already contiguous (an empty batch, a zero-width
    # teacher) would come back as a view, and a custom op's outputs must not alias.
    return (out[..., :Ds].clone(memory_format=torch.contiguous_format),
            out[..., Ds:].clone(memory_format=torch.contiguous_format))


@teacher_student_embed.register_fake
def _(images, landmarks, student_weight, student_bias, teacher_weight, teacher_bias, patch_size,
      perturb_std, seed, backend):
    B, N = landmarks.shape[:2]
    return (images.new_empty(B, N, student_weight.shape[0]), images.new_empty(B, N, teacher_weight.shape[0]))


def _ts_setup_context(ctx, inputs, output):
    images, landmarks, student_weight, student_bias, _, _, patch_size, perturb_std, seed, backend = inputs
    ctx.save_for_backward(images, landmarks, student_weight)
    ctx.args = (patch_size, perturb_std, seed, backend)
    ctx.has_bias = student_bias is not None


def _ts_backward(ctx, grad_student, grad_teacher):
    """Student gradients only (the teacher is an EMA, never trained by backprop)."""
    images, landmarks, weight = ctx.saved_tensors
    patch_size, perturb_std, seed, backend = ctx.args
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2], need[3] and ctx.has_bias]
    if backend in ("cpu", "cuda"):
        grads = torch.ops.lafs_fast.landmark_patch_embed_backward(
            grad_student.contiguous(), images, landmarks, weight, None, patch_size, perturb_std, seed, mask)
        grads = [g if m else None for g, m in zip(grads, mask)]
    else:  # reference / triton: recompute the student's forward under autograd
        leaves = [t.detach().requires_grad_(m) for t, m in zip((images, landmarks, weight), mask[:3])]
        bias = weight.new_zeros(weight.shape[0], requires_grad=mask[3]) if ctx.has_bias else None
        with torch.enable_grad():
            out = _embed(backend, *leaves, bias, None, patch_size, perturb_std, seed)
            wanted = [t for t, m in zip(leaves + [bias], mask) if m]
            got = iter(torch.autograd.grad(out, wanted, grad_student)) if wanted else iter(())
        grads = [next(got) if m else None for m in mask]
    return (*grads, None, None, None, None, None, None)


teacher_student_embed.register_autograd(_ts_backward, setup_context=_ts_setup_context)


# ----------------------------------------------------------------------------- autograd + fake
# Shared by every backend that registers an op pair with these schemas (the C++ ops and the Triton
# ops): a forward op and a backward op taking (grad, inputs..., output_mask).
def embed_autograd(backward_op: str):
    """(setup_context, backward) for a landmark_patch_embed-style op whose backward is `backward_op`."""
    def setup_context(ctx, inputs, output):
        images, landmarks, weight, bias, index, patch_size, perturb_std, seed = inputs
        ctx.save_for_backward(images, landmarks, weight, index)
        ctx.args = (patch_size, perturb_std, seed)
        ctx.has_bias = bias is not None

    def backward(ctx, grad_out):
        images, landmarks, weight, index = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2], need[3] and ctx.has_bias]
        grads = getattr(torch.ops.lafs_fast, backward_op)(
            grad_out.contiguous(), images, landmarks, weight, index, *ctx.args, mask)
        return tuple(g if m else None for g, m in zip(grads, mask)) + (None,) * 4

    return setup_context, backward


def patches_autograd(backward_op: str):
    """(setup_context, backward) for a landmark_patches-style op whose backward is `backward_op`."""
    def setup_context(ctx, inputs, output):
        images, landmarks, index, patch_size, perturb_std, seed = inputs
        ctx.save_for_backward(images, landmarks, index)
        ctx.args = (patch_size, perturb_std, seed)

    def backward(ctx, grad_patches):
        images, landmarks, index = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
        grads = getattr(torch.ops.lafs_fast, backward_op)(
            grad_patches.contiguous(), images, landmarks, index, *ctx.args, mask)
        return tuple(g if m else None for g, m in zip(grads, mask)) + (None,) * 4

    return setup_context, backward


def _slots(landmarks, index):
    return landmarks.shape[1] if index is None else index.shape[1]


def _grad_like(t, wanted):
    """A masked-out gradient comes back as an empty tensor (the backward ops' convention)."""
    return t.new_empty(t.shape) if wanted else t.new_empty(0)


def embed_fake(images, landmarks, weight, bias, index, patch_size, perturb_std, seed):
    return images.new_empty(images.shape[0], _slots(landmarks, index), weight.shape[0])


def embed_backward_fake(grad_out, images, landmarks, weight, index, patch_size, perturb_std, seed,
                        output_mask):
    g_b = weight.new_empty(weight.shape[0]) if output_mask[3] else weight.new_empty(0)
    return (_grad_like(images, output_mask[0]), _grad_like(landmarks, output_mask[1]),
            _grad_like(weight, output_mask[2]), g_b)


def patches_fake(images, landmarks, index, patch_size, perturb_std, seed):
    B, C = images.shape[:2]
    return images.new_empty(B, _slots(landmarks, index), patch_size * patch_size * C)


def patches_backward_fake(grad_patches, images, landmarks, index, patch_size, perturb_std, seed,
                          output_mask):
    return _grad_like(images, output_mask[0]), _grad_like(landmarks, output_mask[1])


def _register_compiled_ops() -> None:
    """Fake kernels and autograd of the C++/CUDA ops (schemas in csrc/lafs_ops.cpp)."""
    torch.library.register_fake("lafs_fast::landmark_patch_embed")(embed_fake)
    torch.library.register_fake("lafs_fast::landmark_patch_embed_backward")(embed_backward_fake)
    torch.library.register_fake("lafs_fast::landmark_patches")(patches_fake)
    torch.library.register_fake("lafs_fast::landmark_patches_backward")(patches_backward_fake)
    setup, backward = embed_autograd("landmark_patch_embed_backward")
    torch.library.register_autograd("lafs_fast::landmark_patch_embed", backward, setup_context=setup)
    setup, backward = patches_autograd("landmark_patches_backward")
    torch.library.register_autograd("lafs_fast::landmark_patches", backward, setup_context=setup)


if HAS_EXTENSION:
    _register_compiled_ops()


# ----------------------------------------------------------------------------- Triton ops
# The Triton ops are defined from Python (Triton is optional, so they have no schema in
# csrc/lafs_ops.cpp), with the C++ ops' schemas under a _triton suffix and the same fake kernels
# and autograd. Registered on the first Triton call, so that importing lafs_fast never imports
# Triton. assume_constant_result: torch.compile runs the registration while tracing instead of
# tracing into it.
@torch.compiler.assume_constant_result
def register_triton_ops() -> bool:
    """Register torch.ops.lafs_fast.landmark_patch_embed_triton / landmark_patches_triton and their
    backward ops once per process; returns True."""
    if hasattr(torch.ops.lafs_fast, "landmark_patch_embed_triton"):
        return True
    from ..kernels import landmark_patch_embed as tk

    def define(name, fn, fake):
        # Under TRITON_INTERPRET=1 a plain custom_op with an explicit fake kernel: a triton_op's
        # function doubles as its fake kernel and as the graph torch.compile inlines, and an
        # interpreted kernel cannot run on fake tensors.
        if tk.INTERPRET:
            op = torch.library.custom_op(name, fn, mutates_args=())
            op.register_fake(fake)
            return op
        return torch.library.triton_op(name, fn, mutates_args=())

    setup, backward = embed_autograd("landmark_patch_embed_triton_backward")
    define("lafs_fast::landmark_patch_embed_triton", tk.embed_forward, embed_fake
           ).register_autograd(backward, setup_context=setup)
    define("lafs_fast::landmark_patch_embed_triton_backward", tk.embed_backward, embed_backward_fake)
    setup, backward = patches_autograd("landmark_patches_triton_backward")
    define("lafs_fast::landmark_patches_triton", tk.patches_forward, patches_fake
           ).register_autograd(backward, setup_context=setup)
    define("lafs_fast::landmark_patches_triton_backward", tk.patches_backward, patches_backward_fake)
    return True
