#!/usr/bin/env bash
# Four-GPU checks of the trainer over NCCL (run on a 4-GPU machine):
#   tiny: TP=1 reference, TP2xPP2 (50 steps, checkpoint), DP2xTP2 (50 steps),
#         the 2x2 checkpoint resumed at DP=4, at TP=4 and at 2x2 itself (5 more steps);
#   1.5B shape: TP=1 reference (3 steps), TP2xPP2 and DP2xTP2 (50 steps each).
# Then prints the comparison table (benchmarks/multi_gpu_summary.py). Results: ${OUT:-benchmarks/results}.
set -uo pipefail
OUT="${OUT:-benchmarks/results}"; R="${RUNS:-/tmp/ualm-runs}"; mkdir -p "$OUT" "$R"
SHAPES="${SHAPES:-tiny 1.5b}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/multi_card.txt"
source benchmarks/multi_gpu_run.sh
for shape in $SHAPES; do
  D="$R/data-$shape"
  if [[ "$shape" == tiny ]]; then
    go tiny-tp1 1 420 --shape tiny --iters 2 --data "$D"
    go tiny-tp2pp2 4 420 --shape tiny --tp 2 --pp 2 --iters 50 --save --data "$D"
    go tiny-dp2tp2 4 420 --shape tiny --tp 2 --iters 50 --data "$D"
    C="$R/tiny-tp2pp2/checkpoints/iter_0000050"
    go tiny-resume-2x2 4 420 --shape tiny --tp 2 --pp 2 --iters 55 --resume-from "$C" --data "$D"
    go tiny-resume-dp4 4 420 --shape tiny --tp 1 --iters 55 --resume-from "$C" --data "$D"
    go tiny-resume-tp4 4 420 --shape tiny --tp 4 --iters 55 --resume-from "$C" --data "$D"
  else
    go 1.5b-tp1 1 420 --shape 1.5b --iters 3 --data "$D"
    go 1.5b-tp2pp2 4 420 --shape 1.5b --tp 2 --pp 2 --iters 50 --data "$D"
    go 1.5b-dp2tp2 4 420 --shape 1.5b --tp 2 --iters 50 --data "$D"
  fi
done
python benchmarks/multi_gpu_summary.py "$OUT" | tee "$OUT/multi_summary.txt"
