#!/usr/bin/env bash
# One GPU call: GPU checks of the fused head CE, the transformers baseline, UALM with the
# speed-ups off (--reference, profiled) and on (profiled; packed, unpacked, seq 8192 mb 1),
# each model in its own process. Results (JSON + log) under ${OUT:-benchmarks/results}.
#   bash benchmarks/gpu_profile.sh [steps] [warmup]
set -uo pipefail
OUT="${OUT:-benchmarks/results}"
STEPS="${1:-5}"
WARMUP="${2:-2}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
quiet() { grep -vE "Warning|warn\(|warnings.warn|return func|USDT|^\s*$|getattr\(param" ; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1 | tee "$OUT/card.txt"
echo "== GPU tests (fused head CE)"
timeout 60 python -m pytest -q -m gpu tests/test_model_fused_ce.py 2>&1 | tail -3
echo "== HF baseline"
timeout 90 python benchmarks/model_step.py --only hf --steps "$STEPS" --warmup "$WARMUP" --json "$OUT/hf.json" 2>&1 | quiet | tail -1
echo "== UALM reference (speed-ups off)"
timeout 120 python benchmarks/profile_step.py --reference --steps "$STEPS" --warmup "$WARMUP" --profile-steps 1 \
  --json "$OUT/ualm_reference.json" 2>&1 | quiet
echo "== UALM (speed-ups on)"
timeout 200 python benchmarks/profile_step.py --shapes 4096x2:packed,4096x2:unpacked,8192x1:packed \
  --steps "$STEPS" --warmup "$WARMUP" --profile-steps 1 --json "$OUT/ualm.json" 2>&1 | quiet
