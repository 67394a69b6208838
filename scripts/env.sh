#!/usr/bin/env bash
# Creates .venv (if missing or stale) with a CPU torch first, then this package and
# its test extras under a constraint that keeps that torch. Idempotent and quick when
# the environment is already there. Source it or run it: it leaves .venv ready.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UALM_VENV:-$ROOT/.venv}"
PY="${UALM_PYTHON:-python3.11}"
TORCH_SPEC="${UALM_TORCH:-torch==2.13.0}"
STAMP="$VENV/.ualm-env-stamp"
WANT="$(cat "$ROOT/setup.py" "$ROOT/scripts/env.sh" | sha256sum | cut -c1-16)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  exit 0
fi
command -v "$PY" >/dev/null || { echo "env.sh: $PY not found; set UALM_PYTHON to a Python >= 3.11" >&2; exit 1; }
echo "[env] building $VENV (torch: $TORCH_SPEC)" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
CONSTRAINT="$VENV/torch-constraint.txt"
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" > "$CONSTRAINT"
"$VENV/bin/python" -m pip install -q -c "$CONSTRAINT" --config-settings editable_mode=compat -e "$ROOT[test]"
echo "$WANT" > "$STAMP"
echo "[env] ready: $("$VENV/bin/python" -c 'import torch, megatron.core as m, transformers as t; print("torch", torch.__version__, "| megatron-core", m.__version__, "| transformers", t.__version__)')" >&2
