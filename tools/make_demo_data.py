"""Generate the synthetic demo data set (shape scenes in the real annotation formats).

Example: python tools/make_demo_data.py --out data/demo --seed 0 --image_size 64
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset.synthetic import generate  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (becomes --data_dir)")
    parser.add_argument("--seed", type=int, default=0, help="same seed gives byte-identical JSON files")
    parser.add_argument("--image_size", type=int, default=64, help="side of the square pictures in pixels")
    parser.add_argument("--num_pretrain", type=int, default=1000, help="pretraining images")
    parser.add_argument("--num_retrieval", type=int, default=200, help="retrieval training images (5 captions each)")
    parser.add_argument("--num_vqa", type=int, default=200, help="VQA training images (3 questions each)")
    parser.add_argument("--num_ve", type=int, default=200, help="VE training images (3 statements each)")
    parser.add_argument("--num_nlvr", type=int, default=600, help="NLVR training image pairs (2 statements each)")
    parser.add_argument("--num_grounding", type=int, default=200, help="RefCOCO+ training images")
    parser.add_argument("--num_eval", type=int, default=50, help="images (NLVR: pairs) per evaluation split")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    args = parse_args(argv)
    sizes = {k: v for k, v in vars(args).items() if k.startswith("num_")}
    paths = generate(args.out, seed=args.seed, image_size=args.image_size, **sizes)
    print(f"wrote {len(paths)} annotation/vocabulary files and the images under {args.out} (see {paths['readme']})")
    return paths


if __name__ == "__main__":
    main()
