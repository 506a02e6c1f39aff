"""Pretraining task (Pretrain.py, pipeline.md §3.1)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from dataset import create_dataset, create_loader, create_sampler
from engine.config import get_option
from engine.tasks.base import Task, TextSpec, TokenizingCollate
from models import MODEL_BUILDERS
from models.tokenization import ViCHATokenizer
from utils import get_rank, get_world_size

CAPTION = TextSpec(max_length=25)  # [CLS] + 24 word-pieces, padded to the longest
VISUAL_CONCEPTS = TextSpec(max_length=55)


class PretrainTask(Task):
    name = "pretrain"
    script = "Pretrain"
    scheduler_step_at = "epoch_start"
    alpha_ramp_key = None  # always ramps over epoch 0
    log_format = "{:.3f}"
    meter_window = 50
    checkpoint_policy = "last"
    supports_cuda_graph = True  # captions and VCs padded to their maximum lengths under cuda_graph

    def build_datasets(self, config: dict, args: Any) -> dict:
        return {"train": create_dataset("pretrain", config, args.data_dir)}

    def build_loaders(self, datasets: dict, config: dict, args: Any, tokenizer: ViCHATokenizer) -> dict:
        sampler = create_sampler([datasets["train"]], [True], get_world_size(), get_rank(), seed=args.seed)
        specs = (CAPTION, VISUAL_CONCEPTS)
        if get_option(config, "cuda_graph"):  # a captured step needs the same shapes every step
            specs = tuple(dataclasses.replace(spec, padding="max_length") for spec in specs)
        collate = TokenizingCollate(tokenizer, 1, specs)
        (loader,) = create_loader([datasets["train"]], sampler, [config["batch_size"]],
                                  [get_option(config, "num_workers")], [True], [collate])
        return {"train": loader}

    def build_model(self, config: dict, args: Any, tokenizer: ViCHATokenizer) -> nn.Module:
        return MODEL_BUILDERS["pretrain"](config, text_encoder=args.text_encoder, tokenizer=tokenizer)

    def train_step(self, model: nn.Module, batch: Any, alpha: float, device: torch.device) -> dict:
        image, (caption, vc) = batch
        return model(image, (caption, vc), alpha=alpha)
