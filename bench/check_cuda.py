"""Correctness of the fast paths on a GPU: the CPU tests' claims, re-checked on CUDA kernels.

    python bench/check_cuda.py --device cuda        # prints one JSON line; exit code 1 if a check fails

On the tiny pretraining model (random weights, dropout off): fused (SDPA) vs explicit attention,
the patch embedding as one product vs the convolution, the MLM heads on the masked rows vs all
rows and the hard negatives' image rows picked by a product vs indexing give the same losses and
gradients in fp32; a bf16-autocast step stays close to the fp32 step
(losses and gradient direction); the step captured in a CUDA graph and replayed gives the eager
step's losses and weights (same seeds; new batch, alpha and learning rate each step); with
``--compile_model``, so does the whole-model compiled step (``--compile_blocks``: each layer compiled;
``--compile_mode``: torch.compile's mode, e.g. max-autotune-no-cudagraphs); and the batched retrieval scorer gives
the per-query loop's scores and ranks (fp32 exactly up to kernel rounding; bf16 rank agreement
reported). Runs on CPU too.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
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
from engine.trainer import TORCH_COMPILE_MODES, apply_compile  # noqa: E402
from models import MODEL_BUILDERS  # noqa: E402
from models.precision import set_low_precision_residual  # noqa: E402
from models.tokenization import build_tokenizer  # noqa: E402
from models.vit import PatchEmbedding  # noqa: E402
from optim import create_optimizer  # noqa: E402

CAPTIONS = ["a small red circle on the left", "a large blue square", "a green star in the middle of the picture",
            "a white cross", "two yellow triangles at the bottom", "a purple ring", "an orange dot", "a grey bar"]
CONCEPTS = ["red circle small left", "blue square", "green star middle picture shape", "white cross",
            "yellow triangle bottom", "purple ring", "orange dot", "grey bar"]  # batch 8: divides the queue


def tiny_config(task: str, **overrides) -> dict:
    config = load_config(str(REPO / f"configs/demo/{task}.yaml"))
    config.update(bert_config=str(REPO / config["bert_config"]), init_deit=False, init_bert=False, **overrides)
    return config


def tiny_model(task: str, tokenizer, device: torch.device, dropout: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = MODEL_BUILDERS[task](tiny_config(task.capitalize()), text_encoder=None, tokenizer=tokenizer)
    for module in model.modules():
        if isinstance(module, nn.Dropout) and not dropout:
            module.p = 0.0
    return model.to(device)


def make_batch(tokenizer, device: torch.device):
    res = tiny_config("Pretrain")["image_res"]
    image = torch.randn(len(CAPTIONS), 3, res, res, generator=torch.Generator().manual_seed(1))
    caption, vc = tokenizer(CAPTIONS, max_length=25), tokenizer(CONCEPTS, max_length=55)
    return image.to(device), caption.to(device), vc.to(device)


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def twin_gaps(reference: nn.Module, candidate: nn.Module, tokenizer, device: torch.device) -> dict:
    """One forward + backward of two twins from the same seed: largest loss gap, relative gradient gap."""
    image, caption, vc = make_batch(tokenizer, device)
    runs = []
    for model in (reference, candidate):
        torch.manual_seed(7)
        terms = model(image, (caption, vc), alpha=0.4)
        sum(terms.values()).backward()
        runs.append(({k: float(v.detach()) for k, v in terms.items()},
                     torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    loss_gap = max(abs(runs[0][0][k] - runs[1][0][k]) for k in runs[0][0])
    grad_gap = relative_gap(runs[1][1], runs[0][1])
    return {"losses": runs[0][0], "max_loss_diff": loss_gap, "grad_relative_diff": grad_gap,
            "ok": loss_gap < 1e-3 and grad_gap < 1e-3}


def check_fused_attention(tokenizer, device: torch.device) -> dict:
    fused = tiny_model("pretrain", tokenizer, device).eval()
    explicit = copy.deepcopy(fused)
    explicit.set_fused_attention(False)
    for block in explicit.decoder_blocks:
        block.attn.fused_attn = False
    return twin_gaps(fused, explicit, tokenizer, device)


def check_exact_rewrites(tokenizer, device: torch.device) -> dict:
    """The rewrites that compute the original's values another way, against the original's way: the
    patch embedding as one product (vs timm's strided convolution), the MLM heads on the masked
    rows (vs all rows; on a GPU the static row bound) and the hard negatives' image keys/values
    picked by a one-hot product (vs indexing)."""
    rewritten = tiny_model("pretrain", tokenizer, device).eval()  # every rewrite on (the defaults)
    convolution, all_rows, indexed_rows = (copy.deepcopy(rewritten) for _ in range(3))  # one rewrite off each
    for module in convolution.modules():
        if isinstance(module, PatchEmbedding):
            module.forward = lambda image, proj=module.proj: proj(image).flatten(2).transpose(1, 2)
    all_rows.mlm_logits_on_masked = False
    indexed_rows.pick_image_rows_by_product = False
    originals = {"patch_embedding": convolution, "mlm_masked_rows": all_rows, "image_rows_by_product": indexed_rows}
    report = {name: twin_gaps(original, copy.deepcopy(rewritten), tokenizer, device)
              for name, original in originals.items()}
    report["ok"] = all(part["ok"] for part in report.values())
    return report


def check_bf16_step(tokenizer, device: torch.device) -> dict:
    """Two steps in bf16 autocast against fp32: losses within 2 %, first gradients' cosine > 0.99; also
    with the residual streams in bf16 (config bf16_residual), reported under ``bf16_residual``."""
    start = tiny_model("pretrain", tokenizer, device)
    low_stream = copy.deepcopy(start)
    set_low_precision_residual(low_stream, True)
    # each comparison trains its own fresh copies (a step moves the weights, momentum twins and queues)
    result = compare_bf16_step(tokenizer, device, copy.deepcopy(start), copy.deepcopy(start))
    result["bf16_residual"] = compare_bf16_step(tokenizer, device, copy.deepcopy(start), low_stream)
    result["ok"] = result["ok"] and result["bf16_residual"]["ok"]
    return result


def compare_bf16_step(tokenizer, device: torch.device, reference: nn.Module, candidate: nn.Module) -> dict:
    """``reference`` stepped in fp32, ``candidate`` (its copy) in bf16 autocast, from the same seeds."""
    batch = make_batch(tokenizer, device)
    results = []
    for model, bf16 in ((reference, False), (candidate, True)):
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
                prepare: Callable[[nn.Module], None] = lambda model: None, merge_text_passes: bool = False) -> dict:
    """Train the tiny model (dropout off, MLM masks drawn on the device, as under cuda_graph) and an
    identical copy (``prepare``-d, stepped through a CUDA graph when ``candidate_graphed``) from the
    same seeds. With ``vary`` each step gets another batch, alpha and learning rate (what the graph
    copies into its captured buffers). Returns both loss histories, the largest relative loss gap and
    the weight gap; ``ok`` when losses agree to 1e-3 and the weights differ by under 1 % of how far
    the steps moved them."""
    reference = tiny_model("pretrain", tokenizer, device)
    reference.mlm_draws_on_device = True
    reference.merge_text_passes = merge_text_passes
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


def check_graphed_step(tokenizer, device: torch.device, merge_text_passes: bool = False) -> dict:
    """The CUDA-graph step (engine/cuda_graph.py) against the eager step over 6 steps (2 eager warm-up,
    then capture and replays), a new batch, alpha and learning rate each step; fp32. On CPU both run
    eagerly (the harness is checked, not the graph)."""
    result = train_twins(tokenizer, device, candidate_graphed=True, steps=6, vary=True,
                         merge_text_passes=merge_text_passes)
    result["ok"] = result["ok"] and result["queue_ptr_equal"] and (result["captured"] or device.type != "cuda")
    return result


HASH_MODULUS = 2**31


def hashed_uniform(shape: Sequence[int], salt, device) -> torch.Tensor:
    """Stand-in for uniform [0, 1) draws that is the same in eager and compiled code whatever order the
    draws are made in: an integer hash of (element index, ``salt``), computed exactly, its top 24 bits
    scaled by 2**-24 (exact). ``salt``: an int, or a tensor broadcastable to ``shape`` (per-element salts)."""
    index = torch.arange(math.prod(shape), device=device, dtype=torch.int64).reshape(shape)
    if isinstance(salt, torch.Tensor):
        salt = salt.to(device=device, dtype=torch.int64)
    mixed = (index + salt * 1000003) % HASH_MODULUS
    for multiplier, increment in ((1103515245, 12345), (48271, 11), (69069, 1), (1103515245, 7)):
        mixed = (mixed * multiplier + increment) % HASH_MODULUS  # products stay below 2**62
        mixed = mixed ^ (mixed >> 13)  # the shifts break the congruences' linear structure
    return (mixed >> 7).to(torch.float32) / 2**24  # 24 bits: exact in float32, below 1


@contextlib.contextmanager
def order_independent_draws():
    """Replace every random draw of the pretraining forward (``torch.bernoulli`` / ``torch.randint`` of the
    MLM masks, ``torch.rand`` of the MAE noise, ``losses.sample_negatives`` of the ITM negatives) with
    ``hashed_uniform`` values, salted by what tells the calls apart (the probability, the bound, the
    shape). Eager and compiled steps then see the same numbers even where the compiler reorders or
    reimplements the draws, so any loss gap is a gap in the computation."""
    from models import losses

    saved = (torch.bernoulli, torch.randint, torch.rand, losses.sample_negatives)

    def bernoulli(probabilities, *args, generator=None, **kwargs):
        salt = (probabilities * 1000).round().long()  # 0.15 / 0.8 / 0.5: the three MLM draws differ
        return (hashed_uniform(probabilities.shape, salt, probabilities.device) < probabilities).to(probabilities.dtype)

    def randint(high, size, *, generator=None, dtype=torch.int64, device=None, **kwargs):
        return (hashed_uniform(size, high, device) * high).floor().to(dtype)

    def rand(*size, generator=None, dtype=None, device=None, **kwargs):
        size = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        return hashed_uniform(size, sum(size), device).to(dtype or torch.float32)

    def sample_negatives(weights):
        race = -torch.log1p(-hashed_uniform(weights.shape, 7, weights.device))  # Exp(1) by inversion
        return (weights / race).argmax(dim=1)

    torch.bernoulli, torch.randint, torch.rand, losses.sample_negatives = bernoulli, randint, rand, sample_negatives
    try:
        yield
    finally:
        torch.bernoulli, torch.randint, torch.rand, losses.sample_negatives = saved


def check_compiled_step(tokenizer, device: torch.device, merge_text_passes: bool = False,
                        compile_mode: str = "default", scope: str = "model") -> dict:
    """The whole forward compiled as one graph (config ``compile: model``; ``scope`` 'blocks': each ViT
    block and BERT layer) against eager over
    3 steps, fp32, every random draw replaced by ``order_independent_draws`` (the compiled graph may
    draw in another order, or with other kernels: measured on an H100 with ``fallback_random`` alone,
    the terms with draws differed by up to 1.4 % while the one without matched). Minutes of compiling:
    only with --compile_model; ``compile_mode`` is the config key of that name (a mode other than the
    default also gets ``train_with_dropout``)."""
    prepare = functools.partial(apply_compile, mode=scope, compile_mode=compile_mode)
    with order_independent_draws():
        result = train_twins(tokenizer, device, candidate_graphed=False, steps=3, vary=False, prepare=prepare,
                             merge_text_passes=merge_text_passes)
    if compile_mode != "default":  # the default mode's compiled steps with dropout: the benchmarks' finite losses
        result["with_dropout"] = train_with_dropout(tokenizer, device, prepare, merge_text_passes)
        result["ok"] = result["ok"] and result["with_dropout"]["ok"]
    return result


def train_with_dropout(tokenizer, device: torch.device, prepare: Callable[[nn.Module], None],
                       merge_text_passes: bool, steps: int = 4) -> dict:
    """The ``prepare``-d tiny model trained as in a real run (dropout on, the real random draws), where
    no eager twin can match it draw for draw: every loss and gradient must stay finite. On CPU the
    autotuned compiled BERT layers failed only this way (NaN gradients from the second step)."""
    model = tiny_model("pretrain", tokenizer, device, dropout=True)
    model.mlm_draws_on_device = True
    model.merge_text_passes = merge_text_passes
    prepare(model)
    optimizer = create_optimizer(tiny_config("Pretrain")["optimizer"], model)
    runner = GraphedTrainStep(model, optimizer, pretrain_terms, bf16=False, enabled=False)  # the trainer's step
    batch = make_batch(tokenizer, device)
    losses, bad_steps = [], []
    for step in range(steps):
        torch.manual_seed(200 + step)
        _, terms = runner(batch, 0.4)  # the step's gradients stay on the parameters until the next one
        finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        if not (finite and all(torch.isfinite(value) for value in terms.values())):
            bad_steps.append(step)
        losses.append({k: float(v) for k, v in terms.items()})
    return {"losses": losses, "non_finite_steps": bad_steps, "ok": not bad_steps}


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
    parser.add_argument("--compile_blocks", action="store_true",
                        help="also check the step with every ViT block and BERT layer compiled (compile: blocks)")
    parser.add_argument("--compile_mode", default="default", choices=TORCH_COMPILE_MODES,
                        help="torch.compile's mode for --compile_model / --compile_blocks (config key compile_mode)")
    parser.add_argument("--merge_text_passes", action="store_true",
                        help="the pretraining twins (graph and compiled checks) run with merge_text_passes")
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
    twins = {"merge_text_passes": args.merge_text_passes}  # the pretraining twins' option
    checks = (("fused_attention", check_fused_attention), ("exact_rewrites", check_exact_rewrites),
              ("bf16_step", check_bf16_step),
              ("graphed_step", functools.partial(check_graphed_step, **twins)),
              ("retrieval_ranks", check_retrieval_ranks))
    if args.compile_model:
        checks += (("compiled_step", functools.partial(check_compiled_step, compile_mode=args.compile_mode,
                                                       **twins)),)
    if args.compile_blocks:
        checks += (("compiled_blocks_step", functools.partial(check_compiled_step, compile_mode=args.compile_mode,
                                                              scope="blocks", **twins)),)
    if args.compile_model or args.compile_blocks:
        report["compile_mode"] = args.compile_mode
    report["merge_text_passes"] = args.merge_text_passes
    for name, check in checks:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # progress lines (retrieval's logger): stdout is the JSON
                report[name] = check(tokenizer, device)
        except Exception as error:  # report every check, even after one breaks
            report[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    report["ok"] = all(report[name]["ok"] for name, _ in checks)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
