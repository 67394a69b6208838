#!/usr/bin/env bash
# Data-parallel scaling of the real trainer, 1.5B shape: DP=1 on one GPU against DP=2 on two,
# same global batch (default 16 x 4096: 8 micro-batches of 2 per step on one GPU, 4 per GPU
# at DP=2), DP=2 with the gradient reduce and the parameter all-gather overlapped. Runs use the
# trainer's defaults (decoder CUDA graphs on); the DP sizes in EAGER (default "2") also run
# with training.cuda_graphs=false for an A/B in the same call. Results and the summary table
# under ${OUT:-benchmarks/results}.
set -uo pipefail
OUT="${OUT:-benchmarks/results}"; R="${RUNS:-/tmp/ualm-runs}"; mkdir -p "$OUT" "$R"
GBS="${GBS:-16}"; ITERS="${ITERS:-10}"; D="$R/data-1.5b"; NS="${NS:-1 2}"; LIMIT="${LIMIT:-200}"
EAGER="${EAGER-2}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/dp_card.txt"
source benchmarks/multi_gpu_run.sh
run() {  # run DP GRAPHS SUFFIX
  go "1.5b-dp$1-gbs$GBS$3" "$1" "$LIMIT" --shape 1.5b --iters "$ITERS" --data "$D" \
    training.global_batch_size="$GBS" parallel.overlap_grad_reduce=true training.cuda_graphs="$2" \
    parallel.overlap_param_gather="$([[ $1 == 2 ]] && echo true || echo false)"
}
for n in $NS; do run "$n" true ""; done
for n in $EAGER; do run "$n" false "-eager"; done
python - "$OUT" "$GBS" <<'PY'
import json, statistics, sys
out, gbs = sys.argv[1], sys.argv[2]
tps = {}
for n in (1, 2):
    for suffix in ("", "-eager"):
        name = f"1.5b-dp{n}-gbs{gbs}{suffix}"
        try:
            rows = [json.loads(l) for l in open(f"{out}/{name}.metrics.jsonl") if '"train"' in l]
        except OSError:
            continue
        steady = [r["tokens_per_s"] for r in rows if r["step"] > 3]
        tps[n, suffix] = statistics.median(steady)
        print(f"DP={n}{' (eager decoder)' if suffix else ''}: median tokens/s over steps 4+: {tps[n, suffix]:,.0f}; "
              f"step-1 loss {rows[0]['loss']:.5f}; last loss {rows[-1]['loss']:.5f}")
for suffix in ("", "-eager"):
    if (2, suffix) in tps and (1, "") in tps:
        print(f"scaling DP=2{' (eager decoder)' if suffix else ''} / DP=1: {tps[2, suffix] / tps[1, ''] :.2f}x")
PY
