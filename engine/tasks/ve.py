"""SNLI-VE fine-tuning (VE.py, pipeline.md §3.5, §6.3), and the accuracy evaluation NLVR2 shares."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from dataset import create_dataset, create_loader, create_sampler
from engine.config import get_option
from engine.tasks.base import Task, TextSpec, TokenizingCollate, to_device
from models import MODEL_BUILDERS
from models.tokenization import ViCHATokenizer
from utils import MetricLogger, all_reduce_sum, get_rank, get_world_size

HYPOTHESIS = TextSpec(max_length=25)  # [CLS] + 24 word-pieces, padded to the longest
VISUAL_CONCEPTS = TextSpec(max_length=55)
SPLITS = ("train", "val", "test")
Predict = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]  # (model, batch) -> (logits, targets)


@torch.no_grad()
def classification_accuracy(model: nn.Module, loader, predict: Predict, device: torch.device, bf16: bool,
                            header: str, print_freq: int) -> float:
    """Fraction of correct argmax predictions over every rank's share of ``loader`` (§6.3).

    Each batch adds (correct, size); the sums are reduced over ranks, so the padding repeats of a
    distributed sampler count as in the original. ``predict(model, batch)`` -> (logits, targets).
    """
    model.eval()
    correct = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for batch in MetricLogger(delimiter="  ").log_every(loader, print_freq, header):
        batch = to_device(batch, device)
        with autocast:
            logits, targets = predict(model, batch)
        correct += (logits.argmax(dim=1) == targets).sum()
        count += targets.shape[0]
    totals = all_reduce_sum(torch.stack([correct, count]))
    if totals[1] == 0:
        raise ValueError(f"{header}: the evaluation set is empty")
    return float(totals[0] / totals[1])


class ClassificationTask(Task):
    """VE and NLVR2: three splits, distilled classifier, best checkpoint on validation accuracy."""

    dataset_name: str = ""
    text_position: int = 1  # where the tuple of strings sits in a collated batch
    text_specs: tuple[TextSpec, ...] = ()
    scheduler_step_at = "epoch_end"
    alpha_ramp_key = "warm_up"  # VE.yaml says False (no ramp), NLVR.yaml True
    log_format = "{:.4f}"
    meter_window = 50
    checkpoint_policy = "best"

    def batch_sizes(self, config: dict) -> tuple[int, int, int]:
        raise NotImplementedError

    def predict(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets) of an evaluation batch."""
        raise NotImplementedError

    def build_datasets(self, config: dict, args: Any) -> dict:
        return dict(zip(SPLITS, create_dataset(self.dataset_name, config)))

    def build_loaders(self, datasets: dict, config: dict, args: Any, tokenizer: ViCHATokenizer) -> dict:
        splits = [datasets[name] for name in SPLITS]
        samplers = create_sampler(splits, [True, False, False], get_world_size(), get_rank(), seed=args.seed)
        collate = TokenizingCollate(tokenizer, self.text_position, self.text_specs)
        loaders = create_loader(splits, samplers, list(self.batch_sizes(config)),
                                [get_option(config, "num_workers")] * 3, [True, False, False], [collate] * 3)
        return dict(zip(SPLITS, loaders))

    def build_model(self, config: dict, args: Any, tokenizer: ViCHATokenizer) -> nn.Module:
        return MODEL_BUILDERS[self.name](config, text_encoder=args.text_encoder, tokenizer=tokenizer)

    def evaluate(self, model: nn.Module, loaders: dict, config: dict, args: Any, epoch: int,
                 device: torch.device) -> dict:
        bf16, freq = get_option(config, "bf16"), get_option(config, "print_freq")
        metrics = {}
        for split in ("val", "test"):
            accuracy = classification_accuracy(model, loaders[split], self.predict, device, bf16,
                                               f"Evaluation ({split}):", freq)
            metrics[f"{split}_acc"] = "{:.4f}".format(accuracy)  # a string, as the original's log
        print(f"epoch {epoch}: " + ", ".join(f"{k} {v}" for k, v in metrics.items()))
        return metrics

    def selection_metric(self, metrics: dict) -> float:
        return float(metrics["val_acc"])


class VETask(ClassificationTask):
    name = "ve"
    script = "VE"
    dataset_name = "ve"
    text_position = 1  # (image, (hypothesis, vc), label)
    text_specs = (HYPOTHESIS, VISUAL_CONCEPTS)

    def batch_sizes(self, config: dict) -> tuple[int, int, int]:
        return config["batch_size_train"], config["batch_size_test"], config["batch_size_test"]

    def train_step(self, model: nn.Module, batch: Any, alpha: float, device: torch.device) -> dict:
        image, text, targets = batch
        return model(image, text, targets=targets, train=True, alpha=alpha)

    def predict(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        image, text, targets = batch
        return model(image, text, targets=targets, train=False), targets
