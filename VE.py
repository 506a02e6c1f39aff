"""ViCHA SNLI-VE: visual entailment fine-tuning and evaluation, with visual concepts.

    python VE.py --config configs/VE.yaml --output_dir output/VE --checkpoint Pretrain/checkpoint_last.pth \
        --data_dir /data --data_json_dir /data/json
    python VE.py ... --checkpoint output/VE/checkpoint_best.pth --evaluate
"""

from __future__ import annotations

from typing import Optional, Sequence

from engine.cli import DEMO_DATA_DIR, build_parser, parse_and_load
from engine.tasks import VETask
from engine.trainer import run


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser(__doc__.splitlines()[0], config="./configs/VE.yaml", output_dir="output/VE",
                          data_json_dir=f"{DEMO_DATA_DIR}/json")
    args, config = parse_and_load(parser, argv)
    return run(VETask(), args, config)


if __name__ == "__main__":
    main()
