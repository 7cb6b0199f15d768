"""One LAFS pretraining step two ways, same model, batch and views (bench/step_throughput.py and
bench/test_bench_step.py time them side by side):

fused     lafs_fast's step: decode the batch, batched views as tensor ops, one landmark-CNN call
          for all views, one multicrop_embed (each global patch sampled once for student and
          teacher), foreach EMA.
original  a faithful re-creation of the release's step: per-image PIL decode and per-view PIL
          transforms (DINO's DataAugmentation: 20 crops per face), one landmark-CNN call per view,
          one grid_sample per landmark + Linear per view, the teacher sampling its global views
          again, plain-Python EMA.

Both start from the same JPEG bytes in memory (a .rec file's payloads), so "with data" times the
decode as well.
"""
import io
import random

import numpy as np
import torch
import torch.nn.functional as F

from lafs_fast import reference, ssl, views
from lafs_fast.data import to_model_input
from lafs_fast.data.image_folder import decode_image_bytes, encode_image
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
    dino = ssl.DINOLoss(out_dim, n_global=2, n_views=2 + n_local, total_epochs=10).to(device)
    opt = torch.optim.AdamW([p for m in net.student_modules() for p in m.parameters()], lr=1e-4,
                            foreach=device == "cpu" or None, fused=None if device == "cpu" else True)
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
    """DINO's DataAugmentation as LAFS uses it (LAFS_FACTS section 3), per image, PIL in and out:
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
def fused_step(net, v, dino, opt, amp, gen, momentum=0.996):
    with amp:
        s_out, t_out = net(v, seed=1234, generator=gen)
    loss = dino(s_out.float(), t_out.float(), 0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    s = [p for m in net.student_modules() for p in m.parameters()]
    t = [p for m in (net.teacher, net.teacher_head) for p in m.parameters()]
    ssl.ema_update_(t, s, momentum)
    return loss


def _loop_tokens(model, images, lms, index=None, sigma=5.0):
    """The release: noise from the host RNG, one grid_sample per landmark, then Linear."""
    if index is not None:
        lms = torch.gather(lms, 1, index[..., None].expand(-1, -1, 2))
    lms = lms + sigma * torch.randn(lms.shape).to(lms.device)
    patches = reference.landmark_patches_loop(images, lms, model.patch_size)
    return F.linear(patches, model.patch_embed.weight, model.patch_embed.bias)


def _original_landmarks(net, images):
    """The release calls the landmark CNN once per view, on the plain (NCHW) layout."""
    cnn = net.landmark_cnn
    if cnn is None:
        return net.landmarks(images)
    with torch.no_grad():
        raw = cnn.output_layer(cnn.features(images.contiguous()).mean(dim=(2, 3)))
        return normalize_landmarks(raw.float(), cnn.image_size)


def original_step(net, v, dino, opt, amp, gen, momentum=0.996):
    G, L = 2, v.clean_local.shape[0] // v.batch_size
    B = v.batch_size
    with amp:
        lm_views = [_original_landmarks(net, c) for c in v.clean_global.split(B)] + \
                   [_original_landmarks(net, c) for c in v.clean_local.split(B)]  # one CNN call per view
        index = views.landmark_view_index(B * L, net.student.num_landmarks, net.local_k, True, gen,
                                          v.clean_local.device)
        s_tok = [_loop_tokens(net.student, img, lm) for img, lm in zip(v.aug_global.split(B), lm_views[:G])]
        s_tok += [_loop_tokens(net.student, img, lm, idx) for img, lm, idx in
                  zip(v.aug_local.split(B), lm_views[G:], index.split(B))]
        s_out = net.student_head(torch.cat([net.student.forward_tokens(torch.cat(s_tok[:G])),
                                            net.student.forward_tokens(torch.cat(s_tok[G:]))]))
        with torch.no_grad():
            t_tok = [_loop_tokens(net.teacher, img, lm) for img, lm in zip(v.aug_global.split(B), lm_views[:G])]
            t_out = net.teacher_head(net.teacher.forward_tokens(torch.cat(t_tok)))
    loss = dino(s_out.float(), t_out.float(), 0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():  # the release's EMA: a Python loop over parameters
        for ps, pt in zip([p for m in net.student_modules() for p in m.parameters()],
                          [p for m in (net.teacher, net.teacher_head) for p in m.parameters()]):
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
