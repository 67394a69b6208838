"""Draw loss curves per task from an experiment's metrics.jsonl to a PNG.

    python -m megatron_ualm.training.plot runs/ualm [--out loss.png]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict


def read_metrics(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"{path}:{lineno}: skipped a malformed line (a run killed mid-write?)", file=sys.stderr)
    return rows


def plot_losses(metrics_path: str, out_path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(lambda: ([], []))
    for r in read_metrics(metrics_path):
        for key, value in r.items():
            if value is None or not (key == "loss" or key.startswith("loss/")):
                continue
            name = f"{r.get('kind', 'train')}:{key}"
            series[name][0].append(r["step"])
            series[name][1].append(value)
    if not series:
        raise ValueError(f"{metrics_path} holds no loss values yet")
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, (x, y) in sorted(series.items()):
        ax.plot(x, y, label=name, linewidth=2 if name.endswith(":loss") else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment_dir")
    p.add_argument("--out", default=None, help="PNG path (default: <experiment_dir>/loss.png)")
    a = p.parse_args(argv)
    metrics = os.path.join(a.experiment_dir, "logs", "metrics.jsonl")
    if not os.path.exists(metrics):
        sys.exit(f"{metrics} not found: is {a.experiment_dir} an experiment directory?")
    print(plot_losses(metrics, a.out or os.path.join(a.experiment_dir, "loss.png")))


if __name__ == "__main__":
    main()
