"""Time each attention shape of the pretraining step under each kernel, forward + backward.

    python bench/bench_attention.py --device cuda                    # paper shapes, batch 64
    python bench/bench_attention.py --device cpu --batch_size 2 --iterations 1 --warmup 0

The step's attention calls come in four shapes (paper config, batch ``B``): the ViT's self-attention
over 312 tokens (CLS + 256 patches + 55 visual concepts; no mask, no dropout), BERT's text
self-attention over 25 tokens (padding mask, dropout 0.1), the visual-concept encoder's over 55
tokens (same), and the fusion layers' cross-attention of 25 text tokens over the 312 image tokens
(image mask, dropout 0.1; 3B texts in the ITM pass). Each is timed with every
``scaled_dot_product_attention`` backend that serves it and with the explicit product-softmax-product
(eager, and ``explicit_compiled`` through torch.compile). Prints one JSON line: milliseconds per call, forward and
forward + backward, and the achieved TFLOP/s, per shape and kernel; a kernel that cannot serve a
shape is reported with its error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, as a script
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pretrain import sdpa_backend, synchronize  # noqa: E402
from models.xbert import attention_probabilities  # noqa: E402

KERNELS = ("auto", "cudnn", "flash", "efficient", "math", "explicit", "explicit_compiled")


def attention_shapes(batch: int, heads: int = 12, head_dim: int = 64) -> dict[str, dict]:
    """name -> (queries, query length, key length, masked, dropout) of the pretraining step's calls."""
    return {
        "vit_self_312": dict(rows=batch, query_len=312, key_len=312, masked=False, dropout=0.0),
        "text_self_25": dict(rows=batch, query_len=25, key_len=25, masked=True, dropout=0.1),
        "vc_self_55": dict(rows=batch, query_len=55, key_len=55, masked=True, dropout=0.1),
        "fusion_cross_25x312_itm": dict(rows=3 * batch, query_len=25, key_len=312, masked=True, dropout=0.1),
    }


def explicit_attention(q, k, v, attn_mask=None, dropout_p=0.0):
    """models/xbert.py's explicit path: its attention maps, dropout, product with the values."""
    return F.dropout(attention_probabilities(q, k, attn_mask), p=dropout_p) @ v


def make_inputs(shape: dict, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
    """q, k, v in the models' layout ((rows, length, heads, dim) transposed to (rows, heads, length, dim),
    as a linear layer's output is reshaped) and an additive padding mask broadcast over heads and queries."""
    def tokens(length: int) -> torch.Tensor:
        x = torch.randn(shape["rows"], length, heads, head_dim, device=device, dtype=dtype)
        return x.transpose(1, 2).requires_grad_(True)

    q, k, v = tokens(shape["query_len"]), tokens(shape["key_len"]), tokens(shape["key_len"])
    mask = None
    if shape["masked"]:
        lengths = torch.randint(shape["key_len"] // 2, shape["key_len"] + 1, (shape["rows"],), device=device)
        keep = torch.arange(shape["key_len"], device=device)[None, :] < lengths[:, None]
        mask = torch.zeros(shape["rows"], 1, 1, shape["key_len"], device=device, dtype=dtype)
        mask = mask.masked_fill(~keep[:, None, None, :], -10000.0)
    return q, k, v, mask


def kernel_function(kernel: str) -> Callable:
    if kernel == "explicit":
        return explicit_attention
    if kernel == "explicit_compiled":
        return torch.compile(explicit_attention, dynamic=False)
    if kernel == "auto":
        return F.scaled_dot_product_attention
    from torch.nn.attention import sdpa_kernel

    backend = sdpa_backend(kernel)

    def only(q, k, v, attn_mask=None, dropout_p=0.0):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)

    return only


def time_calls(run: Callable[[], None], device: torch.device, iterations: int, warmup: int) -> float:
    """Milliseconds per call of ``run`` (wall clock around synchronised loops)."""
    for _ in range(warmup):
        run()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        run()
    synchronize(device)
    return 1000 * (time.perf_counter() - start) / max(1, iterations)


def measure(shape: dict, kernel: str, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
            iterations: int, warmup: int) -> dict:
    q, k, v, mask = make_inputs(shape, heads, head_dim, dtype, device)
    attend = kernel_function(kernel)
    grad = torch.randn(q.shape[0], heads, shape["query_len"], head_dim, device=device, dtype=dtype)

    def forward() -> torch.Tensor:
        return attend(q, k, v, attn_mask=mask, dropout_p=shape["dropout"])

    def forward_backward() -> None:
        out = forward()
        torch.autograd.backward(out, grad)
        q.grad = k.grad = v.grad = None

    with torch.no_grad():
        forward_ms = time_calls(forward, device, iterations, warmup)
    train_ms = time_calls(forward_backward, device, iterations, warmup)
    # FLOPs of the two products, forward (x2.5 for forward + backward: the backward recomputes the scores).
    flops = 4 * q.shape[0] * heads * shape["query_len"] * shape["key_len"] * head_dim
    return {"forward_ms": round(forward_ms, 4), "forward_backward_ms": round(train_ms, 4),
            "forward_tflops": round(flops / forward_ms / 1e9, 1) if forward_ms else None,
            "forward_backward_tflops": round(3.5 * flops / train_ms / 1e9, 1) if train_ms else None}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    p.add_argument("--shapes", nargs="+", default=None, help="default: every shape of attention_shapes()")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    heads, head_dim = 12, 64
    shapes = attention_shapes(args.batch_size, heads, head_dim)
    unknown = set(args.shapes or []) - set(shapes)
    if unknown:
        raise SystemExit(f"unknown shape(s) {sorted(unknown)}; known: {sorted(shapes)}")
    torch.manual_seed(0)
    record = {"bench": "attention", "device": args.device, "torch": torch.__version__,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype).replace("torch.", ""), "batch_size": args.batch_size, "results": {}}
    for name in args.shapes or shapes:
        shape = shapes[name]
        record["results"][name] = {"shape": shape}
        for kernel in args.kernels:
            try:
                result = measure(shape, kernel, heads, head_dim, dtype, device, args.iterations, args.warmup)
            except Exception as error:  # a kernel that cannot serve this shape (mask, dropout, device)
                result = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            record["results"][name][kernel] = result
            print(f"{name} {kernel}: {result}", file=sys.stderr, flush=True)
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
