#!/usr/bin/env bash
# The README's main command: builds the environment if needed, then runs the whole UALM job
# on CPU with tiny models and self-made data (see megatron_ualm/demo.py). Arguments go to
# the demo, e.g. `bash examples/run_demo.sh --workdir /tmp/ualm-demo --iters 400`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/env.sh"
cd "$ROOT"
exec "${UALM_VENV:-$ROOT/.venv}/bin/python" -m megatron_ualm.demo "$@"
