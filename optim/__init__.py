"""Optimizer factory (the ``optimizer`` config block)."""

from .optim_factory import SUPPORTED_OPTIMIZERS, create_optimizer, param_groups_weight_decay

__all__ = ["create_optimizer", "param_groups_weight_decay", "SUPPORTED_OPTIMIZERS"]
