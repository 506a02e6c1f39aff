"""ViCHA models: one backbone (``backbone.py``) and small task models on top of it."""

from __future__ import annotations

from models.model_pretrain import ViCHAPretrain

# Task name -> model class. Each class takes (config, text_encoder=..., tokenizer=...).
MODEL_BUILDERS = {
    "pretrain": ViCHAPretrain,
}
