"""Task definitions run by the shared trainer (one per top-level script)."""

from engine.tasks.base import Task, TextSpec, TokenizingCollate, to_device
from engine.tasks.pretrain import PretrainTask
from engine.tasks.retrieval import RetrievalTask
from engine.tasks.grounding import GroundingTask
from engine.tasks.vqa import VQATask
from engine.tasks.ve import VETask
from engine.tasks.nlvr import NLVRTask
from engine.tasks.pretrain_nlvr import PretrainNLVRTask

TASKS = {
    "pretrain": PretrainTask,
    "retrieval": RetrievalTask,
    "grounding": GroundingTask,
    "vqa": VQATask,
    "ve": VETask,
    "nlvr": NLVRTask,
    "nlvr_pretrain": PretrainNLVRTask,
}

__all__ = ["TASKS", "Task", "TextSpec", "TokenizingCollate", "to_device", "PretrainTask", "RetrievalTask",
           "GroundingTask", "VQATask", "VETask", "NLVRTask", "PretrainNLVRTask"]
