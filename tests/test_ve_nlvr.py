"""SNLI-VE, NLVR2 and the NLVR2 text-assignment pretraining: layouts against the official key lists,
key/value tying, checkpoint remaps, TA pair sampling, the distilled loss, and the scripts end to end."""

from __future__ import annotations

import json
import os
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import REPO, demo_flags
from engine.config import load_config
from engine.tasks import NLVRTask, PretrainNLVRTask, VETask
from engine.tasks.ve import classification_accuracy
from models import MODEL_BUILDERS
from models.backbone import load_bert_config
from models.checkpoint import adapt_state_dict, load_checkpoint, load_state_dict_checked, read_checkpoint
from models.model_nlvr import ViCHANLVR, pair_encoder_config, share_cross_attention
from models.model_pretrain_nlvr import ViCHANLVRPretrain, assignment_weights, sample_assignment_pairs
from models.model_ve import ViCHAVE
from models.tokenization import build_tokenizer
from models.xbert import BertModel
from tools.state_dict_keys import state_dict_shapes

DATA = os.path.join(REPO, "tests", "data")
FULL_CONFIGS = {"ve": "configs/VE.yaml", "nlvr": "configs/NLVR.yaml", "nlvr_pretrain": "configs/NLVR_pretrain.yaml"}
DEMO_CONFIGS = {"ve": "configs/demo/VE.yaml", "nlvr": "configs/demo/NLVR.yaml",
                "nlvr_pretrain": "configs/demo/NLVR_pretrain.yaml"}


def _json(name: str):
    with open(os.path.join(DATA, name), encoding="utf-8") as handle:
        return json.load(handle)


def full_config(task: str) -> dict:
    config = load_config(os.path.join(REPO, FULL_CONFIGS[task]))
    config["bert_config"] = os.path.join(REPO, config["bert_config"])
    return dict(config, init_bert=False, init_deit=False)


def tiny_config(task: str, **changes) -> dict:
    config = load_config(os.path.join(REPO, DEMO_CONFIGS[task]))
    config["bert_config"] = os.path.join(REPO, config["bert_config"])
    config.update(changes)
    return config


def meta_model(task: str) -> nn.Module:
    with torch.device("meta"):
        return MODEL_BUILDERS[task](full_config(task), text_encoder=None, tokenizer=None)


def tied_groups(module: nn.Module) -> list[list[str]]:
    """State_dict keys that hold the very same Parameter object, for each object held by several keys."""
    groups: dict[int, list[str]] = {}
    for key, value in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(value), []).append(key)
    return sorted(sorted(keys) for keys in groups.values() if len(keys) > 1)


def meta_state(name: str) -> dict[str, torch.Tensor]:
    """A state_dict laid out as the official key list ``name`` (meta tensors: names and shapes only)."""
    return {key: torch.empty(shape, device="meta") for key, shape in _json(name).items()}


@pytest.fixture(scope="module")
def tokenizer(demo_data):
    return build_tokenizer(os.path.join(demo_data, "tokenizer"))


def tiny_batch(tokenizer, batch: int = 4, pairs: bool = False):
    torch.manual_seed(1)
    sentences = ["there is a small red circle", "the left image contains a blue square",
                 "there are three shapes in total", "both images contain a star"][:batch]
    vcs = ["red circle left small", "blue square top", "green star middle large yellow", "white cross"][:batch]
    image = torch.randn((2 if pairs else 1) * batch, 3, 64, 64)
    text = [tokenizer(sentences, max_length=None, truncation=False), tokenizer(vcs, truncation=False)]
    if pairs:
        text.append(tokenizer(list(reversed(vcs)), truncation=False))
    return image, tuple(text)


# ----------------------------------------------------------------------------------------------
# layouts


@pytest.mark.parametrize("task", ["ve", "nlvr", "nlvr_pretrain"])
def test_state_dict_matches_the_official_layout(task):
    expected = _json(f"state_dict_{task}.json")
    actual = state_dict_shapes(task, load_config(os.path.join(REPO, FULL_CONFIGS[task])))
    assert sorted(set(expected) - set(actual)) == []
    assert sorted(set(actual) - set(expected)) == []
    assert {k: v for k, v in actual.items() if expected[k] != v} == {}


@pytest.mark.parametrize("task", ["ve", "nlvr", "nlvr_pretrain"])
def test_parameter_counts_and_tied_entries_match_the_summary(task):
    summary = _json("summary.json")["tasks"][task]
    model = meta_model(task)
    assert sum(p.numel() for p in model.parameters()) == summary["n_params"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == summary["n_trainable_params"]
    assert tied_groups(model) == sorted(sorted(pair) for pair in summary["tied"])
    assert sorted(name for name, _ in model.named_buffers()) == summary["buffers"]


def test_full_size_pair_encoder_ties_24_key_value_tensors_per_encoder():
    model = meta_model("nlvr")
    for name in ("text_encoder", "text_encoder_m"):
        encoder = getattr(model, name)
        assert encoder.config.num_hidden_layers == 18 and encoder.config.fusion_layer == 6
        groups = tied_groups(encoder)
        assert len(groups) == 24
        layers = encoder.encoder.layer
        for even in range(6, 18, 2):
            a, b = layers[even].crossattention.self, layers[even + 1].crossattention.self
            for proj in ("key", "value"):
                assert getattr(a, proj).weight is getattr(b, proj).weight
                assert getattr(a, proj).bias is getattr(b, proj).bias
            assert a.query.weight is not b.query.weight
            first, second = layers[even], layers[even + 1]
            assert first.crossattention.output.dense.weight is not second.crossattention.output.dense.weight
            assert first.attention.self.key.weight is not second.attention.self.key.weight
        keys = encoder.state_dict(keep_vars=True)
        assert "encoder.layer.6.crossattention.self.key.weight" in keys
        assert "encoder.layer.7.crossattention.self.key.weight" in keys
    # the momentum twin has its own tensors, tied the same way
    assert model.text_encoder_m.encoder.layer[6].crossattention.self.key.weight is not \
        model.text_encoder.encoder.layer[6].crossattention.self.key.weight


def test_pair_encoder_depth_follows_the_fusion_layer():
    base = BertModel(pair_encoder_config(load_bert_config(tiny_config("ve"))))
    assert base.config.num_hidden_layers == 9  # 6 layers, fusion 3 -> 3 text + 2 * 3 fusion
    assert share_cross_attention(base) == [(3, 4), (5, 6), (7, 8)]
    assert [layer.has_cross_attention for layer in base.encoder.layer] == [False] * 3 + [True] * 6


def test_tied_key_gets_gradient_from_both_layers_and_stays_tied_through_ema(tokenizer):
    torch.manual_seed(0)
    model = ViCHANLVR(tiny_config("nlvr"), text_encoder=None, tokenizer=tokenizer)
    image, text = tiny_batch(tokenizer, pairs=True)
    loss = model(image, text, targets=torch.tensor([0, 1, 1, 0]), train=True, alpha=0.4)["loss"]
    loss.backward()
    layers = model.text_encoder.encoder.layer
    shared = layers[3].crossattention.self.key.weight
    assert shared is layers[4].crossattention.self.key.weight and shared.grad is not None
    with torch.no_grad():
        shared.add_(1.0)
    model._momentum_update()
    twin = model.text_encoder_m.encoder.layer
    assert twin[3].crossattention.self.value.bias is twin[4].crossattention.self.value.bias
    torch.testing.assert_close(twin[3].crossattention.self.key.weight, twin[4].crossattention.self.key.weight)


# ----------------------------------------------------------------------------------------------
# checkpoint remaps against the official key lists


def test_pretrain_to_ve_remap_misses_only_the_heads():
    reference = _json("state_dict_ve.json")
    adapted = adapt_state_dict("ve", meta_state("state_dict_pretrain.json"), nn.Module(), training=True)
    missing = sorted(set(reference) - set(adapted))
    assert missing == sorted(k for k in reference if k.startswith(("cls_head.", "cls_head_m.")))
    assert len(missing) == 8
    unexpected = set(adapted) - set(reference)
    assert all(k.split(".")[0] in {"temp", "mask_token", "decoder_pos_embed", "image_queue", "text_queue",
                                   "queue_ptr", "vision_proj", "text_proj", "itm_head", "vision_proj_m",
                                   "text_proj_m", "vision_proj_hidden", "text_proj_hidden", "mae_proj",
                                   "decoder_embed", "decoder_blocks", "decoder_norm"}
               or k.startswith(("text_encoder.cls.", "text_encoder_m.cls.")) for k in unexpected), unexpected
    pos = {"visual_encoder.pos_embed", "visual_encoder_m.pos_embed"}  # 256 px -> 380 px: interpolated on load
    assert {k for k in reference if k in adapted and k not in pos and list(adapted[k].shape) != reference[k]} == set()


def test_pretrain_to_ta_remap_duplicates_each_fusion_layer():
    source = meta_state("state_dict_pretrain.json")
    reference = _json("state_dict_nlvr_pretrain.json")
    adapted = adapt_state_dict("nlvr_pretrain", source, nn.Module())
    assert sorted(set(reference) - set(adapted)) == ["ta_head.bias", "ta_head.weight"]
    assert {k for k in reference if k in adapted and list(adapted[k].shape) != reference[k]} == set()
    for j in range(6):
        src = f"text_encoder.bert.encoder.layer.{j + 6}.crossattention.self.query.weight"
        for copy_index in (2 * j + 6, 2 * j + 7):
            assert adapted[f"text_encoder.encoder.layer.{copy_index}.crossattention.self.query.weight"] is source[src]
    for j in range(6):
        src = f"text_encoder.bert.encoder.layer.{j}.output.dense.weight"
        assert adapted[f"text_encoder.encoder.layer.{j}.output.dense.weight"] is source[src]
    # momentum, queue, MLM-head and MAE entries are left over (unused by the TA model)
    unexpected = set(adapted) - set(reference)
    assert any(k.startswith("text_encoder_m.encoder.layer.17.") for k in unexpected)
    assert not any(k.startswith("text_encoder.encoder.") for k in unexpected)


def test_ta_to_nlvr_load_misses_cls_head_and_every_momentum_entry():
    reference = _json("state_dict_nlvr.json")
    adapted = adapt_state_dict("nlvr", meta_state("state_dict_nlvr_pretrain.json"), nn.Module())
    missing = set(reference) - set(adapted)
    momentum = {k for k in reference if k.split(".")[0].endswith("_m")}
    assert missing == momentum | {k for k in reference if k.startswith("cls_head.")}
    assert len(missing) == 612 and len(momentum) == 608  # models.md §5: 612 keys
    assert sorted(set(adapted) - set(reference)) == ["ta_head.bias", "ta_head.weight", "temp", "text_proj.bias",
                                                     "text_proj.weight", "vision_proj.bias", "vision_proj.weight"]


def test_real_pretrain_checkpoint_into_tiny_ve_and_ta(pretrain_checkpoint, tokenizer):
    state = read_checkpoint(pretrain_checkpoint)["model"]
    ve = ViCHAVE(tiny_config("ve"), text_encoder=None, tokenizer=tokenizer)
    report, _ = load_checkpoint(ve, pretrain_checkpoint, "ve")
    assert report.missing_keys == sorted(k for k in ve.state_dict() if k.startswith(("cls_head.", "cls_head_m.")))
    torch.testing.assert_close(ve.text_encoder_m.encoder.layer[4].output.dense.weight,
                               state["text_encoder_m.bert.encoder.layer.4.output.dense.weight"])

    ta = ViCHANLVRPretrain(tiny_config("nlvr_pretrain"), text_encoder=None, tokenizer=tokenizer)
    report, _ = load_checkpoint(ta, pretrain_checkpoint, "nlvr_pretrain")
    assert report.missing_keys == ["ta_head.bias", "ta_head.weight"]
    layers = ta.text_encoder.encoder.layer  # fusion layer 3 of 6: pretrained layer 3 + j -> 3 + 2j, 4 + 2j
    for j in range(3):
        expected = state[f"text_encoder.bert.encoder.layer.{3 + j}.crossattention.self.query.weight"]
        for index in (3 + 2 * j, 4 + 2 * j):
            torch.testing.assert_close(layers[index].crossattention.self.query.weight, expected)
        torch.testing.assert_close(layers[3 + 2 * j].crossattention.self.key.weight,
                                   state[f"text_encoder.bert.encoder.layer.{3 + j}.crossattention.self.key.weight"])
    torch.testing.assert_close(layers[2].attention.self.query.weight,
                               state["text_encoder.bert.encoder.layer.2.attention.self.query.weight"])


def test_ta_state_into_nlvr_keeps_the_pre_load_teacher_unless_fixed(tokenizer, tmp_path):
    torch.manual_seed(0)
    ta = ViCHANLVRPretrain(tiny_config("nlvr_pretrain"), text_encoder=None, tokenizer=tokenizer)
    path = str(tmp_path / "ta.pth")
    torch.save({"model": ta.state_dict()}, path)
    for fix in (False, True):
        torch.manual_seed(1)
        model = ViCHANLVR(tiny_config("nlvr", fix_nlvr_teacher=fix), text_encoder=None, tokenizer=tokenizer)
        teacher_before = model.text_encoder_m.encoder.layer[8].output.dense.weight.clone()
        report, _ = load_checkpoint(model, path, "nlvr")
        twins = {k for k in model.state_dict() if k.split(".")[0].endswith("_m")}
        assert set(report.missing_keys) == twins | {"cls_head.0.bias", "cls_head.0.weight", "cls_head.2.bias",
                                                    "cls_head.2.weight"}
        NLVRTask().check_load_report(report, path, model)  # accepted, and re-copies the teacher if fixed
        teacher = model.text_encoder_m.encoder.layer[8].output.dense.weight
        loaded = ta.text_encoder.encoder.layer[8].output.dense.weight
        torch.testing.assert_close(teacher, loaded if fix else teacher_before)
        assert not torch.equal(teacher_before, loaded)


def test_nlvr_refuses_a_pretraining_checkpoint(pretrain_checkpoint, tokenizer):
    model = ViCHANLVR(tiny_config("nlvr"), text_encoder=None, tokenizer=tokenizer)
    report = load_state_dict_checked(model, adapt_state_dict("nlvr", read_checkpoint(pretrain_checkpoint)["model"],
                                                             model))
    with pytest.raises(ValueError, match="text-assignment checkpoint"):
        NLVRTask().check_load_report(report, pretrain_checkpoint, model)


# ----------------------------------------------------------------------------------------------
# text-assignment sampling


def test_assignment_weights_softmax_rows_with_zero_diagonal():
    feat = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=-1)
    weights = assignment_weights(feat)
    sims = feat @ feat.t() / 0.07
    expected = torch.softmax(sims, dim=1)
    expected.fill_diagonal_(0)
    torch.testing.assert_close(weights, expected)
    assert weights[0, 1] > 1e3 * weights[0, 2]  # the similar image dominates


def test_assignment_pairs_and_labels_on_a_hand_made_matrix():
    # each row b may only pair with (b+1) % 4 and (b+2) % 4
    weights = torch.zeros(4, 4)
    for b in range(4):
        weights[b, (b + 1) % 4] = 0.7
        weights[b, (b + 2) % 4] = 0.3
    single = torch.tensor([True, True, False, False])
    caption_first = torch.tensor([True, False, True, False])
    first, second, labels = sample_assignment_pairs(weights, single, caption_first)
    assert labels.tolist() == [0, 1, 2, 2]
    assert first[0] == 0 and second[0] in (1, 2)  # label 0: the caption's image comes first
    assert second[1] == 1 and first[1] in (2, 3)  # label 1: it comes second
    for b in (2, 3):  # label 2: two different partners, neither is the caption's image
        assert {first[b].item(), second[b].item()} == {(b + 1) % 4, (b + 2) % 4}


def test_assignment_draws_follow_the_weights_and_label_frequencies():
    # 600 independent 3-image blocks; in each, image 0's partners have weights 0.9 / 0.1
    generator = torch.Generator().manual_seed(0)
    block = torch.tensor([[0.0, 0.9, 0.1], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0]])
    weights = torch.block_diag(*[block] * 600)
    size = weights.shape[0]
    first, second, labels = sample_assignment_pairs(weights, torch.rand(size, generator=generator) > 1 / 3,
                                                    torch.rand(size, generator=generator) > 0.5, generator=generator)
    own = torch.arange(size)
    assert ((first // 3) == (own // 3)).all() and ((second // 3) == (own // 3)).all()  # partners from the row
    assert (first != second).all()
    assert ((labels == 0) == (first == own)).all() and ((labels == 1) == (second == own)).all()
    rows = own % 3 == 0
    partner = torch.where(labels == 0, second, first) % 3
    single = rows & (labels < 2)
    share = (partner[single] == 1).float().mean().item()
    assert 0.85 < share < 0.95  # j ~ weights[b]
    counts = torch.bincount(labels, minlength=3).float() / size
    assert torch.allclose(counts, torch.full((3,), 1 / 3), atol=0.04)


def test_assignment_needs_three_images():
    with pytest.raises(ValueError, match="at least 3"):
        sample_assignment_pairs(torch.ones(2, 2), torch.ones(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# models: gradients and the distilled loss


def test_ta_forward_trains_everything_but_the_sampling_projection(tokenizer):
    torch.manual_seed(0)
    model = ViCHANLVRPretrain(tiny_config("nlvr_pretrain"), text_encoder=None, tokenizer=tokenizer)
    image, text = tiny_batch(tokenizer)
    loss = model(image, text)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = sorted(n for n, p in model.named_parameters() if p.grad is None)
    assert no_grad == ["temp", "text_proj.bias", "text_proj.weight", "vision_proj.bias", "vision_proj.weight"]
    assert model.temp.item() == pytest.approx(0.07)


@pytest.mark.parametrize("cls", [ViCHAVE, ViCHANLVR])
def test_classifier_gradients_and_loss_with_an_identical_teacher(cls, tokenizer):
    """Right after construction the teacher equals the student, so (eval mode, no dropout) the loss is
    (1 - a) CE(z, y) + a H(softmax(z), z)."""
    torch.manual_seed(0)
    task = "ve" if cls is ViCHAVE else "nlvr"
    model = cls(tiny_config(task), text_encoder=None, tokenizer=tokenizer).eval()
    image, text = tiny_batch(tokenizer, pairs=task == "nlvr")
    targets = torch.tensor([0, 1, 1, 0])
    logits = model(image, text, train=False)
    assert logits.shape == (4, cls.num_classes)
    alpha = 0.4
    loss = model(image, text, targets=targets, train=True, alpha=alpha)["loss"]
    log_p = F.log_softmax(logits, dim=1)
    expected = (1 - alpha) * F.cross_entropy(logits, targets) - alpha * (log_p.exp() * log_p).sum(1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.split(".")[0].endswith("_m"))


def test_nlvr_teacher_uses_the_online_vit_unless_fixed(tokenizer):
    image, text = tiny_batch(tokenizer, pairs=True)
    targets = torch.tensor([0, 1, 1, 0])
    losses = {}
    for fix in (False, True):
        torch.manual_seed(0)
        model = ViCHANLVR(tiny_config("nlvr", fix_nlvr_teacher=fix), text_encoder=None, tokenizer=tokenizer).eval()
        model.momentum = 1.0  # keep the perturbed teacher ViT as it is
        with torch.no_grad():
            for p in model.visual_encoder_m.parameters():
                p.add_(torch.randn_like(p))
        logits = model(image, text, train=False)
        log_p = F.log_softmax(logits, dim=1)
        identical_teacher = 0.6 * F.cross_entropy(logits, targets) - 0.4 * (log_p.exp() * log_p).sum(1).mean()
        losses[fix] = (model(image, text, targets=targets, alpha=0.4)["loss"], identical_teacher)
    torch.testing.assert_close(*losses[False])  # visual_encoder_m is never used (faithful)
    assert not torch.allclose(*losses[True])


def test_without_distill_there_is_no_teacher_and_the_loss_is_cross_entropy(tokenizer):
    torch.manual_seed(0)
    model = ViCHAVE(tiny_config("ve", distill=False), text_encoder=None, tokenizer=tokenizer).eval()
    assert not any(name.endswith("_m") for name, _ in model.named_children())
    image, text = tiny_batch(tokenizer)
    targets = torch.tensor([2, 1, 0, 2])
    loss = model(image, text, targets=targets, alpha=0.4)["loss"]
    torch.testing.assert_close(loss, F.cross_entropy(model(image, text, train=False), targets))


def test_nlvr_learns_a_label_that_needs_both_images(tokenizer):
    """Label 1 iff the left image is bright and the right one dark: only the pixels of both images,
    through the alternating cross-attention, can tell (the text and VCs are constant)."""
    torch.manual_seed(0)
    model = ViCHANLVR(tiny_config("nlvr"), text_encoder=None, tokenizer=tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def pairs(n: int):
        sign = torch.randint(0, 2, (n, 2)).float() * 2 - 1  # +1 bright, -1 dark
        images = sign[:, :, None, None, None] + 0.3 * torch.randn(n, 2, 3, 64, 64)
        text = (tokenizer(["the left image is brighter"] * n), tokenizer(["red circle"] * n))
        return torch.cat([images[:, 0], images[:, 1]]), (*text, text[1]), (sign[:, 0] > sign[:, 1]).long(), sign

    for _ in range(30):
        image, text, targets, _ = pairs(8)
        loss = model(image, text, targets=targets, alpha=0.4)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    image, text, targets, sign = pairs(64)
    with torch.no_grad():
        correct = model.eval()(image, text, train=False).argmax(dim=1) == targets
    left_bright = sign[:, 0] > 0  # among these the right image decides
    assert targets[left_bright].unique().numel() == 2
    assert correct.float().mean() > 0.9 and correct[left_bright].float().mean() > 0.9


# ----------------------------------------------------------------------------------------------
# task protocol


def test_task_protocol_attributes():
    ve, nlvr, ta = VETask(), NLVRTask(), PretrainNLVRTask()
    assert (ve.scheduler_step_at, nlvr.scheduler_step_at, ta.scheduler_step_at) == ("epoch_end", "epoch_end",
                                                                                    "epoch_start")
    assert ve.log_format == nlvr.log_format == "{:.4f}" and ta.log_format == "{:.3f}"
    assert ve.checkpoint_policy == nlvr.checkpoint_policy == "best" and ta.checkpoint_policy == "last"
    assert ta.find_unused_parameters and not ve.find_unused_parameters
    # VE.yaml: warm_up False -> alpha from the first step; NLVR.yaml: linear ramp over epoch 0
    assert ve.alpha(full_config("ve"), 0, 0, 100) == 0.4
    assert nlvr.alpha(full_config("nlvr"), 0, 25, 100) == pytest.approx(0.1)
    assert nlvr.alpha(full_config("nlvr"), 1, 0, 100) == 0.4
    assert ta.alpha(full_config("nlvr_pretrain"), 0, 50, 100) == 0.0


class _FixedLogits(nn.Module):
    def forward(self, logits):
        return logits


def test_accuracy_is_weighted_by_batch_size():
    # batch 1: 3 of 4 right; batch 2: 0 of 1 right -> 3 / 5 (not the mean of batch accuracies, 0.375)
    batches = [
        (torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1, 0, 0])),
        (torch.tensor([[0.0, 1.0]]), torch.tensor([0])),
    ]
    accuracy = classification_accuracy(_FixedLogits(), batches, lambda model, batch: (model(batch[0]), batch[1]),
                                       torch.device("cpu"), False, "test", 1000)
    assert accuracy == pytest.approx(0.6)


# ----------------------------------------------------------------------------------------------
# scripts end to end


def _log(path: str) -> tuple[list[dict], str]:
    with open(os.path.join(path, "log.txt"), encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")], lines[-1]


def test_ve_fine_tunes_from_the_pretraining_checkpoint(demo_data, pretrain_checkpoint, tmp_path):
    import VE

    out = str(tmp_path / "ve")
    flags = demo_flags(demo_data, "json", out, os.path.join(REPO, DEMO_CONFIGS["ve"]))
    VE.main(["--checkpoint", pretrain_checkpoint] + flags + ["schedular.epochs=2"])
    records, last = _log(out)
    assert [list(r) for r in records] == [["train_lr", "train_loss", "val_acc", "test_acc", "epoch"]] * 2
    assert all(isinstance(r["val_acc"], str) and len(r["val_acc"].split(".")[1]) == 4 for r in records)
    best = max(float(r["val_acc"]) for r in records)
    assert best > 0.55, records  # chance is 1/3
    assert last.startswith("best epoch: ")
    saved = torch.load(os.path.join(out, "checkpoint_best.pth"), map_location="cpu", weights_only=False)
    assert "cls_head.2.weight" in saved["model"] and saved["best"] == pytest.approx(best)


def test_resume_of_a_task_that_steps_its_scheduler_at_epoch_ends(demo_data, tmp_path):
    """VE steps the scheduler after each epoch, after the epoch's checkpoint is written: the resumed run
    must step it before its first epoch, or that epoch trains at the previous epoch's learning rate."""
    import VE

    def flags(out):
        return demo_flags(demo_data, "json", str(out), os.path.join(REPO, DEMO_CONFIGS["ve"])) + [
            "schedular.epochs=3", "save_step=1"]

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    VE.main(flags(full))
    VE.main(flags(resumed) + ["--checkpoint", str(full / "checkpoint_00.pth"), "--resume"])
    expected, _ = _log(str(full))
    records, last = _log(str(resumed))
    assert records == expected[1:]
    assert last == _log(str(full))[1]  # the best epoch over the whole run


def test_text_assignment_then_nlvr_then_evaluate(demo_data, pretrain_checkpoint, tmp_path):
    import NLVR
    import Pretrain_nlvr

    ta_out = str(tmp_path / "ta")
    ta_config = os.path.join(REPO, DEMO_CONFIGS["nlvr_pretrain"])
    Pretrain_nlvr.main(["--checkpoint", pretrain_checkpoint] + demo_flags(demo_data, "json_pretrain", ta_out, ta_config)
                       + ["schedular.epochs=2"])
    records, _ = _log(ta_out)
    assert list(records[0]) == ["train_lr", "train_loss", "epoch"]
    ta_checkpoint = os.path.join(ta_out, "checkpoint_last.pth")
    assert "ta_head.weight" in read_checkpoint(ta_checkpoint)["model"]

    out = str(tmp_path / "nlvr")
    flags = demo_flags(demo_data, "json", out, os.path.join(REPO, DEMO_CONFIGS["nlvr"]))
    NLVR.main(["--checkpoint", ta_checkpoint] + flags)
    records, last = _log(out)
    assert list(records[0]) == ["train_lr", "train_loss", "val_acc", "test_acc", "epoch"]
    best = max(records, key=lambda r: float(r["val_acc"]))
    # Chance is 1/2. The demo (1,200 pairs after a 10-epoch text assignment on the 12-epoch demo
    # pretraining) reaches best val / test 0.79-0.86 / 0.82-0.85, but from this fixture's weaker
    # pretraining (ITM loss still 0.56) neither the text assignment nor NLVR learns in the time a test
    # has (docs/demo.md). What is asserted here is that it trains (the loss falls) and
    # that the protocol around it holds; the model's use of both pictures is checked by
    # test_nlvr_learns_a_label_that_needs_both_images, and the demo's NLVR floor (0.7) by the opt-in
    # tests/test_demo_slow.py.
    assert float(records[-1]["train_loss"]) < float(records[0]["train_loss"]) - 0.01, records
    assert last == f"best epoch: {best['epoch']}"

    # --evaluate (missing upstream): val + test once, the same accuracy, no checkpoint written
    eval_out = str(tmp_path / "nlvr_eval")
    NLVR.main(["--checkpoint", os.path.join(out, "checkpoint_best.pth"), "--evaluate"]
              + demo_flags(demo_data, "json", eval_out, os.path.join(REPO, DEMO_CONFIGS["nlvr"])))
    records, last = _log(eval_out)
    assert records == [{"val_acc": best["val_acc"], "test_acc": best["test_acc"], "epoch": 0}]
    assert not [name for name in os.listdir(eval_out) if name.endswith(".pth")]

