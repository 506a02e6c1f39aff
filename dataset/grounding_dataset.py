"""RefCOCO+ referring expressions with visual concepts (spec pipeline §4.2.6, §4.7)."""

from __future__ import annotations

from typing import Sequence

from .base import ImageRootDataset, Transform, contiguous_ids, join_root
from .loading import PathLike
from .text import pre_caption

MODES = ("train", "test")


class GroundingDataset(ImageRootDataset):
    """Items: train `(image, (text, vc_string), img_idx)`, test `((image, vc_string), text, ref_id)`.

    Training `img_idx` numbers the distinct image FILE NAMES (last path component) in order of
    first appearance, so expressions about the same picture are positives for each other.
    """

    def __init__(
        self,
        ann_files: PathLike | Sequence[PathLike],
        transform: Transform,
        image_root: PathLike,
        max_words: int = 30,
        mode: str = "train",
        sep_token: bool = True,
        randkw_p: float | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"grounding mode must be one of {MODES}, got {mode!r}")
        self.mode = mode  # build_index reads it
        super().__init__(ann_files, transform, image_root, max_words, sep_token, randkw_p)

    def build_index(self) -> None:
        if self.mode == "train":
            self.img_ids = contiguous_ids([self._file_name(i) for i in range(len(self.ann))])

    def _file_name(self, index: int) -> str:
        return self.field(index, "image").split("/")[-1]

    def __getitem__(self, index: int) -> tuple:
        image = self.read_image(join_root(self.image_root, self.field(index, "image")), index)
        text = pre_caption(self.field(index, "text"), self.max_words)
        vc_string = self.vc_string(index)
        if self.mode == "train":
            return image, (text, vc_string), self.img_ids[self._file_name(index)]
        return (image, vc_string), text, self.field(index, "ref_id")


grounding_kw_img_dataset = GroundingDataset
