"""Concept vocabulary: head nouns of the noun phrases of every caption (spec §5.1), with NLTK.

The original parsed captions with SceneGraphParser on spaCy and kept, for each noun chunk, its
root noun with the root's compound nouns in front ("stop sign", "tennis racket"), lower-cased,
pronoun chunks and the nouns of phrasal prepositions ("front" in "in front of") excluded.
Here the same unit comes from NLTK: a data-free word tokenizer, the averaged-perceptron POS
tagger (or any tagger with a `tag(tokens)` method), a `RegexpParser` noun-phrase grammar, and
as head the last noun of the chunk together with the nouns directly before it.

Counting [R]: the first occurrence of a concept stores 0 and each later one adds 1; the
vocabulary is every concept whose count exceeds `thresh`, by decreasing count, ties in order
of first occurrence. Captions are processed in resumable shards, optionally in parallel; the
merged counts and their order do not depend on the shard size or the number of workers.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from tqdm import tqdm

from .files import PathLike
from .shards import ShardedJob, fingerprint_strings

TAGGER_DOWNLOAD = 'python -m nltk.downloader averaged_perceptron_tagger_eng'

# Noun phrases over Penn Treebank tags. The first rule keeps a possessive and its owner inside
# the phrase ("the man 's hat" -> head "hat", as a spaCy noun chunk does); the second is the
# plain phrase: determiners, numbers, adjectives / participles, then one or more nouns.
NP_GRAMMAR = r"""
NP: {<DT|PDT|PRP\$|CD>*<JJ.*|VBN|VBG|CD>*<NN.*>+<POS><JJ.*|VBN|VBG|CD>*<NN.*>+}
    {<DT|PDT|PRP\$|CD>*<JJ.*|VBN|VBG|CD>*<NN.*>+}
"""

# Phrasal prepositions whose noun is not an entity (SceneGraphParser's list).
PHRASAL_PREPOSITIONS = (
    'in addition to', 'in front of', 'in reference to', 'in regard to', 'in spite of',
    'on account of', 'on top of', 'on side of', 'on the side of', 'with regard to',
)
_PREP_PATTERNS = [tuple(p.split()) for p in PHRASAL_PREPOSITIONS]

_SENTENCE_END = re.compile(r'(?<=[.!?])\s+')
_HAS_LETTER = re.compile(r'[^\W\d_]')
_HAS_WORD_CHAR = re.compile(r'\w')

Text = Union[str, List[str], None]


class TaggerDataMissing(LookupError):
    """NLTK's tagger data is not installed; the message gives the command that installs it."""


def load_tagger(path: Optional[PathLike] = None) -> Any:
    """NLTK's English averaged-perceptron tagger, or one saved with `save_tagger` at `path`."""
    from nltk.tag.perceptron import PerceptronTagger

    if path is not None:
        return _load_tagger_dir(Path(path))
    try:
        return PerceptronTagger()
    except LookupError as e:
        raise TaggerDataMissing(
            "NLTK's POS tagger data 'averaged_perceptron_tagger_eng' is not installed. Install it "
            f"once with:\n    {TAGGER_DOWNLOAD}\nor pass --tagger DIR with a tagger saved by "
            "preprocess.keywords.save_tagger.") from e


def save_tagger(tagger: Any, directory: PathLike) -> None:
    """Save a trained `PerceptronTagger` as NLTK's three JSON files (weights, tagdict, classes)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights, tagdict, classes = tagger.encode_json_obj()
    for part, value in (('weights', weights), ('tagdict', tagdict), ('classes', classes)):
        with open(directory / f'averaged_perceptron_tagger_eng.{part}.json', 'w',
                  encoding='utf-8') as f:
            json.dump(value, f)


def _load_tagger_dir(directory: Path) -> Any:
    from nltk.tag.perceptron import PerceptronTagger

    found = sorted(directory.glob('*.weights.json')) if directory.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"no tagger in {directory}: expected NLTK's averaged_perceptron_tagger_*.weights.json, "
            ".tagdict.json and .classes.json files (see preprocess.keywords.save_tagger)")
    prefix = str(found[0])[:-len('weights.json')]
    params = []
    for part in ('weights', 'tagdict', 'classes'):
        with open(prefix + part + '.json', encoding='utf-8') as f:
            params.append(json.load(f))
    tagger = PerceptronTagger(load=False)
    tagger.decode_json_params(params)
    return tagger


_WORDS = None


def tokenize(text: str) -> List[List[str]]:
    """Sentences of Treebank-style tokens ("man 's", "does n't"), as the tagger was trained on.

    Rule-based (NLTK's Treebank word tokenizer, sentences split after . ! ?): needs no data.
    """
    global _WORDS
    if _WORDS is None:
        from nltk.tokenize import NLTKWordTokenizer

        _WORDS = NLTKWordTokenizer()
    return [_WORDS.tokenize(s) for s in _SENTENCE_END.split(text.strip()) if s]


def _is_phrasal_preposition(words: Sequence[str], start: int, end: int) -> bool:
    """True if `words[start:end]` is the noun part of a phrasal preposition ("in [front] of")."""
    chunk = tuple(w.lower() for w in words[start:end])
    before = words[start - 1].lower() if start > 0 else None
    after = words[end].lower() if end < len(words) else None
    return any(p[1:-1] == chunk and p[0] == before and p[-1] == after for p in _PREP_PATTERNS)


def _sentence_heads(tagged: List[Tuple[str, str]], parser: Any, lower: bool = True) -> List[str]:
    """Head of every noun phrase of one tagged sentence, in order (lower-cased unless `lower` is False)."""
    words = [w for w, _ in tagged]
    heads, i = [], 0
    for node in parser.parse(tagged):
        if isinstance(node, tuple):
            i += 1
            continue
        leaves = node.leaves()
        start, end = i, i + len(leaves)
        i = end
        if _is_phrasal_preposition(words, start, end):
            continue
        head: List[str] = []
        for word, tag in reversed(leaves):
            if not tag.startswith('NN'):
                break
            head.insert(0, word)
        if head and all(_HAS_LETTER.search(w) for w in head):
            heads.append(' '.join(head).lower() if lower else ' '.join(head))
    return heads


_PARSER = None


def _parser() -> Any:
    global _PARSER
    if _PARSER is None:
        from nltk import RegexpParser

        _PARSER = RegexpParser(NP_GRAMMAR)
    return _PARSER


def concept_heads(text: str, tagger: Any, lower: bool = True) -> List[str]:
    """Head nouns of the noun phrases of `text`, in order of appearance, lower-cased by default.

    "a stop sign near a red car" -> ["stop sign", "car"].
    """
    parser = _parser()
    heads: List[str] = []
    for sent in tokenize(text):
        # Punctuation is tagged as itself (the Treebank convention) whatever the tagger says,
        # so a stray "." can never extend a noun phrase.
        tagged = [(w, t if _HAS_WORD_CHAR.search(w) else w) for w, t in tagger.tag(sent)]
        heads.extend(_sentence_heads(tagged, parser, lower))
    return heads


def make_title(value: Text, tagger: Any) -> Optional[str]:
    """Step 5 (spec §5.5): the entity heads of the first caption joined by " and ", as written (not
    lower-cased); the caption itself when it has none; None when the record has no caption."""
    captions = _texts_of(value)
    if not captions:
        return None
    heads = concept_heads(captions[0], tagger, lower=False)
    return ' and '.join(heads) if heads else captions[0]


def _texts_of(value: Text) -> List[str]:
    """A caption field holds a string or a list of strings; every caption is counted."""
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


# Worker-process state: the tagger is sent once per worker by the pool initializer.
_WORKER_TAGGER = None


def _init_worker(tagger: Any) -> None:
    global _WORKER_TAGGER
    _WORKER_TAGGER = tagger


@contextlib.contextmanager
def _batch_mapper(tagger: Any, workers: int) -> Iterator[Callable[[Callable, List[List[Text]]], Iterable]]:
    """`map_batches(fn, pieces)`, in order: in `workers` processes that each hold the tagger, or here."""
    if workers <= 1:
        yield lambda fn, pieces: (fn(piece, tagger) for piece in pieces)
        return
    pool = multiprocessing.get_context().Pool(workers, _init_worker, (tagger,))
    try:
        yield pool.imap
    finally:
        pool.terminate()


def _count_batch(texts: List[Text], tagger: Any = None) -> Tuple[Dict[str, int], int]:
    """Occurrences of each concept in `texts` (first-occurrence order) and records skipped."""
    tagger = tagger if tagger is not None else _WORKER_TAGGER
    occurrences: Dict[str, int] = {}
    skipped = 0
    for value in texts:
        captions = _texts_of(value)
        if not captions:
            skipped += 1
        for caption in captions:
            for head in concept_heads(caption, tagger):
                occurrences[head] = occurrences.get(head, 0) + 1
    return occurrences, skipped


def _title_batch(texts: List[Text], tagger: Any = None) -> List[Optional[str]]:
    tagger = tagger if tagger is not None else _WORKER_TAGGER
    return [make_title(value, tagger) for value in texts]


def make_titles(texts: Sequence[Text], tagger: Any, *, workers: int = 1, batch: int = 500) -> List[Optional[str]]:
    """`make_title` of every record's caption field, in order, in `workers` processes."""
    pieces = [list(texts[i:i + batch]) for i in range(0, len(texts), batch)]
    titles: List[Optional[str]] = []
    with _batch_mapper(tagger, workers) as map_batches, \
            tqdm(total=len(texts), desc='titling captions', unit='rec') as bar:
        for part in map_batches(_title_batch, pieces):
            titles.extend(part)
            bar.update(len(part))
    return titles


def _merge(total: Dict[str, int], part: Dict[str, int]) -> None:
    for key, n in part.items():
        total[key] = total.get(key, 0) + n


def count_concepts(texts: Sequence[Text], tagger: Any, *, workers: int = 1,
                   shard_size: int = 100000, work_dir: Optional[PathLike] = None,
                   restart: bool = False, max_shards: Optional[int] = None,
                   batch: int = 500) -> Tuple[Dict[str, int], int, bool]:
    """Occurrences of every concept over all captions, in first-occurrence order.

    With `work_dir`, shards are saved as they finish and a rerun resumes; returns
    (occurrences, records without a caption, finished).
    """
    if work_dir is not None:
        digest = fingerprint_strings(json.dumps(t, ensure_ascii=False) for t in texts)
        job: Optional[ShardedJob] = ShardedJob(
            work_dir, {'step': 'keywords', 'texts': digest}, len(texts), shard_size,
            restart=restart)
        todo = job.pending()[:max_shards] if max_shards is not None else job.pending()
        initial = len(texts) - sum(e - s for s, e in map(job.bounds, job.pending()))
        spans = [job.bounds(s) for s in todo]
    else:
        job, todo, spans, initial = None, [0], [(0, len(texts))], 0
    results: Dict[int, Tuple[Dict[str, int], int]] = {}
    with _batch_mapper(tagger, workers) as map_batches, \
            tqdm(total=len(texts), initial=initial, desc='tagging captions', unit='rec') as bar:
        for shard, (start, end) in zip(todo, spans):
            pieces = [list(texts[i:min(i + batch, end)]) for i in range(start, end, batch)]
            occurrences: Dict[str, int] = {}
            skipped = 0
            for piece, (occ, skip) in zip(pieces, map_batches(_count_batch, pieces)):
                _merge(occurrences, occ)
                skipped += skip
                bar.update(len(piece))
            if job is not None:
                job.save(shard, {'concepts': list(occurrences),
                                 'occurrences': list(occurrences.values()),
                                 'skipped': skipped})
            results[shard] = (occurrences, skipped)
    if job is not None:
        for shard in job.done:
            if shard not in results:
                meta, _ = job.load(shard)
                results[shard] = (dict(zip(meta['concepts'], meta['occurrences'])),
                                  meta['skipped'])
    total: Dict[str, int] = {}
    for shard in sorted(results):
        _merge(total, results[shard][0])
    skipped_total = sum(skip for _, skip in results.values())
    return total, skipped_total, job is None or job.complete


def original_counts(occurrences: Dict[str, int]) -> Dict[str, int]:
    """The original's stored counts: first occurrence 0, each later one +1 [R]."""
    return {k: n - 1 for k, n in occurrences.items()}


def build_vocabulary(occurrences: Dict[str, int], thresh: int = 0,
                     max_num_keys: Optional[int] = None) -> List[str]:
    """Concepts by decreasing count (stable), with count > `thresh`, or the top `max_num_keys`."""
    counts = original_counts(occurrences)
    ranked = sorted(counts, key=lambda k: counts[k], reverse=True)
    if max_num_keys is not None:
        return ranked[:max_num_keys]
    return [k for k in ranked if counts[k] > thresh]

