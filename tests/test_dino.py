"""lafs_fast.dino: DINO loss and centring, schedules, EMA teacher, parameter groups, guards."""
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lafs_fast.dino import (
    DINOLoss,
    NonFiniteLossError,
    cancel_last_layer_grads,
    check_finite,
    cosine_schedule,
    ema_update_,
    lr_schedule,
    momentum_schedule,
    teacher_temp_schedule,
    weight_decay_schedule,
)


def naive_dino_loss(student, teacher, center, n_global, n_views, s_temp, t_temp):
    """DINO's reference double loop, written independently of the vectorised version."""
    s_chunks = (student / s_temp).chunk(n_views)
    t_chunks = F.softmax((teacher - center) / t_temp, dim=-1).chunk(n_global)
    total, terms = 0.0, 0
    for iq, q in enumerate(t_chunks):
        for v in range(n_views):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s_chunks[v], dim=-1), dim=-1).mean()
            terms += 1
    return total / terms, terms


@pytest.mark.parametrize("epoch", [0, 12, 40])
def test_dino_loss_equals_double_loop(epoch):
    g = torch.Generator().manual_seed(epoch)
    B, K, G, V = 3, 7, 2, 10
    student = torch.randn(V * B, K, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(G * B, K, generator=g, dtype=torch.float64) * 3
    loss_fn = DINOLoss(K, G, V, total_epochs=41)
    loss_fn.center.copy_(torch.randn(1, K, generator=g))
    center0 = loss_fn.center.clone()
    got = loss_fn(student, teacher, epoch)
    want, terms = naive_dino_loss(student.float(), teacher.float(), center0, G, V, 0.1,
                                  loss_fn.teacher_temp(epoch))
    assert terms == 18 and loss_fn.n_pairs == 18
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_dino_loss_other_view_counts_and_grad():
    g = torch.Generator().manual_seed(1)
    B, K, G, V = 4, 5, 2, 4
    student = torch.randn(V * B, K, generator=g, requires_grad=True)
    teacher = torch.randn(G * B, K, generator=g, requires_grad=True)
    loss_fn = DINOLoss(K, G, V, total_epochs=5, warmup_teacher_temp_epochs=2)
    loss = loss_fn(student, teacher, 1)
    want, terms = naive_dino_loss(student, teacher, torch.zeros(1, K), G, V, 0.1, 0.04)
    assert terms == loss_fn.n_pairs == 6
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None                      # the teacher is detached
    with pytest.raises(ValueError):
        loss_fn(student[:-1], teacher, 0)


def test_dino_loss_float32_under_autocast():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(20, 9, generator=g)
    teacher = torch.randn(4, 9, generator=g)
    ref = DINOLoss(9)(student, teacher, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = DINOLoss(9)(student.bfloat16(), teacher.bfloat16(), 0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=3e-2, atol=3e-2)


def test_center_update_by_hand():
    loss_fn = DINOLoss(3, n_global=2, n_views=2)
    loss_fn.center.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    teacher = torch.tensor([[0.0, 2.0, 4.0], [2.0, 2.0, 0.0], [4.0, 8.0, 2.0], [2.0, 0.0, 2.0]])
    loss_fn(torch.randn(4, 3), teacher, 0)
    # batch mean = [2, 3, 2]; 0.9 * [1, 2, 3] + 0.1 * [2, 3, 2] = [1.1, 2.1, 2.9]
    torch.testing.assert_close(loss_fn.center, torch.tensor([[1.1, 2.1, 2.9]]))
    loss_fn.update_center(torch.zeros(2, 3))
    torch.testing.assert_close(loss_fn.center, torch.tensor([[0.99, 1.89, 2.61]]))


def _center_worker(rank, store, out):
    """One of two gloo ranks: each holds different teacher rows; the centre must move by the mean
    over both ranks' rows."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        loss_fn = DINOLoss(2, n_global=1, n_views=2)
        rows = torch.tensor([[1.0, 3.0], [3.0, 5.0]]) + 4.0 * rank   # rank 1: [[5, 7], [7, 9]]
        loss_fn.update_center(rows)
        torch.save(loss_fn.center, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes (~5 s)
def test_center_update_all_reduced_under_distributed(tmp_path):
    """World size 2 (gloo): mean over the global batch = [4, 6]; centre = 0.1 * [4, 6] on BOTH
    ranks. Without the all-reduce rank 0 would hold 0.1 * [2, 4] and rank 1 0.1 * [6, 8]."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    store = str(tmp_path / "store")
    procs = [ctx.Process(target=_center_worker, args=(r, store, str(tmp_path / f"c{r}.pt"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive and all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    for r in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"c{r}.pt"), torch.tensor([[0.4, 0.6]]),
                                   rtol=0, atol=1e-7, msg=f"rank {r}")


# ----------------------------------------------------------------------------- schedules
def test_cosine_schedule_values():
    s = cosine_schedule(1.0, 0.0, epochs=2, steps_per_epoch=2)
    want = [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]
    np.testing.assert_allclose(s, want)
    w = cosine_schedule(1.0, 0.0, epochs=3, steps_per_epoch=2, warmup_epochs=1, start_warmup=0.2)
    assert len(w) == 6
    np.testing.assert_allclose(w[:2], [0.2, 1.0])
    np.testing.assert_allclose(w[2:], want)
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, 1, 2, warmup_epochs=2)


def test_teacher_temp_schedule():
    t = teacher_temp_schedule(0.07, 0.04, 30, 41)
    assert len(t) == 41
    assert t[0] == pytest.approx(0.07) and t[29] == pytest.approx(0.04)
    assert t[15] == pytest.approx(0.07 - 15 * 0.03 / 29)
    assert np.all(t[29:] == 0.04)
    loss_fn = DINOLoss(4, total_epochs=41)
    assert loss_fn.teacher_temp(0) == pytest.approx(0.07)
    assert loss_fn.teacher_temp(100) == pytest.approx(0.04)     # past the end: last value
    assert len(teacher_temp_schedule(0.07, 0.04, 30, 10)) == 10  # short runs: truncated warm-up


def test_momentum_wd_lr_schedules():
    m = momentum_schedule(41, 10)
    assert len(m) == 410 and m[0] == pytest.approx(0.996)
    assert m[-1] == pytest.approx(1.0, abs=1e-6) and m[-1] < 1.0 and np.all(np.diff(m) >= 0)
    wd = weight_decay_schedule(41, 10)
    assert wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.4, abs=1e-5)
    assert wd[205] == pytest.approx(0.22, abs=1e-3)                   # halfway: the mean
    lr = lr_schedule(41, 10, batch_size=164)
    assert lr[0] == 0.0 and lr[99] == pytest.approx(5e-4 * 164 / 256)   # end of warm-up
    assert lr[100] == pytest.approx(3.203125e-4) and lr[-1] == pytest.approx(1e-6, abs=1e-8)
    assert np.all(np.diff(lr[:100]) > 0) and np.all(np.diff(lr[100:]) <= 0)


# ----------------------------------------------------------------------------- EMA
def test_ema_update_matches_loop():
    g = torch.Generator().manual_seed(3)
    student = [torch.randn(4, 3, generator=g, requires_grad=True),
               torch.randn(5, generator=g, requires_grad=True), torch.randn(2, 2, 2, generator=g)]
    teacher = [torch.randn(p.shape, generator=g) for p in student]
    want = [0.996 * t + 0.004 * s.detach() for t, s in zip(teacher, student)]
    ema_update_(teacher, student, 0.996)
    for t, w in zip(teacher, want):
        torch.testing.assert_close(t, w)
    old = [t.clone() for t in teacher]
    ema_update_(teacher, student, 1.0)
    assert all(torch.equal(t, o) for t, o in zip(teacher, old))
    ema_update_(teacher, student, torch.tensor(0.0))
    assert all(torch.equal(t, s.detach()) for t, s in zip(teacher, student))
    with pytest.raises(ValueError):
        ema_update_(teacher[:2], student, 0.9)


def test_ema_update_on_modules():
    s, t = nn.Linear(3, 2), nn.Linear(3, 2)
    want = [0.9 * pt.detach() + 0.1 * ps.detach() for pt, ps in zip(t.parameters(), s.parameters())]
    ema_update_(t.parameters(), s.parameters(), 0.9)
    for p, w in zip(t.parameters(), want):
        torch.testing.assert_close(p.detach(), w)
        assert p.grad is None


# ----------------------------------------------------------------------------- optimiser
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embedding = nn.Parameter(torch.zeros(1, 5, 4))
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)
        self.extra = nn.Parameter(torch.zeros(2, 2))

    def no_weight_decay(self):
        return {"extra"}


def test_param_groups_no_decay():
    from lafs_fast.train.common import param_groups, set_schedule
    m = Tiny()
    groups = param_groups(m, 0.04)
    by_wd = {0.04: set(), 0.0: set()}
    for g in groups:
        by_wd[g["weight_decay"]] |= {id(p) for p in g["params"]}
    assert by_wd[0.04] == {id(m.proj.weight), id(m.extra)}
    assert by_wd[0.0] == {id(m.cls_token), id(m.pos_embedding), id(m.proj.bias), id(m.norm.weight),
                          id(m.norm.bias)}
    opt = torch.optim.AdamW(groups, lr=1.0)
    set_schedule(opt, lr=0.5, weight_decay=0.3)
    assert all(g["lr"] == 0.5 for g in opt.param_groups)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.3}


def test_cancel_last_layer_grads():
    head = nn.Sequential()
    head.add_module("mlp", nn.Linear(3, 3))
    head.add_module("last_layer", nn.Linear(3, 2))
    head(torch.randn(2, 3)).sum().backward()
    assert cancel_last_layer_grads(head, epoch=1, freeze_last_layer=1) == 0
    assert head.last_layer.weight.grad is not None
    assert cancel_last_layer_grads(head, epoch=0, freeze_last_layer=1) == 2
    assert head.last_layer.weight.grad is None and head.last_layer.bias.grad is None
    assert head.mlp.weight.grad is not None


def test_check_finite():
    check_finite(torch.tensor(1.5))
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(NonFiniteLossError, match="non-finite loss .* epoch 3 step 7"):
            check_finite(torch.tensor(bad), step=7, epoch=3)
    with pytest.raises(NonFiniteLossError, match="Last checkpoint: /x/ckpt_5.pt"):
        check_finite(torch.tensor([1.0, float("nan")]), checkpoint="/x/ckpt_5.pt")
    assert issubclass(NonFiniteLossError, RuntimeError)


def test_the_old_module_name_still_imports_with_a_deprecation_warning():
    import importlib
    import sys

    import lafs_fast.dino
    sys.modules.pop("lafs_fast.ssl", None)
    with pytest.warns(DeprecationWarning, match="lafs_fast.dino"):
        old = importlib.import_module("lafs_fast.ssl")
    assert old.DINOLoss is lafs_fast.dino.DINOLoss and old.__all__ == lafs_fast.dino.__all__
