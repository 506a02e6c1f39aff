"""Step 4: write each record's top-k visual concepts into the annotation file (spec §5.4).

Image embeddings are looked up by the record's image string (joined to `image_root` when
given, which must then match the stored keys); each distinct image is scored once, in chunks,
in resumable shards. The field is `kwords` (NLVR2: `kwords1` / `kwords2` from `images[0]` /
`images[1]`): k concept strings, most similar first.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .embeddings import EmbeddingStore
from .encode import image_fields
from .files import PathLike
from .shards import ShardedJob, fingerprint_strings
from .topk import assign_topk

MISSING_POLICIES = ('error', 'drop', 'keep')


class MissingEmbeddings(LookupError):
    """Records reference images that have no embedding (and the policy is `error`)."""


@dataclass
class AssignStats:
    """Counts of records given concepts and of records whose image has no embedding."""

    records: int
    assigned: int
    missing: int
    missing_examples: List[str] = field(default_factory=list)
    finished: bool = True


def lookup_key(image: str, image_root: Optional[str]) -> str:
    """Embedding key of an image string: itself, or joined to `image_root` (§5.4)."""
    return os.path.join(image_root, image) if image_root else image


def _record_rows(records: Sequence[dict], store: EmbeddingStore, nlvr: bool,
                 image_root: Optional[str]) -> Tuple[np.ndarray, List[str]]:
    """(records, slots) embedding rows, -1 where missing; and the missing keys, first ones first."""
    slots = 2 if nlvr else 1
    index = store.index
    rows = np.full((len(records), slots), -1, dtype=np.int64)
    missing: List[str] = []
    for r, record in enumerate(records):
        for s, image in enumerate(image_fields(record, nlvr)):
            key = lookup_key(image, image_root) if image is not None else None
            row = index.get(key, -1) if key is not None else -1
            rows[r, s] = row
            if row < 0:
                missing.append(key if key is not None else f'<record {r}: no image field>')
    return rows, missing


def topk_for_rows(images: EmbeddingStore, concepts: EmbeddingStore, rows: np.ndarray, k: int, *,
                  chunk_size: int = 4096, device: str = 'cpu', dtype: str = 'auto',
                  work_dir: Optional[PathLike] = None, shard_size: int = 200000,
                  restart: bool = False, max_shards: Optional[int] = None,
                  ) -> Optional[np.ndarray]:
    """Top-k concept indices for the image rows `rows` (sorted, distinct), optionally in shards.

    Returns None when `max_shards` stopped the run before the last shard.
    """
    if work_dir is None:
        return assign_topk(images.matrix, concepts.matrix, k, chunk_size=chunk_size, rows=rows,
                           device=device, dtype=dtype)[0]
    fingerprint = {'step': 'topk', 'k': k, 'dtype': dtype,
                   'concepts': fingerprint_strings(concepts.keys),
                   'images': fingerprint_strings(images.keys[i] for i in rows)}
    job = ShardedJob(work_dir, fingerprint, len(rows), shard_size, restart=restart)
    todo = job.pending()[:max_shards] if max_shards is not None else job.pending()
    for shard in todo:
        start, stop = job.bounds(shard)
        idx, _ = assign_topk(images.matrix, concepts.matrix, k, chunk_size=chunk_size,
                             rows=rows[start:stop], device=device, dtype=dtype)
        job.save(shard, {}, {'idx': idx})
    if not job.complete:
        return None
    out = np.empty((len(rows), k), dtype=np.int32)
    for shard in range(job.num_shards):
        start, stop = job.bounds(shard)
        out[start:stop] = job.load(shard)[1]['idx']
    job.remove()
    return out


def assign_concepts(records: Sequence[dict], concepts: EmbeddingStore, images: EmbeddingStore,
                    *, k: int = 15, nlvr: bool = False, image_root: Optional[str] = None,
                    missing: str = 'error', **topk_kwargs) -> Tuple[Optional[List[dict]], AssignStats]:
    """Records with their top-k concepts added; `missing` says what to do with records whose
    image has no embedding: raise (`error`), leave them out (`drop`), or keep them without
    concepts (`keep`, as the original NLVR2 variant)."""
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
    if len(concepts) == 0:
        raise ValueError("the concept vocabulary is empty: nothing to assign")
    rows, missing_keys = _record_rows(records, images, nlvr, image_root)
    has_all = (rows >= 0).all(axis=1)
    stats = AssignStats(len(records), int(has_all.sum()), int((~has_all).sum()), missing_keys[:5])
    if stats.missing and missing == 'error':
        raise MissingEmbeddings(
            f"{stats.missing} of {len(records)} records have no image embedding (e.g. "
            f"{', '.join(map(repr, missing_keys[:5]))}); check --image_root, or pass "
            "--missing drop to leave them out / --missing keep to keep them without concepts")
    needed = np.unique(rows[rows >= 0])
    topk = topk_for_rows(images, concepts, needed, k, **topk_kwargs)
    if topk is None:
        stats.finished = False
        return None, stats
    vocab = concepts.keys
    fields = ('kwords1', 'kwords2') if nlvr else ('kwords',)
    positions = np.searchsorted(needed, rows)  # (records, slots) -> row of `topk`
    out: List[dict] = []
    for record, record_pos, complete in zip(records, positions, has_all):
        if not complete:
            if missing == 'keep':
                out.append(record)
            continue
        new = dict(record)
        for name, pos in zip(fields, record_pos):
            new[name] = [vocab[j] for j in topk[pos]]
        out.append(new)
    return out, stats

