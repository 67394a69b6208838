#!/usr/bin/env bash
# The README's test command (CI runs exactly this). Builds the environment if needed, then runs
# pytest on what it is given -- the whole suite (tests/, slow multi-process tests included) when
# given no paths -- once against each end of the supported megatron-core range:
#   oldest: 0.16.1, as pip installs it into .venv (Python 3.11)
#   newest: the newest release (scripts/env.sh's MCORE_NEWEST), put in front with PYTHONPATH
#
#   bash scripts/test.sh                              # everything, both versions
#   bash scripts/test.sh tests/test_config.py -x      # one file, both versions
#   UALM_MCORE=oldest bash scripts/test.sh -m "not slow"   # one version only (oldest|newest)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UALM_VENV:-$ROOT/.venv}"
WHICH="${UALM_MCORE:-both}"
case "$WHICH" in
  both) RUNS=(oldest newest) ;;
  oldest|newest) RUNS=("$WHICH") ;;
  *) echo "test.sh: UALM_MCORE must be oldest, newest or both, got '$WHICH'" >&2; exit 2 ;;
esac
if [[ " ${RUNS[*]} " == *" newest "* ]]; then
  "$ROOT/scripts/env.sh" --newest-mcore || exit 1
else
  "$ROOT/scripts/env.sh" || exit 1
fi
cd "$ROOT"

status=0
summary=()
for run in "${RUNS[@]}"; do
  if [[ "$run" == newest ]]; then
    export PYTHONPATH="$VENV/mcore-newest${PYTHONPATH:+:$PYTHONPATH}"
  fi
  version="$("$VENV/bin/python" -c 'import megatron.core as m; print(m.__version__)' 2>&1 | tail -1)"
  echo "=== megatron-core $version ($run) ==="
  start=$SECONDS
  "$VENV/bin/python" -m pytest -q -rs "$@"  # -rs: every skip is listed with its reason
  rc=$?
  summary+=("megatron-core $version ($run): $([[ $rc == 0 ]] && echo passed || echo "FAILED (pytest exit $rc)") in $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s")
  [[ $rc == 0 ]] || status=1
done
printf '%s\n' "${summary[@]}"
exit $status
