"""LafsPretrainer switches that change how a step is computed: landmark source, dropout kernel."""
import pytest
import torch
from torch import nn

from lafs_fast import config as C
from lafs_fast import ops, views
from lafs_fast.models.landmark_cnn import LandmarkCNN
from lafs_fast.ops import CounterDropout
from lafs_fast.train import pretrain


def make(**kw):
    cfg = pretrain.PretrainConfig(model="part_fvit_tiny", landmarks="grid", batch_size=2, n_local=2,
                                  out_dim=64, head_hidden=32, head_bottleneck=16, **kw)
    torch.manual_seed(0)
    net = pretrain.LafsPretrainer(cfg)
    net.set_landmark_cnn(LandmarkCNN(net.student.num_landmarks, 112, width=0.25))
    return net


@pytest.mark.parametrize("source", ["view", "image"])
def test_landmark_source_calls_the_cnn_once_per_view_or_per_face(source):
    net = make(landmark_source=source)
    calls = []
    net.landmark_cnn.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    g = torch.Generator().manual_seed(0)
    v = views.make_lafs_views(torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8),
                              views.ViewConfig(n_local=2), generator=g)
    s_out, t_out = net(v, seed=1, generator=g)
    assert s_out.shape == (8, 64) and t_out.shape == (4, 64) and torch.isfinite(s_out).all()
    assert sum(calls) == (2 if source == "image" else 8)


def test_fast_dropout_switch_swaps_modules():
    on, off = make(fast_dropout=True), make(fast_dropout=False)
    assert any(isinstance(m, CounterDropout) for m in on.student.modules())
    assert any(isinstance(m, CounterDropout) for m in on.teacher.modules())
    assert not any(isinstance(m, CounterDropout) for m in off.modules())


# ----------------------------------------------------------------------------- the LAFS step's wiring
class ViewStamp(nn.Module):
    """A stand-in landmark source whose landmarks say which view they came from: every landmark
    of a view is the grid shifted by 100 x the view's mean pixel (views differ, so landmarks
    handed to the wrong views cannot match)."""

    def __init__(self, grid):
        super().__init__()
        self.register_buffer("grid", grid.clone())

    def forward(self, x):
        return self.grid[None] + 100 * x.mean(dim=(1, 2, 3))[:, None, None]


def spy_on_multicrop(monkeypatch):
    calls = []
    real = ops.multicrop_embed

    def spy(*args, **kw):
        calls.append((args, kw))
        return real(*args, **kw)

    monkeypatch.setattr(ops, "multicrop_embed", spy)
    return calls


@pytest.mark.parametrize("source", ["view", "image"])
@pytest.mark.parametrize("flags", [[], ["--shuffle", "false", "--local-landmarks", "7", "--perturb-std", "2.5"]])
def test_lafs_step_passes_options_and_landmarks_to_the_op(flags, source, monkeypatch):
    """--shuffle, --local-landmarks and --perturb-std, parsed from the command line, reach
    ops.multicrop_embed as asked; global landmarks go with the augmented global views, local with
    the local ones; the student and teacher patch embeddings are the ones passed."""
    cfg = C.parse(pretrain.PretrainConfig, ["--landmarks", "grid", "--model", "part_fvit_tiny", "--n-local", "4",
                                            "--out-dim", "64", "--head-hidden", "32", "--head-bottleneck", "16",
                                            "--landmark-source", source, *flags])
    torch.manual_seed(0)
    net = pretrain.LafsPretrainer(cfg)
    N = net.student.num_landmarks
    net.landmark_cnn = ViewStamp(net.student.grid)
    calls = spy_on_multicrop(monkeypatch)
    B, L = 2, 4
    g = torch.Generator().manual_seed(0)
    v = views.make_lafs_views(torch.randint(0, 256, (B, 3, 112, 112), dtype=torch.uint8, generator=g),
                              views.ViewConfig(n_local=L), generator=g)
    net(v, seed=123, generator=g)
    assert len(calls) == 1
    (g_img, g_lm, l_img, l_lm, sw, sb, tw, tb), kw = calls[0]
    # the augmented copies (patches are sampled from them), not the clean ones
    assert torch.equal(g_img, v.aug_global) and torch.equal(l_img, v.aug_local)
    assert not torch.equal(v.aug_global, v.clean_global)
    # the landmarks of each view: predicted on its own clean copy, or mapped from the face's
    stamp = net.landmark_cnn
    if source == "view":
        want_g, want_l = stamp(v.clean_global), stamp(v.clean_local)
    else:
        src = stamp(v.source)
        want_g = views.landmarks_to_views(src, v.boxes_global, v.flip_global, 112)
        want_l = views.landmarks_to_views(src, v.boxes_local, v.flip_local, 112)
    torch.testing.assert_close(g_lm, want_g, rtol=0, atol=1e-4)
    torch.testing.assert_close(l_lm, want_l, rtol=0, atol=1e-4)
    assert (want_g[:, None] - want_l[None]).abs().amax(dim=(2, 3)).min() > 1e-2  # no two views alike
    assert sw is net.student.patch_embed.weight and tw is net.teacher.patch_embed.weight
    assert sb is net.student.patch_embed.bias and tb is net.teacher.patch_embed.bias
    # the options
    shuffle = "--shuffle" not in flags
    K = 7 if not shuffle else round(N * 36 / 196)
    assert kw["perturb_std"] == (5.0 if shuffle else 2.5) and kw["seed"] == 123
    index = kw["local_index"]
    assert index.shape == (L * B, K) and index.dtype == torch.int64
    assert index.min() >= 0 and index.max() < N
    ordered = (index[:, 1:] > index[:, :-1]).all(dim=1)   # distinct and in landmark order
    if shuffle:
        assert not ordered.all()   # random order with repeats (P(all 8 rows sorted) ~ 1e-29)
    else:
        assert ordered.all()
