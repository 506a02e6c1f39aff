"""NLVR2 model (models.md §4.5) and the image-pair text encoder it shares with the TA pretraining.

The pair encoder is a BERT whose fusion layers are doubled: with L layers and fusion layer F it
has F text layers and 2(L - F) fusion layers, which cross-attend to image 0 and image 1 in turn.
Each pair (F, F+1), (F+2, F+3), ... shares its cross-attention key/value projections.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from models.backbone import build_text_encoder
from models.model_ve import DistilledClassifier
from models.tokenization import TokenBatch
from models.xbert import BertConfig, BertModel


def pair_encoder_config(bert_config: BertConfig) -> BertConfig:
    """Every fusion layer duplicated: 2(L - F) + F layers (18 for bert-base with F = 6)."""
    fusion, layers = bert_config.fusion_layer, bert_config.num_hidden_layers
    if not 0 <= fusion < layers:
        raise ValueError(f"fusion_layer {fusion} must be below num_hidden_layers {layers}")
    pair_config = copy.deepcopy(bert_config)
    pair_config.num_hidden_layers = 2 * (layers - fusion) + fusion
    return pair_config


def share_cross_attention(encoder: BertModel) -> list[tuple[int, int]]:
    """Tie the cross-attention key/value of layer F+2j to those of layer F+2j+1 (same Parameters).

    Queries, output dense/LayerNorm, self-attention and feed-forward stay separate. Both layers'
    keys remain in the state_dict. Returns the tied (even, odd) layer pairs.
    """
    fusion, layers = encoder.config.fusion_layer, encoder.config.num_hidden_layers
    pairs = [(i, i + 1) for i in range(fusion, layers - 1, 2)]
    for even, odd in pairs:
        target = encoder.encoder.layer[even].crossattention.self
        source = encoder.encoder.layer[odd].crossattention.self
        for name in ("key", "value"):
            getattr(target, name).weight = getattr(source, name).weight
            getattr(target, name).bias = getattr(source, name).bias
    return pairs


def build_pair_text_encoder(bert_config: BertConfig, weights: Optional[str], init_bert: bool = True) -> BertModel:
    """The image-pair ``text_encoder`` of NLVR2 and its TA pretraining.

    As the original, BERT weights fill layers 0..L-1 (the extra layers keep their random init) and
    the key/value tying is applied afterwards.
    """
    encoder = build_text_encoder(pair_encoder_config(bert_config), "model", weights, init_bert)
    share_cross_attention(encoder)
    return encoder


class ViCHANLVR(DistilledClassifier):
    """Is the sentence true of the image pair? 2 classes ('True' 1, 'False' 0).

    ``forward(image, (sentence, vc_left, vc_right), targets, train, alpha)`` with ``image`` the left
    images followed by the right ones along the batch, (2B, 3, H, W).
    Faithful teacher: image tokens from the ONLINE ``visual_encoder`` (VC tokens from the momentum
    VC path); ``fix_nlvr_teacher: True`` uses ``visual_encoder_m`` (models.md §8.1-10, §8.3).
    """

    num_classes = 2

    def __init__(self, config: dict, text_encoder: Optional[str] = "bert-base-uncased", tokenizer=None) -> None:
        super().__init__(config, text_encoder, tokenizer)
        self.fix_teacher = bool(config.get("fix_nlvr_teacher", False))

    def build_fusion_encoder(self, bert_config: BertConfig, weights: Optional[str]) -> nn.Module:
        return build_pair_text_encoder(bert_config, weights, self.config.get("init_bert", True))

    def fused_cls(self, image: torch.Tensor, text: Sequence[TokenBatch], momentum: bool) -> torch.Tensor:
        sentence, vc_left, vc_right = text
        batch = sentence.input_ids.shape[0]
        if image.shape[0] != 2 * batch:
            raise ValueError(f"expected {2 * batch} images (left then right) for {batch} sentences, "
                             f"got {image.shape[0]}")
        left, right = image.split(batch)
        vit = self.visual_encoder_m if (momentum and self.fix_teacher) else self.visual_encoder
        # The two VC strings are padded separately, so each image gets its own ViT pass.
        left_embeds, left_mask = self.encode_image(left, vc_left, momentum=momentum, visual_encoder=vit)
        right_embeds, right_mask = self.encode_image(right, vc_right, momentum=momentum, visual_encoder=vit)
        encoder = self.text_encoder_m if momentum else self.text_encoder
        out = encoder(sentence.input_ids, sentence.attention_mask,
                      encoder_hidden_states=[left_embeds, right_embeds],  # fusion layer i -> image (i - F) % 2
                      encoder_attention_mask=[left_mask, right_mask])
        return out.last_hidden_state[:, 0]
