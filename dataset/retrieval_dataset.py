"""Image-text retrieval datasets, Karpathy-style JSONs (spec pipeline §4.2.2, §4.7)."""

from __future__ import annotations

import torch

from .base import ImageRootDataset, contiguous_ids, join_root
from .text import pre_caption


class RetrievalTrainDataset(ImageRootDataset):
    """One record per caption; items `(image, (caption, vc_string), img_idx)`.

    `img_idx` numbers the distinct `image_id` values 0, 1, ... in order of first appearance;
    captions of the same image share it (positives for the contrastive loss).
    """

    def build_index(self) -> None:
        self.img_ids = contiguous_ids([self.field(i, "image_id") for i in range(len(self.ann))])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, tuple[str, str], int]:
        image = self.read_image(join_root(self.image_root, self.field(index, "image")), index)
        caption = pre_caption(self.field(index, "caption"), self.max_words)
        return image, (caption, self.vc_string(index)), self.img_ids[self.field(index, "image_id")]


class RetrievalEvalDataset(ImageRootDataset):
    """One record per image; items `((image, vc_string), image_index)`, length = number of images.

    Attributes for the ranking metrics:
      text: every caption (cleaned), flattened in file order, one plain string per caption
            (upstream stores `[caption, caption]` pairs and its evaluation reads element 0;
            here the entry is the caption itself, so evaluation reads `text[i]` directly);
      image: the image paths as written in the JSON (relative to `image_root`);
      img2txt: {image_index: [text indices]}; txt2img: {text index: image_index}.
    A single-string `caption` counts as one caption.
    """

    def build_index(self) -> None:
        self.text: list[str] = []
        self.image: list[str] = []
        self.img2txt: dict[int, list[int]] = {}
        self.txt2img: dict[int, int] = {}
        for img_index in range(len(self.ann)):
            self.image.append(self.field(img_index, "image"))
            captions = self.field(img_index, "caption")
            if isinstance(captions, str):
                captions = [captions]
            self.img2txt[img_index] = []
            for caption in captions:
                self.img2txt[img_index].append(len(self.text))
                self.txt2img[len(self.text)] = img_index
                self.text.append(pre_caption(caption, self.max_words))

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, str], int]:
        image = self.read_image(join_root(self.image_root, self.image[index]), index)
        return (image, self.vc_string(index)), index


re_kw_img_train_dataset = RetrievalTrainDataset
re_kw_img_eval_dataset = RetrievalEvalDataset
