#!/usr/bin/env bash
# Create the project's virtual environment (.venv, or $VICHA_VENV) if it is missing or stale.
# Sourced by run_demo.sh and run_tests.sh; afterwards $PY is the environment's python.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VICHA_VENV:-$repo/.venv}"
requirements="$repo/envs/requirements.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
  echo "[env] creating $venv with $python (a few minutes the first time)"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  echo "$want" > "$stamp"
fi
PY="$venv/bin/python"
export PY
