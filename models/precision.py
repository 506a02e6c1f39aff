"""Opt-in low-precision residual stream (config key ``bf16_residual``).

Under bf16 autocast the encoders' residual streams stay fp32: autocast runs layer norms in fp32, and a
bf16 branch added to an fp32 stream gives fp32. Every layer then reads and writes the stream, and
saves it for the backward pass, at 4 bytes per value, and the backward pass casts the stream's fp32
gradient to bf16 before each product. With ``bf16_residual`` the streams (the ViT's and the MAE
decoder's from their input on, BERT's post-layer-norm hidden states) and the layer-norm outputs that
feed them are kept in the autocast dtype; the layer norms still compute their statistics in fp32.
This is Megatron-LM's default (its ``--fp32-residual-connection`` is off); the original keeps the fp32
stream, and so does this code unless the key is set. Without autocast nothing changes. It is meant for
compiled steps (``compile``), where inductor fuses the casts into the norm kernels; eagerly each norm
gets two more cast kernels (bf16 -> fp32 in, fp32 -> bf16 out). Calling ``F.layer_norm`` on the bf16
stream directly (one mixed-precision kernel) was tried and dropped: with PyTorch 2.14.1 on CPU its
backward sums the weight and bias gradients in bf16 (a bias gradient over 36 rows off by up to 2.5 %).
CPU autocast, unlike CUDA's, does not run layer norms in fp32, so there the bf16 streams do reach that
kernel: the key is meant for GPUs (on CPU the bf16 step still stays within 1e-3 of the fp32 losses).
"""

from __future__ import annotations

import torch
from torch import nn


def to_autocast_dtype(x: torch.Tensor, enabled: bool = True) -> torch.Tensor:
    """``x`` in the autocast dtype when ``enabled`` and autocast is on for its device, else ``x``."""
    device_type = x.device.type
    if enabled and torch.is_autocast_enabled(device_type):
        return x.to(torch.get_autocast_dtype(device_type))
    return x


def set_low_precision_residual(model: nn.Module, enabled: bool) -> int:
    """Switch every module that carries a ``low_precision_residual`` attribute; returns how many."""
    switched = 0
    for module in model.modules():
        if hasattr(module, "low_precision_residual"):
            module.low_precision_residual = bool(enabled)
            switched += 1
    return switched
