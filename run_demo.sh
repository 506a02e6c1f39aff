#!/usr/bin/env bash
# The embedded default, on CPU with no download: generate the demo data, make the tiny starting
# weights (the demo's stand-in for DeiT + BERT), pretrain the tiny ViCHA, fine-tune and evaluate it on
# retrieval, and print the metrics and where everything is. Extra arguments go to Pretrain.py.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_env.sh
export HF_HUB_OFFLINE=1
data=data/demo
out=${OUTPUT_DIR:-output/demo}
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
"$PY" - "$out/retrieval/log.txt" <<'EOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
best = max(lines, key=lambda r: r["val_r_mean"])
chance = "chance R@1 = 2.0 both ways: 50 test images, 5 captions each"
print(f"[demo] retrieval epoch {best['epoch']}: text R@1/5/10 {best['test_txt_r1']:.1f}/{best['test_txt_r5']:.1f}/"
      f"{best['test_txt_r10']:.1f}  image R@1/5/10 {best['test_img_r1']:.1f}/{best['test_img_r5']:.1f}/"
      f"{best['test_img_r10']:.1f}  ({chance})")
EOF
