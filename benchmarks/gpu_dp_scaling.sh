#!/usr/bin/env bash
# Data-parallel scaling of the real trainer, 1.5B shape: DP=1 on one GPU against DP=2 on two,
# same global batch (default 16 x 4096: 8 micro-batches of 2 per step on one GPU, 4 per GPU
# at DP=2), DP=2 with the gradient reduce and the parameter all-gather overlapped. Results and
# the summary table under ${OUT:-benchmarks/results}.
set -uo pipefail
OUT="${OUT:-benchmarks/results}"; R="${RUNS:-/tmp/ualm-runs}"; mkdir -p "$OUT" "$R"
GBS="${GBS:-16}"; ITERS="${ITERS:-10}"; D="$R/data-1.5b"; NS="${NS:-1 2}"; LIMIT="${LIMIT:-200}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/dp_card.txt"
source benchmarks/multi_gpu_run.sh
for n in $NS; do
  go "1.5b-dp$n-gbs$GBS" "$n" "$LIMIT" --shape 1.5b --iters "$ITERS" --data "$D" \
    training.global_batch_size="$GBS" parallel.overlap_grad_reduce=true \
    parallel.overlap_param_gather="$([[ $n == 2 ]] && echo true || echo false)"
done
python - "$OUT" "$GBS" <<'PY'
import json, statistics, sys
out, gbs = sys.argv[1], sys.argv[2]
tps = {}
for n in (1, 2):
    try:
        rows = [json.loads(l) for l in open(f"{out}/1.5b-dp{n}-gbs{gbs}.metrics.jsonl") if '"train"' in l]
    except OSError:
        continue
    steady = [r["tokens_per_s"] for r in rows if r["step"] > 3]
    tps[n] = statistics.median(steady)
    print(f"DP={n}: median tokens/s over steps 4+: {tps[n]:,.0f}; step-1 loss {rows[0]['loss']:.5f}; "
          f"last loss {rows[-1]['loss']:.5f}")
if len(tps) == 2:
    print(f"scaling DP=2 / DP=1: {tps[2] / tps[1]:.2f}x")
PY
