#!/usr/bin/env bash
# Create the project's virtual environment (.venv, or $VICHA_VENV) if it is missing or stale.
# Sourced by run_tests.sh and scripts/demo_env.sh (the demo scripts); afterwards $PY is the environment's python.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VICHA_VENV:-$repo/.venv}"
requirements="$repo/envs/requirements.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
  # torch's CUDA build makes a new venv ~5.9 GB: say so up front instead of failing mid-install.
  parent="$(dirname "$venv")"; mkdir -p "$parent"
  free_kb="$(df -Pk "$parent" | awk 'NR==2 {print $4}')"
  if [ ! -x "$venv/bin/python" ] && [ "${free_kb:-0}" -lt $((6500 * 1024)) ]; then
    echo "[env] error: creating $venv needs about 6.5 GB free on $parent, only $((free_kb / 1024)) MB left" >&2
    exit 1
  fi
  echo "[env] creating $venv with $python (a few minutes the first time)"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --no-cache-dir --disable-pip-version-check -r "$requirements"
  echo "$want" > "$stamp"
fi
PY="$venv/bin/python"
export PY
