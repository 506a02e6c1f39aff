"""Learning-rate schedule factory (the ``schedular`` config block, upstream spelling)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .cosine_lr import WARMUP_STEP_ITERS, CosineLRScheduler, warmup_step_due

__all__ = ["create_scheduler", "CosineLRScheduler", "warmup_step_due", "WARMUP_STEP_ITERS"]


def _read(cfg: Any, name: str, default: Any) -> Any:
    """A key of a dict-like block, or an attribute of a namespace; None counts as absent."""
    value = cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)
    return default if value is None else value


def create_scheduler(cfg: Any, optimizer: torch.optim.Optimizer) -> tuple[CosineLRScheduler, int]:
    """Build the schedule from the ``schedular`` block; returns ``(scheduler, epochs + cooldown_epochs)``.

    As in the original the second value is informational (the scripts loop over ``schedular.epochs``)
    and ``schedular.lr`` is ignored: the base lr is the optimizer's.
    """
    sched = _read(cfg, "sched", None)
    if sched != "cosine":
        raise ValueError(f"schedular.sched {sched!r} is not supported; only 'cosine' is implemented")
    epochs = _read(cfg, "epochs", None)
    if epochs is None:
        raise ValueError("schedular.epochs is required")
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=epochs,
        lr_min=_read(cfg, "min_lr", 0.0),
        decay_rate=_read(cfg, "decay_rate", 1.0),
        warmup_t=_read(cfg, "warmup_epochs", 0),
        warmup_lr_init=_read(cfg, "warmup_lr", 0.0),
        cycle_limit=1,
    )
    return scheduler, scheduler.get_cycle_length() + _read(cfg, "cooldown_epochs", 0)
