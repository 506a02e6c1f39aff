"""Step 3: annotation JSON(s) + image folder -> CLIP image embeddings (spec §5.3).

    python save_image_embeddings.py --data_json data/coco.json --data_dir /data \
        --output image_embeddings/coco_image_embeddings

One row per distinct image string, keyed exactly as the string appears in the JSON (`image`, or
both entries of `images` with --nlvr). Images are decoded by DataLoader workers and encoded in
batches on the GPU when there is one. Unreadable or missing images are skipped, counted and
listed in `<output>.skipped.json`.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from preprocess.cli import add_output_args, add_shard_args, read_many, run
from preprocess.clip_model import add_clip_args, clip_from_args
from preprocess.embeddings import DTYPES, embed_sharded, store_paths
from preprocess.encode import image_encoder, image_file, unique_image_keys
from preprocess.files import atomic_write_json, refuse_existing


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data_json', nargs='+', required=True, help='annotation file(s)')
    add_output_args(p, 'embedding store stem: writes <output>.npy and <output>.keys.json')
    where = p.add_mutually_exclusive_group()
    where.add_argument('--image_root', default=None,
                       help='folder the image strings are relative to')
    where.add_argument('--data_dir', default=None,
                       help='pretraining layout: drop the first four /-components of each '
                            'absolute image path and join the rest to this folder (spec §4.2.1)')
    p.add_argument('--ext', default='', help="appended to file paths, not keys ('.jpg' for SNLI-VE)")
    p.add_argument('--nlvr', action='store_true', help="NLVR2 records: embed both 'images'")
    add_clip_args(p)
    p.add_argument('--batch_size', type=int, default=256, help='images per forward pass')
    p.add_argument('--num_workers', type=int, default=8, help='DataLoader decoding workers')
    p.add_argument('--dtype', default='float16', choices=DTYPES, help='stored precision')
    add_shard_args(p, 50000)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    npy, keys_path = store_paths(args.output)
    refuse_existing([npy, keys_path], args.overwrite)
    records = read_many(args.data_json)
    keys, lacking = unique_image_keys(records, args.nlvr)
    if not keys:
        raise ValueError(f"no image strings found in {', '.join(args.data_json)}")
    paths = [image_file(k, args.image_root, args.data_dir, args.ext) for k in keys]
    clip = clip_from_args(args)
    result = embed_sharded(keys, image_encoder(clip, paths, args.batch_size, args.num_workers),
                           args.output, fingerprint={'step': 'images', 'clip': clip.description,
                                                     'paths': [args.image_root, args.data_dir,
                                                               args.ext]},
                           shard_size=args.shard_size, dtype=args.dtype,
                           overwrite=args.overwrite, max_shards=args.max_shards,
                           desc='image embeddings')
    if not result.finished:
        print(f'stopped after --max_shards {args.max_shards}; rerun the same command to resume')
        return 0
    skipped_file = str(npy)[:-len('.npy')] + '.skipped.json'
    if result.skipped:
        atomic_write_json(result.skipped, skipped_file)
    print(f'{result.written} image embeddings -> {npy}; {len(result.skipped)} unreadable images '
          f'skipped' + (f' (listed in {skipped_file})' if result.skipped else '')
          + (f'; {lacking} records without an image field' if lacking else ''))
    return 0


if __name__ == '__main__':
    run(main)
