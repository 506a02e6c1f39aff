"""ViCHA weakly supervised visual grounding on RefCOCO+: retrieval fine-tuning, Grad-CAM box selection.

    python Grounding.py --config configs/Grounding.yaml --output_dir output/RefCOCO \
        --data_dir /data --data_json_dir /data/json --checkpoint Pretrain/checkpoint_last.pth
    python Grounding.py --evaluate --checkpoint output/RefCOCO/checkpoint_best.pth ...
"""

from __future__ import annotations

from typing import Optional, Sequence

from engine.cli import DEMO_DATA_DIR, build_parser, parse_and_load
from engine.tasks import GroundingTask
from engine.trainer import run


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser(__doc__.splitlines()[0], config="./configs/Grounding.yaml", output_dir="output/RefCOCO",
                          data_json_dir=f"{DEMO_DATA_DIR}/json")
    parser.add_argument("--gradcam_mode", default="itm", choices=["itm", "itc"],
                        help="Grad-CAM of the ITM score on a fusion layer's cross-attention, or of the ITC "
                             "similarity on a ViT block's self-attention")
    parser.add_argument("--block_num", default=None, type=int,
                        help="itm: text layer whose cross-attention gives the Grad-CAM; itc: ViT block "
                             "(default: config block_num, else 8)")
    args, config = parse_and_load(parser, argv)
    return run(GroundingTask(args.gradcam_mode, args.block_num), args, config)


if __name__ == "__main__":
    main()
