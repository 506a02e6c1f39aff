"""ViCHA VQA model (models.md §4.3): question encoder over image + VC tokens, answer decoder.

Training maximises the (weighted) likelihood of every human answer under a causal decoder that
cross-attends to the fused question states; inference ranks a fixed answer list with the same
decoder (``rank_answer``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from models.backbone import MomentumMixin, ViCHABase, build_text_encoder, build_visual_encoder
from models.losses import IGNORE_INDEX
from models.tokenization import TokenBatch

# VQA, VE and NLVR hard-code the EMA coefficient instead of reading config['momentum'] (models.md §4).
VQA_MOMENTUM = 0.995


class ViCHAVQA(ViCHABase, MomentumMixin):
    """``forward(image, (question, vc), answer, alpha, k, weights, train)`` as the original.

    Train: ``answer`` holds every distinct answer of the batch (flattened), ``k[b]`` of them for
    question b, with ``weights``; returns ``{'loss': ...}``. Eval: ``answer`` is the tokenised
    answer list; returns ``(topk_ids, topk_probs)``, both (B, k), best first.
    """

    def __init__(self, config: dict, text_encoder: Optional[str] = "bert-base-uncased",
                 text_decoder: Optional[str] = None, tokenizer=None) -> None:
        super().__init__(config, tokenizer)
        bert_config = self.build_bert_config(tokenizer, output_hidden_states=False)
        init_bert = config.get("init_bert", True)
        self.distill = bool(config["distill"])
        self.momentum = VQA_MOMENTUM
        # Faithful: ViCHA dropped ``alpha`` from the decoder call, so distillation has zero weight.
        self.distill_alpha_active = bool(config.get("fix_vqa_distill_alpha", False))
        # Faithful: the first answer token's log-probability is counted twice when re-ranking.
        self.rank_double_count = not config.get("fix_vqa_rank_double_count", False)
        if tokenizer is None:
            self.pad_token_id = bert_config.pad_token_id

        self.visual_encoder = build_visual_encoder(config)
        self.text_encoder = build_text_encoder(bert_config, "model", text_encoder, init_bert)
        # The decoder has the fusion layers' count (6 of 12) and cross-attends in every layer, so
        # a pretrained fusion layer i initialises decoder layer i - fusion_layer (checkpoint.py).
        decoder_config = dataclasses.replace(
            bert_config, fusion_layer=0, num_hidden_layers=bert_config.num_hidden_layers - bert_config.fusion_layer,
            encoder_width=bert_config.hidden_size, extra=dict(bert_config.extra))
        self.text_decoder = build_text_encoder(decoder_config, "lm", text_decoder or text_encoder, init_bert)
        self.build_vc_path(bert_config, text_encoder)
        if self.distill:
            self.create_momentum_twins(["visual_encoder", "text_encoder", "text_decoder", "kw_encoder", "kw_proj"])

    # ------------------------------------------------------------------------------------------
    def forward(self, image: torch.Tensor, text: tuple[TokenBatch, TokenBatch], answer: TokenBatch,
                alpha: float = 0.0, k: Union[Sequence[int], int, None] = None,
                weights: Optional[torch.Tensor] = None, train: bool = True):
        question, vc = text
        question_states = self.encode_question(image, question, vc)
        if train:
            if k is None or weights is None:
                raise ValueError("training needs k (answers per question) and the answer weights")
            return {"loss": self.answer_loss(image, question, vc, question_states, answer, alpha, k, weights)}
        if k is None:
            raise ValueError("answer ranking needs k (k_test candidates per question)")
        return self.rank_answer(question_states, question.attention_mask, answer.input_ids,
                                answer.attention_mask, int(k))

    def encode_question(self, image: torch.Tensor, question: TokenBatch, vc: TokenBatch,
                        momentum: bool = False) -> torch.Tensor:
        """Question states (B, Lq, Dt) from the full 12-layer encoder over [CLS, patches, VCs]."""
        image_embeds, image_mask = self.encode_image(image, vc, momentum=momentum)  # (B, 1+N+Lk, Dv)
        encoder = self.text_encoder_m if momentum else self.text_encoder
        out = encoder(question.input_ids, question.attention_mask, encoder_hidden_states=image_embeds,
                      encoder_attention_mask=image_mask, mode="multi_modal")
        return out.last_hidden_state

    def answer_loss(self, image: torch.Tensor, question: TokenBatch, vc: TokenBatch,
                    question_states: torch.Tensor, answer: TokenBatch, alpha: float,
                    k: Sequence[int], weights: torch.Tensor) -> torch.Tensor:
        """sum_a w_a * (summed next-token CE of answer a) / B; question b repeated k[b] times."""
        counts = torch.as_tensor(list(k), device=question_states.device)
        if int(counts.sum()) != answer.input_ids.shape[0]:
            raise ValueError(f"k sums to {int(counts.sum())} answers but {answer.input_ids.shape[0]} were given")
        states = question_states.repeat_interleave(counts, dim=0)  # (A, Lq, Dt)
        masks = question.attention_mask.repeat_interleave(counts, dim=0)
        targets = answer.input_ids.masked_fill(answer.input_ids == self.pad_token_id, IGNORE_INDEX)
        soft_labels = None
        if self.distill:
            with torch.no_grad():
                self._momentum_update()
                states_m = self.encode_question(image, question, vc, momentum=True).repeat_interleave(counts, dim=0)
                logits_m = self.text_decoder_m(answer.input_ids, answer.attention_mask, encoder_hidden_states=states_m,
                                               encoder_attention_mask=masks, return_logits=True)
                soft_labels = F.softmax(logits_m.float(), dim=-1)
        out = self.text_decoder(answer.input_ids, answer.attention_mask, encoder_hidden_states=states,
                                encoder_attention_mask=masks, labels=targets, soft_labels=soft_labels,
                                alpha=alpha if self.distill_alpha_active else 0.0, reduction="none")
        return (weights.to(out.loss.dtype) * out.loss).sum() / image.shape[0]

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rank_answer(self, question_states: torch.Tensor, question_mask: torch.Tensor, answer_ids: torch.Tensor,
                    answer_mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k answers per question: shortlist by first-token probability, re-rank by the full
        answer log-likelihood. Returns (answer indices, probabilities over the k), best first.

        k above the answer-list length means "all answers".
        """
        candidates, first_log_prob, log_likelihood = self.score_candidates(
            question_states, question_mask, answer_ids, answer_mask, k)
        score = log_likelihood + first_log_prob if self.rank_double_count else log_likelihood
        probs = F.softmax(score, dim=-1)
        topk_probs, order = probs.topk(probs.shape[1], dim=1)
        return torch.gather(candidates, 1, order), topk_probs

    @torch.no_grad()
    def score_candidates(self, question_states: torch.Tensor, question_mask: torch.Tensor, answer_ids: torch.Tensor,
                         answer_mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(candidate answer indices (Nq, k), their first-token log-prob, their full log-likelihood).

        The full log-likelihood already contains the first token's term (summed token CE).
        """
        num_questions, num_answers = question_states.shape[0], answer_ids.shape[0]
        k = min(k, num_answers)
        # 1. first-token distribution from the start token ([CLS]) alone
        start_ids = answer_ids[:1, :1].expand(num_questions, 1)
        start_logits = self.text_decoder(start_ids, encoder_hidden_states=question_states,
                                         encoder_attention_mask=question_mask).logits[:, 0]  # (Nq, V)
        first_probs = F.softmax(start_logits.float(), dim=-1).index_select(1, answer_ids[:, 1])  # (Nq, A)
        topk_first, candidates = first_probs.topk(k, dim=1)  # (Nq, k)
        # 2. teacher-forced likelihood of each shortlisted answer; question b's k copies contiguous
        flat = candidates.reshape(-1)
        ids, mask = answer_ids[flat], answer_mask[flat]  # (Nq*k, La)
        targets = ids.masked_fill(ids == self.pad_token_id, IGNORE_INDEX)
        out = self.text_decoder(ids, mask, encoder_hidden_states=question_states.repeat_interleave(k, dim=0),
                                encoder_attention_mask=question_mask.repeat_interleave(k, dim=0),
                                labels=targets, reduction="none")
        log_likelihood = -out.loss.view(num_questions, k)
        return candidates, topk_first.log(), log_likelihood
