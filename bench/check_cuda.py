"""Correctness of the fast paths on a GPU: the CPU tests' claims, re-checked on CUDA kernels.

    python bench/check_cuda.py --device cuda        # prints one JSON line; exit code 1 if a check fails

On the tiny pretraining model (random weights, dropout off): fused (SDPA) vs explicit attention
give the same losses and gradients in fp32; a bf16-autocast step stays close to the fp32 step
(losses and gradient direction); the step captured in a CUDA graph and replayed gives the eager
step's losses and weights (same seeds; new batch, alpha and learning rate each step); with
``--compile_model``, so does the whole-model compiled step; and the batched retrieval scorer gives
the per-query loop's scores and ranks (fp32 exactly up to kernel rounding; bf16 rank agreement
reported). Runs on CPU too.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataset.synthetic import vocabulary  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.retrieval_eval import (FILL_SCORE, RetrievalFeatures, score_matrices,  # noqa: E402
                                   score_matrices_per_query)
from engine.cuda_graph import GraphedTrainStep, autocast_context  # noqa: E402
from engine.trainer import apply_compile  # noqa: E402
from models import MODEL_BUILDERS  # noqa: E402
from models.tokenization import build_tokenizer  # noqa: E402
from optim import create_optimizer  # noqa: E402

CAPTIONS = ["a small red circle on the left", "a large blue square", "a green star in the middle of the picture",
            "a white cross", "two yellow triangles at the bottom", "a purple ring", "an orange dot", "a grey bar"]
CONCEPTS = ["red circle small left", "blue square", "green star middle picture shape", "white cross",
            "yellow triangle bottom", "purple ring", "orange dot", "grey bar"]  # batch 8: divides the queue


def tiny_config(task: str, **overrides) -> dict:
    config = load_config(str(REPO / f"configs/demo/{task}.yaml"))
    config.update(bert_config=str(REPO / config["bert_config"]), init_deit=False, init_bert=False, **overrides)
    return config


def tiny_model(task: str, tokenizer, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = MODEL_BUILDERS[task](tiny_config(task.capitalize()), text_encoder=None, tokenizer=tokenizer)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.to(device)


def make_batch(tokenizer, device: torch.device):
    res = tiny_config("Pretrain")["image_res"]
    image = torch.randn(len(CAPTIONS), 3, res, res, generator=torch.Generator().manual_seed(1))
    caption, vc = tokenizer(CAPTIONS, max_length=25), tokenizer(CONCEPTS, max_length=55)
    return image.to(device), caption.to(device), vc.to(device)


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_fused_attention(tokenizer, device: torch.device) -> dict:
    fused = tiny_model("pretrain", tokenizer, device).eval()
    explicit = copy.deepcopy(fused)
    explicit.set_fused_attention(False)
    for block in explicit.decoder_blocks:
        block.attn.fused_attn = False
    image, caption, vc = make_batch(tokenizer, device)
    runs = []
    for model in (fused, explicit):
        torch.manual_seed(7)
        terms = model(image, (caption, vc), alpha=0.4)
        sum(terms.values()).backward()
        runs.append(({k: float(v.detach()) for k, v in terms.items()},
                     torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    loss_gap = max(abs(runs[0][0][k] - runs[1][0][k]) for k in runs[0][0])
    grad_gap = relative_gap(runs[1][1], runs[0][1])
    return {"losses_fused": runs[0][0], "max_loss_diff": loss_gap, "grad_relative_diff": grad_gap,
            "ok": loss_gap < 1e-3 and grad_gap < 1e-3}


def check_bf16_step(tokenizer, device: torch.device) -> dict:
    reference = tiny_model("pretrain", tokenizer, device)
    batch = make_batch(tokenizer, device)
    results = []
    for model, bf16 in ((reference, False), (copy.deepcopy(reference), True)):
        optimizer = create_optimizer(tiny_config("Pretrain")["optimizer"], model)
        history, grads = [], None
        for step in range(2):
            torch.manual_seed(100 + step)
            with autocast_context(device, bf16):
                terms = model(batch[0], (batch[1], batch[2]), alpha=0.4)
            optimizer.zero_grad(set_to_none=True)
            sum(terms.values()).backward()
            if grads is None:
                grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
            optimizer.step()
            history.append({k: float(v.detach()) for k, v in terms.items()})
        results.append((history, grads))
    (fp32, fp32_grads), (bf16, bf16_grads) = results
    worst = max(abs(a[k] - b[k]) / (abs(a[k]) + 1e-6) for a, b in zip(fp32, bf16) for k in a)
    cosine = float(F.cosine_similarity(fp32_grads, bf16_grads, dim=0))
    return {"fp32_losses": fp32, "bf16_losses": bf16, "max_relative_loss_diff": worst, "grad_cosine": cosine,
            "ok": worst < 0.02 and cosine > 0.99}


def pretrain_terms(module: nn.Module, inputs, alpha) -> dict:
    return module(inputs[0], (inputs[1], inputs[2]), alpha=alpha)


def train_twins(tokenizer, device: torch.device, candidate_graphed: bool, steps: int, vary: bool,
                prepare: Callable[[nn.Module], None] = lambda model: None) -> dict:
    """Train the tiny model (dropout off, MLM masks drawn on the device, as under cuda_graph) and an
    identical copy (``prepare``-d, stepped through a CUDA graph when ``candidate_graphed``) from the
    same seeds. With ``vary`` each step gets another batch, alpha and learning rate (what the graph
    copies into its captured buffers). Returns both loss histories, the largest relative loss gap and
    the weight gap; ``ok`` when losses agree to 1e-3 and the weights differ by under 1 % of how far
    the steps moved them."""
    reference = tiny_model("pretrain", tokenizer, device)
    reference.mlm_draws_on_device = True
    candidate = copy.deepcopy(reference)
    prepare(candidate)
    start = torch.cat([p.detach().flatten() for p in reference.parameters()])
    image, caption, vc = make_batch(tokenizer, device)
    runs = []
    for model, graphed in ((reference, False), (candidate, candidate_graphed)):
        optimizer = create_optimizer(tiny_config("Pretrain")["optimizer"], model)
        runner = GraphedTrainStep(model, optimizer, pretrain_terms, bf16=False, max_grad_norm=5.0, warmup_steps=2,
                                  enabled=graphed)
        history = []
        for step in range(steps):
            shift = step % len(CAPTIONS) if vary else 0
            batch = (image.roll(shift, 0), caption[torch.arange(len(CAPTIONS)).roll(shift)], vc)
            for group in optimizer.param_groups:
                group["lr"] = 1e-4 * (1 + step) if vary else 1e-4
            torch.manual_seed(100 + step)
            _, terms = runner(batch, 0.1 * step if vary else 0.4)
            history.append({k: float(v) for k, v in terms.items()})
        runs.append((history, torch.cat([p.detach().flatten() for p in model.parameters()]), runner))
    (losses_a, weights_a, _), (losses_b, weights_b, runner_b) = runs
    worst = max(abs(a[k] - b[k]) / (abs(a[k]) + 1e-6) for a, b in zip(losses_a, losses_b) for k in a)
    param_gap, moved = relative_gap(weights_b, weights_a), relative_gap(weights_a, start)
    return {"reference_losses": losses_a, "candidate_losses": losses_b, "max_relative_loss_diff": worst,
            "param_relative_diff": param_gap, "params_moved": moved, "captured": runner_b.captured,
            "queue_ptr_equal": bool(torch.equal(reference.queue_ptr, candidate.queue_ptr)),
            "ok": worst < 1e-3 and param_gap < 1e-2 * moved}


def check_graphed_step(tokenizer, device: torch.device) -> dict:
    """The CUDA-graph step (engine/cuda_graph.py) against the eager step over 6 steps (2 eager warm-up,
    then capture and replays), a new batch, alpha and learning rate each step; fp32. On CPU both run
    eagerly (the harness is checked, not the graph)."""
    result = train_twins(tokenizer, device, candidate_graphed=True, steps=6, vary=True)
    result["ok"] = result["ok"] and result["queue_ptr_equal"] and (result["captured"] or device.type != "cuda")
    return result


def check_compiled_step(tokenizer, device: torch.device) -> dict:
    """The whole forward compiled as one graph (config ``compile: model``) against eager over
    3 steps, fp32, inductor drawing random numbers with the eager ops (``fallback_random``) so both see
    the same masks. Minutes of compiling: only with --compile_model."""
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    return train_twins(tokenizer, device, candidate_graphed=False, steps=3, vary=False,
                       prepare=lambda model: apply_compile(model, "model"))


def top_k_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's k best columns in order (unscored entries last)."""
    return scores.masked_fill(scores == FILL_SCORE, -1e9).argsort(dim=1, stable=True)[:, -k:]


def check_retrieval_ranks(tokenizer, device: torch.device, k_test: int = 8) -> dict:
    model = tiny_model("retrieval", tokenizer, device).eval()
    generator = torch.Generator().manual_seed(2)
    num_images, texts = 24, [f"{c} number {i}" for i in range(10) for c in CAPTIONS]
    res = tiny_config("Retrieval")["image_res"]
    images = torch.randn(num_images, 3, res, res, generator=generator).to(device)
    vc = tokenizer([CONCEPTS[i % len(CONCEPTS)] for i in range(num_images)], max_length=55).to(device)
    text_batch = tokenizer(texts, max_length=30).to(device)
    result = {}
    for bf16 in (False, True):
        with torch.no_grad(), autocast_context(device, bf16):
            image_embeds, image_mask = model.encode_image(images, vc)
            text_embeds = model.encode_text(text_batch)
            features = RetrievalFeatures(image_embeds, image_mask, model.image_features(image_embeds).float(),
                                         text_embeds, text_batch.attention_mask,
                                         model.text_features(text_embeds).float())
        batched = score_matrices(model, features, k_test, pairs_per_batch=100, group_size=7, bf16=bf16,
                                 print_freq=10**9)
        loop = score_matrices_per_query(model, features, k_test, bf16=bf16)
        diff = max(float((a - b).abs().max()) for a, b in zip(batched, loop))
        same_order = all(torch.equal(top_k_order(a, k_test), top_k_order(b, k_test)) for a, b in zip(batched, loop))
        top1 = sum(float((a.argmax(dim=1) == b.argmax(dim=1)).float().mean()) for a, b in zip(batched, loop)) / 2
        result["bf16" if bf16 else "fp32"] = {"max_abs_diff": diff, "same_ranks": same_order, "top1_agreement": top1}
    result["ok"] = result["fp32"]["max_abs_diff"] < 1e-3 and result["bf16"]["top1_agreement"] > 0.9
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile_model", action="store_true",
                        help="also check the whole-model torch.compile step against eager (minutes of compiling)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":  # exact fp32 reference paths: no TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.txt").write_text("\n".join(vocabulary()) + "\n")
        tokenizer = build_tokenizer(folder)
    report = {"bench": "check_cuda", "device": args.device, "torch": torch.__version__,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    checks = (("fused_attention", check_fused_attention), ("bf16_step", check_bf16_step),
              ("graphed_step", check_graphed_step), ("retrieval_ranks", check_retrieval_ranks))
    if args.compile_model:
        checks += (("compiled_step", check_compiled_step),)
    for name, check in checks:
        try:
            report[name] = check(tokenizer, device)
        except Exception as error:  # report every check, even after one breaks
            report[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    report["ok"] = all(report[name]["ok"] for name, _ in checks)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
