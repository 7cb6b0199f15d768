"""The research table: does LAFS pretraining help few-shot Part fViT on held-out ORL faces?

At equal finetuning budget and the same seeds, for k-shot (k = 1, 2) training subsets:
  scratch          supervised Part fViT from scratch (also the landmark CNN source)
  dino_grid        DINO-on-fViT: pretraining on a fixed 14x14-style grid, then finetuning
  lafs             LAFS pretraining (landmark CNN from `scratch`, shuffle + perturbation)
  lafs_no_shuffle  LAFS without landmark shuffle/subset
  lafs_no_perturb  LAFS without coordinate perturbation
plus the raw-pixel floor. Held-out ORL verification (subjects 31-40, 450 + 4500 pairs):
accuracy, AUC, TAR@FAR=1e-3, mean and spread over seeds. Writes bench/orl_fewshot.json and a
markdown table (bench/orl_fewshot.md).

    python bench/orl_fewshot.py --seeds 0,1,2 --shots 1,2      # about 20 min per (seed, shot)

Seeds can run in parallel processes (one core each): give each a --tag (it then writes
bench/orl_fewshot_<tag>.json) and combine them with `python bench/orl_fewshot.py --merge`.

`--amp bf16` runs every stage under bf16 autocast (the precision rules of docs/precision.md hold)
and `--methods` picks the rows; such runs merge only with runs of the same precision
(`--merge --amp bf16` writes bench/orl_fewshot_bf16.md).
"""
import argparse
import glob
import json
import os
import statistics
import sys

from lafs_fast.eval.orl import raw_pixel_orl
from lafs_fast.train import finetune, pretrain

VARIANTS = {
    "dino_grid": dict(landmarks="grid"),
    "lafs": dict(landmarks="cnn"),
    "lafs_no_shuffle": dict(landmarks="cnn", shuffle=False),
    "lafs_no_perturb": dict(landmarks="cnn", perturb_std=0.0),
}


def one(seed, shot, args, out):
    common = dict(seed=seed, progress=False, threads=args.threads, amp=args.amp)
    sup_kw = dict(fewshot=shot, epochs=args.finetune_epochs, batch_size=args.batch_size, lr=1e-3, scale=8.0,
                  margin=0.1, weight_decay=0.05, mixup_prob=0.0)  # the pipeline's few-shot settings
    sup = finetune.run(finetune.FinetuneConfig(**common, **sup_kw, out_dir=f"{out}/scratch"))
    rows = {"scratch": sup["eval"]}
    for name, kw in VARIANTS.items():
        if name not in args.methods:
            continue
        extra = {"landmark_init": sup["checkpoint"]} if kw["landmarks"] == "cnn" else {}
        pre = pretrain.run(pretrain.PretrainConfig(
            **common, **kw, **extra, epochs=args.pretrain_epochs, batch_size=30, n_local=4, out_dim=1024,
            head_hidden=512, head_bottleneck=256, out_dir=f"{out}/{name}_pre"))
        fin = finetune.run(finetune.FinetuneConfig(
            **common, **sup_kw, init=pre["checkpoint"],
            landmark_init=sup["checkpoint"] if kw["landmarks"] == "cnn" else "",
            out_dir=f"{out}/{name}"))
        rows[name] = fin["eval"]
    return rows


def flatten(report):
    """accuracy, AUC and TAR@FAR=1e-3 of a verification_report."""
    tar = next(v["tar"] for k, v in report["tar_at_far"].items() if float(k) == 1e-3)
    return {"accuracy": report["accuracy"], "auc": report["auc"], "tar_1e-3": tar}


def table(results, floor):
    lines = ["| method | shots | accuracy | AUC | TAR@FAR=1e-3 | seeds |", "|---|---:|---:|---:|---:|---:|"]
    f = flatten(floor)
    lines.append(f"| raw pixels (floor) | - | {f['accuracy']:.4f} | {f['auc']:.4f} | {f['tar_1e-3']:.4f} | - |")
    for (method, shot), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        def ms(key):
            vals = [r[key] for r in runs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):.4f} +- {sd:.4f}"
        lines.append(f"| {method} | {shot} | {ms('accuracy')} | {ms('auc')} | {ms('tar_1e-3')} | {len(runs)} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--shots", default="1,2")
    ap.add_argument("--finetune-epochs", type=int, default=120)
    ap.add_argument("--pretrain-epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out-dir", default="runs/orl_fewshot")
    ap.add_argument("--tag", default="", help="write bench/orl_fewshot_<tag>.json (parallel runs)")
    ap.add_argument("--results-dir", default=None, help="folder of the .json / .md files (default: bench/)")
    ap.add_argument("--merge", action="store_true", help="combine bench/orl_fewshot*.json into the table")
    ap.add_argument("--amp", default="none", choices=["none", "bf16"], help="autocast of every stage")
    ap.add_argument("--methods", default=",".join(VARIANTS),
                    help="pretrained rows to run (scratch always runs: it is the landmark CNN's source)")
    args = ap.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(VARIANTS))
    if unknown:
        ap.error(f"--methods: unknown {unknown} (choose from {', '.join(VARIANTS)})")
    here = args.results_dir or os.path.dirname(os.path.abspath(__file__))
    os.makedirs(here, exist_ok=True)
    if args.merge:
        return merge(here, args.amp)
    results, floor = {}, raw_pixel_orl()
    name = f"orl_fewshot_{args.tag}" if args.tag else "orl_fewshot"
    for seed in [int(s) for s in args.seeds.split(",")]:
        for shot in [int(s) for s in args.shots.split(",")]:
            for method, rep in one(seed, shot, args, f"{args.out_dir}/s{seed}_k{shot}").items():
                results.setdefault((method, shot), []).append(flatten(rep))
            md = table(results, floor)  # rewritten after every (seed, shot): partial runs still report
            with open(os.path.join(here, name + ".json"), "w") as f:
                json.dump({"args": vars(args), "floor": floor,
                           "results": {f"{m}@{k}": v for (m, k), v in results.items()}}, f, indent=1, default=float)
            with open(os.path.join(here, name + ".md"), "w") as f:
                f.write(md + "\n")
    print(md)


def merge(here, amp="none"):
    """One table from every bench/orl_fewshot*.json of precision `amp` (runs with the same budget
    only)."""
    results, floor, budget = {}, None, None
    for path in sorted(glob.glob(os.path.join(here, "orl_fewshot*.json"))):
        with open(path) as f:
            run = json.load(f)
        if run["args"].get("amp", "none") != amp:
            continue
        b = {k: run["args"][k] for k in ("finetune_epochs", "pretrain_epochs", "batch_size")}
        if budget is not None and b != budget:
            raise SystemExit(f"{path}: budget {b} differs from {budget}: not mergeable")
        budget, floor = b, run["floor"]
        for key, rows in run["results"].items():
            m, k = key.rsplit("@", 1)
            results.setdefault((m, int(k)), []).extend(rows)
    md = table(results, floor)
    with open(os.path.join(here, "orl_fewshot.md" if amp == "none" else f"orl_fewshot_{amp}.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    sys.exit(main())
