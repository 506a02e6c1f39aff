"""ViCHA image-text retrieval (COCO / Flickr30k): fine-tune with ITC + ITM, evaluate recall@1/5/10.

    python Retrieval.py --config configs/Retrieval_coco.yaml --output_dir output/Retrieval_coco \
        --data_dir /data --data_json_dir /data/json --checkpoint Pretrain/checkpoint_last.pth
    python Retrieval.py --evaluate --config configs/Retrieval_flickr.yaml \
        --checkpoint output/Retrieval_coco/checkpoint_best.pth      # e.g. zero-shot Flickr30k
"""

from __future__ import annotations

from typing import Optional, Sequence

from engine.cli import DEMO_DATA_DIR, build_parser, parse_and_load
from engine.tasks import RetrievalTask
from engine.trainer import run


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser(__doc__.splitlines()[0], config="./configs/Retrieval_flickr.yaml",
                          output_dir="output/Retrieval_flickr", data_json_dir=f"{DEMO_DATA_DIR}/json")
    parser.add_argument("--checkpoint0", default=None,
                        help="checkpoint loaded before --checkpoint with the same remap (ignored without it)")
    args, config = parse_and_load(parser, argv)
    return run(RetrievalTask(), args, config)


if __name__ == "__main__":
    main()
