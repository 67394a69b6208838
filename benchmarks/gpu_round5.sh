#!/usr/bin/env bash
# One H200, one call: the fifth round's measurements that are not FP8 (FP8: PHASES=fp8 gpu_round6.sh).
#   dpo:    benchmarks/dpo_step.py, the DPO step's tokens/s beside the pre-training step's (1.5B)
#   codec:  benchmarks/codec_overhead.py, the exact codec path against plain batches and TF32
#   train:  the real trainer, 1.5B shape, 20 steps (benchmarks/multi_gpu.py): the logged MFU
#           counts what was packed; mfu_full_rows is the older full-row count, both printed
# Needs the megatron-core cp312 wheel in $WHEELS (default .whl/mcore) and soundfile, cffi,
# pycparser wheels in .whl. Results under ${OUT:-benchmarks/results}.
#   PHASES="dpo codec train" bash benchmarks/gpu_round5.sh
set -uo pipefail
OUT="${OUT:-benchmarks/results}"; R="${RUNS:-/tmp/ualm-runs}"; mkdir -p "$OUT" "$R"
WHEELS="${WHEELS:-.whl/mcore}"; MCORE="${MCORE:-0.16.1}"; PHASES="${PHASES:-dpo codec train}"
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
dir="/tmp/mcore-$MCORE"
[[ -d "$dir" ]] || python -m pip install -q --no-index --no-deps --no-compile --target "$dir" \
  "$WHEELS"/megatron_core-"$MCORE"-*.whl $(ls .whl/soundfile-*.whl .whl/cffi-*.whl .whl/pycparser-*.whl .whl/soxr-*.whl 2>/dev/null)
export PYTHONPATH="$dir:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -i 0 --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/round5_card.txt"
quiet() { grep -vE "Warning|warn\(|warnings.warn|return func|USDT|^\s*$|_warn_once|create_block_mask" ; }
if [[ " $PHASES " == *" dpo "* ]]; then
  echo "== DPO step vs pre-training step (1.5B)"
  timeout 240 python benchmarks/dpo_step.py --json "$OUT/dpo_step.json" 2>&1 | quiet | tail -8
fi
if [[ " $PHASES " == *" codec "* ]]; then
  echo "== codec overhead"
  timeout 150 python benchmarks/codec_overhead.py --device cuda --json-out "$OUT/codec_overhead.json" 2>&1 \
    | grep -E "^round" | tail -14
fi
if [[ " $PHASES " == *" train "* ]]; then
  source benchmarks/multi_gpu_run.sh
  go "round5-1.5b" 1 200 --shape 1.5b --iters 20 --data "$R/data-1.5b"
  python - "$OUT/round5-1.5b.metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l]
for r in rows[-3:]:
    print(f"step {r['step']}: {r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%} (packed count), "
          f"{r['mfu_full_rows']:.1%} (full rows)")
PY
fi
