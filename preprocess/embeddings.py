"""Compact embedding store: `<stem>.npy` (rows) + `<stem>.keys.json` (the key of each row).

The original pipeline kept embeddings as JSON `{key: [[512 floats]]}`, about 10 KB of text per
vector; here a float16 row is 1 KB and the matrix can be memory-mapped, so later steps stream
over it in chunks. The reader also accepts the original JSON files.

Writing is sharded (`preprocess.shards`): rows are encoded shard by shard into
`<stem>.shards/`, an interrupted run resumes at the first unfinished shard, and the final files
are assembled (and the shards deleted) only once every shard is done.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from utils import atomic_path

from .files import PathLike, atomic_save_npy, atomic_write_json, read_json, refuse_existing
from .shards import ShardedJob, fingerprint_strings

KEYS_SUFFIX = '.keys.json'
DTYPES = ('float16', 'float32')


def store_paths(path: PathLike) -> Tuple[Path, Path]:
    """(`<stem>.npy`, `<stem>.keys.json`) for a store named by its stem or either file."""
    p = str(path)
    if p.endswith(KEYS_SUFFIX):
        p = p[:-len(KEYS_SUFFIX)]
    elif p.endswith('.npy'):
        p = p[:-len('.npy')]
    return Path(p + '.npy'), Path(p + KEYS_SUFFIX)


def work_dir(path: PathLike) -> Path:
    """Directory holding the shards of an unfinished store."""
    npy, _ = store_paths(path)
    return npy.with_suffix('.shards')


@dataclass
class EmbeddingStore:
    """Rows of `matrix` (N, D) keyed by `keys`; `matrix` may be a read-only memory map."""

    keys: List[str]
    matrix: np.ndarray
    _index: Optional[Dict[str, int]] = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def index(self) -> Dict[str, int]:
        """key -> row (the first row if a key repeats)."""
        if self._index is None:
            index: Dict[str, int] = {}
            for i, k in enumerate(self.keys):
                index.setdefault(k, i)
            self._index = index
        return self._index

    def rows_of(self, keys: Sequence[str]) -> np.ndarray:
        """Row of each key, -1 where the key has no embedding."""
        index = self.index
        return np.fromiter((index.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))


def _load_legacy_json(path: PathLike) -> EmbeddingStore:
    """Original format: `{key: [[f1 ... fD]]}` (1 x D nested lists, or flat lists)."""
    data = read_json(path, 'embedding file')
    if not isinstance(data, dict):
        raise ValueError(f"embedding file {path} must map keys to vectors")
    keys = list(data)
    if not keys:
        return EmbeddingStore([], np.zeros((0, 0), dtype=np.float32))
    matrix = np.stack([np.asarray(data[k], dtype=np.float32).reshape(-1) for k in keys])
    return EmbeddingStore(keys, matrix)


def load_embeddings(path: PathLike, mmap: bool = True) -> EmbeddingStore:
    """Open a store (`<stem>`, `<stem>.npy` or `<stem>.keys.json`) or an original JSON file."""
    p = str(path)
    if p.endswith('.json') and not p.endswith(KEYS_SUFFIX):
        return _load_legacy_json(p)
    npy, keys_path = store_paths(p)
    if not npy.is_file() or not keys_path.is_file():
        shards = work_dir(p)
        hint = (f"; {shards} holds an unfinished run: rerun the command that writes it to resume"
                if shards.is_dir() else '')
        raise FileNotFoundError(f"embedding store {npy} / {keys_path} not found{hint}")
    keys = read_json(keys_path, 'embedding key index')
    matrix = np.load(npy, mmap_mode='r' if mmap else None)
    if matrix.ndim != 2 or matrix.shape[0] != len(keys):
        raise ValueError(f"{npy} has shape {matrix.shape} but {keys_path} lists {len(keys)} keys")
    return EmbeddingStore(list(keys), matrix)


def save_embeddings(keys: Sequence[str], matrix: np.ndarray, path: PathLike,
                    overwrite: bool = False) -> None:
    """Write a whole store at once (small stores, tests, conversions)."""
    npy, keys_path = store_paths(path)
    if len(keys) != matrix.shape[0]:
        raise ValueError(f"{len(keys)} keys for {matrix.shape[0]} rows")
    refuse_existing([npy, keys_path], overwrite)
    atomic_save_npy(np.ascontiguousarray(matrix), npy)
    atomic_write_json(list(keys), keys_path)


# Yields (embeddings (b, D), ok (b,)) for consecutive items of the given index range, in order;
# rows whose `ok` is False (unreadable input) are dropped and their keys reported as skipped.
EncodeFn = Callable[[range], Iterator[Tuple[np.ndarray, np.ndarray]]]


@dataclass
class EmbedResult:
    """Outcome of `embed_sharded`: how many keys were written or skipped, and whether it finished."""

    total: int
    written: int
    skipped: List[str]
    finished: bool


def embed_sharded(keys: Sequence[str], encode: EncodeFn, out: PathLike, *,
                  fingerprint: Dict, shard_size: int = 50000, dtype: str = 'float16',
                  overwrite: bool = False, max_shards: Optional[int] = None,
                  desc: str = 'embedding') -> EmbedResult:
    """Encode `keys` shard by shard into the store `out`, resuming finished shards.

    `max_shards` stops after that many new shards (time-boxed jobs); the store is assembled
    when the last shard is done.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if len(set(keys)) != len(keys):
        raise ValueError("embedding keys must be unique")
    npy, keys_path = store_paths(out)
    refuse_existing([npy, keys_path], overwrite)
    job = ShardedJob(work_dir(out), dict(fingerprint, keys=fingerprint_strings(keys), dtype=dtype),
                     len(keys), shard_size, restart=overwrite)
    pending = job.pending()
    if max_shards is not None:
        pending = pending[:max_shards]
    done_items = len(keys) - sum(len(range(*job.bounds(s))) for s in job.pending())
    with tqdm(total=len(keys), initial=done_items, desc=desc, unit='item') as bar:
        for shard in pending:
            span = range(*job.bounds(shard))
            embs, oks = [], []
            for emb, ok in encode(span):
                embs.append(np.asarray(emb, dtype=np.float32))
                oks.append(np.asarray(ok, dtype=bool))
                bar.update(len(ok))
            ok = np.concatenate(oks) if oks else np.zeros(0, dtype=bool)
            if len(ok) != len(span):
                raise RuntimeError(f"encoder returned {len(ok)} rows for {len(span)} items")
            emb = np.concatenate(embs)[ok] if embs else np.zeros((0, 0), np.float32)
            job.save(shard,
                     {'keys': [keys[i] for i, good in zip(span, ok) if good],
                      'skipped': [keys[i] for i, good in zip(span, ok) if not good]},
                     {'emb': emb.astype(dtype)})
    skipped = [k for s in job.done for k in job.load(s)[0]['skipped']]
    if not job.complete:
        return EmbedResult(len(keys), 0, skipped, False)
    written = _assemble(job, npy, keys_path, dtype)
    job.remove()
    return EmbedResult(len(keys), written, skipped, True)


def _assemble(job: ShardedJob, npy: Path, keys_path: Path, dtype: str) -> int:
    """Concatenate finished shards into the final `.npy` + keys files, streaming shard by shard."""
    shards = [job.load(s) for s in range(job.num_shards)]
    rows = sum(len(meta['keys']) for meta, _ in shards)
    dims = {arrays['emb'].shape[1] for meta, arrays in shards if len(meta['keys'])}
    if rows == 0:
        raise RuntimeError(f"no embeddings produced: all {job.num_items} inputs were skipped")
    if len(dims) != 1:
        raise RuntimeError(f"shards in {job.work_dir} disagree on the embedding size: {dims}")
    keys: List[str] = []
    with atomic_path(npy, suffix='.npy') as tmp:
        out = np.lib.format.open_memmap(tmp, mode='w+', dtype=dtype, shape=(rows, dims.pop()))
        for meta, arrays in shards:
            n = len(meta['keys'])
            out[len(keys):len(keys) + n] = arrays['emb']
            keys.extend(meta['keys'])
        out.flush()
        del out
    atomic_write_json(keys, keys_path)
    return rows
