"""VQA v2 fine-tuning and answer ranking (VQA.py, pipeline.md §3.4, §6.2).

Training generates every human answer with the decoder (weighted by its share of the humans);
after the last epoch (or with ``--evaluate``) each test question gets the best answer of the
answer list, written as ``<output_dir>/result/vqa_result_epoch<E>.json`` in the eval-server format.
When the test annotations carry human answers (e.g. ``vqa_val.json``, or the generated data), the
official VQA accuracy is computed locally and logged as well.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Optional

import torch
from torch import nn

import utils
from dataset import create_dataset, create_loader, create_sampler, vqa_collate_fn
from engine.config import get_option
from engine.tasks.base import Task, TextSpec, TokenizingCollate, to_device
from engine.vqa_metric import best_achievable_accuracy, normalize_answer, vqa_accuracy
from models import MODEL_BUILDERS
from models.tokenization import TokenBatch, ViCHATokenizer

QUESTION = TextSpec(max_length=25)  # [CLS] + 24 word-pieces, padded to the longest
VISUAL_CONCEPTS = TextSpec(max_length=55)
ANSWER = TextSpec(max_length=None)  # "answer[SEP]", never truncated, padded to the longest
RESULT_DIR = "result"


class VQATrainCollate:
    """``vqa_collate_fn`` (answers flattened, ``n`` per question), then every text field tokenised."""

    def __init__(self, tokenizer: ViCHATokenizer) -> None:
        self.tokenizer = tokenizer
        self.questions = TokenizingCollate(tokenizer, 1, (QUESTION, VISUAL_CONCEPTS), base_collate=vqa_collate_fn)

    def __call__(self, samples: list) -> list:
        batch = self.questions(samples)
        batch[2] = ANSWER(self.tokenizer, batch[2])
        return batch


class VQATask(Task):
    name = "vqa"
    script = "VQA"
    scheduler_step_at = "epoch_start"
    alpha_ramp_key = "warm_up"
    log_format = "{:.3f}"
    meter_window = 1
    checkpoint_policy = "last"
    tokenizer: Optional[ViCHATokenizer] = None  # set by build_loaders; tokenises the answer list

    def build_datasets(self, config: dict, args: Any) -> dict:
        train, test = create_dataset("vqa", config, args.data_dir)
        return {"train": train, "test": test}

    def build_loaders(self, datasets: dict, config: dict, args: Any, tokenizer: ViCHATokenizer) -> dict:
        train, test = datasets["train"], datasets["test"]
        samplers = create_sampler([train, test], [True, False], utils.get_world_size(), utils.get_rank(),
                                  seed=args.seed)
        workers = get_option(config, "num_workers")
        collates = [VQATrainCollate(tokenizer), TokenizingCollate(tokenizer, 1, (QUESTION, VISUAL_CONCEPTS))]
        train_loader, test_loader = create_loader(
            [train, test], samplers, [config["batch_size_train"], config["batch_size_test"]], [workers, workers],
            [True, False], collates)
        self.tokenizer = tokenizer  # the answer list is tokenised with it at evaluation
        return {"train": train_loader, "test": test_loader}

    def build_model(self, config: dict, args: Any, tokenizer: ViCHATokenizer) -> nn.Module:
        return MODEL_BUILDERS["vqa"](config, text_encoder=args.text_encoder,
                                     text_decoder=getattr(args, "text_decoder", None), tokenizer=tokenizer)

    def train_step(self, model: nn.Module, batch: Any, alpha: float, device: torch.device) -> dict:
        image, (question, vc), answers, weights, counts = batch
        return model(image, (question, vc), answers, alpha=alpha, k=counts, weights=weights, train=True)

    # ------------------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, loaders: dict, config: dict, args: Any, epoch: int,
                 device: torch.device) -> dict[str, Any]:
        """After the last epoch (or with --evaluate): rank the answer list for every test question."""
        evaluate_only = getattr(args, "evaluate", False)
        if not evaluate_only and epoch != config["schedular"]["epochs"] - 1:
            return {}
        loader = loaders["test"]
        dataset = loader.dataset
        answer_list = [a + config["eos"] for a in dataset.answer_list]
        answer_tokens = ANSWER(self.tokenizer, answer_list).to(device)
        local = predict_answers(model, loader, answer_tokens, config["k_test"], device, config)
        predictions = merge_predictions(utils.all_gather_object(local), dataset)
        metrics: dict[str, Any] = {}
        if utils.is_main_process():
            path = write_result(predictions, dataset, os.path.join(args.output_dir, RESULT_DIR),
                                f"vqa_result_epoch{epoch}")
            print(f"VQA result file: {os.path.abspath(path)} ({len(predictions)} questions)")
            metrics = score_predictions(predictions, dataset, dataset.answer_list)
        utils.barrier()
        return metrics


def _autocast(device: torch.device, config: dict):
    if not get_option(config, "bf16"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def predict_answers(model: nn.Module, loader, answer_tokens: TokenBatch, k_test: int, device: torch.device,
                    config: dict) -> list[tuple[int, int]]:
    """(dataset index, answer-list index) for every item this rank's sampler yields, in order."""
    model.eval()
    indices = list(loader.sampler) if loader.sampler is not None else list(range(len(loader.dataset)))
    chosen: list[int] = []
    logger = utils.MetricLogger(delimiter="  ")
    for image, (question, vc), _ in logger.log_every(loader, get_option(config, "print_freq"),
                                                     "Generate VQA test result:"):
        image, question, vc = to_device((image, question, vc), device)
        with _autocast(device, config):
            topk_ids, topk_probs = model(image, (question, vc), answer_tokens, k=k_test, train=False)
        best = topk_ids.gather(1, topk_probs.argmax(dim=1, keepdim=True)).squeeze(1)
        chosen.extend(best.tolist())
    if len(chosen) != len(indices):
        raise RuntimeError(f"{len(chosen)} predictions for {len(indices)} sampled questions")
    return list(zip(indices, chosen))


def merge_predictions(per_rank: list[list[tuple[int, int]]], dataset) -> dict[int, int]:
    """{dataset index: answer index}, each question once (the sampler's padding repeats a few)."""
    merged: dict[int, int] = {}
    for pairs in per_rank:
        for index, answer in pairs:
            merged.setdefault(index, answer)
    if len(merged) != len(dataset):
        raise RuntimeError(f"predictions cover {len(merged)} of {len(dataset)} test questions")
    return dict(sorted(merged.items()))


def write_result(predictions: dict[int, int], dataset, result_dir: str, name: str) -> str:
    """``[{"question_id": int, "answer": str}, ...]`` in annotation order, written atomically."""
    os.makedirs(result_dir, exist_ok=True)
    records = [{"question_id": int(dataset.field(index, "question_id")), "answer": dataset.answer_list[answer]}
               for index, answer in predictions.items()]
    path = os.path.join(result_dir, f"{name}.json")
    with utils.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(records, handle)
    return path


def _human_answers(record: dict) -> Optional[list[str]]:
    answer = record.get("answer") if isinstance(record, dict) else None
    if isinstance(answer, str):
        return [answer]
    if isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer):
        return answer
    return None


def score_predictions(predictions: dict[int, int], dataset, answer_list: list[str]) -> dict[str, float]:
    """VQA accuracy (%) when every test record has human answers; {} otherwise (e.g. test2015).

    Warns, with examples, about questions whose human answers are missing from the answer list:
    the ranker can never produce those answers, so they cap the reachable accuracy.
    """
    truth, types = {}, {}
    for index in predictions:
        humans = _human_answers(dataset.ann[index])
        if humans is None:
            return {}
        truth[index] = humans
        kind = dataset.ann[index].get("answer_type")
        if kind is not None:
            types[index] = str(kind)
    predicted = {index: answer_list[answer] for index, answer in predictions.items()}
    accuracy = vqa_accuracy(predicted, truth, types or None)
    normalized = {normalize_answer(a) for a in answer_list}
    ceilings = {index: best_achievable_accuracy(humans, normalized) for index, humans in truth.items()}
    capped = [index for index, ceiling in ceilings.items() if ceiling < 1.0]
    if capped:
        examples = "; ".join(f"question_id {dataset.field(i, 'question_id')}: {sorted(set(truth[i]))}"
                             for i in capped[:3])
        reachable = 100.0 * sum(ceilings.values()) / len(ceilings)
        print(f"WARNING: {len(capped)} of {len(truth)} test questions have human answers that are not in the "
              f"answer list and can never be produced (best reachable accuracy {reachable:.2f}); e.g. {examples}")
    metrics = {"test_vqa_acc": accuracy.pop("overall")}
    metrics.update({f"test_vqa_acc_{kind}": value for kind, value in accuracy.items()})
    print(f"VQA accuracy: {metrics}")
    return metrics
