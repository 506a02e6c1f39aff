"""Inputs for the embedding steps: which keys to embed, where images are on disk, and the
batched encoders that `embeddings.embed_sharded` drives (a DataLoader with workers for images)."""
from __future__ import annotations

import os
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .clip_model import ClipEncoder
from .embeddings import EncodeFn


def image_fields(record: dict, nlvr: bool = False) -> List[Optional[str]]:
    """Image strings of a record: `image`, or both entries of NLVR2's `images`."""
    if nlvr:
        images = record.get('images')
        if not isinstance(images, list) or len(images) != 2:
            return [None, None]
        return [i if isinstance(i, str) else None for i in images]
    image = record.get('image')
    return [image if isinstance(image, str) else None]


def unique_image_keys(records: Sequence[dict], nlvr: bool = False) -> Tuple[List[str], int]:
    """Distinct image strings in order of first appearance, and how many records lack one."""
    seen = {}
    lacking = 0
    for record in records:
        fields = image_fields(record, nlvr)
        if any(f is None for f in fields):
            lacking += 1
        for f in fields:
            if f is not None:
                seen.setdefault(f, None)
    return list(seen), lacking


def image_file(key: str, image_root: Optional[str] = None, data_dir: Optional[str] = None,
               ext: str = '') -> str:
    """Where an image string lives on disk (the key itself never changes).

    `data_dir` applies the pretraining rewrite (spec §4.2.1): drop the first four `/`-separated
    components of an absolute path and join the rest to `data_dir`. Otherwise the string is joined
    to `image_root` when given. `ext` is appended to the path (SNLI-VE stores ids without `.jpg`).
    """
    if data_dir is not None:
        path = os.path.join(data_dir, '/'.join(key.split('/')[4:]))
    elif image_root is not None:
        path = os.path.join(image_root, key)
    else:
        path = key
    return path + ext


class ImageFiles(Dataset):
    """Preprocessed images by path; an unreadable file gives a zero image and `ok = False`."""

    def __init__(self, paths: Sequence[str], transform, image_size: Tuple[int, int]):
        self.paths = list(paths)
        self.transform = transform
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, bool]:
        try:
            with Image.open(self.paths[i]) as img:
                return self.transform(img.convert('RGB')), True
        except (OSError, ValueError, Image.DecompressionBombError):
            return torch.zeros(3, *self.image_size), False


def image_encoder(clip: ClipEncoder, paths: Sequence[str], batch_size: int = 256,
                  num_workers: int = 8) -> EncodeFn:
    """EncodeFn over `paths` (indexed like the keys): decode in worker processes, encode in batches."""

    def encode(span: range) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        data = ImageFiles([paths[i] for i in span], clip.preprocess, clip.image_size)
        loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                            pin_memory=clip.device.type == 'cuda')
        for images, ok in loader:
            ok = ok.numpy().astype(bool)
            emb = np.zeros((len(ok), clip.dim), dtype=np.float32)
            if ok.any():
                emb[ok] = clip.encode_images(images[torch.from_numpy(ok)])
            yield emb, ok

    return encode


def text_encoder(clip: ClipEncoder, texts: Sequence[str], batch_size: int = 1024) -> EncodeFn:
    """EncodeFn over strings (concepts or captions), tokenised as-is in batches."""

    def encode(span: range) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        for start in range(span.start, span.stop, batch_size):
            batch = [texts[i] for i in range(start, min(start + batch_size, span.stop))]
            yield clip.encode_texts(batch), np.ones(len(batch), dtype=bool)

    return encode
