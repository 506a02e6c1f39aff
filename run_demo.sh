#!/usr/bin/env bash
# The embedded default, on CPU with no download: generate the demo data, make the tiny starting
# weights (the demo's stand-in for DeiT + BERT), pretrain the tiny ViCHA, fine-tune and evaluate it on
# retrieval, and print the metrics and where everything is; exit status 1 if retrieval R@1 ends below
# its floor (tools/demo_summary.py --check). Extra arguments go to Pretrain.py.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/demo_env.sh
if [ ! -f "$data/tokenizer/vocab.txt" ]; then
  "$PY" tools/make_demo_data.py --out "$data" --seed 0
fi
if [ ! -f "$data/init/vit.pth" ] || [ ! -f "$data/init/bert/pytorch_model.bin" ]; then
  "$PY" tools/make_tiny_init.py --data_dir "$data" --out "$data/init"
fi
"$PY" Pretrain.py --config configs/demo/Pretrain.yaml --output_dir "$out/pretrain" \
  --data_dir "$data" --data_json_dir "$data/json_pretrain" --text_encoder "$data/init/bert" --device cpu "$@"
"$PY" Retrieval.py --config configs/demo/Retrieval.yaml --output_dir "$out/retrieval" \
  --data_dir "$data" --data_json_dir "$data/json" --text_encoder "$data/tokenizer" \
  --checkpoint "$out/pretrain/checkpoint_last.pth" --device cpu
echo "[demo] pretraining log: $out/pretrain/log.txt"
echo "[demo] checkpoint:      $out/pretrain/checkpoint_last.pth"
echo "[demo] retrieval log:   $out/retrieval/log.txt (test metrics of the best epoch below)"
"$PY" tools/demo_summary.py "$out" --tasks retrieval --check
