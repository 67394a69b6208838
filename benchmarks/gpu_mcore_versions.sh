#!/usr/bin/env bash
# One GPU: the same code on both ends of the supported megatron-core range, in one call.
#   tests: the GPU tests (pytest -m gpu) under each version
#   bench: the training-step benchmark (train_throughput.py, 1.5B shape), A B A B to show noise
#   train: a short real-trainer run (multi_gpu.py, 1.5B shape, same data and seed) per version;
#          per-step losses compared (bf16 training: they must agree to bf16 rounding)
# Needs the two megatron-core cp312 wheels in $WHEELS (default .whl/mcore); other packages the
# code needs (soundfile, soxr) as wheels in .whl. Results under ${OUT:-benchmarks/results}.
#   PHASES="tests bench train" bash benchmarks/gpu_mcore_versions.sh
set -uo pipefail
OUT="${OUT:-benchmarks/results}"; R="${RUNS:-/tmp/ualm-runs}"; mkdir -p "$OUT" "$R"
WHEELS="${WHEELS:-.whl/mcore}"; PHASES="${PHASES:-tests bench train}"; ITERS="${ITERS:-20}"
VERSIONS="${VERSIONS:-0.16.1 0.19.2}"
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
nvidia-smi -i 0 --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/mcore_card.txt"
BASE_PYTHONPATH="${PYTHONPATH:-}"
use() {  # use VERSION: put that megatron-core first on the path
  local dir="/tmp/mcore-$1"
  [[ -d "$dir" ]] || python -m pip install -q --no-index --no-deps --no-compile --target "$dir" "$WHEELS"/megatron_core-"$1"-*.whl
  export PYTHONPATH="$dir${BASE_PYTHONPATH:+:$BASE_PYTHONPATH}"
  python -c "import megatron.core as m, torch; print('megatron-core', m.__version__, '| torch', torch.__version__)"
}
quiet() { grep -vE "Warning|warn\(|warnings.warn|return func|USDT|^\s*$|getattr\(param|tp_group =|_warn_once|create_block_mask" ; }

if [[ " $PHASES " == *" tests "* ]]; then
  for v in $VERSIONS; do
    use "$v"; echo "== GPU tests, megatron-core $v"
    timeout 280 python -m pytest -q -m gpu -p no:randomly tests 2>&1 | tee "$OUT/mcore-$v-gpu-tests.log" | tail -3
  done
fi
if [[ " $PHASES " == *" bench "* ]]; then
  for round in 1 2; do
    for v in $VERSIONS; do
      use "$v" >/dev/null; echo "== step benchmark, megatron-core $v, round $round"
      timeout 150 python benchmarks/train_throughput.py --only ualm --steps 10 --warmup 3 \
        --json "$OUT/mcore-$v-step-$round.json" 2>&1 | quiet | tail -1
    done
  done
fi
if [[ " $PHASES " == *" train "* ]]; then
  source benchmarks/multi_gpu_run.sh
  for v in $VERSIONS; do
    use "$v" >/dev/null
    go "mcore-$v-1.5b" 1 240 --shape 1.5b --iters "$ITERS" --data "$R/data-1.5b" --save
  done
fi
python - "$OUT" $VERSIONS <<'PY'
import json, sys
out, versions = sys.argv[1], sys.argv[2:]
def load(path):
    try:
        return json.load(open(path))
    except OSError:
        return None
for v in versions:
    rates = []
    for r in (1, 2):
        j = load(f"{out}/mcore-{v}-step-{r}.json")
        if j:
            rates.append(round(j["results"]["ualm"]["tokens_per_s"]))
    if rates:
        print(f"megatron-core {v}: step benchmark tokens/s per round: {rates}")
runs = {}
for v in versions:
    try:
        rows = [json.loads(l) for l in open(f"{out}/mcore-{v}-1.5b.metrics.jsonl")]
    except OSError:
        print(f"megatron-core {v}: trainer run has no metrics"); continue
    runs[v] = [r for r in rows if r.get("kind", "train") == "train" and "loss" in r]
if len(runs) == 2:
    a, b = (runs[v] for v in versions)
    n = min(len(a), len(b))
    rel = max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(a[:n], b[:n])) if n else float("nan")
    tps = {v: sorted(r.get("tokens_per_s", 0) for r in runs[v][2:n]) for v in versions}
    med = {v: t[len(t) // 2] if t else float("nan") for v, t in tps.items()}
    print(f"trainer, {n} steps: losses {a[0]['loss']:.5f} -> {a[n-1]['loss']:.5f} ({versions[0]}), "
          f"{b[0]['loss']:.5f} -> {b[n-1]['loss']:.5f} ({versions[1]}); max relative difference {rel:.2e} "
          f"(bf16 rounding: 2^-8 = 3.9e-3); median tokens/s {med}")
PY
