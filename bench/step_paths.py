"""One LAFS pretraining step two ways, same model, batch and views:

fused     lafs_fast's step: batched views, one landmark-CNN call for all views, one multicrop_embed
          (each global patch sampled once for student and teacher), foreach EMA.
original  a faithful re-creation of the release's step: per-image view construction, one
          landmark-CNN call per view, one grid_sample per landmark (reference loop) + Linear per
          view, teacher sampling its global views again, plain-Python EMA.
"""
import torch
import torch.nn.functional as F

from lafs_fast import reference, ssl, views
from lafs_fast.train import pretrain


def make_setup(model="part_fvit_tiny", batch=16, n_local=8, out_dim=4096, head_hidden=2048, device="cpu",
               seed=0, landmark_cnn=True):
    cfg = pretrain.PretrainConfig(model=model, landmarks="grid", batch_size=batch, n_local=n_local,
                                  out_dim=out_dim, head_hidden=head_hidden,
                                  head_bottleneck=min(256, head_hidden // 2), device=device)
    torch.manual_seed(seed)
    net = pretrain.LafsPretrainer(cfg)
    if landmark_cnn:  # a (random) frozen landmark CNN, as the real recipe has
        from lafs_fast.models.landmark_cnn import LandmarkCNN
        s = net.student
        width = s.config.get("cnn_width", 1.0)
        net.landmark_cnn = LandmarkCNN(s.num_landmarks, s.image_size, width=width).eval().requires_grad_(False)
    net = net.to(device)
    vcfg = views.ViewConfig(size=net.student.image_size, n_local=n_local)
    dino = ssl.DINOLoss(out_dim, n_global=2, n_views=2 + n_local, total_epochs=10).to(device)
    opt = torch.optim.AdamW([p for m in net.student_modules() for p in m.parameters()], lr=1e-4,
                            foreach=device == "cpu" or None, fused=None if device == "cpu" else True)
    g = torch.Generator().manual_seed(seed)
    faces = torch.randint(0, 256, (batch, 3, 112, 112), generator=g, dtype=torch.uint8).to(device)
    return net, vcfg, dino, opt, faces


def to_input(faces):
    return views.normalize_uint8(faces)


def fused_views(faces, vcfg, gen):
    with torch.no_grad():
        return views.make_lafs_views(to_input(faces), vcfg, generator=gen)


def original_views(faces, vcfg, gen):
    """Per image, per view (as the release's PIL pipeline): 20 small crops per face."""
    out = []
    with torch.no_grad():
        for b in range(faces.shape[0]):
            out.append(views.make_lafs_views(to_input(faces[b:b + 1]), vcfg, generator=gen))
    cat = lambda name: torch.cat([getattr(v, name).view(-1, 1, *getattr(v, name).shape[1:])  # noqa: E731
                                  for v in out], dim=1).flatten(0, 1)
    v = out[0]
    v.clean_global, v.aug_global = cat("clean_global"), cat("aug_global")
    v.clean_local, v.aug_local = cat("clean_local"), cat("aug_local")
    v.batch_size = faces.shape[0]
    return v


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


def original_step(net, v, dino, opt, amp, gen, momentum=0.996):
    G, L = 2, v.clean_local.shape[0] // v.batch_size
    B = v.batch_size
    N = net.student.num_landmarks
    with amp:
        lm_views = [net.landmarks(c) for c in v.clean_global.split(B)] + \
                   [net.landmarks(c) for c in v.clean_local.split(B)]  # one CNN call per view
        index = views.landmark_view_index(B * L, N, net.local_k, True, gen, v.clean_local.device)
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
