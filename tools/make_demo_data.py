"""Generate the synthetic demo data set (shape scenes in the real annotation formats).

Example: python tools/make_demo_data.py --out data/demo --seed 0 --image_size 64
"""

from __future__ import annotations

import argparse
import inspect
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
    sizes = {name: p.default for name, p in inspect.signature(generate).parameters.items() if name.startswith("num_")}
    helps = {
        "num_pretrain": "pretraining images", "num_retrieval": "retrieval training images (5 captions each)",
        "num_vqa": "VQA training images (3 questions each)", "num_ve": "VE training images (3 statements each)",
        "num_nlvr": "NLVR training image pairs (2 statements each)", "num_grounding": "RefCOCO+ training images",
        "num_eval": "images (NLVR: pairs) per evaluation split",
    }
    for name, default in sizes.items():  # defaults live in generate() only
        parser.add_argument(f"--{name}", type=int, default=default, help=f"{helps[name]} (default {default})")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    args = parse_args(argv)
    sizes = {k: v for k, v in vars(args).items() if k.startswith("num_")}
    paths = generate(args.out, seed=args.seed, image_size=args.image_size, **sizes)
    print(f"wrote {len(paths)} annotation/vocabulary files and the images under {args.out} (see {paths['readme']})")
    return paths


if __name__ == "__main__":
    main()
