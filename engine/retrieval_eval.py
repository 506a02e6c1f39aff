"""Image-text retrieval evaluation (pipeline.md §6.1): ITC shortlist, ITM re-ranking, recall metrics.

Protocol (faithful): every caption is encoded once (padded to 25 tokens) and every image once (its
VCs padded to 55 tokens); ``sims = image_feats @ text_feats.T``. For each image the ``k_test``
texts with the highest ITC similarity, and for each text the ``k_test`` best images, are scored
by the ITM head's raw "match" logit on the fused pair; every other entry is -100. Query rows are
split across ranks and the two matrices are summed with ``all_reduce``. If ``k_test`` exceeds the
number of candidates, every candidate is scored (documented deviation: the original crashes).

Two implementations of the scoring give the same matrices (tested):

* :func:`score_matrices_per_query` is the original loop: one fusion forward per query with the
  query's image (or text) repeated ``k_test`` times.
* :func:`score_matrices` is the fast path. The image-to-text and text-to-image shortlists are
  merged into one set of unique (image, text) pairs (a pair in both lists is scored once), the pairs
  are grouped by image, and many groups go through the fusion layers in one forward. Inside a
  group the texts of one image are folded into the query axis of the cross-attention, so each
  image's keys/values are projected once per layer for the whole group instead of once per pair
  (cross-attention rows are independent, so the result is the same). All features stay on the
  device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import default_collate

import utils
from engine.config import get_option
from models.tokenization import TokenBatch, ViCHATokenizer
from models.xbert import BertModel, cross_attention_mask, self_attention_mask

TEXT_LENGTH = 25  # captions padded (and truncated) to 25 tokens at evaluation
VC_LENGTH = 55  # VC strings padded to 55 tokens at evaluation (the ViT attends to the padding)
FILL_SCORE = -100.0  # score of every pair outside the ITC shortlist
METRIC_KEYS = ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean")


class EvalImageCollate:
    """Collates ``((image, vc_string), index)`` items to ``(images, vc TokenBatch, indices)``.

    VCs are padded to ``VC_LENGTH`` tokens, so an image's tokens do not depend on its batch.
    """

    def __init__(self, tokenizer: ViCHATokenizer, vc_length: int = VC_LENGTH) -> None:
        self.tokenizer = tokenizer
        self.vc_length = vc_length

    def __call__(self, samples: list) -> tuple[torch.Tensor, TokenBatch, torch.Tensor]:
        (images, vc_strings), indices = default_collate(samples)
        vc = self.tokenizer(list(vc_strings), padding="max_length", truncation=True, max_length=self.vc_length)
        return images, vc, indices


@dataclass
class RetrievalFeatures:
    """Everything the scoring needs, on one device; images and texts in dataset order."""

    image_embeds: torch.Tensor  # (Ni, 1+N+Lk, D) ViT output incl. VC tokens
    image_mask: Optional[torch.Tensor]  # (Ni, 1+N+Lk) or None = all ones (the original)
    image_feats: torch.Tensor  # (Ni, E) normalised ITC features
    text_embeds: torch.Tensor  # (Nt, Lt, Dt) text-mode hidden states
    text_mask: torch.Tensor  # (Nt, Lt)
    text_feats: torch.Tensor  # (Nt, E)

    @property
    def num_images(self) -> int:
        return self.image_embeds.shape[0]

    @property
    def num_texts(self) -> int:
        return self.text_embeds.shape[0]


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def encode_text_batches(model: nn.Module, batches: Iterable[TokenBatch], device: torch.device,
                        bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text-mode hidden states, attention masks, normalised ITC features) of tokenised captions, in order."""
    embeds, masks, feats = [], [], []
    for batch in batches:
        batch = batch.to(device)
        with _autocast(device, bf16):
            hidden = model.encode_text(batch)
            feats.append(model.text_features(hidden).float())
        embeds.append(hidden)
        masks.append(batch.attention_mask)
    return torch.cat(embeds), torch.cat(masks), torch.cat(feats)


@torch.no_grad()
def encode_image_batches(model: nn.Module, batches: Iterable[tuple[torch.Tensor, TokenBatch]], device: torch.device,
                         bf16: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """(ViT outputs with VC tokens, their masks or None, normalised ITC features) of (images, VCs) batches."""
    embeds, masks, feats = [], [], []
    for images, vc in batches:
        with _autocast(device, bf16):
            hidden, mask = model.encode_image(images.to(device, non_blocking=True), vc.to(device))
            feats.append(model.image_features(hidden).float())
        embeds.append(hidden)
        masks.append(mask)
    return torch.cat(embeds), None if masks[0] is None else torch.cat(masks), torch.cat(feats)


def compute_features(model: nn.Module, image_loader, texts: Sequence[str], tokenizer: ViCHATokenizer,
                     device: torch.device, text_batch_size: int = 64, bf16: bool = False,
                     print_freq: int = 50) -> RetrievalFeatures:
    """Encode every caption and every image once (steps 1-2 of §6.1); features stay on ``device``.

    ``image_loader`` yields :class:`EvalImageCollate` batches in dataset order (no sampler).
    """
    model.eval()
    text_batches = (tokenizer(list(texts[start:start + text_batch_size]), padding="max_length", truncation=True,
                              max_length=TEXT_LENGTH) for start in range(0, len(texts), text_batch_size))
    text_embeds, text_mask, text_feats = encode_text_batches(model, text_batches, device, bf16)

    def images_in_order():
        logger = utils.MetricLogger(delimiter="  ")
        seen = 0
        for images, vc, indices in logger.log_every(image_loader, print_freq, "Evaluation (features):"):
            if indices.numel() and int(indices[0]) != seen:
                raise ValueError("the evaluation image loader must yield the images in dataset order (no sampler)")
            seen += images.shape[0]
            yield images, vc

    image_embeds, image_mask, image_feats = encode_image_batches(model, images_in_order(), device, bf16)
    return RetrievalFeatures(image_embeds, image_mask, image_feats, text_embeds, text_mask, text_feats)


def rank_rows(count: int, world_size: int, rank: int) -> range:
    """Query rows handled by ``rank``: blocks of ``count // world_size + 1`` (as the original)."""
    step = count // world_size + 1
    start = min(count, rank * step)
    return range(start, min(count, start + step))


@dataclass
class Shortlists:
    """This rank's query rows and each row's top-k candidates by ITC similarity."""

    image_rows: torch.Tensor  # (Ri,) image indices (i2t queries)
    i2t: torch.Tensor  # (Ri, k_i) text indices
    text_rows: torch.Tensor  # (Rt,) text indices (t2i queries)
    t2i: torch.Tensor  # (Rt, k_t) image indices


def shortlists(sims: torch.Tensor, k_test: int, world_size: int = 1, rank: int = 0) -> Shortlists:
    """Top-``k_test`` candidates of this rank's rows; ``k_test`` is capped at the number of candidates."""
    num_images, num_texts = sims.shape
    rows_i = rank_rows(num_images, world_size, rank)
    rows_t = rank_rows(num_texts, world_size, rank)
    device = sims.device
    i2t = sims[rows_i.start:rows_i.stop].topk(min(k_test, num_texts), dim=1).indices
    t2i = sims[:, rows_t.start:rows_t.stop].t().topk(min(k_test, num_images), dim=1).indices
    return Shortlists(torch.arange(rows_i.start, rows_i.stop, device=device), i2t,
                      torch.arange(rows_t.start, rows_t.stop, device=device), t2i)


def _empty_scores(features: RetrievalFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    device = features.image_feats.device
    i2t = torch.full((features.num_images, features.num_texts), FILL_SCORE, device=device)
    t2i = torch.full((features.num_texts, features.num_images), FILL_SCORE, device=device)
    return i2t, t2i


# ----------------------------------------------------------------------------------------------
# The original per-query loop (reference)


@torch.no_grad()
def score_matrices_per_query(model: nn.Module, features: RetrievalFeatures, k_test: int,
                             bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t (Ni, Nt), t2i (Nt, Ni)) scored one query at a time, as ``evaluation_kw_img`` did."""
    model.eval()
    device = features.image_feats.device
    lists = shortlists(features.image_feats @ features.text_feats.t(), k_test, utils.get_world_size(),
                       utils.get_rank())
    i2t, t2i = _empty_scores(features)
    with _autocast(device, bf16):
        for image, texts in zip(lists.image_rows.tolist(), lists.i2t):
            k = texts.shape[0]
            image_embeds = features.image_embeds[image].expand(k, -1, -1)
            image_mask = None if features.image_mask is None else features.image_mask[image].expand(k, -1)
            logits = model.itm_logits(features.text_embeds[texts], features.text_mask[texts], image_embeds, image_mask)
            i2t[image, texts] = logits[:, 1].float()
        for text, images in zip(lists.text_rows.tolist(), lists.t2i):
            k = images.shape[0]
            image_mask = None if features.image_mask is None else features.image_mask[images]
            logits = model.itm_logits(features.text_embeds[text].expand(k, -1, -1),
                                      features.text_mask[text].expand(k, -1), features.image_embeds[images], image_mask)
            t2i[text, images] = logits[:, 1].float()
    utils.barrier()
    return utils.all_reduce_sum(i2t), utils.all_reduce_sum(t2i)


# ----------------------------------------------------------------------------------------------
# Batched scoring


def grouped_fusion(bert: BertModel, text_embeds: torch.Tensor, text_mask: torch.Tensor, image_embeds: torch.Tensor,
                   image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fusion layers for G images with m texts each; returns the fused states (G*m, Lt, Dt).

    ``text_embeds`` (G*m, Lt, Dt) holds image g's texts at rows g*m .. g*m+m-1; ``image_embeds``
    is (G, Li, D). Each layer runs self-attention and the feed-forward per text as
    ``BertLayer`` does, while the cross-attention sees the m texts of an image as one query
    sequence of length m*Lt against that image's keys/values.
    """
    groups = image_embeds.shape[0]
    rows, length, width = text_embeds.shape
    if rows % groups:
        raise ValueError(f"{rows} texts cannot be split evenly over {groups} images")
    dtype = torch.get_autocast_dtype(text_embeds.device.type) if torch.is_autocast_enabled(
        text_embeds.device.type) else text_embeds.dtype
    self_mask = self_attention_mask(text_mask, False, dtype)  # (G*m, 1, 1, Lt)
    image_attn_mask = cross_attention_mask(image_mask, dtype)  # (G, 1, 1, Li) or None
    hidden = text_embeds
    for index in bert.encoder.layer_range("fusion"):
        layer = bert.encoder.layer[index]
        hidden = layer.attention(hidden, self_mask)
        folded = hidden.reshape(groups, (rows // groups) * length, width)  # (G, m*Lt, Dt)
        hidden = layer.crossattention(folded, image_attn_mask, image_embeds).reshape(rows, length, width)
        hidden = layer.output(layer.intermediate(hidden), hidden)
    return hidden


@dataclass
class PairGroups:
    """Unique (image, text) pairs packed into groups of ``size`` texts that share one image."""

    pair_ids: torch.Tensor  # (P,) image * Nt + text, sorted (so grouped by image)
    inverse: torch.Tensor  # position in pair_ids of every requested pair (i2t rows first, then t2i)
    group_image: torch.Tensor  # (S,) image of each group
    group_texts: torch.Tensor  # (S, size) texts of each group; unused slots repeat the group's first text
    pair_slot: torch.Tensor  # (P,) flat slot (group * size + position) of each unique pair
    size: int


def pack_pairs(lists: Shortlists, num_texts: int, group_size: int) -> PairGroups:
    """Merge both shortlists into unique pairs and pack each image's pairs into fixed-size groups."""
    device = lists.i2t.device
    i2t_ids = lists.image_rows[:, None] * num_texts + lists.i2t  # (Ri, k)
    t2i_ids = lists.t2i * num_texts + lists.text_rows[:, None]  # (Rt, k)
    pair_ids, inverse = torch.unique(torch.cat([i2t_ids.reshape(-1), t2i_ids.reshape(-1)]), return_inverse=True)
    images, texts = pair_ids // num_texts, pair_ids % num_texts
    present, counts = torch.unique_consecutive(images, return_counts=True)
    size = max(1, min(group_size, int(counts.max()) if counts.numel() else 1))
    groups_per_image = (counts + size - 1) // size
    first_pair = torch.cumsum(counts, 0) - counts  # index in pair_ids of each image's first pair
    first_group = torch.cumsum(groups_per_image, 0) - groups_per_image
    owner = torch.repeat_interleave(torch.arange(present.numel(), device=device), counts)  # image slot per pair
    position = torch.arange(pair_ids.numel(), device=device) - first_pair[owner]
    group = first_group[owner] + position // size
    pair_slot = group * size + position % size
    num_groups = int(groups_per_image.sum())
    group_image = torch.repeat_interleave(present, groups_per_image)
    leads = position % size == 0  # exactly one pair opens each group
    first_text = torch.empty(num_groups, dtype=torch.long, device=device)
    first_text[group[leads]] = texts[leads]
    group_texts = first_text[:, None].repeat(1, size).view(-1)
    group_texts[pair_slot] = texts
    return PairGroups(pair_ids, inverse, group_image, group_texts.view(num_groups, size), pair_slot, size)


@torch.no_grad()
def score_matrices(model: nn.Module, features: RetrievalFeatures, k_test: int, pairs_per_batch: int = 1024,
                   group_size: int = 32, bf16: bool = False, print_freq: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t (Ni, Nt), t2i (Nt, Ni)) equal to :func:`score_matrices_per_query`, computed in batches.

    ``group_size`` texts share one image's keys/values; ``pairs_per_batch`` bounds the pairs (and
    so the memory) of one fusion forward.
    """
    model.eval()
    device = features.image_feats.device
    lists = shortlists(features.image_feats @ features.text_feats.t(), k_test, utils.get_world_size(),
                       utils.get_rank())
    i2t, t2i = _empty_scores(features)
    if lists.i2t.numel() + lists.t2i.numel():
        packed = pack_pairs(lists, features.num_texts, group_size)
        groups_per_batch = max(1, pairs_per_batch // packed.size)
        slot_scores = torch.empty(packed.group_texts.numel(), device=device)
        starts = range(0, packed.group_image.numel(), groups_per_batch)
        logger = utils.MetricLogger(delimiter="  ")
        with _autocast(device, bf16):
            for start in logger.log_every(starts, print_freq, "Evaluation (ITM re-ranking):"):
                images = packed.group_image[start:start + groups_per_batch]
                texts = packed.group_texts[start:start + groups_per_batch].reshape(-1)
                image_mask = None if features.image_mask is None else features.image_mask[images]
                # Padding is masked out of the text self-attention, so dropping the columns that are
                # padding in every text of the batch leaves the [CLS] output unchanged.
                text_mask = features.text_mask[texts]
                length = int(text_mask.sum(dim=1).max())
                fused = grouped_fusion(model.text_bert, features.text_embeds[texts, :length], text_mask[:, :length],
                                       features.image_embeds[images], image_mask)
                logits = model.itm_head(fused[:, 0])
                slot_scores[start * packed.size:start * packed.size + texts.numel()] = logits[:, 1].float()
        pair_scores = slot_scores[packed.pair_slot][packed.inverse]  # every requested pair, i2t first
        n_i2t = lists.i2t.numel()
        i2t[lists.image_rows[:, None], lists.i2t] = pair_scores[:n_i2t].view_as(lists.i2t)
        t2i[lists.text_rows[:, None], lists.t2i] = pair_scores[n_i2t:].view_as(lists.t2i)
    utils.barrier()
    return utils.all_reduce_sum(i2t), utils.all_reduce_sum(t2i)


# ----------------------------------------------------------------------------------------------
# Entry point and metrics


def evaluate_retrieval(model: nn.Module, image_loader, tokenizer: ViCHATokenizer, config: dict, device: torch.device,
                       batched: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Score matrices of an evaluation split (``image_loader.dataset`` has ``text``)."""
    bf16 = bool(get_option(config, "bf16"))
    print_freq = get_option(config, "print_freq")
    features = compute_features(model, image_loader, image_loader.dataset.text, tokenizer, device,
                                text_batch_size=get_option(config, "eval_batch_size_text"), bf16=bf16,
                                print_freq=print_freq)
    if config.get("dual_metrics", False):
        sims = features.image_feats @ features.text_feats.t()
        return sims.cpu().numpy(), sims.t().cpu().numpy()
    if batched:
        i2t, t2i = score_matrices(model, features, config["k_test"], bf16=bf16, print_freq=print_freq)
    else:
        i2t, t2i = score_matrices_per_query(model, features, config["k_test"], bf16=bf16)
    return i2t.cpu().numpy(), t2i.cpu().numpy()


def _positions(scores: np.ndarray) -> np.ndarray:
    """positions[r, c] = rank of column c in row r sorted by decreasing score (0 = best).

    Uses ``np.argsort(row)[::-1]`` like the original, so ties are broken the same way.
    """
    order = np.argsort(scores, axis=1)[:, ::-1]
    positions = np.empty_like(order)
    np.put_along_axis(positions, order, np.arange(scores.shape[1])[None, :].repeat(scores.shape[0], 0), axis=1)
    return positions


def itm_eval(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: dict[int, int],
             img2txt: dict[int, list[int]]) -> dict[str, float]:
    """Recall@1/5/10 in percent (pipeline.md §6.1 step 5).

    Text retrieval ranks an image's row and takes the best position among its ground-truth
    captions; image retrieval ranks a text's row at its single image.
    """
    scores_i2t, scores_t2i = np.asarray(scores_i2t), np.asarray(scores_t2i)
    positions = _positions(scores_i2t)
    tr_ranks = np.array([positions[i, img2txt[i]].min() for i in range(scores_i2t.shape[0])])
    positions = _positions(scores_t2i)
    ir_ranks = np.array([positions[t, txt2img[t]] for t in range(scores_t2i.shape[0])])

    def recall(ranks: np.ndarray, k: int) -> float:
        return 100.0 * float(np.mean(ranks < k))

    txt = [recall(tr_ranks, k) for k in (1, 5, 10)]
    img = [recall(ir_ranks, k) for k in (1, 5, 10)]
    txt_mean, img_mean = sum(txt) / 3, sum(img) / 3
    return dict(zip(METRIC_KEYS, (*txt, txt_mean, *img, img_mean, (txt_mean + img_mean) / 2)))


def pairs_scored(num_images: int, num_texts: int, k_test: int) -> int:
    """ITM pair evaluations of the original protocol: k per image row plus k per text row."""
    return num_images * min(k_test, num_texts) + num_texts * min(k_test, num_images)


def describe(metrics: dict[str, Any]) -> str:
    """One line for the console: ``r_mean 57.3 | txt r1/r5/r10 ... | img ...``."""
    return (f"r_mean {metrics['r_mean']:.2f} | txt r1/5/10 {metrics['txt_r1']:.2f}/{metrics['txt_r5']:.2f}/"
            f"{metrics['txt_r10']:.2f} | img r1/5/10 {metrics['img_r1']:.2f}/{metrics['img_r5']:.2f}/"
            f"{metrics['img_r10']:.2f}")


__all__ = [
    "EvalImageCollate", "FILL_SCORE", "METRIC_KEYS", "PairGroups", "RetrievalFeatures", "Shortlists", "TEXT_LENGTH",
    "VC_LENGTH", "compute_features", "describe", "encode_image_batches", "encode_text_batches", "evaluate_retrieval",
    "grouped_fusion", "itm_eval", "pack_pairs", "pairs_scored", "rank_rows", "score_matrices", "score_matrices_per_query",
    "shortlists",
]
