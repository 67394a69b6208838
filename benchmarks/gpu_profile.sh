#!/usr/bin/env bash
# One GPU: the training step of UALM against the transformers baseline, same card, same run.
#   HF and UALM at 1 and 4 micro-batches per step; A/B of the last change (the decoder's
#   CUDA graphs, training.cuda_graphs); UALM profiled (breakdown by category, idle gaps by phase, CPU time by
#   range) for 4096x2 packed, plus 4096x2 unpacked and 8192x1 packed (memory).
# Each model runs in its own process. Results (JSON + console) under ${OUT:-benchmarks/results}.
#   bash benchmarks/gpu_profile.sh [steps] [warmup]
set -uo pipefail
OUT="${OUT:-benchmarks/results}"
STEPS="${1:-10}"
WARMUP="${2:-3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
quiet() { grep -vE "Warning|warn\(|warnings.warn|return func|USDT|^\s*$|getattr\(param|tp_group =|_warn_once|create_block_mask" ; }
nvidia-smi -i "${CUDA_VISIBLE_DEVICES%%,*}" --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
T="benchmarks/train_throughput.py"
run() {  # run NAME ARGS...: one train_throughput.py process, its result line
  local name="$1"; shift
  echo "== $name"
  timeout 150 python $T "$@" --json "$OUT/$name.json" 2>&1 | quiet | tail -1
}
run hf --only hf --steps "$STEPS" --warmup "$WARMUP"
run ualm --only ualm --steps "$STEPS" --warmup "$WARMUP"
run hf_acc4 --only hf --accumulate 4 --steps 4 --warmup 1
run ualm_acc4 --only ualm --accumulate 4 --steps 4 --warmup 2
run ualm_acc4_no_cuda_graphs --only ualm --accumulate 4 --steps 4 --warmup 2 --no-cuda-graphs
run ualm_no_cuda_graphs --only ualm --no-cuda-graphs --steps "$STEPS" --warmup "$WARMUP"
echo "== UALM profiled; unpacked; 8192 x 1"
timeout 200 python benchmarks/profile_step.py --shapes 4096x2:packed,4096x2:unpacked,8192x1:packed \
  --steps 6 --warmup 3 --profile-steps 1 --json "$OUT/ualm_profile.json" 2>&1 | quiet \
  | grep -v "^  *after \|^      [0-9]"
