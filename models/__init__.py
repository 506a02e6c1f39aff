"""ViCHA models: one backbone (``backbone.py``) and small task models on top of it."""

from __future__ import annotations

from models.model_pretrain import ViCHAPretrain
from models.model_ve import ViCHAVE
from models.model_nlvr import ViCHANLVR
from models.model_pretrain_nlvr import ViCHANLVRPretrain
from models.model_vqa import ViCHAVQA
from models.model_retrieval import ViCHARetrieval

# Task name -> model class. Each class takes (config, text_encoder=..., tokenizer=...).
MODEL_BUILDERS = {
    "pretrain": ViCHAPretrain,
    "ve": ViCHAVE,
    "nlvr": ViCHANLVR,
    "nlvr_pretrain": ViCHANLVRPretrain,
    "vqa": ViCHAVQA,
    "retrieval": ViCHARetrieval,
    "grounding": ViCHARetrieval,  # the retrieval model, trained on referring expressions
}
