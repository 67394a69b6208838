#!/usr/bin/env bash
# One GPU: the training step of UALM against the transformers baseline, same card, same run.
#   HF baseline; UALM profiled (breakdown by category, idle gaps by phase, host-sync sites);
#   UALM with 4 micro-batches per step against HF with 4; UALM without the host-side batch
#   plan and without weight-gradient accumulation in the GEMM (A/Bs); packed vs unpacked
#   and seq 8192 x 1.
# Each model runs in its own process. Results (JSON + console) under ${OUT:-benchmarks/results}.
#   bash benchmarks/gpu_profile.sh [steps] [warmup]
set -uo pipefail
OUT="${OUT:-benchmarks/results}"
STEPS="${1:-5}"
WARMUP="${2:-2}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
quiet() { grep -vE "Warning|warn\(|warnings.warn|return func|USDT|^\s*$|getattr\(param" ; }
nvidia-smi -i "${CUDA_VISIBLE_DEVICES%%,*}" --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
T="benchmarks/train_throughput.py"
echo "== HF baseline, 1 micro-batch per step"
timeout 120 python $T --only hf --steps "$STEPS" --warmup "$WARMUP" --json "$OUT/hf.json" 2>&1 | quiet | tail -1
echo "== UALM (profiled: categories, idle gaps, host syncs)"
timeout 200 python benchmarks/profile_step.py --shapes 4096x2:packed,4096x2:unpacked,8192x1:packed \
  --steps "$STEPS" --warmup "$WARMUP" --profile-steps 1 --sync-debug --json "$OUT/ualm.json" 2>&1 | quiet
echo "== HF baseline, 4 micro-batches per step"
timeout 150 python $T --only hf --accumulate 4 --steps 3 --warmup 1 --json "$OUT/hf_acc4.json" 2>&1 | quiet | tail -1
echo "== UALM, 4 micro-batches per step"
timeout 150 python $T --only ualm --accumulate 4 --steps 3 --warmup 2 --json "$OUT/ualm_acc4.json" 2>&1 | quiet | tail -1
echo "== UALM with the forward's host syncs (no host-side batch plan)"
timeout 120 python $T --only ualm --no-host-plan --steps "$STEPS" --warmup "$WARMUP" \
  --json "$OUT/ualm_no_host_plan.json" 2>&1 | quiet | tail -1
echo "== UALM without weight-gradient accumulation in the GEMM"
timeout 120 python $T --only ualm --no-wgrad-fusion --steps "$STEPS" --warmup "$WARMUP" \
  --json "$OUT/ualm_no_wgrad_fusion.json" 2>&1 | quiet | tail -1
