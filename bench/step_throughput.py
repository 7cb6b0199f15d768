"""Images/s of one full LAFS pretraining step, in one run, interleaved step by step:

  release   the authors' release's OWN step (bench/release_step.py), when --release PATH names a
            checkout of it (github szlbiubiubiu/LAFS_CVPR2024; this repo holds none of its code);
  original  the re-creation of the release's step on lafs_fast's modules (bench/step_paths.py);
  fused     lafs_fast's step (and any --variant of it: other PretrainConfig options or amp),

model only (the same cached batch every step) and with data (decode + views in the timed region),
then a torch.profiler table of the fused step (and of the release's with --profile release).

    python bench/step_throughput.py --release ../LAFS_CVPR2024      # CPU: the documented config
    python bench/step_throughput.py --variant bf16:amp=bf16 --variant image:landmark_source=image
    python bench/step_throughput.py --model part_fvit_b --batch 82 --amp bf16   # a GPU

Defaults: part_fvit_mini (dim 192, depth 4, heads 3, 196 landmarks, full landmark CNN),
batch 16, 2 global + 8 local views, DINO out 4096. Paths run in rotating order within each round
so that a shared machine's load changes hit them alike; every figure is a median over --steps
rounds. Writes --out (markdown) and --json.
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_paths as SP  # noqa: E402
from gemm_peak import gemm_peak, profiled_gemm_rate  # noqa: E402


def amp_ctx(device, amp):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def parse_kv(items):
    out = {}
    for kv in items:
        if "=" not in kv:
            raise SystemExit(f"expected KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        out[k] = {"true": True, "false": False}.get(v.lower(), v)
    return out


class LafsPath:
    """fused / original / a fused variant: model, optimiser, and a model-only and a with-data runner."""

    def __init__(self, name, impl, args, payloads, options=None, amp=None):
        self.name, self.impl = name, impl
        self.options = dict(options or {})
        self.amp = amp or args.amp
        self.device = args.device
        SP.seed_all(args.seed)
        self.net, vcfg, self.dino, self.opt = SP.make_setup(
            args.model, args.batch, args.n_local, args.out_dim, device=args.device, seed=args.seed,
            original=impl == "original", **self.options)
        self.runners = {False: SP.StepRunner(impl, payloads, vcfg, False, args.device, args.seed),
                        True: SP.StepRunner(impl, payloads, vcfg, True, args.device, args.seed)}

    def step(self, with_data):
        return self.runners[with_data](self.net, self.dino, self.opt, amp_ctx(self.device, self.amp))

    def data(self):
        return self.runners[True].data()


class ReleasePath:
    """The release's own step (float32 on CPU: its autocast is CUDA's)."""

    def __init__(self, rel, args, payloads):
        import release_step as R
        self.name, self.impl, self.options = "release", "release", {}
        self.amp = "none" if args.device == "cpu" else args.amp
        cfg = model_dims(args.model)
        self.step_fn = R.ReleaseStep(rel, batch=args.batch, n_local=args.n_local, out_dim=args.out_dim,
                                     device=args.device, amp=self.amp, seed=args.seed, **cfg)
        self.data_fn = R.ReleaseData(rel, payloads, args.n_local, args.seed)
        self.device = args.device
        self.cached = self._to_device(self.data_fn())

    def _to_device(self, images):
        return [im.to(self.device) for im in images]

    def data(self):
        return self._to_device(self.data_fn())

    def step(self, with_data):
        stats = self.step_fn(self.data() if with_data else self.cached)
        return torch.tensor(stats["loss"])


def model_dims(model):
    """The ViT sizes of a lafs_fast preset, for building the release's classes at that size."""
    from lafs_fast.models import create_model
    c = create_model(model, landmarks="grid").config
    if c.get("cnn_width", 1.0) != 1.0 or c["patch_size"] != 8 or c["image_size"] != 112:
        raise ValueError(f"the release's step needs a preset with the release's landmark CNN, 8 px patches and "
                         f"112 px images; {model} has cnn_width {c.get('cnn_width')}, patch {c['patch_size']}")
    return dict(dim=c["dim"], depth=c["depth"], heads=c["heads"], dim_head=c["dim_head"], mlp_dim=c["mlp_dim"],
                num_landmarks=c["num_landmarks"])


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_step(path, with_data, clock="wall"):
    now = CLOCKS[clock]
    sync(path.device)
    t0 = now()
    loss = path.step(with_data)
    sync(path.device)
    dt = now() - t0
    if not torch.isfinite(loss):
        raise RuntimeError(f"{path.name}: non-finite loss")
    return dt


CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_overrideable", "aten::cudnn_convolution")


def profile_table(path, with_data=False, rows=20):
    """The op table of two profiled steps (per step), then the GEMMs' and convolutions' rates:
    the profiler's FLOP counts (GEMMs: their own events; convolutions: aten::conv2d's) over the
    kernels' self time."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if path.device == "cuda" else [])
    with profile(activities=acts, with_flops=True) as prof:
        for _ in range(2):
            path.step(with_data)
        sync(path.device)
    cpu = path.device == "cpu"
    t_of = (lambda e: e.self_cpu_time_total) if cpu else (lambda e: getattr(e, "self_device_time_total", 0))
    ev = sorted(prof.key_averages(), key=t_of, reverse=True)
    total = sum(t_of(e) for e in ev)
    lines = ["| op | self time ms / step | share | calls / step |", "|---|---:|---:|---:|"]
    for e in ev[:rows]:
        lines.append(f"| `{e.key}` | {t_of(e) / 2e3:.1f} | {100 * t_of(e) / max(total, 1):.1f}% | {e.count // 2} |")
    lines.append(f"| total (self time of all ops) | {total / 2e3:.1f} | 100% | |")
    rates = []
    gflop, ms, rate = profiled_gemm_rate(ev)
    if gflop and cpu:
        rates.append(f"GEMMs (mm, addmm, bmm): {gflop / 2:.1f} GFLOP per step in {ms / 2:.0f} ms, "
                     f"**{rate:.0f} GFLOP/s**")
    conv_us = sum(t_of(e) for e in ev if e.key in CONV_OPS)
    conv_flops = sum(e.flops for e in ev if e.key == "aten::conv2d")
    if conv_us and conv_flops:
        rates.append(f"convolutions: {conv_flops / 2e9:.1f} GFLOP per step in {conv_us / 2e3:.0f} ms, "
                     f"**{conv_flops / conv_us / 1e3:.0f} GFLOP/s**")
    if rates:
        lines += ["", "Rates (profiler FLOP counts over self time): " + "; ".join(rates) + "."]
    return "\n".join(lines)


def machine_info(device):
    info = {"threads": torch.get_num_threads(), "torch": torch.__version__, "device": device,
            "python": platform.python_version()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", "?").strip()
        flags = fields.get("Flags", "").split()
        info["cpu_flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16") if f in flags]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["load_before"] = os.getloadavg()
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="part_fvit_mini")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n-local", type=int, default=8)
    ap.add_argument("--out-dim", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5, help="timed rounds (each round steps every path once per mode)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", default=None, choices=["none", "bf16"], help="fused and original paths (default: "
                    "bf16 on CUDA, none on CPU)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", default="wall", choices=list(CLOCKS),
                    help="wall: elapsed time; cpu: this process's CPU time (with --threads 1, robust to other "
                         "processes' load on a shared machine)")
    ap.add_argument("--release", default=os.environ.get("LAFS_RELEASE", ""),
                    help="checkout of the authors' release: adds its own step (bench/release_step.py)")
    ap.add_argument("--no-original", action="store_true", help="skip the re-creation")
    ap.add_argument("--modes", default="model,data", help="comma list of: model (model only), data (with data)")
    ap.add_argument("--profile", default="fused", help="comma list of paths to profile (model only), or none")
    ap.add_argument("--no-profile", action="store_true", help="same as --profile none")
    ap.add_argument("--fused", action="append", default=[], metavar="KEY=VALUE",
                    help="PretrainConfig options for the fused path (repeatable), e.g. fast_dropout=false")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                    help="an extra fused path with these options (amp=bf16 sets its autocast), e.g. bf16:amp=bf16")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "step_throughput.md"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.amp = args.amp or ("bf16" if args.device == "cuda" else "none")
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("model", "data") for m in modes):
        raise SystemExit(f"--modes takes model and/or data, got {args.modes!r}")
    machine = machine_info(args.device)
    payloads = SP.face_bytes(args.batch, args.seed)

    paths = []
    if args.release:
        import release_step as R
        try:
            rel = R.load_release(args.release)
            paths.append(ReleasePath(rel, args, payloads))
        except (R.ReleaseUnavailable, ValueError) as e:
            print(f"release path skipped: {e}", flush=True)
    if not args.no_original:
        paths.append(LafsPath("original", "original", args, payloads))
    paths.append(LafsPath("fused", "fused", args, payloads, parse_kv(args.fused)))
    for spec in args.variant:
        name, _, kvs = spec.partition(":")
        opts = parse_kv([kv for kv in kvs.split(",") if kv])
        amp = opts.pop("amp", None)
        paths.append(LafsPath(name, "fused", args, payloads, {**parse_kv(args.fused), **opts}, amp))

    times = {(p.name, m): [] for p in paths for m in modes}
    for r in range(args.warmup + args.steps):
        order = paths[r % len(paths):] + paths[:r % len(paths)]
        for m in modes:
            for p in order:
                dt = time_step(p, m == "data", args.clock)
                if r >= args.warmup:
                    times[(p.name, m)].append(dt)
        done = "warm-up" if r < args.warmup else f"round {r - args.warmup + 1}/{args.steps}"
        print(done + ": " + "  ".join(f"{p.name} {m} {times[(p.name, m)][-1] * 1e3:.0f} ms"
                                      for m in modes for p in paths if times[(p.name, m)]), flush=True)
    data_s = {}
    if "data" in modes:
        for p in paths:
            ds = []
            for _ in range(max(2, args.steps // 2)):
                t0 = CLOCKS[args.clock]()
                p.data()
                sync(args.device)
                ds.append(CLOCKS[args.clock]() - t0)
            data_s[p.name] = statistics.median(ds)
    try:
        machine["load_after"] = os.getloadavg()
    except OSError:
        pass

    results = []
    for p in paths:
        for m in modes:
            ts = times[(p.name, m)]
            med = statistics.median(ts)
            row = {"path": p.name, "with_data": m == "data", "median_s": med, "min_s": min(ts),
                   "images_per_s": args.batch / med, "steps": len(ts), "amp": p.amp, "options": p.options}
            if m == "data":
                row["data_s"] = data_s[p.name]
            results.append(row)
    by = {(r["path"], r["with_data"]): r for r in results}
    names = [p.name for p in paths]
    base = [b for b in ("release", "original") if b in names]

    if args.clock == "cpu":
        if args.device != "cpu":
            raise SystemExit("--clock cpu is for --device cpu")
        if torch.get_num_threads() != 1:
            print("warning: --clock cpu with several threads counts their spin-waits too; use --threads 1")
    desc = (f"{'CPU time' if args.clock == 'cpu' else 'wall time'}, {machine['threads']} threads, "
            f"torch {machine['torch']}, {args.device}")
    if "cpu" in machine:
        desc += f", {machine['cpu']} ({' '.join(machine.get('cpu_flags', []))})"
    if "load_before" in machine:
        desc += (f", load average {machine['load_before'][0]:.1f} before / "
                 f"{machine['load_after'][0]:.1f} after")
    md = [f"**LAFS pretraining step: {args.model}, batch {args.batch}, 2 + {args.n_local} views, "
          f"DINO out {args.out_dim}** ({desc}; median of {args.steps} interleaved rounds)", ""]
    head = "| path | amp |"
    sep = "|---|---|"
    for m in modes:
        label = "model only" if m == "model" else "with data"
        head += f" {label}: ms / step | images/s |"
        sep += "---:|---:|"
        if m == "data":
            head += " of which data ms |"
            sep += "---:|"
        for b in base:
            head += f" {label}: / {b} |"
            sep += "---:|"
    md += [head, sep]
    for p in paths:
        line = f"| {p.name} | {p.amp} |"
        for m in modes:
            r = by[(p.name, m == "data")]
            line += f" {r['median_s'] * 1e3:.0f} | {r['images_per_s']:.2f} |"
            if m == "data":
                line += f" {r['data_s'] * 1e3:.0f} |"
            for b in base:
                line += f" {by[(b, m == 'data')]['median_s'] / r['median_s']:.2f}x |"
        md.append(line)
    ratios, said = {}, []
    for p in paths:
        for b in base:
            if b != p.name:
                parts = []
                for m in modes:
                    key = f"{p.name}/{b}/{'model_only' if m == 'model' else 'with_data'}"
                    ratios[key] = by[(b, m == "data")]["median_s"] / by[(p.name, m == "data")]["median_s"]
                    parts.append(f"**{ratios[key]:.2f}x** {'model only' if m == 'model' else 'with data'}")
                said.append(f"{p.name} / {b}: " + ", ".join(parts))
    if said:
        md += ["", "Speed-ups (images/s ratios, same run): " + "; ".join(said) + "."]
    for p in paths:
        if p.options:
            md.append(f"{p.name} options: {p.options}")
    md.append("")
    md.append("Command: `python bench/step_throughput.py " + " ".join(
        a if a != args.release else "RELEASE" for a in (argv if argv is not None else sys.argv[1:])) + "`")
    prof = [] if args.no_profile else [s.strip() for s in args.profile.split(",") if s.strip() not in ("", "none")]
    for name in prof:
        match = [p for p in paths if p.name == name]
        if match:
            md += ["", f"Where the {name} step (model only) spends its time (torch.profiler, self time):", "",
                   profile_table(match[0])]
    if prof:
        # the step's widest GEMM: the global views' MLP, 32 x 197 tokens, 192 -> 768
        peaks = {str(dt).split(".")[1]: gemm_peak(dt, 6304, 192, 768, args.device)
                 for dt in (torch.float32, torch.bfloat16)}
        md += ["", "The same library's GEMM alone at the step's widest shape (6304 x 192 @ 192 x 768, best of 3): " +
               ", ".join(f"{k} **{v:.0f} GFLOP/s**" for k, v in peaks.items()) + "."]
    text = "\n".join(md) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "release"},
                       "release_given": bool(args.release), "machine": machine, "results": results,
                       "ratios": ratios}, f, indent=1)
    return ratios


if __name__ == "__main__":
    main()
