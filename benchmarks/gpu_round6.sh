#!/usr/bin/env bash
# One H200, one call (< 10 minutes): the sixth round's measurements. Phases ($PHASES):
#   fp8:    the FP8 GPU tests, then benchmarks/fp8_ab.py (GEMM and cast timings, training tokens/s
#           bf16 vs fp8 for 1.5B and the 7B width, the 200-step loss curves with a bf16 control)
#   graphs: the 7B width (16 layers, micro-batch 1, 4 micro-batches per step) with the decoder's
#           CUDA graphs and eagerly, in one call (benchmarks/train_throughput.py)
#   liger:  the kernels' GPU tests, then benchmarks/liger_ab.py, RMSNorm and SwiGLU: ours against
#           liger-kernel (its wheel from .whl/extra)
#   memory: benchmarks/memory_7b.py, the 7B width's measured memory against the budget
# Needs the megatron-core cp312 wheel in $WHEELS (default .whl/mcore) and soundfile, cffi,
# pycparser wheels in .whl. Results under ${OUT:-benchmarks/results}.
#   PHASES="fp8 graphs" bash benchmarks/gpu_round6.sh
set -uo pipefail
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
WHEELS="${WHEELS:-.whl/mcore}"; MCORE="${MCORE:-0.16.1}"; PHASES="${PHASES:-fp8 graphs}"
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
dir="/tmp/mcore-$MCORE"
[[ -d "$dir" ]] || python -m pip install -q --no-index --no-deps --no-compile --target "$dir" \
  "$WHEELS"/megatron_core-"$MCORE"-*.whl $(ls .whl/soundfile-*.whl .whl/cffi-*.whl .whl/pycparser-*.whl .whl/soxr-*.whl 2>/dev/null) \
  $(ls .whl/extra/liger_kernel-*.whl 2>/dev/null)
export PYTHONPATH="$dir:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -i 0 --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/round6_card.txt"
quiet() { grep -vE "Warning|warn\(|warnings.warn|return func|USDT|^\s*$|_warn_once|create_block_mask" ; }
if [[ " $PHASES " == *" fp8 "* ]]; then
  echo "== FP8 GPU tests"
  timeout 120 python -m pytest -q -m gpu -p no:randomly tests/test_fp8.py 2>&1 | tee "$OUT/fp8_gpu_tests.log" | tail -3
  echo "== fp8_ab.py"
  timeout 330 python benchmarks/fp8_ab.py --out "$OUT" --loss-steps 200 2>&1 | quiet | tee "$OUT/fp8_console.txt"
fi
if [[ " $PHASES " == *" graphs "* ]]; then
  for mode in graphs eager; do
    echo "== 7B width, 16 layers, decoder $mode"
    extra=(); [[ $mode == eager ]] && extra=(--no-cuda-graphs)
    timeout 120 python benchmarks/train_throughput.py --shape 7b --layers 16 --micro-batch 1 --accumulate 4 \
      --steps 6 --only ualm "${extra[@]}" --json "$OUT/graphs7b_$mode.json" 2>&1 | quiet | tail -2
  done
fi
if [[ " $PHASES " == *" liger "* ]]; then
  python -c "import liger_kernel.ops.rms_norm, liger_kernel.ops.swiglu" \
    || echo "liger-kernel does not import (is .whl/extra/liger_kernel-*.whl there?)"
  echo "== kernel GPU tests"
  timeout 120 python -m pytest -q -m gpu -p no:randomly tests/test_model_norm_kernel.py tests/test_model_swiglu.py \
    tests/test_model_rope_kernel.py tests/test_model_fused_ce.py tests/test_wgrad_fusion.py tests/test_fp8.py 2>&1 \
    | tee "$OUT/kernels_gpu_tests.log" | tail -3
  echo "== liger A/B"
  timeout 150 python benchmarks/liger_ab.py --json "$OUT/liger_ab.json" 2>&1 | quiet | tee "$OUT/liger_console.txt" | tail -20
fi
if [[ " $PHASES " == *" memory "* ]]; then
  echo "== 7B memory against the budget"
  timeout 220 python benchmarks/memory_7b.py --steps 3 --warmup 1 --json "$OUT/memory_7b.json" 2>&1 | quiet \
    | tee "$OUT/memory_7b_console.txt" | tail -30
fi
