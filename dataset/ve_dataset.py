"""SNLI-VE visual entailment with visual concepts (spec pipeline §4.2.4, §4.7)."""

from __future__ import annotations

import torch

from .base import ImageRootDataset, join_root
from .text import pre_caption

VE_LABELS = {"entailment": 2, "neutral": 1, "contradiction": 0}


class VEDataset(ImageRootDataset):
    """Items `(image, (sentence, vc_string), label)`; `image` is an id loaded as `<image_root>/<id>.jpg`."""

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
