"""Run configs: YAML 1.2 loading, validation against the declared keys, command-line overrides, saving.

A config is a plain nested dict. Every top-level key that the original configs use or this code reads is
declared below with its type, its code default and a one-line description (``KNOWN_KEYS``); so are the keys
of the nested ``optimizer`` and ``schedular`` (sic, upstream spelling) blocks. An undeclared key or a value
of the wrong type is an error naming the key and the file, so a typo never silently falls back to a default.

YAML must be read with 1.2 rules: a 1.1 loader such as PyYAML reads ``1e-4`` as the *string* '1e-4', which
would reach the optimizer as a learning rate. ``load_config`` uses ruamel's 1.2 safe loader, and the
validator rejects numeric keys holding strings in case a config was loaded elsewhere.

Keys added by this codebase (model sizes for tiny configs, initialisation switches, opt-in fixes of
upstream bugs, speed/runtime switches) all default to the original behaviour.
"""

from __future__ import annotations

import copy
import difflib
import io
import os
from typing import Any, NamedTuple

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from utils import atomic_path

__all__ = [
    "KNOWN_KEYS",
    "OPTIMIZER_KEYS",
    "SCHEDULER_KEYS",
    "DEFAULTS",
    "DEIT_BASE_URL",
    "load_config",
    "validate_config",
    "apply_overrides",
    "save_config",
    "get_option",
    "describe_keys",
]

DEIT_BASE_URL = "https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth"


class _Required:
    """Marker for keys without a code default (each consumer requires them)."""

    def __repr__(self) -> str:
        return "required"


_REQUIRED: Any = _Required()


class _Key(NamedTuple):
    kind: str  # one of the names checked in _type_error
    default: Any
    doc: str


# Value kinds: int, float (int or float), bool, str, paths (str or list of str), floats (list of numbers),
# pair (two numbers), mapping (any dict), block (a nested block validated with its own key table).
# ``None`` is accepted for every key and means "use the code default".
_TOP: dict[str, _Key] = {
    # ---- data (paths are joined with --data_json_dir / --data_dir by the scripts) ----
    "train_file": _Key("paths", _REQUIRED, "training annotation JSON(s), relative to --data_json_dir"),
    "val_file": _Key("paths", _REQUIRED, "validation annotation JSON, relative to --data_json_dir"),
    "test_file": _Key("paths", _REQUIRED, "test annotation JSON(s), relative to --data_json_dir"),
    "image_root": _Key("str", _REQUIRED, "image directory, relative to --data_dir"),
    "vqa_root": _Key("str", _REQUIRED, "VQA: COCO image directory, relative to --data_dir"),
    "vg_root": _Key("str", _REQUIRED, "VQA: Visual Genome image directory, relative to --data_dir"),
    "answer_list": _Key("str", _REQUIRED, "VQA: candidate answer list JSON, relative to --data_json_dir"),
    "refcoco_data": _Key("str", _REQUIRED, "Grounding: REFER root (overwritten by --data_json_dir)"),
    "det_file": _Key("str", _REQUIRED, "Grounding: detector box proposals JSON, relative to --data_json_dir"),
    "coco_file": _Key("str", None, "Grounding: COCO file, joined with --data_json_dir but unused"),
    # ---- model ----
    "bert_config": _Key("str", _REQUIRED, "BERT JSON config of the text/fusion encoder"),
    "image_res": _Key("int", _REQUIRED, "input image side in pixels (ViT grid = image_res // patch_size)"),
    "vision_width": _Key("int", _REQUIRED, "ViT hidden width (kw_proj output, projection input)"),
    "embed_dim": _Key("int", _REQUIRED, "image-text contrastive (ITC) embedding size"),
    "temp": _Key("float", _REQUIRED, "initial learnable ITC temperature"),
    "queue_size": _Key("int", _REQUIRED, "length of the momentum feature queues for ITC"),
    "momentum": _Key("float", 0.995, "EMA coefficient of the momentum (teacher) models"),
    "mlm_probability": _Key("float", _REQUIRED, "pretraining: fraction of text tokens selected for MLM"),
    "distill": _Key("bool", _REQUIRED, "fine-tuning: build and use the momentum-distillation teacher"),
    "kw_img_dataset": _Key("bool", False, "datasets return visual-concept (VC) strings; VC tokenisation"),
    "kw_img_model": _Key("bool", False, "build the VC ('kw_img') model classes"),
    "sep_token": _Key("bool", True, "join VCs with ' [SEP] ' (True) or a space (False)"),
    "num_hidden_layers_kw": _Key("int", 2, "depth of the VC text encoder"),
    "randkw_p": _Key("float", None, "pretraining: keep int(p * #VCs) VCs per sample, drawn with replacement"),
    "num_kws": _Key("int", 15, "passed to the datasets, unused"),
    "return_hidden_state": _Key("bool", False, "pretraining: hierarchical ITC on intermediate layers"),
    "num_hidden_align": _Key("int", 5, "number of hierarchical ITC levels"),
    "ita_hidden_weight": _Key("float", 1, "weight of the summed hierarchical ITC losses"),
    "ita_hidden_weights": _Key("floats", None, "per-level hierarchical ITC weights (None = all 1)"),
    "mae": _Key("bool", False, "pretraining: masked image modelling (MAE) loss on"),
    "mask_ratio": _Key("float", 0.75, "fraction of patches masked for MAE"),
    "unimodal_mae": _Key("bool", False, "MAE through the ViT and a light pixel decoder"),
    "uni_cross_modal_mae": _Key("bool", False, "both MAE variants (dead path of the VC pretraining model)"),
    "model_mae": _Key("bool", False, "Pretrain: select the non-VC MAE model class"),
    "mae_lambda": _Key("float", 1, "MAE loss weight of the non-VC models (the VC model uses 1)"),
    "register_blk_id": _Key("int", -1, "ViT block that stores attention maps for Grad-CAM (-1 = none)"),
    "return_attention": _Key("bool", False, "non-VC models: return attention maps (unused)"),
    "clip_vit": _Key("bool", False, "Retrieval/VQA: skip position-embedding interpolation when loading"),
    "kw_model": _Key("bool", False, "NLVR: call model.initialize(state_dict) after loading"),
    # ---- training / evaluation ----
    "batch_size": _Key("int", _REQUIRED, "per-GPU batch size"),
    "batch_size_train": _Key("int", _REQUIRED, "per-GPU training batch size"),
    "batch_size_test": _Key("int", _REQUIRED, "per-GPU evaluation batch size"),
    "alpha": _Key("float", _REQUIRED, "distillation weight"),
    "warm_up": _Key("bool", _REQUIRED, "fine-tuning: ramp alpha linearly over epoch 0"),
    "optimizer": _Key("block", _REQUIRED, "optimizer block (see OPTIMIZER_KEYS)"),
    "schedular": _Key("block", _REQUIRED, "(sic) learning-rate schedule block (see SCHEDULER_KEYS)"),
    "k_test": _Key("int", _REQUIRED, "Retrieval: ITC top-k re-ranked by ITM; VQA: answers re-ranked"),
    "eos": _Key("str", _REQUIRED, "VQA: end-of-answer string appended to answers"),
    "dual_metrics": _Key("bool", False, "Retrieval: rank by ITC similarity only (no ITM re-ranking)"),
    "eval_ema": _Key("bool", False, "NLVR: unused"),
    "save_step": _Key("int", None, "Pretrain: also keep checkpoint_%02d.pth every save_step epochs"),
    "avoid_optim": _Key("bool", False, "Pretrain --resume: do not restore the optimizer state"),
    "save_every_steps": _Key("int", 0, "also write checkpoint_last.pth every N training steps within an epoch "
                             "(--resume then continues at the next step); 0 = at epoch ends only (the original)"),
    "multinodes": _Key("bool", False, "unused (mentioned only in commented-out upstream code)"),
    # ---- additions: model sizes (tiny demo configs) ----
    "patch_size": _Key("int", 16, "ViT patch side in pixels"),
    "vision_depth": _Key("int", 12, "number of ViT blocks"),
    "vision_heads": _Key("int", 12, "ViT attention heads"),
    "mae_decoder_depth": _Key("int", 2, "MAE decoder blocks"),
    "mae_decoder_heads": _Key("int", 16, "MAE decoder attention heads"),
    # ---- additions: initialisation ----
    "init_deit": _Key("bool", True, "pretraining: initialise the ViT from DeiT-B/16 weights"),
    "deit_checkpoint": _Key("str", DEIT_BASE_URL, "DeiT weights: URL, local path or hub name"),
    "init_bert": _Key("bool", True, "load BERT weights from --text_encoder (False = random init)"),
    # ---- additions: opt-in fixes of upstream bugs (False = faithful) ----
    "fix_hitc_rank_offset": _Key("bool", False, "hierarchical ITC positives at rank*B + r after gathering"),
    "fix_vqa_distill_alpha": _Key("bool", False, "VQA: pass alpha to the decoder so distillation acts"),
    "fix_vqa_rank_double_count": _Key("bool", False, "VQA: count the first answer token once in re-ranking"),
    "fix_nlvr_teacher": _Key("bool", False, "NLVR: teacher uses visual_encoder_m; copy params after loading"),
    "fix_autocontrast": _Key("bool", False,
                             "RandAugment AutoContrast stretches min..max (original: channels with min > 0 turn white)"),
    "mae_cls_pos_embed": _Key("bool", False, "MAE: add the [CLS] position embedding (as official MAE)"),
    "mask_vc_padding": _Key("bool", False, "mask padded VC tokens in ViT self- and fusion cross-attention"),
    # ---- additions: training options (default = original) ----
    "itm_negatives": _Key("str", "hard", "ITM negatives: 'hard' (drawn by ITC similarity, original) or 'random'"),
    "crop_min_scale": _Key("float", None, "training crops: smallest area fraction (None = 0.2 pretraining, 0.5 fine-tuning)"),
    "horizontal_flip": _Key("bool", True, "training: random horizontal flips (they make left/right texts false)"),
    # ---- additions: speed / runtime ----
    "bf16": _Key("bool", False, "autocast forward passes to bfloat16"),
    "grad_checkpointing": _Key("bool", False, "recompute activations in backward to save memory"),
    "fused_attention": _Key("bool", True, "scaled_dot_product_attention (False = explicit attention maps)"),
    "share_image_keys_values": _Key("bool", True, "project the images' fusion cross-attention keys/values once "
                                    "for all ITM/MLM passes (False = once per pass, as the original; same math)"),
    "pick_image_rows_by_product": _Key("bool", True, "pick the ITM hard negatives' rows of the shared image "
                                       "keys/values by a one-hot product when training (False = indexing; same "
                                       "values, a backward without atomic scatter-adds)"),
    "merge_text_passes": _Key("bool", False, "Pretrain: run the ITC and MLM captions through the text layers "
                              "as one 2B batch and the ITM and MLM texts through the fusion layers as one 4B "
                              "batch, online and momentum (same math per text; dropout and random draw order "
                              "differ; fewer, larger kernels)"),
    "mlm_logits_on_masked": _Key("bool", True, "Pretrain MLM: vocabulary logits and softmaxes for the masked "
                                 "positions only, the rows the loss reads (False = all B x L positions, as the "
                                 "original; same values)"),
    "num_workers": _Key("int", 4, "DataLoader worker processes"),
    "seed_per_sample": _Key("bool", False, "training: seed each sample's augmentation from (--seed, epoch, index), so "
                            "num_workers does not change a run and a mid-epoch resume repeats the draws (False = "
                            "each loader worker's own stream, the original)"),
    "print_freq": _Key("int", 50, "iterations between console log lines"),
    "eval_batch_size_text": _Key("int", 64, "Retrieval evaluation: texts per encoder batch"),
    "block_num": _Key("int", None, "Grounding Grad-CAM layer: itm = text layer (cross-attention), itc = ViT block "
                      "(--block_num wins; None = 8)"),
    "cuda_graph": _Key("bool", False, "Pretrain on one CUDA GPU: capture the training step in a CUDA graph "
                       "and replay it (no per-kernel launch cost; captions padded to 25 tokens)"),
    "mlm_mask_draws": _Key("str", None, "MLM masks drawn on 'cpu' (original stream) or 'device' "
                           "(None = 'device' with cuda_graph, else 'cpu')"),
    "max_grad_norm": _Key("float", None, "clip the gradient norm to this value (None = no clipping)"),
    "compile": _Key("str", "none", "torch.compile: 'none', 'blocks' (each ViT block and BERT layer, about a "
                    "minute) or 'model' (the whole forward; several minutes on first use)"),
    "bf16_residual": _Key("bool", False, "with bf16 autocast, keep the encoders' residual streams and the "
                          "layer-norm outputs feeding them in bf16 (statistics still fp32; Megatron-LM's default) "
                          "instead of autocast's fp32 (the original): less memory traffic, another rounding"),
    "compile_mode": _Key("str", "default", "torch.compile's mode for compile: 'default', "
                         "'max-autotune-no-cudagraphs' (times Triton product kernels with fused epilogues "
                         "against cuBLAS; long first compile; GPU only), 'reduce-overhead' or 'max-autotune' "
                         "(these two capture CUDA graphs themselves: not with cuda_graph)"),
}

_OPTIMIZER: dict[str, _Key] = {
    "opt": _Key("str", _REQUIRED, "optimizer: sgd, nesterov, momentum, adam or adamw (case-insensitive)"),
    "lr": _Key("float", _REQUIRED, "base learning rate of every parameter group"),
    "weight_decay": _Key("float", 0.0, "decay of >=2-D weights (1-D tensors and biases get none)"),
    "opt_eps": _Key("float", None, "Adam(W) epsilon (None = 1e-8)"),
    "opt_betas": _Key("pair", None, "Adam(W) betas (None = (0.9, 0.999))"),
    "opt_args": _Key("mapping", None, "extra keyword arguments for the optimizer"),
    "momentum": _Key("float", 0.9, "SGD momentum (sgd, nesterov, momentum)"),
    "fused": _Key("bool", None, "fused kernel: None = on CUDA (foreach elsewhere), True/False forces"),
}

_SCHEDULER: dict[str, _Key] = {
    "sched": _Key("str", _REQUIRED, "schedule type; only 'cosine'"),
    "lr": _Key("float", None, "unused: the base lr comes from optimizer.lr"),
    "epochs": _Key("int", _REQUIRED, "training epochs = cosine period"),
    "min_lr": _Key("float", 0.0, "floor of the cosine"),
    "decay_rate": _Key("float", 1.0, "lr decay per cosine cycle (one cycle only)"),
    "warmup_lr": _Key("float", 0.0, "lr at the start of the linear warm-up"),
    "warmup_epochs": _Key("int", 0, "warm-up length, in units of 100 iterations of epoch 0"),
    "cooldown_epochs": _Key("int", 0, "unused (added to the returned epoch count)"),
}

_BLOCKS: dict[str, dict[str, _Key]] = {"optimizer": _OPTIMIZER, "schedular": _SCHEDULER}

KNOWN_KEYS: dict[str, str] = {name: key.doc for name, key in _TOP.items()}
OPTIMIZER_KEYS: dict[str, str] = {name: key.doc for name, key in _OPTIMIZER.items()}
SCHEDULER_KEYS: dict[str, str] = {name: key.doc for name, key in _SCHEDULER.items()}
# Code defaults of the optional top-level keys; keys without one are required where they are read.
DEFAULTS: dict[str, Any] = {name: key.default for name, key in _TOP.items() if key.default is not _REQUIRED}

_KIND_TEXT = {
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean (true/false)",
    "str": "a string",
    "paths": "a string or a list of strings",
    "floats": "a list of numbers",
    "pair": "a list of two numbers",
    "mapping": "a mapping",
    "block": "a mapping",
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_ok(kind: str, value: Any) -> bool:
    if value is None:
        return True
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return _is_number(value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "paths":
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    if kind == "floats":
        return isinstance(value, list) and all(_is_number(v) for v in value)
    if kind == "pair":
        return isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)
    if kind in ("mapping", "block"):
        return isinstance(value, dict)
    raise AssertionError(f"unknown kind {kind!r}")


def _where(source: str) -> str:
    return f" in {source}" if source else ""


def _unknown_key_message(name: str, candidates: list[str], source: str, prefix: str = "") -> str:
    message = f"unknown config key '{prefix}{name}'{_where(source)}"
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if close:
        message += f"; did you mean '{prefix}{close[0]}'?"
    else:
        message += "; every key must be declared in engine/config.py (python -m engine.config lists them)"
    return message


def _type_message(path: str, kind: str, value: Any, source: str) -> str:
    message = f"config key '{path}'{_where(source)} must be {_KIND_TEXT[kind]}, got {value!r}"
    if isinstance(value, str) and kind in ("int", "float", "floats", "pair"):
        message += " (a string: was the YAML read by a 1.1 loader such as PyYAML? use load_config)"
    return message


# Keys the original reads but whose other values select code that no released (VC) model has: accepted at
# the original's value, refused otherwise, so a set switch never silently does nothing.
ORIGINAL_VALUE_ONLY: dict[str, str] = {
    "clip_vit": "it skips the position-embedding resize for CLIP image encoders, which no VC model uses",
    "kw_model": "it calls model.initialize(state_dict), which no released model defines",
    "model_mae": "it selects the non-VC MAE pretraining model, which this codebase does not include",
    "return_attention": "only the non-VC models read it",
}


def _check_entry(path: str, table: dict[str, _Key], name: str, value: Any, source: str) -> list[str]:
    """Errors for one key of a key table (recursing into nested blocks)."""
    key = table[name]
    if not _type_ok(key.kind, value):
        return [_type_message(path, key.kind, value, source)]
    if table is _TOP and name in ORIGINAL_VALUE_ONLY and value is not None and value != key.default:
        return [f"config key '{path}'{_where(source)} = {value!r} is not supported (only {key.default!r}): "
                f"{ORIGINAL_VALUE_ONLY[name]}"]
    if key.kind == "block" and value is not None:
        return _check_table(value, _BLOCKS[name], source, prefix=f"{path}.")
    return []


def _check_table(values: dict, table: dict[str, _Key], source: str, prefix: str = "") -> list[str]:
    errors = []
    for name, value in values.items():
        if not isinstance(name, str) or name not in table:
            errors.append(_unknown_key_message(str(name), list(table), source, prefix))
            continue
        errors.extend(_check_entry(prefix + name, table, name, value, source))
    return errors


def validate_config(config: dict, source: str = "") -> None:
    """Raise ValueError listing every undeclared key and every value of the wrong type.

    ``source`` (usually the YAML path) is named in the messages.
    """
    if not isinstance(config, dict):
        raise ValueError(f"config{_where(source)} must be a mapping, got {type(config).__name__}")
    errors = _check_table(config, _TOP, source)
    if errors:
        raise ValueError("invalid config:\n  " + "\n  ".join(errors))


def _yaml() -> YAML:
    yaml = YAML(typ="safe", pure=True)  # YAML 1.2 resolver: 1e-4 is a float
    yaml.default_flow_style = None  # leaf lists/dicts inline, as the original's yaml.dump
    return yaml


def load_config(path: str | os.PathLike, validate: bool = True) -> dict:
    """Read a YAML config with YAML 1.2 rules and (by default) validate it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            config = _yaml().load(f)
    except YAMLError as err:
        raise ValueError(f"invalid YAML in config file {path}: {err}") from err
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ValueError(f"config file {path} must hold a mapping at top level, got {type(config).__name__}")
    if validate:
        validate_config(config, source=path)
    return config


def _parse_scalar(text: str) -> Any:
    """Parse one override value with YAML 1.2 rules ('2e-5' -> float, 'true' -> bool, '[a, b]' -> list)."""
    if text.strip() == "":
        return None
    try:
        return _yaml().load(text)
    except YAMLError as err:
        raise ValueError(f"cannot parse override value {text!r}: {err}") from err


def apply_overrides(config: dict, overrides: list[str], source: str = "--override") -> dict:
    """Return a copy of ``config`` with ``key=value`` / ``block.key=value`` items applied.

    Values are YAML 1.2 scalars (or flow collections); keys must be declared, as in the YAML file.
    """
    config = copy.deepcopy(config)
    for item in overrides:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"override {item!r} must look like key=value or block.key=value")
        value = _parse_scalar(text)
        parts = name.split(".")
        where = f"{source} {item!r}"
        if parts[0] not in _TOP:
            raise ValueError(_unknown_key_message(parts[0], list(_TOP), where))
        if len(parts) == 1:
            errors = _check_entry(name, _TOP, name, value, where)
            if errors:
                raise ValueError(errors[0])
            config[name] = value
            continue
        block = parts[0]
        if len(parts) != 2 or block not in _BLOCKS:
            raise ValueError(f"override {item!r}: only the blocks {sorted(_BLOCKS)} have nested keys")
        table = _BLOCKS[block]
        if parts[1] not in table:
            raise ValueError(_unknown_key_message(parts[1], list(table), where, prefix=f"{block}."))
        errors = _check_entry(name, table, parts[1], value, where)
        if errors:
            raise ValueError(errors[0])
        if not isinstance(config.get(block), dict):
            config[block] = {}
        config[block][parts[1]] = value
    return config


def _plain(value: Any) -> Any:
    """Convert tuples and other sequences to lists so the safe dumper can write them."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def save_config(config: dict, path: str | os.PathLike) -> None:
    """Write ``config`` as YAML, atomically (``utils.atomic_path``)."""
    stream = io.StringIO()
    _yaml().dump(_plain(config), stream)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(stream.getvalue())


def get_option(config: dict, name: str) -> Any:
    """``config[name]`` if present and not None, else the declared code default (KeyError if required)."""
    if name not in _TOP:
        raise KeyError(_unknown_key_message(name, list(_TOP), "engine.config.get_option"))
    value = config.get(name)
    if value is not None:
        return value
    default = _TOP[name].default
    if default is _REQUIRED:
        raise KeyError(f"config key '{name}' is required here but missing")
    return default


def describe_keys(word: str = "") -> str:
    """Every declared key (top level, then ``optimizer.*`` and ``schedular.*``) with its type, code
    default and meaning, one per line; ``word`` keeps the lines that contain it (any case)."""
    tables = [("", _TOP)] + [(f"{block}.", table) for block, table in _BLOCKS.items()]
    lines = []
    for prefix, table in tables:
        for name, key in table.items():
            if key.kind == "block":
                continue
            default = "required" if key.default is _REQUIRED else repr(key.default)
            lines.append(f"{prefix}{name}  ({key.kind}, default {default}): {key.doc}")
    return "\n".join(line for line in lines if word.lower() in line.lower())


if __name__ == "__main__":
    import sys

    print(describe_keys(" ".join(sys.argv[1:])))
