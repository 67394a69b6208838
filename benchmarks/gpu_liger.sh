#!/usr/bin/env bash
# One GPU (H100/H200), one call, < 10 minutes: the kernels' GPU tests, then benchmarks/liger_ab.py
# (RMSNorm and SwiGLU forward + backward, bf16: megatron_ualm.kernels vs liger-kernel vs eager PyTorch at
# the 1.5B and 7B training shapes). Needs the liger-kernel wheel in $EXTRA (default .whl/extra), a
# megatron-core cp312 wheel in $WHEELS (default .whl/mcore) and soundfile + cffi + pycparser wheels in
# .whl (the test conftest imports audio I/O); liger-kernel's own dependencies (torch, triton) are the
# machine's. Results under ${OUT:-benchmarks/results}: liger_ab.json, liger_console.txt,
# liger_gpu_tests.log, liger_card.txt.
#   bash benchmarks/gpu_liger.sh
set -uo pipefail
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
WHEELS="${WHEELS:-.whl/mcore}"; MCORE="${MCORE:-0.16.1}"
EXTRA="${EXTRA:-.whl/extra}"; LIGER="${LIGER:-0.8.5}"
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
dir="/tmp/mcore-$MCORE"
[[ -d "$dir" ]] || python -m pip install -q --no-index --no-deps --no-compile --target "$dir" \
  "$WHEELS"/megatron_core-"$MCORE"-*.whl $(ls .whl/soundfile-*.whl .whl/cffi-*.whl .whl/pycparser-*.whl 2>/dev/null)
ldir="/tmp/liger-$LIGER"
[[ -d "$ldir" ]] || python -m pip install -q --no-index --no-deps --no-compile --target "$ldir" \
  "$EXTRA"/liger_kernel-"$LIGER"-*.whl
export PYTHONPATH="$ldir:$dir:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -i 0 --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/liger_card.txt"
python -c "import liger_kernel.ops.rms_norm, liger_kernel.ops.swiglu" \
  || { echo "liger-kernel $LIGER does not import from $ldir (is $EXTRA/liger_kernel-$LIGER-*.whl there?)"; exit 1; }
echo "== kernel GPU tests"
timeout 300 python -m pytest -q -m gpu -p no:randomly tests/test_model_norm_kernel.py tests/test_model_swiglu.py \
  tests/test_model_rope_kernel.py tests/test_model_fused_ce.py tests/test_wgrad_fusion.py 2>&1 \
  | tee "$OUT/liger_gpu_tests.log" | tail -5
echo "== liger_ab.py"
timeout 480 python benchmarks/liger_ab.py --json "$OUT/liger_ab.json" 2>&1 | tee "$OUT/liger_console.txt"
