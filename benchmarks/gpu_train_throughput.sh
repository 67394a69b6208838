#!/usr/bin/env bash
# One GPU measurement of the training step: transformers baseline and UALM variants, each in
# its own process, results as JSON under ${OUT:-benchmarks/results}. Usage on a GPU machine:
#   bash benchmarks/gpu_train_throughput.sh [extra train_throughput.py args]
set -uo pipefail
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
run() {  # name, args...
  local name="$1"; shift
  echo "== $name: $*"
  timeout 300 python benchmarks/train_throughput.py "$@" --json "$OUT/$name.json" 2>&1 | grep -vE "Warning|warn\(" | tail -6
}
run hf --only hf "$@"
run ualm_packed --only ualm "$@"
run ualm_unpacked --only ualm --min-doc 4096 --max-doc 4096 "$@"
