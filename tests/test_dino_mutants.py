"""Edge cases of the DINO objective found by mutation testing (docs/mutation.md): the release's
defaults, schedules at their boundaries, the loss's checkpoint state and the error messages a
user reads when a run stops."""
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from lafs_fast.dino import (
    DINOLoss,
    NonFiniteLossError,
    cancel_last_layer_grads,
    check_finite,
    cosine_schedule,
    teacher_temp_schedule,
)


def test_release_defaults_of_the_teacher_temperature_and_loss():
    # teacher temp linear 0.07 -> 0.04 over 30 epochs of 41 (docs/method.md)
    temps = teacher_temp_schedule()
    assert len(temps) == 41
    assert temps[0] == pytest.approx(0.07) and temps[29] == pytest.approx(0.04)
    assert temps[28] > 0.04 and temps[40] == pytest.approx(0.04)
    loss = DINOLoss(out_dim=4)
    assert len(loss.teacher_temps) == 41
    assert loss.teacher_temp(0) == pytest.approx(0.07) and loss.teacher_temp(28) > 0.04
    assert loss.teacher_temp(29) == pytest.approx(0.04)


def test_loss_schedule_follows_total_epochs_and_holds_its_last_value():
    loss = DINOLoss(out_dim=4, warmup_teacher_temp=0.07, teacher_temp=0.04,
                    warmup_teacher_temp_epochs=3, total_epochs=3)
    assert len(loss.teacher_temps) == 3
    assert [loss.teacher_temp(e) for e in range(3)] == pytest.approx([0.07, 0.055, 0.04])
    assert loss.teacher_temp(10) == pytest.approx(0.04)   # past the schedule: its last value


def test_teacher_temp_schedule_of_one_epoch_has_one_value():
    assert teacher_temp_schedule(0.07, 0.04, warmup_epochs=0, total_epochs=1).tolist() == [0.04]
    assert teacher_temp_schedule(0.07, 0.04, warmup_epochs=3, total_epochs=1).tolist() == [0.07]


def test_cosine_schedule_with_warmup_as_long_as_the_schedule_is_all_warmup():
    s = cosine_schedule(1.0, 0.0, epochs=2, steps_per_epoch=2, warmup_epochs=2, start_warmup=0.5)
    np.testing.assert_allclose(s, np.linspace(0.5, 1.0, 4))


def test_cosine_schedule_one_step_warmup_starts_at_start_warmup():
    s = cosine_schedule(1.0, 0.0, epochs=3, steps_per_epoch=1, warmup_epochs=1, start_warmup=0.25)
    assert len(s) == 3 and s[0] == 0.25 and s[1] == 1.0


def test_cosine_schedule_too_long_warmup_names_both_lengths():
    with pytest.raises(ValueError, match=r"warm-up \(6 steps\) is longer than the schedule \(4 steps\)"):
        cosine_schedule(1.0, 0.0, epochs=2, steps_per_epoch=2, warmup_epochs=3)


def test_loss_with_one_global_view_and_its_errors():
    loss = DINOLoss(out_dim=5, n_global=1, n_views=3, warmup_teacher_temp_epochs=1, total_epochs=1)
    assert loss.n_pairs == 2
    out = loss(torch.randn(6, 5), torch.randn(2, 5), epoch=0)
    assert torch.isfinite(out)
    with pytest.raises(ValueError, match=r"need 1 <= n_global <= n_views, got 0, 3"):
        DINOLoss(out_dim=5, n_global=0, n_views=3)
    with pytest.raises(ValueError, match=r"expected student \(V\*B, K\) = \(3\*B, K\)"):
        loss(torch.randn(5, 5), torch.randn(2, 5), epoch=0)


def test_loss_checkpoint_state_is_the_centre_only():
    # the pair mask is rebuilt from n_global/n_views; saving it would break loading old checkpoints
    assert set(DINOLoss(out_dim=4).state_dict()) == {"center"}


def test_last_layer_frozen_for_the_first_epoch_only_by_default():
    head = nn.Sequential()
    head.add_module("last_layer", nn.Linear(3, 2))
    head(torch.randn(2, 3)).sum().backward()
    assert cancel_last_layer_grads(head, epoch=1) == 0
    assert cancel_last_layer_grads(head, epoch=0) == 2


def _message(loss, **kw):
    with pytest.raises(NonFiniteLossError) as e:
        check_finite(loss, **kw)
    return str(e.value)


def test_check_finite_message_shows_the_value_and_only_the_known_place():
    msg = _message(torch.tensor(float("inf")))
    assert msg.startswith("non-finite loss inf: stopping.")      # a scalar shown as a number
    assert msg.endswith("collapsed teacher temperature.")         # no resume hint without a checkpoint
    assert "epoch" not in msg and "step" not in msg.split(":")[0] and "checkpoint" not in msg
    assert _message(torch.tensor(float("nan")), step=7).startswith("non-finite loss nan step 7:")
    assert _message(torch.tensor(float("nan")), epoch=2).startswith("non-finite loss nan at epoch 2:")
    many = torch.full((20,), float("nan"))
    shown = re.match(r"non-finite loss \[(.*?)\]", _message(many)).group(1)
    assert shown.count("nan") == 8                                 # at most 8 values shown
