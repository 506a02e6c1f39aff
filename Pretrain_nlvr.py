"""ViCHA NLVR2 text-assignment pretraining: which of two images does the caption describe?

    python Pretrain_nlvr.py --config configs/NLVR_pretrain.yaml --output_dir output/NLVR_pretrain \
        --checkpoint Pretrain/checkpoint_last.pth --data_dir /data --data_json_dir /data/json_pretrain

The pretraining checkpoint's fusion layers are duplicated into the 18-layer image-pair encoder;
the result (checkpoint_last.pth) is the starting point of NLVR.py.
"""

from __future__ import annotations

from typing import Optional, Sequence

from engine.cli import DEMO_DATA_DIR, build_parser, parse_and_load
from engine.tasks import PretrainNLVRTask
from engine.trainer import run


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser(__doc__.splitlines()[0], config="./configs/NLVR_pretrain.yaml",
                          output_dir="output/NLVR_pretrain", data_json_dir=f"{DEMO_DATA_DIR}/json_pretrain",
                          evaluate=False)
    args, config = parse_and_load(parser, argv)
    return run(PretrainNLVRTask(), args, config)


if __name__ == "__main__":
    main()
