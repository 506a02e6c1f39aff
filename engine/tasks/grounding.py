"""Weakly supervised RefCOCO+ grounding (Grounding.py, pipeline.md §3.7, §6.5; models.md §4.2).

Training is the retrieval objective on (referring expression, image) pairs, with every expression of
one image file positive for the others. Boxes are never seen in training. Evaluation predicts a box
per expression: Grad-CAM of the ITM "match" logit on the cross-attention of one fusion layer gives
a heat map over the ViT patch grid, which is upsampled to the image size and used to pick the
detector proposal with the highest ``sum(heat in box) / area ** 0.5``; the prediction is correct
when its IoU with the annotated box is at least 0.5. Accuracies are reported per split
(``val_d``, ``testA_d``, ``testB_d``, fractions).

This module also holds a small reader of the REFER files (``refs(unc).p`` + ``instances.json``) in
place of the original's ``refTools``.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

import utils
from dataset import create_dataset, create_loader, create_sampler, load_json
from engine.config import get_option
from engine.retrieval_eval import VC_LENGTH
from engine.tasks.base import TokenizingCollate
from engine.tasks.retrieval import CAPTION, VISUAL_CONCEPTS, RetrievalTask
from models.tokenization import TokenBatch, ViCHATokenizer

SPLITS = ("val", "testA", "testB")
DEFAULT_BLOCK_NUM = 8  # the third fusion layer of the 12-layer BERT (fusion_layer 6)
IOU_THRESHOLD = 0.5
BOX_AREA_EXPONENT = 0.5  # the original's alpha: box score = heat sum / area ** 0.5


# ----------------------------------------------------------------------------------------------
# REFER files


class RefReader:
    """Index of ``<root>/<dataset>/refs(<split_by>).p`` and ``instances.json`` (the REFER API subset used).

    ``refs``: ref_id -> ref (ref_id, ann_id, image_id, category_id, split, sentences);
    ``anns``: ann_id -> annotation (bbox [x, y, w, h]); ``imgs``: image_id -> image (height, width);
    ``ref_to_ann``: ref_id -> its annotation; ``cats``: category_id -> name.
    """

    def __init__(self, data_root: str, dataset: str = "refcoco+", split_by: str = "unc") -> None:
        folder = os.path.join(data_root, dataset)
        refs_path = os.path.join(folder, f"refs({split_by}).p")
        instances_path = os.path.join(folder, "instances.json")
        for path in (refs_path, instances_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"REFER file not found: {path} (--data_json_dir must hold {dataset}/)")
        with open(refs_path, "rb") as handle:
            refs = pickle.load(handle)
        instances = load_json(instances_path)
        for key in ("images", "annotations", "categories"):
            if key not in instances:
                raise ValueError(f"{instances_path} has no '{key}' list")
        self.imgs: dict[int, dict] = {img["id"]: img for img in instances["images"]}
        self.anns: dict[int, dict] = {ann["id"]: ann for ann in instances["annotations"]}
        self.cats: dict[int, str] = {cat["id"]: cat["name"] for cat in instances["categories"]}
        self.refs: dict[int, dict] = {}
        self.ref_to_ann: dict[int, dict] = {}
        for ref in refs:
            for key in ("ref_id", "ann_id", "image_id", "split", "sentences"):
                if key not in ref:
                    raise ValueError(f"{refs_path}: a ref lacks '{key}' ({ref.get('ref_id', '?')})")
            if ref["ann_id"] not in self.anns:
                raise ValueError(f"{refs_path}: ref {ref['ref_id']} points to annotation {ref['ann_id']}, "
                                 f"which {instances_path} does not have")
            self.refs[ref["ref_id"]] = ref
            self.ref_to_ann[ref["ref_id"]] = self.anns[ref["ann_id"]]

    def ref_ids(self, split: Optional[str] = None) -> list[int]:
        """Every ref id, or those of one split (train, val, testA, testB)."""
        return [ref_id for ref_id, ref in self.refs.items() if split is None or ref["split"] == split]

    def box(self, ref_id: int) -> list[float]:
        """Ground-truth box [x, y, w, h] of a referring expression."""
        return list(self.ref_to_ann[ref_id]["bbox"])

    def image(self, ref_id: int) -> dict:
        """The COCO image record (id, height, width, ...) of a referring expression."""
        return self.imgs[self.refs[ref_id]["image_id"]]


# ----------------------------------------------------------------------------------------------
# Boxes


def compute_iou(box1: Sequence[float], box2: Sequence[float]) -> float:
    """IoU of [x, y, w, h] boxes with inclusive pixel corners (x + w - 1), as the original.

    The intersection counts only if its corners are strictly ordered (x1 < x2 and y1 < y2).
    """
    ix1, iy1 = max(box1[0], box2[0]), max(box1[1], box2[1])
    ix2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    iy2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0
    return float(inter) / (box1[2] * box1[3] + box2[2] * box2[3] - inter)


def upsample_heatmap(heatmap: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(g, g) map -> (height, width), bicubic with align_corners=False."""
    grid = heatmap.float().view(1, 1, *heatmap.shape[-2:])
    return F.interpolate(grid, size=(int(height), int(width)), mode="bicubic", align_corners=False)[0, 0]


def box_scores(heatmap: torch.Tensor, boxes: Sequence[Sequence[float]], exponent: float = BOX_AREA_EXPONENT) -> list[float]:
    """``sum(heatmap[int(y):int(y+h), int(x):int(x+w)]) / (w*h) ** exponent`` per [x, y, w, h, ...] box."""
    scores = []
    for box in boxes:
        x, y, w, h = box[:4]
        scores.append(float(heatmap[int(y):int(y + h), int(x):int(x + w)].sum()) / (w * h) ** exponent)
    return scores


def select_box(heatmap: torch.Tensor, boxes: Sequence[Sequence[float]],
               exponent: float = BOX_AREA_EXPONENT) -> Optional[list[float]]:
    """The highest-scoring proposal (first of equals); None when there is no proposal.

    As the original, only a score strictly above 0 can win. When no box scores above 0 the
    original kept the previous expression's box (or crashed on the first); here the first proposal
    is returned instead (pipeline.md §10 B5).
    """
    if not boxes:
        return None
    best_score, best = 0.0, None
    for box, score in zip(boxes, box_scores(heatmap, boxes, exponent)):
        if score > best_score:
            best_score, best = score, box
    return list((best if best is not None else boxes[0])[:4])


def grounding_eval(results: Sequence[dict], dets: dict[str, list], refer: RefReader,
                   exponent: float = BOX_AREA_EXPONENT) -> dict[str, float]:
    """Accuracy (IoU >= 0.5) per split from ``[{'ref_id', 'pred': (g, g) heat map}]``.

    Keys ``val_d``, ``testA_d``, ``testB_d`` (fractions); a split without results gives 0.0. An
    image without proposals counts as a miss (the original crashed).
    """
    correct = {split: 0 for split in SPLITS}
    total = {split: 0 for split in SPLITS}
    for result in results:
        ref_id = int(result["ref_id"])
        if ref_id not in refer.refs:
            raise KeyError(f"ref_id {ref_id} is not in the REFER refs file")
        ref = refer.refs[ref_id]
        if ref["split"] not in total:
            continue
        image = refer.imgs[ref["image_id"]]
        heatmap = upsample_heatmap(result["pred"], image["height"], image["width"])
        box = select_box(heatmap, dets.get(str(ref["image_id"]), []), exponent)
        total[ref["split"]] += 1
        if box is not None and compute_iou(refer.box(ref_id), box) >= IOU_THRESHOLD:
            correct[ref["split"]] += 1
    return {f"{split}_d": (correct[split] / total[split] if total[split] else 0.0) for split in SPLITS}


def candidate_box_chance(refer: RefReader, dets: dict[str, list], split: str = "val") -> float:
    """Accuracy of picking a proposal uniformly at random: mean fraction of proposals with IoU >= 0.5."""
    fractions = []
    for ref_id in refer.ref_ids(split):
        boxes = dets.get(str(refer.refs[ref_id]["image_id"]), [])
        hits = sum(compute_iou(refer.box(ref_id), box[:4]) >= IOU_THRESHOLD for box in boxes)
        fractions.append(hits / len(boxes) if boxes else 0.0)
    return sum(fractions) / max(1, len(fractions))


# ----------------------------------------------------------------------------------------------
# Grad-CAM


def check_block_num(model: nn.Module, block_num: int) -> None:
    """The Grad-CAM layer must be a fusion layer (it needs cross-attention)."""
    config = model.text_bert.config
    if not config.fusion_layer <= block_num < config.num_hidden_layers:
        raise ValueError(
            f"--block_num {block_num} is not a fusion layer of this text encoder: choose "
            f"{config.fusion_layer}..{config.num_hidden_layers - 1} (fusion_layer {config.fusion_layer}, "
            f"{config.num_hidden_layers} layers)"
        )


def gradcam_maps(model: nn.Module, image: torch.Tensor, vc: TokenBatch, text: TokenBatch,
                 block_num: int) -> torch.Tensor:
    """Grad-CAM of the summed ITM match logits on layer ``block_num``'s cross-attention; (B, g, g).

    ``cam`` (attention probabilities) and ``grad`` (their gradient, clamped at 0) are taken over the
    patch keys only (image [CLS] and the VC tokens dropped), reshaped to the ViT grid, zeroed at
    padded text positions, and ``cam * grad`` is averaged over heads, then over all text positions
    (padding included in the count, as the original). Parameters receive no gradient.
    """
    check_block_num(model, block_num)
    attention = model.text_bert.encoder.layer[block_num].crossattention.self
    attention.save_attention = True  # explicit attention path that keeps the probabilities
    try:
        with torch.enable_grad():
            image_embeds, image_mask = model.encode_image(image, vc)  # (B, 1+N+Lk, D)
            out = model.text_bert(text.input_ids, text.attention_mask, encoder_hidden_states=image_embeds,
                                  encoder_attention_mask=image_mask, mode="multi_modal")
            score = model.itm_head(out.last_hidden_state[:, 0])[:, 1].sum()
            cams = attention.get_attention_map()  # (B, nh, Lq, 1+N+Lk)
            (grads,) = torch.autograd.grad(score, cams)
    finally:
        attention.save_attention = False
        attention.attention_map = attention.attn_gradients = None
    grid = model.visual_encoder.grid_size
    patches = grid * grid
    if cams.shape[-1] != 1 + patches + vc.input_ids.shape[1]:
        raise ValueError(f"cross-attention over {cams.shape[-1]} image tokens, expected 1 + {patches} patches + "
                         f"{vc.input_ids.shape[1]} VC tokens")
    batch, heads, length, _ = cams.shape
    mask = text.attention_mask.view(batch, 1, length, 1, 1).to(cams.dtype)
    cams = cams[..., 1:1 + patches].reshape(batch, heads, length, grid, grid) * mask
    grads = grads[..., 1:1 + patches].clamp(min=0).reshape(batch, heads, length, grid, grid) * mask
    return (cams * grads).mean(dim=1).mean(dim=1).detach().float()  # (B, g, g)


def check_vit_block_num(model: nn.Module, block_num: int) -> None:
    """The 'itc' Grad-CAM layer must be a ViT block (it reads the block's self-attention)."""
    depth = len(model.visual_encoder.blocks)
    if not 0 <= block_num < depth:
        raise ValueError(f"--block_num {block_num} is not a ViT block of this image encoder ('itc' Grad-CAM): "
                         f"choose 0..{depth - 1}")


def itc_gradcam_maps(model: nn.Module, image: torch.Tensor, vc: TokenBatch, text: TokenBatch,
                     block_num: int) -> torch.Tensor:
    """Grad-CAM of the summed matched ITC similarities on ViT block ``block_num``'s self-attention; (B, g, g).

    The 'itc' mode of pipeline.md §6.5 (upstream it read an attribute no released model defines, §10 B1;
    here with every VC switch off). The score is ``sum_i <image_i, text_i> / temp`` of the normalised
    projected [CLS] features (text encoder in text mode). The map is the image [CLS] query's row of
    the block's attention probabilities over the patch keys (image [CLS] and VC tokens dropped) times
    its gradient clamped at 0, averaged over heads. The block runs timm's explicit attention for the
    call; its probabilities are read where they enter the (identity, in eval) attention dropout.
    """
    check_vit_block_num(model, block_num)
    attention = model.visual_encoder.blocks[block_num].attn
    recorded: list[torch.Tensor] = []
    hook = attention.attn_drop.register_forward_hook(lambda module, inputs, output: recorded.append(output))
    fused, attention.fused_attn = attention.fused_attn, False
    try:
        with torch.enable_grad():
            image_embeds, _ = model.encode_image(image, vc)  # (B, 1+N+Lk, D)
            text_cls = model.text_bert(text.input_ids, text.attention_mask, mode="text").last_hidden_state[:, 0]
            image_feat = F.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1)
            text_feat = F.normalize(model.text_proj(text_cls), dim=-1)
            score = ((image_feat * text_feat).sum(dim=-1) / model.temp).sum()  # diagonal of the similarities
            if len(recorded) != 1:
                raise RuntimeError(f"ViT block {block_num} recorded {len(recorded)} attention maps, expected 1")
            (grads,) = torch.autograd.grad(score, recorded[0])
    finally:
        hook.remove()
        attention.fused_attn = fused
    grid = model.visual_encoder.grid_size
    patches = grid * grid
    cams = recorded[0][:, :, 0, 1:1 + patches]  # (B, heads, N): the image [CLS] row over the patch keys
    grads = grads[:, :, 0, 1:1 + patches].clamp(min=0)
    return (cams * grads).mean(dim=1).reshape(-1, grid, grid).detach().float()


class GroundingEvalCollate:
    """``((image, vc), text, ref_id)`` items -> (images, vc padded to 55, text padded to the longest, ref_ids).

    The expression is not truncated; the VC length must be fixed so the VC tokens can be cut off
    the attention map by position.
    """

    def __init__(self, tokenizer: ViCHATokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: list) -> tuple[torch.Tensor, TokenBatch, TokenBatch, torch.Tensor]:
        (images, vc_strings), texts, ref_ids = default_collate(samples)
        vc = self.tokenizer(list(vc_strings), padding="max_length", truncation=True, max_length=VC_LENGTH)
        text = self.tokenizer(list(texts), padding="longest", truncation=False)
        return images, vc, text, torch.as_tensor(ref_ids)


# ----------------------------------------------------------------------------------------------
# Task


def resolve_block_num(flag: Optional[int], config: dict) -> int:
    """--block_num, else the config's ``block_num``, else 8 (the original default)."""
    if flag is not None:
        return flag
    return config["block_num"] if config.get("block_num") is not None else DEFAULT_BLOCK_NUM


# --gradcam_mode -> map function: ITM score on a fusion layer's cross-attention (default), or the ITC
# similarity on a ViT block's self-attention.
GRADCAM_MODES = {"itm": gradcam_maps, "itc": itc_gradcam_maps}


class GroundingTask(RetrievalTask):
    """Retrieval training on expressions (idx = image file index); Grad-CAM box accuracy per split."""

    name = "grounding"
    script = "Grounding"
    dataset_name = "grounding"
    checkpoint_policy = "best"  # checkpoint_best.pth on a new best val_d
    log_best_epoch = False  # Grounding.py writes no "best epoch" line

    def __init__(self, gradcam_mode: str = "itm", block_num: Optional[int] = None) -> None:
        if gradcam_mode not in GRADCAM_MODES:
            raise ValueError(f"--gradcam_mode {gradcam_mode!r}: expected one of {sorted(GRADCAM_MODES)}")
        self.gradcam_mode = gradcam_mode
        self.block_num = block_num

    def build_datasets(self, config: dict, args: Any) -> dict:
        train, test = create_dataset(self.dataset_name, config, args.data_dir)
        self.refer = RefReader(config["refcoco_data"])
        self.dets = load_json(config["det_file"])
        return {"train": train, "test": test}

    def build_loaders(self, datasets: dict, config: dict, args: Any, tokenizer: ViCHATokenizer) -> dict:
        self.tokenizer = tokenizer
        # The test sampler does not shuffle; like the original it pads with repeats to a multiple of the world size.
        samplers = create_sampler([datasets["train"], datasets["test"]], [True, False], utils.get_world_size(),
                                  utils.get_rank(), seed=args.seed)
        workers = get_option(config, "num_workers")
        train_loader, test_loader = create_loader(
            [datasets["train"], datasets["test"]], samplers, [config["batch_size"], config["batch_size"]],
            [workers, workers], [True, False],
            [TokenizingCollate(tokenizer, 1, (CAPTION, VISUAL_CONCEPTS)), GroundingEvalCollate(tokenizer)])
        return {"train": train_loader, "test": test_loader}

    def evaluate(self, model: nn.Module, loaders: dict, config: dict, args: Any, epoch: int,
                 device: torch.device) -> dict:
        model.eval()
        block_num = resolve_block_num(self.block_num, config)
        gradcam = GRADCAM_MODES[self.gradcam_mode]  # checks block_num against the model at its first call
        bf16 = bool(config.get("bf16", False))
        results: list[dict] = []
        logger = utils.MetricLogger(delimiter="  ")
        for images, vc, text, ref_ids in logger.log_every(loaders["test"], get_option(config, "print_freq"),
                                                          "Evaluation (Grad-CAM):"):
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                maps = gradcam(model, images.to(device), vc.to(device), text.to(device), block_num)
            results += [{"ref_id": int(r), "pred": m.cpu()} for r, m in zip(ref_ids.tolist(), maps)]
        gathered = [item for part in utils.all_gather_object(results) for item in part]
        if not utils.is_main_process():
            return {}
        result_dir = os.path.join(args.output_dir, "result")
        os.makedirs(result_dir, exist_ok=True)
        utils.atomic_save(gathered, os.path.join(result_dir, f"epoch{epoch}.pth"))
        metrics = grounding_eval(gathered, self.dets, self.refer)
        print("grounding accuracy: " + json.dumps({k: round(v, 3) for k, v in metrics.items()}))
        return metrics

    def selection_metric(self, metrics: dict) -> Optional[float]:
        return metrics.get("val_d")
