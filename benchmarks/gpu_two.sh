#!/usr/bin/env bash
# Two GPUs over NCCL, the real trainer (benchmarks/multi_gpu.py), same global batch everywhere:
#   1.5B: DP=1 on one GPU (reference), DP=2 (scaling), TP=2 + SP (step-1 loss vs DP=1, speed),
#         DP=2 with overlap_param_gather (same losses as DP=2);
#   7B: TP=2 + SP on two GPUs (speed, memory).
# Then the summary table (benchmarks/multi_gpu_summary.py). Results under ${OUT:-benchmarks/results}.
set -uo pipefail
OUT="${OUT:-benchmarks/results}"; R="${RUNS:-/tmp/ualm-runs}"; mkdir -p "$OUT" "$R"
ITERS="${ITERS:-12}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/two_card.txt"
source benchmarks/multi_gpu_run.sh
D="$R/data-1.5b"
go 1.5b-tp1 1 150 --shape 1.5b --iters "$ITERS" --data "$D"
go 1.5b-dp2 2 150 --shape 1.5b --iters "$ITERS" --data "$D"
go 1.5b-tp2 2 150 --shape 1.5b --tp 2 --iters "$ITERS" --data "$D"
go 1.5b-dp2-overlap-param-gather 2 150 --shape 1.5b --iters "$ITERS" --data "$D" \
   parallel.overlap_param_gather=true parallel.overlap_grad_reduce=true
go 7b-tp2 2 240 --shape 7b --tp 2 --iters 6 --data "$R/data-7b"
python benchmarks/multi_gpu_summary.py "$OUT" | tee "$OUT/two_summary.txt"
