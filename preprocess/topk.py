"""Top-k concept assignment (spec §5.4), streamed over images in chunks.

For each image: cosine similarity to every concept (both L2-normalised), then the k most
similar concepts, most similar first. No threshold and no de-duplication, as the original.
Only one chunk of images is on the device at a time, so memory is bounded by
`chunk_size x num_concepts` similarities plus the concept matrix, never images x concepts.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

DTYPE_NAMES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is float16 on CUDA (the original cast to fp16 on the GPU) and float32 on CPU."""
    if dtype == 'auto':
        return torch.float16 if device.type == 'cuda' else torch.float32
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
    return DTYPE_NAMES[dtype]


def normalized(matrix: Union[np.ndarray, torch.Tensor], device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    """Rows L2-normalised in float32, then cast to `dtype` on `device`."""
    # np.array copies: a read-only memory map cannot back a tensor (PyTorch warns); the copy is float32
    # anyway, as the normalisation needs it
    t = matrix if torch.is_tensor(matrix) else torch.from_numpy(np.array(matrix, dtype=np.float32))
    return F.normalize(t.to(device=device, dtype=torch.float32), dim=-1).to(dtype)


def iter_topk(images: np.ndarray, concepts: np.ndarray, k: int, *, chunk_size: int = 4096,
              rows: Optional[np.ndarray] = None, device: Union[str, torch.device] = 'cpu',
              dtype: str = 'auto', progress: bool = True,
              ) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
    """Yield `(offset, indices (b, k) int32, scores (b, k) float32)` per chunk of images.

    `images` is (N, D), typically a memory map; `rows` optionally selects which of its rows to
    score (in that order), so only the needed embeddings are ever read.
    """
    num_concepts = concepts.shape[0]
    if num_concepts == 0:
        raise ValueError("the concept vocabulary is empty: nothing to assign")
    if not 1 <= k <= num_concepts:
        raise ValueError(f"k={k} must be between 1 and the vocabulary size {num_concepts}")
    if concepts.shape[1] != images.shape[1]:
        raise ValueError(f"image embeddings have dimension {images.shape[1]} but concept "
                         f"embeddings {concepts.shape[1]}: were they made with the same CLIP?")
    if chunk_size < 1:
        raise ValueError(f"chunk size must be >= 1, got {chunk_size}")
    device = torch.device(device)
    tdtype = resolve_dtype(dtype, device)
    concept_t = normalized(concepts, device, tdtype).t().contiguous()  # (D, V)
    total = len(rows) if rows is not None else images.shape[0]
    with torch.inference_mode(), tqdm(total=total, desc='top-k concepts', unit='img',
                                      disable=not progress) as bar:
        for start in range(0, total, chunk_size):
            stop = min(start + chunk_size, total)
            block = images[rows[start:stop]] if rows is not None else images[start:stop]
            sims = normalized(block, device, tdtype) @ concept_t  # (b, V) cosine similarities
            scores, idx = sims.topk(k, dim=1)  # sorted, most similar first
            yield (start, idx.to(torch.int32).cpu().numpy(),
                   scores.float().cpu().numpy())
            bar.update(stop - start)


def assign_topk(images: np.ndarray, concepts: np.ndarray, k: int, *, chunk_size: int = 4096,
                rows: Optional[np.ndarray] = None, device: Union[str, torch.device] = 'cpu',
                dtype: str = 'auto', progress: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Concept indices (N, k) and cosine scores (N, k) for every image (or every row in `rows`)."""
    total = len(rows) if rows is not None else images.shape[0]
    indices = np.empty((total, k), dtype=np.int32)
    scores = np.empty((total, k), dtype=np.float32)
    for start, idx, sc in iter_topk(images, concepts, k, chunk_size=chunk_size, rows=rows,
                                    device=device, dtype=dtype, progress=progress):
        indices[start:start + len(idx)] = idx
        scores[start:start + len(idx)] = sc
    return indices, scores
