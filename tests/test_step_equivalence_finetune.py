"""One supervised finetuning step of lafs_fast equals the authors' release's step.

The release's step (github szlbiubiubiu/LAFS_CVPR2024, commit 320c57d: train_largescale.py:785-891
with acc_step 3 from supervised_config.py:37, its optimiser groups train_largescale.py:122-173 and
621-629, the model face_pre_pro/ViT_face.py:560-796 with its CosFace ViT_face.py:26-97 and the
sampler ViT_face.py:1615-1656) is re-stated below from its description, in plain PyTorch:

  * landmark CNN trained end to end: trunk feature map averaged over H, W, its output Linear gives
    2N raw values, min-max scaled with ONE min and ONE max per image over x and y together, times
    111, viewed (N, 2) -- the gradient flows back through this scaling;
  * patches: one grid_sample per landmark on the offsets -P/2 .. P/2-1 around it (normalised by
    S/2, align_corners False, zero padding), the N patches laid out as a sqrt(N) x sqrt(N) mosaic
    and cut into tokens by einops 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)';
  * ViT: patch_to_embedding, CLS token, + pos_embedding, pre-LN blocks with attention scale
    dim^-0.5 and a GELU MLP, CLS token, LayerNorm;
  * CosFace: s (cos - m) at the target, s cos elsewhere, with a soft (mixup) target mask used as it
    is; soft-target cross-entropy, mean over the micro-batch, divided by acc_step;
  * three micro-batches backward, then one AdamW step (betas 0.9 / 0.999, eps 1e-8, one lr for
    every group: the lr_scale of its layer-wise decay is never applied) with weight decay 0 on 1-D
    tensors, 0.05 on names starting 'stn' (the trunk), 0.1 on everything else (the CNN's output
    layer, cls_token and pos_embedding included); no clipping.

lafs_fast runs the functions its training loop runs (finetune.build_head, make_param_groups,
micro_batch_loss, optimizer_step, common.make_adamw, common.set_schedule) with the release
configuration's switches (decay_tokens, cnn_head_weight_decay 0.1, cnn_weight_decay 0.05,
layer_decay 1, clip_grad 0, accum 3, drift regulariser off) on the same weights and micro-batches.
Dropout, drop-path and the CNN's Dropout(0.5) are off (the two sides would draw different masks);
batch-norm is in training mode on both (the same micro-batches give the same statistics).

Tolerances, float32: the sides sum in different orders (lafs_fast's fused patch-embedding op vs
grid_sample + Linear, SDPA vs an explicit softmax, foreach AdamW on other groupings), ~1e-7
relative per operation. Loss: 2e-5 relative. Gradients: 2e-4 relative + 1e-5 x the largest
gradient entry of the module (the landmark CNN as a whole; each ViT / head tensor on its own):
rounding enters the CNN through the landmark gradient and the min-max scaling and spreads over
tensors of very different scales (measured: 3.8e-6 of the CNN's largest entry, 2.3e-6 of each ViT
tensor's). Some CNN gradients are exactly zero in exact arithmetic -- the bias of a training-mode
batch-norm followed, through a convolution, by another training-mode batch-norm that removes any
per-channel shift -- and both sides compute rounding residues (~1e-6) for them. Weights after
AdamW: per entry, as far apart as AdamW makes the two sides' gradient differences and no further
(tests/tolerances.py, AdamWDrift): a residue's or a near-zero gradient's rounding can move its
entry by up to 2 lr, an entry with a well-determined gradient stays within a few ulp. The last
tests show that the comparison sees a real difference: the release's weight decay on the tokens,
dropped, moves them by ~lr x wd x |token| = 3e-4 (tokens N(0, 1), the release's init), and no
weight decay at all fails every decayed tensor.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tolerances import AdamWDrift, assert_weights_within

from lafs_fast.models.part_fvit import PartFViT
from lafs_fast.train import common, finetune

N, P, S, CLASSES, ACC, MB = 16, 8, 112, 5, 3, 2   # landmarks (4 x 4), patch, image, classes, accumulation, micro-batch
ARCH = dict(dim=48, depth=2, heads=2, dim_head=16, mlp_dim=96, num_landmarks=N, patch_size=P, image_size=S,
            dropout=0.0, emb_dropout=0.0, drop_path=0.0, cnn_width=0.25)
S_COS, M_COS, LR = 64.0, 0.4, 1e-3
LOSS_TOL = dict(rtol=2e-5, atol=1e-6)
GRAD_RTOL, GRAD_ATOL_OF_MAX = 2e-4, 1e-5


# ----------------------------------------------------------------------------- the release, re-stated
def release_model_from(model: PartFViT, head) -> tuple[torch.nn.Module, dict]:
    """The release's parameters as named tensors (copies of the lafs_fast start), and a copy of
    the CNN trunk (stn: the release's MobileNetV3 with the same layout, ViT_face.py:578)."""
    trunk = copy.deepcopy(model.landmark_cnn.features)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    p = {"output_layer.1.weight": sd["landmark_cnn.output_layer.1.weight"],
         "output_layer.1.bias": sd["landmark_cnn.output_layer.1.bias"],
         "patch_to_embedding.weight": sd["patch_embed.weight"], "patch_to_embedding.bias": sd["patch_embed.bias"],
         "cls_token": sd["cls_token"], "pos_embedding": sd["pos_embedding"],
         "mlp_head.0.weight": sd["norm.weight"], "mlp_head.0.bias": sd["norm.bias"],
         "loss.weight": head.weight.detach().clone()}
    for i in range(ARCH["depth"]):
        a, r = f"transformer.blocks.{i}.", f"transformer.layers.{i}."
        p.update({r + "0.fn.norm.weight": sd[a + "norm1.weight"], r + "0.fn.norm.bias": sd[a + "norm1.bias"],
                  r + "0.fn.fn.to_qkv.weight": sd[a + "attn.to_qkv.weight"],
                  r + "0.fn.fn.to_out.0.weight": sd[a + "attn.to_out.weight"],
                  r + "0.fn.fn.to_out.0.bias": sd[a + "attn.to_out.bias"],
                  r + "1.fn.norm.weight": sd[a + "norm2.weight"], r + "1.fn.norm.bias": sd[a + "norm2.bias"],
                  r + "1.fn.fn.net.0.weight": sd[a + "mlp.fc1.weight"],
                  r + "1.fn.fn.net.0.bias": sd[a + "mlp.fc1.bias"],
                  r + "1.fn.fn.net.3.weight": sd[a + "mlp.fc2.weight"],
                  r + "1.fn.fn.net.3.bias": sd[a + "mlp.fc2.bias"]})
    for v in p.values():
        v.requires_grad_(True)
    return trunk.train(), p


def release_landmarks(trunk, p, x):
    theta = F.linear(trunk(x).mean(dim=(-2, -1)), p["output_layer.1.weight"], p["output_layer.1.bias"])
    t_max = theta.max(dim=1)[0][:, None].repeat(1, 2 * N)
    t_min = theta.min(dim=1)[0][:, None].repeat(1, 2 * N)
    return ((theta - t_min) / (t_max - t_min) * 111).view(-1, N, 2)


def release_patches(imgs, lms):
    """extract_patches_pytorch_gridsample + rearrange: (B, N, P*P*C)."""
    half = P / 2
    gi, gj = torch.meshgrid(torch.arange(-half, half), torch.arange(-half, half), indexing="ij")
    grid = torch.stack((gi, gj), dim=0).transpose(0, 2).transpose(0, 1)   # [i, j] = (i - P/2, j - P/2)
    out = []
    for k in range(lms.shape[1]):
        g = (grid[None] + lms[:, k][:, None, None, :]) / (imgs.shape[2] * 0.5) - 1
        out.append(F.grid_sample(imgs, g, align_corners=False))
    t = torch.stack(out, dim=2)                                            # (B, C, N, P, P)
    B, c, n, w, h = t.shape
    row = int(math.isqrt(n))
    t = t.reshape(B, c, row, row, w, h).permute(0, 1, 2, 4, 3, 5).reshape(B, c, w * row, h * row)
    t = t.reshape(B, c, row, P, row, P)                                   # 'b c (h p1) (w p2)'
    return t.permute(0, 2, 4, 3, 5, 1).reshape(B, row * row, P * P * c)  # '-> b (h w) (p1 p2 c)'


def release_logits(trunk, p, x, target):
    dim, heads = ARCH["dim"], ARCH["heads"]
    tokens = F.linear(release_patches(x, release_landmarks(trunk, p, x)),
                      p["patch_to_embedding.weight"], p["patch_to_embedding.bias"])
    b, n, _ = tokens.shape
    h = torch.cat((p["cls_token"].expand(b, -1, -1), tokens), dim=1)
    h = h + p["pos_embedding"][:, :n + 1]
    for i in range(ARCH["depth"]):
        r = f"transformer.layers.{i}."
        y = F.layer_norm(h, (dim,), p[r + "0.fn.norm.weight"], p[r + "0.fn.norm.bias"])
        q, k, v = (t.reshape(b, n + 1, heads, -1).permute(0, 2, 1, 3)
                   for t in F.linear(y, p[r + "0.fn.fn.to_qkv.weight"]).chunk(3, dim=-1))
        attn = (torch.einsum("bhid,bhjd->bhij", q, k) * dim ** -0.5).softmax(dim=-1)
        o = torch.einsum("bhij,bhjd->bhid", attn, v).permute(0, 2, 1, 3).reshape(b, n + 1, -1)
        h = h + F.linear(o, p[r + "0.fn.fn.to_out.0.weight"], p[r + "0.fn.fn.to_out.0.bias"])
        y = F.layer_norm(h, (dim,), p[r + "1.fn.norm.weight"], p[r + "1.fn.norm.bias"])
        y = F.linear(F.gelu(F.linear(y, p[r + "1.fn.fn.net.0.weight"], p[r + "1.fn.fn.net.0.bias"])),
                     p[r + "1.fn.fn.net.3.weight"], p[r + "1.fn.fn.net.3.bias"])
        h = h + y
    emb = F.layer_norm(h[:, 0], (dim,), p["mlp_head.0.weight"], p["mlp_head.0.bias"])
    cosine = F.linear(F.normalize(emb), F.normalize(p["loss.weight"]))
    return (target * (cosine - M_COS) + (1.0 - target) * cosine) * S_COS


def release_step(trunk, p, micro_batches, decay_tokens=True):
    named = [("stn." + k, v) for k, v in trunk.named_parameters()] + list(p.items())
    groups = {"no_decay": [], "stn": [], "decay": []}
    for name, t in named:
        if t.ndim == 1 or (not decay_tokens and name in ("cls_token", "pos_embedding")):
            groups["no_decay"].append(t)
        elif name.startswith("stn"):
            groups["stn"].append(t)
        else:
            groups["decay"].append(t)
    opt = torch.optim.AdamW([{"params": groups["no_decay"], "weight_decay": 0.0},
                             {"params": groups["stn"], "weight_decay": 5e-2},
                             {"params": groups["decay"], "weight_decay": 1e-1}], lr=LR)
    losses = []
    for x, target in micro_batches:
        logits = release_logits(trunk, p, x, target)
        loss = torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean() / ACC
        loss.backward()
        losses.append(loss.item())
    grads = {name: t.grad.clone() for name, t in named}
    opt.step()
    return sum(losses), grads, {name: t.detach().clone() for name, t in named}, opt, dict(named)


# ----------------------------------------------------------------------------- lafs_fast
def lafs_setup(seed=0, weight_decay=True):
    torch.manual_seed(seed)
    model = PartFViT(**ARCH).init_weights("release")  # tokens N(0, 1), PyTorch default Linears
    model.landmark_cnn.output_layer[0].p = 0.0  # the release's Dropout(0.5): off on both sides
    # A spread output bias keeps the min-max scaling well conditioned (as a trained CNN's).
    with torch.no_grad():
        model.landmark_cnn.output_layer[1].bias.copy_(torch.rand(2 * N) * 3)
    wd = 1.0 if weight_decay else 0.0  # 0: the control without weight decay
    cfg = finetune.FinetuneConfig(accum_steps=ACC, clip_grad=0.0, weight_decay=0.1 * wd, cnn_weight_decay=0.05 * wd,
                                  cnn_head_weight_decay=0.1 * wd, decay_tokens=True, layer_decay=1.0, scale=S_COS,
                                  margin=M_COS, drift_lambdas=[0.0] * 5, partial_fc="off")
    head = finetune.build_head(cfg, model.dim, CLASSES, torch.device("cpu"))
    return cfg, model.train(), head


def lafs_step(cfg, model, head, micro_batches):
    cpu = torch.device("cpu")
    opt = common.make_adamw(finetune.make_param_groups(cfg, model, head), LR, cpu)
    common.set_schedule(opt, LR)
    scaler = common.make_grad_scaler(cpu, "none")
    params = list(model.parameters()) + list(head.parameters())
    total = 0.0
    for x, target in micro_batches:
        loss, drift, t = finetune.micro_batch_loss(cfg, model, head, x, target, cpu, "none")
        assert drift.item() == 0.0
        (t / cfg.accum_steps).backward()
        total += t.item() / cfg.accum_steps
    grads = {n: q.grad.clone() for n, q in list(model.named_parameters()) + list(head.named_parameters(prefix="head"))}
    finetune.optimizer_step(cfg, opt, scaler, params, head)
    return total, grads


def micro_batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(ACC):
        x = torch.rand(MB, 3, S, S, generator=g) * 2 - 1
        t = F.one_hot(torch.randint(0, CLASSES, (MB,), generator=g), CLASSES).float()
        if i == 1:  # a mixed micro-batch: soft targets through CosFace and the soft cross-entropy
            lam = 0.7
            x, t = lam * x + (1 - lam) * x.flip(0), lam * t + (1 - lam) * t.flip(0)
        out.append((x, t))
    return out


def release_name(lafs_name: str) -> str:
    """lafs_fast parameter name -> the re-statement's."""
    if lafs_name.startswith("landmark_cnn.features."):
        return "stn." + lafs_name[len("landmark_cnn.features."):]
    fixed = {"landmark_cnn.output_layer.1.weight": "output_layer.1.weight",
             "landmark_cnn.output_layer.1.bias": "output_layer.1.bias",
             "patch_embed.weight": "patch_to_embedding.weight", "patch_embed.bias": "patch_to_embedding.bias",
             "norm.weight": "mlp_head.0.weight", "norm.bias": "mlp_head.0.bias", "head.weight": "loss.weight",
             "cls_token": "cls_token", "pos_embedding": "pos_embedding"}
    if lafs_name in fixed:
        return fixed[lafs_name]
    _, _, i, rest = lafs_name.split(".", 3)
    part = {"norm1.weight": "0.fn.norm.weight", "norm1.bias": "0.fn.norm.bias",
            "attn.to_qkv.weight": "0.fn.fn.to_qkv.weight", "attn.to_out.weight": "0.fn.fn.to_out.0.weight",
            "attn.to_out.bias": "0.fn.fn.to_out.0.bias", "norm2.weight": "1.fn.norm.weight",
            "norm2.bias": "1.fn.norm.bias", "mlp.fc1.weight": "1.fn.fn.net.0.weight",
            "mlp.fc1.bias": "1.fn.fn.net.0.bias", "mlp.fc2.weight": "1.fn.fn.net.3.weight",
            "mlp.fc2.bias": "1.fn.fn.net.3.bias"}[rest]
    return f"transformer.layers.{i}.{part}"


def run_both(decay_tokens_release=True, weight_decay=True):
    """lafs_fast's and the release's step from the same start. decay_tokens_release False: the
    release without weight decay on the tokens; weight_decay False: lafs_fast without any (controls).
    Returns (loss, gradients, weights) of each, and the AdamW bound on their weights' distance."""
    cfg, model, head = lafs_setup(weight_decay=weight_decay)
    trunk, p = release_model_from(model, head)
    batches = micro_batches()
    l_rel, g_rel, w_rel, opt_rel, params_rel = release_step(trunk, p, batches, decay_tokens=decay_tokens_release)
    l_lafs, g_lafs = lafs_step(cfg, model, head, batches)
    w_lafs = {n: q.detach() for n, q in list(model.named_parameters()) + list(head.named_parameters(prefix="head"))}
    drift = AdamWDrift()
    drift.step(opt_rel, {n: (params_rel[release_name(n)], g_rel[release_name(n)], g,
                             gradient_atol(n, g_rel) + GRAD_RTOL * g_rel[release_name(n)].abs())
                         for n, g in g_lafs.items()})
    return (l_lafs, g_lafs, w_lafs), (l_rel, g_rel, w_rel), drift


@pytest.fixture(scope="module")
def both():
    return run_both()


def test_loss_agrees(both):
    (l_lafs, _, _), (l_rel, _, _), _ = both
    assert math.isfinite(l_lafs) and l_lafs > 1.0
    torch.testing.assert_close(torch.tensor(l_lafs), torch.tensor(l_rel), **LOSS_TOL)


def gradient_atol(name, g_rel) -> float:
    """1e-5 x the largest gradient entry of the module: the whole landmark CNN, else the tensor."""
    if name.startswith("landmark_cnn"):
        return GRAD_ATOL_OF_MAX * max(g.abs().max().item() for n, g in g_rel.items()
                                      if n.startswith(("stn.", "output_layer.")))
    return GRAD_ATOL_OF_MAX * g_rel[release_name(name)].abs().max().item()


def test_gradients_agree_vit_head_and_landmark_cnn(both):
    (_, g_lafs, _), (_, g_rel, _), _ = both
    assert len(g_lafs) == len(g_rel)
    groups = {"landmark CNN trunk": 0, "landmark CNN output layer": 0, "ViT": 0, "head": 0}
    for name, g in g_lafs.items():
        ref = g_rel[release_name(name)]
        assert g.shape == ref.shape, name
        torch.testing.assert_close(g, ref, rtol=GRAD_RTOL, atol=gradient_atol(name, g_rel) + 1e-12, msg=name)
        kind = ("landmark CNN trunk" if ".features." in name else "landmark CNN output layer"
                if name.startswith("landmark_cnn") else "head" if name.startswith("head") else "ViT")
        groups[kind] += int(ref.abs().max().item() > 1e-3)
    # the landmark CNN learns end to end: its gradients are not zero
    assert all(n > 0 for n in groups.values()), groups


def assert_weights_agree(w_lafs, w_rel, drift, names=None):
    for name in names or w_lafs:
        assert_weights_within(w_lafs[name], w_rel[release_name(name)], drift.tolerance(name), name)


def test_updated_weights_agree(both):
    (_, _, w_lafs), (_, _, w_rel), drift = both
    assert_weights_agree(w_lafs, w_rel, drift)


def test_the_comparison_sees_a_dropped_token_weight_decay():
    """Control: the release step without weight decay on cls_token / pos_embedding (lafs_fast's
    default) leaves the tokens further apart than the tolerance."""
    (_, _, w_lafs), (_, _, w_rel), drift = run_both(decay_tokens_release=False)
    for name in ("cls_token", "pos_embedding"):
        with pytest.raises(AssertionError, match=name):
            assert_weights_agree(w_lafs, w_rel, drift, [name])
    diff = (w_lafs["pos_embedding"] - w_rel["pos_embedding"]).abs().max().item()
    assert diff > 1e-4, diff  # lr x wd x the largest |position entry| (N(0, 1) init: ~3)
    assert_weights_agree(w_lafs, w_rel, drift, [n for n in w_lafs if n not in ("cls_token", "pos_embedding")])


def test_the_comparison_sees_a_missing_weight_decay():
    """Control: lafs_fast's step without weight decay against the release's: every tensor the
    release decays fails the weight comparison, every other one still agrees."""
    (_, _, w_lafs), (_, _, w_rel), drift = run_both(weight_decay=False)
    decayed = [n for n, w in w_lafs.items() if w.ndim > 1]
    assert len(decayed) > 20
    for name in decayed:
        with pytest.raises(AssertionError, match="beyond the AdamW drift bound"):
            assert_weights_agree(w_lafs, w_rel, drift, [name])
    assert_weights_agree(w_lafs, w_rel, drift, [n for n in w_lafs if n not in decayed])
