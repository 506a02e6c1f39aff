"""Step 6: CLIP image-text similarity filtering (spec §5.6) and the 800K-image recipe (§5.7).

`sim` of a record = cosine(CLIP image embedding, CLIP caption embedding). Two filters:
- global (`filter_dataset_percentage.py`): sort every scored pair by `sim`, descending, and keep
  the first `int(per * N)`; output in that sorted order;
- per image (`filter_dataset_per_image.py`): group records by `image` (first-appearance order),
  sort each group by `sim`, keep `int(per * len(group))` of it: the floor is kept [R], so an image
  with fewer than `1 / per` captions loses all of them.
Records whose caption is not a string or lacks an embedding, or whose image lacks one, get no
`sim`; the original then crashed while sorting, here they are counted and left out.
Similarities are computed in chunks of records, so memory does not grow with the dataset.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from .assign import lookup_key
from .embeddings import EmbeddingStore
from .topk import normalized, resolve_dtype

# The "ViCHA (800K)" subset (README): all of COCO, 50 % of the captions of every VG image, and
# the best 70 % of SBU pairs. `recipe_per` gives each filter script its `per` under --recipe 800k.
RECIPE_800K = {
    'coco': None,
    'vg': ('per_image', 0.5),
    'sbu': ('percentage', 0.7),
}


def recipe_per(recipe: str, kind: str) -> float:
    """The `per` of the filter `kind` ('per_image' or 'percentage') in a named recipe."""
    if recipe != '800k':
        raise ValueError(f"unknown recipe {recipe!r}; known: 800k")
    for step in RECIPE_800K.values():
        if step is not None and step[0] == kind:
            return step[1]
    raise ValueError(f"recipe {recipe!r} has no {kind} step")


def pair_similarities(records: Sequence[dict], captions: EmbeddingStore, images: EmbeddingStore,
                      *, image_root: Optional[str] = None, chunk_size: int = 65536,
                      device: str = 'cpu', dtype: str = 'auto') -> Tuple[np.ndarray, Counter]:
    """`sim` per record (NaN where it cannot be computed) and the count of each skip reason."""
    if captions.dim != images.dim:
        raise ValueError(f"caption embeddings have dimension {captions.dim} but image embeddings "
                         f"{images.dim}: were they made with the same CLIP?")
    reasons: Counter = Counter()
    img_rows = np.full(len(records), -1, dtype=np.int64)
    cap_rows = np.full(len(records), -1, dtype=np.int64)
    cap_index, img_index = captions.index, images.index
    for i, record in enumerate(records):
        caption, image = record.get('caption'), record.get('image')
        if not isinstance(caption, str):
            reasons['caption missing or not a string'] += 1
        elif not isinstance(image, str):
            reasons['image field missing'] += 1
        elif caption not in cap_index:
            reasons['no caption embedding'] += 1
        elif lookup_key(image, image_root) not in img_index:
            reasons['no image embedding'] += 1
        else:
            cap_rows[i] = cap_index[caption]
            img_rows[i] = img_index[lookup_key(image, image_root)]
    sims = np.full(len(records), np.nan, dtype=np.float32)
    scored = np.flatnonzero(img_rows >= 0)
    dev = torch.device(device)
    tdtype = resolve_dtype(dtype, dev)
    with torch.inference_mode():
        for start in tqdm(range(0, len(scored), chunk_size), desc='image-text similarity',
                          unit='chunk'):
            sel = scored[start:start + chunk_size]
            # Sorted row reads are sequential on a memory map; restore the record order after.
            order = np.argsort(img_rows[sel], kind='stable')
            img = normalized(images.matrix[img_rows[sel][order]], dev, tdtype)
            cap = normalized(captions.matrix[cap_rows[sel][order]], dev, tdtype)
            sim = (img * cap).sum(dim=1).float().cpu().numpy()
            sims[sel[order]] = sim
    return sims, reasons


def existing_similarities(records: Sequence[dict]) -> Tuple[np.ndarray, Counter]:
    """`sim` already stored in the records (re-filtering a scored file, no embeddings needed)."""
    reasons: Counter = Counter()
    sims = np.full(len(records), np.nan, dtype=np.float32)
    for i, record in enumerate(records):
        value = record.get('sim')
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            sims[i] = value
        else:
            reasons['no sim field'] += 1
    return sims, reasons


def _check_per(per: float) -> None:
    if not 0.0 <= per <= 1.0:
        raise ValueError(f"per must be a fraction in [0, 1], got {per}")


def _with_sim(record: dict, sim: float) -> dict:
    out = dict(record)
    out['sim'] = float(sim)
    return out


def filter_percentage(records: Sequence[dict], sims: np.ndarray, per: float) -> List[dict]:
    """All scored records sorted by `sim` descending (ties keep file order); the first int(per * N)."""
    _check_per(per)
    scored = np.flatnonzero(~np.isnan(sims))
    order = scored[np.argsort(-sims[scored], kind='stable')]
    keep = order[:int(per * len(scored))]
    return [_with_sim(records[i], sims[i]) for i in keep]


def filter_per_image(records: Sequence[dict], sims: np.ndarray, per: float) -> List[dict]:
    """Per image (first-appearance order): its records by `sim` descending, floor(per * n) kept."""
    _check_per(per)
    groups: Dict[str, List[int]] = {}
    for i, record in enumerate(records):
        if not np.isnan(sims[i]):
            groups.setdefault(record['image'], []).append(i)
    out: List[dict] = []
    for members in groups.values():
        members = np.asarray(members)
        ranked = members[np.argsort(-sims[members], kind='stable')]
        out.extend(_with_sim(records[i], sims[i]) for i in ranked[:int(per * len(members))])
    return out
