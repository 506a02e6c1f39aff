"""ViCHA image-text retrieval model (models.md §4.1); RefCOCO+ grounding trains the same model (§4.2).

Training is ITC against momentum feature banks with image-id-aware positives (several captions of
one image are all positives) plus ITM with hard negatives that never pick a caption of the same
image. Evaluation (``engine/retrieval_eval.py``) and Grad-CAM (``engine/tasks/grounding.py``) use
the sub-modules directly, as the original scripts did.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from models.backbone import AlignmentMixin, MomentumMixin, QueueMixin, ViCHABase
from models.tokenization import TokenBatch


class ViCHARetrieval(ViCHABase, AlignmentMixin, MomentumMixin, QueueMixin):
    """``forward(image, (caption, vc), alpha, idx)`` returns ``{'loss_ita', 'loss_itm'}``.

    Keys equal the official ``model_retrieval_kw_img`` checkpoints (911 entries at 380 px): a bare
    ``BertModel`` text encoder (no ``bert.`` infix, no MLM head), the VC path, projections,
    ``itm_head``, ``temp``, momentum twins and the queues incl. ``idx_queue`` (initialised to -100).
    """

    def __init__(self, config: dict, text_encoder: Optional[str] = "bert-base-uncased", tokenizer=None,
                 init_deit: bool = False) -> None:
        super().__init__(config, tokenizer)
        bert_config = self.build_bert_config(tokenizer)
        self.distill = bool(config["distill"])
        self.momentum = config["momentum"]

        # No temp clamp during fine-tuning (models.md §8.1-7). The momentum encoders fill the ITC banks,
        # so they exist even with distill off (as upstream).
        self.build_alignment_towers(config, bert_config, "model", text_encoder, init_deit)
        self.create_queues(config["embed_dim"], config["queue_size"], with_idx=True)

    # ------------------------------------------------------------------------------------------
    def image_features(self, image_embeds: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        """Normalised ITC feature of the image [CLS] (B, E)."""
        proj = self.vision_proj_m if momentum else self.vision_proj
        return F.normalize(proj(image_embeds[:, 0]), dim=-1)

    def encode_text(self, caption: TokenBatch, momentum: bool = False) -> torch.Tensor:
        """Text-mode hidden states (B, Lt, Dt) of the first ``fusion_layer`` layers."""
        encoder = self.text_encoder_m if momentum else self.text_encoder
        return encoder(caption.input_ids, caption.attention_mask, mode="text").last_hidden_state

    def text_features(self, text_embeds: torch.Tensor, momentum: bool = False) -> torch.Tensor:
        """Normalised ITC feature of the text [CLS] (B, E)."""
        proj = self.text_proj_m if momentum else self.text_proj
        return F.normalize(proj(text_embeds[:, 0]), dim=-1)

    def itm_logits(self, text_embeds: torch.Tensor, text_mask: torch.Tensor, image_embeds: torch.Tensor,
                   image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 2) ITM logits of text-mode states fused with image tokens; column 1 = "match"."""
        return self.itm_head(self.fusion(text_embeds, text_mask, image_embeds, image_mask))

    # ------------------------------------------------------------------------------------------
    def forward(self, image: torch.Tensor, text: tuple[TokenBatch, TokenBatch], alpha: float = 0.0,
                idx: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        caption, vc = text
        if idx is None:
            raise ValueError("retrieval training needs idx (the image id of every caption)")
        idx = idx.view(-1).long()

        # 1. online encoders: image tokens [CLS, patches, VCs] and text-mode caption states
        image_embeds, image_mask = self.encode_image(image, vc)  # (B, 1+N+Lk, D)
        image_feat = self.image_features(image_embeds)  # (B, E)
        text_embeds = self.encode_text(caption)  # (B, Lt, Dt)
        text_feat = self.text_features(text_embeds)

        # 2. momentum features for the banks and the distillation targets
        with torch.no_grad():
            self._momentum_update()
            image_embeds_m, _ = self.encode_image(image, vc, momentum=True)
            image_feat_m = self.image_features(image_embeds_m, momentum=True)
            text_feat_m = self.text_features(self.encode_text(caption, momentum=True), momentum=True)

        # 3. ITC over [batch | queue] with every same-image entry positive
        loss_ita, sim_i2t, sim_t2i = self.momentum_contrastive_loss(
            image_feat, text_feat, image_feat_m, text_feat_m, alpha, idx=idx, distill=self.distill)
        self._dequeue_and_enqueue(image_feat_m, text_feat_m, idx)

        # 4. ITM with hard negatives drawn outside the positive's image
        loss_itm = self.itm_loss(image_embeds, image_mask, text_embeds, caption.attention_mask, sim_i2t, sim_t2i,
                                 idx=idx)
        return {"loss_ita": loss_ita, "loss_itm": loss_itm}
