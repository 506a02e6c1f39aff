"""File reading shared by every dataset: images and annotation JSON, with errors that name the file.

Importing this module sets PIL's global flags as the original does: truncated JPEGs are loaded
(the missing part is grey) and the decompression-bomb size check is off.
"""

from __future__ import annotations

import bisect
import json
import os
from typing import Any, Sequence

from PIL import Image, ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = True
Image.MAX_IMAGE_PIXELS = None

PathLike = str | os.PathLike


class AnnotationError(ValueError):
    """An annotation file is missing, is not valid JSON, or a record lacks a required field."""


def _origin(ann_file: PathLike | None, index: int | None) -> str:
    if ann_file is None:
        return ""
    where = f" (annotation file {os.fspath(ann_file)}"
    return where + (f", record {index})" if index is not None else ")")


def load_image(path: PathLike, ann_file: PathLike | None = None, index: int | None = None) -> Image.Image:
    """Open an image as RGB; errors name the image and the annotation record that points to it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}{_origin(ann_file, index)}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:
        raise OSError(f"cannot read image {path}{_origin(ann_file, index)}: {err}") from err


def load_json(path: PathLike) -> Any:
    """Load one JSON file; a missing or malformed file raises an error naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationError(f"annotation file {path} is not valid JSON: {err}") from err


class AnnotationList:
    """Records of one or several JSON list files, concatenated in order, that remember their origin.

    Only the file boundaries are stored, so provenance costs nothing per record; `origin(i)`
    recovers (file, index within that file) when an error has to be reported.
    """

    def __init__(self, files: PathLike | Sequence[PathLike]) -> None:
        if isinstance(files, (str, os.PathLike)):
            files = [files]
        self.files = [os.fspath(f) for f in files]
        self.records: list[dict] = []
        self._starts: list[int] = []
        for path in self.files:
            data = load_json(path)
            if not isinstance(data, list):
                raise AnnotationError(f"annotation file {path} must hold a JSON list, got {type(data).__name__}")
            self._starts.append(len(self.records))
            self.records.extend(data)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]

    def origin(self, index: int) -> tuple[str, int]:
        """The file that record `index` came from and its position inside that file."""
        part = bisect.bisect_right(self._starts, index) - 1
        return self.files[part], index - self._starts[part]

    def field(self, index: int, name: str) -> Any:
        """Field `name` of record `index`; a missing field raises an error naming file, record and field."""
        record = self.records[index]
        if not isinstance(record, dict) or name not in record:
            path, local = self.origin(index)
            raise AnnotationError(f"annotation file {path}, record {local}: missing required field '{name}'")
        return record[name]

    def error(self, index: int, message: str) -> AnnotationError:
        """An AnnotationError about record `index` that names its file and position."""
        path, local = self.origin(index)
        return AnnotationError(f"annotation file {path}, record {local}: {message}")
