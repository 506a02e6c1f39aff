"""The one checkpoint adapter: every foreign layout goes through :func:`adapt_state_dict`.

Official checkpoints are ``{'model': state_dict, 'optimizer', 'lr_scheduler', 'config', 'epoch'}``.
Each task script of the original re-maps a pretraining state_dict in its own way (pipeline.md
§2.10, models.md §5); the rules are written once here, keyed by task, and
:func:`load_checkpoint` reports missing and unexpected keys by name and refuses shape mismatches.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from models.vit import interpolate_pos_embed, read_state_dict_file

logger = logging.getLogger(__name__)

TASKS = ("pretrain", "retrieval", "grounding", "ve", "vqa", "nlvr_pretrain", "nlvr")


@dataclass
class LoadReport:
    """What a load did: keys the model lacked from the file and keys the file had extra."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)

    def summary(self, limit: int = 12) -> str:
        def show(keys):
            head = ", ".join(keys[:limit])
            return head + (f" ... (+{len(keys) - limit})" if len(keys) > limit else "")

        return (f"missing {len(self.missing_keys)}: [{show(self.missing_keys)}]; "
                f"unexpected {len(self.unexpected_keys)}: [{show(self.unexpected_keys)}]")


def read_checkpoint(path: str) -> dict:
    """``torch.load`` a checkpoint file (or safetensors), with an error that names a missing file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            return {"model": read_state_dict_file(path)}
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - re-raised with the file name
        raise RuntimeError(f"could not read checkpoint {path}: {error}") from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, expected a dict")
    return checkpoint


def model_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint (``'model'`` entry, or the dict itself)."""
    state = checkpoint.get("model", checkpoint)
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _interpolate(state: dict, model: nn.Module, keys: tuple[str, ...]) -> None:
    for key in keys:
        encoder = getattr(model, key.split(".")[0], None)
        if key in state and encoder is not None:
            state[key] = interpolate_pos_embed(state[key], encoder.num_patches)


def _drop_bert_infix(state: dict) -> dict:
    """Every key containing 'bert': remove 'bert.' (``text_encoder.bert.X`` -> ``text_encoder.X``)."""
    return {(k.replace("bert.", "") if "bert" in k else k): v for k, v in state.items()}


_LAYER = re.compile(r"^(text_encoder(?:_m)?)\.(bert\.)?encoder\.layer\.(\d+)\.(.*)$")


def _model_fusion_layer(model: nn.Module, default: int) -> int:
    """The target model's first fusion layer (tiny configs use 3, not 6); ``default`` if unknown."""
    config = getattr(getattr(model, "text_encoder", None), "config", None)
    return getattr(config, "fusion_layer", default)


def _vqa_decoder_remap(state: dict, fusion_layer: int) -> dict:
    """Encoder keeps all layers without 'bert.'; the 6-layer decoder gets fusion layers 6-11 (as 0-5),
    the embeddings and the MLM head, keeping 'bert.' (pipeline.md §2.10 VQA row)."""
    out = {}
    for key, value in state.items():
        if "bert" in key:
            out[key.replace("bert.", "")] = value
        if "text_encoder" not in key:
            if "bert" not in key:
                out[key] = value
            continue
        match = _LAYER.match(key)
        if match:
            prefix, infix, index, rest = match.group(1), match.group(2) or "", int(match.group(3)), match.group(4)
            if index >= fusion_layer:
                decoder = prefix.replace("text_encoder", "text_decoder")
                out[f"{decoder}.{infix}encoder.layer.{index - fusion_layer}.{rest}"] = value
        elif "layer" not in key:
            out[key.replace("text_encoder", "text_decoder")] = value
    return out


def _nlvr_duplicate_fusion(state: dict, fusion_layer: int) -> dict:
    """Drop 'bert.'; fusion layer n >= 6 goes to layers 2(n-6)+6 and 2(n-6)+7 of the 18-layer encoder."""
    out = {}
    for key, value in state.items():
        if "bert" not in key:
            out[key] = value
            continue
        renamed = key.replace("bert.", "")
        match = _LAYER.match(renamed)
        if match and int(match.group(3)) >= fusion_layer:
            prefix, index, rest = match.group(1), int(match.group(3)), match.group(4)
            for copy_index in (2 * (index - fusion_layer) + fusion_layer, 2 * (index - fusion_layer) + fusion_layer + 1):
                out[f"{prefix}.encoder.layer.{copy_index}.{rest}"] = value
        else:
            out[renamed] = value
    return out


def adapt_state_dict(task: str, state: dict, model: nn.Module, *, training: bool = True,
                     distill: bool = True, fusion_layer: int = 6) -> dict:
    """Re-map a (usually pretraining) state_dict for ``task``'s model, as the original scripts do.

    ``training=False`` means ``--evaluate`` (or VQA ``--resume``): the checkpoint already has the
    task's layout, and only ``visual_encoder.pos_embed`` is resized.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    state = dict(state)
    both = ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed")
    online = ("visual_encoder.pos_embed",)
    if task == "pretrain":
        _interpolate(state, model, both)
        return state
    if task in ("retrieval", "grounding"):
        _interpolate(state, model, both)
        return _drop_bert_infix(state)
    if task == "ve":
        _interpolate(state, model, both if (training and distill) else online)
        return _drop_bert_infix(state) if training else state
    if task == "vqa":
        _interpolate(state, model, both if (training and distill) else online)
        return _vqa_decoder_remap(state, _model_fusion_layer(model, fusion_layer)) if training else state
    if task == "nlvr_pretrain":
        _interpolate(state, model, online)
        return _nlvr_duplicate_fusion(state, _model_fusion_layer(model, fusion_layer))
    _interpolate(state, model, online)  # nlvr: the TA checkpoint already has the 18-layer names
    return state


def load_state_dict_checked(model: nn.Module, state: dict, source: str = "checkpoint") -> LoadReport:
    """``load_state_dict(strict=False)`` that names shape mismatches and reports the key sets."""
    own = model.state_dict()
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in state.items() if key in own and tuple(own[key].shape) != tuple(value.shape)
    ]
    if mismatched:
        raise ValueError(f"{source}: shape mismatch for " + "; ".join(mismatched))
    result = model.load_state_dict(state, strict=False)
    report = LoadReport(sorted(result.missing_keys), sorted(result.unexpected_keys))
    logger.info("loaded %s: %s", source, report.summary())
    return report


def load_checkpoint(model: nn.Module, path: str, task: str, *, training: bool = True, distill: bool = True,
                    fusion_layer: int = 6) -> tuple[LoadReport, dict]:
    """Read ``path``, adapt it to ``task`` and load it into ``model``; returns (report, checkpoint)."""
    checkpoint = read_checkpoint(path)
    state = adapt_state_dict(task, model_state_dict(checkpoint), model, training=training, distill=distill,
                             fusion_layer=fusion_layer)
    return load_state_dict_checked(model, state, source=path), checkpoint
