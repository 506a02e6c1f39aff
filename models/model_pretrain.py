"""ViCHA pretraining model (models.md §3): ITC + hierarchical ITC + ITM + MLM + MAE."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.vision_transformer import Block

from models import losses
from models.backbone import AlignmentMixin, MomentumMixin, QueueMixin, ViCHABase
from models.pos_embed import get_2d_sincos_pos_embed
from models.precision import to_autocast_dtype
from models.tokenization import TokenBatch
from utils import concat_all_gather, get_rank


MLM_MASK_DRAWS = ("cpu", "device")


def mlm_draws_on_device(config: dict) -> bool:
    """``mlm_mask_draws``: 'cpu' (the original's generator stream) or 'device'; unset = 'device' under
    ``cuda_graph`` (a captured step cannot take fresh masks from the host), else 'cpu'."""
    draws = config.get("mlm_mask_draws") or ("device" if config.get("cuda_graph") else "cpu")
    if draws not in MLM_MASK_DRAWS:
        raise ValueError(f"config key mlm_mask_draws is {draws!r}; expected one of {MLM_MASK_DRAWS}")
    if draws == "cpu" and config.get("cuda_graph"):
        raise ValueError("config key mlm_mask_draws: cpu cannot be used with cuda_graph: true "
                         "(a captured step would replay the same MLM masks); use 'device'")
    return draws == "device"


class ViCHAPretrain(ViCHABase, AlignmentMixin, MomentumMixin, QueueMixin):
    """``forward(image, (caption, vc), alpha)`` returns the four summed loss terms by name."""

    def __init__(self, config: dict, text_encoder: str = "bert-base-uncased", tokenizer=None,
                 init_deit: bool = True) -> None:
        super().__init__(config, tokenizer)
        bert_config = self.build_bert_config(tokenizer)
        embed_dim, vision_width = config["embed_dim"], config["vision_width"]
        self.momentum = config["momentum"]
        self.mlm_probability = config["mlm_probability"]
        self.mlm_draws_on_device = mlm_draws_on_device(config)
        self.vocab_size = bert_config.vocab_size
        self.hierarchical = bool(config.get("return_hidden_state", False))
        self.merge_text_passes = bool(config.get("merge_text_passes", False))
        self.mlm_logits_on_masked = bool(config.get("mlm_logits_on_masked", True))

        self.build_alignment_towers(config, bert_config, "mlm", text_encoder, init_deit,
                                    return_hidden_state=self.hierarchical)
        text_width = bert_config.hidden_size

        if self.hierarchical:
            self.num_hidden_align = config.get("num_hidden_align", 5)
            depth = len(self.visual_encoder.blocks)
            if not 1 <= self.num_hidden_align < min(depth, bert_config.fusion_layer + 1):
                raise ValueError(
                    f"num_hidden_align {self.num_hidden_align} needs that many ViT blocks and BERT text layers "
                    f"before the last ones (ViT depth {depth}, fusion_layer {bert_config.fusion_layer})"
                )
            self.hidden_weight = config.get("ita_hidden_weight", 1.0)
            self.hidden_weights = config.get("ita_hidden_weights") or [1.0] * self.num_hidden_align
            self.vision_proj_hidden = nn.ModuleList(
                [nn.Linear(vision_width, embed_dim) for _ in range(self.num_hidden_align)])
            self.text_proj_hidden = nn.ModuleList(
                [nn.Linear(text_width, embed_dim) for _ in range(self.num_hidden_align)])

        self.use_mae = bool(config.get("mae", False))
        if self.use_mae:
            self._build_mae(config)
        self.create_queues(embed_dim, config["queue_size"])

    # ------------------------------------------------------------------------------------------
    def _build_mae(self, config: dict) -> None:
        if not config.get("unimodal_mae", False) or config.get("uni_cross_modal_mae", False):
            raise ValueError("only unimodal_mae: True is implemented (the cross-modal MAE variants "
                             "are used by no released config)")
        vit = self.visual_encoder
        width = config["vision_width"]
        self.mask_ratio = config.get("mask_ratio", 0.75)
        self.mae_cls_pos_embed = bool(config.get("mae_cls_pos_embed", False))
        self.mae_proj = nn.Linear(width, vit.patch_size ** 2 * 3)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))  # zeros: the original re-creates it
        self.decoder_embed = nn.Linear(width, width)
        heads = config.get("mae_decoder_heads", 16)
        self.decoder_blocks = nn.ModuleList([
            Block(width, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(config.get("mae_decoder_depth", 2))
        ])
        self.decoder_norm = nn.LayerNorm(width)  # eps 1e-5, PyTorch's default, as the original
        self.low_precision_residual = False  # config bf16_residual: the decoder's stream too
        pos = get_2d_sincos_pos_embed(width, vit.grid_size, cls_token=True)
        self.decoder_pos_embed = nn.Parameter(torch.from_numpy(pos).float().unsqueeze(0), requires_grad=False)

    # ------------------------------------------------------------------------------------------
    def forward(self, image: torch.Tensor, text: tuple[TokenBatch, TokenBatch], alpha: float = 0.0) -> dict:
        caption, vc = text
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        batch = caption.input_ids.shape[0]
        merged = self.merge_text_passes
        if merged:  # the MLM masks are drawn first: the masked captions join the text passes
            masked_ids, mlm_labels = self.mask_caption(caption)
            text_ids = torch.cat([caption.input_ids, masked_ids])
            text_mask = torch.cat([caption.attention_mask, caption.attention_mask])
        else:
            text_ids, text_mask = caption.input_ids, caption.attention_mask

        # 1-2. online image (with VCs) and text encoders, ITC features
        (image_out, image_mask) = self.encode_image(image, vc, return_hidden_state=self.hierarchical)
        image_embeds, image_hidden = image_out if self.hierarchical else (image_out, None)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)  # (B, E)
        text_out = self.text_encoder.bert(text_ids, text_mask, mode="text", output_hidden_states=self.hierarchical)
        text_embeds = text_out.last_hidden_state[:batch]  # (B, Lt, Dt)
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

        # 3-4. momentum features, key banks, distillation targets and ITC
        with torch.no_grad():
            self._momentum_update()
            image_embeds_m, _ = self.encode_image(image, vc, momentum=True)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0]), dim=-1)
            text_out_m = self.text_encoder_m.bert(text_ids, text_mask, mode="text", output_hidden_states=False)
            text_feat_m = F.normalize(self.text_proj_m(text_out_m.last_hidden_state[:batch, 0]), dim=-1)
        loss_itc, sim_i2t, sim_t2i = self.momentum_contrastive_loss(image_feat, text_feat, image_feat_m,
                                                                     text_feat_m, alpha)
        # 5. enqueue
        self._dequeue_and_enqueue(image_feat_m, text_feat_m)
        # 6. hierarchical ITC
        loss_ita = loss_itc
        if self.hierarchical:
            text_hidden = tuple(h[:batch] for h in text_out.hidden_states)
            loss_ita = loss_itc + self.hidden_weight * self.hierarchical_loss(image_hidden, text_hidden)
        # 7. ITM with hard negatives; 8. MLM with distillation. Both read the images' cross-attention
        # keys/values, projected once (xbert.ImageKeysValues) unless share_image_keys_values is off.
        image_kv = (self.text_encoder.bert.image_keys_values(image_embeds, self.pick_image_rows_by_product)
                    if self.share_image_keys_values else None)
        if merged:
            loss_itm, loss_mlm = self.merged_itm_mlm_losses(
                image_embeds, image_mask, image_kv, image_embeds_m, text_embeds, caption.attention_mask,
                sim_i2t, sim_t2i, text_out.last_hidden_state[batch:], text_out_m.last_hidden_state[batch:],
                mlm_labels, alpha)
        else:
            loss_itm = self.itm_loss(image_embeds, image_mask, text_embeds, caption.attention_mask, sim_i2t,
                                     sim_t2i, image_keys_values=image_kv)
            loss_mlm = self.mlm_loss(caption, image_embeds if image_kv is None else image_kv, image_embeds_m,
                                     image_mask, alpha)
        result = {"loss_mlm": loss_mlm, "loss_ita": loss_ita, "loss_itm": loss_itm}
        # 9. MAE
        if self.use_mae:
            result["loss_mae"] = self.mae_loss(image)
        return result

    def merged_itm_mlm_losses(self, image_embeds, image_mask, image_kv, image_embeds_m, text_embeds, caption_mask,
                              sim_i2t, sim_t2i, masked_text, masked_text_m, mlm_labels, alpha: float):
        """ITM and MLM through one fusion pass of 4B texts (``merge_text_passes``): the 3B ITM pairs and
        the B masked captions (their text layers ran with the unmasked captions, online and momentum).
        In the cross-attention the three blocks of B texts that attend to the images in order share
        one call per layer (``xbert.StackedKeysValues``); only the hard-negative images are gathered.
        Per text the same math as the separate passes; only dropout draws and the order of the random
        draws differ (the MLM masks come first)."""
        texts, masks, row_blocks = self.itm_pairs(text_embeds, caption_mask, sim_i2t, sim_t2i)
        batch = text_embeds.shape[0]
        images, image_masks = self.images_for_rows(image_embeds, image_mask, row_blocks + (None,), image_kv,
                                                   stack=True)
        fused = self.text_encoder.bert(encoder_embeds=torch.cat([texts, masked_text]),
                                       attention_mask=torch.cat([masks, caption_mask]),
                                       encoder_hidden_states=images, encoder_attention_mask=image_masks,
                                       mode="fusion").last_hidden_state
        loss_itm = self.itm_loss_from_fused(fused[:3 * batch, 0])
        with torch.no_grad():
            images_m = (self.text_encoder_m.bert.image_keys_values(image_embeds_m) if self.share_image_keys_values
                        else image_embeds_m)
            fused_m = self.text_encoder_m.bert(encoder_embeds=masked_text_m, attention_mask=caption_mask,
                                               encoder_hidden_states=images_m, encoder_attention_mask=image_mask,
                                               mode="fusion").last_hidden_state
        return loss_itm, self.masked_lm_loss(fused[3 * batch:], fused_m, mlm_labels, alpha)

    # ------------------------------------------------------------------------------------------
    def hierarchical_loss(self, image_hidden: tuple, text_hidden: tuple) -> torch.Tensor:
        """Level i pairs ViT block (depth-1-n+i) with BERT text hidden entry (fusion-n+i) (§3.4)."""
        levels = self.num_hidden_align
        image_levels = image_hidden[-(levels + 1):-1]
        text_levels = text_hidden[-(levels + 1):-1]
        image_cls = [F.normalize(proj(h[:, 0]), dim=-1) for proj, h in zip(self.vision_proj_hidden, image_levels)]
        text_cls = [F.normalize(proj(h[:, 0]), dim=-1) for proj, h in zip(self.text_proj_hidden, text_levels)]
        gathered_image = [concat_all_gather(a) for a in image_cls]
        gathered_text = [concat_all_gather(b) for b in text_cls]
        offset = get_rank() * image_cls[0].shape[0] if self.config.get("fix_hitc_rank_offset", False) else 0
        return losses.hierarchical_contrastive_loss(
            image_cls, text_cls, gathered_image, gathered_text, self.temp, self.hidden_weights, offset)

    def mask_caption(self, caption: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking of the captions: (masked ids, labels)."""
        return losses.mask_tokens(caption.input_ids, self.vocab_size, self.mask_token_id, self.pad_token_id,
                                  self.cls_token_id, self.mlm_probability, draw_on_device=self.mlm_draws_on_device)

    def mlm_loss(self, caption: TokenBatch, image_states, image_embeds_m, image_mask, alpha: float) -> torch.Tensor:
        """Distilled MLM; ``image_states``: the image tokens or their projected ImageKeysValues."""
        input_ids, labels = self.mask_caption(caption)
        with torch.no_grad():
            fused_m = self.text_encoder_m.bert(input_ids, caption.attention_mask, encoder_hidden_states=image_embeds_m,
                                               encoder_attention_mask=image_mask).last_hidden_state
        fused = self.text_encoder.bert(input_ids, caption.attention_mask, encoder_hidden_states=image_states,
                                       encoder_attention_mask=image_mask).last_hidden_state
        return self.masked_lm_loss(fused, fused_m, labels, alpha)

    def masked_lm_loss(self, fused: torch.Tensor, fused_m: torch.Tensor, labels: torch.Tensor,
                       alpha: float) -> torch.Tensor:
        """MLM cross-entropy mixed with the momentum model's predictions (fp32 soft labels, models.md §3.6)
        from the fusion outputs (B, L, D), online and momentum.

        The loss reads the masked positions only, so with ``mlm_logits_on_masked`` (default) the
        prediction heads (768 -> 30,522 logits, softmaxes in fp32) run on those rows alone: the same
        values, about a quarter of the rows (a static bound) or fewer, where the original computes all
        B x L."""
        if self.mlm_logits_on_masked:
            rows = losses.masked_rows(labels, self.mlm_rows_capacity(labels))
            width = fused.shape[-1]
            fused, fused_m = fused.reshape(-1, width)[rows], fused_m.reshape(-1, width)[rows]
            labels = labels.reshape(-1)[rows]
        with torch.no_grad():
            soft_labels = F.softmax(self.text_encoder_m.cls(fused_m), dim=-1, dtype=torch.float32)
        return losses.mlm_loss(self.text_encoder.cls(fused), labels, soft_labels, alpha)

    def mlm_rows_capacity(self, labels: torch.Tensor) -> int | None:
        """None (exactly the masked rows) on the CPU in eager mode, where counting them costs nothing;
        a static bound on an accelerator (counting would be a host sync) and inside torch.compile."""
        if labels.device.type == "cpu" and not torch.compiler.is_compiling():
            return None
        return losses.mlm_row_capacity(labels.numel(), self.mlm_probability)

    def mae_loss(self, image: torch.Tensor) -> torch.Tensor:
        """Unimodal MAE: encode 25 % of the patches, decode all, regress masked pixels (§3.7)."""
        vit = self.visual_encoder
        batch, num_patches = image.shape[0], vit.num_patches
        keep_count = int(num_patches * (1 - self.mask_ratio))
        noise = torch.rand(batch, num_patches, device=image.device)
        order = torch.argsort(noise, dim=1)  # smallest noise kept
        restore = torch.argsort(order, dim=1)
        latent = vit.forward_masked(image, order[:, :keep_count], cls_pos_embed=self.mae_cls_pos_embed)
        mask = torch.ones(batch, num_patches, device=image.device)
        mask[:, :keep_count] = 0
        mask = torch.gather(mask, 1, restore)  # 1 = removed patch

        decoded = self.decoder_embed(latent)  # (B, 1+keep, D)
        fillers = self.mask_token.to(decoded.dtype).expand(batch, num_patches - keep_count, -1)
        patches = torch.cat([decoded[:, 1:], fillers], dim=1)
        patches = torch.gather(patches, 1, restore.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        decoded = to_autocast_dtype(torch.cat([decoded[:, :1], patches], dim=1) + self.decoder_pos_embed,
                                    self.low_precision_residual)
        for block in self.decoder_blocks:
            decoded = block(decoded)
        pred = self.mae_proj(self.decoder_norm(decoded))[:, 1:]  # (B, N, p*p*3)
        return losses.mae_loss(pred, image, mask, vit.patch_size)
