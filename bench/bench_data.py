"""Throughput of the pretraining image pipeline: JPEG decode + RandomResizedCrop + flip + RandAugment
+ normalisation (``dataset.transforms.build_transform('pretrain', image_res)``), per CPU core and
through a DataLoader.

    python bench/bench_data.py --num_workers 2
    python bench/bench_data.py --image_dir /data/coco/train2014 --num_workers 8 --iterations 500

Without ``--image_dir`` it generates ``--num_images`` pictures with dataset.synthetic at
``--image_size`` px into a temporary folder and adds Gaussian noise (``--noise_std``) before JPEG
encoding, because the generator's flat shapes decode several times faster than photographs.
Prints one JSON line: decode / transform milliseconds per image and images/s of one process with
one thread (= one DataLoader worker on one core), images/s of a DataLoader with ``--num_workers``
workers, and the workers needed to feed ``--target_samples_per_s``.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, as a script

from dataset.loading import load_image  # noqa: E402
from dataset.synthetic import generate  # noqa: E402
from dataset.transforms import TRANSFORM_KINDS, build_transform  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image_dir", default=None, help="folder of JPEGs (searched recursively); default: generated")
    p.add_argument("--num_images", type=int, default=64, help="pictures to generate (without --image_dir)")
    p.add_argument("--image_size", type=int, default=480, help="side of generated pictures (COCO is ~640x480)")
    p.add_argument("--noise_std", type=float, default=20.0,
                   help="Gaussian noise (0-255 scale) added to generated pictures so they decode like photos")
    p.add_argument("--image_res", type=int, default=256, help="training resolution")
    p.add_argument("--transform", default="pretrain", choices=TRANSFORM_KINDS)
    p.add_argument("--iterations", type=int, default=200, help="images through the single-process loop")
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader workers (0: skip the loader)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--loader_batches", type=int, default=10, help="timed batches after the first one")
    p.add_argument("--target_samples_per_s", type=float, default=770.0, help="training throughput to feed")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class TransformedImages(Dataset):
    """``transform(load_image(path))`` over a list of files, cycled to ``length`` items (as
    AnnotationDataset.read_image does)."""

    def __init__(self, paths: Sequence[str], transform, length: int) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[index % len(self.paths)]))


def make_images(folder: str, count: int, size: int, noise_std: float, seed: int) -> list[str]:
    """Generated pretraining pictures, re-encoded with noise (JPEG quality 90) when ``noise_std`` > 0."""
    generate(folder, seed=seed, image_size=size, num_pretrain=count, num_retrieval=0, num_vqa=0, num_ve=0,
             num_nlvr=0, num_grounding=0, num_eval=0)
    paths = sorted(glob.glob(os.path.join(folder, "images", "pretrain", "*.jpg")))
    if noise_std > 0:
        rng = np.random.default_rng(seed)
        for path in paths:
            pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
            pixels = np.clip(pixels + rng.normal(0.0, noise_std, pixels.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
    return paths


def find_images(folder: str) -> list[str]:
    paths = sorted(p for ext in ("jpg", "jpeg", "JPG", "JPEG", "png")
                   for p in glob.glob(os.path.join(folder, "**", f"*.{ext}"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no images under {folder}")
    return paths


def single_process(paths: Sequence[str], transform, iterations: int) -> dict:
    """One process, one thread (torch and OpenCV): the work of one DataLoader worker on one core."""
    import cv2

    torch_threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        for path in paths[: min(4, len(paths))]:  # warm-up: page cache, lazy imports
            transform(load_image(path))
        decode = augment = 0.0
        cpu_start = time.process_time()
        for i in range(iterations):
            start = time.perf_counter()
            image = load_image(paths[i % len(paths)])
            middle = time.perf_counter()
            transform(image)
            end = time.perf_counter()
            decode += middle - start
            augment += end - middle
        cpu = time.process_time() - cpu_start
    finally:
        torch.set_num_threads(torch_threads)
        cv2.setNumThreads(cv2_threads)
    total = decode + augment
    return {"decode_ms": round(1000 * decode / iterations, 3), "transform_ms": round(1000 * augment / iterations, 3),
            "images_per_s_per_core": round(iterations / total, 1),
            # CPU time excludes waiting for a core: the per-core rate on a machine with other load.
            "images_per_cpu_s": round(iterations / cpu, 1) if cpu > 0 else None}


def through_loader(paths: Sequence[str], transform, args: argparse.Namespace) -> dict:
    """A DataLoader as the trainer builds it (non-persistent workers); the first batch (worker start) is not timed."""
    length = args.batch_size * (args.loader_batches + 1)
    loader = DataLoader(TransformedImages(paths, transform, length), batch_size=args.batch_size,
                        num_workers=args.num_workers, shuffle=False, drop_last=True)
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    count = 0
    for batch in iterator:
        count += batch.shape[0]
    seconds = time.perf_counter() - start
    rate = count / seconds
    return {"loader_images_per_s": round(rate, 1), "loader_images_per_s_per_worker": round(rate / args.num_workers, 1),
            "loader_seconds": round(seconds, 3)}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    transform = build_transform(args.transform, args.image_res)
    with tempfile.TemporaryDirectory() as workdir:
        if args.image_dir:
            paths = find_images(args.image_dir)
        else:
            print(f"generating {args.num_images} pictures of {args.image_size} px", file=sys.stderr, flush=True)
            paths = make_images(workdir, args.num_images, args.image_size, args.noise_std, args.seed)
        with Image.open(paths[0]) as first:
            source_size = list(first.size)
        record = {
            "bench": "data_pipeline", "transform": args.transform, "image_res": args.image_res,
            "source": args.image_dir or "generated", "num_files": len(paths), "first_image_size": source_size,
            "mean_file_kib": round(sum(os.path.getsize(p) for p in paths) / len(paths) / 1024, 1),
            "noise_std": None if args.image_dir else args.noise_std, "cpu_count": os.cpu_count(),
            "iterations": args.iterations,
        }
        record.update(single_process(paths, transform, args.iterations))
        if args.num_workers > 0:
            record.update({"num_workers": args.num_workers, "batch_size": args.batch_size})
            record.update(through_loader(paths, transform, args))
    per_core = record["images_per_s_per_core"]
    record["target_samples_per_s"] = args.target_samples_per_s
    record["workers_needed"] = math.ceil(args.target_samples_per_s / per_core)
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
