"""Throughput of the retrieval ITM re-ranking: batched (engine.retrieval_eval.score_matrices) vs the
original per-query loop, on random inputs to a randomly initialised model.

    python bench/bench_retrieval_eval.py --config configs/demo/Retrieval.yaml --device cpu
    python bench/bench_retrieval_eval.py --config configs/Retrieval_coco.yaml --device cuda --bf16 \
        --num_images 500 --k_test 256

Prints one JSON line: sizes, device, seconds and ITM pairs per second of both scorers (pairs counted
as the original protocol does: k_test per image row plus k_test per text row), the largest
difference between their score matrices, and the scoring time extrapolated at the measured rates
to the COCO 5K test set (5000 images, 25000 captions, k_test 256) and Flickr30k 1K (1000, 5000, 128).
Feature extraction (ViT and text encoder, identical for both) is timed separately, after one untimed
warm-up batch of each encoder and with the inputs already on the device (decoding the JPEGs is the
data pipeline's part: bench_data.py), and extrapolated to the same test sets in proportion to the
number of images and of captions; ``extrapolated_total_seconds`` adds the batched scoring.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, as a script

from engine.config import load_config  # noqa: E402
from engine.retrieval_eval import (TEXT_LENGTH, VC_LENGTH, RetrievalFeatures, encode_image_batches,  # noqa: E402
                                   encode_text_batches, pairs_scored, score_matrices, score_matrices_per_query)
from models import MODEL_BUILDERS  # noqa: E402
from models.tokenization import TokenBatch  # noqa: E402

TEST_SETS = {"coco5k": (5000, 25000, 256), "flickr1k": (1000, 5000, 128)}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo/Retrieval.yaml", help="model sizes come from here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast")
    p.add_argument("--num_images", type=int, default=64)
    p.add_argument("--captions_per_image", type=int, default=5)
    p.add_argument("--k_test", type=int, default=None, help="default: the config's k_test")
    p.add_argument("--pairs_per_batch", type=int, default=1024, help="batched scorer: pairs per fusion forward")
    p.add_argument("--group_size", type=int, default=32, help="batched scorer: texts sharing one image")
    p.add_argument("--image_batch_size", type=int, default=32, help="images per encoder batch")
    p.add_argument("--text_batch_size", type=int, default=64, help="captions per encoder batch "
                   "(the evaluation's eval_batch_size_text)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def random_tokens(count: int, length: int, vocab: int, min_length: int, generator: torch.Generator) -> TokenBatch:
    """[CLS]-led random ids with random real lengths in [min_length, length]; the rest is padding."""
    ids = torch.randint(5, vocab, (count, length), generator=generator)
    ids[:, 0] = 2
    lengths = torch.randint(min_length, length + 1, (count,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return TokenBatch(ids * mask, mask)


def random_inputs(model, config: dict, args: argparse.Namespace, device: torch.device) -> tuple[list, list]:
    """Image batches (images, VC tokens) of ``--image_batch_size`` and caption batches of
    ``--text_batch_size``, random, already on ``device``."""
    generator = torch.Generator().manual_seed(args.seed)
    vocab = model.text_encoder.config.vocab_size
    res = config["image_res"]
    texts = random_tokens(args.num_images * args.captions_per_image, TEXT_LENGTH, vocab, 6, generator)
    image_batches = []
    for start in range(0, args.num_images, args.image_batch_size):
        count = min(args.image_batch_size, args.num_images - start)
        images = torch.randn(count, 3, res, res, generator=generator)
        image_batches.append((images.to(device), random_tokens(count, VC_LENGTH, vocab, 20, generator).to(device)))
    text_batches = [texts[start:start + args.text_batch_size].to(device)
                    for start in range(0, texts.input_ids.shape[0], args.text_batch_size)]
    return image_batches, text_batches


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # the scorers' progress lines: stdout is the one JSON line
        result = measure(args)
    print(json.dumps(result))
    return result


def measure(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    config = dict(load_config(args.config), init_bert=False, init_deit=False)
    k_test = args.k_test or config["k_test"]
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = MODEL_BUILDERS["retrieval"](config, text_encoder=None, tokenizer=None).to(device).eval()

    image_batches, text_batches = random_inputs(model, config, args, device)
    encode_image_batches(model, image_batches[:1], device, args.bf16)  # warm-up (kernels, allocator, autotuning)
    encode_text_batches(model, text_batches[:1], device, args.bf16)
    (image_embeds, image_mask, image_feats), image_seconds = timed(
        lambda: encode_image_batches(model, image_batches, device, args.bf16), device)
    (text_embeds, text_mask, text_feats), text_seconds = timed(
        lambda: encode_text_batches(model, text_batches, device, args.bf16), device)
    features = RetrievalFeatures(image_embeds, image_mask, image_feats, text_embeds, text_mask, text_feats)
    small = RetrievalFeatures(features.image_embeds[:4], None, features.image_feats[:4], features.text_embeds[:8],
                              features.text_mask[:8], features.text_feats[:8])
    score_matrices(model, small, 2, bf16=args.bf16, print_freq=10**9)  # warm-up (kernels, allocator)
    score_matrices_per_query(model, small, 2, bf16=args.bf16)
    (batched_i2t, batched_t2i), batched_seconds = timed(lambda: score_matrices(
        model, features, k_test, pairs_per_batch=args.pairs_per_batch, group_size=args.group_size, bf16=args.bf16,
        print_freq=10**9), device)
    (loop_i2t, loop_t2i), loop_seconds = timed(lambda: score_matrices_per_query(
        model, features, k_test, bf16=args.bf16), device)

    pairs = pairs_scored(features.num_images, features.num_texts, k_test)
    rates = {"batched": pairs / batched_seconds, "per_query": pairs / loop_seconds}
    # Each encoder scales with its own count: images for the ViT, captions for the text encoder.
    feature_seconds = {name: round(image_seconds * n_img / features.num_images + text_seconds * n_txt / features.num_texts, 2)
                       for name, (n_img, n_txt, _) in TEST_SETS.items()}
    extrapolated = {
        name: {method: round(pairs_scored(n_img, n_txt, k) / rate, 2) for method, rate in rates.items()}
        for name, (n_img, n_txt, k) in TEST_SETS.items()
    }
    result = {
        "bench": "retrieval_eval", "config": args.config, "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "bf16": args.bf16, "num_images": features.num_images,
        "num_texts": features.num_texts, "k_test": k_test, "pairs": pairs,
        "pairs_per_batch": args.pairs_per_batch, "group_size": args.group_size,
        "image_batch_size": args.image_batch_size, "text_batch_size": args.text_batch_size,
        "image_feature_seconds": round(image_seconds, 3), "text_feature_seconds": round(text_seconds, 3),
        "images_per_s": round(features.num_images / image_seconds, 1),
        "texts_per_s": round(features.num_texts / text_seconds, 1),
        "batched_seconds": round(batched_seconds, 3), "per_query_seconds": round(loop_seconds, 3),
        "batched_pairs_per_s": round(rates["batched"], 1), "per_query_pairs_per_s": round(rates["per_query"], 1),
        "speedup": round(loop_seconds / batched_seconds, 2),
        "max_abs_diff": max(float((batched_i2t - loop_i2t).abs().max()), float((batched_t2i - loop_t2i).abs().max())),
        "extrapolated_scoring_seconds": extrapolated,
        "extrapolated_feature_seconds": feature_seconds,
        "extrapolated_total_seconds": {name: round(feature_seconds[name] + extrapolated[name]["batched"], 2)
                                       for name in TEST_SETS},
    }
    return result


if __name__ == "__main__":
    main()
