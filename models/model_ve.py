"""SNLI-VE model (models.md §4.4), and the distilled classifier it shares with NLVR2 (§4.5).

Both tasks put a two-layer head on the fused [CLS] state and, when ``distill`` is on, train
against a mix of the labels and the momentum teacher's soft predictions.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from models import losses
from models.backbone import MomentumMixin, ViCHABase, build_text_encoder, build_visual_encoder
from models.tokenization import TokenBatch
from models.xbert import BertConfig

# VE, VQA and NLVR hard-code the EMA coefficient; a config may still set ``momentum``.
DEFAULT_MOMENTUM = 0.995


def build_cls_head(width: int, num_classes: int) -> nn.Sequential:
    """``cls_head``: Linear(width, width) -> ReLU -> Linear(width, num_classes) (keys ``.0``/``.2``)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))


class DistilledClassifier(ViCHABase, MomentumMixin):
    """ViT + VC path + BERT fusion encoder + ``cls_head``, with momentum twins when distilling.

    Subclasses give :meth:`fused_cls`, the fused [CLS] state of one batch, and may replace the text
    encoder builder (:meth:`build_fusion_encoder`).
    ``forward(image, text, targets, train=True, alpha)`` returns ``{'loss': ...}``;
    with ``train=False`` it returns the logits (B, num_classes).
    """

    num_classes: int

    def __init__(self, config: dict, text_encoder: Optional[str] = "bert-base-uncased", tokenizer=None) -> None:
        super().__init__(config, tokenizer)
        bert_config = self.build_bert_config(tokenizer)
        self.distill = bool(config["distill"])
        self.momentum = config.get("momentum") if config.get("momentum") is not None else DEFAULT_MOMENTUM
        # Attribute order gives the official state_dict / named_parameters order.
        self.visual_encoder = build_visual_encoder(config)
        self.text_encoder = self.build_fusion_encoder(bert_config, text_encoder)
        self.cls_head = build_cls_head(bert_config.hidden_size, self.num_classes)
        self.build_vc_path(bert_config, text_encoder)
        if self.distill:
            self.create_momentum_twins(["visual_encoder", "text_encoder", "cls_head", "kw_encoder", "kw_proj"])

    def build_fusion_encoder(self, bert_config: BertConfig, weights: Optional[str]) -> nn.Module:
        """``text_encoder``: a bare BertModel (keys without ``bert.``), BERT-initialised if ``init_bert``."""
        return build_text_encoder(bert_config, "model", weights, self.config.get("init_bert", True))

    def fused_cls(self, image: torch.Tensor, text: Sequence[TokenBatch], momentum: bool) -> torch.Tensor:
        """The fused [CLS] state (B, D) of the online (or momentum) model."""
        raise NotImplementedError

    def logits(self, image: torch.Tensor, text: Sequence[TokenBatch], momentum: bool = False) -> torch.Tensor:
        head = self.cls_head_m if momentum else self.cls_head
        return head(self.fused_cls(image, text, momentum))

    def forward(self, image: torch.Tensor, text: Sequence[TokenBatch], targets: Optional[torch.Tensor] = None,
                train: bool = True, alpha: float = 0.0):
        logits = self.logits(image, text)  # (B, C)
        if not train:
            return logits
        if targets is None:
            raise ValueError("training needs targets")
        teacher_logits = None
        if self.distill:
            with torch.no_grad():
                # EMA from the previous optimizer step, then the teacher's soft predictions
                self._momentum_update()
                teacher_logits = self.logits(image, text, momentum=True)
        return {"loss": losses.distilled_classification_loss(logits, targets, teacher_logits, alpha)}


class ViCHAVE(DistilledClassifier):
    """Visual entailment: hypothesis fused with the image (+ its VCs); 3 classes
    (entailment 2, neutral 1, contradiction 0)."""

    num_classes = 3

    def fused_cls(self, image: torch.Tensor, text: Sequence[TokenBatch], momentum: bool) -> torch.Tensor:
        sentence, vc = text
        image_embeds, image_mask = self.encode_image(image, vc, momentum=momentum)  # (B, 1+N+Lk, D)
        encoder = self.text_encoder_m if momentum else self.text_encoder
        out = encoder(sentence.input_ids, sentence.attention_mask, encoder_hidden_states=image_embeds,
                      encoder_attention_mask=image_mask)
        return out.last_hidden_state[:, 0]
