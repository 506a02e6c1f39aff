"""Command-line flags shared by the seven scripts (pipeline.md §2.2), with booleans that parse.

The original used ``type=bool`` (``--resume False`` meant True); here booleans are
``--x/--no-x``. Extra flags: ``--override key=value`` (any config key, validated), ``--bf16``,
``--grad_checkpointing``, ``--cuda_graph``, ``--compile``.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch

from engine.config import apply_overrides, load_config

DEMO_DATA_DIR = "data/demo"


def build_parser(description: str, config: str, output_dir: str, data_json_dir: str,
                 evaluate: bool = True, resume: bool = True) -> argparse.ArgumentParser:
    """The original's flags with this script's defaults; task scripts add their own extras."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=config, help="YAML config")
    parser.add_argument("--output_dir", default=output_dir, help="log.txt, config.yaml and checkpoints go here")
    parser.add_argument("--checkpoint", default="", help="checkpoint to start from (or resume, with --resume)")
    if resume:
        parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                            help="continue --checkpoint's run: weights, optimizer, scheduler, next epoch")
    if evaluate:
        parser.add_argument("--evaluate", action="store_true", help="evaluate --checkpoint only, no training")
    parser.add_argument("--text_encoder", default="bert-base-uncased",
                        help="tokenizer vocabulary and BERT weights: hub name or local folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", default=42, type=int)
    parser.add_argument("--world_size", default=1, type=int, help="number of processes (SLURM launches only)")
    parser.add_argument("--dist_url", default="env://")
    parser.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=True,
                        help="overwritten by the launcher's environment")
    parser.add_argument("--data_json_dir", default=data_json_dir, help="folder of the annotation JSON files")
    parser.add_argument("--data_dir", default=DEMO_DATA_DIR, help="folder the image paths are relative to")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. optimizer.lr=2e-5 batch_size=16")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: the config's 'bf16', off)")
    parser.add_argument("--grad_checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="recompute activations in backward (default: the config's, off)")
    parser.add_argument("--cuda_graph", action=argparse.BooleanOptionalAction, default=None,
                        help="Pretrain on one GPU: replay the training step as a CUDA graph "
                             "(default: the config's, off)")
    parser.add_argument("--compile", choices=("none", "blocks", "model"), default=None,
                        help="torch.compile each ViT block and BERT layer, or the whole model "
                             "(default: the config's, none)")
    return parser


def parse_and_load(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, dict]:
    """Parse flags, load and validate the config, apply overrides and the switches given as flags."""
    args = parser.parse_args(argv)
    config = load_config(args.config)
    config = apply_overrides(config, list(args.override), source=f"--override ({args.config})")
    for switch in ("bf16", "grad_checkpointing", "cuda_graph", "compile"):
        if getattr(args, switch) is not None:
            config[switch] = getattr(args, switch)
    return args, config
