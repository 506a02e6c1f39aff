#!/usr/bin/env bash
# The embedded default: generate the demo data, pretrain the tiny ViCHA on CPU, print where things are.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_env.sh
export HF_HUB_OFFLINE=1
data=data/demo
out=${OUTPUT_DIR:-output/demo}
if [ ! -f "$data/tokenizer/vocab.txt" ]; then
  "$PY" tools/make_demo_data.py --out "$data" --seed 0
fi
"$PY" Pretrain.py --config configs/demo/Pretrain.yaml --output_dir "$out/pretrain" \
  --data_dir "$data" --data_json_dir "$data/json_pretrain" --text_encoder "$data/tokenizer" --device cpu "$@"
echo "[demo] pretraining log: $out/pretrain/log.txt"
echo "[demo] checkpoint:      $out/pretrain/checkpoint_last.pth"
