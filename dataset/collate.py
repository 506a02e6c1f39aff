"""Batch collation for VQA training, where each question has a variable number of answers (§4.8)."""

from __future__ import annotations

from typing import Sequence

import torch


def vqa_collate_fn(
    batch: Sequence[tuple[torch.Tensor, tuple[str, str], list[str], list[float]]],
) -> tuple[torch.Tensor, tuple[list[str], list[str]], list[str], torch.Tensor, list[int]]:
    """Return `(images, (questions, vc_strings), answers, weights, n)`.

    Answers and weights of all questions are flattened into one list / one float tensor;
    `n[b]` is how many of them belong to question b (the model repeats question b `n[b]` times).
    """
    images, questions, vcs, answers, weights, counts = [], [], [], [], [], []
    for image, (question, vc_string), item_answers, item_weights in batch:
        images.append(image)
        questions.append(question)
        vcs.append(vc_string)
        answers.extend(item_answers)
        weights.extend(item_weights)
        counts.append(len(item_answers))
    return torch.stack(images, dim=0), (questions, vcs), answers, torch.tensor(weights, dtype=torch.float32), counts


vqa_caption_kw_fuse_collate_fn = vqa_collate_fn
