#!/usr/bin/env bash
# Run the whole test suite on CPU (creates the environment first if needed). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
exec "$PY" -m pytest -q "$@"
