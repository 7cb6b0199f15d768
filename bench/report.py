"""Turn a pytest-benchmark JSON into markdown tables with ratios to the fused path.

    python bench/report.py bench/ops.json [--baseline fused]
"""
import argparse
import json
import platform
from collections import defaultdict


def impl_name(bench):
    return bench["params"].get("impl") or bench["name"].split("[")[0]


def tables(data, baseline="fused"):
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    lines = []
    for group, benches in groups.items():
        base = next((b for b in benches if impl_name(b) == baseline), None)
        base_t = base["stats"]["median"] if base else None
        lines += [f"**{group}**", "", "| implementation | median ms | min ms | time / fused | extra |",
                  "|---|---:|---:|---:|---|"]
        for b in sorted(benches, key=lambda b: b["stats"]["median"]):
            s = b["stats"]
            ratio = f"{s['median'] / base_t:.2f}x" if base_t else "-"
            info = dict(b.get("extra_info", {}))
            if "traffic_floor_MB" in info:  # achieved bandwidth against the memory-traffic floor
                info["GB/s"] = round(info["traffic_floor_MB"] * 2**20 / s["median"] / 1e9, 1)
            extra = ", ".join(f"{k} {v}" for k, v in info.items())
            lines.append(f"| {impl_name(b)} | {s['median'] * 1e3:.2f} | {s['min'] * 1e3:.2f} | {ratio} | {extra} |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json")
    ap.add_argument("--baseline", default="fused")
    args = ap.parse_args()
    data = json.load(open(args.json))
    mi = data.get("machine_info", {})
    print(f"Machine: {mi.get('cpu', {}).get('brand_raw', platform.processor())}, "
          f"{mi.get('cpu', {}).get('count', '?')} cores, Python {mi.get('python_version')}; "
          f"{data.get('datetime', '')}\n")
    print(tables(data, args.baseline))


if __name__ == "__main__":
    main()
