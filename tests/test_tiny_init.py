"""tools/make_tiny_init.py: the demo's starting weights learn, and load through the real DeiT/BERT paths."""

from __future__ import annotations

import os
import random

import pytest
import torch

from conftest import demo_config
from models import MODEL_BUILDERS


def test_tiny_towers_align_images_and_captions(tiny_init):
    result = tiny_init["result"]
    # In-batch image->caption accuracy over the last 100 steps, far above picking at random.
    assert result["accuracy"] > 4 * result["chance"], result


def test_tiny_towers_classify_the_labelled_pictures_from_cls_and_mean_patch(tokenizer):
    from dataset import synthetic
    from dataset.transforms import build_transform
    from tools.make_tiny_init import TinyTowers, labelled_picture_batch

    torch.manual_seed(0)
    config = demo_config("Pretrain")
    model = TinyTowers(config).eval()
    pictures, classes = labelled_picture_batch(random.Random(1), 3, config["image_res"],
                                               build_transform("test", config["image_res"]))
    assert pictures.shape == (3, 3, config["image_res"], config["image_res"])
    assert classes.shape == (3, len(synthetic.SCENE_CLASSES)) and set(classes.unique().tolist()) <= {0.0, 1.0}
    images = torch.randn(2, *pictures.shape[1:])
    caption = tokenizer(["a red circle", "a blue star on the left"], padding="longest", return_tensors="pt")
    with torch.no_grad():
        itc, classification, logits, class_logits = model(images, caption, pictures, classes)
        tokens = model.visual_encoder(pictures)
        expected_cls = model.class_head(tokens[:, 0])
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        expected = sum(bce(model.class_head(t), classes, reduction="sum") for t in (tokens[:, 0], tokens[:, 1:].mean(1))) / 3
    assert logits.shape == (2, 2) and torch.isfinite(itc)
    torch.testing.assert_close(class_logits, expected_cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(classification, expected, atol=1e-4, rtol=1e-5)


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
