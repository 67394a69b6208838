#!/usr/bin/env bash
# One GPU (H100/H200), one call, < 8 minutes: the FP8 GPU tests, then benchmarks/fp8_ab.py
# (per-layer GEMM + cast timings, training tokens/s bf16 vs fp8 for the 1.5B shape and the 7B width
# with 8 layers, a 220-step loss curve bf16 vs fp8). Needs a megatron-core cp312 wheel in $WHEELS
# (default .whl/mcore) and soundfile + cffi + pycparser wheels in .whl (the test conftest imports
# audio I/O). Results under ${OUT:-benchmarks/results}: fp8_ab.json, fp8_console.txt, fp8_gpu_tests.log.
#   bash benchmarks/gpu_fp8.sh
set -uo pipefail
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
WHEELS="${WHEELS:-.whl/mcore}"; MCORE="${MCORE:-0.16.1}"
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
dir="/tmp/mcore-$MCORE"
[[ -d "$dir" ]] || python -m pip install -q --no-index --no-deps --no-compile --target "$dir" \
  "$WHEELS"/megatron_core-"$MCORE"-*.whl $(ls .whl/soundfile-*.whl .whl/cffi-*.whl .whl/pycparser-*.whl 2>/dev/null)
export PYTHONPATH="$dir:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -i 0 --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/fp8_card.txt"
echo "== FP8 GPU tests"
timeout 120 python -m pytest -q -m gpu -p no:randomly tests/test_fp8.py 2>&1 | tee "$OUT/fp8_gpu_tests.log" | tail -5
echo "== fp8_ab.py"
timeout 480 python benchmarks/fp8_ab.py --out "$OUT" 2>&1 \
  | grep -vE "Warning|warn\(|warnings.warn|return func|^\s*$|_warn_once|create_block_mask" | tee "$OUT/fp8_console.txt"
