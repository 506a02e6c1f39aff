"""Image-text retrieval task (Retrieval.py, pipeline.md §3.3, §6.1): COCO / Flickr30k fine-tuning."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dataset import create_dataset, create_loader, create_sampler
from engine.config import get_option
from engine.retrieval_eval import METRIC_KEYS, EvalImageCollate, describe, evaluate_retrieval, itm_eval
from engine.tasks.base import Task, TextSpec, TokenizingCollate
from models import MODEL_BUILDERS
from models.checkpoint import LoadReport, load_checkpoint
from models.tokenization import ViCHATokenizer
from utils import get_rank, get_world_size

CAPTION = TextSpec(max_length=25)  # training: [CLS] + 24 word-pieces, padded to the longest
VISUAL_CONCEPTS = TextSpec(max_length=55)  # training: padded to the longest (evaluation pads to 55)

# Keys the evaluation reads: loading a checkpoint without them would evaluate random weights.
EVAL_MODULES = ("visual_encoder.", "text_encoder.", "kw_encoder.", "kw_proj.", "vision_proj.", "text_proj.",
                "itm_head.")


class RetrievalTask(Task):
    """ITC + ITM fine-tuning with image-id positives; ITM-re-ranked recall on val and test every epoch."""

    name = "retrieval"
    script = "Retrieval"
    scheduler_step_at = "epoch_end"  # scheduler.step(epoch + warmup_epochs + 1) after each epoch
    alpha_ramp_key = "warm_up"
    log_format = "{:.3f}"
    meter_window = 1
    checkpoint_policy = "best"  # checkpoint_best.pth on a new best val r_mean
    dataset_name = "re"
    eval_splits = ("val", "test")

    def build_datasets(self, config: dict, args: Any) -> dict:
        train, val, test = create_dataset(self.dataset_name, config, args.data_dir)
        return {"train": train, "val": val, "test": test}

    def build_loaders(self, datasets: dict, config: dict, args: Any, tokenizer: ViCHATokenizer) -> dict:
        self.tokenizer = tokenizer  # the evaluation tokenises all captions itself
        # Every rank evaluates the whole val/test set (no sampler), as the original.
        samplers = create_sampler([datasets["train"], None, None], [True, None, None], get_world_size(), get_rank(),
                                  seed=args.seed)
        workers = get_option(config, "num_workers")
        train_collate = TokenizingCollate(tokenizer, 1, (CAPTION, VISUAL_CONCEPTS))
        eval_collate = EvalImageCollate(tokenizer)
        loaders = create_loader(
            [datasets["train"], datasets["val"], datasets["test"]], samplers,
            [config["batch_size_train"], config["batch_size_test"], config["batch_size_test"]], [workers] * 3,
            [True, False, False], [train_collate, eval_collate, eval_collate])
        return dict(zip(("train", "val", "test"), loaders))

    def build_model(self, config: dict, args: Any, tokenizer: ViCHATokenizer) -> nn.Module:
        model = MODEL_BUILDERS[self.name](config, text_encoder=args.text_encoder, tokenizer=tokenizer)
        checkpoint0 = getattr(args, "checkpoint0", None)
        if checkpoint0 and args.checkpoint:
            # --checkpoint0 goes in first with the same remap; --checkpoint is loaded on top by the
            # trainer. As the original, it is ignored without --checkpoint.
            report, _ = load_checkpoint(model, checkpoint0, self.name, training=not getattr(args, "evaluate", False),
                                        distill=config.get("distill", True))
            self.check_load_report(report, checkpoint0, model)
            print(f"loaded --checkpoint0 {checkpoint0}: {report.summary()}")
        return model

    def check_load_report(self, report: LoadReport, path: str, model: nn.Module) -> None:
        """Besides the generic check, refuse a checkpoint that lacks any weight the evaluation uses."""
        super().check_load_report(report, path, model)
        missing = [key for key in report.missing_keys if key.startswith(EVAL_MODULES) or key == "temp"]
        if missing:
            raise ValueError(
                f"checkpoint {path} lacks weights the {self.name} model needs: {', '.join(missing[:8])}"
                + (f" ... (+{len(missing) - 8})" if len(missing) > 8 else "")
                + ". Use a ViCHA pretraining or retrieval checkpoint."
            )

    def train_step(self, model: nn.Module, batch: Any, alpha: float, device: torch.device) -> dict:
        image, (caption, vc), idx = batch
        losses = model(image, (caption, vc), alpha=alpha, idx=idx)
        return {"loss_itm": losses["loss_itm"], "loss_ita": losses["loss_ita"]}  # log order of the original

    def evaluate(self, model: nn.Module, loaders: dict, config: dict, args: Any, epoch: int,
                 device: torch.device) -> dict:
        metrics: dict[str, float] = {}
        for split in self.eval_splits:
            loader = loaders[split]
            i2t, t2i = evaluate_retrieval(model, loader, self.tokenizer, config, device)
            result = itm_eval(i2t, t2i, loader.dataset.txt2img, loader.dataset.img2txt)
            print(f"{split}: {describe(result)}")
            metrics.update({f"{split}_{key}": result[key] for key in METRIC_KEYS})
        return metrics

    def selection_metric(self, metrics: dict) -> float:
        return metrics["val_r_mean"]
