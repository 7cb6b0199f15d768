"""Baselines the benchmarks compare the fused op with (importable, so tests can check them)."""
import torch
import torch.nn.functional as F

from lafs_fast import reference


def vectorised_patch_embed(images, landmarks, weight, bias, patch_size=8):
    """One F.grid_sample over all landmarks, then F.linear: the obvious PyTorch rewrite."""
    B, C, H, W = images.shape
    N, P = landmarks.shape[1], patch_size
    off = reference.patch_offsets(P, landmarks.dtype, landmarks.device)
    x = landmarks[..., 0, None, None] + off[:, None]  # (B, N, P_i, 1): i runs along x
    y = landmarks[..., 1, None, None] + off[None, :]  # (B, N, 1, P_j)
    x, y = torch.broadcast_tensors(x, y)
    grid = torch.stack(((2 * x + 1) / W - 1, (2 * y + 1) / H - 1), dim=-1).reshape(B, N, P * P, 2)
    s = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
    patches = s.permute(0, 2, 3, 1).reshape(B, N, P * P * C)  # (B, C, N, P*P) -> token layout
    return F.linear(patches, weight, bias)


def original_loop_patch_embed(images, landmarks, weight, bias, patch_size=8):
    """The original release's recipe: one grid_sample per landmark, rearrange, Linear."""
    return F.linear(reference.landmark_patches_loop(images, landmarks, patch_size), weight, bias)


def bare_gemm(patches, weight, bias):
    """The floor: the patch-embedding GEMM on ready patches."""
    return torch.addmm(bias, patches.reshape(-1, patches.shape[-1]), weight.t())


class SavedBytes:
    """Bytes of the tensors autograd keeps between forward and backward (distinct storages)."""

    def __init__(self):
        self.seen, self.bytes = set(), 0

    def pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in self.seen:
            self.seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
