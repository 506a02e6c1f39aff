"""NLVR2 text-assignment pretraining (Pretrain_nlvr.py, pipeline.md §3.2)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.tasks.pretrain import PretrainTask
from models import MODEL_BUILDERS
from models.tokenization import ViCHATokenizer


class PretrainNLVRTask(PretrainTask):
    """Pretraining's data, loaders and protocol (all VCs unless ``randkw_p``); one loss, no alpha."""

    name = "nlvr_pretrain"
    script = "Pretrain_nlvr"
    scheduler_step_at = "epoch_start"
    uses_alpha = False
    log_format = "{:.3f}"
    checkpoint_policy = "last"
    # temp and text_proj are never used, vision_proj only without gradient.
    find_unused_parameters = True
    supports_cuda_graph = False  # not measured on a GPU yet

    def build_model(self, config: dict, args: Any, tokenizer: ViCHATokenizer) -> nn.Module:
        return MODEL_BUILDERS[self.name](config, text_encoder=args.text_encoder, tokenizer=tokenizer)

    def train_step(self, model: nn.Module, batch: Any, alpha: float, device: torch.device) -> dict:
        image, text = batch
        return model(image, text)
