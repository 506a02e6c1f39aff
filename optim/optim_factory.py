"""Optimizer factory for the ``optimizer`` config block, with the original's weight-decay grouping.

Grouping (the order is part of the checkpoint format, since saved optimizer state refers to parameters
by position): parameters with ``requires_grad=False`` (momentum copies) are left out; group 0 holds the
no-decay parameters (1-D tensors, names ending in ``.bias``, names in ``model.no_weight_decay()`` when
the model itself defines it), group 1 everything else, each in ``named_parameters()`` order. So 0-D
parameters such as the learnable temperature ``temp`` *are* decayed, as in the original.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["create_optimizer", "param_groups_weight_decay", "SUPPORTED_OPTIMIZERS"]

SUPPORTED_OPTIMIZERS = ("sgd", "nesterov", "momentum", "adam", "adamw", "adadelta", "rmsprop")
_FUSED_KERNELS = ("sgd", "nesterov", "momentum", "adam", "adamw")  # the others have foreach kernels only


def _read(cfg: Any, name: str, default: Any = None) -> Any:
    """A key of a dict-like block, or an attribute of a namespace; None counts as absent."""
    value = cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)
    return default if value is None else value


def param_groups_weight_decay(
    model: nn.Module, weight_decay: float, skip: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """``[{no-decay params, weight_decay 0}, {decay params, weight_decay}]`` over trainable parameters."""
    skip = set(skip)
    no_decay, decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim == 1 or name.endswith(".bias") or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _kernel_kwargs(fused: bool | None, params: list[torch.Tensor]) -> dict[str, bool]:
    """Choose the update kernel: fused on CUDA, multi-tensor (foreach) elsewhere, unless forced."""
    if fused is None:
        on_cuda = bool(params) and all(p.is_cuda for p in params)
        return {"fused": True} if on_cuda else {"foreach": True}
    return {"fused": True} if fused else {"fused": False}


def create_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    """Build the optimizer from the ``optimizer`` block (a dict, AttrDict or namespace).

    Keys: ``opt`` (sgd | nesterov | momentum | adam | adamw | adadelta | rmsprop, case-insensitive; a
    ``lookahead_`` prefix wraps it in timm's Lookahead, as the original), ``lr``, ``weight_decay``,
    optional ``opt_eps``, ``opt_betas``, ``opt_args`` (extra keyword arguments), ``momentum`` (SGD,
    RMSprop) and ``fused`` (None = automatic). Decay is carried by the param groups, so the
    optimizer-level default is 0. With ``weight_decay`` 0 all trainable parameters form one group.
    """
    pieces = str(_read(cfg, "opt", "")).lower().split("_")
    name, lookahead = pieces[-1], pieces[:-1] == ["lookahead"]
    if name not in SUPPORTED_OPTIMIZERS or (len(pieces) > 1 and not lookahead):
        choices = ", ".join(SUPPORTED_OPTIMIZERS)
        raise ValueError(f"optimizer.opt {_read(cfg, 'opt')!r} is not supported; choose one of {choices}, "
                         "optionally prefixed by lookahead_")
    lr = _read(cfg, "lr")
    if lr is None:
        raise ValueError("optimizer.lr is required")
    weight_decay = _read(cfg, "weight_decay", 0.0)

    if weight_decay:
        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
        groups: list[Any] = param_groups_weight_decay(model, weight_decay, skip)
        params = [p for group in groups for p in group["params"]]
    else:
        groups = params = [p for p in model.parameters() if p.requires_grad]

    kwargs: dict[str, Any] = {"lr": lr, "weight_decay": 0.0}
    kernel = _kernel_kwargs(_read(cfg, "fused"), params)
    if name not in _FUSED_KERNELS and "fused" in kernel:  # no fused kernel: multi-tensor unless forced off
        kernel = {"foreach": kernel["fused"]}
    kwargs.update(kernel)
    if _read(cfg, "opt_eps") is not None and name not in ("sgd", "nesterov", "momentum"):
        kwargs["eps"] = _read(cfg, "opt_eps")  # else each optimizer's own default (1e-8; Adadelta 1e-6)
    if name in ("adam", "adamw"):
        kwargs["betas"] = tuple(_read(cfg, "opt_betas", (0.9, 0.999)))
    kwargs.update(_read(cfg, "opt_args", {}))
    momentum = _read(cfg, "momentum", 0.9)

    if name == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, **kwargs)
    elif name == "adam":
        optimizer = torch.optim.Adam(groups, **kwargs)
    elif name == "adadelta":
        optimizer = torch.optim.Adadelta(groups, **kwargs)
    elif name == "rmsprop":
        optimizer = torch.optim.RMSprop(groups, alpha=0.9, momentum=momentum, **kwargs)
    else:
        optimizer = torch.optim.SGD(groups, momentum=momentum, nesterov=name in ("sgd", "nesterov"), **kwargs)
    if lookahead:
        from timm.optim import Lookahead

        optimizer = Lookahead(optimizer)
    return optimizer
