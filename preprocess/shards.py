"""Resumable sharded work: a long job is cut into fixed-size shards written as they finish.

A work directory holds one manifest (`manifest.json`: the run's fingerprint and the finished
shard ids) and per-shard files (`shard_00003.json` for metadata, `shard_00003.<name>.npy` for
arrays). Each shard's files are written atomically before the manifest names it, so a run
killed at any point leaves only complete shards behind; the next run with the same inputs
skips them. A manifest whose fingerprint differs (other inputs, model or shard size) is never
reused silently.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from .files import PathLike, atomic_save_npy, atomic_write_json, read_json

MANIFEST = 'manifest.json'


def fingerprint_strings(items: Iterable[str]) -> str:
    """Order-sensitive sha256 of a list of strings (identifies a job's inputs in its manifest)."""
    h = hashlib.sha256()
    for s in items:
        h.update(s.encode('utf-8', 'surrogatepass'))
        h.update(b'\x00')
    return h.hexdigest()


class ShardedJob:
    """Bookkeeping for `num_items` items processed in shards of `shard_size` consecutive items.

    `fingerprint` is any JSON-serialisable description of the inputs; a work directory left by
    a run with another fingerprint raises unless `restart` is true, in which case it is deleted.
    """

    def __init__(self, work_dir: PathLike, fingerprint: Dict[str, Any], num_items: int,
                 shard_size: int, restart: bool = False):
        if shard_size < 1:
            raise ValueError(f"shard size must be >= 1, got {shard_size}")
        self.work_dir = Path(work_dir)
        self.num_items = num_items
        self.shard_size = shard_size
        self.fingerprint = dict(fingerprint, num_items=num_items, shard_size=shard_size)
        manifest_path = self.work_dir / MANIFEST
        if manifest_path.exists():
            manifest = read_json(manifest_path, 'shard manifest')
            if manifest.get('fingerprint') != self.fingerprint:
                if not restart:
                    raise ValueError(
                        f"work directory {self.work_dir} was left by a run with other inputs or "
                        f"settings; delete it or pass --overwrite to start over")
                shutil.rmtree(self.work_dir)
                manifest = None
        else:
            manifest = None
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.done: List[int] = sorted(manifest['done']) if manifest else []
        if manifest is None:
            self._write_manifest()

    @property
    def num_shards(self) -> int:
        return (self.num_items + self.shard_size - 1) // self.shard_size

    def bounds(self, shard: int) -> Tuple[int, int]:
        """Half-open item range `[start, end)` of a shard."""
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_items)

    def pending(self) -> List[int]:
        """Shards not yet finished, in order."""
        done = set(self.done)
        return [s for s in range(self.num_shards) if s not in done]

    @property
    def complete(self) -> bool:
        return len(self.done) == self.num_shards

    def _write_manifest(self) -> None:
        atomic_write_json({'fingerprint': self.fingerprint, 'done': self.done},
                          self.work_dir / MANIFEST)

    def _path(self, shard: int, name: Optional[str] = None) -> Path:
        stem = f'shard_{shard:05d}'
        return self.work_dir / (f'{stem}.{name}.npy' if name else f'{stem}.json')

    def save(self, shard: int, meta: Dict[str, Any],
             arrays: Optional[Dict[str, np.ndarray]] = None) -> None:
        """Write one finished shard, then record it in the manifest."""
        for name, array in (arrays or {}).items():
            atomic_save_npy(np.ascontiguousarray(array), self._path(shard, name))
        atomic_write_json({'arrays': sorted(arrays or {}), 'meta': meta}, self._path(shard))
        self.done = sorted(set(self.done) | {shard})
        self._write_manifest()

    def load(self, shard: int) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
        """Read a finished shard back: its metadata and its arrays (memory-mapped)."""
        record = read_json(self._path(shard), 'shard file')
        arrays = {name: np.load(self._path(shard, name), mmap_mode='r')
                  for name in record['arrays']}
        return record['meta'], arrays

    def remove(self) -> None:
        """Delete the work directory once the final output is written."""
        shutil.rmtree(self.work_dir, ignore_errors=True)
