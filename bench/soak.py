"""Soak test (not part of CI): run real LAFS pretraining (`python -m lafs_fast.train pretrain`) for
a fixed wall time, sample its resident memory and step count every few seconds, then stop it and
report whether memory stays flat and images/s steady. Writes bench/soak.md, bench/soak.json and
bench/soak.png (memory and images/s over time).

    python bench/soak.py --minutes 20                 # CPU, part_fvit_tiny, grid landmarks

Flat memory: the least-squares slope of resident memory after the first 10 % of the run (warm-up:
allocator pools, the first checkpoint) in MB per hour, and max - min over that window.
Steady speed: images/s over trailing --window seconds, its coefficient of variation after warm-up, and the
first-vs-last-quarter ratio.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def rss_mb(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def last_step(metrics_path):
    """The newest step in metrics.jsonl (0 before the first line)."""
    try:
        with open(metrics_path, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written
        if "step" in rec:
            return int(rec["step"])
    return 0


def slope_per_hour(ts, ys):
    n = len(ts)
    if n < 2:
        return 0.0
    mt, my = sum(ts) / n, sum(ys) / n
    den = sum((t - mt) ** 2 for t in ts)
    return 0.0 if den == 0 else 3600 * sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / den


def plot(path, samples, rates):
    """Two stacked line charts (memory MB, images/s) against minutes, drawn with PIL."""
    from PIL import Image, ImageDraw
    W, H, pad = 900, 520, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    panels = [("resident memory (MB)", [(s["t"], s["rss_mb"]) for s in samples], (200, 30, 30)),
              ("images/s per window", rates, (30, 30, 200))]
    ph = (H - 3 * pad // 2) // 2
    tmax = max([s["t"] for s in samples] + [1e-9])
    for i, (title, pts, color) in enumerate(panels):
        top = pad // 2 + i * (ph + pad // 2)
        d.rectangle([pad, top, W - 20, top + ph], outline="black")
        d.text((pad + 5, top + 3), title, fill="black")
        if len(pts) < 2:
            continue
        lo, hi = min(y for _, y in pts), max(y for _, y in pts)
        lo, hi = (lo - 1, hi + 1) if hi - lo < 1e-6 else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        xy = [(pad + (W - 20 - pad) * t / tmax, top + ph - ph * (y - lo) / (hi - lo)) for t, y in pts]
        d.line(xy, fill=color, width=2)
        d.text((5, top), f"{hi:.0f}", fill="black")
        d.text((5, top + ph - 12), f"{lo:.0f}", fill="black")
    d.text((pad, H - 18), f"0 .. {tmax / 60:.1f} min", fill="black")
    img.save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--every", type=float, default=5.0, help="sampling period in seconds")
    ap.add_argument("--window", type=float, default=60.0, help="images/s averaging window in seconds")
    ap.add_argument("--batch", type=int, default=30)
    ap.add_argument("--model", default="part_fvit_tiny")
    ap.add_argument("--out", default=os.path.join(HERE, "soak"))
    ap.add_argument("extra", nargs="*", help="more pretrain options after --")
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="lafs_soak_")
    cmd = [sys.executable, "-m", "lafs_fast.train", "pretrain", "--landmarks", "grid", "--model", args.model,
           "--batch-size", str(args.batch), "--epochs", "100000", "--log-every", "1", "--out-dir", work,
           "--progress", "false"] + args.extra
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = os.path.join(work, "metrics.jsonl")
    t0, samples = time.time(), []
    try:
        while time.time() - t0 < args.minutes * 60:
            time.sleep(args.every)
            if proc.poll() is not None:
                tail = proc.stderr.read().decode()[-2000:]
                raise SystemExit(f"training exited early (rc {proc.returncode}):\n{tail}")
            samples.append({"t": time.time() - t0, "rss_mb": rss_mb(proc.pid), "step": last_step(metrics)})
            print(f"{samples[-1]['t'] / 60:5.1f} min  {samples[-1]['rss_mb']:7.1f} MB  step {samples[-1]['step']}",
                  flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    # images/s over trailing windows of --window seconds (a step lasts several samples)
    rates, j = [], 0
    for s in samples:
        while j + 1 < len(samples) and s["t"] - samples[j + 1]["t"] >= args.window:
            j += 1
        a = samples[j]
        if s["t"] - a["t"] >= args.window:
            rates.append((s["t"], (s["step"] - a["step"]) * args.batch / (s["t"] - a["t"])))
    warm = samples[0]["t"] + 0.1 * (samples[-1]["t"] - samples[0]["t"])
    steady = [s for s in samples if s["t"] >= warm and s["step"] > 0]
    steady_rates = [r for t, r in rates if t >= warm]
    q = max(1, len(steady_rates) // 4)
    summary = {
        "command": " ".join(cmd[1:]), "minutes": samples[-1]["t"] / 60, "steps": samples[-1]["step"],
        "images": samples[-1]["step"] * args.batch,
        "rss_start_mb": steady[0]["rss_mb"], "rss_end_mb": steady[-1]["rss_mb"],
        "rss_range_mb": max(s["rss_mb"] for s in steady) - min(s["rss_mb"] for s in steady),
        "rss_slope_mb_per_hour": slope_per_hour([s["t"] for s in steady], [s["rss_mb"] for s in steady]),
        "images_per_s_mean": statistics.mean(steady_rates),
        "images_per_s_cv": statistics.pstdev(steady_rates) / max(1e-9, statistics.mean(steady_rates)),
        "last_vs_first_quarter": statistics.mean(steady_rates[-q:]) / max(1e-9, statistics.mean(steady_rates[:q])),
    }
    with open(args.out + ".json", "w") as f:
        json.dump({"summary": summary, "samples": samples}, f, indent=1)
    plot(args.out + ".png", samples, rates)
    md = ["| measure | value |", "|---|---:|"] + [
        f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
