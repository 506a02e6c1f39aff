"""ViCHA NLVR2: image-pair reasoning fine-tuning and evaluation, with visual concepts.

    python NLVR.py --config configs/NLVR.yaml --output_dir output/NLVR \
        --checkpoint output/NLVR_pretrain/checkpoint_last.pth --data_dir /data --data_json_dir /data/json
    python NLVR.py ... --checkpoint output/NLVR/checkpoint_best.pth --evaluate

Start from the text-assignment checkpoint of Pretrain_nlvr.py. ``--evaluate`` (missing upstream,
pipeline.md §10 B2) evaluates val and test once and writes no checkpoint.
"""

from __future__ import annotations

from typing import Optional, Sequence

from engine.cli import DEMO_DATA_DIR, build_parser, parse_and_load
from engine.tasks import NLVRTask
from engine.trainer import run


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser(__doc__.splitlines()[0], config="./configs/NLVR.yaml", output_dir="output/NLVR",
                          data_json_dir=f"{DEMO_DATA_DIR}/json")
    args, config = parse_and_load(parser, argv)
    return run(NLVRTask(), args, config)


if __name__ == "__main__":
    main()
