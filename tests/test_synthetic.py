"""The synthetic demo data: formats, determinism, vocabulary coverage and truth of the texts."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest

from dataset import pre_caption, pre_question
from dataset import synthetic as syn

SIZES = dict(num_pretrain=6, num_retrieval=4, num_vqa=4, num_ve=4, num_nlvr=4, num_grounding=4, num_eval=3)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, dict[str, str]]:
    out = str(tmp_path_factory.mktemp("synth"))
    return out, syn.generate(out, seed=0, image_size=32, **SIZES)


def _load(paths: dict[str, str], key: str):
    with open(paths[key], encoding="utf-8") as handle:
        return json.load(handle)


def _json_files(root: str) -> dict[str, bytes]:
    files = {}
    for path in sorted(Path(root).rglob("*")):
        if path.suffix in (".json", ".p", ".txt"):
            files[str(path.relative_to(root))] = path.read_bytes()
    return files


def test_same_seed_gives_identical_files(data, tmp_path):
    out, _ = data
    syn.generate(str(tmp_path / "again"), seed=0, image_size=32, **SIZES)
    syn.generate(str(tmp_path / "other"), seed=1, image_size=32, **SIZES)
    first, again, other = _json_files(out), _json_files(str(tmp_path / "again")), _json_files(str(tmp_path / "other"))
    assert len(first) == 23 and first == again
    differing = [name for name in first if name.endswith(".json") and first[name] != other[name]]
    assert len(differing) >= 15  # every file with sampled content changes (answer_list does not)


def test_layout_and_counts(data):
    out, paths = data
    assert Path(out, "README.md").is_file() and Path(out, "tokenizer", "vocab.txt").is_file()
    counts = {task: len(os.listdir(Path(out, "images", task))) for task in
              ("pretrain", "retrieval", "vqa", "ve", "nlvr", "refcoco")}
    assert counts == {"pretrain": 6, "retrieval": 4 + 6, "vqa": 4 + 6, "ve": 4 + 6, "nlvr": 2 * (4 + 6),
                      "refcoco": 4 + 9}
    assert len(_load(paths, "retrieval_train")) == 4 * 5 and len(_load(paths, "retrieval_val")) == 3
    assert len(_load(paths, "vqa_train")) == 4 * 3 and len(_load(paths, "ve_dev")) == 3 * 3
    assert len(_load(paths, "nlvr_test")) == 3 * 2


def test_record_formats(data):
    out, paths = data
    kw = {"kwords"}
    formats = {
        "retrieval_train": [{"image", "caption", "image_id"} | kw],
        "retrieval_val": [{"image", "caption"} | kw],
        "vqa_train": [{"question_id", "question", "answer", "image", "dataset"} | kw],
        "vqa_test": [{"question_id", "question", "image", "dataset"} | kw],
        "vg_qa": [{"question", "answer", "image", "dataset"} | kw],
        "ve_train": [{"image", "sentence", "label"} | kw],
        "nlvr_dev": [{"images", "sentence", "label", "kwords1", "kwords2"}],
        "refcoco_train": [{"image", "text", "ref_id"} | kw],
        "refcoco_test": [{"image", "text", "ref_id"} | kw],
        "pretrain": [{"image", "caption", "image_id"} | kw, {"image", "caption"} | kw],
    }
    for key, allowed in formats.items():
        for record in _load(paths, key):
            assert set(record) in allowed, key
            for field in ("kwords", "kwords1", "kwords2"):
                if field in record:
                    assert len(record[field]) == 15 and len(set(record[field])) == 15
    pretrain = _load(paths, "pretrain")
    assert pretrain[0]["image"] == "/data/vicha/data/images/pretrain/000000.jpg"
    assert isinstance(pretrain[0]["caption"], str) and isinstance(pretrain[1]["caption"], list)
    for record in _load(paths, "retrieval_test"):
        assert len(record["caption"]) == 5 and Path(out, "images/retrieval", record["image"]).is_file()
    for record in _load(paths, "vqa_val"):
        assert len(record["answer"]) == 10 and record["dataset"] == "vqa"
    assert all(Path(out, "images", r["image"]).is_file() for r in _load(paths, "vg_qa"))
    assert all(Path(out, "images/ve", r["image"] + ".jpg").is_file() for r in _load(paths, "ve_test"))
    nlvr = _load(paths, "nlvr_train")
    assert {r["label"] for r in nlvr} == {"True", "False"}
    assert all(Path(out, "images/nlvr", p).is_file() for r in nlvr for p in r["images"])
    ve = _load(paths, "ve_train")
    assert [sorted(r["label"] for r in ve[i:i + 3]) for i in range(0, len(ve), 3)] == \
        [["contradiction", "entailment", "neutral"]] * 4
    assert set(_load(paths, "answer_list")) >= {a for r in _load(paths, "vqa_train") for a in r["answer"]}


def test_refer_files(data):
    _, paths = data
    with open(paths["refs"], "rb") as handle:
        refs = pickle.load(handle)
    instances = _load(paths, "instances")
    assert set(instances) == {"images", "annotations", "categories"}
    anns = {a["id"]: a for a in instances["annotations"]}
    images = {i["id"]: i for i in instances["images"]}
    dets = _load(paths, "dets")
    assert {r["split"] for r in refs} == {"train", "val", "testA", "testB"}
    for ref in refs:
        assert {"ref_id", "ann_id", "image_id", "category_id", "split", "sentences"} <= set(ref)
        assert {"sent_id", "tokens", "raw", "sent"} <= set(ref["sentences"][0])
        ann = anns[ref["ann_id"]]
        assert ann["image_id"] == ref["image_id"] and ann["category_id"] == ref["category_id"]
        assert images[ref["image_id"]]["height"] == 32
        candidates = [d[:4] for d in dets[str(ref["image_id"])]]
        assert ann["bbox"] in candidates and len(candidates) >= 4  # every object + 2 distractors
    by_id = {r["ref_id"]: r for r in refs}
    test_splits = {by_id[r["ref_id"]]["split"] for r in _load(paths, "refcoco_test")}
    assert test_splits == {"testA", "testB"}
    assert {by_id[r["ref_id"]]["split"] for r in _load(paths, "refcoco_val")} == {"val"}


def _texts(paths: dict[str, str]) -> list[str]:
    """Every generated text after the loaders' cleaning, plus answers and concept words."""
    texts = []
    for key in ("pretrain", "retrieval_train", "retrieval_val", "retrieval_test"):
        for record in _load(paths, key):
            captions = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
            texts += [pre_caption(c, 30) for c in captions]
    for key in ("vqa_train", "vqa_val", "vqa_test", "vg_qa"):
        for record in _load(paths, key):
            texts.append(pre_question(record["question"], 50))
            answers = record.get("answer", [])
            texts += answers if isinstance(answers, list) else [answers]
    for key in ("ve_train", "ve_dev", "nlvr_train", "nlvr_test"):
        texts += [pre_caption(r["sentence"], 30) for r in _load(paths, key)]
    for key in ("refcoco_train", "refcoco_val", "refcoco_test"):
        texts += [pre_caption(r["text"], 30) for r in _load(paths, key)]
    for key in ("pretrain", "ve_test", "nlvr_dev"):
        for record in _load(paths, key):
            texts += [" ".join(record.get(k, [])) for k in ("kwords", "kwords1", "kwords2")]
    return [t for t in texts if t]


def test_every_text_uses_vocab_words(data):
    out, paths = data
    vocab = Path(paths["vocab"]).read_text().split("\n")[:-1]
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(vocab) == len(set(vocab))
    assert {"a", "z", "##q", "0", "##9", "?", ","} <= set(vocab)
    words = set(vocab)
    texts = _texts(paths)
    assert len(texts) > 200
    unknown = {w for t in texts for w in t.split(" ") if w not in words}
    assert not unknown
    # Each word is one piece, so a text of at most 24 words survives truncation to 25 tokens.
    assert max(len(t.split(" ")) for t in texts) <= syn.MAX_CAPTION_WORDS


def test_kwords_start_with_true_concepts(data):
    _, paths = data
    for record in _load(paths, "retrieval_val"):
        mentioned = {w for w in record["caption"][0].replace(",", "").split() if w in syn.COLOURS or w in syn.SHAPES}
        assert set(record["kwords"][:len(mentioned)]) == mentioned


# ----------------------------------------------------------------------------------------------
# Truth of the language on hand-made scenes


def _scene(*objects: tuple[str, str, str, str]) -> syn.Scene:
    objs = tuple(syn.SceneObject(*o) for o in objects)
    return syn.Scene(objs, (40, 40, 40), tuple((0, 0) for _ in objs))


def test_render_puts_each_colour_in_its_box():
    scene = _scene(("circle", "red", "large", "left"), ("cross", "blue", "small", "top"),
                   ("star", "yellow", "large", "bottom"))
    img = np.asarray(syn.render(scene, 96))
    for i, obj in enumerate(scene.objects):
        x, y, w, h = syn.object_box(scene, i, 96)
        centre = img[int(y + h / 2), int(x + w / 2)]
        assert np.abs(centre.astype(int) - syn.COLOURS[obj.colour]).max() <= 2
    assert tuple(img[1, 1]) == (40, 40, 40)


def test_scene_classes_name_exactly_the_shapes_colours_and_coloured_shapes_held():
    scene = _scene(("circle", "red", "large", "left"), ("star", "blue", "small", "top"),
                   ("star", "red", "small", "bottom"))
    held = {name for name, flag in zip(syn.SCENE_CLASSES, syn.scene_classes(scene)) if flag}
    assert held == {"circle", "star", "red", "blue", "red circle", "blue star", "red star"}
    assert len(syn.SCENE_CLASSES) == len(set(syn.SCENE_CLASSES)) == 5 + 8 + 5 * 8
    assert syn.SCENE_CLASSES[: len(syn.SHAPES)] == syn.SHAPES  # tools/make_tiny_init.py scores these columns


def test_labelled_pictures_are_reproducible_and_match_their_labels():
    pictures, labels = syn.labelled_pictures(random.Random("x"), 6, 48)
    again, labels_again = syn.labelled_pictures(random.Random("x"), 6, 48)
    assert labels == labels_again and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(pictures, again))
    assert all(p.size == (48, 48) for p in pictures)
    for picture, label in zip(pictures, labels):
        colours = {name for name, flag in zip(syn.SCENE_CLASSES, label) if flag and name in syn.COLOURS}
        pixels = {tuple(int(v) for v in px) for px in np.asarray(picture).reshape(-1, 3)}
        assert colours == {name for name, rgb in syn.COLOURS.items() if rgb in pixels}, (label, colours)


def test_claims_are_true_or_false_as_labelled():
    rng = random.Random(0)
    left = _scene(("circle", "red", "large", "left"), ("square", "blue", "small", "right"))
    right = _scene(("circle", "green", "small", "middle"))
    seen_nlvr: set[str] = set()
    for _ in range(200):
        text, truth = syn.ve_claim(left, rng)
        if text == "there is a large red circle" or text == "there is no triangle":
            assert truth
        if text in ("there is a small red circle", "there is no square", "the number of shapes is one"):
            assert not truth
        text, truth = syn.nlvr_claim(left, right, rng)
        if text in ("the left image contains a blue shape", "the right image contains a green shape",
                    "only one image contains a red shape"):
            assert truth
        if text in ("the right image contains a red shape", "both images contain a red shape",
                    "both images contain a green shape", "only one image contains a purple shape"):
            assert not truth
        seen_nlvr.add(text)
    assert {"only one image contains a red shape", "both images contain a red shape"} <= seen_nlvr
    also_red = _scene(("star", "red", "small", "top"))  # red on both sides now
    claims = dict(syn.nlvr_claim(left, also_red, rng, kind) for kind in (1, 2) for _ in range(100))
    assert claims["both images contain a red shape"] and not claims["only one image contains a red shape"]
    assert not claims["both images contain a blue shape"] and claims["only one image contains a blue shape"]
    question = {syn.vqa_question(left, rng)[:2] for _ in range(300)}
    assert ("how many shapes are there?", "two") in question
    assert ("what color is the circle on the left?", "red") in question
    assert ("what size is the blue square on the right?", "small") in question


def _ve_template(text: str) -> int:
    """The ve_claim kind that wrote ``text``."""
    if text.startswith(("there is a small", "there is a large")):
        return 0
    starts = ("there is a ", "the number of shapes", "the shape ", "there is no ")
    return next(kind for kind, start in enumerate(starts, 1) if text.startswith(start))


def _nlvr_template(text: str) -> int:
    """The nlvr_claim kind that wrote ``text``."""
    return 2 if text.startswith("only one image") else 1 if text.startswith("both images") else 0


class _MemoryWriter(syn._Writer):
    """Keeps the JSON records in memory and draws no pictures."""

    def __init__(self, out_dir: str = "unused") -> None:
        super().__init__(out_dir, 64)
        self.records: dict[str, object] = {}

    def picture(self, task: str, name: str, scene: syn.Scene) -> None:
        pass

    def json(self, key: str, relative: str, data: object) -> None:
        self.records[key] = data


@pytest.mark.parametrize("task", ["ve", "nlvr"])
def test_statement_wording_says_nothing_about_the_label(task):
    """Among the generated statements each template is as frequent with one label as with the other,
    so the words do not predict the label (drawing statements until one had the wanted truth gave
    gaps up to 0.14 for VE; redrawing the template when a picture cannot take the truth gave a
    text-only NLVR accuracy of 0.57)."""
    writer, size = _MemoryWriter(), 2000  # gap noise: standard deviation <= 0.015
    if task == "ve":
        syn._ve(writer, random.Random(0), size, 1)
        labels, template, num_kinds = ("entailment", "contradiction"), _ve_template, syn.VE_CLAIM_KINDS
        records = [r for r in writer.records["ve_train"] if r["label"] != "neutral"]
    else:
        syn._nlvr(writer, random.Random(0), size, 1)
        labels, template, num_kinds = ("True", "False"), _nlvr_template, syn.NLVR_CLAIM_KINDS
        records = writer.records["nlvr_train"]
    counts = {label: [0] * num_kinds for label in labels}
    for record in records:
        counts[record["label"]][template(record["sentence"])] += 1
    assert [sum(counts[label]) for label in labels] == [size, size]
    assert min(min(c) for c in counts.values()) > size / num_kinds / 2, counts  # every template is used
    gaps = [abs(a - b) / size for a, b in zip(*counts.values())]
    assert max(gaps) < 0.05, (gaps, counts)


def test_referring_expressions_are_unique_and_name_no_location(tmp_path):
    scene = _scene(("circle", "red", "large", "left"), ("circle", "red", "small", "right"),
                   ("circle", "blue", "large", "top"))
    rng = random.Random(0)
    # The large red circle needs its size; the blue circle is told apart by colour (size half of the time).
    assert {syn.referring_expression(scene, 0, rng).removeprefix("the ") for _ in range(50)} == {"large red circle"}
    assert {syn.referring_expression(scene, 2, rng).removeprefix("the ") for _ in range(50)} == {
        "blue circle", "large blue circle"}
    twins = _scene(("circle", "red", "large", "left"), ("circle", "red", "large", "right"))
    assert not syn.distinguishable(twins) and syn.distinguishable(scene)
    with pytest.raises(ValueError, match="attributes of another object"):
        syn.referring_expression(twins, 0, rng)
    # Generated RefCOCO+ files: every expression is unique in its picture and has no location word.
    (tmp_path / "json" / "refcoco+").mkdir(parents=True)  # the refs pickle is written there
    writer = _MemoryWriter(str(tmp_path))
    syn._grounding(writer, random.Random(0), 40, 10)
    locations = set(syn.POSITIONS) | {word for phrase in syn.POSITION_PHRASES.values() for word in phrase.split()}
    expressions = [r["text"] for split in ("train", "val", "test") for r in writer.records[f"refcoco_{split}"]]
    assert len(expressions) > 100 and not [t for t in expressions if set(t.split()) & (locations - {"the"})]


def test_cli_main(tmp_path):
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "tools" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paths = module.main(["--out", str(tmp_path), "--seed", "3", "--image_size", "16", "--num_pretrain", "2",
                         "--num_retrieval", "1", "--num_vqa", "1", "--num_ve", "1", "--num_nlvr", "1",
                         "--num_grounding", "1", "--num_eval", "1"])
    assert len(json.loads(Path(paths["pretrain"]).read_text())) == 2
    assert "seed 3" in Path(tmp_path, "README.md").read_text()
