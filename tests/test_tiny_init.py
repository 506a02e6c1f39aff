"""tools/make_tiny_init.py: the demo's starting weights learn, and load through the real DeiT/BERT paths."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import demo_config
from models import MODEL_BUILDERS


def test_tiny_towers_align_images_and_captions(tiny_init):
    result = tiny_init["result"]
    # In-batch image->caption accuracy over the last 100 steps, far above picking at random.
    assert result["accuracy"] > 4 * result["chance"], result


def test_tiny_init_loads_as_deit_and_bert_weights(tiny_init, tokenizer):
    folder = tiny_init["dir"]
    config = demo_config("Pretrain", init_deit=True, init_bert=True, deit_checkpoint=os.path.join(folder, "vit.pth"))
    model = MODEL_BUILDERS["pretrain"](config, text_encoder=os.path.join(folder, "bert"), tokenizer=tokenizer)
    vit = torch.load(os.path.join(folder, "vit.pth"), map_location="cpu")["model"]
    bert = torch.load(os.path.join(folder, "bert", "pytorch_model.bin"), map_location="cpu")
    for key, value in vit.items():
        assert torch.equal(model.visual_encoder.state_dict()[key], value), key
    for key in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.2.attention.self.query.weight"):
        assert torch.equal(model.text_encoder.state_dict()[key], bert[key]), key
    # The VC encoder starts from the first two BERT layers, as the original from bert-base.
    assert torch.equal(model.kw_encoder.state_dict()["encoder.layer.1.output.dense.weight"],
                       bert["bert.encoder.layer.1.output.dense.weight"])
    # The momentum twins start equal to the online encoders.
    assert torch.equal(model.visual_encoder_m.state_dict()["blocks.0.attn.qkv.weight"], vit["blocks.0.attn.qkv.weight"])


def test_missing_deit_file_is_named(tokenizer, tmp_path):
    missing = str(tmp_path / "nowhere" / "vit.pth")
    with pytest.raises(FileNotFoundError, match="nowhere/vit.pth"):
        MODEL_BUILDERS["pretrain"](demo_config("Pretrain", init_deit=True, deit_checkpoint=missing),
                                   text_encoder=None, tokenizer=tokenizer)


def test_collate_leaves_fields_without_spec_as_strings(tokenizer):
    from engine.tasks.base import TextSpec, TokenizingCollate

    collate = TokenizingCollate(tokenizer, 1, (TextSpec(max_length=25), None))
    samples = [(torch.zeros(3), ("a red circle", "red circle")), (torch.ones(3), ("a blue star", "blue"))]
    images, (caption, vc) = collate(samples)
    assert images.shape == (2, 3)
    assert caption.input_ids.shape[0] == 2 and caption.input_ids[0, 0] == tokenizer.cls_token_id
    assert vc == ("red circle", "blue")
