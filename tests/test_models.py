"""Backbone tests: tokenizer convention, BERT parity with transformers, ViT with VC tokens,
state_dict names against the official checkpoints, and the tiny pretraining model's forward/backward."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from conftest import REPO, demo_config
from engine.config import load_config
from models import MODEL_BUILDERS
from models.backbone import load_pretrained_bert
from models.tokenization import build_tokenizer
from models.vit import PatchEmbedding, VisionTransformer, interpolate_pos_embed
from models.xbert import BertConfig, BertForMaskedLM, BertModel
from tools.state_dict_keys import state_dict_shapes


def tiny_pretrain_config() -> dict:
    return demo_config("Pretrain")


@pytest.fixture()
def tiny_model(tokenizer):
    torch.manual_seed(0)
    return MODEL_BUILDERS["pretrain"](tiny_pretrain_config(), text_encoder=None, tokenizer=tokenizer)


# --- tokenizer ---------------------------------------------------------------------------------


def test_bundled_bert_vocab_tokenizes_like_the_original():
    tok = build_tokenizer("bert-base-uncased")
    assert len(tok) == 30522
    batch = tok(["A Dog runs", "yes[SEP]"], padding="longest", max_length=25)
    assert batch.input_ids.tolist() == [[101, 1037, 3899, 3216], [101, 2748, 102, 0]]  # no trailing [SEP]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_truncation_keeps_cls_plus_24_pieces_and_max_length_padding():
    tok = build_tokenizer("bert-base-uncased")
    long_text = " ".join(["dog"] * 40)
    ids = tok([long_text], max_length=25).input_ids
    assert ids.shape == (1, 25) and ids[0, 0] == 101 and (ids[0, 1:] == 3899).all()
    padded = tok(["a dog"], padding="max_length", max_length=25)
    assert padded.input_ids.shape == (1, 25) and padded.attention_mask.sum() == 3
    untruncated = tok([long_text], truncation=False, max_length=25).input_ids
    assert untruncated.shape == (1, 41)


def test_a_tokenizer_that_does_not_fit_the_bert_config_is_named_with_the_flag_to_change():
    """The demo configs' 189-token BERT with the default --text_encoder (bert-base-uncased, 30,522 tokens)."""
    with pytest.raises(ValueError, match=r"tokenizer 'bert-base-uncased' \(--text_encoder\) has 30522 tokens "
                                         r"but .*config_bert_tiny.json says vocab_size 189: pass --text_encoder"):
        MODEL_BUILDERS["retrieval"](demo_config("Retrieval"), text_encoder=None,
                                    tokenizer=build_tokenizer("bert-base-uncased"))


def test_tokenizer_folder_without_vocab_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        build_tokenizer(str(tmp_path))


# --- BERT --------------------------------------------------------------------------------------


def test_bert_text_mode_matches_transformers(tmp_path):
    """Our BERT with transformers' weights gives transformers' outputs (the text-only layers)."""
    import transformers

    hf_config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=40)
    torch.manual_seed(0)
    reference = transformers.BertForMaskedLM(hf_config).eval()
    reference.save_pretrained(tmp_path)
    ours_config = BertConfig.from_dict(hf_config.to_dict(), fusion_layer=3, encoder_width=32)
    ours = BertForMaskedLM(ours_config)
    load_pretrained_bert(ours, str(tmp_path))
    ours.eval()
    ids = torch.randint(5, 50, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask)
        hidden = ours.bert(ids, mask, mode="text").last_hidden_state
        logits = ours(ids, mask, mode="text", return_logits=True)
        expected_hidden = reference.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(hidden[0], expected_hidden[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(hidden[1, :5], expected_hidden[1, :5], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits[1, :5], expected.logits[1, :5], atol=1e-4, rtol=1e-4)
    # a bare BertModel (downstream layout, no 'bert.' infix) loads the same weights
    bare = BertModel(ours_config)
    load_pretrained_bert(bare, str(tmp_path))
    torch.testing.assert_close(bare.embeddings.word_embeddings.weight, ours.bert.embeddings.word_embeddings.weight)


def test_fused_and_explicit_attention_agree_and_modes_split_layers():
    config = BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, fusion_layer=2, encoder_width=16)
    torch.manual_seed(0)
    model = BertModel(config).eval()
    ids = torch.randint(1, 30, (3, 6))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    image = torch.randn(3, 5, 16)
    with torch.no_grad():
        fused = model(ids, mask, encoder_hidden_states=image).last_hidden_state
        model.set_fused_attention(False)
        explicit = model(ids, mask, encoder_hidden_states=image).last_hidden_state
        text = model(ids, mask, mode="text", output_hidden_states=True)
        fusion = model(encoder_embeds=text.last_hidden_state, attention_mask=mask, encoder_hidden_states=image,
                       mode="fusion").last_hidden_state
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fusion, explicit, atol=1e-5, rtol=1e-5)  # text then fusion == multi_modal
    assert len(text.hidden_states) == config.fusion_layer + 1  # embeddings + executed layers
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(ids, mask, mode="fusion", encoder_embeds=text.last_hidden_state)


def test_mlm_head_is_tied_and_both_keys_are_in_the_state_dict():
    model = BertForMaskedLM(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=32, fusion_layer=1, encoder_width=16))
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias
    keys = model.state_dict().keys()
    assert {"cls.predictions.decoder.weight", "cls.predictions.bias", "cls.predictions.decoder.bias",
            "bert.embeddings.position_ids"} <= set(keys)


# --- ViT ---------------------------------------------------------------------------------------


def test_vit_appends_vc_tokens_after_position_embedding():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, return_hidden_state=True)
    image = torch.randn(2, 3, 32, 32)
    vcs = torch.randn(2, 5, 32)
    out, hidden = vit(image, external_features=vcs)
    assert out.shape == (2, 1 + 16 + 5, 32)
    assert len(hidden) == 3
    torch.testing.assert_close(hidden[-1], out)
    # VC tokens carry no position: permuting them permutes their outputs and leaves CLS unchanged
    out_perm, _ = vit(image, external_features=vcs.flip(1))
    torch.testing.assert_close(out_perm[:, :17], out[:, :17], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_perm[:, 17:], out[:, 17:].flip(1), atol=1e-5, rtol=1e-5)


def test_patch_embedding_as_one_product_equals_the_strided_convolution():
    """PatchEmbedding computes timm's PatchEmbed (stride-p convolution, flattened row-major) as a
    matrix product over unfolded patches: same parameter names, initial values, outputs and gradients."""
    from timm.layers import PatchEmbed

    torch.manual_seed(0)
    conv = PatchEmbed(img_size=48, patch_size=16, in_chans=3, embed_dim=24)
    torch.manual_seed(0)
    product = PatchEmbedding(48, 16, 24)
    assert {n: p.shape for n, p in product.named_parameters()} == {n: p.shape for n, p in conv.named_parameters()}
    assert all(torch.equal(a, b) for a, b in zip(product.parameters(), conv.parameters()))
    image = torch.randn(2, 3, 48, 48)
    expected, actual = conv(image), product(image)
    assert actual.shape == (2, 9, 24) and product.num_patches == 9
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(expected)
    (expected * weights).sum().backward()
    (actual * weights).sum().backward()
    for a, b in zip(product.parameters(), conv.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="64x64 px.*48x48.*image_res"):
        product(torch.randn(1, 3, 64, 64))
    torch.manual_seed(0)  # 380 px (the fine-tuning size) at patch 16: 23 x 23 patches, the last 12 px unread
    conv, product = PatchEmbed(img_size=380, patch_size=16, in_chans=3, embed_dim=8), PatchEmbedding(380, 16, 8)
    product.load_state_dict(conv.state_dict())
    image = torch.randn(1, 3, 380, 380)
    assert product.num_patches == conv.num_patches == 529
    torch.testing.assert_close(product(image), conv(image), atol=1e-5, rtol=1e-5)


def test_interpolate_pos_embed_keeps_cls_and_resizes_grid():
    pos = torch.randn(1, 1 + 16 * 16, 8)
    assert interpolate_pos_embed(pos, 16 * 16) is pos
    resized = interpolate_pos_embed(pos, 23 * 23)
    assert resized.shape == (1, 1 + 23 * 23, 8)
    torch.testing.assert_close(resized[:, :1], pos[:, :1])


# --- state_dict names --------------------------------------------------------------------------


def test_pretrain_state_dict_matches_the_official_checkpoint():
    expected = json.load(open(os.path.join(REPO, "tests/data/state_dict_pretrain.json")))
    actual = state_dict_shapes("pretrain", load_config(os.path.join(REPO, "configs/Pretrain.yaml")))
    assert sorted(set(expected) - set(actual)) == []
    assert sorted(set(actual) - set(expected)) == []
    assert {k: v for k, v in actual.items() if expected[k] != v} == {}


def test_state_dict_keys_cli_prints_json(capsys):
    from tools import state_dict_keys

    state_dict_keys.main(["--task", "pretrain", "--config", os.path.join(REPO, "configs/Pretrain.yaml")])
    printed = json.loads(capsys.readouterr().out)
    assert printed["visual_encoder.pos_embed"] == [1, 257, 768]
    assert printed["temp"] == []


# --- tiny pretraining model -------------------------------------------------------------------


def _batch(tokenizer, batch=4):
    torch.manual_seed(1)
    image = torch.randn(batch, 3, 64, 64)
    caption = tokenizer(["a small red circle on the left", "a large blue square at the top",
                         "a green star in the middle", "a white cross at the bottom"][:batch], max_length=25)
    vc = tokenizer(["red circle", "blue square small", "green star", "white cross"][:batch], max_length=55)
    return image, caption, vc


def test_forward_backward_all_trainable_parameters_get_gradients(tiny_model, tokenizer):
    image, caption, vc = _batch(tokenizer)
    out = tiny_model(image, (caption, vc), alpha=0.4)
    assert set(out) == {"loss_mlm", "loss_ita", "loss_itm", "loss_mae"}
    assert all(torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()
    missing = [n for n, p in tiny_model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    frozen = [n for n, p in tiny_model.named_parameters() if n.split(".")[0].endswith("_m")]
    assert frozen and all(not dict(tiny_model.named_parameters())[n].requires_grad for n in frozen)
    assert not tiny_model.decoder_pos_embed.requires_grad


def test_momentum_update_is_an_ema(tiny_model):
    tiny_model.momentum = 0.9
    with torch.no_grad():
        for p in tiny_model.vision_proj.parameters():
            p.add_(1.0)
    before = [p.clone() for p in tiny_model.vision_proj_m.parameters()]
    online = [p.clone() for p in tiny_model.vision_proj.parameters()]
    tiny_model._momentum_update()
    for p_m, old, p in zip(tiny_model.vision_proj_m.parameters(), before, online):
        torch.testing.assert_close(p_m, 0.9 * old + 0.1 * p)


def test_queue_pointer_wraps(tokenizer):
    config = tiny_pretrain_config()
    config["queue_size"] = 8
    model = MODEL_BUILDERS["pretrain"](config, text_encoder=None, tokenizer=tokenizer)
    feats = [torch.nn.functional.normalize(torch.randn(4, 32), dim=1) for _ in range(3)]
    for f in feats:
        model._dequeue_and_enqueue(f, -f)
    assert int(model.queue_ptr) == 4  # 12 written into 8 columns
    torch.testing.assert_close(model.image_queue[:, :4], feats[2].t())  # third batch overwrote the first
    torch.testing.assert_close(model.image_queue[:, 4:], feats[1].t())
    torch.testing.assert_close(model.text_queue[:, :4], -feats[2].t())


def test_bf16_autocast_forward_is_close_to_fp32(tiny_model, tokenizer):
    image, caption, vc = _batch(tokenizer)
    tiny_model.eval()  # no dropout; sampling below re-seeded identically
    model_copy = copy.deepcopy(tiny_model)
    torch.manual_seed(5)
    fp32 = tiny_model(image, (caption, vc), alpha=0.0)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model_copy(image, (caption, vc), alpha=0.0)
    for name in fp32:
        assert abs(fp32[name].item() - bf16[name].item()) < 0.05 * max(1.0, abs(fp32[name].item())), name


def test_grad_checkpointing_gives_the_same_gradients(tokenizer):
    config = tiny_pretrain_config()
    torch.manual_seed(0)
    plain = MODEL_BUILDERS["pretrain"](config, text_encoder=None, tokenizer=tokenizer).eval()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    image, caption, vc = _batch(tokenizer)
    grads = []
    for model in (plain, checkpointed):
        model.train()
        for module in model.modules():  # dropout off, checkpointing still active in train mode
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        torch.manual_seed(3)
        sum(model(image, (caption, vc), alpha=0.2).values()).backward()
        grads.append(model.visual_encoder.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_hierarchical_levels_pair_the_specified_layers(tiny_model):
    """n = 2 levels on a 4-block ViT and a 3-layer text BERT: ViT blocks 1, 2 <-> BERT text entries 1, 2
    (embeddings = entry 0 and the last entries are excluded); other entries must not be read."""
    batch = 3
    nan = torch.full((batch, 5, 64), float("nan"))
    image_hidden = tuple(torch.randn(batch, 5, 64) if i in (1, 2) else nan for i in range(4))
    text_hidden = tuple(torch.randn(batch, 5, 64) if i in (1, 2) else nan for i in range(4))
    loss = tiny_model.hierarchical_loss(image_hidden, text_hidden)
    assert torch.isfinite(loss)
    assert tiny_model.num_hidden_align == 2 and len(tiny_model.vision_proj_hidden) == 2
