"""Step 4: image embeddings x concept embeddings -> annotation JSON with top-k concepts (spec §5.4).

    python create_clip_da_captions_from_saved.py --data_json data/coco.json \
        --concept_emb embeddings/coco_keywords_embeddings \
        --image_emb image_embeddings/coco_image_embeddings --output json_pretrain/coco_kw.json

Every record gets `kwords`: the k (default 15) concepts most similar to its image, most similar
first (--nlvr: `kwords1` / `kwords2` from `images[0]` / `images[1]`). Records keep their order
and other fields. Embedding stores may be `.npy` + `.keys.json` or the original JSON files.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from preprocess.assign import MISSING_POLICIES, assign_concepts
from preprocess.cli import add_compute_args, add_output_args, add_shard_args, run
from preprocess.clip_model import resolve_device
from preprocess.embeddings import load_embeddings
from preprocess.files import atomic_write_json, read_annotations, refuse_existing


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data_json', required=True, help='annotation file to augment')
    p.add_argument('--concept_emb', required=True,
                   help='concept embeddings (save_kwords_embeddings.py output, or original JSON)')
    p.add_argument('--image_emb', required=True,
                   help='image embeddings (save_image_embeddings.py output, or original JSON)')
    add_output_args(p, 'augmented annotation JSON')
    p.add_argument('--k', type=int, default=15, help='concepts per image (15 in every recorded run)')
    p.add_argument('--image_root', default=None,
                   help='join image strings to this before the embedding lookup; the embedding '
                        'keys must then be the joined paths')
    p.add_argument('--nlvr', action='store_true', help='NLVR2 records: kwords1 / kwords2')
    p.add_argument('--missing', default='error', choices=MISSING_POLICIES,
                   help='records whose image has no embedding: fail (default), drop them, or '
                        'keep them without concepts')
    add_compute_args(p, 4096)
    add_shard_args(p, 200000)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    refuse_existing([args.output], args.overwrite)
    records = read_annotations(args.data_json)
    concepts = load_embeddings(args.concept_emb)
    images = load_embeddings(args.image_emb)
    out, stats = assign_concepts(
        records, concepts, images, k=args.k, nlvr=args.nlvr, image_root=args.image_root,
        missing=args.missing, chunk_size=args.chunk, device=str(resolve_device(args.device)),
        dtype=args.dtype, work_dir=args.output + '.shards', shard_size=args.shard_size,
        restart=args.overwrite, max_shards=args.max_shards)
    if out is None:
        print(f'stopped after --max_shards {args.max_shards}; rerun the same command to resume')
        return 0
    atomic_write_json(out, args.output)
    print(f'{stats.assigned} of {stats.records} records given {args.k} concepts -> {args.output}'
          + (f'; {stats.missing} without an image embedding ({args.missing})'
             if stats.missing else ''))
    return 0


if __name__ == '__main__':
    run(main)
