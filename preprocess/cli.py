"""Flags and error handling shared by the preprocessing commands."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, List, Optional, Sequence

from .files import read_annotations

# Errors that mean bad input or a refused overwrite: reported as one line, not a traceback.
USER_ERRORS = (FileExistsError, FileNotFoundError, ValueError, LookupError)


def add_output_args(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument('--output', required=True, help=help_text)
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing output (refused otherwise)')


def add_shard_args(parser: argparse.ArgumentParser, default_size: int) -> None:
    parser.add_argument('--shard_size', type=int, default=default_size,
                        help='items per resumable shard; finished shards are kept in '
                             '<output>.shards/ and skipped when the command is rerun')
    parser.add_argument('--max_shards', type=int, default=None,
                        help='stop after this many new shards (time-limited jobs); rerun to go on')


def add_tagger_args(parser: argparse.ArgumentParser) -> None:
    """The POS tagger and the number of tagging processes (steps 1 and 5)."""
    parser.add_argument('--tagger', default=None,
                        help="directory with a tagger saved by preprocess.keywords.save_tagger "
                             "(default: NLTK's averaged_perceptron_tagger_eng)")
    parser.add_argument('--workers', type=int, default=1, help='tagging processes')


def add_compute_args(parser: argparse.ArgumentParser, chunk: int) -> None:
    parser.add_argument('--chunk', type=int, default=chunk,
                        help='records scored at once; bounds memory, not the result')
    parser.add_argument('--device', default='auto', help="'cuda', 'cpu' or 'auto' (cuda if present)")
    parser.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'float16', 'bfloat16'],
                        help='similarity precision; auto = float16 on CUDA (as the original), '
                             'float32 on CPU')


def read_many(paths: Sequence[str]) -> List[dict]:
    """Concatenate annotation files in order."""
    records: List[dict] = []
    for path in paths:
        records.extend(read_annotations(path))
    return records


def run(main: Callable[[Optional[List[str]]], int]) -> None:
    """Entry point: run `main`, turning input errors into a one-line message and exit status 2."""
    try:
        sys.exit(main(None))
    except USER_ERRORS as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f'error: {message}', file=sys.stderr)
        sys.exit(2)


def filter_main(argv: Optional[List[str]], kind: str, description: str) -> int:
    """Shared body of the two CLIP-score filter commands; `kind` is 'percentage' or 'per_image'."""
    from .clip_model import resolve_device
    from .embeddings import load_embeddings
    from .files import atomic_write_json, refuse_existing
    from .filtering import (existing_similarities, filter_per_image, filter_percentage,
                            pair_similarities, recipe_per)

    p = argparse.ArgumentParser(description=description)
    p.add_argument('--data_json', required=True, help='annotation file: records with image, caption')
    p.add_argument('--caption_emb', default=None,
                   help='caption embeddings (save_caption_embeddings.py)')
    p.add_argument('--image_emb', default=None, help='image embeddings (save_image_embeddings.py)')
    add_output_args(p, 'filtered annotation JSON (records carry "sim")')
    p.add_argument('--per', type=float, default=None, help='fraction to keep, e.g. 0.7')
    p.add_argument('--recipe', choices=['800k'], default=None,
                   help="take --per from the ViCHA 800K recipe (VG per image 0.5, SBU global 0.7)")
    p.add_argument('--image_root', default=None,
                   help='join image strings to this before the embedding lookup')
    add_compute_args(p, 65536)
    args = p.parse_args(argv)
    if args.per is None and args.recipe is None:
        p.error('give --per or --recipe')
    per = args.per if args.per is not None else recipe_per(args.recipe, kind)
    if (args.caption_emb is None) != (args.image_emb is None):
        p.error('give both --caption_emb and --image_emb, or neither to re-filter stored "sim"')
    refuse_existing([args.output], args.overwrite)
    records = read_annotations(args.data_json)
    if args.caption_emb is None:
        sims, reasons = existing_similarities(records)
    else:
        sims, reasons = pair_similarities(
            records, load_embeddings(args.caption_emb), load_embeddings(args.image_emb),
            image_root=args.image_root, chunk_size=args.chunk,
            device=str(resolve_device(args.device)), dtype=args.dtype)
    select = filter_percentage if kind == 'percentage' else filter_per_image
    out = select(records, sims, per)
    atomic_write_json(out, args.output)
    skipped = '; '.join(f'{n} skipped: {why}' for why, n in sorted(reasons.items()))
    print(f'new size {len(out)} vs old size {len(records)} (per={per}) -> {args.output}'
          + (f'; {skipped}' if skipped else ''))
    return 0
