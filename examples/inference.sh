#!/usr/bin/env bash
# Answer a manifest of requests with a trained UALM checkpoint.
#
#   examples/inference.sh CKPT REQUESTS.jsonl OUT_DIR [key=value ...]
#   NPROC=8 examples/inference.sh runs/ualm requests.jsonl answers/ tokenizer=/models/qwen2.5 codec=/models/xcodec
#
# CKPT: a Megatron checkpoint or experiment directory (config.yaml beside it) or an exported
# HF directory. With NPROC > 1 the requests are split over NPROC processes on this node
# (one GPU each; rank r takes requests r, r + NPROC, ...) and rank 0 merges the answers.
# Output: OUT_DIR/answers.jsonl (one record per request, manifest order), OUT_DIR/wavs/*.wav,
# OUT_DIR/summary.json. Record format: megatron_ualm/inference/runner.py.
#
# Example requests (one JSON object per line; relative audio paths are resolved against the
# manifest's folder):
#   {"id": "q1", "prompt": "What is the capital of France?"}
#   {"id": "a1", "audio": "clips/dog.wav", "prompt": "What animal makes this sound?"}
#   {"id": "t1", "caption": "a dog barks twice, then a car passes"}
#   {"id": "s1", "task": "transcription_to_speech", "text": "Hello there."}
#   {"id": "t2", "caption": "rain on a tin roof", "settings": {"guidance_scale": 4, "max_audio_seconds": 5}}
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n 2,20p "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
CKPT=$(realpath -m "$1"); REQUESTS=$(realpath -m "$2"); OUT=$(realpath -m "$3"); shift 3
NPROC=${NPROC:-1}
cd "$(dirname "$0")/.."
if [[ -f .venv/bin/activate ]]; then . .venv/bin/activate; fi
if [[ "$NPROC" -gt 1 ]]; then
  exec torchrun --standalone --nproc_per_node "$NPROC" -m megatron_ualm.generate \
    --checkpoint "$CKPT" --requests "$REQUESTS" --out "$OUT" "$@"
fi
exec python -m megatron_ualm.generate --checkpoint "$CKPT" --requests "$REQUESTS" --out "$OUT" "$@"
