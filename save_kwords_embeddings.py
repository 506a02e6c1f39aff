"""Step 2: concept vocabulary -> CLIP text embeddings (spec §5.2), one row per concept.

    python save_kwords_embeddings.py --vocab keywords/coco_keywords.json \
        --output embeddings/coco_keywords_embeddings

Writes `<output>.npy` (rows in vocabulary order) + `<output>.keys.json`. Concepts are encoded
as-is (no prompt template) and stored un-normalised, as the original.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from preprocess.cli import add_output_args, add_shard_args, run
from preprocess.clip_model import add_clip_args, clip_from_args
from preprocess.embeddings import DTYPES, embed_sharded, store_paths
from preprocess.encode import text_encoder
from preprocess.files import read_json, refuse_existing


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--vocab', required=True, help='vocabulary JSON (list of concept strings)')
    add_output_args(p, 'embedding store stem: writes <output>.npy and <output>.keys.json')
    add_clip_args(p)
    p.add_argument('--batch_size', type=int, default=1024, help='concepts encoded at once')
    p.add_argument('--dtype', default='float16', choices=DTYPES, help='stored precision')
    add_shard_args(p, 50000)
    return p.parse_args(argv)


def load_vocabulary(path: str) -> List[str]:
    """Vocabulary list (a {concept: count} dict is also accepted, in its key order)."""
    vocab = read_json(path, 'vocabulary file')
    vocab = list(vocab) if isinstance(vocab, dict) else vocab
    if not isinstance(vocab, list) or not all(isinstance(v, str) for v in vocab):
        raise ValueError(f"vocabulary {path} must be a JSON list of strings")
    if not vocab:
        raise ValueError(f"vocabulary {path} is empty: rerun extract_keywords.py with a lower "
                         "--thresh")
    if len(set(vocab)) != len(vocab):
        raise ValueError(f"vocabulary {path} repeats concepts")
    return vocab


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    refuse_existing(store_paths(args.output), args.overwrite)
    vocab = load_vocabulary(args.vocab)
    clip = clip_from_args(args)
    result = embed_sharded(vocab, text_encoder(clip, vocab, args.batch_size), args.output,
                           fingerprint={'step': 'concepts', 'clip': clip.description},
                           shard_size=args.shard_size, dtype=args.dtype,
                           overwrite=args.overwrite, max_shards=args.max_shards,
                           desc='concept embeddings')
    if not result.finished:
        print(f'stopped after --max_shards {args.max_shards}; rerun the same command to resume')
        return 0
    print(f'{result.written} concept embeddings -> {store_paths(args.output)[0]}')
    return 0


if __name__ == '__main__':
    run(main)
