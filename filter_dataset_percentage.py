"""CLIP-score filter, global (spec §5.6): keep the best `per` fraction of all image-caption pairs.

    python filter_dataset_percentage.py --data_json json_pretrain/sbu_kw.json \
        --caption_emb embeddings/sbu_caption_embeddings \
        --image_emb image_embeddings/sbu_image_embeddings --per 0.7 \
        --output json_pretrain/sbu_kw_70.json

Output: the kept records sorted by `sim` (descending), each with its `sim`. Without the two
embedding flags, an already scored file is re-filtered on its stored `sim`.
"""
from __future__ import annotations

from typing import List, Optional

from preprocess.cli import filter_main, run


def main(argv: Optional[List[str]] = None) -> int:
    return filter_main(argv, 'percentage', __doc__.split('\n')[0])


if __name__ == '__main__':
    run(main)
