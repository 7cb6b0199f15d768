"""Embeddings at serving speed: batch-1 latency and batch-64 throughput of the face model's eval
forward, in one run, interleaved round by round:

  release   the authors' release's own model class (ViT_face_landmark_patch8 with its landmark
            CNN, imported from a checkout given by --release; this repo holds none of its code);
  float32   the same weights through lafs_fast.checkpoint.load_official, float32 eager;
  bf16      the same lafs_fast model under CPU bf16 autocast (python -m lafs_fast.embed --amp bf16);
  onnx      the same lafs_fast model exported by lafs_fast.export, run in onnxruntime;
  compiled  with --compile: the same lafs_fast model with its transformer blocks compiled
            (python -m lafs_fast.embed --compile; lafs_fast.models.compile), float32 and bf16;

then a torch.profiler split of lafs_fast's float32 forward into GEMM time (mm / addmm / bmm /
linear / matmul / SDPA's GEMMs), convolution time and the rest (with --compile, of the compiled
float32 forward too; its fused kernels count as the rest), the same for the bf16 forward
(compiled with --compile), the GEMMs' rate in each, and the library's GEMM rate alone at the
forward's widest shape (bench/gemm_peak.py). Writes --out (markdown) and --json.

    python bench/embed_throughput.py --release ../LAFS_CVPR2024           # part_fvit_b, 2 threads
    python bench/embed_throughput.py --release ../LAFS_CVPR2024 --threads 1 --clock cpu \
        --out bench/embed_throughput_cpu1.md --json bench/embed_throughput_cpu1.json
                            # CPU work only: robust to other processes on a shared machine

Fairness: one weight set for all four (random, from a seeded release model; the lafs_fast model
is loaded from the release's state dict and checked to give the same embeddings), the same
inputs, the same thread count (torch and onnxruntime), rotating order within each round. Without
the checkout (or without einops) the release's column is skipped and said so.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gemm_peak import gemm_peak, profiled_gemm_rate  # noqa: E402

# part_fvit_b (lafs_fast.models.registry), the release's supervised backbone size
SIZES = {"part_fvit_b": dict(dim=768, depth=12, heads=11, mlp_dim=2048),
         "part_fvit_mini": dict(dim=192, depth=4, heads=3, mlp_dim=768)}


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> set:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def release_model(path: str, size: dict, seed: int):
    """The release's supervised Part fViT (with_land=True: MobileNetV3 landmark CNN), eval mode;
    None (and the reason) without a checkout."""
    sys.path.insert(0, HERE)
    import release_step
    try:
        rel = release_step.load_release(path)
    except release_step.ReleaseUnavailable as e:
        return None, str(e)
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "no loss for vit_face"
        m = rel.vit_face.ViT_face_landmark_patch8(
            loss_type="None", GPU_ID=None, num_class=1, num_patches=196, image_size=112, patch_size=8,
            dim=size["dim"], depth=size["depth"], heads=size["heads"], mlp_dim=size["mlp_dim"],
            dropout=0.1, emb_dropout=0.1, with_land=True)
    return m.eval(), ""


def lafs_models(release, size: dict, seed: int, tmp: str):
    """lafs_fast's model with the release model's weights (through load_official); without a
    release model, a seeded lafs_fast model of the same size."""
    from lafs_fast.checkpoint import load_official
    from lafs_fast.models import create_model
    if release is not None:
        path = os.path.join(tmp, "release.pth")
        torch.save({"module." + k: v for k, v in release.state_dict().items()}, path)
        return load_official(path).eval()
    torch.manual_seed(seed)
    return create_model("part_fvit_b" if size["dim"] == 768 else "part_fvit_mini").eval()


def onnx_session(model, tmp: str, threads: int):
    import onnxruntime as ort

    from lafs_fast.export import export_onnx
    path = export_onnx(model, os.path.join(tmp, "model.onnx"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(["embedding"], {"image": x.numpy()})[0]


def compiled_model(lafs):
    """A copy of the lafs_fast model with its transformer blocks compiled (compiled at first use)."""
    import copy

    from lafs_fast.models.compile import compile_blocks
    model = copy.deepcopy(lafs)
    compile_blocks(model)
    return model


def runners(release, lafs, onnx, compiled=None):
    def eager(m, amp=None):
        def f(x):
            with torch.no_grad(), (torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()):
                return m(x).float()
        return f
    out = {}
    if release is not None:
        out["release (float32)"] = eager(release)
    out["lafs_fast float32"] = eager(lafs)
    out["lafs_fast bf16 autocast"] = eager(lafs, "bf16")
    if onnx is not None:
        out["lafs_fast ONNX (onnxruntime)"] = onnx
    if compiled is not None:
        out["lafs_fast float32 compiled"] = eager(compiled)
        out["lafs_fast bf16 compiled"] = eager(compiled, "bf16")
    return out


def compile_seconds(fns, x1, xb) -> dict:
    """Wall seconds of the compiled runners' first calls (batch 1 and batch B: one compilation
    each), before the timed rounds."""
    out = {}
    for name in [n for n in fns if n.endswith("compiled")]:
        t = time.perf_counter()
        fns[name](x1), fns[name](xb)
        out[name] = time.perf_counter() - t
    return out


def agreement(fns, x) -> dict:
    """Cosine similarity of each runner's embeddings with lafs_fast float32's (min over images)."""
    import numpy as np
    ref = torch.nn.functional.normalize(torch.as_tensor(np.asarray(fns["lafs_fast float32"](x))).float(), dim=1)
    out = {}
    for name, f in fns.items():
        e = torch.nn.functional.normalize(torch.as_tensor(np.asarray(f(x))).float(), dim=1)
        out[name] = float((e * ref).sum(1).min())
    return out


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure(fns, x1, xb, rounds: int, lat_reps: int, clock=time.perf_counter) -> dict:
    """Per round, each runner in rotating order: batch-1 latency (median of lat_reps calls) and
    one batch call. Returns {name: {"latency_ms": [...], "images_per_s": [...]}}."""
    names = list(fns)
    res = {n: {"latency_ms": [], "images_per_s": []} for n in names}
    for f in fns.values():  # warm-up (allocations, oneDNN primitives, ORT's first run)
        f(x1), f(xb)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            lat = []
            for _ in range(lat_reps):
                t = clock()
                fns[n](x1)
                lat.append(clock() - t)
            t = clock()
            fns[n](xb)
            dt = clock() - t
            res[n]["latency_ms"].append(statistics.median(lat) * 1e3)
            res[n]["images_per_s"].append(xb.shape[0] / dt)
        print(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {res[n]['images_per_s'][-1]:.1f} img/s" for n in names), file=sys.stderr, flush=True)
    return res


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
            "aten::_scaled_dot_product_flash_attention_for_cpu", "lafs_fast::landmark_patch_embed")
CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution", "aten::conv2d")


def profile_split(model, xb, amp=None) -> dict:
    """Self CPU time of lafs_fast's forward (float32, or under bf16 autocast) by kind: GEMMs (with
    SDPA and the fused patch op, whose time is its GEMM), convolutions (the landmark CNN),
    everything else (top ops); and the rate of the GEMMs the profiler counts FLOPs for (mm, addmm,
    bmm: not SDPA, not the patch op)."""
    from torch.profiler import ProfilerActivity, profile
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        model(xb)
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            t = time.perf_counter()
            model(xb)
            wall = time.perf_counter() - t
    events = prof.key_averages()
    gemm_gflop, gemm_ms, gemm_rate = profiled_gemm_rate(events)
    fused = "inductor's fused kernels (compiled blocks)"
    rows = {}
    for e in events:
        key = fused if e.key.startswith("## Call CompiledFxGraph") else e.key
        rows[key] = rows.get(key, 0.0) + e.self_cpu_time_total / 1e3
    rows = list(rows.items())
    kind = {"gemm": 0.0, "conv": 0.0, "other": 0.0}
    other = []
    for key, ms in rows:
        if key in GEMM_OPS:
            kind["gemm"] += ms
        elif key in CONV_OPS:
            kind["conv"] += ms
        else:
            kind["other"] += ms
            other.append((key, ms))
    other.sort(key=lambda kv: -kv[1])
    return {"wall_ms": wall * 1e3, "gemm_ms": kind["gemm"], "conv_ms": kind["conv"], "other_ms": kind["other"],
            "counted_gemm_gflop": round(gemm_gflop, 1), "counted_gemm_ms": round(gemm_ms, 1),
            "counted_gemm_gflops_per_s": round(gemm_rate, 1),
            "top_other": [(k, round(v, 1)) for k, v in other[:8]],
            "top_all": [(k, round(v, 1)) for k, v in sorted(rows, key=lambda kv: -kv[1])[:10]]}


def command_line(args) -> str:
    """This run's command, the release checkout's path written RELEASE."""
    words = [w if not args.release or w != args.release else "RELEASE" for w in sys.argv[1:]]
    return "python bench/embed_throughput.py " + " ".join(words)


def profile_lines(title, prof) -> list:
    g, c, o = prof["gemm_ms"], prof["conv_ms"], prof["other_ms"]
    return ["", f"{title} (torch.profiler, self CPU time, one call, {prof['wall_ms']:.0f} ms wall):", "",
            "| kind | ms | share |", "|---|---:|---:|",
            f"| GEMMs (mm/addmm/bmm/linear, SDPA, the fused patch op) | {g:.0f} | {g / (g + c + o):.0%} |",
            f"| convolutions (landmark CNN) | {c:.0f} | {c / (g + c + o):.0%} |",
            f"| everything else | {o:.0f} | {o / (g + c + o):.0%} |", "",
            f"Non-GEMM time / GEMM time: {(c + o) / g:.2f} (convolutions counted as non-GEMM), "
            f"{o / g:.2f} (without them). Largest other ops: "
            + ", ".join(f"{k} {v} ms" for k, v in prof["top_other"]) + ".",
            "", f"GEMM rate (mm, addmm, bmm: the profiler's FLOP counts over their self time): "
            f"{prof['counted_gemm_gflop']:.0f} GFLOP in {prof['counted_gemm_ms']:.0f} ms, "
            f"**{prof['counted_gemm_gflops_per_s']:.0f} GFLOP/s**."]


def markdown(args, res, agree, prof, notes, load, prof_compiled=None, prof_bf16=None, peaks=None) -> str:
    base = res.get("release (float32)") or res["lafs_fast float32"]
    base_name = "release (float32)" if "release (float32)" in res else "lafs_fast float32"
    base_ips = statistics.median(base["images_per_s"])
    lines = [f"# Face embeddings at serving speed ({args.model}, CPU)", "",
             f"Machine: {cpu_model()} ({'avx512_bf16' if 'avx512_bf16' in cpu_flags() else 'no avx512_bf16'}, "
             f"{'AMX' if 'amx_bf16' in cpu_flags() else 'no AMX'}), {os.cpu_count()} cores, {args.threads} threads "
             f"(torch and onnxruntime); torch {torch.__version__}; load average {load[0]:.1f} -> {load[1]:.1f} "
             f"during the run.", "",
             "Command:", "", f"    {command_line(args)}", "",
             f"Eval forward (landmark CNN + patches + ViT), 112x112 inputs, one weight set for all; {args.rounds} "
             f"interleaved rounds, each: batch-1 latency (median of {args.lat_reps} calls) and one batch-{args.batch} "
             f"call per path; medians over rounds, min-max in brackets; clock: "
             f"{'process CPU time (CPU work of all threads)' if args.clock == 'cpu' else 'wall'}.", "",
             f"| path | batch-1 latency ms | batch-{args.batch} images/s | vs {base_name} "
             "| 1 - cosine vs float32 (max) |",
             "|---|---:|---:|---:|---:|"]
    for n, r in res.items():
        lat, ips = r["latency_ms"], r["images_per_s"]
        lines.append(f"| {n} | {statistics.median(lat):.0f} ({min(lat):.0f}-{max(lat):.0f}) | "
                     f"{statistics.median(ips):.2f} ({min(ips):.2f}-{max(ips):.2f}) | "
                     f"{statistics.median(ips) / base_ips:.2f}x | {1 - agree.get(n, float('nan')):.1e} |")
    if prof:
        lines += profile_lines(f"Profile of lafs_fast's float32 forward at batch {args.batch}", prof)
    if prof_compiled:
        lines += profile_lines(f"Profile of lafs_fast's float32 forward with compiled blocks at batch {args.batch}",
                               prof_compiled)
    if prof_bf16:
        lines += profile_lines(f"Profile of lafs_fast's bf16 forward{' with compiled blocks' if args.compile else ''} "
                               f"at batch {args.batch}", prof_bf16)
    if peaks:
        lines += ["", "The same library's GEMM alone at the forward's widest shape "
                  f"({peaks['shape']}, best of 3, CPU time): "
                  + ", ".join(f"{k} **{v:.0f} GFLOP/s**" for k, v in peaks.items() if k != "shape") + "."]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--release", default=os.environ.get("LAFS_RELEASE", ""), help="checkout of the LAFS release")
    ap.add_argument("--model", default="part_fvit_b", choices=list(SIZES))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lat-reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", default="wall", choices=list(CLOCKS),
                    help="wall: elapsed time; cpu: this process's CPU time (with --threads 1, robust to "
                         "other processes' load)")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="also the model with compiled transformer blocks (float32 and bf16; compiled before the "
                         "timed rounds, its compilation time noted)")
    ap.add_argument("--out", default=os.path.join(HERE, "embed_throughput.md"))
    ap.add_argument("--json", default=os.path.join(HERE, "embed_throughput.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import lafs_fast.ops  # noqa: F401  (the compiled op, so the fused path is what is timed)
    load0 = os.getloadavg()[0]
    size = SIZES[args.model]
    notes = []
    release, why = release_model(args.release, size, args.seed)
    if release is None:
        notes.append(f"release column skipped: {why}")
    g = torch.Generator().manual_seed(args.seed + 1)
    xb = torch.rand(args.batch, 3, 112, 112, generator=g) * 2 - 1
    x1 = xb[:1].clone()
    with tempfile.TemporaryDirectory() as tmp:
        lafs = lafs_models(release, size, args.seed, tmp)
        onnx = None
        if not args.no_onnx:
            try:
                onnx = onnx_session(lafs, tmp, args.threads)
            except Exception as e:  # noqa: BLE001  (onnx/onnxruntime missing: say so, time the rest)
                notes.append(f"ONNX column skipped: {type(e).__name__}: {str(e)[:200]}")
        compiled = compiled_model(lafs) if args.compile else None
        fns = runners(release, lafs, onnx, compiled)
        compile_s = compile_seconds(fns, x1, xb)
        notes += [f"{name}: compiled in {sec:.0f} s (wall, batch 1 and batch {args.batch}, before the rounds)"
                  for name, sec in compile_s.items()]
        agree = agreement(fns, xb[:8])
        if release is not None and agree["release (float32)"] < 0.9999:
            notes.append(f"the release model and lafs_fast's disagree (cosine {agree['release (float32)']:.5f})")
        res = measure(fns, x1, xb, args.rounds, args.lat_reps, CLOCKS[args.clock])
        prof = None if args.no_profile else profile_split(lafs, xb)
        prof_compiled = None if args.no_profile or compiled is None else profile_split(compiled, xb)
        prof_bf16 = None if args.no_profile else profile_split(compiled or lafs, xb, amp="bf16")
    peaks = None
    if not args.no_profile:  # the MLP's first GEMM: batch x 197 tokens, dim -> mlp_dim
        m, k, n = args.batch * 197, size["dim"], size["mlp_dim"]
        peaks = {"shape": f"{m} x {k} @ {k} x {n}",
                 **{str(dt).split(".")[1]: gemm_peak(dt, m, k, n) for dt in (torch.float32, torch.bfloat16)}}
    load = (load0, os.getloadavg()[0])
    md = markdown(args, res, agree, prof, notes, load, prof_compiled, prof_bf16, peaks)
    with open(args.out, "w") as f:
        f.write(md)
    with open(args.json, "w") as f:
        json.dump({"cpu_model": cpu_model(), "threads": args.threads, "load": load, "args": vars(args),
                   "command": command_line(args), "results": res,
                   "cosine_vs_float32": agree, "profile": prof, "profile_compiled": prof_compiled,
                   "profile_bf16": prof_bf16, "gemm_peak_gflops_per_s": peaks,
                   "compile_seconds": compile_s, "notes": notes}, f, indent=1)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
