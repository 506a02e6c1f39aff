"""Caption embeddings for CLIP-score filtering (spec §5.6): one row per distinct caption string.

    python save_caption_embeddings.py --data_json data/sbu.json \
        --output embeddings/sbu_caption_embeddings

Captions are truncated to CLIP's 77-token context, as the original (`truncate=True`).
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional

from preprocess.cli import add_output_args, add_shard_args, read_many, run
from preprocess.clip_model import add_clip_args, clip_from_args
from preprocess.embeddings import DTYPES, embed_sharded, store_paths
from preprocess.encode import text_encoder
from preprocess.files import refuse_existing


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data_json', nargs='+', required=True, help='annotation file(s)')
    add_output_args(p, 'embedding store stem: writes <output>.npy and <output>.keys.json')
    add_clip_args(p)
    p.add_argument('--batch_size', type=int, default=1024, help='captions encoded at once')
    p.add_argument('--dtype', default='float16', choices=DTYPES, help='stored precision')
    add_shard_args(p, 200000)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    refuse_existing(store_paths(args.output), args.overwrite)
    records = read_many(args.data_json)
    seen: Dict[str, None] = {}
    lacking = 0
    for record in records:
        caption = record.get('caption')
        captions = [caption] if isinstance(caption, str) else (
            [c for c in caption if isinstance(c, str)] if isinstance(caption, list) else [])
        lacking += not captions
        for c in captions:
            seen.setdefault(c, None)
    captions = list(seen)
    if not captions:
        raise ValueError(f"no 'caption' strings found in {', '.join(args.data_json)}")
    clip = clip_from_args(args)
    result = embed_sharded(captions, text_encoder(clip, captions, args.batch_size), args.output,
                           fingerprint={'step': 'captions', 'clip': clip.description},
                           shard_size=args.shard_size, dtype=args.dtype,
                           overwrite=args.overwrite, max_shards=args.max_shards,
                           desc='caption embeddings')
    if not result.finished:
        print(f'stopped after --max_shards {args.max_shards}; rerun the same command to resume')
        return 0
    print(f'{result.written} caption embeddings -> {store_paths(args.output)[0]}'
          + (f'; {lacking} records without a caption skipped' if lacking else ''))
    return 0


if __name__ == '__main__':
    run(main)
