"""NLVR2 image-pair reasoning with visual concepts for each image (spec pipeline §4.2.5, §4.7)."""

from __future__ import annotations

import torch

from .base import ImageRootDataset, join_root
from .text import pre_caption


class NLVRDataset(ImageRootDataset):
    """Items `(image_left, image_right, (sentence, vc_left, vc_right), label)`.

    The label is 1 exactly when the field is the string "True" (a JSON boolean gives 0, as the
    original). The two images are transformed independently (flips do not swap the pair).
    """

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, tuple[str, str, str], int]:
        paths = self.field(index, "images")
        if not isinstance(paths, list) or len(paths) != 2:
            raise self.ann.error(index, "field 'images' must be a list of two paths")
        left = self.read_image(join_root(self.image_root, paths[0]), index)
        right = self.read_image(join_root(self.image_root, paths[1]), index)
        sentence = pre_caption(self.field(index, "sentence"), self.max_words)
        label = 1 if self.field(index, "label") == "True" else 0
        return left, right, (sentence, self.vc_string(index, "kwords1"), self.vc_string(index, "kwords2")), label


nlvr_kw_img_dataset = NLVRDataset
