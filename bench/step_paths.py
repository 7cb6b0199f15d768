"""One LAFS pretraining step two ways, same model, batch and views (bench/step_throughput.py and
bench/test_bench_step.py time them side by side; bench/release_step.py runs the release's own step
when its checkout is given):

fused     lafs_fast's step: decode the batch, batched views as tensor ops, one landmark-CNN call
          for all views, one multicrop_embed (each global patch sampled once for student and
          teacher), global gradient clip, foreach AdamW and EMA.
original  a re-creation of the release's step on lafs_fast's modules, structured as its
          train_one_epoch: per-image PIL decode and per-view PIL transforms (DataAugmentation_LAFS:
          20 crops per face); the landmark CNN (NCHW, BatchNorms unfolded) and one grid_sample per
          landmark on global view 1, global view 2, then all local views in one batch; the teacher
          embeds the student's global patches; torch dropout and explicit softmax attention;
          per-tensor gradient clipping with one .item() each; torch's default AdamW (a per-tensor
          loop on CPU); a Python-loop EMA.

Both start from the same JPEG bytes in memory (a .rec file's payloads), so "with data" times the
decode as well.
"""
import io
import random

import numpy as np
import torch
import torch.nn.functional as F

from lafs_fast import reference, views
from lafs_fast.data import to_model_input
from lafs_fast.data.image_folder import decode_image_bytes, encode_image
from lafs_fast.dino import DINOLoss, ema_update_
from lafs_fast.models.landmark_cnn import LandmarkCNN, normalize_landmarks
from lafs_fast.models.vit import Attention
from lafs_fast.train import pretrain


def make_setup(model="part_fvit_tiny", batch=16, n_local=8, out_dim=4096, head_hidden=2048, device="cpu",
               seed=0, landmark_cnn=True, original=False, **cfg_overrides):
    """Model, views config, loss and optimiser of one path. original=True builds the release's
    implementation of the same model: torch dropout, explicit softmax attention, an NCHW landmark
    CNN with its BatchNorms (the fused path folds them and runs channels-last)."""
    if original:
        cfg_overrides["fast_dropout"] = False
    cfg = pretrain.PretrainConfig(model=model, landmarks="grid", batch_size=batch, n_local=n_local,
                                  out_dim=out_dim, head_hidden=head_hidden,
                                  head_bottleneck=min(256, head_hidden // 2), device=device, **cfg_overrides)
    torch.manual_seed(seed)
    net = pretrain.LafsPretrainer(cfg)
    if landmark_cnn:  # a (random) frozen landmark CNN, as the real recipe has
        s = net.student
        cnn = LandmarkCNN(s.num_landmarks, s.image_size, width=s.config.get("cnn_width", 1.0))
        if original:
            net.landmark_cnn = cnn.eval().requires_grad_(False).to(memory_format=torch.contiguous_format)
        else:
            net.set_landmark_cnn(cnn)
    if original:
        for m in net.modules():
            if isinstance(m, Attention):
                m.fused_attn = False
    net = net.to(device)
    vcfg = views.ViewConfig(size=net.student.image_size, n_local=n_local)
    dino = DINOLoss(out_dim, n_global=2, n_views=2 + n_local, total_epochs=10).to(device)
    params = [p for m in net.student_modules() for p in m.parameters()]
    if original:  # the release's torch.optim.AdamW(groups): torch's defaults (per-tensor loop on CPU)
        opt = torch.optim.AdamW(params, lr=1e-4)
    else:  # lafs_fast.train.common.make_adamw
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=device == "cpu" or None,
                                fused=None if device == "cpu" else True)
    return net, vcfg, dino, opt


def face_bytes(batch, seed=0):
    """`batch` ORL faces (112x112, grey as RGB) as JPEG bytes, as a .rec file would hold them."""
    from lafs_fast.data.orl import load_orl
    images, _ = load_orl()
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:batch]
    return [encode_image(images[i], "jpeg", quality=95) for i in pick.tolist()]


# ----------------------------------------------------------------------------- data: fused
def fused_decode(payloads):
    return torch.stack([decode_image_bytes(p) for p in payloads])


def fused_views(faces_uint8, vcfg, gen):
    with torch.no_grad():
        return views.make_lafs_views(to_model_input(faces_uint8), vcfg, generator=gen)


# ----------------------------------------------------------------------------- data: original
class OriginalAugmentation:
    """DINO's DataAugmentation as LAFS uses it (docs/method.md section 3), per image, PIL in and out:
    every view is one RandomResizedCrop + flip, kept clean (normalise only) and augmented."""

    def __init__(self, size=112, n_local=8, seed=0):
        import torchvision.transforms as T
        from PIL import ImageFilter, ImageOps
        self.n_local = n_local
        self.rng = random.Random(seed)
        torch.manual_seed(seed)  # torchvision draws its parameters from torch's global RNG
        bicubic = T.InterpolationMode.BICUBIC
        self.geometry = T.Compose([T.RandomResizedCrop(size, scale=(0.4, 1.0), interpolation=bicubic),
                                   T.RandomHorizontalFlip(p=0.5)])
        self.normalize = T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
        color = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
        rng = self.rng

        def blur(p):
            def f(img):
                if rng.random() >= p:
                    return img
                return img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
            return f

        def solarize(p):
            return lambda img: ImageOps.solarize(img) if rng.random() < p else img

        self.aug = [T.Compose(color + [blur(1.0)]), T.Compose(color + [blur(0.1), solarize(0.2)]),
                    T.Compose(color + [blur(0.5)])]

    def __call__(self, img):
        clean, aug = [], []
        for v in range(2 + self.n_local):
            crop = self.geometry(img)
            clean.append(self.normalize(crop))
            aug.append(self.normalize(self.aug[min(v, 2)](crop)))
        return clean, aug


def original_data(payloads, augment: OriginalAugmentation):
    """Per image: PIL decode, 2 + L views x (clean, augmented); collated view-major."""
    from PIL import Image
    per_image = []
    for p in payloads:
        with Image.open(io.BytesIO(p)) as im:
            per_image.append(augment(im.convert("RGB")))
    B, V = len(per_image), 2 + augment.n_local
    clean = torch.stack([torch.stack([per_image[b][0][v] for b in range(B)]) for v in range(V)]).flatten(0, 1)
    aug = torch.stack([torch.stack([per_image[b][1][v] for b in range(B)]) for v in range(V)]).flatten(0, 1)
    empty = torch.zeros(0)
    return views.LafsViews(clean[:2 * B], aug[:2 * B], clean[2 * B:], aug[2 * B:], empty, empty, empty, empty, B)


# ----------------------------------------------------------------------------- steps
def fused_step(net, v, dino, opt, amp, gen, momentum=0.996, clip=3.0):
    """lafs_fast's step as lafs_fast.train.pretrain runs it (one global gradient-norm clip)."""
    with amp:
        s_out, t_out = net(v, seed=1234, generator=gen)
    loss = dino(s_out.float(), t_out.float(), 0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    s = [p for m in net.student_modules() for p in m.parameters()]
    if clip:
        torch.nn.utils.clip_grad_norm_(s, clip)
    opt.step()
    loss.item()  # pretrain logs the loss every step
    t = [p for m in (net.teacher, net.teacher_head) for p in m.parameters()]
    ema_update_(t, s, momentum)
    return loss


def _loop_patches(images, lms, index=None, sigma=5.0, patch_size=8):
    """The release: noise from the host RNG on all N landmarks, then (local views) the subset,
    then one grid_sample per landmark. Returns raw (B, K, P*P*C) patches: the release samples
    once per view and feeds the same patches to the student's and the teacher's embedding."""
    lms = lms + sigma * torch.randn(lms.shape).to(lms.device)
    if index is not None:
        lms = torch.gather(lms, 1, index[..., None].expand(-1, -1, 2))
    return reference.landmark_patches_loop(images, lms, patch_size)


def _original_landmarks(net, images):
    """The release's landmark CNN: plain (NCHW) layout, BatchNorms not folded."""
    cnn = net.landmark_cnn
    if cnn is None:
        return net.landmarks(images)
    with torch.no_grad():
        raw = cnn.output_layer(cnn.features(images.contiguous()).mean(dim=(2, 3)))
        return normalize_landmarks(raw.float(), cnn.image_size)


def clip_per_tensor_(params, clip):
    """The release's utils.clip_gradients: each tensor's gradient clipped to norm `clip` on its
    own, one .item() per tensor (it logs the norms)."""
    norms = []
    for p in params:
        if p.grad is not None:
            n = p.grad.norm(2)
            norms.append(n.item())
            coef = clip / (n + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)
    return norms


def original_step(net, v, dino, opt, amp, gen, momentum=0.996, clip=3.0):
    """The release's train_one_epoch body, re-stated on lafs_fast's modules: the landmark CNN
    and per-landmark sampling on global view 1, global view 2, then all local views in one batch
    (3 CNN calls); the teacher embeds the student's global patches; per-tensor clipping; a
    Python-loop EMA."""
    B = v.batch_size
    s, t = net.student, net.teacher
    with amp:
        g_patches = [_loop_patches(aug, _original_landmarks(net, clean), patch_size=s.patch_size)
                     for clean, aug in zip(v.clean_global.split(B), v.aug_global.split(B))]
        index = views.landmark_view_index(v.clean_local.shape[0], s.num_landmarks, net.local_k, True, gen,
                                          v.clean_local.device)
        l_patches = _loop_patches(v.aug_local, _original_landmarks(net, v.clean_local), index, patch_size=s.patch_size)
        g_patches = torch.cat(g_patches)
        embed = lambda m, x: F.linear(x, m.patch_embed.weight, m.patch_embed.bias)  # noqa: E731
        s_out = net.student_head(torch.cat([s.forward_tokens(embed(s, g_patches)),
                                            s.forward_tokens(embed(s, l_patches))]))
        with torch.no_grad():
            t_out = net.teacher_head(t.forward_tokens(embed(t, g_patches)))
    loss = dino(s_out.float(), t_out.float(), 0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    student = [p for m in net.student_modules() for p in m.parameters()]
    if clip:
        clip_per_tensor_(student, clip)
    opt.step()
    loss.item()  # the release logs the loss every step
    with torch.no_grad():  # the release's EMA: a Python loop over parameters
        for ps, pt in zip(student, [p for m in (net.teacher, net.teacher_head) for p in m.parameters()]):
            pt.data.mul_(momentum).add_((1 - momentum) * ps.detach().data)
    return loss


class StepRunner:
    """One path's step as a closure: with_data decodes and builds views every step."""

    def __init__(self, impl, payloads, vcfg, with_data, device="cpu", seed=0):
        self.impl, self.payloads, self.vcfg, self.with_data, self.device = impl, payloads, vcfg, with_data, device
        self.gen = torch.Generator().manual_seed(seed)
        self.augment = OriginalAugmentation(vcfg.size, vcfg.n_local, seed) if impl == "original" else None
        self.cached = self.data()

    def data(self):
        if self.impl == "original":
            v = original_data(self.payloads, self.augment)
            for name in ("clean_global", "aug_global", "clean_local", "aug_local"):
                setattr(v, name, getattr(v, name).to(self.device))
            return v
        return fused_views(fused_decode(self.payloads).to(self.device), self.vcfg, self.gen)

    def __call__(self, net, dino, opt, amp):
        v = self.data() if self.with_data else self.cached
        step = fused_step if self.impl == "fused" else original_step
        return step(net, v, dino, opt, amp, self.gen)


def seed_all(seed=0):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
