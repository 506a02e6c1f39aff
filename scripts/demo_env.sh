#!/usr/bin/env bash
# Shared set-up of the demo scripts (run_demo.sh, tools/run_demo_tasks.sh), sourced from the repository
# root: the environment ($PY), no hub downloads, the demo data folder ($data) and output folder ($out).
source scripts/ensure_env.sh
export HF_HUB_OFFLINE=1
data=data/demo
out=${OUTPUT_DIR:-output/demo}
