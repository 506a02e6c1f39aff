"""VQA v2 (+ Visual Genome QA) with visual concepts (spec pipeline §4.2.3, §4.7)."""

from __future__ import annotations

from typing import Sequence

from .base import AnnotationDataset, Transform, join_root
from .loading import PathLike, load_json
from .text import pre_question

SPLITS = ("train", "test")


class VQADataset(AnnotationDataset):
    """VQA questions; items are
    train `(image, (question, vc_string), answers, weights)`,
    test `(image, (question, vc_string), question_id)`.

    Train answers: for 'vqa' records each distinct human answer, in first-occurrence order, with
    weight count / number of answers; for 'vg' records the single answer with weight 0.5. `eos`
    is appended to every answer without a space ("net" -> "net[SEP]"). Test questions keep up to
    50 words (the original lifts the limit for test) and `answer_list` holds the candidates.
    """

    def __init__(
        self,
        ann_files: PathLike | Sequence[PathLike],
        transform: Transform,
        vqa_root: PathLike,
        vg_root: PathLike,
        eos: str = "[SEP]",
        split: str = "train",
        max_ques_words: int = 30,
        answer_list: PathLike | None = None,
        sep_token: bool = True,
        randkw_p: float | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"VQA split must be one of {SPLITS}, got {split!r}")
        super().__init__(ann_files, transform, sep_token, randkw_p)
        self.vqa_root = vqa_root
        self.vg_root = vg_root
        self.eos = eos
        self.split = split
        self.max_ques_words = max_ques_words
        if split == "test":
            self.max_ques_words = 50
            if answer_list is None:
                raise ValueError("the VQA test split needs `answer_list` (the candidate answers JSON)")
            self.answer_list: list[str] = load_json(answer_list)

    def image_path(self, index: int) -> str:
        source = self.field(index, "dataset")
        if source == "vqa":
            root = self.vqa_root
        elif source == "vg":
            root = self.vg_root
        else:
            raise self.ann.error(index, f"field 'dataset' must be 'vqa' or 'vg', got {source!r}")
        return join_root(root, self.field(index, "image"))

    def answers(self, index: int) -> tuple[list[str], list[float]]:
        """Distinct answers (with EOS) and their weights for training record `index`."""
        answer = self.field(index, "answer")
        if self.field(index, "dataset") == "vg":
            return [answer + self.eos], [0.5]
        if not isinstance(answer, list) or not answer:
            raise self.ann.error(index, "field 'answer' of a 'vqa' record must be a non-empty list")
        counts: dict[str, int] = {}
        for text in answer:
            counts[text] = counts.get(text, 0) + 1
        return [text + self.eos for text in counts], [n / len(answer) for n in counts.values()]

    def __getitem__(self, index: int) -> tuple:
        image = self.read_image(self.image_path(index), index)
        question = (pre_question(self.field(index, "question"), self.max_ques_words), self.vc_string(index))
        if self.split == "test":
            return image, question, self.field(index, "question_id")
        answers, weights = self.answers(index)
        return image, question, answers, weights


vqa_kw_img_dataset = VQADataset
