"""Turn a pytest-benchmark JSON into markdown tables with ratios to the fused path, and the op's
targets (fused forward / bare GEMM <= 1.15, vectorised fwd+bwd / fused fwd+bwd >= 1.4, fused
forward / (landmark_patches + torch.addmm) <= 0.9 at 1 and 2 threads).

    python bench/report.py bench/ops.json [--baseline fused]
"""
import argparse
import json
import platform
from collections import defaultdict

# (numerator impl, denominator impl, group prefix, target, "<=" or ">=")
TARGETS = [("fused", "bare_gemm", "forward ", 1.15, "<="),
           ("vectorised", "fused", "forward+backward ", 1.4, ">=")]


def impl_name(bench):
    return bench["params"].get("impl") or bench["name"].split("[")[0]


def grouped(data):
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    return groups


def tables(data, baseline="fused"):
    lines = []
    for group, benches in grouped(data).items():
        base = next((b for b in benches if impl_name(b) == baseline), None)
        base_t = base["stats"]["median"] if base else None
        lines += [f"**{group}**", "", "| implementation | median ms | min ms | time / fused | extra |",
                  "|---|---:|---:|---:|---|"]
        for b in sorted(benches, key=lambda b: b["stats"]["median"]):
            s = b["stats"]
            ratio = f"{s['median'] / base_t:.2f}x" if base_t else "-"
            info = {k: v for k, v in b.get("extra_info", {}).items()
                    if k not in ("cpu_model", "cpu_isa", "threads", "load_1min")}  # printed once, above
            if "traffic_floor_MB" in info:  # achieved bandwidth against the memory-traffic floor
                info["GB/s"] = round(info["traffic_floor_MB"] * 2**20 / s["median"] / 1e9, 1)
            extra = ", ".join(f"{k} {v}" for k, v in info.items())
            lines.append(f"| {impl_name(b)} | {s['median'] * 1e3:.2f} | {s['min'] * 1e3:.2f} | {ratio} | {extra} |")
        lines.append("")
    return "\n".join(lines)


def targets(data):
    """The two op targets per shape, from medians and from minima (the min is the least
    disturbed by other processes on a shared machine)."""
    lines = ["| target | shape | ratio (medians) | ratio (minima) | met (medians) |", "|---|---|---:|---:|---|"]
    for num, den, prefix, goal, sense in TARGETS:
        for group, benches in grouped(data).items():
            if not group.startswith(prefix):
                continue
            by = {impl_name(b): b["stats"] for b in benches}
            if num not in by or den not in by:
                continue
            med = by[num]["median"] / by[den]["median"]
            mn = by[num]["min"] / by[den]["min"]
            met = med <= goal if sense == "<=" else med >= goal
            lines.append(f"| {num} / {den} {sense} {goal} | {group[len(prefix):]} | {med:.2f} | {mn:.2f} | "
                         f"{'yes' if met else 'NO'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def interleaved(data):
    """The targets measured alternately (test_target_interleaved): median and quartiles of the
    per-round ratios."""
    rows = [b for b in data["benchmarks"] if "ratio_median" in b.get("extra_info", {})]
    if not rows:
        return ""
    lines = ["| target | shape | threads | ratio, median of rounds | quartiles | min-max | rounds | load | met |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for b in rows:
        e = b["extra_info"]
        sense, goal = e["goal"].split()
        med = e["ratio_median"]
        met = med <= float(goal) if sense == "<=" else med >= float(goal)
        shape = b["group"].split()[-1]
        spread = f"{e['ratio_min']:.2f}-{e['ratio_max']:.2f}" if "ratio_min" in e else "-"
        lines.append(f"| {e['ratio']} {e['goal']} | {shape} | {e.get('threads', '?')} | {med:.2f} | "
                     f"{e['ratio_q1']:.2f}-{e['ratio_q3']:.2f} | {spread} | {e['rounds']} | "
                     f"{e.get('load_1min', '?')} | {'yes' if met else 'NO'} |")
    return "\n".join(lines)


def machine_line(data):
    mi = data.get("machine_info", {})
    extra = next((b.get("extra_info", {}) for b in data["benchmarks"] if "cpu_isa" in b.get("extra_info", {})), {})
    model = extra.get("cpu_model") or mi.get("cpu", {}).get("brand_raw", platform.processor())
    isa = f", CPU kernel path {extra['cpu_isa']}" if "cpu_isa" in extra else ""
    threads = f", {extra['threads']} torch threads" if "threads" in extra else ""
    return (f"Machine: {model}, {mi.get('cpu', {}).get('count', '?')} cores{isa}{threads}, "
            f"Python {mi.get('python_version')}; {data.get('datetime', '')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json")
    ap.add_argument("--baseline", default="fused")
    args = ap.parse_args()
    data = json.load(open(args.json))
    print(machine_line(data) + "\n")
    t = interleaved(data)
    if t:
        print("Targets, timed alternately (A B B A per round; the ratios to quote on a loaded machine):\n\n" + t + "\n")
    t = targets(data)
    if t:
        print("Targets, from the separate benchmarks below:\n\n" + t + "\n")
    data = {**data, "benchmarks": [b for b in data["benchmarks"] if "ratio_median" not in b.get("extra_info", {})]}
    print(tables(data, args.baseline))


if __name__ == "__main__":
    main()
