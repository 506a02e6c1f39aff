"""Throughput of the top-k visual-concept assignment (preprocess.topk) on random embeddings.

    python bench/bench_vc_topk.py --num_images 200000 --num_concepts 20000 --device cpu

Prints one JSON line: sizes, device, dtype, seconds and images per second. Embeddings are
random float16 (the stored format); the time covers normalisation, similarities, top-k and
the copy of the indices back to the host, chunk by chunk, as create_clip_da_captions_from_saved.py
runs it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, as a script

from preprocess.topk import assign_topk, resolve_dtype  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--num_images', type=int, default=200000)
    p.add_argument('--num_concepts', type=int, default=20000)
    p.add_argument('--dim', type=int, default=512)
    p.add_argument('--k', type=int, default=15)
    p.add_argument('--chunk', type=int, default=4096, help='images scored at once')
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    p.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'float16', 'bfloat16'])
    p.add_argument('--threads', type=int, default=None, help='CPU threads (default: torch default)')
    p.add_argument('--seed', type=int, default=0)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    images = rng.standard_normal((args.num_images, args.dim), dtype=np.float32).astype(np.float16)
    concepts = rng.standard_normal((args.num_concepts, args.dim), dtype=np.float32).astype(np.float16)
    # Warm-up on one chunk (kernel selection, CUDA context), not timed.
    assign_topk(images[:args.chunk], concepts, args.k, chunk_size=args.chunk, device=args.device,
                dtype=args.dtype, progress=False)
    start = time.perf_counter()
    assign_topk(images, concepts, args.k, chunk_size=args.chunk, device=args.device,
                dtype=args.dtype, progress=False)
    seconds = time.perf_counter() - start
    device = torch.device(args.device)
    print(json.dumps({
        'bench': 'vc_topk', 'device': args.device,
        'device_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
        'threads': torch.get_num_threads(), 'dtype': str(resolve_dtype(args.dtype, device)),
        'num_images': args.num_images, 'num_concepts': args.num_concepts, 'dim': args.dim,
        'k': args.k, 'chunk': args.chunk, 'seconds': round(seconds, 3),
        'images_per_s': round(args.num_images / seconds, 1)}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
