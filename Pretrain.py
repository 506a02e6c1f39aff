"""ViCHA pretraining: ITC + hierarchical ITC + ITM + MLM + MAE with visual concepts.

    python Pretrain.py --config configs/Pretrain.yaml --output_dir output/Pretrain \
        --data_dir /data --data_json_dir /data/json_pretrain
    torchrun --nproc_per_node=4 Pretrain.py --config configs/Pretrain.yaml ...
"""

from __future__ import annotations

from typing import Optional, Sequence

from engine.cli import DEMO_DATA_DIR, build_parser, parse_and_load
from engine.tasks import PretrainTask
from engine.trainer import run


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser(__doc__.splitlines()[0], config="./configs/Pretrain.yaml", output_dir="Pretrain/",
                          data_json_dir=f"{DEMO_DATA_DIR}/json_pretrain", evaluate=False)
    args, config = parse_and_load(parser, argv)
    return run(PretrainTask(), args, config)


if __name__ == "__main__":
    main()
