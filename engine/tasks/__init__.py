"""Task definitions run by the shared trainer (one per top-level script)."""

from engine.tasks.base import Task, TextSpec, TokenizingCollate, to_device
from engine.tasks.pretrain import PretrainTask

TASKS = {
    "pretrain": PretrainTask,
}

__all__ = ["TASKS", "Task", "TextSpec", "TokenizingCollate", "to_device", "PretrainTask"]
