#!/usr/bin/env bash
# One GPU: inference throughput (benchmarks/generate_throughput.py: UALM text and guided
# text-to-audio at batch 1 and 16, transformers generate on the same backbone shape), plus
# the GPU-marked tests. Results under ${OUT:-benchmarks/results}.
set -uo pipefail
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
nvidia-smi -i "${CUDA_VISIBLE_DEVICES%%,*}" --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/generate_card.txt"
echo "== GPU tests"
timeout 150 python -m pytest -q -m gpu -p no:cacheprovider tests/test_model_fused_ce.py tests/test_model_fusions.py \
  tests/test_wgrad_fusion.py tests/test_runtime.py tests/test_inference_graph.py 2>&1 | tail -4
echo "== generation throughput"
timeout "${GEN_LIMIT:-330}" python benchmarks/generate_throughput.py --backend graph cached --out "$OUT/generate.json" 2>&1 | grep -E '^\{"bench"|Error|error' | tail -20
