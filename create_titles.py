"""Step 5 (optional): add a "title" to every record: its first caption's entities joined by " and ".

    python create_titles.py --data_json json/flickr30k_train_kw.json --output json/flickr30k_train_ttl_kw.json

The entities are the head nouns of the caption's noun phrases, found as in step 1 (extract_keywords.py)
but kept as written; a caption without any is its own title (spec §5.5). The original names these
files `*_ttl_kw.json`; the training and evaluation loaders ignore the field.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from preprocess import keywords
from preprocess.cli import add_output_args, add_tagger_args, run
from preprocess.files import atomic_write_json, read_annotations, refuse_existing


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data_json', required=True, help='annotation file: a JSON list of records')
    add_output_args(p, 'the same records, each with a "title"')
    p.add_argument('--text_field', default='caption',
                   help='record field holding the caption (a string or a list: the first is used)')
    add_tagger_args(p)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    refuse_existing([args.output], args.overwrite)
    tagger = keywords.load_tagger(args.tagger)
    records = read_annotations(args.data_json)
    titles = keywords.make_titles([r.get(args.text_field) for r in records], tagger, workers=args.workers)
    missing = sum(title is None for title in titles)
    if missing == len(records):
        raise ValueError(f"no record of {args.data_json} has a '{args.text_field}' field; check --text_field")
    out = [dict(record, title=title) if title is not None else record for record, title in zip(records, titles)]
    atomic_write_json(out, args.output)
    print(f'{len(records) - missing} titles ({missing} records without a '
          f"'{args.text_field}' field left as they were) -> {args.output}")
    return 0


if __name__ == '__main__':
    run(main)
