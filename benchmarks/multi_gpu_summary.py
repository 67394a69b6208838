#!/usr/bin/env python
"""Table of the multi-GPU runs in a results folder: step-1 loss against the TP=1 run, the loss
after resuming at another layout against the same-layout resume, throughput and memory."""
import glob
import json
import os
import sys


def load(path):
    rows = {}
    for line in open(path, encoding="utf-8"):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("kind") == "train":
            rows[r["step"]] = r
    return rows


def main(folder):
    runs = {os.path.basename(p)[: -len(".metrics.jsonl")]: load(p)
            for p in sorted(glob.glob(os.path.join(folder, "*.metrics.jsonl")))}
    print(f"{'run':18s} {'steps':>9s} {'loss@first':>11s} {'vs ref':>9s} {'loss@last':>10s} "
          f"{'tok/s (GPU total)':>18s} {'TFLOP/s/GPU':>11s} {'MFU':>6s} {'mem GB':>7s}")
    for name, rows in runs.items():
        if not rows:
            print(f"{name:18s} no steps logged")
            continue
        shape = name.split("-")[0]
        first, last = min(rows), max(rows)
        ref_name = f"{shape}-resume-2x2" if "resume" in name else f"{shape}-tp1"
        ref = runs.get(ref_name, {}).get(first)
        diff = f"{rows[first]['loss'] - ref['loss']:+.2e}" if ref and ref_name != name else "ref"
        steady = [rows[s] for s in rows if s > first + 4] or list(rows.values())
        mean = lambda k: sum(r.get(k) or 0 for r in steady) / len(steady)
        print(f"{name:18s} {first:>4d}-{last:<4d} {rows[first]['loss']:11.5f} {diff:>9s} {rows[last]['loss']:10.5f} "
              f"{mean('tokens_per_s'):18,.0f} {mean('tflops'):11.1f} {mean('mfu'):6.1%} {mean('mem_gb'):7.1f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
