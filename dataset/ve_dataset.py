"""SNLI-VE visual entailment with visual concepts (spec pipeline §4.2.4, §4.7)."""

from __future__ import annotations

from typing import Sequence

import torch

from .base import AnnotationDataset, Transform, join_root
from .loading import PathLike
from .text import pre_caption

VE_LABELS = {"entailment": 2, "neutral": 1, "contradiction": 0}


class VEDataset(AnnotationDataset):
    """Items `(image, (sentence, vc_string), label)`; `image` is an id loaded as `<image_root>/<id>.jpg`."""

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

    def label(self, index: int) -> int:
        name = self.field(index, "label")
        if name not in VE_LABELS:
            raise self.ann.error(index, f"field 'label' must be one of {sorted(VE_LABELS)}, got {name!r}")
        return VE_LABELS[name]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, tuple[str, str], int]:
        image = self.read_image(join_root(self.image_root, f"{self.field(index, 'image')}.jpg"), index)
        sentence = pre_caption(self.field(index, "sentence"), self.max_words)
        return image, (sentence, self.vc_string(index)), self.label(index)


ve_kw_img_dataset = VEDataset
