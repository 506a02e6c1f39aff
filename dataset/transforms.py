"""Image transforms for every split (spec pipeline §4.5): bicubic resizing and CLIP normalisation."""

from __future__ import annotations

from typing import Optional

from torchvision import transforms
from torchvision.transforms import InterpolationMode

from .randaugment import RandomAugment

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TRANSFORM_KINDS = ("pretrain", "train", "grounding_train", "test")


def build_transform(kind: str, image_res: int, crop_min_scale: Optional[float] = None,
                    horizontal_flip: bool = True, fix_autocontrast: bool = False) -> transforms.Compose:
    """Return the torchvision pipeline `kind` at resolution `image_res` (picklable for workers).

    pretrain / train: RandomResizedCrop (scale 0.2-1 / 0.5-1) + flip + RandAugment(2, 7);
    grounding_train: square Resize + flip + RandAugment (no crop, boxes must stay in frame);
    test: square Resize only (aspect ratio not kept).
    `crop_min_scale` replaces the crop's smallest area fraction and `horizontal_flip=False` drops the
    flip (config keys of the same names; the defaults are the original's). Crops that cut objects
    out and flips that swap left and right make texts that name objects or sides false.
    `fix_autocontrast=True` gives RandAugment's AutoContrast the intended stretch instead of the
    original's (which whitens every channel whose minimum is above 0; see randaugment.autocontrast).
    """
    bicubic = InterpolationMode.BICUBIC
    if crop_min_scale is not None and not 0.0 < crop_min_scale <= 1.0:
        raise ValueError(f"crop_min_scale must be in (0, 1], got {crop_min_scale}")
    flip = [transforms.RandomHorizontalFlip()] if horizontal_flip else []
    if kind in ("pretrain", "train"):
        low = crop_min_scale if crop_min_scale is not None else (0.2 if kind == "pretrain" else 0.5)
        steps = [
            transforms.RandomResizedCrop(image_res, scale=(low, 1.0), interpolation=bicubic),
            *flip,
            RandomAugment(2, 7, isPIL=True, fix_autocontrast=fix_autocontrast),
        ]
    elif kind == "grounding_train":
        steps = [
            transforms.Resize((image_res, image_res), interpolation=bicubic),
            *flip,
            RandomAugment(2, 7, isPIL=True, fix_autocontrast=fix_autocontrast),
        ]
    elif kind == "test":
        steps = [transforms.Resize((image_res, image_res), interpolation=bicubic)]
    else:
        raise ValueError(f"unknown transform kind {kind!r}; expected one of {TRANSFORM_KINDS}")
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)])
