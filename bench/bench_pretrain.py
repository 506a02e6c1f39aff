"""Throughput of one ViCHA pretraining step on random data: forward (ITC + H-ITC + ITM + MLM + MAE),
backward, AdamW, momentum update and queue write, exactly as engine/trainer.py runs them.

    python bench/bench_pretrain.py --tiny --device cpu --steps 5 --warmup 2
    python bench/bench_pretrain.py --device cuda --precision bf16 --batch_size 32 --steps 30
    python bench/bench_pretrain.py --device cuda --precision bf16 --compile blocks --batch_size 64
    python bench/bench_pretrain.py --device cuda --precision bf16 --cuda_graph --compile blocks --batch_size 64

The model is ViCHAPretrain (``models.MODEL_BUILDERS['pretrain']``) at the size of ``--config``
(default: the paper's configs/Pretrain.yaml; ``--tiny``: configs/demo/Pretrain.yaml) with random
weights; the batch is random images, captions of ``--text_length`` tokens and ``--vc_length`` visual
concept tokens, built once on the device (the loader is benchmarked by bench_data.py). Prints one
JSON line: samples/s, ms per step, peak memory (CUDA: max allocated over the timed steps; CPU:
the process's peak RSS), the mean of every loss over the timed steps, and the settings used.
With ``--sync_debug`` (CUDA) one extra step runs under ``torch.cuda.set_sync_debug_mode('warn')``
and the JSON lists the synchronising calls it made.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere, as a script

from dataset.synthetic import vocabulary  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.cuda_graph import GraphedTrainStep  # noqa: E402
from engine.trainer import COMPILE_MODES, TORCH_COMPILE_MODES, configure_runtime  # noqa: E402
from models import MODEL_BUILDERS  # noqa: E402
from models.tokenization import TokenBatch, ViCHATokenizer, build_tokenizer  # noqa: E402
from optim import create_optimizer  # noqa: E402

SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
PAPER_CONFIG = "configs/Pretrain.yaml"
TINY_CONFIG = "configs/demo/Pretrain.yaml"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help=f"pretraining YAML (default {PAPER_CONFIG})")
    p.add_argument("--tiny", action="store_true", help=f"use {TINY_CONFIG} (the 64-wide test model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                   help="fp32: no TF32; tf32: TF32 matmuls/convolutions (CUDA); bf16: bf16 autocast "
                        "(+ TF32 on CUDA for what autocast keeps in fp32)")
    p.add_argument("--batch_size", type=int, default=None, help="default: the config's batch_size")
    p.add_argument("--queue_size", type=int, default=None, help="default: the config's queue_size")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (kernels, allocator, compile)")
    p.add_argument("--compile", default="none", choices=COMPILE_MODES,
                   help="torch.compile: 'blocks' = every ViT block and BERT layer, 'model' = the whole forward")
    p.add_argument("--compile_mode", default="default", choices=TORCH_COMPILE_MODES,
                   help="torch.compile's mode (config key compile_mode): 'max-autotune-no-cudagraphs' times "
                        "Triton product kernels with fused epilogues against cuBLAS (long first compile)")
    p.add_argument("--cuda_graph", action=argparse.BooleanOptionalAction, default=False,
                   help="capture the whole step in a CUDA graph and replay it (engine/cuda_graph.py, the "
                        "trainer's cuda_graph key); MLM masks are then drawn on the device")
    p.add_argument("--grad_checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--fused_attention", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--sdpa_backend", default="auto", choices=SDPA_BACKENDS,
                   help="scaled_dot_product_attention's first choice of kernel (auto: PyTorch's order; on an "
                        "H100 it picked cuDNN); calls it cannot serve fall back to efficient, then math")
    p.add_argument("--share_image_keys_values", action=argparse.BooleanOptionalAction, default=True,
                   help="project the fusion cross-attention keys/values of the images once per step")
    p.add_argument("--bf16_residual", action=argparse.BooleanOptionalAction, default=False,
                   help="config bf16_residual: the encoders' residual streams in bf16 under autocast")
    p.add_argument("--merge_text_passes", action=argparse.BooleanOptionalAction, default=False,
                   help="the config key: one text pass of 2B captions and one fusion pass of 4B texts")
    p.add_argument("--mlm_logits_on_masked", action=argparse.BooleanOptionalAction, default=True,
                   help="the config key: the MLM vocabulary heads on the masked rows only (no-: all B x L rows)")
    p.add_argument("--pick_image_rows_by_product", action=argparse.BooleanOptionalAction, default=True,
                   help="the config key: the hard negatives' image keys/values picked by a one-hot product "
                        "(no-: by indexing, whose backward scatters with atomic adds)")
    p.add_argument("--text_length", type=int, default=25, help="caption tokens ([CLS] + 24 pieces, as the original)")
    p.add_argument("--vc_length", type=int, default=55, help="visual-concept tokens per image")
    p.add_argument("--alpha", type=float, default=0.4, help="distillation weight (the value after epoch 0)")
    p.add_argument("--sync_debug", action=argparse.BooleanOptionalAction, default=False,
                   help="CUDA: list the host-device synchronisations of one step")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile N more steps: GPU busy time per step and the top operators")
    p.add_argument("--kernel_table", default=None, metavar="PATH",
                   help="with --profile: write every kernel (CUDA) or operator (CPU) of the profiled steps to "
                        "this JSON file: name, ms per step, calls per step, largest first")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny and args.config:
        p.error("give --config or --tiny, not both")
    args.config = args.config or (TINY_CONFIG if args.tiny else PAPER_CONFIG)
    return args


def _repo_path(path: str) -> str:
    """``path`` as given if it exists, else relative to the repository root."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return str(REPO / path)


def set_precision(precision: str, device: torch.device) -> bool:
    """Apply the matmul/convolution precision; returns whether to autocast to bf16."""
    if device.type == "cuda":
        allow_tf32 = precision in ("tf32", "bf16")
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
    elif precision == "tf32":
        raise ValueError("--precision tf32 needs a CUDA device; use fp32 or bf16 on CPU")
    return precision == "bf16"


def build_special_tokenizer(vocab_size: int, workdir: str) -> ViCHATokenizer:
    """A tokenizer whose vocabulary size matches the model: bert-base-uncased (bundled) for 30522,
    else the generated demo vocabulary (only the special ids and the size are used)."""
    if vocab_size == 30522:
        return build_tokenizer("bert-base-uncased")
    vocab = vocabulary()
    if len(vocab) != vocab_size:
        raise ValueError(f"bert_config vocab_size {vocab_size} matches neither bert-base-uncased (30522) "
                         f"nor the generated demo vocabulary ({len(vocab)})")
    folder = os.path.join(workdir, "tokenizer")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(vocab) + "\n")
    return build_tokenizer(folder)


def random_tokens(batch: int, length: int, min_length: int, tokenizer: ViCHATokenizer,
                  generator: torch.Generator) -> TokenBatch:
    """``[CLS]`` + random ordinary ids, random real lengths in [min_length, length], padded to ``length``."""
    specials = [tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id,
                tokenizer.unk_token_id]
    ids = torch.randint(max(specials) + 1, len(tokenizer), (batch, length), generator=generator)
    ids[:, 0] = tokenizer.cls_token_id
    lengths = torch.randint(min(min_length, length), length + 1, (batch,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, tokenizer.pad_token_id))
    return TokenBatch(ids, mask)


def random_batch(batch: int, image_res: int, text_length: int, vc_length: int, tokenizer: ViCHATokenizer,
                 device: torch.device, seed: int) -> tuple[torch.Tensor, TokenBatch, TokenBatch]:
    """(images, captions, VCs) on ``device``; images are N(0, 1), i.e. already normalised."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, image_res, image_res, generator=generator)
    caption = random_tokens(batch, text_length, min(8, text_length), tokenizer, generator)
    vc = random_tokens(batch, vc_length, vc_length // 2, tokenizer, generator)
    return image.to(device), caption.to(device), vc.to(device)


def sdpa_backend(name: str):
    """The ``torch.nn.attention.SDPBackend`` called ``name`` (flash, cudnn, efficient, math)."""
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def attention_kernels(backend: str):
    """A context making ``backend`` the first choice of ``scaled_dot_product_attention`` (``auto``: PyTorch's
    order). Calls it cannot serve (flash: no additive mask, i.e. BERT's padded texts) fall back to
    memory-efficient attention, then the math path."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    fallbacks = [sdpa_backend("efficient"), sdpa_backend("math")]
    order = [sdpa_backend(backend)] + [kind for kind in fallbacks if kind != sdpa_backend(backend)]
    return sdpa_kernel(order, set_priority=True)


def build_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               batch: tuple[torch.Tensor, TokenBatch, TokenBatch], alpha: float, bf16: bool,
               cuda_graph: bool, warmup_steps: int,
               sdpa_backend: str = "auto") -> tuple[Callable[[], dict[str, torch.Tensor]], GraphedTrainStep]:
    """The trainer's step (engine/trainer.py ``build_train_step``: autocast forward, sum of the terms,
    zero_grad, backward, optimizer) on the fixed batch; returns a closure giving the detached terms.
    Every call (warm-up, capture, replays) runs under ``attention_kernels(sdpa_backend)``."""
    image, caption, vc = batch

    def compute_terms(module: nn.Module, inputs, alpha_value) -> dict:
        return module(inputs[0], (inputs[1], inputs[2]), alpha=alpha_value)

    graphed = GraphedTrainStep(model, optimizer, compute_terms, bf16=bf16, warmup_steps=warmup_steps,
                               enabled=cuda_graph)

    def step() -> dict[str, torch.Tensor]:
        with attention_kernels(sdpa_backend):
            return graphed((image, caption, vc), alpha)[1]

    return step, graphed


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_syncs(step: Callable[[], object], device: torch.device) -> dict:
    """Run ``step()`` once with CUDA's sync debug mode and list where it synchronised."""
    if device.type != "cuda":
        return {"host_syncs_per_step": None, "sync_sites": {}}
    synchronize(device)
    caught: list[tuple[str, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *rest, **kw: caught.append((str(message), _call_site()))
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sites: dict[str, int] = {}
    for message, site in caught:
        if "synchroniz" in message.lower():
            sites[site] = sites.get(site, 0) + 1
    return {"host_syncs_per_step": sum(sites.values()), "sync_sites": sites}


def _call_site() -> str:
    """The innermost frame of this repository's model code on the stack (not this script), plus the
    innermost frame overall when that lies elsewhere (e.g. inside torch)."""
    frames = [f for f in traceback.extract_stack()  # minus the warning machinery and this reporter
              if "warnings" not in os.path.basename(f.filename) and f.name not in ("_call_site", "<lambda>")]
    ours = [f for f in frames if f.filename.startswith(str(REPO)) and not f.filename.endswith("bench_pretrain.py")]
    inner = frames[-1]
    site = f"{os.path.relpath(ours[-1].filename, REPO)}:{ours[-1].lineno}" if ours else ""
    if not ours or inner is not ours[-1]:
        site += f" (in {inner.filename.split('site-packages/')[-1]}:{inner.lineno})"
    return site.strip()


# Kernel families by name (first match wins, lower case): where the device time of a step goes.
KERNEL_GROUPS = (
    ("attention", ("sdpa", "flash", "fmha", "attention", "attn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "gemv", "splitk")),
    ("optimizer_foreach", ("multi_tensor_apply",)),
    ("triton_fused", ("triton_",)),
    ("normalization", ("layer_norm", "layernorm")),
    ("reduction", ("reduce_kernel", "reduction")),
    ("copy_index_cat", ("copy", "catarray", "index", "gather", "scatter")),
    ("elementwise", ("elementwise",)),
)


def group_kernel_times(kernel_ms: dict[str, float]) -> dict[str, float]:
    """Sum kernel times (ms) by family (``KERNEL_GROUPS``; unmatched names: ``other``), largest first."""
    totals: dict[str, float] = {}
    for name, ms in kernel_ms.items():
        lowered = name.lower()
        group = next((group for group, needles in KERNEL_GROUPS if any(n in lowered for n in needles)), "other")
        totals[group] = totals.get(group, 0.0) + ms
    return {group: round(ms, 2) for group, ms in sorted(totals.items(), key=lambda item: item[1], reverse=True)}


def profile_steps(step: Callable[[], object], device: torch.device, steps: int, top: int = 16,
                  kernel_table: Optional[str] = None) -> dict:
    """Profile ``steps`` steps: device busy ms per step (the kernels' own durations), kernels launched
    per step, and the operators with the most device (CUDA) or CPU self time. A wall time per step far
    above the busy time means the GPU waits for the host (launch overhead, syncs). ``kernel_table``: a
    JSON file to write every kernel (CPU: operator) to, for the analysis the top lists are too short for."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    kernels = [event for event in prof.events() if event.device_type == DeviceType.CUDA]
    # Operators only (kernel rows would count the same time twice); ranked by the time of the kernels
    # they launched on the device, or by their own CPU time on a CPU run.
    operators = [event for event in prof.key_averages() if event.device_type == DeviceType.CPU]

    def device_self(event) -> float:
        return getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0))

    key = device_self if cuda else (lambda event: event.self_cpu_time_total)
    ranked = sorted(operators, key=key, reverse=True)[:top]
    # Kernels by name: under --cuda_graph the operators are not recorded (one graph launch), the kernels are.
    kernel_ms: dict[str, float] = {}
    kernel_calls: dict[str, int] = {}
    for k in kernels:
        kernel_ms[k.name] = kernel_ms.get(k.name, 0.0) + k.time_range.elapsed_us() / 1000 / steps
        kernel_calls[k.name] = kernel_calls.get(k.name, 0) + 1
    top_kernels = sorted(kernel_ms.items(), key=lambda item: item[1], reverse=True)[:top]
    if kernel_table:
        if cuda:
            table = [{"name": name, "ms_per_step": round(ms, 4), "calls_per_step": kernel_calls[name] / steps}
                     for name, ms in sorted(kernel_ms.items(), key=lambda item: item[1], reverse=True)]
        else:
            table = [{"name": e.key, "ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 4),
                      "calls_per_step": e.count / steps} for e in sorted(operators, key=key, reverse=True)]
        Path(kernel_table).parent.mkdir(parents=True, exist_ok=True)
        Path(kernel_table).write_text(json.dumps({"device": device.type, "steps": steps, "rows": table}, indent=0))
    return {
        "profiled_steps": steps,
        "device_busy_ms_per_step": round(sum(k.time_range.elapsed_us() for k in kernels) / 1000 / steps, 2)
        if cuda else None,
        "kernels_per_step": round(len(kernels) / steps) if cuda else None,
        "cpu_self_ms_per_step": round(sum(e.self_cpu_time_total for e in operators) / 1000 / steps, 2),
        "top_ops_ms_per_step": {e.key[:80]: round(key(e) / 1000 / steps, 2) for e in ranked},
        "top_kernels_ms_per_step": {name[:80]: round(ms, 2) for name, ms in top_kernels},
        "kernel_groups_ms_per_step": group_kernel_times(kernel_ms),
    }


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_process_max_rss"


def model_summary(config: dict, model: nn.Module) -> dict:
    bert = model.text_encoder.config
    return {
        "image_res": config["image_res"], "patch_size": config.get("patch_size", 16),
        "vision_width": config["vision_width"], "vision_depth": config.get("vision_depth", 12),
        "bert_hidden": bert.hidden_size, "bert_layers": bert.num_hidden_layers, "fusion_layer": bert.fusion_layer,
        "vocab_size": bert.vocab_size, "hierarchical": model.hierarchical, "mae": model.use_mae,
        "trainable_params_m": round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 2),
        "total_params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
    }


def run(args: argparse.Namespace) -> dict:
    """Build, warm up, time; returns the JSON record."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bf16 = set_precision(args.precision, device)
    config = dict(load_config(_repo_path(args.config)), init_bert=False, init_deit=False)
    config["bert_config"] = _repo_path(config["bert_config"])
    config["batch_size"] = args.batch_size or config["batch_size"]
    config["queue_size"] = args.queue_size or config["queue_size"]
    config["grad_checkpointing"] = args.grad_checkpointing
    config["cuda_graph"] = args.cuda_graph
    config["fused_attention"] = args.fused_attention
    config["share_image_keys_values"] = args.share_image_keys_values
    config["merge_text_passes"] = args.merge_text_passes
    config["bf16_residual"] = args.bf16_residual
    config["mlm_logits_on_masked"] = args.mlm_logits_on_masked
    config["pick_image_rows_by_product"] = args.pick_image_rows_by_product
    config["compile"] = args.compile
    config["compile_mode"] = args.compile_mode
    batch_size = config["batch_size"]
    if config["queue_size"] % batch_size:
        raise ValueError(f"queue_size {config['queue_size']} is not a multiple of the batch size {batch_size}; "
                         "pass --queue_size")
    record = {
        "bench": "pretrain_step", "config": args.config, "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "precision": args.precision,
        "batch_size": batch_size, "queue_size": config["queue_size"], "text_length": args.text_length,
        "vc_length": args.vc_length, "compile": args.compile, "compile_mode": args.compile_mode,
        "cuda_graph": args.cuda_graph, "grad_checkpointing": args.grad_checkpointing,
        "fused_attention": args.fused_attention,
        "share_image_keys_values": args.share_image_keys_values, "merge_text_passes": args.merge_text_passes,
        "bf16_residual": args.bf16_residual,
        "mlm_logits_on_masked": args.mlm_logits_on_masked,
        "pick_image_rows_by_product": args.pick_image_rows_by_product, "sdpa_backend": args.sdpa_backend,
        "steps": args.steps, "warmup": args.warmup,
    }

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as workdir:
        vocab_size = json.loads(Path(config["bert_config"]).read_text())["vocab_size"]
        tokenizer = build_special_tokenizer(vocab_size, workdir)
    build_start = time.perf_counter()
    with torch.device(device):  # initialise on the device: minutes faster for the paper model on CUDA
        model = MODEL_BUILDERS["pretrain"](config, text_encoder=None, tokenizer=tokenizer)
    model.to(device)
    configure_runtime(model, config, device)
    model.train()
    optimizer = create_optimizer(config["optimizer"], model)  # fused AdamW when the model is on CUDA
    record["optimizer_kernel"] = "fused" if optimizer.defaults.get("fused") else "foreach"
    record.update(model_summary(config, model))
    record["build_seconds"] = round(time.perf_counter() - build_start, 2)
    batch = random_batch(batch_size, config["image_res"], args.text_length, args.vc_length, tokenizer, device,
                         args.seed)

    step, graphed = build_step(model, optimizer, batch, args.alpha, bf16, args.cuda_graph, args.warmup,
                               args.sdpa_backend)

    warm_start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    synchronize(device)
    record["warmup_seconds"] = round(time.perf_counter() - warm_start, 2)
    if graphed.enabled:  # the next call captures (and replays once): timed apart from the steps
        capture_start = time.perf_counter()
        step()
        synchronize(device)
        record["capture_seconds"] = round(time.perf_counter() - capture_start, 2)
    record["graph_captured"] = graphed.captured
    if args.sync_debug:
        record.update(count_syncs(step, device))

    if device.type == "cuda":
        # A captured step allocates nothing while it replays (its tensors live in the graph's pool):
        # the peak of the whole run (warm-up and capture included) and the reserved memory say more.
        record["peak_memory_run_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        torch.cuda.reset_peak_memory_stats(device)
    history: list[torch.Tensor] = []
    names: list[str] = []
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for index in range(args.steps):
        terms = step()
        names = list(terms)
        history.append(torch.stack([value.float() for value in terms.values()]))  # read once at the end
        if (index + 1) % max(1, args.steps // 4) == 0:
            print(f"step {index + 1}/{args.steps}", file=sys.stderr, flush=True)
    synchronize(device)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    memory, memory_kind = peak_memory_gib(device)
    means = torch.stack(history).mean(dim=0).tolist() if history else []
    if args.profile:
        record["profile"] = profile_steps(step, device, args.profile, kernel_table=args.kernel_table)
    record.update({
        "seconds": round(seconds, 3),
        "process_cpu_seconds": round(cpu_seconds, 3),  # on a shared CPU: compare with seconds x threads
        "ms_per_step": round(1000 * seconds / max(1, args.steps), 2),
        "samples_per_s": round(batch_size * args.steps / seconds, 2) if seconds > 0 else None,
        "peak_memory_gib": round(memory, 3), "memory_kind": memory_kind,
        "peak_reserved_gib": (round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
                              if device.type == "cuda" else None),
        "losses": {name: round(value, 5) for name, value in zip(names, means)},
    })
    return record


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    try:
        record = run(args)
    except Exception as error:
        if args.compile == "none" and not args.cuda_graph:
            raise
        # A compile or capture failure is a result to report, not a crash of the benchmark suite.
        record = {"bench": "pretrain_step", "config": args.config, "device": args.device, "compile": args.compile,
                  "compile_mode": args.compile_mode, "cuda_graph": args.cuda_graph, "precision": args.precision,
                  "batch_size": args.batch_size, "merge_text_passes": args.merge_text_passes,
                  "bf16_residual": args.bf16_residual, "error": f"{type(error).__name__}: {str(error)[:800]}"}
        traceback.print_exc(file=sys.stderr)
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    sys.exit(1 if "error" in main() else 0)
