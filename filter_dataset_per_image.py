"""CLIP-score filter, per image (spec §5.6): keep the best `per` fraction of each image's captions.

    python filter_dataset_per_image.py --data_json json_pretrain/vg_kw.json \
        --caption_emb embeddings/vg_caption_embeddings \
        --image_emb image_embeddings/vg_image_embeddings --per 0.5 \
        --output json_pretrain/vg_kw_50.json

Each image keeps floor(per * its captions), best first, so an image with fewer than 1/per
captions loses all of them (as the original). Output grouped by image in first-appearance order,
records carry `sim`.
"""
from __future__ import annotations

from typing import List, Optional

from preprocess.cli import filter_main, run


def main(argv: Optional[List[str]] = None) -> int:
    return filter_main(argv, 'per_image', __doc__.split('\n')[0])


if __name__ == '__main__':
    run(main)
