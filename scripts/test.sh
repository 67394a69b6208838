#!/usr/bin/env bash
# The README's test command: builds the environment if needed, then runs the whole suite
# (slow multi-process tests included). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/env.sh"
cd "$ROOT"
exec "${UALM_VENV:-$ROOT/.venv}/bin/python" -m pytest -q "$@" tests
