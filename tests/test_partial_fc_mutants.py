"""Partial FC's rank-dependent code in one process: a fake two-rank world (this process is one
rank, the other rank's tensors are given) drives the gathers and sums whose multi-process tests
run in spawned ranks, where a line-level bug shows only as a wrong loss far downstream. Also the
class sampling's rules (rate, positives, the floor of one class, determinism per step) and which
shard files `prune_shards` removes."""
import os

import pytest
import torch

from lafs_fast.models import partial_fc
from lafs_fast.models.partial_fc import PartialFC, _gather_var, _GatherRows, _SumOverRanks, prune_shards


class FakeWorld:
    """torch.distributed's collectives for a world of two, seen from `rank`; `other` holds what the
    other rank contributes to each collective, in call order."""

    def __init__(self, rank, other):
        self.rank, self.other, self.calls = rank, list(other), 0

    def _next(self):
        t = self.other[self.calls]
        self.calls += 1
        return t

    def all_gather(self, out, t):
        theirs = self._next()
        out[self.rank].copy_(t)
        out[1 - self.rank].copy_(theirs)

    def all_reduce(self, t, op=None):
        t.add_(self._next())


@pytest.fixture
def world(monkeypatch):
    def make(rank, other):
        fake = FakeWorld(rank, other)
        monkeypatch.setattr(partial_fc, "_world", lambda: (rank, 2))
        monkeypatch.setattr(partial_fc.dist, "all_gather", fake.all_gather)
        monkeypatch.setattr(partial_fc.dist, "all_reduce", fake.all_reduce)
        return fake
    return make


def test_gather_var_pads_to_the_longest_rank_and_trims_back(world):
    mine = torch.arange(6, dtype=torch.float64).reshape(3, 2)
    theirs_padded = torch.tensor([[7.0, 8.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    fake = world(0, [torch.tensor([1]), theirs_padded])
    out = _gather_var(mine)
    assert fake.calls == 2
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.cat([mine, theirs_padded[:1]]), rtol=0, atol=0)


@pytest.mark.parametrize("rank", [0, 1])
def test_gather_rows_forward_in_rank_order_and_backward_sums_then_scales(world, rank):
    mine = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)  # 2 rows of 3: rows != width
    theirs = torch.tensor([[7.0, 8.0, 9.0], [10.0, 11.0, 12.0]])
    their_grad = torch.tensor([[0.5] * 3, [0.5] * 3, [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    world(rank, [theirs, their_grad])
    out = _GatherRows.apply(mine)
    in_order = [mine.detach(), theirs] if rank == 0 else [theirs, mine.detach()]
    torch.testing.assert_close(out, torch.cat(in_order), rtol=0, atol=0)
    grad = torch.arange(12.0).reshape(4, 3)
    out.backward(grad)
    # this rank's rows, summed over both ranks, times the world size (DDP then averages)
    own = slice(2 * rank, 2 * rank + 2)
    torch.testing.assert_close(mine.grad, (grad[own] + their_grad[own]) * 2, rtol=0, atol=0)


def test_sum_over_ranks_forward_adds_and_backward_passes_through(world):
    mine = torch.tensor([1.0, 2.0], requires_grad=True)
    world(0, [torch.tensor([10.0, 20.0])])
    out = _SumOverRanks.apply(mine)
    torch.testing.assert_close(out, torch.tensor([11.0, 22.0]), rtol=0, atol=0)
    out.backward(torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(mine.grad, torch.tensor([3.0, 5.0]), rtol=0, atol=0)
    assert torch.equal(mine.detach(), torch.tensor([1.0, 2.0]))  # summed into a copy


def head_of_rank(rank, rate, seed=0, classes=20):
    return PartialFC(4, classes, sample_rate=rate, seed=seed, rank=rank, world_size=2)


def test_sampling_keeps_the_rate_and_every_own_positive():
    head = head_of_rank(1, 0.5)  # classes [10, 20)
    labels = torch.tensor([11, 3, 19, 20 - 10])  # 3 and 10 belong to rank 0 (10 is rank 1's lo)
    picked = head._sample(labels)
    assert picked.numel() == 5 and torch.equal(picked, picked.sort().values)
    assert {1, 9, 0} <= set(picked.tolist())  # local indices of 11, 19 and 10
    assert picked.min() >= 0 and picked.max() < 10


def test_sampling_grows_to_hold_every_positive_and_never_below_one():
    head = head_of_rank(0, 0.3)  # classes [0, 10): 3 kept by the rate
    many = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    assert head._sample(many).tolist() == [0, 1, 2, 3, 4, 5, 6]
    tiny = head_of_rank(0, 0.01)  # int(0.01 * 10) = 0 and no positives here: still one class
    assert tiny._sample(torch.tensor([15])).numel() == 1
    assert head._sample(torch.tensor([10, 11])).numel() == 3  # other rank's labels are not positives here


def test_sampling_is_a_function_of_seed_and_step():
    a, b = head_of_rank(1, 0.3, seed=5), head_of_rank(1, 0.3, seed=5)
    labels = torch.tensor([12])
    assert torch.equal(a._sample(labels), b._sample(labels))
    draws = set()
    for step in range(6):
        a.sample_step.fill_(step)
        draws.add(tuple(a._sample(labels).tolist()))
    assert len(draws) > 1  # a new draw each step
    other_seed = head_of_rank(1, 0.3, seed=6)
    differs = []
    for step in range(6):
        a.sample_step.fill_(step)
        other_seed.sample_step.fill_(step)
        differs.append(not torch.equal(a._sample(labels), other_seed._sample(labels)))
    assert any(differs)


def test_prune_shards_removes_only_orphans_in_the_given_folder(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "step-00000002.pt").write_bytes(b"x")
    kept = run / "step-00000002.pt.head-0-of-2"
    orphan = run / "step-00000001.pt.head-1-of-2"
    for f in (kept, orphan):
        f.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)  # the folder is not the working directory
    prune_shards(str(run))
    assert sorted(os.listdir(run)) == ["step-00000002.pt", "step-00000002.pt.head-0-of-2"]
