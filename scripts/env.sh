#!/usr/bin/env bash
# Creates .venv (if missing or stale) with a CPU torch first, then this package and its test
# extras under a constraint that keeps that torch. Idempotent and quick when the environment is
# already there. Run it: it leaves .venv ready.
#
#   bash scripts/env.sh                 # .venv: Python 3.11, megatron-core as pip resolves it (0.16.1)
#   bash scripts/env.sh --newest-mcore  # also .venv/mcore-newest: the newest supported megatron-core
#                                       # (and triton, which its import needs), put in front of the
#                                       # installed one with PYTHONPATH; scripts/test.sh does this
#
# megatron-core >= 0.17 declares Python >= 3.12 but its code runs on 3.11; its one compiled part
# (the dataset helper) is not used by megatron_ualm. The supported range is setup.py's.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UALM_VENV:-$ROOT/.venv}"
PY="${UALM_PYTHON:-python3.11}"
TORCH_SPEC="${UALM_TORCH:-torch==2.13.0}"
MCORE_NEWEST="0.19.2"   # the newest megatron-core release; setup.py's upper bound follows it
TRITON_SPEC="triton==3.7.0"
STAMP="$VENV/.ualm-env-stamp"
WANT="$(cat "$ROOT/setup.py" "$ROOT/scripts/env.sh" | sha256sum | cut -c1-16)"

if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
  command -v "$PY" >/dev/null || { echo "env.sh: $PY not found; set UALM_PYTHON to a Python >= 3.11" >&2; exit 1; }
  echo "[env] building $VENV (torch: $TORCH_SPEC)" >&2
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  CONSTRAINT="$VENV/torch-constraint.txt"
  "$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" > "$CONSTRAINT"
  "$VENV/bin/python" -m pip install -q -c "$CONSTRAINT" --config-settings editable_mode=compat -e "$ROOT[test]"
  rm -rf "$VENV/mcore-newest"   # rebuilt below against the new environment when asked for
  echo "$WANT" > "$STAMP"
  echo "[env] ready: $("$VENV/bin/python" -c 'import torch, megatron.core as m, transformers as t; print("torch", torch.__version__, "| megatron-core", m.__version__, "| transformers", t.__version__)')" >&2
fi

if [[ "${1:-}" == "--newest-mcore" ]]; then
  LAYER="$VENV/mcore-newest"
  if [[ "$(cat "$LAYER/.stamp" 2>/dev/null)" != "$MCORE_NEWEST $TRITON_SPEC" ]]; then
    echo "[env] building $LAYER (megatron-core $MCORE_NEWEST, $TRITON_SPEC)" >&2
    rm -rf "$LAYER" "$LAYER.dl" && mkdir -p "$LAYER.dl"
    # the cp312 wheel is pure Python but for the dataset helper; unpack it as a source tree
    "$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$LAYER.dl" "megatron-core==$MCORE_NEWEST"
    "$VENV/bin/python" -m zipfile -e "$LAYER.dl"/megatron_core-*.whl "$LAYER"
    "$VENV/bin/python" -m pip install -q --no-deps --target "$LAYER" "$TRITON_SPEC"
    rm -rf "$LAYER.dl"
    echo "$MCORE_NEWEST $TRITON_SPEC" > "$LAYER/.stamp"
  fi
fi
