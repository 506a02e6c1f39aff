"""Print a task model's state_dict names and shapes as one JSON object, without allocating weights.

    python tools/state_dict_keys.py --task pretrain --config configs/Pretrain.yaml

The model is built on the meta device (no memory, no downloads), so this works for the full-size
configs on any machine. Tests compare the output with the official checkpoints' key lists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine.config import load_config  # noqa: E402
from models import MODEL_BUILDERS  # noqa: E402


def state_dict_shapes(task: str, config: dict) -> dict[str, list[int]]:
    """Names and shapes of the task model's state_dict, built on the meta device."""
    if task not in MODEL_BUILDERS:
        raise SystemExit(f"unknown task {task!r}; choose from {', '.join(sorted(MODEL_BUILDERS))}")
    config = dict(config, init_deit=False, init_bert=False)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isabs(config["bert_config"]) and not os.path.exists(config["bert_config"]):
        config["bert_config"] = os.path.join(repo, config["bert_config"])
    with torch.device("meta"):
        model = MODEL_BUILDERS[task](config, text_encoder=None, tokenizer=None)
    return {name: list(tensor.shape) for name, tensor in sorted(model.state_dict().items())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, help="one of: " + ", ".join(sorted(MODEL_BUILDERS)))
    parser.add_argument("--config", required=True, help="task YAML config")
    args = parser.parse_args(argv)
    print(json.dumps(state_dict_shapes(args.task, load_config(args.config)), indent=0))


if __name__ == "__main__":
    main()
