"""Fixed 2-D sine-cosine position embedding of the MAE decoder (models.md §1.3)."""

from __future__ import annotations

import numpy as np


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[sin(p * w_j), cos(p * w_j)] with w_j = 1 / 10000^(j / (dim / 2)); (len(positions), dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def get_2d_sincos_pos_embed(dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """(G*G [+1], dim) float64: the first half encodes the column, the second half the row.

    Grid token k has row k // G and column k % G; the optional leading [CLS] row is zeros.
    """
    if dim % 4:
        raise ValueError(f"the sin-cos embedding width must be a multiple of 4, got {dim}")
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    embed = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
    if cls_token:
        embed = np.concatenate([np.zeros((1, dim)), embed], axis=0)
    return embed
