"""Partial FC (class-sharded margin head) on CPU with gloo, 2 processes.

Equivalence: 2 ranks x B rows with the class matrix split [0, 5) / [5, 11) (11 classes: W does not
divide C) against 1 process with the whole CosFace / ArcFace head over 2B rows, through 3 AdamW
steps of a DDP linear "backbone" plus the head with gradient clipping that bites. The two do the
same arithmetic in another order (a log-sum-exp in two parts, a GEMM split by rows), so they agree
to float32 rounding: measured differences are ~1e-7 relative. Allowed: rtol 1e-5 + atol 1e-6; a
missing gather backward or a wrong world-size factor changes embedding gradients by 50 % or more,
a wrong normaliser the loss by 1e-1.
"""
import math
import multiprocessing
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from tiny_models import dropout_free_model
from torch import nn

from lafs_fast.models.heads import ArcFace, CosFace
from lafs_fast.models.partial_fc import PartialFC, clip_grad_norm_, shard_range
from lafs_fast.train import distributed

B, D, C, IN = 4, 8, 11, 6
RTOL, ATOL = 1e-5, 1e-6
STEPS, CLIP = 3, 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def problem(kind: str, soft: bool):
    """Fixed data of the whole run: backbone and class matrix, inputs and (soft) labels per step."""
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(IN, D)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(D, IN, generator=g))
        lin.bias.copy_(torch.randn(D, generator=g))
    W = torch.randn(C, D, generator=g)
    xs = torch.randn(STEPS, 2 * B, IN, generator=g)
    ys = torch.randint(0, C, (STEPS, 2 * B, 2), generator=g)
    lam = torch.rand(STEPS, 2 * B, 1, generator=g) if soft else torch.ones(STEPS, 2 * B, 1)
    ws = torch.cat([lam, 1 - lam], dim=2)
    return lin, W, xs, ys, ws


def head_kw(kind):
    return dict(s=16.0, m=0.3) if kind == "cosface" else dict(s=16.0, m=0.5)


def run_sharded(kind: str, soft: bool, rank: int, world: int) -> dict:
    lin, W, xs, ys, ws = problem(kind, soft)
    head = PartialFC(D, C, loss=kind, **head_kw(kind))
    assert (head.lo, head.hi) == shard_range(C, world, rank)
    with torch.no_grad():
        head.weight.copy_(W[head.lo:head.hi])
    ddp = distributed.wrap_ddp(lin)
    opt = torch.optim.AdamW(list(lin.parameters()) + list(head.parameters()), lr=0.05, weight_decay=0.1)
    n = 2 * B // world
    rows = slice(rank * n, (rank + 1) * n)
    out = {"loss": [], "emb_grad": []}
    for k in range(STEPS):
        emb = ddp(xs[k, rows])
        emb.retain_grad()
        loss = head(emb, ys[k, rows], ws[k, rows])
        opt.zero_grad()
        loss.backward()
        out["norm"] = clip_grad_norm_(list(lin.parameters()), head, CLIP)
        opt.step()
        out["loss"].append(loss.detach())
        out["emb_grad"].append(emb.grad / world)  # world x dL/d(own rows), for DDP's average
    out.update(shard=head.weight.detach().clone(), lin=lin.weight.detach().clone(),
               exp_avg=opt.state[head.weight]["exp_avg"].clone(), full=head.full_weight())
    return out


def run_replicated(kind: str, soft: bool) -> dict:
    lin, W, xs, ys, ws = problem(kind, soft)
    Head = CosFace if kind == "cosface" else ArcFace
    head = Head(D, C, **head_kw(kind))
    with torch.no_grad():
        head.weight.copy_(W)
    opt = torch.optim.AdamW(list(lin.parameters()) + list(head.parameters()), lr=0.05, weight_decay=0.1)
    out = {"loss": [], "emb_grad": []}
    for k in range(STEPS):
        emb = lin(xs[k])
        emb.retain_grad()
        target = (F.one_hot(ys[k], C).float() * ws[k, :, :, None]).sum(1)  # dense soft target
        logits = head(emb, target)
        loss = torch.sum(-target * F.log_softmax(logits, dim=1), dim=1).mean()
        opt.zero_grad()
        loss.backward()
        out["norm"] = torch.nn.utils.clip_grad_norm_(list(lin.parameters()) + list(head.parameters()), CLIP)
        opt.step()
        out["loss"].append(loss.detach())
        out["emb_grad"].append(emb.grad.clone())
    out.update(full=head.weight.detach().clone(), lin=lin.weight.detach().clone(),
               exp_avg=opt.state[head.weight]["exp_avg"].clone())
    return out


def run_sampled(rank: int, world: int) -> dict:
    """Sample rate 0.3 over 40 classes: the loss and what it was computed over."""
    g = torch.Generator().manual_seed(5)
    Wf, x = torch.randn(40, D, generator=g), torch.randn(2 * B, D, generator=g)
    y = torch.randint(0, 40, (2 * B,), generator=g)
    head = PartialFC(D, 40, loss="cosface", s=16.0, m=0.3, sample_rate=0.3, seed=3)
    with torch.no_grad():
        head.weight.copy_(Wf[head.lo:head.hi])
    rows = slice(rank * B, (rank + 1) * B)
    res = []
    for _ in range(3):
        loss = head(x[rows], y[rows])
        sampled = distributed.all_gather_cat(head.last_sampled) if world > 1 else head.last_sampled
        res.append((loss.detach(), sampled))
    return {"steps": res, "W": Wf, "x": x, "y": y, "sample_step": int(head.sample_step)}


def worker(rank, world, port, root):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        distributed.init(torch.device("cpu"), 60)
        out = {f"{k}_{s}": run_sharded(k, s, rank, world) for k in ("cosface", "arcface") for s in (False, True)}
        out["sampled"] = run_sampled(rank, world)
        torch.save(out, f"{root}/rank{rank}.pt")
    except Exception as e:
        with open(f"{root}/error{rank}.txt", "w") as f:
            f.write(f"{type(e).__name__}: {e}")
        raise
    finally:
        distributed.shutdown()


def run_two_ranks(target, root, timeout: float) -> None:
    """Spawn target(rank, 2, port, root) for ranks 0 and 1, wait, and fail with the ranks' own
    errors (each worker writes error<rank>.txt) if either did not finish cleanly."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, 2, port, str(root))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    errors = [(root / f"error{r}.txt").read_text() for r in range(2) if (root / f"error{r}.txt").exists()]
    assert not errors and all(p.exitcode == 0 for p in procs), errors


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("pfc")
    run_two_ranks(worker, root, timeout=180)
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_shard_ranges_cover_every_class_once():
    for c, w in ((11, 2), (10, 3), (205990, 8), (7, 7)):
        ranges = [shard_range(c, w, r) for r in range(w)]
        assert ranges[0][0] == 0 and ranges[-1][1] == c
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(h - l for l, h in ranges) - min(h - l for l, h in ranges) <= 1
    with pytest.raises(ValueError, match="at least one class per rank"):
        shard_range(3, 4, 0)


@pytest.mark.parametrize("kind", ["cosface", "arcface"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "mixup"])
def test_partial_fc_two_ranks_match_full_head(two_ranks, kind, soft):
    ref = run_replicated(kind, soft)
    parts = [r[f"{kind}_{soft}"] for r in two_ranks]
    for k in range(STEPS):
        for p in parts:  # the same global loss on every rank
            torch.testing.assert_close(p["loss"][k], ref["loss"][k], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(torch.cat([p["emb_grad"][k] for p in parts]), ref["emb_grad"][k],
                                   rtol=RTOL, atol=ATOL)
    # clipping bit (so its global norm is tested) and the weights moved
    assert ref["norm"] > CLIP
    for p in parts:
        torch.testing.assert_close(p["norm"], ref["norm"], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(p["lin"], ref["lin"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.cat([p["shard"] for p in parts]), ref["full"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(parts[0]["full"], ref["full"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.cat([p["exp_avg"] for p in parts]), ref["exp_avg"], rtol=RTOL, atol=1e-8)
    assert (ref["full"] - problem(kind, soft)[1]).abs().max() > 1e-2


def test_partial_fc_one_process_is_the_full_head():
    ref = run_replicated("arcface", True)
    one = run_sharded("arcface", True, 0, 1)
    torch.testing.assert_close(torch.stack(one["loss"]), torch.stack(ref["loss"]), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(one["shard"], ref["full"], rtol=RTOL, atol=ATOL)


def test_sampling_keeps_positives_and_is_the_restricted_softmax(two_ranks):
    r0, r1 = two_ranks[0]["sampled"], two_ranks[1]["sampled"]
    W, x, y = r0["W"], r0["x"], r0["y"]
    draws = []
    for (loss0, S), (loss1, S1) in zip(r0["steps"], r1["steps"]):
        assert torch.equal(S, S1) and torch.equal(S, S.sort().values)
        assert set(y.tolist()) <= set(S.tolist())  # every positive is sampled
        # each rank keeps int(0.3 * 20) = 6 of its 20 classes unless it has more positives
        for lo in (0, 20):
            mine = ((S >= lo) & (S < lo + 20)).sum().item()
            pos = len({c for c in y.tolist() if lo <= c < lo + 20})
            assert mine == max(6, pos)
        head = CosFace(D, len(S), s=16.0, m=0.3)
        with torch.no_grad():
            head.weight.copy_(W[S])
        col = torch.searchsorted(S, y)
        ref = F.cross_entropy(head(x, col), col)
        torch.testing.assert_close(loss0, ref, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(loss1, ref, rtol=RTOL, atol=ATOL)
        draws.append(S)
    assert r0["sample_step"] == 3
    assert not all(torch.equal(draws[0], d) for d in draws[1:])  # negatives are redrawn per step


def test_sampling_leaves_the_loss_lower_than_the_full_softmax():
    """Dropping negatives removes terms from the normaliser: the sampled loss is <= the full one,
    and equal at rate 1."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, D, generator=g), torch.randint(0, 30, (6,), generator=g)
    full = PartialFC(D, 30, s=16.0, m=0.3, seed=1)
    part = PartialFC(D, 30, s=16.0, m=0.3, seed=1, sample_rate=0.2)
    part.load_state_dict(full.state_dict())
    l_full, l_part = full(x, y), part(x, y)
    assert l_part < l_full
    part.eval()  # no sampling outside training
    torch.testing.assert_close(part(x, y), l_full)


def test_bad_labels_are_refused():
    head = PartialFC(D, 10)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        head(torch.randn(2, D), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="need label_weights"):
        head(torch.randn(2, D), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC(D, 10, sample_rate=0.0)


# ----------------------------------------------------------------------------- finetune with --partial-fc
FT_B = 8  # images per rank; 48 synthetic faces of 8 identities -> 3 steps of 16


def ft_config(out_dir, batch, **kw):
    from lafs_fast.train import finetune
    base = dict(dataset="synthetic", landmarks="grid", batch_size=batch, epochs=1, warmup_epochs=0.5, lr=5e-3,
                eval=False, mixup_prob=1.0, erase_prob=0.5, out_dir=str(out_dir), log_every=1, threads=1,
                progress=False, device="cpu", save_every=1, keep_checkpoints=5, dist_timeout=60, scale=16.0)
    base.update(kw)
    return finetune.FinetuneConfig(**base)


def ft_worker(rank, world, port, root):
    """Partial FC finetuning on 2 ranks: a straight run; the same run stopped after 1 step and
    resumed; and a resume of the replicated single-process run's step-1 checkpoint."""
    import shutil

    from lafs_fast.train import finetune
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    finetune.create_model = dropout_free_model
    try:
        finetune.run(ft_config(f"{root}/pfc", FT_B, partial_fc="on"))
        finetune.run(ft_config(f"{root}/pfc_resumed", FT_B, partial_fc="on", stop_after=1))
        finetune.run(ft_config(f"{root}/pfc_resumed", FT_B, partial_fc="on", resume=True))
        if rank == 0:
            os.makedirs(f"{root}/from_replicated")
            shutil.copy(f"{root}/replicated/step-00000001.pt", f"{root}/from_replicated/")
        distributed.barrier()
        finetune.run(ft_config(f"{root}/from_replicated", FT_B, partial_fc="on", resume=True))
    except Exception as e:
        with open(f"{root}/error{rank}.txt", "w") as f:
            f.write(f"{type(e).__name__}: {e}")
        raise
    finally:
        distributed.shutdown()


def _losses(out_dir):
    import json
    lines = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    by_step = {l["step"]: l["loss"] for l in lines if l.get("stage") == "finetune"}
    return torch.tensor([by_step[k] for k in sorted(by_step)])


def _final(out_dir, step=3):
    """(checkpoint, head matrix, head moments) at `step`, shards concatenated."""
    path = os.path.join(out_dir, f"step-{step:08d}.pt")
    s = torch.load(path, weights_only=False)
    if not s["head"].get("partial_fc"):
        m = [st for st in s["optimizer"]["state"].values() if st["exp_avg"].shape == s["head"]["weight"].shape]
        return s, s["head"]["weight"], m[0]["exp_avg"]
    shards = [torch.load(f"{path}.head-{r}-of-{s['head']['world_size']}") for r in range(s["head"]["world_size"])]
    return s, torch.cat([sh["weight"] for sh in shards]), torch.cat([sh["optimizer"]["exp_avg"] for sh in shards])


def _close_states(a, b, rtol=1e-4, atol=1e-5):
    sa, wa, ma = a
    sb, wb, mb = b
    for k in sa["model"]:
        if sa["model"][k].is_floating_point():
            torch.testing.assert_close(sb["model"][k], sa["model"][k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")
    torch.testing.assert_close(wb, wa, rtol=rtol, atol=atol)
    assert (mb - ma).norm() <= 1e-4 * ma.norm()


@pytest.fixture(scope="module")
def finetune_runs(tmp_path_factory):
    """The replicated single-process reference (global batch 16) and the 2-rank Partial FC runs."""
    from lafs_fast.train import finetune
    root = tmp_path_factory.mktemp("pfc_ft")
    saved = finetune.create_model, torch.get_num_threads()
    finetune.create_model = dropout_free_model
    try:
        finetune.run(ft_config(root / "replicated", 2 * FT_B, partial_fc="off"))
    finally:
        finetune.create_model = saved[0]
        torch.set_num_threads(saved[1])
    run_two_ranks(ft_worker, root, timeout=600)
    return root


def test_finetune_partial_fc_two_ranks_match_replicated_one_process(finetune_runs):
    root = finetune_runs
    l_ref, l_pfc = _losses(root / "replicated"), _losses(root / "pfc")
    assert len(l_ref) == len(l_pfc) == 3
    torch.testing.assert_close(l_pfc, l_ref, rtol=1e-4, atol=1e-5)
    ref, pfc = _final(root / "replicated"), _final(root / "pfc")
    assert pfc[0]["head"]["partial_fc"] and pfc[0]["head"]["ranges"] == [[0, 4], [4, 8]]
    _close_states(ref, pfc)
    replicated = _final(root / "replicated", 1)[0]["model"]["patch_embed.weight"]
    assert (ref[0]["model"]["patch_embed.weight"] - replicated).abs().max() > 1e-4


def test_finetune_partial_fc_resume_is_bitwise(finetune_runs):
    root = finetune_runs
    a, b = _final(root / "pfc"), _final(root / "pfc_resumed")
    assert torch.equal(_losses(root / "pfc"), _losses(root / "pfc_resumed"))
    for k in a[0]["model"]:
        assert torch.equal(a[0]["model"][k], b[0]["model"][k]), k
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    for i, st in a[0]["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg"], b[0]["optimizer"]["state"][i]["exp_avg"])


def test_finetune_reshards_and_switches_head(finetune_runs, tmp_path, monkeypatch):
    """Replicated step 1 -> 2 Partial FC ranks (in the fixture); 2-rank step 1 -> 1 process with
    the replicated head and with a 1-rank Partial FC: all continue the same trajectory."""
    import shutil

    from lafs_fast.train import finetune
    root = finetune_runs
    ref = _final(root / "replicated")
    _close_states(ref, _final(root / "from_replicated"))
    monkeypatch.setattr(finetune, "create_model", dropout_free_model)
    threads = torch.get_num_threads()
    try:
        for mode in ("off", "on"):
            d = tmp_path / mode
            d.mkdir()
            for f in os.listdir(root / "pfc"):
                if f.startswith("step-00000001.pt"):
                    shutil.copy(root / "pfc" / f, d)
            finetune.run(ft_config(d, 2 * FT_B, partial_fc=mode, resume=True))
            got = _final(d)
            assert bool(got[0]["head"].get("partial_fc")) == (mode == "on")
            _close_states(ref, got)
    finally:
        torch.set_num_threads(threads)
    # a missing shard is named
    d = tmp_path / "broken"
    d.mkdir()
    shutil.copy(root / "pfc" / "step-00000001.pt", d)
    shutil.copy(root / "pfc" / "step-00000001.pt.head-0-of-2", d)
    with pytest.raises(ValueError, match="head-1-of-2 is missing"):
        finetune.run(ft_config(d, 2 * FT_B, partial_fc="on", resume=True))


def test_partial_fc_auto_rule():
    from lafs_fast.train import finetune
    cfg = ft_config("/tmp/unused", 8)
    assert not finetune.partial_fc_enabled(cfg, 100_000, 1)
    assert not finetune.partial_fc_enabled(cfg, 9_999, 8)
    assert finetune.partial_fc_enabled(cfg, 10_000, 2)
    assert finetune.partial_fc_enabled(ft_config("/tmp/unused", 8, sample_rate=0.5), 40, 1)
    assert not finetune.partial_fc_enabled(ft_config("/tmp/unused", 8, partial_fc="off"), 10**6, 8)
    with pytest.raises(ValueError, match="sample-rate"):
        ft_config("/tmp/unused", 8, partial_fc="off", sample_rate=0.5).validate()


def test_torchrun_finetune_with_partial_fc_and_sampling(tmp_path):
    """The command line, end to end: 2 CPU ranks under torchrun, Partial FC with sampling."""
    import json
    import shutil
    import subprocess
    import sys
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "run"
    cmd = [torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "lafs_fast.train",
           "finetune", "--dataset", "synthetic", "--landmarks", "grid", "--epochs", "1", "--batch-size", "8",
           "--eval", "false", "--threads", "1", "--progress", "false", "--log-every", "1",
           "--partial-fc", "on", "--sample-rate", "0.5", "--out-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(l) for l in open(out / "metrics.jsonl")]
    losses = [l["loss"] for l in lines if l.get("stage") == "finetune"]
    assert len(losses) >= 3 and all(math.isfinite(v) for v in losses)
    assert (out / "model.pt").exists()
    assert sorted(f for f in os.listdir(out) if ".head-" in f) == ["step-00000003.pt.head-0-of-2",
                                                                   "step-00000003.pt.head-1-of-2"]
    s = torch.load(out / "step-00000003.pt.head-1-of-2")
    assert s["sample_step"] == 3 and (s["lo"], s["hi"]) == (4, 8)


def test_shard_checkpoints_reshard_to_any_world_size(tmp_path):
    """Shards written by 2 ranks of 11 classes load into 3 ranks ([0,3), [3,7), [7,11): every
    overlap pattern), 1 rank and a replicated head, weights and AdamW moments alike (one AdamW
    step on the full matrix is the reference: elementwise, so shards reproduce it exactly)."""
    from lafs_fast.models.partial_fc import checkpoint_parts, load_head
    g = torch.Generator().manual_seed(9)
    W0, G = torch.randn(C, D, generator=g), torch.randn(C, D, generator=g)
    full = nn.Parameter(W0.clone())
    ref_opt = torch.optim.AdamW([full], lr=0.1)
    full.grad = G.clone()
    ref_opt.step()
    path = str(tmp_path / "step-00000001.pt")
    state = None
    for r in range(2):
        h = PartialFC(D, C, rank=r, world_size=2)
        with torch.no_grad():
            h.weight.copy_(W0[h.lo:h.hi])
        opt = torch.optim.AdamW(h.parameters(), lr=0.1)
        h.weight.grad = G[h.lo:h.hi].clone()
        opt.step()
        h.sample_step.fill_(7)  # 7 steps drew class samples: a resume continues the stream there
        layout, opt_sd = checkpoint_parts(h, opt, path)
        assert opt_sd["state"] == {}  # the moments live in the shard files
        if r == 0:
            state = {"head": layout, "optimizer": opt_sd}
    assert sorted(os.listdir(tmp_path)) == ["step-00000001.pt.head-0-of-2", "step-00000001.pt.head-1-of-2"]
    torch.save(state, path)
    heads = [PartialFC(D, C, rank=r, world_size=w) for w in (3, 1) for r in range(w)] + [CosFace(D, C)]
    for h in heads:
        opt = torch.optim.AdamW(h.parameters(), lr=0.1)
        load_head(state, path, h, opt)
        lo, hi = (h.lo, h.hi) if isinstance(h, PartialFC) else (0, C)
        torch.testing.assert_close(h.weight.detach(), full.detach()[lo:hi], rtol=0, atol=0)
        st = opt.state[h.weight]
        torch.testing.assert_close(st["exp_avg"], ref_opt.state[full]["exp_avg"][lo:hi], rtol=0, atol=0)
        torch.testing.assert_close(st["exp_avg_sq"], ref_opt.state[full]["exp_avg_sq"][lo:hi], rtol=0, atol=0)
        assert float(st["step"]) == 1
        if isinstance(h, PartialFC):
            assert int(h.sample_step) == 7
    # a head of another class count is refused
    h12 = PartialFC(D, 12)
    with pytest.raises(ValueError, match="11 classes, this run has 12"):
        load_head(state, path, h12, torch.optim.AdamW(h12.parameters()))


def test_a_shard_that_would_run_code_is_refused(tmp_path):
    """A Partial FC shard file whose pickle calls a function (here: creates a file) is refused on
    resume with one line naming it, and nothing of it runs."""
    from hostile import plant

    from lafs_fast.checkpoint import CheckpointError
    from lafs_fast.models.partial_fc import checkpoint_parts, load_head, shard_path
    head = PartialFC(D, C, rank=0, world_size=1)
    opt = torch.optim.AdamW(head.parameters(), lr=0.1)
    path = str(tmp_path / "step-00000001.pt")
    layout, opt_sd = checkpoint_parts(head, opt, path)
    state = {"head": layout, "optimizer": opt_sd}
    shard, marker = shard_path(path, 0, 1), tmp_path / "code-ran"
    plant(shard, marker, format="lafs_fast.partial_fc_shard", lo=0, hi=C)
    with pytest.raises(CheckpointError) as e:
        load_head(state, path, head, opt)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and shard in msg and "refused, loading it would call" in msg, msg
    assert not marker.exists()
