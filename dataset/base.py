"""The common base of every annotation dataset: records, visual-concept strings, image loading."""

from __future__ import annotations

import os
import random
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from .loading import AnnotationList, PathLike, load_image

Transform = Callable[[Image.Image], Any]


def build_vc_string(concepts: Sequence[str], sep_token: bool, randkw_p: float | None) -> str:
    """Join visual concepts into the string the concept encoder reads (spec pipeline §4.3).

    With `randkw_p`, `int(randkw_p * len(concepts))` concepts are drawn WITH replacement in random
    order (0.3 of 15 keeps 4, duplicates possible) using Python's `random`, as the original.
    """
    if randkw_p is not None:
        concepts = random.choices(concepts, k=int(randkw_p * len(concepts)))
    return (" [SEP] " if sep_token else " ").join(concepts)


class AnnotationDataset(Dataset):
    """Records from JSON list file(s), an image transform and the VC options shared by all tasks.

    sep_token: join concepts with ' [SEP] ' (code default) instead of a space (all configs).
    randkw_p: if set, resample that fraction of the concepts each access (pretraining uses 0.3).
    """

    def __init__(
        self,
        ann_files: PathLike | Sequence[PathLike],
        transform: Transform,
        sep_token: bool = True,
        randkw_p: float | None = None,
    ) -> None:
        self.ann = AnnotationList(ann_files)
        self.transform = transform
        self.sep_token = sep_token
        self.randkw_p = randkw_p

    def __len__(self) -> int:
        return len(self.ann)

    def field(self, index: int, name: str) -> Any:
        return self.ann.field(index, name)

    def vc_string(self, index: int, key: str = "kwords") -> str:
        """The VC string of record `index` built from its concept list `key`."""
        concepts = self.field(index, key)
        if not isinstance(concepts, list):
            raise self.ann.error(index, f"field '{key}' must be a list of strings")
        return build_vc_string(concepts, self.sep_token, self.randkw_p)

    def read_image(self, path: PathLike, index: int) -> torch.Tensor:
        """Load and transform the image at `path` for record `index` (errors name both)."""
        ann_file, local = self.ann.origin(index)
        return self.transform(load_image(path, ann_file, local))


class ImageRootDataset(AnnotationDataset):
    """Records whose image paths are relative to one folder, ``image_root``, with texts cut to
    ``max_words`` words: the retrieval, VE, NLVR and grounding datasets (the original's signature)."""

    def __init__(
        self,
        ann_files: PathLike | Sequence[PathLike],
        transform: Transform,
        image_root: PathLike,
        max_words: int = 30,
        sep_token: bool = True,
        randkw_p: float | None = None,
    ) -> None:
        super().__init__(ann_files, transform, sep_token, randkw_p)
        self.image_root = image_root
        self.max_words = max_words
        self.build_index()

    def build_index(self) -> None:
        """Lookups a dataset derives from its records once, after reading them (default: none)."""


def join_root(root: PathLike, relative: str) -> str:
    """`os.path.join` as the original: an absolute `relative` overrides the root."""
    return os.path.join(os.fspath(root), relative)


def contiguous_ids(keys: Sequence[Any]) -> dict[Any, int]:
    """Map distinct keys to 0, 1, 2, ... in order of first appearance."""
    mapping: dict[Any, int] = {}
    for key in keys:
        if key not in mapping:
            mapping[key] = len(mapping)
    return mapping
