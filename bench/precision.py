"""What mixed precision costs and changes in LAFS pretraining (docs/precision.md).

  landmarks  the frozen landmark CNN's landmarks under bf16 / fp16 autocast against float32, on
             real faces (the 400 ORL faces and the clean copies of their LAFS views), as the
             pretraining step runs it (eval mode, BatchNorm folded): mean / p99 / max px distance.
  step       CPU time of one LAFS pretraining step (bench/step_paths.py's fused step) in float32
             and under bf16 autocast with each precision choice: the frozen CNN's trunk in float32
             or bf16, the DINO head's last layer in float32 or bf16; plus each part alone (the CNN
             on all views, the last layer forward + backward). Paths interleave round by round,
             medians over --rounds, so a shared machine's load hits them alike.

    python bench/precision.py landmarks --checkpoint runs/orl/model.pt
    python bench/precision.py step --threads 1 --out-dim 100000
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lafs_fast import views  # noqa: E402
from lafs_fast.data import load_orl, to_model_input  # noqa: E402
from lafs_fast.models.landmark_cnn import LandmarkCNN  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def machine():
    info = {"threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    try:
        fields = dict(line.split(":", 1) for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", "?").strip()
        flags = fields.get("Flags", "").split()
        info["cpu_flags"] = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16") if f in flags]
    except (OSError, subprocess.SubprocessError):
        pass
    info["load"] = os.getloadavg()
    return info


# ----------------------------------------------------------------------------- landmarks
def frozen_cnn(checkpoint, num_landmarks, seed):
    """The pretraining's landmark source: a trained CNN from a checkpoint, or a fresh one."""
    if checkpoint:
        from lafs_fast.checkpoint import load_landmark_cnn
        cnn = load_landmark_cnn(checkpoint)
    else:
        torch.manual_seed(seed)
        cnn = LandmarkCNN(num_landmarks, 112)
    cnn.freeze_()
    return cnn


def face_inputs(n_views_of, seed):
    """The 400 ORL faces in [-1, 1], and the clean copies of the LAFS views of the first
    n_views_of faces (2 global + 8 local each, the release's crops and flips)."""
    images, _ = load_orl()
    faces = to_model_input(images)
    v = views.make_lafs_views(images[:n_views_of], views.ViewConfig(),
                              generator=torch.Generator().manual_seed(seed))
    return {"faces": faces, "views": torch.cat([v.clean_global, v.clean_local])}


def landmarks_of(cnn, x, amp, chunk=64):
    out = []
    for part in x.split(chunk):
        with torch.no_grad():
            if amp == "fp32":
                cnn.float32 = True
                out.append(cnn(part))
            else:
                cnn.float32 = False
                with torch.autocast("cpu", dtype=DTYPES[amp]):
                    out.append(cnn(part))
    cnn.float32 = True
    return torch.cat(out).float()


def compare_landmarks(args):
    cnn = frozen_cnn(args.checkpoint, args.num_landmarks, args.seed)
    rows = []
    for name, x in face_inputs(args.views_of, args.seed).items():
        ref = landmarks_of(cnn, x, "fp32")
        for amp in args.amps:
            d = (landmarks_of(cnn, x, amp) - ref).norm(dim=-1).flatten()
            rows.append({"inputs": name, "images": x.shape[0], "amp": amp, "mean_px": d.mean().item(),
                         "median_px": d.median().item(), "p99_px": d.quantile(0.99).item(),
                         "max_px": d.max().item(),
                         "spread_px": ref.std(dim=1).mean().item()})
    source = ("checkpoint " + os.path.basename(args.checkpoint) if args.checkpoint
              else f"a fresh CNN (seed {args.seed})")
    md = [f"**Frozen landmark CNN under autocast vs float32** ({source}, "
          f"{cnn.num_landmarks} landmarks, BatchNorm folded, eval mode; distance per landmark in px at 112 px)", "",
          "| inputs | images | autocast | mean px | median px | p99 px | max px |",
          "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['inputs']} | {r['images']} | {r['amp']} | {r['mean_px']:.4f} | {r['median_px']:.4f} | "
                  f"{r['p99_px']:.4f} | {r['max_px']:.4f} |")
    return rows, md


# ----------------------------------------------------------------------------- step time
def step_paths(args):
    """name -> (net, dino, opt, runner, autocast dtype or None), each path built alike."""
    import step_paths as SP
    payloads = SP.face_bytes(args.batch, args.seed)
    choices = {"fp32": (None, True, True), "bf16, CNN fp32 + last layer fp32": ("bf16", True, True),
               "bf16, CNN bf16 + last layer fp32": ("bf16", False, True),
               "bf16, CNN fp32 + last layer bf16": ("bf16", True, False),
               "bf16, CNN bf16 + last layer bf16": ("bf16", False, False)}
    paths = {}
    for name, (amp, cnn32, head32) in choices.items():
        SP.seed_all(args.seed)
        net, vcfg, dino, opt = SP.make_setup(args.model, args.batch, args.n_local, args.out_dim, seed=args.seed)
        net.landmark_cnn.float32 = cnn32
        net.student_head.float32_last_layer = net.teacher_head.float32_last_layer = head32
        paths[name] = (net, dino, opt, SP.StepRunner("fused", payloads, vcfg, False, "cpu", args.seed), amp)
    return paths


def amp_ctx(amp):
    import contextlib
    return torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def part_timers(args):
    """Each precision choice's part alone, on a path of its own: the frozen CNN on all views'
    clean copies, the DINO head forward + backward."""
    import step_paths as SP
    SP.seed_all(args.seed)
    net = SP.make_setup(args.model, args.batch, args.n_local, args.out_dim, seed=args.seed)[0]
    runner = SP.StepRunner("fused", SP.face_bytes(args.batch, args.seed), views.ViewConfig(n_local=args.n_local),
                           False, "cpu", args.seed)
    clean = torch.cat([runner.cached.clean_global, runner.cached.clean_local])
    cnn, head = net.landmark_cnn, net.student_head
    rows = clean.shape[0] + 2 * args.batch  # the student's views and the teacher's global views
    h = torch.randn(rows, head.mlp[0].in_features)

    def cnn_call(f32):
        def run():
            cnn.float32 = f32
            with amp_ctx("bf16"):
                net.landmarks(clean)
        return run

    def head_call(f32):
        def run():
            head.float32_last_layer = f32
            with amp_ctx("bf16"):
                out = head(h)
            out.float().sum().backward()
        return run

    return {f"frozen CNN on {clean.shape[0]} views, trunk fp32": cnn_call(True),
            f"frozen CNN on {clean.shape[0]} views, trunk bf16": cnn_call(False),
            f"DINO head on {rows} rows fwd+bwd, last layer fp32": head_call(True),
            f"DINO head on {rows} rows fwd+bwd, last layer bf16": head_call(False)}


def time_steps(args):
    paths = step_paths(args)
    parts = part_timers(args)
    timers = {name: (lambda p=p: p[3](p[0], p[1], p[2], amp_ctx(p[4]))) for name, p in paths.items()}
    timers.update(parts)
    names = list(timers)
    times = {n: [] for n in names}
    uptimes = [subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    for r in range(args.warmup + args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.process_time()
            timers[n]()
            dt = time.process_time() - t0
            if r >= args.warmup:
                times[n].append(dt)
        print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names if times[n]),
              flush=True)
    uptimes.append(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    base = statistics.median(times["fp32"])
    bf16 = statistics.median(times["bf16, CNN fp32 + last layer fp32"])
    rows = [{"path": n, "median_ms": statistics.median(times[n]) * 1e3, "min_ms": min(times[n]) * 1e3,
             "rounds": len(times[n])} for n in names]
    md = [f"**CPU time per call, {args.model}, batch {args.batch}, 2 + {args.n_local} views, DINO out "
          f"{args.out_dim}** (median of {args.rounds} interleaved rounds)", "",
          "| what | ms (median) | ms (min) | vs fp32 step | vs bf16 step (CNN + last layer fp32) |",
          "|---|---:|---:|---:|---:|"]
    for r in rows:
        rel = (f"{r['median_ms'] / 1e3 / base:.3f}x | {r['median_ms'] / 1e3 / bf16:.3f}x"
               if r["path"] in paths else " | ")
        md.append(f"| {r['path']} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | {rel} |")
    md += ["", "uptime before: `" + uptimes[0] + "`", "", "uptime after: `" + uptimes[1] + "`"]
    return rows, md


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["landmarks", "step"])
    ap.add_argument("--checkpoint", default="", help="landmarks: a checkpoint holding a trained landmark CNN "
                                                    "(ours or the release's); none: a fresh one")
    ap.add_argument("--num-landmarks", type=int, default=196)
    ap.add_argument("--views-of", type=int, default=40, help="landmarks: faces whose LAFS views are compared too")
    ap.add_argument("--amps", default="bf16,fp16")
    ap.add_argument("--model", default="part_fvit_mini")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n-local", type=int, default=8)
    ap.add_argument("--out-dim", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="markdown file (default: print only)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    args.amps = [a for a in args.amps.split(",") if a]
    torch.set_num_threads(args.threads)
    info = machine()
    rows, md = compare_landmarks(args) if args.what == "landmarks" else time_steps(args)
    info["load_after"] = os.getloadavg()
    md += ["", f"{info.get('cpu', '?')} ({' '.join(info.get('cpu_flags', []))}), {info['threads']} thread(s), "
               f"torch {info['torch']}, load average {info['load'][0]:.1f} before / {info['load_after'][0]:.1f} after",
           "", "Command: `python bench/precision.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`"]
    text = "\n".join(md) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
