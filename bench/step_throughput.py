"""Images/s of one full LAFS pretraining step, lafs_fast's fused path vs a re-creation of the
original release's step (bench/step_paths.py), side by side in one run, with data (JPEG decode +
views) in the timed region and without; then a torch.profiler table of the fused step.

    python bench/step_throughput.py                         # CPU: the throughput issue's config
    python bench/step_throughput.py --model part_fvit_b --batch 82 --amp bf16   # a GPU

Defaults: part_fvit_mini (dim 192, depth 4, heads 3, 196 landmarks, full landmark CNN),
batch 16, 2 global + 8 local views, DINO out 4096. Writes --out (markdown) and --json.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_paths as SP  # noqa: E402


def amp_ctx(device, amp):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_path(args, impl, with_data, payloads):
    SP.seed_all(args.seed)
    net, vcfg, dino, opt = SP.make_setup(args.model, args.batch, args.n_local, args.out_dim, device=args.device,
                                         seed=args.seed, original=impl == "original",
                                         **fused_options(args, impl))
    run = SP.StepRunner(impl, payloads, vcfg, with_data, args.device, args.seed)
    times, data_times = [], []
    for i in range(args.warmup + args.steps):
        sync(args.device)
        t0 = time.perf_counter()
        loss = run(net, dino, opt, amp_ctx(args.device, args.amp))
        sync(args.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{impl}: non-finite loss")
    if with_data:  # the data part alone, for the table
        for _ in range(max(2, args.steps // 2)):
            t0 = time.perf_counter()
            run.data()
            sync(args.device)
            data_times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    row = {"path": impl, "with_data": with_data, "median_s": med, "min_s": min(times),
           "images_per_s": args.batch / med, "steps": len(times)}
    if data_times:
        row["data_s"] = statistics.median(data_times)
    return row, (net, dino, opt, run)


def fused_options(args, impl):
    return {} if impl == "original" else dict(args.fused_options)


def profile_table(args, state, rows=18):
    net, dino, opt, run = state
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            run(net, dino, opt, amp_ctx(args.device, args.amp))
        sync(args.device)
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    ev = sorted(prof.key_averages(), key=lambda e: getattr(e, key.replace("cuda", "device")
                                                              if not hasattr(e, key) else key), reverse=True)
    total = sum(getattr(e, "self_cpu_time_total") for e in ev) if args.device == "cpu" else \
        sum(getattr(e, "self_device_time_total", 0) for e in ev)
    lines = ["| op | self time ms / step | share | calls / step |", "|---|---:|---:|---:|"]
    for e in ev[:rows]:
        t = e.self_cpu_time_total if args.device == "cpu" else getattr(e, "self_device_time_total", 0)
        lines.append(f"| `{e.key}` | {t / 2e3:.1f} | {100 * t / max(total, 1):.1f}% | {e.count // 2} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="part_fvit_mini")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n-local", type=int, default=8)
    ap.add_argument("--out-dim", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", default=None, choices=["none", "bf16"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--fused", action="append", default=[], metavar="KEY=VALUE",
                    help="PretrainConfig options for the fused path (repeatable), e.g. fast_dropout=false")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "step_throughput.md"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.amp = args.amp or ("bf16" if args.device == "cuda" else "none")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.fused_options = {}
    for kv in args.fused:
        k, v = kv.split("=", 1)
        args.fused_options[k] = {"true": True, "false": False}.get(v.lower(), v)
    payloads = SP.face_bytes(args.batch, args.seed)
    results, state = [], None
    for with_data in (True, False):
        for impl in ("fused", "original"):
            row, st = time_path(args, impl, with_data, payloads)
            results.append(row)
            if impl == "fused" and with_data:
                state = st
            print(f"{impl:9s} {'with data' if with_data else 'model only':10s} "
                  f"{row['median_s'] * 1e3:8.1f} ms  {row['images_per_s']:6.2f} img/s", flush=True)
    by = {(r["path"], r["with_data"]): r for r in results}
    machine = f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {args.device}"
    if args.device == "cuda":
        machine += f" ({torch.cuda.get_device_name()})"
    md = [f"**LAFS pretraining step: {args.model}, batch {args.batch}, 2 + {args.n_local} views, "
          f"DINO out {args.out_dim}, amp {args.amp}** ({machine}; median of {args.steps} steps)", "",
          "| path | with data: ms / step | images/s | of which data ms | model only: ms / step | images/s |",
          "|---|---:|---:|---:|---:|---:|"]
    for impl in ("fused", "original"):
        a, b = by[(impl, True)], by[(impl, False)]
        md.append(f"| {impl} | {a['median_s'] * 1e3:.0f} | {a['images_per_s']:.2f} | {a['data_s'] * 1e3:.0f} | "
                  f"{b['median_s'] * 1e3:.0f} | {b['images_per_s']:.2f} |")
    speed = {w: by[("original", w)]["median_s"] / by[("fused", w)]["median_s"] for w in (True, False)}
    md += ["", f"fused / original speed-up: **{speed[True]:.2f}x with data**, {speed[False]:.2f}x model only."]
    if args.fused_options:
        md.append(f"fused options: {args.fused_options}")
    if not args.no_profile:
        md += ["", "Where the fused step (with data) spends its time (torch.profiler, self time):", "",
               profile_table(args, state)]
    text = "\n".join(md) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "results": results,
                       "speedup_with_data": speed[True], "speedup_model_only": speed[False]}, f, indent=1)
    return speed


if __name__ == "__main__":
    main()
