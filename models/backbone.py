"""Shared pieces of every ViCHA model: builders, the VC path, momentum twins and feature queues.

Task models subclass :class:`ViCHABase` and add only their heads and forward. Builders assign
the official attribute names (``visual_encoder``, ``text_encoder``, ``kw_encoder``, ``kw_proj``,
``*_m`` twins, queues), so state_dict keys equal the released checkpoints' without any prefix.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from models import losses
from models.tokenization import TokenBatch
from models.vit import VisionTransformer, load_deit_weights, DEIT_BASE_URL
from models.xbert import BertConfig, BertForMaskedLM, BertLMHeadModel, BertModel, ImageKeysValues, block_rows
from utils import concat_all_gather

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Builders


def load_bert_config(config: dict, **overrides) -> BertConfig:
    """The BERT JSON named by ``config['bert_config']`` with optional field overrides."""
    return BertConfig.from_json_file(config["bert_config"], **overrides)


def build_visual_encoder(config: dict, return_hidden_state: bool = False) -> VisionTransformer:
    """ViT at ``image_res``; depth/heads/patch default to ViT-B/16 (tiny configs override them)."""
    return VisionTransformer(
        img_size=config["image_res"],
        patch_size=config.get("patch_size", 16),
        embed_dim=config["vision_width"],
        depth=config.get("vision_depth", 12),
        num_heads=config.get("vision_heads", 12),
        return_hidden_state=return_hidden_state,
    )


def maybe_load_deit(visual_encoder: VisionTransformer, config: dict, default: bool) -> None:
    """Pretraining starts the ViT from DeiT-B/16 (``init_deit``), other tasks from a checkpoint."""
    if config.get("init_deit", default):
        load_deit_weights(visual_encoder, config.get("deit_checkpoint", DEIT_BASE_URL))


_BERT_CLASSES = {"mlm": BertForMaskedLM, "lm": BertLMHeadModel, "model": BertModel}


def build_text_encoder(
    bert_config: BertConfig, kind: str, weights: Optional[str], init_bert: bool = True
) -> nn.Module:
    """A BERT of ``kind`` ('mlm' = ``bert.*``+``cls.*``, 'lm' = decoder, 'model' = bare keys).

    With ``init_bert`` the weights come from ``weights`` (hub name or local folder/file), as the
    original's ``from_pretrained``; new cross-attention layers keep their random init.
    """
    model = _BERT_CLASSES[kind](bert_config)
    if init_bert and weights:
        load_pretrained_bert(model, weights)
    return model


def _find_bert_weight_file(name_or_path: str) -> str:
    if os.path.isfile(name_or_path):
        return name_or_path
    candidates = ("model.safetensors", "pytorch_model.bin")
    if os.path.isdir(name_or_path):
        for name in candidates:
            path = os.path.join(name_or_path, name)
            if os.path.isfile(path):
                return path
        raise FileNotFoundError(
            f"no BERT weights in {name_or_path!r} (looked for {', '.join(candidates)}); "
            "set init_bert: false in the config to start from random weights"
        )
    from huggingface_hub import hf_hub_download

    errors = []
    for name in candidates:
        try:
            return hf_hub_download(name_or_path, name)
        except Exception as error:  # noqa: BLE001 - report every attempt below
            errors.append(f"{name}: {error}")
    raise FileNotFoundError(f"could not fetch BERT weights {name_or_path!r}: " + "; ".join(errors))


def read_bert_state_dict(name_or_path: str) -> dict[str, torch.Tensor]:
    """A transformers BERT checkpoint as ``bert.*``/``cls.*`` keys (old gamma/beta names fixed)."""
    from models.vit import read_state_dict_file

    raw = read_state_dict_file(_find_bert_weight_file(name_or_path))
    state = {}
    for key, value in raw.items():
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if not key.startswith(("bert.", "cls.")):
            key = "bert." + key
        state[key] = value
    return state


def load_pretrained_bert(model: nn.Module, name_or_path: str) -> None:
    """Copy matching BERT weights into ``model`` (any of the three kinds); layers the checkpoint
    lacks (cross-attention, extra layers) keep their init. A width/vocab mismatch is an error."""
    state = read_bert_state_dict(name_or_path)
    if isinstance(model, BertModel):
        state = {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}
    own = model.state_dict()
    loadable = {}
    for key, value in state.items():
        if key not in own:
            continue
        if own[key].shape != value.shape:
            raise ValueError(
                f"BERT weights {name_or_path!r}: {key} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(own[key].shape)} (check bert_config and the vocabulary)"
            )
        loadable[key] = value
    result = model.load_state_dict(loadable, strict=False)
    logger.info("BERT weights from %s: %d tensors loaded, %d newly initialised", name_or_path,
                len(loadable), len(result.missing_keys))


# ----------------------------------------------------------------------------------------------
# Mixins


class MomentumMixin:
    """EMA ("momentum") twins of named sub-modules: ``p_m <- m * p_m + (1 - m) * p``."""

    model_pairs: list[tuple[str, str]]
    momentum: float

    def create_momentum_twins(self, names: Iterable[str]) -> None:
        """Add ``<name>_m`` copies of each module; they are frozen and follow by EMA."""
        self.model_pairs = []
        for name in names:
            twin = copy.deepcopy(getattr(self, name))
            setattr(self, name + "_m", twin)
            self.model_pairs.append((name, name + "_m"))
        self.copy_params()

    def _pair_parameters(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Online and twin parameters in matching order (cached: built once per model)."""
        cached = self.__dict__.get("_pair_parameter_cache")
        if cached is None:
            online, twins = [], []
            for name, name_m in self.model_pairs:
                online.extend(getattr(self, name).parameters())
                twins.extend(getattr(self, name_m).parameters())
            cached = (online, twins)
            self.__dict__["_pair_parameter_cache"] = cached
        return cached

    @torch.no_grad()
    def copy_params(self) -> None:
        self.__dict__.pop("_pair_parameter_cache", None)  # sub-modules may have been re-tied since
        online, twins = self._pair_parameters()
        for param, param_m in zip(online, twins):
            param_m.data.copy_(param.data)
            param_m.requires_grad = False

    @torch.no_grad()
    def _momentum_update(self) -> None:
        """One fused pass: p_m <- p_m + (1 - m) * (p - p_m) = m * p_m + (1 - m) * p."""
        online, twins = self._pair_parameters()
        torch._foreach_lerp_(twins, online, 1.0 - self.momentum)


class QueueMixin:
    """Feature queues of the ITC loss, written in place without host synchronisation."""

    def create_queues(self, embed_dim: int, queue_size: int, with_idx: bool = False) -> None:
        self.queue_size = queue_size
        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        if with_idx:
            self.register_buffer("idx_queue", torch.full((1, queue_size), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor,
                             idx: Optional[torch.Tensor] = None) -> None:
        """Write all ranks' features (rank order) at columns [ptr, ptr + B*W), ptr += B*W mod Q."""
        image_feats = concat_all_gather(image_feat)
        text_feats = concat_all_gather(text_feat)
        batch = image_feats.shape[0]
        if self.queue_size % batch:
            raise ValueError(f"queue_size {self.queue_size} is not a multiple of the global batch {batch}")
        columns = (self.queue_ptr + torch.arange(batch, device=self.queue_ptr.device)) % self.queue_size
        self.image_queue[:, columns] = image_feats.t().to(self.image_queue.dtype)
        self.text_queue[:, columns] = text_feats.t().to(self.text_queue.dtype)
        if idx is not None:
            self.idx_queue[:, columns] = concat_all_gather(idx.view(-1, 1)).t()
        self.queue_ptr.copy_((self.queue_ptr + batch) % self.queue_size)


ITM_NEGATIVES = ("hard", "random")


class AlignmentMixin:
    """ITC with momentum key banks + distillation, and ITM with in-batch hard negatives.

    Shared by pretraining (diagonal positives) and retrieval/grounding (image-id positives).
    Needs ``temp``, ``itm_head``, the queues, and a text encoder whose BERT part runs 'fusion'.
    """

    # Project each image's cross-attention keys/values once for all fusion passes that read it
    # (xbert.ImageKeysValues); off = one projection per pass, as the original (same math).
    share_image_keys_values: bool = True
    # Pick the ITM hard negatives' rows of those keys/values by a one-hot product when a gradient flows
    # back (xbert.pick_rows); off = indexing (same values; the backward sums in another order).
    pick_image_rows_by_product: bool = True

    def build_alignment_towers(self, config: dict, bert_config: BertConfig, text_kind: str, weights: Optional[str],
                               init_deit: bool, return_hidden_state: bool = False) -> None:
        """Encoders, VC path, ITC projections, ``temp``, ``itm_head`` and their momentum twins, in the
        original's order (pretraining: ``text_kind='mlm'``; retrieval/grounding: ``'model'``)."""
        embed_dim, vision_width = config["embed_dim"], config["vision_width"]
        self.itm_negatives = config.get("itm_negatives", "hard")
        self.pick_image_rows_by_product = bool(config.get("pick_image_rows_by_product", True))
        if self.itm_negatives not in ITM_NEGATIVES:
            raise ValueError(f"config key itm_negatives is {self.itm_negatives!r}; expected one of {ITM_NEGATIVES}")
        self.visual_encoder = build_visual_encoder(config, return_hidden_state=return_hidden_state)
        maybe_load_deit(self.visual_encoder, config, default=init_deit)
        self.text_encoder = build_text_encoder(bert_config, text_kind, weights, config.get("init_bert", True))
        self.build_vc_path(bert_config, weights)
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(bert_config.hidden_size, embed_dim)
        self.temp = nn.Parameter(torch.ones([]) * config["temp"])
        self.itm_head = nn.Linear(bert_config.hidden_size, 2)
        self.create_momentum_twins(["visual_encoder", "vision_proj", "text_encoder", "text_proj", "kw_encoder", "kw_proj"])

    @property
    def text_bert(self) -> nn.Module:
        """The BertModel of ``text_encoder`` (``text_encoder.bert`` for the MLM variant)."""
        return getattr(self.text_encoder, "bert", self.text_encoder)

    def positive_targets(self, batch: int, bank_size: int, device: torch.device,
                         idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, B+Q) hard targets: the diagonal, or every bank entry with the same image id
        (rows normalised to sum 1; models.md §4.1)."""
        if idx is None:
            targets = torch.zeros(batch, bank_size, device=device)
            targets.fill_diagonal_(1)
            return targets
        bank_idx = torch.cat([idx.view(1, -1), self.idx_queue], dim=1)  # (1, B+Q); cat copies the queue
        same = (idx.view(-1, 1) == bank_idx).float()
        return same / same.sum(dim=1, keepdim=True)

    def momentum_contrastive_loss(self, image_feat, text_feat, image_feat_m, text_feat_m, alpha: float,
                                  idx: Optional[torch.Tensor] = None, distill: bool = True):
        """ITC against [local momentum features | queue] (models.md §3.3 steps 3-4, §4.1).

        Returns (loss, sim_i2t, sim_t2i); the similarities feed the hard-negative sampling.
        """
        # The (E, B+Q) banks and the similarities stay in fp32 also under autocast: the logits reach
        # 1/temp and the queue would otherwise be re-cast to bf16 in every product.
        with torch.autocast(device_type=image_feat.device.type, enabled=False):
            image_feat, text_feat = image_feat.float(), text_feat.float()
            with torch.no_grad():
                image_feat_m, text_feat_m = image_feat_m.float(), text_feat_m.float()
                image_bank = torch.cat([image_feat_m.t(), self.image_queue], dim=1)  # (E, B+Q); cat copies
                text_bank = torch.cat([text_feat_m.t(), self.text_queue], dim=1)
                hard = self.positive_targets(image_feat.shape[0], image_bank.shape[1], image_feat.device, idx)
                if distill:
                    targets_i2t = losses.distilled_targets(image_feat_m @ text_bank / self.temp, hard, alpha)
                    targets_t2i = losses.distilled_targets(text_feat_m @ image_bank / self.temp, hard, alpha)
                else:
                    targets_i2t = targets_t2i = hard
            sim_i2t = image_feat @ text_bank / self.temp
            sim_t2i = text_feat @ image_bank / self.temp
        loss = losses.contrastive_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i)
        return loss, sim_i2t, sim_t2i

    def fusion(self, text_embeds, text_mask, image_embeds, image_mask) -> torch.Tensor:
        """Fusion layers on top of text-mode states; returns the fused [CLS] (B, Dt)."""
        out = self.text_bert(encoder_embeds=text_embeds, attention_mask=text_mask, encoder_hidden_states=image_embeds,
                             encoder_attention_mask=image_mask, mode="fusion")
        return out.last_hidden_state[:, 0]

    def itm_pairs(self, text_embeds, text_mask, sim_i2t, sim_t2i,
                  idx: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """ITM's 3B (text, image) pairs: [positives; text + hard-negative image; image + hard-negative
        text] (§3.5) as (texts, their masks, the image rows by block of B texts: ``(None, negative
        images, None)``, ``None`` = image i for text i; ``xbert.block_rows`` flattens them).

        Negatives are drawn from softmax(sim[:, :B]) with the positive excluded: the diagonal, or
        (retrieval, ``idx`` given) every pair showing the same image. With ``itm_negatives: random``
        (not the original) they are drawn uniformly from the same allowed items instead.
        """
        batch = text_embeds.shape[0]
        with torch.no_grad():
            if idx is None:
                excluded = torch.eye(batch, dtype=torch.bool, device=text_embeds.device)
            else:
                excluded = idx.view(-1, 1) == idx.view(1, -1)
            if self.itm_negatives == "random":
                weights_i2t = weights_t2i = (~excluded).float()
            else:
                weights_i2t = F.softmax(sim_i2t[:, :batch].float(), dim=1).masked_fill(excluded, 0)
                weights_t2i = F.softmax(sim_t2i[:, :batch].float(), dim=1).masked_fill(excluded, 0)
        negative_images = losses.sample_negatives(weights_t2i)  # one image per text
        negative_texts = losses.sample_negatives(weights_i2t)  # one text per image
        texts = torch.cat([text_embeds, text_embeds, text_embeds[negative_texts]], dim=0)
        masks = torch.cat([text_mask, text_mask, text_mask[negative_texts]], dim=0)
        return texts, masks, (None, negative_images, None)

    def images_for_rows(self, image_embeds, image_mask, row_blocks: tuple,
                        image_keys_values: Optional[ImageKeysValues] = None, stack: bool = False):
        """(image states, image masks) for texts fused with the image rows ``row_blocks`` (blocks of B
        texts, as ``itm_pairs`` gives them): the images' cross-attention keys/values projected once
        (``image_keys_values``, computed here when not given; with ``stack`` the blocks that attend to
        the images in order share their attention calls, ``xbert.StackedKeysValues``), or, with
        ``share_image_keys_values`` off, the image tokens of each row (projected again by every pass)."""
        rows = block_rows(row_blocks, image_embeds.shape[0], image_embeds.device)
        if self.share_image_keys_values:
            if image_keys_values is None:
                image_keys_values = self.text_bert.image_keys_values(image_embeds, self.pick_image_rows_by_product)
            images = image_keys_values.select_blocks(row_blocks) if stack else image_keys_values.select(rows)
        else:
            images = image_embeds[rows]
        return images, (None if image_mask is None else image_mask[rows])

    def itm_loss_from_fused(self, fused_cls: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the ITM head on the fused [CLS] of ``itm_pairs``' 3B pairs (positives first)."""
        logits = self.itm_head(fused_cls)  # (3B, 2)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        labels[:logits.shape[0] // 3] = 1
        return F.cross_entropy(logits.float(), labels)

    def itm_loss(self, image_embeds, image_mask, text_embeds, text_mask, sim_i2t, sim_t2i,
                 idx: Optional[torch.Tensor] = None,
                 image_keys_values: Optional[ImageKeysValues] = None) -> torch.Tensor:
        """ITM with hard negatives (``itm_pairs``) through one 3B fusion pass."""
        texts, masks, rows = self.itm_pairs(text_embeds, text_mask, sim_i2t, sim_t2i, idx)
        images, image_masks = self.images_for_rows(image_embeds, image_mask, rows, image_keys_values)
        return self.itm_loss_from_fused(self.fusion(texts, masks, images, image_masks))


# ----------------------------------------------------------------------------------------------
# Base model


class ViCHABase(nn.Module):
    """The VC path and image encoding shared by every task model (models.md §2)."""

    def __init__(self, config: dict, tokenizer=None) -> None:
        super().__init__()
        self.config = config
        self.mask_vc_padding = bool(config.get("mask_vc_padding", False))
        if tokenizer is not None:
            self.pad_token_id = tokenizer.pad_token_id
            self.cls_token_id = tokenizer.cls_token_id
            self.mask_token_id = tokenizer.mask_token_id

    def build_bert_config(self, tokenizer=None, **overrides) -> BertConfig:
        bert_config = load_bert_config(self.config, encoder_width=self.config["vision_width"], **overrides)
        if tokenizer is not None and len(tokenizer) != bert_config.vocab_size:
            source = getattr(tokenizer, "source", "")
            raise ValueError(
                f"the tokenizer{f' {source!r} (--text_encoder)' if source else ''} has {len(tokenizer)} tokens "
                f"but {self.config['bert_config']} says vocab_size {bert_config.vocab_size}: pass --text_encoder "
                "the vocabulary (folder with vocab.txt) that BERT config was made for"
            )
        return bert_config

    def build_vc_path(self, bert_config: BertConfig, weights: Optional[str]) -> None:
        """``kw_encoder``: a 2-layer BERT (layers 0-1 of bert-base) + ``kw_proj`` to the ViT width."""
        layers = self.config.get("num_hidden_layers_kw", 2)
        if layers < 1:
            raise ValueError("num_hidden_layers_kw must be >= 1 (the 0-layer variant is unused upstream)")
        kw_config = copy.deepcopy(bert_config)
        kw_config.num_hidden_layers = layers
        kw_config.fusion_layer = layers
        self.kw_encoder = build_text_encoder(kw_config, "model", weights, self.config.get("init_bert", True))
        self.kw_proj = nn.Linear(bert_config.hidden_size, self.config["vision_width"])

    def set_fused_attention(self, fused: bool) -> None:
        """Fused SDPA (default) or explicit attention in every attention module (ViT, MAE decoder, BERT)."""
        for module in self.modules():
            if hasattr(module, "fused_attn"):  # timm attention (ViT and MAE decoder blocks)
                module.fused_attn = fused
            elif hasattr(module, "save_attention"):  # our BERT attention
                module.fused = fused

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = enabled

    def vc_tokens(self, vc: TokenBatch, momentum: bool = False) -> torch.Tensor:
        """Projected VC tokens (B, Lk, D) at every position, padding included (as the original)."""
        encoder = self.kw_encoder_m if momentum else self.kw_encoder
        proj = self.kw_proj_m if momentum else self.kw_proj
        out = encoder(vc.input_ids, attention_mask=vc.attention_mask, mode="text")
        return proj(out.last_hidden_state)

    def image_token_mask(self, vc: TokenBatch, num_image_tokens: int) -> Optional[torch.Tensor]:
        """Mask over [CLS, patches, VCs]: None (= all ones, the original) unless ``mask_vc_padding``."""
        if not self.mask_vc_padding:
            return None
        batch = vc.attention_mask.shape[0]
        ones = vc.attention_mask.new_ones(batch, num_image_tokens - vc.attention_mask.shape[1])
        return torch.cat([ones, vc.attention_mask], dim=1)

    def encode_image(self, image: torch.Tensor, vc: TokenBatch, momentum: bool = False,
                     visual_encoder: Optional[nn.Module] = None, return_hidden_state: bool = False):
        """Image tokens (B, 1+N+Lk, D) with the image's VC tokens appended, and their mask."""
        vit = visual_encoder if visual_encoder is not None else (
            self.visual_encoder_m if momentum else self.visual_encoder)
        tokens = self.vc_tokens(vc, momentum)
        mask = self.image_token_mask(vc, 1 + vit.num_patches + tokens.shape[1])
        attn_mask = None
        if mask is not None:
            attn_mask = ((1.0 - mask[:, None, None, :].float()) * -10000.0).to(tokens.dtype)
        out = vit(image, external_features=tokens, attn_mask=attn_mask, return_hidden_state=return_hidden_state)
        return out, mask
