"""ViCHA VQA v2: answer-decoder fine-tuning and answer ranking, with visual concepts.

    python VQA.py --config configs/VQA.yaml --output_dir output/vqa --checkpoint Pretrain/checkpoint_last.pth \
        --data_dir /data --data_json_dir /data/json
    python VQA.py ... --checkpoint output/vqa/checkpoint_last.pth --evaluate   # result/vqa_result_epoch0.json

The result file (question_id, answer) is in the format of the VQA evaluation server; when the test
annotations carry human answers (e.g. test_file: [vqa_val.json]) the VQA accuracy is also logged.
"""

from __future__ import annotations

from typing import Optional, Sequence

from engine.cli import DEMO_DATA_DIR, build_parser, parse_and_load
from engine.tasks import VQATask
from engine.trainer import run


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser(__doc__.splitlines()[0], config="./configs/VQA.yaml", output_dir="output/vqa",
                          data_json_dir=f"{DEMO_DATA_DIR}/json")
    parser.add_argument("--text_decoder", default="bert-base-uncased",
                        help="BERT weights of the answer decoder before --checkpoint (hub name or local folder)")
    args, config = parse_and_load(parser, argv)
    return run(VQATask(), args, config)


if __name__ == "__main__":
    main()
