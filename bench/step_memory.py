"""Peak memory of one LAFS pretraining step: lafs_fast's fused path, the same step with the
reference (plain PyTorch) op backend, and the re-created original step (bench/step_paths.py).

Each path runs in its own process. CPU: resident memory sampled every 2 ms by a thread (malloc
set to return large blocks at once, see main); the
figure is the peak during the steps minus the resident memory just before them (model, optimiser
state after a warm-up step, and data already in place), i.e. what a step itself needs. CUDA:
torch.cuda.max_memory_allocated over the steps minus the allocation before them.

    python bench/step_memory.py                       # part_fvit_mini, batch 16 (CPU)
    python bench/step_memory.py --model part_fvit_b --batch 64    # on a GPU
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PATHS = {"fused": ("fused", {}), "fused_reference_op": ("fused", {"backend": "reference"}),
         "original": ("original", {})}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler(threading.Thread):
    def __init__(self, period=0.002):
        super().__init__(daemon=True)
        self.period, self.peak, self.running = period, rss_bytes(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.period)

    def stop(self):
        self.running = False
        self.join()
        return max(self.peak, rss_bytes())


def measure(name, args):
    """Runs in the child process: one path's step peak (bytes over the pre-step baseline)."""
    import torch
    sys.path.insert(0, HERE)
    import step_paths as SP
    impl, overrides = PATHS[name]
    device = args.device
    SP.seed_all(0)
    net, vcfg, dino, opt = SP.make_setup(args.model, args.batch, args.n_local, args.out_dim, device=device,
                                         original=impl == "original", **overrides)
    run = SP.StepRunner(impl, SP.face_bytes(args.batch), vcfg, with_data=False, device=device)
    amp = torch.autocast(device, dtype=torch.bfloat16) if args.amp == "bf16" else contextlib.nullcontext()
    run(net, dino, opt, amp)  # warm-up: optimiser state and allocator caches exist from here on
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
        sampler = PeakSampler()
        sampler.start()
    for _ in range(args.steps):
        run(net, dino, opt, amp)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = sampler.stop()
    return {"path": name, "baseline_MB": base / 2**20, "step_peak_MB": (peak - base) / 2**20}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="part_fvit_mini")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n-local", type=int, default=8)
    ap.add_argument("--out-dim", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--amp", default="none", choices=["none", "bf16"])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(HERE, "step_memory.md"))
    args = ap.parse_args(argv)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    rows = []
    for name in PATHS:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name] + \
              [a for a in (argv if argv is not None else sys.argv[1:])]
        if "--device" not in cmd:
            cmd += ["--device", args.device]
        # Large blocks through mmap (fixed threshold): freed tensors leave the resident set at once,
        # so resident memory tracks live tensors instead of malloc's cached arenas.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(rows[-1], flush=True)
    fused = rows[0]["step_peak_MB"]
    md = [f"**Peak memory of one pretraining step: {args.model}, batch {args.batch}, 2 + {args.n_local} views, "
          f"DINO out {args.out_dim}, {args.device}, amp {args.amp}**", "",
          "| path | step peak MB (over baseline) | / fused | baseline MB |", "|---|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['path']} | {r['step_peak_MB']:.0f} | {r['step_peak_MB'] / fused:.2f}x "
                  f"| {r['baseline_MB']:.0f} |")
    text = "\n".join(md) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
