"""VQA: model layout and checkpoint remap, answer ranking, the VQA accuracy, and VQA.py end to end."""

from __future__ import annotations

import collections
import json
import os
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, demo_config, demo_flags
from engine.config import load_config
from engine.tasks.vqa import merge_predictions, score_predictions
from engine.vqa_metric import best_achievable_accuracy, normalize_answer, question_accuracy, vqa_accuracy
from models.checkpoint import adapt_state_dict, load_checkpoint, read_checkpoint
from models.model_vqa import ViCHAVQA

DATA = os.path.join(REPO, "tests", "data")
DEMO_CONFIG = os.path.join(REPO, "configs", "demo", "VQA.yaml")


def _json(name: str):
    with open(os.path.join(DATA, name), encoding="utf-8") as handle:
        return json.load(handle)


def tiny_config(**changes) -> dict:
    return demo_config("VQA", **changes)


def tiny_model(tokenizer, **changes) -> ViCHAVQA:
    torch.manual_seed(0)
    return ViCHAVQA(tiny_config(**changes), text_encoder=None, tokenizer=tokenizer).eval()


def tiny_batch(tokenizer, batch: int = 3):
    torch.manual_seed(1)
    image = torch.randn(batch, 3, 64, 64)
    questions = ["what color is the circle on the left", "how many shapes are there", "is there a red star"][:batch]
    vcs = ["red circle left", "blue square green star middle top", "red"][:batch]
    return image, tokenizer(questions, max_length=25), tokenizer(vcs, max_length=55)


# ----------------------------------------------------------------------------------------------
# layout and checkpoint remap


def test_state_dict_matches_official_layout():
    from tools.state_dict_keys import state_dict_shapes

    shapes = state_dict_shapes("vqa", load_config(os.path.join(REPO, "configs", "VQA.yaml")))
    reference = _json("state_dict_vqa.json")
    assert sorted(set(reference) - set(shapes)) == []
    assert sorted(set(shapes) - set(reference)) == []
    assert {k: v for k, v in shapes.items() if reference[k] != v} == {}
    assert len(shapes) == 1234


def test_tiny_decoder_has_the_fusion_layers_count_and_ties_its_head(tokenizer):
    model = tiny_model(tokenizer)
    layers = model.text_decoder.bert.encoder.layer
    assert len(layers) == 6 - 3  # num_hidden_layers - fusion_layer of config_bert_tiny.json
    assert all(layer.has_cross_attention for layer in layers)
    for decoder in (model.text_decoder, model.text_decoder_m):
        assert decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight
        assert decoder.cls.predictions.decoder.bias is decoder.cls.predictions.bias
    assert [pair[0] for pair in model.model_pairs] == ["visual_encoder", "text_encoder", "text_decoder", "kw_encoder",
                                                      "kw_proj"]


def test_remap_of_the_official_pretraining_layout():
    """Every VQA key is produced; decoder layer j (and its momentum twin) <- fusion layer 6 + j."""
    pretrain = _json("state_dict_pretrain.json")
    state = {}
    for i, (key, shape) in enumerate(pretrain.items()):
        # Distinct scalar markers; the two ViT position embeddings need their real shape (resized).
        state[key] = torch.zeros(shape) if key.startswith("visual_encoder") and key.endswith("pos_embed") \
            else torch.tensor(float(i))
    grid = types.SimpleNamespace(num_patches=23 * 23)  # 380 px
    target = types.SimpleNamespace(visual_encoder=grid, visual_encoder_m=grid)
    out = adapt_state_dict("vqa", state, target, training=True, distill=True)

    vqa = _json("state_dict_vqa.json")
    assert sorted(set(vqa) - set(out)) == []  # nothing missing
    unexpected = set(out) - set(vqa)
    allowed = ("temp", "image_queue", "text_queue", "queue_ptr", "itm_head.", "vision_proj", "text_proj",
               "mae_proj.", "mask_token", "decoder_embed.", "decoder_blocks.", "decoder_norm.", "decoder_pos_embed")
    assert unexpected and all(k.startswith(allowed) for k in unexpected), sorted(unexpected)
    assert out["visual_encoder.pos_embed"].shape == (1, 1 + 23 * 23, 768)
    assert out["visual_encoder_m.pos_embed"].shape == (1, 1 + 23 * 23, 768)

    for suffix in ("", "_m"):
        for j in range(6):
            for leaf in ("crossattention.self.key.weight", "attention.self.query.bias", "output.LayerNorm.weight"):
                decoder = f"text_decoder{suffix}.bert.encoder.layer.{j}.{leaf}"
                assert torch.equal(out[decoder], state[f"text_encoder{suffix}.bert.encoder.layer.{6 + j}.{leaf}"])
        for i in range(12):
            key = f"encoder.layer.{i}.intermediate.dense.weight"
            assert torch.equal(out[f"text_encoder{suffix}.{key}"], state[f"text_encoder{suffix}.bert.{key}"])
        for leaf in ("bert.embeddings.word_embeddings.weight", "bert.embeddings.position_ids", "cls.predictions.bias",
                     "cls.predictions.decoder.weight", "cls.predictions.transform.dense.weight"):
            assert torch.equal(out[f"text_decoder{suffix}.{leaf}"], state[f"text_encoder{suffix}.{leaf}"])
        assert torch.equal(out[f"text_encoder{suffix}.embeddings.LayerNorm.bias"],
                           state[f"text_encoder{suffix}.bert.embeddings.LayerNorm.bias"])
        assert torch.equal(out[f"kw_encoder{suffix}.encoder.layer.1.output.dense.bias"],
                           state[f"kw_encoder{suffix}.encoder.layer.1.output.dense.bias"])


def test_remap_of_our_pretraining_checkpoint_into_the_tiny_model(pretrain_checkpoint, tokenizer):
    model = tiny_model(tokenizer)
    report, checkpoint = load_checkpoint(model, pretrain_checkpoint, "vqa", training=True, distill=True)
    assert report.missing_keys == []
    assert "temp" in report.unexpected_keys and "itm_head.weight" in report.unexpected_keys
    source = checkpoint["model"]
    state = model.state_dict()
    for suffix in ("", "_m"):
        for j in range(3):  # tiny: fusion layers 3..5 -> decoder layers 0..2
            leaf = "crossattention.self.value.weight"
            assert torch.equal(state[f"text_decoder{suffix}.bert.encoder.layer.{j}.{leaf}"],
                               source[f"text_encoder{suffix}.bert.encoder.layer.{3 + j}.{leaf}"])
        assert torch.equal(state[f"text_decoder{suffix}.cls.predictions.decoder.weight"],
                           source[f"text_encoder{suffix}.bert.embeddings.word_embeddings.weight"])
        assert torch.equal(state[f"text_encoder{suffix}.encoder.layer.5.output.dense.weight"],
                           source[f"text_encoder{suffix}.bert.encoder.layer.5.output.dense.weight"])
    assert torch.equal(state["visual_encoder_m.pos_embed"], source["visual_encoder_m.pos_embed"])


# ----------------------------------------------------------------------------------------------
# training loss and answer ranking


def test_training_loss_is_the_weighted_answer_likelihood(tokenizer):
    """loss = sum_a w_a * nll(answer a | question b(a)) / B, with question b repeated k[b] times."""
    model = tiny_model(tokenizer, distill=False)
    image, question, vc = tiny_batch(tokenizer)
    answers = tokenizer(["red[SEP]", "blue[SEP]", "three[SEP]", "yes[SEP]", "no[SEP]"])
    counts, weights = [2, 1, 2], torch.tensor([0.7, 0.3, 1.0, 0.6, 0.4])
    loss = model(image, (question, vc), answers, k=counts, weights=weights, train=True)["loss"]

    states = model.encode_question(image, question, vc)
    owner = [0, 0, 1, 2, 2]
    expected = 0.0
    for a, b in enumerate(owner):
        ids = answers.input_ids[a:a + 1]
        out = model.text_decoder(ids, answers.attention_mask[a:a + 1], encoder_hidden_states=states[b:b + 1],
                                 encoder_attention_mask=question.attention_mask[b:b + 1],
                                 labels=ids.masked_fill(ids == tokenizer.pad_token_id, -100))
        expected = expected + weights[a] * out.loss[0]
    torch.testing.assert_close(loss, expected / 3)


def test_distillation_weight_is_zero_unless_fixed(tokenizer):
    image, question, vc = tiny_batch(tokenizer)
    answers = tokenizer(["red[SEP]", "three[SEP]", "yes[SEP]"])
    args = dict(k=[1, 1, 1], weights=torch.ones(3), train=True)
    faithful = tiny_model(tokenizer)
    zero = faithful(image, (question, vc), answers, alpha=0.0, **args)["loss"]
    torch.testing.assert_close(faithful(image, (question, vc), answers, alpha=0.4, **args)["loss"], zero)
    fixed = tiny_model(tokenizer, fix_vqa_distill_alpha=True)
    assert not torch.allclose(fixed(image, (question, vc), answers, alpha=0.4, **args)["loss"], zero)


def test_training_step_gives_every_trainable_parameter_a_gradient(tokenizer):
    model = tiny_model(tokenizer).train()
    image, question, vc = tiny_batch(tokenizer)
    answers = tokenizer(["red[SEP]", "three[SEP]", "yes[SEP]", "no[SEP]"])
    before = model.text_decoder_m.cls.predictions.transform.dense.weight.clone()
    loss = model(image, (question, vc), answers, alpha=0.4, k=[1, 1, 2], weights=torch.tensor([1, 1, 0.5, 0.5]))["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.split(".")[0].endswith("_m"))
    torch.testing.assert_close(model.text_decoder_m.cls.predictions.transform.dense.weight, before)  # EMA of equals


def _answer_log_likelihood(model, states, mask, answers, pad_id):
    """log p(answer | question) by teacher forcing, summed over the answer's tokens after [CLS]."""
    num_answers = answers.input_ids.shape[0]
    result = torch.empty(states.shape[0], num_answers)
    for q in range(states.shape[0]):
        logits = model.text_decoder(answers.input_ids, answers.attention_mask,
                                    encoder_hidden_states=states[q:q + 1].expand(num_answers, -1, -1),
                                    encoder_attention_mask=mask[q:q + 1].expand(num_answers, -1), return_logits=True)
        log_probs = F.log_softmax(logits.float(), dim=-1).gather(2, answers.input_ids[:, 1:, None]).squeeze(2)
        result[q] = (log_probs * (answers.input_ids[:, 1:] != pad_id)).sum(dim=1)
    return result


def test_rank_answer_scores_and_the_double_counted_first_token(tokenizer):
    image, question, vc = tiny_batch(tokenizer)
    answer_list = ["red", "blue", "circle", "top left", "three", "yes", "no"]
    answers = tokenizer([a + "[SEP]" for a in answer_list])
    faithful = tiny_model(tokenizer)
    fixed = tiny_model(tokenizer, fix_vqa_rank_double_count=True)
    with torch.no_grad():
        ids_faithful, probs_faithful = faithful(image, (question, vc), answers, k=100, train=False)  # k > list: all
        ids_fixed, probs_fixed = fixed(image, (question, vc), answers, k=100, train=False)
        states = faithful.encode_question(image, question, vc)
        log_likelihood = _answer_log_likelihood(faithful, states, question.attention_mask, answers,
                                                tokenizer.pad_token_id)
        start = faithful.text_decoder(answers.input_ids[:3, :1], encoder_hidden_states=states,
                                      encoder_attention_mask=question.attention_mask).logits[:, 0]
        first = F.log_softmax(start.float(), dim=-1)[:, answers.input_ids[:, 1]]  # (B, A)

    num = len(answer_list)
    for ids, probs in ((ids_faithful, probs_faithful), (ids_fixed, probs_fixed)):
        assert ids.shape == probs.shape == (3, num)
        assert all(sorted(row) == list(range(num)) for row in ids.tolist())
        assert torch.all(probs[:, :-1] >= probs[:, 1:])
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))

    def by_answer(ids, probs):
        return torch.zeros_like(probs).scatter(1, ids, probs)

    fixed_log = by_answer(ids_fixed, probs_fixed).log()
    faithful_log = by_answer(ids_faithful, probs_faithful).log()
    # fixed: softmax of the answer log-likelihood; faithful: the first token's log-prob added once more
    torch.testing.assert_close(fixed_log, F.log_softmax(log_likelihood, dim=1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(faithful_log, F.log_softmax(log_likelihood + first, dim=1), atol=1e-4, rtol=1e-4)
    difference = faithful_log - fixed_log - first
    torch.testing.assert_close(difference, difference[:, :1].expand_as(difference), atol=1e-4, rtol=1e-4)


def test_rank_answer_shortlists_by_first_token(tokenizer):
    image, question, vc = tiny_batch(tokenizer, batch=2)
    answers = tokenizer([a + "[SEP]" for a in ["red", "blue", "green", "yes", "no", "three"]])
    model = tiny_model(tokenizer)
    with torch.no_grad():
        ids, probs = model(image, (question, vc), answers, k=2, train=False)
        states = model.encode_question(image, question, vc)
        start = model.text_decoder(answers.input_ids[:2, :1], encoder_hidden_states=states,
                                   encoder_attention_mask=question.attention_mask).logits[:, 0]
    shortlist = start[:, answers.input_ids[:, 1]].topk(2, dim=1).indices
    assert ids.shape == (2, 2)
    assert [sorted(r) for r in ids.tolist()] == [sorted(r) for r in shortlist.tolist()]


# ----------------------------------------------------------------------------------------------
# VQA accuracy


@pytest.mark.parametrize("agree, expected", [
    (0, 0.0),
    (1, 9 * (1 / 3) / 10),  # leave out the match: 0; leave out another (9x): 1/3
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # = 0.6
    (3, (3 * (2 / 3) + 7 * 1.0) / 10),  # = 0.9: three agreeing humans do not give full credit
    (4, 1.0),
    (10, 1.0),
])
def test_question_accuracy_leave_one_out(agree, expected):
    humans = ["cat"] * agree + ["dog", "bird", "fish", "cow", "pig", "hen", "fox", "owl", "ant", "bee"][: 10 - agree]
    assert question_accuracy("cat", humans) == pytest.approx(expected)


def test_answer_normalisation():
    assert normalize_answer("Two") == "2"
    assert normalize_answer("  a Dog.\n") == "dog"
    assert normalize_answer("dont") == "don't"
    assert normalize_answer("yes!") == "yes"
    assert normalize_answer("1,000") == "1000"  # a digit,digit group: marks are deleted, not spaced
    assert normalize_answer("black-and-white") == "black and white"
    assert normalize_answer("3.5") == "3.5"
    assert question_accuracy("the two", ["2"] * 10) == 1.0
    # The official script leaves unanimous human answers unnormalised; ours normalises them.
    assert question_accuracy("two", ["two"] * 10) == 1.0
    assert question_accuracy("two", ["two"] * 10, official_gt_rule=True) == 0.0
    assert question_accuracy("two", ["two"] * 9 + ["2"], official_gt_rule=True) == pytest.approx(0.3)


def test_vqa_accuracy_overall_and_per_answer_type():
    truth = {1: ["yes"] * 10, 2: ["red"] * 3 + ["blue"] * 7, 3: ["2"] * 10}
    predictions = {1: "yes", 2: "red", 3: "three"}
    result = vqa_accuracy(predictions, truth, {1: "yes/no", 2: "other", 3: "number"})
    assert result == {"overall": round(100 * (1.0 + 0.9 + 0.0) / 3, 2), "yes/no": 100.0, "other": 90.0,
                      "number": 0.0}
    with pytest.raises(KeyError, match="no ground truth"):
        vqa_accuracy({4: "yes"}, truth)


def test_best_achievable_accuracy_and_the_unreachable_answer_warning(capsys):
    candidates = {normalize_answer(a) for a in ["cat", "yes", "no"]}
    assert best_achievable_accuracy(["cat"] * 2 + ["dog"] * 8, candidates) == pytest.approx(0.6)
    assert best_achievable_accuracy(["dog"] * 10, candidates) == 0.0

    records = [{"question_id": 11, "answer": ["yes"] * 10}, {"question_id": 12, "answer": ["zebra"] * 10}]
    dataset = types.SimpleNamespace(ann=records, field=lambda i, name: records[i][name])
    metrics = score_predictions({0: 1, 1: 0}, dataset, ["cat", "yes", "no"])
    assert metrics == {"test_vqa_acc": 50.0}
    out = capsys.readouterr().out
    assert "1 of 2 test questions" in out and "can never be produced" in out and "zebra" in out
    unlabelled = types.SimpleNamespace(ann=[{"question_id": 1}], field=None)
    assert score_predictions({0: 0}, unlabelled, ["cat"]) == {}


def test_merge_predictions_covers_each_question_once():
    dataset = list(range(5))
    # DistributedSampler(shuffle=False) on 2 ranks pads rank 1 with item 0 again
    merged = merge_predictions([[(0, 7), (2, 8), (4, 9)], [(1, 3), (3, 4), (0, 5)]], dataset)
    assert merged == {0: 7, 1: 3, 2: 8, 3: 4, 4: 9}
    with pytest.raises(RuntimeError, match="cover 4 of 5"):
        merge_predictions([[(0, 1), (1, 1), (2, 1), (3, 1)]], dataset)


def test_missing_image_names_the_file(demo_data, tmp_path):
    from dataset import VQADataset, build_transform

    records = [{"question_id": 5, "question": "what?", "image": "nowhere.jpg", "dataset": "vqa", "kwords": ["red"]}]
    ann = tmp_path / "vqa.json"
    ann.write_text(json.dumps(records))
    answer_list = os.path.join(demo_data, "json", "answer_list.json")
    dataset = VQADataset(str(ann), build_transform("test", 64), str(tmp_path), str(tmp_path), split="test",
                         answer_list=answer_list)
    with pytest.raises(FileNotFoundError, match="nowhere.jpg"):
        dataset[0]


# ----------------------------------------------------------------------------------------------
# VQA.py end to end


def _majority_baseline(data: str, test_file: str) -> float:
    """VQA accuracy (%) of always answering the most frequent training answer."""
    with open(os.path.join(data, "json", "vqa_train.json"), encoding="utf-8") as handle:
        train = json.load(handle)
    with open(os.path.join(data, "json", test_file), encoding="utf-8") as handle:
        test = json.load(handle)
    majority = collections.Counter(a for record in train for a in record["answer"]).most_common(1)[0][0]
    truth = {r["question_id"]: r["answer"] for r in test}
    return vqa_accuracy({qid: majority for qid in truth}, truth)["overall"]


def test_vqa_script_fine_tunes_and_evaluates(demo_data, pretrain_checkpoint, tmp_path):
    import VQA

    out = str(tmp_path / "vqa")
    flags = demo_flags(demo_data, "json", out, DEMO_CONFIG)
    record = VQA.main(["--checkpoint", pretrain_checkpoint] + flags)

    with open(os.path.join(demo_data, "json", "vqa_val.json"), encoding="utf-8") as handle:
        test = json.load(handle)
    epochs = load_config(DEMO_CONFIG)["schedular"]["epochs"]
    with open(os.path.join(out, "result", f"vqa_result_epoch{epochs - 1}.json"), encoding="utf-8") as handle:
        result = json.load(handle)
    assert [r["question_id"] for r in result] == [r["question_id"] for r in test]
    with open(os.path.join(demo_data, "json", "answer_list.json"), encoding="utf-8") as handle:
        answer_list = set(json.load(handle))
    assert all(isinstance(r["question_id"], int) and r["answer"] in answer_list for r in result)

    baseline = _majority_baseline(demo_data, "vqa_val.json")
    assert baseline < 15.0
    assert record["test_vqa_acc"] >= baseline + 15.0, (record, baseline)
    with open(os.path.join(out, "log.txt"), encoding="utf-8") as handle:
        lines = [json.loads(line) for line in handle]
    assert [line["epoch"] for line in lines] == list(range(epochs))
    assert all(set(line) >= {"train_lr", "train_loss"} for line in lines)
    assert "test_vqa_acc" in lines[-1] and all("test_vqa_acc" not in line for line in lines[:-1])
    assert float(lines[-1]["train_loss"]) < float(lines[0]["train_loss"])
    assert read_checkpoint(os.path.join(out, "checkpoint_last.pth"))["epoch"] == epochs - 1

    # --evaluate on the fine-tuned checkpoint: an epoch-0 result file with the same answers
    evaluated = str(tmp_path / "vqa_eval")
    flags = demo_flags(demo_data, "json", evaluated, DEMO_CONFIG)
    eval_record = VQA.main(["--checkpoint", os.path.join(out, "checkpoint_last.pth"), "--evaluate"] + flags)
    assert eval_record == {"test_vqa_acc": record["test_vqa_acc"], "epoch": 0}
    with open(os.path.join(evaluated, "result", "vqa_result_epoch0.json"), encoding="utf-8") as handle:
        assert json.load(handle) == result
    assert not os.path.exists(os.path.join(evaluated, "checkpoint_last.pth"))
