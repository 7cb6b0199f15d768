"""LafsPretrainer switches that change how a step is computed: landmark source, dropout kernel."""
import pytest
import torch

from lafs_fast import dropout as D
from lafs_fast import views
from lafs_fast.models.landmark_cnn import LandmarkCNN
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
    assert any(isinstance(m, D.PhiloxDropout) for m in on.student.modules())
    assert any(isinstance(m, D.PhiloxDropout) for m in on.teacher.modules())
    assert not any(isinstance(m, D.PhiloxDropout) for m in off.modules())
