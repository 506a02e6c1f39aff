"""Cosine learning-rate schedule with a linear warm-up, in the scheduler's own time unit ``t``.

The original (a trimmed timm ``CosineLRScheduler``) is stepped with a time ``t`` that counts
100-iteration units during the warm-up of epoch 0 and epochs afterwards (``t = epoch + warmup_epochs``);
that protocol lives in the trainer, helped by ``warmup_step_due``. With ``L0`` the base lr of a param
group (its ``initial_lr``), ``Lw = warmup_lr_init``, ``W = warmup_t``, ``E = t_initial``,
``Lm = lr_min`` and ``g = decay_rate``::

    lr(t) = Lw + t (L0 - Lw) / W                                  if W > 0 and t < W
    u = t - W;  c = floor(u / E)
    lr(t) = Lm g^c + (L0 g^c - Lm g^c) (1 + cos(pi (u - c E) / E)) / 2   if c < cycle_limit (= 1)
    lr(t) = Lm                                                    otherwise
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["CosineLRScheduler", "warmup_step_due", "WARMUP_STEP_ITERS"]

# Length of one warm-up time unit, in iterations of epoch 0 (the original's "warmup by steps" trick).
WARMUP_STEP_ITERS = 100


class CosineLRScheduler:
    """Epoch-indexed cosine schedule; ``step(t)`` writes ``lr(t)`` into every param group.

    The base lr of each group is its ``initial_lr`` (set from ``lr`` when absent), so the ``lr`` key of
    the ``schedular`` config block plays no part, as in the original. At construction every group is set
    to ``warmup_lr_init`` when there is a warm-up.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        t_initial: int,
        lr_min: float = 0.0,
        decay_rate: float = 1.0,
        warmup_t: float = 0,
        warmup_lr_init: float = 0.0,
        cycle_limit: int = 1,
    ) -> None:
        if t_initial <= 0:
            raise ValueError(f"the cosine period (schedular.epochs) must be positive, got {t_initial}")
        if lr_min < 0:
            raise ValueError(f"schedular.min_lr must be >= 0, got {lr_min}")
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_values = [group["initial_lr"] for group in optimizer.param_groups]
        self.t_initial = t_initial
        self.t_mul = 1.0  # cycles of equal length; kept for state_dict compatibility
        self.lr_min = lr_min
        self.decay_rate = decay_rate
        self.cycle_limit = cycle_limit
        self.warmup_t = warmup_t
        self.warmup_lr_init = warmup_lr_init
        self.t_in_epochs = True
        self.metric = None
        if warmup_t > 0:
            self.warmup_steps = [(base - warmup_lr_init) / warmup_t for base in self.base_values]
            self._set_lrs([warmup_lr_init] * len(self.base_values))
        else:
            self.warmup_steps = [1.0 for _ in self.base_values]
            self._set_lrs(self.base_values)

    def lr_at(self, t: float) -> list[float]:
        """Learning rate of each param group at time ``t`` (no side effect)."""
        if self.warmup_t > 0 and t < self.warmup_t:
            return [self.warmup_lr_init + t * step for step in self.warmup_steps]
        u = t - self.warmup_t
        cycle = math.floor(u / self.t_initial)
        if cycle >= self.cycle_limit:
            return [self.lr_min for _ in self.base_values]
        gamma = self.decay_rate**cycle
        lr_min = self.lr_min * gamma
        progress = (u - cycle * self.t_initial) / self.t_initial
        scale = 0.5 * (1.0 + math.cos(math.pi * progress))
        return [lr_min + (base * gamma - lr_min) * scale for base in self.base_values]

    def step(self, t: float, metric: Any = None) -> None:
        """Set every param group's lr to ``lr(t)``."""
        self.metric = metric
        self._set_lrs(self.lr_at(t))

    def get_cycle_length(self) -> int:
        """Scheduled length in epochs (one cycle)."""
        return self.t_initial * max(1, self.cycle_limit)

    def state_dict(self) -> dict[str, Any]:
        """Every attribute except the optimizer (saved under 'lr_scheduler' in checkpoints)."""
        return {key: value for key, value in self.__dict__.items() if key != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the attributes saved by ``state_dict`` (param-group lrs are set by the next step)."""
        self.__dict__.update({key: value for key, value in state_dict.items() if key != "optimizer"})

    def _set_lrs(self, values: list[float]) -> None:
        for group, value in zip(self.optimizer.param_groups, values):
            group["lr"] = value


def warmup_step_due(epoch: int, iteration: int, warmup_epochs: float) -> int | None:
    """The ``t`` to step the scheduler with after the optimizer update of ``iteration``, or None.

    In epoch 0 only, every ``WARMUP_STEP_ITERS`` iterations up to ``WARMUP_STEP_ITERS * warmup_epochs``
    (inclusive), the scheduler is stepped with ``iteration // WARMUP_STEP_ITERS``; if epoch 0 is shorter,
    the warm-up is cut short, as in the original.
    """
    if epoch != 0 or iteration % WARMUP_STEP_ITERS != 0:
        return None
    if iteration > WARMUP_STEP_ITERS * warmup_epochs:
        return None
    return iteration // WARMUP_STEP_ITERS
