# Sourced by the multi-GPU drivers (gpu_multi.sh, gpu_two.sh, gpu_dp_scaling.sh); needs OUT and R.
# go NAME NPROC SECONDS ARGS...: one benchmarks/multi_gpu.py run (ARGS: its options and overrides)
# in $R/NAME under a time limit; its log goes to $OUT/NAME.log and its metrics to
# $OUT/NAME.metrics.jsonl; prints its last two steps and any error lines.
go() {
  local name="$1" n="$2" limit="$3"; shift 3
  echo "== $name ($n GPUs): $*"
  timeout "$limit" python -m torch.distributed.run --standalone --nproc-per-node "$n" benchmarks/multi_gpu.py \
      --exp "$R/$name" "$@" > "$OUT/$name.log" 2>&1 || echo "   FAILED ($?): see $OUT/$name.log"
  grep -E "\[ualm\] (step|resumed|saved)" "$OUT/$name.log" | tail -2
  grep -iE "out of memory|Error" "$OUT/$name.log" | tail -3
  cp "$R/$name/logs/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null || true
}
