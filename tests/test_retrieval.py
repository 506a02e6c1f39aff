"""Retrieval: model keys and checkpoint remap against the official layouts, the training forward,
batched vs per-query evaluation, recall metrics, and Retrieval.py end to end on generated data."""

from __future__ import annotations

import json
import math
import os
import types

import numpy as np
import pytest
import torch

from conftest import REPO, demo_config, demo_flags
from dataset import create_dataset, resolve_paths
from engine.config import load_config
from engine.retrieval_eval import (FILL_SCORE, EvalImageCollate, RetrievalFeatures, Shortlists, compute_features,
                                   itm_eval, pack_pairs, rank_rows, score_matrices, score_matrices_per_query, shortlists)
from models import MODEL_BUILDERS, losses
from models.checkpoint import adapt_state_dict, load_checkpoint, load_state_dict_checked
from models.tokenization import TokenBatch, build_tokenizer
from tools.state_dict_keys import state_dict_shapes

DATA = os.path.join(REPO, "tests", "data")
DEMO_CONFIG = os.path.join(REPO, "configs/demo/Retrieval.yaml")


def reference(name: str) -> dict:
    with open(os.path.join(DATA, f"state_dict_{name}.json")) as handle:
        return json.load(handle)


def pretrain_layout_state(device: str = "meta") -> dict[str, torch.Tensor]:
    """A state_dict laid out exactly as the official pretraining checkpoint (values irrelevant)."""
    with open(os.path.join(DATA, "summary.json")) as handle:
        dtypes = json.load(handle)["tasks"]["pretrain"]["non_float32"]
    return {key: torch.empty(shape, device=device, dtype=getattr(torch, dtypes.get(key, "float32")))
            for key, shape in reference("pretrain").items()}


def expected_unexpected(pretrain_keys) -> set[str]:
    """models.md §5: MLM heads, hierarchical projections and the MAE parts are left over."""
    prefixes = ("text_encoder.cls.", "text_encoder_m.cls.", "vision_proj_hidden.", "text_proj_hidden.", "mae_proj.",
                "mask_token", "decoder_")
    return {key for key in pretrain_keys if key.startswith(prefixes)}


def tiny_config(**overrides) -> dict:
    return demo_config("Retrieval", **overrides)


@pytest.fixture()
def tiny_model(tokenizer):
    torch.manual_seed(0)
    return MODEL_BUILDERS["retrieval"](tiny_config(), text_encoder=None, tokenizer=tokenizer)


# --- keys and checkpoint remap ------------------------------------------------------------------


@pytest.mark.parametrize("config, name", [("configs/Retrieval_coco.yaml", "retrieval_coco"),
                                          ("configs/Retrieval_flickr.yaml", "retrieval_flickr")])
def test_state_dict_matches_the_official_retrieval_model(config, name):
    shapes = state_dict_shapes("retrieval", load_config(os.path.join(REPO, config)))
    assert shapes == reference(name)
    assert len(shapes) == 911


def test_idx_queue_starts_at_minus_100_and_temp_is_not_clamped(tiny_model, tokenizer):
    assert tiny_model.idx_queue.dtype == torch.long and (tiny_model.idx_queue == -100).all()
    assert tiny_model.idx_queue.shape == (1, tiny_config()["queue_size"])
    with torch.no_grad():
        tiny_model.temp.fill_(0.9)  # above the pretraining clamp (0.5): fine-tuning keeps it
    batch = make_batch(tokenizer, 4, ids=[0, 0, 1, 2])
    tiny_model(*batch[:2], alpha=0.4, idx=batch[2])
    assert tiny_model.temp.item() == pytest.approx(0.9)


def test_pretraining_layout_remaps_to_retrieval_with_only_idx_queue_missing():
    """The official pretraining key layout (976 entries) loads into the full-size model (meta tensors)."""
    config = dict(load_config(os.path.join(REPO, "configs/Retrieval_coco.yaml")), init_bert=False)
    config["bert_config"] = os.path.join(REPO, config["bert_config"])
    with torch.device("meta"):
        model = MODEL_BUILDERS["retrieval"](config, text_encoder=None, tokenizer=None)
    state = pretrain_layout_state()
    adapted = adapt_state_dict("retrieval", state, model, training=True)
    assert adapted["visual_encoder.pos_embed"].shape == (1, 530, 768)  # 16x16 -> 23x23 (+CLS)
    assert adapted["visual_encoder_m.pos_embed"].shape == (1, 530, 768)
    report = load_state_dict_checked(model, adapted)
    assert report.missing_keys == ["idx_queue"]
    assert set(report.unexpected_keys) == expected_unexpected(state)
    assert sum(k.startswith("text_encoder.cls.") for k in report.unexpected_keys) == 7
    assert sum(k.startswith("text_encoder_m.cls.") for k in report.unexpected_keys) == 7


def test_real_pretraining_checkpoint_loads_into_the_tiny_model(pretrain_checkpoint, tokenizer):
    torch.manual_seed(0)
    model = MODEL_BUILDERS["retrieval"](tiny_config(), text_encoder=None, tokenizer=tokenizer)
    report, checkpoint = load_checkpoint(model, pretrain_checkpoint, "retrieval")
    assert report.missing_keys == ["idx_queue"]
    assert set(report.unexpected_keys) == expected_unexpected(checkpoint["model"])
    source = checkpoint["model"]
    own = model.state_dict()
    for key in ("text_encoder.bert.encoder.layer.4.crossattention.self.key.weight",
                "text_encoder_m.bert.embeddings.word_embeddings.weight"):
        assert torch.equal(own[key.replace("bert.", "")], source[key])
    for key in ("image_queue", "text_queue", "queue_ptr", "temp", "kw_proj_m.weight", "visual_encoder.pos_embed"):
        assert torch.equal(own[key], source[key])  # queues, pointer and temp are inherited (§5)
    assert (model.idx_queue == -100).all()


# --- training forward ---------------------------------------------------------------------------


def make_batch(tokenizer, batch: int, ids: list[int]):
    torch.manual_seed(1)
    captions = ["a small red circle on the left", "a blue square", "a large green star at the top",
                "there is a white cross in the middle"] * 4
    vcs = ["red circle blue small left", "blue square", "green star large", "white cross middle"] * 4
    caption = tokenizer(captions[:batch], padding="longest", max_length=25)
    vc = tokenizer(vcs[:batch], padding="longest", max_length=55)
    return torch.randn(batch, 3, 64, 64), (caption, vc), torch.tensor(ids)


def test_forward_backward_gives_finite_losses_and_gradients_everywhere(tiny_model, tokenizer):
    image, text, idx = make_batch(tokenizer, 4, ids=[5, 5, 7, 9])
    out = tiny_model(image, text, alpha=0.4, idx=idx)
    assert set(out) == {"loss_ita", "loss_itm"}
    assert all(torch.isfinite(v) for v in out.values())
    (out["loss_ita"] + out["loss_itm"]).backward()
    no_grad = [n for n, p in tiny_model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    frozen = [n for n, p in tiny_model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.split(".")[0].endswith("_m") for n in frozen)
    # the image ids went into the queue with the momentum features
    assert tiny_model.idx_queue[0, :4].tolist() == [5, 5, 7, 9]
    assert tiny_model.queue_ptr.item() == 4


def negative_sampling_weights(model, tokenizer, monkeypatch, ids: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run one retrieval forward with image ids ``ids``; return the weights each ITM negative draw
    received (texts for images, images for texts) and the ids."""
    seen = []
    original = losses.sample_negatives

    def spy(weights):
        seen.append(weights.detach().clone())
        return original(weights)

    monkeypatch.setattr(losses, "sample_negatives", spy)
    image, text, idx = make_batch(tokenizer, len(ids), ids=ids)
    model(image, text, alpha=0.4, idx=idx)
    return seen, idx


def test_itm_negatives_never_show_the_same_image(tiny_model, tokenizer, monkeypatch):
    seen, idx = negative_sampling_weights(tiny_model, tokenizer, monkeypatch, [3, 3, 8, 3])
    same = idx[:, None] == idx[None, :]
    assert len(seen) == 2
    for weights in seen:
        assert (weights[same] == 0).all() and (weights[~same] > 0).all()


def test_random_itm_negatives_are_uniform_over_the_allowed_items(tiny_model, tokenizer, monkeypatch):
    monkeypatch.setattr(tiny_model, "itm_negatives", "random")
    seen, idx = negative_sampling_weights(tiny_model, tokenizer, monkeypatch, [3, 3, 8, 3])
    allowed = (idx[:, None] != idx[None, :]).float()
    assert len(seen) == 2 and all(torch.equal(weights, allowed) for weights in seen)


def test_unknown_itm_negatives_value_is_an_error_naming_the_key(tokenizer):
    with pytest.raises(ValueError, match="itm_negatives is 'hardest'"):
        MODEL_BUILDERS["retrieval"](tiny_config(itm_negatives="hardest"), text_encoder=None, tokenizer=tokenizer)


def test_contrastive_targets_spread_over_every_caption_of_the_image(tiny_model):
    idx = torch.tensor([4, 4, 6])
    tiny_model.idx_queue[0, :2] = torch.tensor([4, 6])
    targets = tiny_model.positive_targets(3, 3 + tiny_model.queue_size, torch.device("cpu"), idx)
    assert torch.allclose(targets.sum(dim=1), torch.ones(3))
    assert targets[0, :5].tolist() == pytest.approx([1 / 3, 1 / 3, 0, 1 / 3, 0])
    assert targets[2, :5].tolist() == pytest.approx([0, 0, 0.5, 0, 0.5])


# --- evaluation ---------------------------------------------------------------------------------


def test_rank_rows_split_like_the_original():
    assert [rank_rows(10, 3, r) for r in range(3)] == [range(0, 4), range(4, 8), range(8, 10)]
    assert rank_rows(2, 4, 3) == range(2, 2)  # more ranks than rows: empty block


def test_pack_pairs_scores_each_unique_pair_once():
    lists = Shortlists(image_rows=torch.tensor([0, 1]), i2t=torch.tensor([[2, 0], [0, 1]]),
                       text_rows=torch.tensor([0, 1, 2]), t2i=torch.tensor([[0, 2], [1, 0], [0, 1]]))
    packed = pack_pairs(lists, num_texts=3, group_size=2)
    requested = [(0, 2), (0, 0), (1, 0), (1, 1),  # i2t rows, then t2i rows as (image, text)
                 (0, 0), (2, 0), (1, 1), (0, 1), (0, 2), (1, 2)]
    unique = [(int(p) // 3, int(p) % 3) for p in packed.pair_ids]
    assert sorted(unique) == sorted(set(requested)) and len(unique) == 7  # shared pairs scored once
    assert [unique[i] for i in packed.inverse.tolist()] == requested
    # groups hold texts of one image only; images 0 and 1 have 3 pairs each -> 2 groups of size 2
    assert packed.size == 2 and packed.group_image.tolist() == [0, 0, 1, 1, 2]
    flat = packed.group_texts.reshape(-1)
    assert sorted(packed.pair_slot.tolist()) == sorted(set(packed.pair_slot.tolist()))
    for (image, text), slot in zip(unique, packed.pair_slot.tolist()):
        assert packed.group_image[slot // packed.size] == image and flat[slot] == text
    for group, image in enumerate(packed.group_image.tolist()):  # padding slots repeat a text of the image
        assert all((image, int(t)) in unique for t in packed.group_texts[group])


def random_features(model, tokenizer, num_images: int, texts: list[str]) -> RetrievalFeatures:
    torch.manual_seed(2)
    model.eval()
    with torch.no_grad():
        vc = tokenizer(["red circle"] * num_images, padding="max_length", max_length=55)
        image_embeds, image_mask = model.encode_image(torch.randn(num_images, 3, 64, 64), vc)
        caption = tokenizer(texts, padding="max_length", max_length=25)
        text_embeds = model.encode_text(caption)
        return RetrievalFeatures(image_embeds, image_mask, model.image_features(image_embeds), text_embeds,
                                 caption.attention_mask, model.text_features(text_embeds))


@pytest.fixture(scope="module")
def eval_setup(demo_data, pretrain_checkpoint, tokenizer):
    """The tiny model from the pretraining checkpoint and its features of the generated val split."""
    config = resolve_paths("Retrieval", tiny_config(), demo_data, os.path.join(demo_data, "json"))
    _, val, _ = create_dataset("re", config, demo_data)
    torch.manual_seed(0)
    model = MODEL_BUILDERS["retrieval"](config, text_encoder=None, tokenizer=tokenizer)
    load_checkpoint(model, pretrain_checkpoint, "retrieval")
    loader = torch.utils.data.DataLoader(val, batch_size=7, collate_fn=EvalImageCollate(tokenizer))
    features = compute_features(model, loader, val.text, tokenizer, torch.device("cpu"), text_batch_size=32)
    return model, features, val


@pytest.mark.parametrize("k_test, group_size, pairs_per_batch", [(5, 4, 24), (500, 32, 300)])
def test_batched_scores_equal_the_per_query_loop(eval_setup, k_test, group_size, pairs_per_batch):
    model, features, val = eval_setup
    reference_i2t, reference_t2i = score_matrices_per_query(model, features, k_test)
    i2t, t2i = score_matrices(model, features, k_test, pairs_per_batch=pairs_per_batch, group_size=group_size)
    torch.testing.assert_close(i2t, reference_i2t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t2i, reference_t2i, atol=1e-5, rtol=1e-5)
    num_images, num_texts = features.num_images, features.num_texts
    assert ((i2t != FILL_SCORE).sum(dim=1) == min(k_test, num_texts)).all()  # k_test > candidates: all of them
    assert ((t2i != FILL_SCORE).sum(dim=1) == min(k_test, num_images)).all()
    assert itm_eval(i2t.numpy(), t2i.numpy(), val.txt2img, val.img2txt) == itm_eval(
        reference_i2t.numpy(), reference_t2i.numpy(), val.txt2img, val.img2txt)


def test_scores_are_the_itm_match_logit_of_the_itc_shortlist(eval_setup):
    model, features, _ = eval_setup
    i2t, t2i = score_matrices(model, features, 3)
    sims = features.image_feats @ features.text_feats.t()
    lists = shortlists(sims, 3)
    image, texts = 5, lists.i2t[5]
    assert set(torch.nonzero(i2t[image] != FILL_SCORE).view(-1).tolist()) == set(texts.tolist())
    with torch.no_grad():
        logits = model.itm_logits(features.text_embeds[texts], features.text_mask[texts],
                                  features.image_embeds[image].expand(3, -1, -1))
    torch.testing.assert_close(i2t[image, texts], logits[:, 1], atol=1e-5, rtol=1e-5)


def test_batched_scores_handle_a_vc_padding_mask(tokenizer):
    torch.manual_seed(0)
    model = MODEL_BUILDERS["retrieval"](tiny_config(mask_vc_padding=True), text_encoder=None, tokenizer=tokenizer)
    features = random_features(model, tokenizer, 5, ["a red circle", "a blue square on the left", "a star"] * 4)
    assert features.image_mask is not None
    reference_scores = score_matrices_per_query(model, features, 4)
    for got, want in zip(score_matrices(model, features, 4, group_size=3, pairs_per_batch=9), reference_scores):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def ranked_row(num_columns: int, truth: list[int], position: int) -> list[float]:
    """Scores that put the ``truth`` columns (consecutively) at ``position`` of the descending order."""
    order = [c for c in range(num_columns) if c not in truth]
    order[position:position] = truth
    scores = [0.0] * num_columns
    for rank, column in enumerate(order):
        scores[column] = float(num_columns - rank)
    return scores


def test_itm_eval_on_a_hand_made_ranking():
    img2txt = {i: [3 * i, 3 * i + 1, 3 * i + 2] for i in range(4)}
    txt2img = {t: t // 3 for t in range(12)}
    # Best position of a ground-truth caption per image: 0, 4, 9, 2.
    i2t = np.array([ranked_row(12, img2txt[i], p) for i, p in enumerate([0, 4, 9, 2])])
    # Position of each text's image: five at 0, four at 1, one at 2, two at 3.
    t2i = np.array([ranked_row(4, [txt2img[t]], p) for t, p in enumerate([0, 0, 1, 3, 2, 0, 1, 1, 0, 3, 1, 0])])
    result = itm_eval(i2t, t2i, txt2img, img2txt)
    assert result["txt_r1"] == pytest.approx(25.0)
    assert result["txt_r5"] == pytest.approx(75.0)
    assert result["txt_r10"] == pytest.approx(100.0)
    assert result["img_r1"] == pytest.approx(500 / 12)
    assert result["img_r5"] == result["img_r10"] == pytest.approx(100.0)
    assert result["txt_r_mean"] == pytest.approx(200 / 3)
    assert result["img_r_mean"] == pytest.approx((500 / 12 + 200) / 3)
    assert result["r_mean"] == pytest.approx((result["txt_r_mean"] + result["img_r_mean"]) / 2)
    assert list(result) == ["txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10",
                            "img_r_mean", "r_mean"]


# --- Retrieval.py end to end --------------------------------------------------------------------

FINETUNE_EPOCHS = 4
METRICS = ["txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean"]


@pytest.fixture(scope="module")
def finetuned(demo_data, pretrain_checkpoint, tmp_path_factory):
    import Retrieval

    out = str(tmp_path_factory.mktemp("retrieval"))
    flags = demo_flags(demo_data, "json", out, DEMO_CONFIG)
    # k_test 4: the same share of the 24 evaluation images as the demo config's 8 of 50
    record = Retrieval.main(["--checkpoint", pretrain_checkpoint] + flags + [f"schedular.epochs={FINETUNE_EPOCHS}",
                                                                             "batch_size_train=32", "k_test=4"])
    return out, record


def read_log(out: str) -> tuple[list[dict], str]:
    with open(os.path.join(out, "log.txt")) as handle:
        text = handle.read()
    lines = text.split("\n")
    return [json.loads(line) for line in lines[:-1]], lines[-1]


def chance_r_mean(num_images: int, captions_per_image: int) -> float:
    """Expected r_mean of a random ranking: i2t hits if any of the image's captions is in the top k."""
    texts = num_images * captions_per_image
    txt = [100 * (1 - math.comb(texts - captions_per_image, k) / math.comb(texts, k)) for k in (1, 5, 10)]
    img = [100 * k / num_images for k in (1, 5, 10)]
    return (sum(txt) / 3 + sum(img) / 3) / 2


def test_finetuning_learns_far_above_chance(finetuned, demo_data):
    """From the test pretraining checkpoint, 4 short epochs lift recall far above a random ranking.

    Measured at the best epoch: val r_mean 42.4 (chance 21.0), val R@1 20.8 (i2t) and 19.2 (t2i),
    test R@1 20.8 / 8.3, against 4.2 for both. The demo-size run (run_demo.sh) goes further.
    """
    out, _ = finetuned
    records, last_line = read_log(out)
    with open(os.path.join(demo_data, "json", "retrieval_val.json")) as handle:
        val = json.load(handle)
    chance = chance_r_mean(len(val), len(val[0]["caption"]))
    assert 20 < chance < 22
    best = records[int(last_line.split(": ")[1])]
    assert best["val_r_mean"] > 1.6 * chance, (best, chance)
    r1_chance = 100 / len(val)  # one image of 24 (i2t: 5 of 120 captions, about the same)
    assert best["val_txt_r1"] > 3 * r1_chance and best["val_img_r1"] > 3 * r1_chance, best
    assert best["test_txt_r1"] > 3 * r1_chance and best["test_img_r1"] > 1.5 * r1_chance, best


def test_finetuning_logs_and_keeps_the_best_epoch(finetuned):
    """Log format of Retrieval.py, best-epoch selection on val r_mean and consistent recall values."""
    out, record = finetuned
    records, last_line = read_log(out)
    keys = ["train_lr", "train_loss_itm", "train_loss_ita"] + [f"{s}_{m}" for s in ("val", "test") for m in METRICS]
    assert [list(r) for r in records] == [keys + ["epoch"]] * FINETUNE_EPOCHS
    assert all(isinstance(r["train_loss_ita"], str) and np.isfinite(float(r["train_loss_ita"])) for r in records)
    assert last_line.startswith("best epoch: ")  # no trailing newline, as the original
    best_epoch = int(last_line.split(": ")[1])
    val_means = [r["val_r_mean"] for r in records]
    assert best_epoch == val_means.index(max(val_means))
    saved = torch.load(os.path.join(out, "checkpoint_best.pth"), map_location="cpu", weights_only=False)
    assert saved["epoch"] == best_epoch and saved["best"] == pytest.approx(max(val_means))
    for r in records:
        for split in ("val", "test"):
            for side in ("txt", "img"):
                r1, r5, r10 = (r[f"{split}_{side}_r{k}"] for k in (1, 5, 10))
                assert 0 <= r1 <= r5 <= r10 <= 100
                assert r[f"{split}_{side}_r_mean"] == pytest.approx((r1 + r5 + r10) / 3)
            assert r[f"{split}_r_mean"] == pytest.approx((r[f"{split}_txt_r_mean"] + r[f"{split}_img_r_mean"]) / 2)


def test_evaluate_reproduces_the_logged_numbers(finetuned, demo_data, tmp_path):
    import Retrieval

    out, _ = finetuned
    records, last_line = read_log(out)
    best = records[int(last_line.split(": ")[1])]
    flags = demo_flags(demo_data, "json", str(tmp_path), DEMO_CONFIG)
    record = Retrieval.main(["--evaluate", "--checkpoint", os.path.join(out, "checkpoint_best.pth")] + flags
                            + ["k_test=4"])
    for key, value in record.items():
        if key != "epoch":
            assert value == pytest.approx(best[key], abs=1e-9), key
    assert set(record) == {k for k in best if not k.startswith("train_")}


def test_checkpoint0_is_loaded_before_checkpoint(demo_data, pretrain_checkpoint, tokenizer):
    from engine.tasks import RetrievalTask

    config = resolve_paths("Retrieval", tiny_config(), demo_data, os.path.join(demo_data, "json"))
    args = types.SimpleNamespace(text_encoder=None, checkpoint0=pretrain_checkpoint, checkpoint="", evaluate=False)
    torch.manual_seed(0)
    alone = RetrievalTask().build_model(config, args, tokenizer)  # ignored without --checkpoint
    args.checkpoint = pretrain_checkpoint
    loaded = RetrievalTask().build_model(config, args, tokenizer)
    source = torch.load(pretrain_checkpoint, map_location="cpu", weights_only=False)["model"]
    assert torch.equal(loaded.text_queue, source["text_queue"])
    assert not torch.equal(alone.text_queue, source["text_queue"])


def test_checkpoint_of_another_model_is_a_clear_error(demo_data, pretrain_checkpoint, tmp_path):
    import Retrieval

    state = torch.load(pretrain_checkpoint, map_location="cpu", weights_only=False)["model"]
    flags = demo_flags(demo_data, "json", str(tmp_path / "out"), DEMO_CONFIG)
    wrong_shape = dict(state, **{"text_proj.weight": torch.zeros(7, 64)})
    torch.save({"model": wrong_shape}, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="shape mismatch.*text_proj.weight"):
        Retrieval.main(["--evaluate", "--checkpoint", str(tmp_path / "shape.pth")] + flags)
    no_heads = {k: v for k, v in state.items() if not k.startswith(("itm_head", "vision_proj."))}
    torch.save({"model": no_heads}, tmp_path / "heads.pth")
    with pytest.raises(ValueError, match="lacks weights.*itm_head"):
        Retrieval.main(["--evaluate", "--checkpoint", str(tmp_path / "heads.pth")] + flags)
    mostly_missing = {k: v for k, v in state.items() if k.startswith("kw_")}
    torch.save({"model": mostly_missing}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="another task"):
        Retrieval.main(["--evaluate", "--checkpoint", str(tmp_path / "other.pth")] + flags)


def test_eval_collate_pads_visual_concepts_to_55(tokenizer):
    collate = EvalImageCollate(tokenizer)
    images, vc, indices = collate([((torch.zeros(3, 4, 4), "red circle"), 0), ((torch.zeros(3, 4, 4), "blue"), 1)])
    assert isinstance(vc, TokenBatch) and vc.input_ids.shape == (2, 55)
    assert images.shape == (2, 3, 4, 4) and indices.tolist() == [0, 1]


# --- two processes ------------------------------------------------------------------------------

EVAL_TEXTS = ["a red circle", "a blue square on the left", "a star", "a large green cross at the top",
              "there is a white triangle"] * 3


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eval_scores(tokenizer_dir: str) -> dict:
    tokenizer = build_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = MODEL_BUILDERS["retrieval"](tiny_config(), text_encoder=None, tokenizer=tokenizer)
    features = random_features(model, tokenizer, 7, EVAL_TEXTS)
    batched = score_matrices(model, features, 4, group_size=3, pairs_per_batch=12)
    loop = score_matrices_per_query(model, features, 4)
    return {"batched": batched, "loop": loop}


def _eval_worker(rank: int, port: int, tokenizer_dir: str, out_dir: str) -> None:
    import utils

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        os.environ.pop(name, None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    utils.init_distributed_mode(utils.AttrDict(device="cpu", dist_url="env://", world_size=2))
    torch.save(_eval_scores(tokenizer_dir), os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_two_processes_split_rows_and_sum_like_the_original(demo_data, tmp_path):
    """Each rank scores its block of rows; the all-reduced sum is score - 100 there and -200 elsewhere."""
    import torch.multiprocessing as mp

    tokenizer_dir = os.path.join(demo_data, "tokenizer")
    mp.spawn(_eval_worker, args=(_free_port(), tokenizer_dir, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(2)]
    single = _eval_scores(tokenizer_dir)
    for one, reference_scores in zip(single["loop"], single["batched"]):
        torch.testing.assert_close(one, reference_scores, atol=1e-5, rtol=1e-5)
    expected = [torch.where(m != FILL_SCORE, m + FILL_SCORE, torch.full_like(m, 2 * FILL_SCORE))
                for m in single["loop"]]
    for result in ranks:
        for method in ("batched", "loop"):
            for got, want in zip(result[method], expected):
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
