"""NLVR2 text-assignment (TA) pretraining (models.md §4.6).

A caption is shown with two images and the model says which one it describes: 0 = the first,
1 = the second, 2 = neither. The partner images are drawn from the batch by image-image
similarity, so the task needs fine distinctions. Trains the image-pair encoder of NLVR2.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import ViCHABase, build_visual_encoder
from models.model_nlvr import build_pair_text_encoder
from models.tokenization import TokenBatch

SIMILARITY_TEMPERATURE = 0.07  # fixed, not the (unused) learnable ``temp``
NUM_ASSIGNMENTS = 3


def assignment_weights(image_feat: torch.Tensor, temperature: float = SIMILARITY_TEMPERATURE) -> torch.Tensor:
    """softmax(f f^T / t) over each row, then the diagonal set to 0 (an image is never its own partner).

    ``image_feat``: L2-normalised features (B, E). Rows are not renormalised (multinomial does not need it).
    """
    weights = F.softmax(image_feat.float() @ image_feat.float().t() / temperature, dim=1)
    return weights.fill_diagonal_(0)


def sample_assignment_pairs(weights: torch.Tensor, single_partner: torch.Tensor, caption_first: torch.Tensor,
                            generator: Optional[torch.Generator] = None):
    """Image pairs and labels for the captions of a batch (models.md §4.6).

    Row b, with j ~ weights[b] and (j1, j2) two draws from weights[b] without replacement:
    ``single_partner[b]`` and ``caption_first[b]`` -> (b, j), label 0; ``single_partner[b]`` only ->
    (j, b), label 1; otherwise (j1, j2), label 2. The first of the two draws serves as j, which has
    the distribution of a single draw. Returns (first index, second index, label), each (B,).
    """
    if weights.shape[0] < 3:
        raise ValueError(f"text assignment needs a batch of at least 3 images, got {weights.shape[0]}")
    draws = torch.multinomial(weights, 2, replacement=False, generator=generator)  # (B, 2)
    own = torch.arange(weights.shape[0], device=weights.device)
    partner = draws[:, 0]
    first = torch.where(single_partner, torch.where(caption_first, own, partner), draws[:, 0])
    second = torch.where(single_partner, torch.where(caption_first, partner, own), draws[:, 1])
    labels = torch.where(single_partner, torch.where(caption_first, 0, 1), 2)
    return first, second, labels


class ViCHANLVRPretrain(ViCHABase):
    """``forward(image, (caption, vc))`` returns ``{'loss': CE(ta_head(h_cls), label)}``.

    ``temp`` and ``text_proj`` exist only for checkpoint compatibility; ``vision_proj`` is used
    without gradient (partner sampling). No momentum models, no queues.
    """

    def __init__(self, config: dict, text_encoder: Optional[str] = "bert-base-uncased", tokenizer=None) -> None:
        super().__init__(config, tokenizer)
        bert_config = self.build_bert_config(tokenizer)
        embed_dim, vision_width, text_width = config["embed_dim"], config["vision_width"], bert_config.hidden_size
        # Attribute order gives the official state_dict / named_parameters order.
        self.temp = nn.Parameter(torch.ones([]) * SIMILARITY_TEMPERATURE)
        self.visual_encoder = build_visual_encoder(config)
        self.text_encoder = build_pair_text_encoder(bert_config, text_encoder, config.get("init_bert", True))
        self.build_vc_path(bert_config, text_encoder)
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.ta_head = nn.Linear(text_width, NUM_ASSIGNMENTS)

    def forward(self, image: torch.Tensor, text: tuple[TokenBatch, TokenBatch]) -> dict:
        caption, vc = text
        batch = image.shape[0]
        # 1. image tokens with the image's own VCs
        image_embeds, image_mask = self.encode_image(image, vc)  # (B, 1+N+Lk, D)
        # 2. partners by image-image similarity; pairs and labels
        with torch.no_grad():
            image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
            weights = assignment_weights(image_feat)
            single_partner = torch.rand(batch, device=image.device) > 1 / 3
            caption_first = torch.rand(batch, device=image.device) > 0.5
            first, second, labels = sample_assignment_pairs(weights, single_partner, caption_first)
        masks = [None, None] if image_mask is None else [image_mask[first], image_mask[second]]
        # 3. caption against (first, second): fusion layers alternate between the two images
        out = self.text_encoder(caption.input_ids, caption.attention_mask,
                                encoder_hidden_states=[image_embeds[first], image_embeds[second]],
                                encoder_attention_mask=masks)
        logits = self.ta_head(out.last_hidden_state[:, 0])  # (B, 3)
        return {"loss": F.cross_entropy(logits.float(), labels)}
