"""File helpers shared by the preprocessing commands: output guards, atomic writes, JSON input."""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, List, Union

import numpy as np

from utils import atomic_path

PathLike = Union[str, os.PathLike]


def refuse_existing(paths: Iterable[PathLike], overwrite: bool) -> None:
    """Raise `FileExistsError` if any output already exists and `overwrite` is false.

    Preprocessing runs take hours on real corpora; an output is never replaced without an
    explicit `--overwrite`.
    """
    if overwrite:
        return
    existing = [str(p) for p in paths if os.path.exists(p)]
    if existing:
        raise FileExistsError(
            f"refusing to overwrite existing output {', '.join(existing)}; "
            "pass --overwrite to replace it")


def atomic_write_json(obj: Any, path: PathLike) -> None:
    """Write `obj` as UTF-8 JSON (no indentation, as the original files) via a temporary file."""
    with atomic_path(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
        json.dump(obj, f, ensure_ascii=False)


def atomic_save_npy(array: np.ndarray, path: PathLike) -> None:
    """Save one array as `.npy` via a temporary file."""
    with atomic_path(path, suffix='.npy') as tmp:
        np.save(tmp, array)


def read_json(path: PathLike, what: str = 'JSON file') -> Any:
    """Load a JSON file, with an error naming the file when it is missing or malformed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, encoding='utf-8') as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} {path} is not valid JSON: {e}") from e


def read_annotations(path: PathLike) -> List[dict]:
    """Load an annotation file: a top-level JSON list of dicts (spec §4)."""
    data = read_json(path, 'annotation file')
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise ValueError(f"annotation file {path} must be a JSON list of objects")
    return data
