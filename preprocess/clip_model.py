"""CLIP for the visual-concept pipeline, through open_clip.

The original used OpenAI CLIP ViT-B/16 (`clip.load("ViT-B/16")`, fp16 on GPU, its own
preprocessing: bicubic resize to 224, centre crop, CLIP normalisation). The open_clip equivalent
is `ViT-B-16-quickgelu` with the `openai` tag: the OpenAI weights were trained with QuickGELU,
and loading them into the plain-GELU `ViT-B-16` config runs without error but gives different
features, so the `openai` tag always forces QuickGELU here.

Ways to get a model (`load_clip`):
- built-in name + pretrained tag (downloads once, then the open_clip/HF cache is used);
- built-in name + a local weight file: a state dict (`.pt`/`.pth`/`.bin`/`.safetensors`), or
  OpenAI's own TorchScript `ViT-B-16.pt` (architecture read from the weights, QuickGELU on);
- `local-dir:/path` holding `open_clip_config.json` + weights (how tests pass a tiny model).
"""
from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch

DEFAULT_MODEL = 'ViT-B-16-quickgelu'
DEFAULT_PRETRAINED = 'openai'

# A CLIP small enough for CPU tests (about 3.5M parameters, mostly the 49408-token embedding,
# which the shipped BPE tokenizer requires). Widths of 64 give one attention head per layer,
# as open_clip's OpenAI-weight builder infers (`width // 64`).
TINY_CLIP_CFG: Dict[str, Any] = {
    'embed_dim': 32,
    'quick_gelu': True,
    'vision_cfg': {'image_size': 32, 'layers': 1, 'width': 64, 'patch_size': 8},
    'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 64, 'heads': 1, 'layers': 1},
}

_log = logging.getLogger(__name__)


class ClipWeightsUnavailable(LookupError):
    """Pretrained weights could not be fetched (offline, no cache); the message says what to pass."""


def _is_torchscript(path: str) -> bool:
    """True for TorchScript archives (OpenAI's released `.pt` files), which hold `constants.pkl`."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith('constants.pkl') for name in z.namelist())


def _load_openai_torchscript(path: str, precision: str) -> torch.nn.Module:
    """Rebuild an open_clip CLIP from an OpenAI TorchScript file (architecture from weight shapes)."""
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.model import (build_model_from_openai_state_dict, convert_weights_to_lp,
                                 get_cast_dtype, set_model_preprocess_cfg)

    state = torch.jit.load(path, map_location='cpu').state_dict()
    # Scalars stored by OpenAI's archive and the causal mask (a buffer, rebuilt by the model).
    for extra in ('input_resolution', 'context_length', 'vocab_size', 'attn_mask'):
        state.pop(extra, None)
    # As open_clip's own OpenAI loader: fp16 weights with fp32 LayerNorms, or all fp32.
    cast = get_cast_dtype(precision) or torch.float16
    model = build_model_from_openai_state_dict(state, quick_gelu=True, cast_dtype=cast)
    if precision != 'fp16':
        model.float()
        if precision == 'bf16':
            convert_weights_to_lp(model, dtype=torch.bfloat16)
    size = model.visual.image_size
    set_model_preprocess_cfg(model, {
        'size': size, 'mode': 'RGB', 'mean': OPENAI_DATASET_MEAN, 'std': OPENAI_DATASET_STD,
        'interpolation': 'bicubic', 'resize_mode': 'shortest', 'fill_color': 0})
    return model


class ClipEncoder:
    """An open_clip model with its eval preprocessing and tokenizer; returns numpy float32 features.

    Features are the un-normalised `encode_image` / `encode_text` outputs, as the original stored.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Callable, description: str,
                 device: torch.device):
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.description = description
        self.device = device
        stem = getattr(model.visual, 'conv1', None)  # native ViT: images must match its dtype
        self.input_dtype = (stem.weight if stem is not None else next(model.visual.parameters())).dtype
        cfg = open_clip.get_model_preprocess_cfg(model)
        self.preprocess = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
        size = cfg['size']
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)

    @property
    def dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) preprocessed images -> (B, D) features."""
        images = images.to(self.device, self.input_dtype, non_blocking=True)
        return self.model.encode_image(images).float().cpu().numpy()

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Strings (tokenised as-is, no prompt; truncated to the context length) -> (B, D)."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens).float().cpu().numpy()


def resolve_device(device: Optional[str] = None) -> torch.device:
    """`cuda` when available unless a device is named."""
    if device in (None, 'auto'):
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(device)


def load_clip(model_name: str = DEFAULT_MODEL, pretrained: Optional[str] = DEFAULT_PRETRAINED,
              device: Optional[str] = None, precision: Optional[str] = None,
              cache_dir: Optional[str] = None) -> ClipEncoder:
    """Build the CLIP encoder used by every embedding step.

    `precision` defaults to fp16 on CUDA (as the original) and fp32 on CPU.
    """
    import open_clip

    dev = resolve_device(device)
    precision = precision or ('fp16' if dev.type == 'cuda' else 'fp32')
    schema = model_name.split(':', 1)[0] if ':' in model_name else None
    if schema is not None:
        model = open_clip.create_model(model_name, precision=precision, device=dev,
                                       cache_dir=cache_dir)
        tokenizer = open_clip.get_tokenizer(model_name)
        description = model_name
    elif pretrained and os.path.isfile(pretrained) and _is_torchscript(pretrained):
        model = _load_openai_torchscript(pretrained, precision).to(dev)
        tokenizer = open_clip.SimpleTokenizer(context_length=model.context_length)
        description = f'openai-torchscript:{os.path.abspath(pretrained)}'
    else:
        is_file = bool(pretrained) and os.path.isfile(pretrained)
        if pretrained and not is_file and os.path.sep in pretrained:
            raise FileNotFoundError(f"CLIP weight file not found: {pretrained}")
        quick = pretrained == 'openai' and 'quickgelu' not in model_name
        if quick:
            _log.warning("OpenAI weights need QuickGELU: using it with %s", model_name)
        try:
            model = open_clip.create_model(model_name, pretrained=pretrained or None, device=dev,
                                           precision=precision,
                                           force_quick_gelu=quick, cache_dir=cache_dir)
        except RuntimeError as e:
            if pretrained and not is_file:
                raise ClipWeightsUnavailable(
                    f"could not load CLIP {model_name!r} with pretrained tag {pretrained!r} ({e}). "
                    "Run once with network access to cache the weights, or pass a local weight "
                    "file (e.g. OpenAI's ViT-B-16.pt) with --clip_pretrained PATH") from e
            raise
        tokenizer = open_clip.get_tokenizer(model_name)
        description = f'{model_name}:{os.path.abspath(pretrained) if is_file else pretrained}'
    return ClipEncoder(model, tokenizer, description, dev)


def build_tiny_clip(seed: int = 0, cfg: Optional[Dict[str, Any]] = None) -> torch.nn.Module:
    """A randomly initialised small CLIP (`TINY_CLIP_CFG`), for tests and demos."""
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    return CLIP(**(cfg or TINY_CLIP_CFG)).eval()


def save_local_clip(model: torch.nn.Module, directory: str,
                    cfg: Optional[Dict[str, Any]] = None) -> str:
    """Write `model` as an open_clip local directory; returns the `local-dir:` name to load it."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / 'open_clip_config.json', 'w', encoding='utf-8') as f:
        json.dump({'model_cfg': cfg or TINY_CLIP_CFG, 'preprocess_cfg': {}}, f)
    torch.save(model.state_dict(), path / 'open_clip_pytorch_model.bin')
    return f'local-dir:{path}'


def add_clip_args(parser: Any) -> None:
    """The CLIP flags shared by the embedding commands."""
    parser.add_argument('--clip_model', default=DEFAULT_MODEL,
                        help="open_clip model name, or 'local-dir:/path' (open_clip_config.json + "
                             f"weights); default {DEFAULT_MODEL} (the original's ViT-B/16)")
    parser.add_argument('--clip_pretrained', default=DEFAULT_PRETRAINED,
                        help="pretrained tag (downloaded once) or local weight file: a state dict "
                             "(.pt/.bin/.safetensors) or OpenAI's TorchScript ViT-B-16.pt")
    parser.add_argument('--device', default='auto', help="'cuda', 'cpu' or 'auto' (cuda if present)")
    parser.add_argument('--precision', default=None, choices=['fp16', 'bf16', 'fp32'],
                        help='model precision; default fp16 on CUDA (as the original), fp32 on CPU')
    parser.add_argument('--cache_dir', default=None, help='where downloaded weights are cached')


def clip_from_args(args: Any) -> ClipEncoder:
    return load_clip(args.clip_model, args.clip_pretrained, args.device, args.precision,
                     args.cache_dir)

