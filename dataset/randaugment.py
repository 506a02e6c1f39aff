"""RandAugment on HWC uint8 arrays with OpenCV/NumPy, as the original (spec pipeline §4.6).

Every op takes an (H, W, C) uint8 array and returns one of the same shape and dtype. Random draws
use NumPy's global generator, as the original does; PyTorch seeds it per DataLoader worker.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image

MAX_LEVEL = 10
FILL = (128, 128, 128)
DEFAULT_AUGS = (
    "Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
    "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
)


def identity(img: np.ndarray) -> np.ndarray:
    return img


def _per_channel_lut(img: np.ndarray, make_table: Callable[[np.ndarray], np.ndarray | None]) -> np.ndarray:
    """Apply a per-channel 256-entry lookup table; `make_table` returns None to keep the channel."""
    out = img.copy()
    for c in range(img.shape[2]):
        table = make_table(img[:, :, c])
        if table is not None:
            out[:, :, c] = table[img[:, :, c]]
    return out


def autocontrast(img: np.ndarray, upstream_wrap: bool = True) -> np.ndarray:
    """Per-channel linear stretch (cutoff 0), by default exactly as the original computes it.

    The intended stretch maps each channel's min to 0 and max to 255 (the spec's formula,
    ``upstream_wrap=False``, config ``fix_autocontrast: true``). The original negates the channel
    minimum as a NumPy uint8 scalar, so ``-low`` wraps to ``256 - low`` and every channel whose
    minimum is above 0 comes out all 255; channels with minimum 0 are stretched as intended.
    """
    def table(ch: np.ndarray) -> np.ndarray | None:
        low, high = int(ch.min()), int(ch.max())
        if high <= low:
            return None
        scale = 255.0 / (high - low)
        negated_low = (-low) % 256 if upstream_wrap else -low
        return np.clip(np.arange(256) * scale + negated_low * scale, 0, 255).astype(np.uint8)

    return _per_channel_lut(img, table)


def equalize(img: np.ndarray) -> np.ndarray:
    """Histogram equalisation per channel, identical to PIL.ImageOps.equalize."""
    def table(ch: np.ndarray) -> np.ndarray | None:
        hist = np.bincount(ch.ravel(), minlength=256).astype(np.int64)
        nonzero = hist[hist != 0]
        step = int(nonzero[:-1].sum()) // 255
        if step == 0:
            return None
        cumulative = np.concatenate(([0], np.cumsum(hist[:-1])))
        return np.clip((step // 2 + cumulative) // step, 0, 255).astype(np.uint8)

    return _per_channel_lut(img, table)


def brightness(img: np.ndarray, factor: float) -> np.ndarray:
    """Scale every value by `factor` through a float32 lookup table, clipped and truncated."""
    table = np.clip(np.arange(256, dtype=np.float32) * np.float32(factor), 0, 255).astype(np.uint8)
    return table[img]


def sharpness(img: np.ndarray, factor: float) -> np.ndarray:
    """Blend with a smoothed copy, interior pixels only; out-of-range values wrap (as upstream).

    The original casts float32 to uint8 without clipping, which on common platforms truncates
    towards zero and wraps modulo 256; that is written out explicitly here so it is portable.
    """
    kernel = np.ones((3, 3), dtype=np.float32)
    kernel[1, 1] = 5
    kernel /= 13
    degenerate = cv2.filter2D(img, -1, kernel)
    if factor == 0.0:
        return degenerate
    if factor == 1.0:
        return img
    out = img.astype(np.float32)
    deg = degenerate.astype(np.float32)[1:-1, 1:-1]
    out[1:-1, 1:-1] = deg + np.float32(factor) * (out[1:-1, 1:-1] - deg)
    return (np.trunc(out).astype(np.int64) % 256).astype(np.uint8)


def _warp(img: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    height, width = img.shape[:2]
    return cv2.warpAffine(img, matrix, (width, height), flags=cv2.INTER_LINEAR, borderValue=FILL)


def shear_x(img: np.ndarray, shear: float) -> np.ndarray:
    """Forward map x' = x + shear * y (no re-centring), border filled with grey."""
    return _warp(img, np.float32([[1, shear, 0], [0, 1, 0]]))


def shear_y(img: np.ndarray, shear: float) -> np.ndarray:
    return _warp(img, np.float32([[1, 0, 0], [shear, 1, 0]]))


def translate_x(img: np.ndarray, offset: float) -> np.ndarray:
    """Move the content by -offset pixels horizontally."""
    return _warp(img, np.float32([[1, 0, -offset], [0, 1, 0]]))


def translate_y(img: np.ndarray, offset: float) -> np.ndarray:
    return _warp(img, np.float32([[1, 0, 0], [0, 1, -offset]]))


def rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate about (W/2, H/2), counter-clockwise for positive angles, same output size."""
    height, width = img.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1)
    return _warp(img, matrix)


OPS: dict[str, Callable[..., np.ndarray]] = {
    "Identity": identity,
    "AutoContrast": autocontrast,
    "Equalize": equalize,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Rotate": rotate,
}


def _random_sign(value: float) -> float:
    return -value if np.random.random() > 0.5 else value


def level_to_args(name: str, level: float) -> tuple[float, ...]:
    """Map a magnitude level (0..MAX_LEVEL) to an op's arguments; signed ops draw their sign here."""
    if name in ("Brightness", "Sharpness"):
        return ((level / MAX_LEVEL) * 1.8 + 0.1,)
    if name in ("ShearX", "ShearY"):
        return (_random_sign((level / MAX_LEVEL) * 0.3),)
    if name in ("TranslateX", "TranslateY"):
        return (_random_sign((level / MAX_LEVEL) * 10.0),)
    if name == "Rotate":
        return (_random_sign((level / MAX_LEVEL) * 30),)
    return ()


class RandomAugment:
    """Pick `N` ops (with replacement) and apply each with probability 0.5 at magnitude `M`.

    Takes a PIL image (`isPIL=True`) or an HWC uint8 array and returns an HWC uint8 array,
    which `torchvision.transforms.ToTensor` accepts.
    """

    def __init__(self, N: int = 2, M: int = 7, isPIL: bool = True, augs: Sequence[str] = DEFAULT_AUGS,
                 fix_autocontrast: bool = False) -> None:
        unknown = [name for name in augs if name not in OPS]
        if unknown:
            raise ValueError(f"unknown RandAugment ops {unknown}; known: {sorted(OPS)}")
        self.N = N
        self.M = M
        self.isPIL = isPIL
        self.augs = list(augs)
        self.fix_autocontrast = fix_autocontrast
        # partial of a module-level function: picklable for DataLoader workers
        self.ops = {**OPS, "AutoContrast": partial(autocontrast, upstream_wrap=not fix_autocontrast)}

    def __call__(self, img: Image.Image | np.ndarray) -> np.ndarray:
        if self.isPIL:
            img = np.array(img)
        for name in np.random.choice(self.augs, self.N):
            if np.random.random() > 0.5:
                continue
            img = self.ops[name](img, *level_to_args(name, self.M))
        return img

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(N={self.N}, M={self.M}, augs={self.augs}, "
                f"fix_autocontrast={self.fix_autocontrast})")
