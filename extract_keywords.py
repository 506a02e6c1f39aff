"""Step 1: annotation JSON(s) -> concept vocabulary JSON (head nouns of noun phrases, spec §5.1).

    python extract_keywords.py --data_json data/coco.json --output keywords/coco_keywords.json

The POS tagger data is fetched once with `python -m nltk.downloader averaged_perceptron_tagger_eng`
(or pass --tagger DIR with your own tagger saved by `preprocess.keywords.save_tagger`).
"""
from __future__ import annotations

import argparse
import shutil
from typing import List, Optional

from preprocess import keywords
from preprocess.cli import add_output_args, add_shard_args, add_tagger_args, read_many, run
from preprocess.files import atomic_write_json, refuse_existing


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data_json', nargs='+', required=True,
                   help='annotation file(s): JSON lists of records; all are counted together')
    add_output_args(p, 'vocabulary JSON: list of concepts, most frequent first')
    p.add_argument('--text_field', default='caption',
                   help="record field holding the text (a string or a list of strings)")
    p.add_argument('--nlvr2', action='store_true', help="read NLVR2's 'sentence' field")
    p.add_argument('--thresh', type=int, default=0,
                   help='keep concepts whose count (occurrences - 1) exceeds this: 0 for COCO, '
                        'SBU, VG, NLVR2, CC12M (>= 2 occurrences), 2 for the CC3M vocabulary')
    p.add_argument('--max_num_keys', type=int, default=None,
                   help='instead of --thresh, keep the N most frequent concepts')
    p.add_argument('--counts_output', default=None,
                   help='also write the full {concept: count} dict (original counting rule)')
    add_tagger_args(p)
    add_shard_args(p, 100000)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    outputs = [args.output] + ([args.counts_output] if args.counts_output else [])
    refuse_existing(outputs, args.overwrite)
    tagger = keywords.load_tagger(args.tagger)
    field = 'sentence' if args.nlvr2 else args.text_field
    records = read_many(args.data_json)
    texts = [r.get(field) for r in records]
    occurrences, skipped, finished = keywords.count_concepts(
        texts, tagger, workers=args.workers, shard_size=args.shard_size,
        work_dir=args.output + '.shards', restart=args.overwrite, max_shards=args.max_shards)
    if not finished:
        print(f'stopped after --max_shards {args.max_shards}; rerun the same command to resume')
        return 0
    vocab = keywords.build_vocabulary(occurrences, args.thresh, args.max_num_keys)
    if not vocab:
        raise ValueError(
            f"empty vocabulary: no concept occurs more than {args.thresh + 1} times in "
            f"{len(records) - skipped} records with a '{field}' field "
            f"({len(occurrences)} distinct concepts); lower --thresh or check --text_field")
    atomic_write_json(vocab, args.output)
    if args.counts_output:
        atomic_write_json(keywords.original_counts(occurrences), args.counts_output)
    shutil.rmtree(args.output + '.shards', ignore_errors=True)
    print(f'{len(vocab)} concepts from {len(records)} records '
          f"({skipped} without a '{field}' field skipped) -> {args.output}")
    return 0


if __name__ == '__main__':
    run(main)
