#!/usr/bin/env bash
# Run the whole test suite on CPU (creates the environment first if needed). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
# Spread the tests over up to 4 worker processes (one per core; each runs torch on one thread and builds
# the shared fixtures, such as the tiny pretraining checkpoint, itself). An -n / --numprocesses or
# -p no:xdist given here wins; VICHA_TEST_WORKERS=1 runs everything in this process.
workers="${VICHA_TEST_WORKERS:-$(cores="$(nproc 2>/dev/null || echo 1)"; echo $(( cores < 4 ? cores : 4 )))}"
parallel=()
if [ "$workers" -gt 1 ] && ! printf '%s\n' "$@" | grep -qE '^(-n|--numprocesses|no:xdist$)'; then
  parallel=(-n "$workers")
fi
exec "$PY" -m pytest -q "${parallel[@]}" "$@"
