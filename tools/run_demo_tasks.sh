#!/usr/bin/env bash
# The other downstream tasks of the embedded demo, after `bash run_demo.sh` (which pretrains and runs
# retrieval): SNLI-VE, VQA, NLVR2 (text-assignment pretraining, then fine-tuning) and grounding, each
# from the demo pretraining checkpoint on the generated data, on CPU; then one line of metrics per task,
# and exit status 1 if a task ends below its floor (tools/demo_summary.py --check).
# Usage: bash tools/run_demo_tasks.sh [ve] [vqa] [nlvr] [grounding]   (default: all four, ~15 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/demo_env.sh
pretrained="$out/pretrain/checkpoint_last.pth"
tasks=("$@")
[ ${#tasks[@]} -gt 0 ] || tasks=(ve vqa nlvr grounding)
for task in "${tasks[@]}"; do
  case "$task" in ve|vqa|nlvr|grounding) ;; *) echo "unknown demo task '$task' (ve, vqa, nlvr, grounding)" >&2; exit 2;; esac
done
if [ ! -f "$pretrained" ] || [ ! -f "$data/tokenizer/vocab.txt" ]; then
  echo "missing $pretrained or $data: run 'bash run_demo.sh' first" >&2
  exit 1
fi
common=(--data_dir "$data" --text_encoder "$data/tokenizer" --device cpu)
for task in "${tasks[@]}"; do
  echo "[demo] $task -> $out/$task"
  case "$task" in
    ve) "$PY" VE.py --config configs/demo/VE.yaml --output_dir "$out/ve" --data_json_dir "$data/json" \
          --checkpoint "$pretrained" "${common[@]}" ;;
    vqa) "$PY" VQA.py --config configs/demo/VQA.yaml --output_dir "$out/vqa" --data_json_dir "$data/json" \
          --checkpoint "$pretrained" "${common[@]}" ;;
    nlvr)
      "$PY" Pretrain_nlvr.py --config configs/demo/NLVR_pretrain.yaml --output_dir "$out/nlvr_pretrain" \
        --data_json_dir "$data/json_pretrain" --checkpoint "$pretrained" "${common[@]}"
      "$PY" NLVR.py --config configs/demo/NLVR.yaml --output_dir "$out/nlvr" --data_json_dir "$data/json" \
        --checkpoint "$out/nlvr_pretrain/checkpoint_last.pth" "${common[@]}" ;;
    grounding) "$PY" Grounding.py --config configs/demo/Grounding.yaml --output_dir "$out/grounding" \
          --data_json_dir "$data/json" --checkpoint "$pretrained" "${common[@]}" ;;
  esac
done
"$PY" tools/demo_summary.py "$out" --tasks "${tasks[@]}" --check
