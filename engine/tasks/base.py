"""What a task is: the few things that differ between the seven scripts, as named attributes.

The trainer (``engine/trainer.py``) runs any :class:`Task`; a task says which data, model and
checkpoint remap it uses, how one batch becomes a dict of losses, how it is evaluated, and the
small protocol differences the original scripts had (pipeline.md §2.7, §2.8, §2.9, §3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import default_collate

from models.tokenization import TokenBatch, ViCHATokenizer


@dataclass(frozen=True)
class TextSpec:
    """How one text field of a batch is tokenised (pipeline.md §2.5)."""

    max_length: Optional[int]  # None = no truncation
    padding: str = "longest"

    def __call__(self, tokenizer: ViCHATokenizer, texts: list[str]) -> TokenBatch:
        return tokenizer(list(texts), padding=self.padding, truncation=self.max_length is not None,
                         max_length=self.max_length, return_tensors="pt")


class Task:
    """Base class; subclasses set the attributes and implement the hooks."""

    name: str = ""  # model builder key and checkpoint-adapter task
    script: str = ""  # original script name, for path joining (pipeline.md §2.1)
    # Pretrain, Pretrain_nlvr, VQA step the scheduler at the START of epoch e >= 1 with t = e + W;
    # Retrieval, VE, NLVR, Grounding at the END of every epoch with t = e + W + 1 (§2.7).
    scheduler_step_at: str = "epoch_start"
    # Pretrain always ramps alpha over epoch 0; fine-tuning ramps only if config['warm_up'] (§2.8).
    alpha_ramp_key: Optional[str] = None
    uses_alpha: bool = True
    # Train meters are logged as strings with this precision (§2.9): '{:.3f}' or '{:.4f}' (VE, NLVR).
    log_format: str = "{:.3f}"
    meter_window: int = 50
    # Checkpoint file written every epoch ('checkpoint_last.pth') or on a new best ('checkpoint_best.pth').
    checkpoint_policy: str = "last"
    # With the 'best' policy, end log.txt with "best epoch: N" (Retrieval, VE, NLVR; not Grounding).
    log_best_epoch: bool = True
    # DDP option: True where some parameters get no gradient in a step (Pretrain_nlvr).
    find_unused_parameters: bool = False
    # The training step has fixed shapes (with fixed text padding), so ``cuda_graph`` may capture it.
    supports_cuda_graph: bool = False

    def build_datasets(self, config: dict, args: Any) -> dict[str, Any]:
        """{'train': dataset, 'val': ..., 'test': ...} (absent splits omitted)."""
        raise NotImplementedError

    def build_loaders(self, datasets: dict, config: dict, args: Any, tokenizer: ViCHATokenizer) -> dict:
        raise NotImplementedError

    def build_model(self, config: dict, args: Any, tokenizer: ViCHATokenizer) -> nn.Module:
        raise NotImplementedError

    def train_step(self, model: nn.Module, batch: Any, alpha: float, device: torch.device) -> dict[str, torch.Tensor]:
        """Loss terms of one batch by name; the trainer backpropagates their sum."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loaders: dict, config: dict, args: Any, epoch: int,
                 device: torch.device) -> dict[str, Any]:
        """Metrics to log (already prefixed, e.g. ``val_r_mean``); {} when the task has none."""
        return {}

    def check_load_report(self, report, path: str, model: nn.Module) -> None:
        """Refuse a checkpoint that fits the model poorly (e.g. another task's or another model's)."""
        total = len(model.state_dict())
        if len(report.missing_keys) > total // 2:
            raise ValueError(
                f"checkpoint {path} does not fit the {self.name} model: {len(report.missing_keys)} of "
                f"{total} keys missing ({report.summary()}). Is it a checkpoint of another task?"
            )

    def selection_metric(self, metrics: dict[str, Any]) -> Optional[float]:
        """Value whose strict increase writes checkpoint_best.pth (None: no selection)."""
        return None

    def alpha(self, config: dict, epoch: int, iteration: int, iterations: int) -> float:
        """Distillation weight: linear ramp over epoch 0 when enabled, else config['alpha']."""
        if not self.uses_alpha:
            return 0.0
        ramp = self.alpha_ramp_key is None or bool(config.get(self.alpha_ramp_key, False))
        if epoch > 0 or not ramp:
            return config["alpha"]
        return config["alpha"] * min(1.0, iteration / iterations)


class TokenizingCollate:
    """Default-collates a batch, then tokenises its text fields (in the loader workers).

    ``text_position`` names where the tuple of strings sits in the collated batch, e.g. 1 for
    ``(image, (caption, vc))``; ``specs`` gives one :class:`TextSpec` per string field there, or
    None for a field to leave as strings (not tokenised).
    """

    def __init__(self, tokenizer: ViCHATokenizer, text_position: int, specs: tuple[Optional[TextSpec], ...],
                 base_collate: Callable = default_collate) -> None:
        self.tokenizer = tokenizer
        self.text_position = text_position
        self.specs = specs
        self.base_collate = base_collate

    def __call__(self, samples: list) -> list:
        batch = list(self.base_collate(samples))
        texts = batch[self.text_position]
        if len(texts) != len(self.specs):
            raise ValueError(f"expected {len(self.specs)} text fields, got {len(texts)}")
        batch[self.text_position] = tuple(field if spec is None else spec(self.tokenizer, field)
                                          for spec, field in zip(self.specs, texts))
        return batch


def to_device(value: Any, device: torch.device) -> Any:
    """Move tensors / TokenBatches (nested in tuples and lists) to ``device``."""
    if isinstance(value, (torch.Tensor, TokenBatch)):
        return value.to(device, non_blocking=True)
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value
