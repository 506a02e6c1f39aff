"""Command-line flags shared by the seven scripts (pipeline.md §2.2), with booleans that parse.

The original used ``type=bool``, so its commands spell ``--resume True`` (and ``--resume False`` meant
True). Here a boolean flag takes ``--x``, ``--x true|false`` (also yes/no, 1/0) or ``--no-x``, so the
original's command lines keep working and ``False`` means false. Extra flags: ``--override key=value``
(any config key, validated), ``--bf16``, ``--grad_checkpointing``, ``--cuda_graph``, ``--compile``,
``--auto_resume``.
Defaults are shown by ``--help``.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch

from engine.config import apply_overrides, load_config

DEMO_DATA_DIR = "data/demo"
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


class BoolFlag(argparse.Action):
    """``--x`` / ``--x true|false`` (the original's spelling) / ``--no-x``."""

    def __init__(self, option_strings: list[str], dest: str, default: Optional[bool] = None,
                 help: Optional[str] = None, **unused) -> None:  # noqa: A002 - argparse's name
        negated = ["--no-" + name[2:] for name in option_strings if name.startswith("--")]
        super().__init__(option_strings + negated, dest, nargs="?", default=default, help=help, metavar="BOOL")

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        if option_string.startswith("--no-"):
            if value is not None:
                parser.error(f"{option_string} takes no value")
            setattr(namespace, self.dest, False)
        elif value is None or value.lower() in _TRUE:
            setattr(namespace, self.dest, True)
        elif value.lower() in _FALSE:
            setattr(namespace, self.dest, False)
        else:
            parser.error(f"{option_string} takes true or false, not {value!r}")


def build_parser(description: str, config: str, output_dir: str, data_json_dir: str,
                 evaluate: bool = True, resume: bool = True) -> argparse.ArgumentParser:
    """The original's flags with this script's defaults; task scripts add their own extras."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=config, help="YAML config")
    parser.add_argument("--output_dir", default=output_dir, help="log.txt, config.yaml and checkpoints go here")
    parser.add_argument("--checkpoint", default="", help="checkpoint to start from (or resume, with --resume)")
    if resume:
        parser.add_argument("--resume", action=BoolFlag, default=False,
                            help="continue --checkpoint's run: weights, optimizer, scheduler, next epoch (or next "
                                 "step of a mid-epoch checkpoint, config key save_every_steps)")
        parser.add_argument("--auto_resume", action=BoolFlag, default=False,
                            help="if --output_dir holds checkpoint_last.pth, resume from it (in place of "
                                 "--checkpoint); else start as without: one command for a first run and its "
                                 "requeues on a preemptible cluster")
    if evaluate:
        parser.add_argument("--evaluate", action="store_true", help="evaluate --checkpoint only, no training")
    parser.add_argument("--text_encoder", default="bert-base-uncased",
                        help="tokenizer vocabulary and BERT weights: hub name or local folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (the original's) or cpu; the default depends on this machine")
    parser.add_argument("--seed", default=42, type=int, help="random seed (each rank adds its rank)")
    parser.add_argument("--world_size", default=1, type=int, help="number of processes (SLURM launches only)")
    parser.add_argument("--dist_url", default="env://", help="process-group rendezvous")
    parser.add_argument("--distributed", action=BoolFlag, default=True,
                        help="overwritten by the launcher's environment")
    # torch.distributed.launch without --use_env passes --local-rank=N (--local_rank before PyTorch 2.0); the
    # rank is read from LOCAL_RANK, which every launcher sets, so the flag is accepted and not used.
    parser.add_argument("--local-rank", "--local_rank", dest="launcher_local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--data_json_dir", default=data_json_dir, help="folder of the annotation JSON files")
    parser.add_argument("--data_dir", default=DEMO_DATA_DIR, help="folder the image paths are relative to")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. optimizer.lr=2e-5 batch_size=16 (python -m engine.config lists "
                             "the keys)")
    parser.add_argument("--bf16", action=BoolFlag, default=None,
                        help="bf16 autocast (default: the config's 'bf16', off)")
    parser.add_argument("--grad_checkpointing", action=BoolFlag, default=None,
                        help="recompute activations in backward (default: the config's, off)")
    parser.add_argument("--cuda_graph", action=BoolFlag, default=None,
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
