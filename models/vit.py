"""ViT image encoder that takes visual-concept (VC) tokens (models.md §1.1, §2).

The VC tokens are appended after the position embedding, so they carry no position; they run
through every block and stay in the output: ``(B, 1 + N + Lk, D)`` = [CLS, patches, VCs].
Blocks are timm's (fused attention), so names match the official checkpoints
(``blocks.{i}.attn.qkv`` ...).
"""

from __future__ import annotations

import logging
import math
import os
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.precision import to_autocast_dtype

logger = logging.getLogger(__name__)

DEIT_BASE_URL = "https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth"


class PatchEmbedding(nn.Module):
    """Non-overlapping patches -> tokens (B, N, D), row-major over the grid: timm's PatchEmbed
    (a stride-p convolution; same ``proj.weight`` / ``proj.bias`` names and initialisation) computed
    as one matrix product over the unfolded patches. Same values; a size that is not a multiple of
    the patch (380 px) leaves the last rows and columns unread, as the convolution does. On an H100
    the convolution cost ~2 ms per pretraining step (docs/benchmarks.md)."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)  # holds the weights

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = image.shape
        if (height, width) != (self.img_size, self.img_size):
            raise ValueError(f"image of {height}x{width} px, but this ViT was built for {self.img_size}x{self.img_size} "
                             "(config key image_res)")
        p, grid = self.patch_size, self.grid_size
        if grid * p != height:  # e.g. 380 px: 23 patches; the convolution ignores the last 12 rows and columns
            image = image[:, :, :grid * p, :grid * p]
        patches = image.reshape(batch, channels, grid, p, grid, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(batch, self.num_patches, channels * p * p)  # (c, kh, kw) order, as the kernel
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)
        return F.linear(patches, weight, self.proj.bias)


class VisionTransformer(nn.Module):
    """ViT-B/16 by default; widths/depths are arguments so tests can build tiny ones."""

    def __init__(
        self,
        img_size: int = 256,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        return_hidden_state: bool = False,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.return_hidden_state = return_hidden_state
        self.patch_embed = PatchEmbedding(img_size, patch_size, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)
        self.gradient_checkpointing = False
        self.low_precision_residual = False  # config bf16_residual (models/precision.py)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_vit_weights)

    @property
    def grid_size(self) -> int:
        return int(math.sqrt(self.num_patches))

    def set_fused_attention(self, fused: bool) -> None:
        for block in self.blocks:
            block.attn.fused_attn = fused

    def no_weight_decay(self) -> set[str]:
        # Declared as the original, but (as there) the optimiser never asks the sub-module.
        return {"pos_embed", "cls_token"}

    def _run_block(self, block: nn.Module, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.gradient_checkpointing and self.training:
            return checkpoint(block, x, attn_mask, use_reentrant=False)
        return block(x, attn_mask=attn_mask)

    def forward(
        self,
        image: torch.Tensor,
        register_blk: int = -1,
        external_features: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        return_hidden_state: Optional[bool] = None,
    ):
        """Encode ``image`` (B, 3, H, W) with VC tokens ``external_features`` (B, Lk, D).

        Returns ``(B, 1+N+Lk, D)``, plus the tuple of every block's output passed through the
        final LayerNorm when hidden states are requested (entry i = block i).
        ``attn_mask`` (additive, broadcastable to (B, heads, T, T)) is only used by the optional
        VC-padding fix; the original has no mask in the ViT.
        """
        del register_blk  # Grad-CAM on ViT blocks belongs to the unused 'itc' grounding mode.
        want_hidden = self.return_hidden_state if return_hidden_state is None else return_hidden_state
        x = self.patch_embed(image)  # (B, N, D), row-major over the grid
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = to_autocast_dtype(x + self.pos_embed[:, : x.shape[1]], self.low_precision_residual)
        if external_features is not None:
            x = torch.cat([x, external_features.to(x.dtype)], dim=1)  # VC tokens: no position embedding
        hidden = []
        for block in self.blocks:
            x = self._run_block(block, x, attn_mask)
            if want_hidden:
                hidden.append(to_autocast_dtype(self.norm(x), self.low_precision_residual))
        x = to_autocast_dtype(self.norm(x), self.low_precision_residual)
        if want_hidden:
            return x, tuple(hidden)
        return x

    def forward_masked(self, image: torch.Tensor, keep: torch.Tensor, cls_pos_embed: bool = False) -> torch.Tensor:
        """MAE encoder pass on the kept patches only, without VC tokens (models.md §3.7).

        ``keep`` (B, n_keep) are patch indices. The [CLS] token gets no position embedding in the
        original; ``cls_pos_embed=True`` adds it (official-MAE behaviour).
        """
        x = self.patch_embed(image) + self.pos_embed[:, 1:]
        x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = self.cls_token + (self.pos_embed[:, :1] if cls_pos_embed else 0)
        x = to_autocast_dtype(torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1), self.low_precision_residual)
        for block in self.blocks:
            x = self._run_block(block, x, None)
        return to_autocast_dtype(self.norm(x), self.low_precision_residual)


def _init_vit_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def interpolate_pos_embed(pos_embed_checkpoint: torch.Tensor, num_patches: int, num_extra_tokens: int = 1) -> torch.Tensor:
    """Resize a checkpoint's position embedding to ``num_patches`` grid tokens (bicubic).

    The extra (CLS) tokens are kept; the grid is reshaped to (1, D, g, g), resized with
    ``interpolate(mode='bicubic', align_corners=False)`` and flattened back row-major.
    """
    old_tokens = pos_embed_checkpoint.shape[-2] - num_extra_tokens
    old_size, new_size = int(math.sqrt(old_tokens)), int(math.sqrt(num_patches))
    if old_size == new_size:
        return pos_embed_checkpoint
    dim = pos_embed_checkpoint.shape[-1]
    extra = pos_embed_checkpoint[:, :num_extra_tokens]
    grid = pos_embed_checkpoint[:, num_extra_tokens:].reshape(1, old_size, old_size, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new_size, new_size), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed_checkpoint.dtype)
    logger.info("position embedding interpolated from %dx%d to %dx%d", old_size, old_size, new_size, new_size)
    return torch.cat([extra, grid], dim=1)


def read_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint file (.pth/.bin with or without a 'model'/'state_dict' entry, or .safetensors)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            return state[key]
    return state


def load_deit_weights(vit: VisionTransformer, source: str = DEIT_BASE_URL) -> None:
    """Initialise ``vit`` from DeiT weights: a URL, a local file, or a timm model name.

    The position embedding is resized to the model's grid; ``head.*`` is ignored.
    """
    if source.startswith(("http://", "https://")):
        state = torch.hub.load_state_dict_from_url(source, map_location="cpu", check_hash=False)
        state = state.get("model", state)
    elif os.path.exists(source):
        state = read_state_dict_file(source)
    elif os.sep in source or source.endswith((".pth", ".pt", ".bin", ".safetensors")):
        raise FileNotFoundError(f"DeiT weights {source!r} not found (deit_checkpoint: a URL, a local file or a "
                                "timm model name; the demo makes its file with tools/make_tiny_init.py)")
    else:
        import timm

        state = timm.create_model(source, pretrained=True).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("head")}
    if "pos_embed" in state:
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], vit.num_patches)
    result = vit.load_state_dict(state, strict=False)
    logger.info("DeiT weights from %s: missing %s, unexpected %s", source, result.missing_keys, result.unexpected_keys)
