#!/usr/bin/env bash
# The real trainer with the decoder's CUDA graphs on and off (training.cuda_graphs), tiny
# shape on one GPU: packed FlexAttention and dense-mask SDPA, a shape change in validation,
# a checkpoint saved at the end. Per-step losses must agree (they come from the same kernels).
# Results under ${OUT:-benchmarks/results}.
set -uo pipefail
OUT="${OUT:-benchmarks/results}"; R="${RUNS:-/tmp/ualm-runs}"; mkdir -p "$OUT" "$R"
ITERS="${ITERS:-20}"; D="$R/data-tiny"
source benchmarks/multi_gpu_run.sh
for backend in auto sdpa; do
  for graphs in true false; do
    go "tiny-$backend-graphs-$graphs" 1 240 --shape tiny --iters "$ITERS" --data "$D" --save \
      model.attention_backend="$backend" training.cuda_graphs="$graphs" training.eval_interval=10 \
      training.eval_iters=2 "data.valid=[{path: $D/text_only, task: text_only, weight: 1}]"
    grep -E "decoder CUDA graphs" "$OUT/tiny-$backend-graphs-$graphs.log" | tail -1 || true
  done
done
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
for backend in ("auto", "sdpa"):
    runs = {}
    for g in ("true", "false"):
        try:
            runs[g] = [json.loads(l) for l in open(f"{out}/tiny-{backend}-graphs-{g}.metrics.jsonl")]
        except OSError:
            print(f"{backend}: run with graphs={g} has no metrics"); break
    else:
        train = {g: [r["loss"] for r in rows if r.get("kind", "train") == "train" and "loss" in r] for g, rows in runs.items()}
        n = min(len(v) for v in train.values())
        diff = max(abs(a - b) for a, b in zip(train["true"][:n], train["false"][:n])) if n else float("nan")
        print(f"{backend}: {n} steps, losses {train['true'][0]:.5f} -> {train['true'][n-1]:.5f} with graphs, "
              f"{train['false'][0]:.5f} -> {train['false'][n-1]:.5f} without; max |difference| {diff:.2e}")
PY
