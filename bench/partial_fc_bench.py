"""Replicated margin head (CosFace under DDP) vs Partial FC, at WebFace4M's 205,990 classes x 768,
on CPU with gloo: memory per rank, step time, bytes moved by collectives per step.

    python bench/partial_fc_bench.py --classes 205990 --dim 768 --batch 32 --worlds 2 8 --out bench/partial_fc.json

What is simulated: the ranks are processes on this one machine (gloo over loopback, 1 thread
each, sharing its cores), and the backbone is left out: every rank's embeddings are a random
(batch, dim) leaf tensor, so a step is head forward + loss + backward (+ the collectives) +
AdamW on the head. Memory is each rank's peak RSS growth from just before the head is built
(weights, gradients, AdamW moments, logits and temporaries). CPU s/step is the rank's own CPU
time per step (what a dedicated device would spend, roughly); wall s/step is the slowest rank's
and includes waiting for the cores the ranks share. Collective bytes are counted by wrapping
torch.distributed's all_reduce / all_gather (DDP's gradient buckets reach them through its
default all-reduce hook, registered from Python) (payload: the tensor handed to the collective; a ring all-reduce
sends about 2 (W-1)/W times its payload per rank, an all-gather (W-1)/W of its output).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import socket
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(rank, world, port, kind, classes, dim, batch, steps, q):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from lafs_fast.models.heads import CosFace
    from lafs_fast.models.partial_fc import PartialFC
    tally = {"all_reduce": 0, "all_gather": 0}
    counting = [False]

    def wrap(name):
        fn = getattr(dist, name)

        def counted(*a, **kw):
            if counting[0]:
                t = a[1] if name == "all_gather" else a[0]
                tally[name] += t.numel() * t.element_size()
            return fn(*a, **kw)
        setattr(dist, name, counted)
    wrap("all_reduce")
    wrap("all_gather")

    base = _rss_mb()
    torch.manual_seed(rank)
    if kind == "replicated":
        head = CosFace(dim, classes, s=64.0, m=0.4)
        ddp = torch.nn.parallel.DistributedDataParallel(head)
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        # DDP's default hook, registered from Python so that its dist.all_reduce of each gradient
        # bucket goes through the counting wrapper above
        ddp.register_comm_hook(None, allreduce_hook)
    else:
        head = PartialFC(dim, classes, loss="cosface", s=64.0, m=0.4)
        ddp = head
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, foreach=True)
    g = torch.Generator().manual_seed(100 + rank)
    times, cpu = [], []
    for step in range(steps + 1):  # step 0 warms up (allocations, AdamW state)
        emb = torch.randn(batch, dim, generator=g).requires_grad_(True)
        y = torch.randint(0, classes, (batch,), generator=g)
        counting[0] = step == 1
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        if kind == "replicated":
            logits = ddp(emb, y)
            loss = F.cross_entropy(logits, y)
        else:
            loss = ddp(emb, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        counting[0] = False
    dist.barrier()
    q.put({"rank": rank, "rss_growth_mb": _peak_rss_mb() - base, "state_mb":
           sum(p.numel() * p.element_size() * 4 for p in head.parameters()) / 2**20,  # w, grad, 2 moments
           "wall_s": times, "cpu_s": cpu, "bytes": tally, "loss": float(loss.detach())})
    dist.destroy_process_group()


def run(kind, world, classes, dim, batch, steps):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, port, kind, classes, dim, batch, steps, q))
             for r in range(world)]
    for p in procs:
        p.start()
    res = sorted((q.get(timeout=3600) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    def med(v):
        return sorted(v)[len(v) // 2]
    return {"kind": kind, "world": world, "classes": classes, "dim": dim, "batch_per_rank": batch,
            "rss_growth_mb_max": max(r["rss_growth_mb"] for r in res),
            "state_mb": max(r["state_mb"] for r in res),
            "wall_s_per_step": med([max(r["wall_s"][i] for r in res) for i in range(steps)]),
            "cpu_s_per_step_per_rank": med([sum(r["cpu_s"][i] for r in res) / world for i in range(steps)]),
            "all_reduce_bytes": res[0]["bytes"]["all_reduce"], "all_gather_bytes": res[0]["bytes"]["all_gather"],
            "loss": res[0]["loss"]}


def machine() -> dict:
    model = next((l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True)
                  .stdout.splitlines() if l.startswith("Model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "load_avg": os.getloadavg()}


def _size(b: float) -> str:
    for unit, k in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if b >= k:
            return f"{b / k:.2f} {unit}"
    return f"{b:.0f} B"


def table(rows) -> str:
    out = ["| head | ranks | batch/rank | head state / rank (w+grad+AdamW) | peak RSS growth / rank | "
           "CPU s / step / rank | wall s / step | all-reduce payload / step | all-gather payload / step |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['kind']} | {r['world']} | {r['batch_per_rank']} | {r['state_mb']:.0f} MB | "
                   f"{r['rss_growth_mb_max']:.0f} MB | {r['cpu_s_per_step_per_rank']:.2f} | "
                   f"{r['wall_s_per_step']:.2f} | "
                   f"{_size(r['all_reduce_bytes'])} | {_size(r['all_gather_bytes'])} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=205990)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--batch", type=int, default=32, help="images per rank")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    p.add_argument("--worlds", type=int, nargs="*", default=[2, 8], help="simulated world sizes of Partial FC")
    p.add_argument("--replicated-world", type=int, default=2, help="world size of the replicated run "
                                                                  "(its memory per rank does not depend on it)")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    before = machine()
    rows = [run("replicated", a.replicated_world, a.classes, a.dim, a.batch, a.steps)]
    print(table(rows), flush=True)
    for w in a.worlds:
        rows.append(run("partial_fc", w, a.classes, a.dim, a.batch, a.steps))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    result = {"machine_before": before, "machine_after": machine(), "command": " ".join(sys.argv), "rows": rows}
    print(table(rows))
    print(f"machine: {before['cpu']}, {before['cores']} cores, load average before {before['load_avg']}, "
          f"after {result['machine_after']['load_avg']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
