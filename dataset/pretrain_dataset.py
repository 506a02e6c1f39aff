"""Pretraining image-caption pairs with visual concepts (spec pipeline §4.2.1, §4.7)."""

from __future__ import annotations

import os
import random
from typing import Sequence

import torch

from .base import AnnotationDataset, Transform
from .loading import PathLike
from .text import pre_caption


def rewrite_pretrain_path(path: str, data_dir: PathLike) -> str:
    """Map a released absolute path onto `data_dir` by dropping its first four '/'-components.

    The released JSONs hold paths like '/data/<user>/data/coco/train2014/x.jpg'; the empty root
    and three directories are discarded, so this becomes '<data_dir>/coco/train2014/x.jpg'.
    """
    return os.path.join(os.fspath(data_dir), "/".join(path.split("/")[4:]))


class PretrainDataset(AnnotationDataset):
    """Items `(image, (caption, vc_string))`; a list-valued caption gives one random element per access."""

    def __init__(
        self,
        ann_files: PathLike | Sequence[PathLike],
        transform: Transform,
        data_dir: PathLike,
        max_words: int = 30,
        sep_token: bool = True,
        randkw_p: float | None = None,
    ) -> None:
        super().__init__(ann_files, transform, sep_token, randkw_p)
        self.data_dir = os.fspath(data_dir)
        self.max_words = max_words

    def image_path(self, index: int) -> str:
        return rewrite_pretrain_path(self.field(index, "image"), self.data_dir)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, tuple[str, str]]:
        caption = self.field(index, "caption")
        if isinstance(caption, list):
            caption = random.choice(caption)
        caption = pre_caption(caption, self.max_words)
        image = self.read_image(self.image_path(index), index)
        return image, (caption, self.vc_string(index))


pretrain_kw_img_dataset = PretrainDataset
