"""NLVR2 fine-tuning from the text-assignment checkpoint (NLVR.py, pipeline.md §3.6, §6.4)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.tasks.base import TextSpec
from engine.tasks.ve import ClassificationTask

# The sentence and both VC strings are tokenised without truncation, padded to the longest (§6).
UNTRUNCATED = TextSpec(max_length=None)


def pair_inputs(batch: Any) -> tuple[torch.Tensor, tuple, torch.Tensor]:
    """(left, right, texts, labels) -> (all left images then all right ones (2B, 3, H, W), texts, labels)."""
    left, right, text, targets = batch
    return torch.cat([left, right], dim=0), text, targets


class NLVRTask(ClassificationTask):
    name = "nlvr"
    script = "NLVR"
    dataset_name = "nlvr"
    text_position = 2  # (left, right, (sentence, vc_left, vc_right), label)
    text_specs = (UNTRUNCATED, UNTRUNCATED, UNTRUNCATED)

    def batch_sizes(self, config: dict) -> tuple[int, int, int]:
        return (config["batch_size"],) * 3

    def train_step(self, model: nn.Module, batch: Any, alpha: float, device: torch.device) -> dict:
        image, text, targets = pair_inputs(batch)
        return model(image, text, targets=targets, train=True, alpha=alpha)

    def predict(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        image, text, targets = pair_inputs(batch)
        return model(image, text, targets=targets, train=False), targets

    def check_load_report(self, report, path: str, model: nn.Module) -> None:
        """The TA checkpoint has no momentum weights: those missing keys are expected (the teacher
        keeps its pre-load init, as the original). With ``fix_nlvr_teacher`` the teacher is
        re-copied from the loaded weights here, right after loading."""
        twins = tuple(f"{name}." for _, name in getattr(model, "model_pairs", []))
        own = [key for key in report.missing_keys if not key.startswith(twins)]
        total = sum(1 for key in model.state_dict() if not key.startswith(twins))
        if len(own) > total // 2:
            raise ValueError(
                f"checkpoint {path} does not fit the {self.name} model: {len(own)} of {total} non-momentum "
                f"keys missing ({report.summary()}). Expected the text-assignment checkpoint of "
                "Pretrain_nlvr.py or an NLVR checkpoint."
            )
        if getattr(model, "fix_teacher", False) and getattr(model, "distill", False):
            model.copy_params()
