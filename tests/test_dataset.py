"""Datasets, text cleaning, RandAugment, transforms, samplers and loaders (spec pipeline §2.1, §4)."""

from __future__ import annotations

import copy
import json
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import DistributedSampler

from dataset import (
    CLIP_MEAN,
    CLIP_STD,
    AnnotationError,
    GroundingDataset,
    NLVRDataset,
    PretrainDataset,
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    VEDataset,
    VQADataset,
    build_transform,
    build_vc_string,
    create_dataset,
    create_loader,
    create_sampler,
    load_image,
    pre_caption,
    pre_question,
    resolve_paths,
    rewrite_pretrain_path,
    vqa_collate_fn,
)
from dataset import randaugment as ra
from dataset.synthetic import generate

RES = 32


# ----------------------------------------------------------------------------------------------
# Text


def test_pre_caption_rules():
    text = "  A Man--with <Person>, \"a DOG\"!!  (on) the/beach;  #1 ~ \n"
    assert pre_caption(text, 30) == "a man with person a dog on the beach 1"
    assert pre_caption("one two three four", 2) == "one two"
    assert pre_caption("tabs\tstay single\n", 30) == "tabs\tstay single"
    assert pre_caption("it's  a   test.", 30) == "its a test"


def test_pre_question_rules():
    # No whitespace collapsing, no leading strip, no <person> rule; trailing spaces stripped.
    assert pre_question(" What  is <person> doing? ", 50) == " what  is <person> doing"
    assert pre_question("Is it blue-green/red?", 50) == "is it blue green red"
    assert pre_question("a b c d e", 3) == "a b c"


# ----------------------------------------------------------------------------------------------
# RandAugment ops


def _random_image(seed: int, shape=(17, 23, 3), low=0, high=256) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, size=shape, dtype=np.uint8)


@pytest.mark.parametrize("seed,low,high", [(0, 0, 256), (1, 40, 90), (2, 100, 102)])
def test_equalize_matches_pil(seed, low, high):
    img = _random_image(seed, low=low, high=high)
    expected = np.array(ImageOps.equalize(Image.fromarray(img)))
    np.testing.assert_array_equal(ra.equalize(img), expected)


def test_level_to_args_magnitudes():
    np.random.seed(0)
    assert ra.level_to_args("Brightness", 7) == pytest.approx((1.36,))
    assert ra.level_to_args("Sharpness", 7) == pytest.approx((1.36,))
    assert abs(ra.level_to_args("ShearX", 7)[0]) == pytest.approx(0.21)
    assert abs(ra.level_to_args("TranslateY", 7)[0]) == pytest.approx(7.0)
    assert abs(ra.level_to_args("Rotate", 7)[0]) == pytest.approx(21.0)
    assert ra.level_to_args("Equalize", 7) == ()
    signs = {np.sign(ra.level_to_args("Rotate", 7)[0]) for _ in range(50)}
    assert signs == {-1.0, 1.0}


def test_brightness_lookup():
    img = np.array([[[0, 100, 150], [187, 188, 255]]], dtype=np.uint8)
    out = ra.brightness(img, 1.36)
    # float32 product, clipped, truncated: 100*1.36 = 136, 150*1.36 = 204, 187*1.36 = 254.32
    np.testing.assert_array_equal(out, [[[0, 136, 204], [254, 255, 255]]])


def test_autocontrast_fixed_stretches_each_channel():
    img = np.zeros((2, 2, 3), dtype=np.uint8)
    img[..., 0] = [[50, 100], [150, 150]]
    img[..., 1] = 77  # flat channel is left alone
    img[..., 2] = [[0, 255], [10, 20]]
    out = ra.autocontrast(img, upstream_wrap=False)
    np.testing.assert_array_equal(out[..., 0], [[0, 127], [255, 255]])
    np.testing.assert_array_equal(out[..., 1], img[..., 1])
    np.testing.assert_array_equal(out[..., 2], img[..., 2])


def test_autocontrast_default_reproduces_the_uint8_negation_of_the_original():
    img = _random_image(4)
    img[..., 2] = np.clip(img[..., 2], 0, 200)
    img[0, 0, 2] = 0  # channel 2 has minimum 0: stretched as intended
    img[..., 0] = np.clip(img[..., 0], 30, 220)  # minimum above 0
    out = ra.autocontrast(img)

    def original_channel(ch: np.ndarray) -> np.ndarray:  # the original's arithmetic on NumPy scalars
        high, low = ch.max(), ch.min()
        scale = 255 / (high - low)
        with np.errstate(over="ignore"):
            offset = -low * scale  # -low: uint8 negation, wraps to 256 - low
        table = np.clip(np.arange(256) * scale + offset, 0, 255).astype(np.uint8)
        return table[ch]

    for c in range(3):
        np.testing.assert_array_equal(out[..., c], original_channel(img[..., c]))
    assert (out[..., 0] == 255).all() and out[..., 2].max() >= 254 and out[..., 2].min() == 0
    np.testing.assert_array_equal(out[..., 2], ra.autocontrast(img, upstream_wrap=False)[..., 2])


def test_fix_autocontrast_reaches_the_training_transform():
    augment = build_transform("train", 8, fix_autocontrast=True).transforms[2]
    assert isinstance(augment, ra.RandomAugment) and augment.fix_autocontrast
    img = _random_image(5)
    img[..., 0] = np.clip(img[..., 0], 30, 220)
    np.testing.assert_array_equal(augment.ops["AutoContrast"](img), ra.autocontrast(img, upstream_wrap=False))
    assert not build_transform("train", 8).transforms[2].fix_autocontrast


def test_sharpness_interior_blend_and_border():
    img = _random_image(3)
    out = ra.sharpness(img, 1.36)
    np.testing.assert_array_equal(out[0], img[0])
    np.testing.assert_array_equal(out[:, -1], img[:, -1])
    kernel = np.ones((3, 3), np.float32)
    kernel[1, 1] = 5
    deg = ra.cv2.filter2D(img, -1, kernel / 13).astype(np.float32)
    blend = deg[1:-1, 1:-1] + np.float32(1.36) * (img[1:-1, 1:-1].astype(np.float32) - deg[1:-1, 1:-1])
    np.testing.assert_array_equal(out[1:-1, 1:-1], np.trunc(blend).astype(np.int64) % 256)


def test_translate_moves_content_by_minus_offset():
    img = np.zeros((9, 20, 3), dtype=np.uint8)
    img[:, 10] = 255
    out = ra.translate_x(img, 7)
    assert np.all(out[:, 3] == 255)
    assert np.all(out[:, -7:] == 128)  # uncovered border is grey
    out = ra.translate_y(np.transpose(img, (1, 0, 2)).copy(), -2)
    assert np.all(out[12] == 255)


def test_geometric_ops_keep_shape_and_fill_grey():
    img = np.full((16, 16, 3), 255, dtype=np.uint8)
    for op, arg in ((ra.shear_x, 0.21), (ra.shear_y, -0.21), (ra.rotate, 21.0)):
        out = op(img, arg)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert (out == 128).any()


def test_random_augment_output_and_determinism():
    pil = Image.fromarray(_random_image(4))
    aug = ra.RandomAugment(2, 7, isPIL=True)
    np.random.seed(1)
    first = [aug(pil) for _ in range(5)]
    np.random.seed(1)
    second = [aug(pil) for _ in range(5)]
    for a, b in zip(first, second):
        assert a.shape == (17, 23, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="Solarise"):
        ra.RandomAugment(augs=["Solarise"])


# ----------------------------------------------------------------------------------------------
# Transforms


def test_transforms_shape_and_normalisation():
    img = Image.new("RGB", (40, 25), (255, 0, 128))
    out = build_transform("test", RES)(img)
    assert out.shape == (3, RES, RES) and out.dtype == torch.float32
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), CLIP_MEAN, CLIP_STD)]
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)
    np.random.seed(0)
    torch.manual_seed(0)
    for kind in ("pretrain", "train", "grounding_train"):
        assert build_transform(kind, RES)(img).shape == (3, RES, RES)
    with pytest.raises(ValueError, match="unknown transform kind"):
        build_transform("val", RES)


def _steps(transform) -> dict:
    return {type(step).__name__: step for step in transform.transforms}


def test_augmentation_keys_change_crop_and_flip_only(demo):
    # Defaults are the original's: scale 0.2-1 in pretraining, 0.5-1 when fine-tuning, flips on.
    assert _steps(build_transform("pretrain", RES))["RandomResizedCrop"].scale == (0.2, 1.0)
    assert _steps(build_transform("train", RES))["RandomResizedCrop"].scale == (0.5, 1.0)
    for kind in ("pretrain", "train", "grounding_train"):
        default, custom = _steps(build_transform(kind, RES)), _steps(
            build_transform(kind, RES, crop_min_scale=0.8, horizontal_flip=False))
        assert "RandomHorizontalFlip" in default and "RandomHorizontalFlip" not in custom
        assert set(default) - set(custom) == {"RandomHorizontalFlip"}
        if kind != "grounding_train":  # grounding never crops
            assert custom["RandomResizedCrop"].scale == (0.8, 1.0)
    with pytest.raises(ValueError, match="crop_min_scale"):
        build_transform("train", RES, crop_min_scale=0.0)
    # The config keys reach the datasets' transforms.
    config = {"train_file": f"{demo}/json/nlvr_train.json", "val_file": f"{demo}/json/nlvr_dev.json",
              "test_file": f"{demo}/json/nlvr_test.json", "image_root": f"{demo}/images/nlvr", "image_res": RES,
              "crop_min_scale": 0.9, "horizontal_flip": False}
    train = _steps(create_dataset("nlvr", config)[0].transform)
    assert train["RandomResizedCrop"].scale == (0.9, 1.0) and "RandomHorizontalFlip" not in train


# ----------------------------------------------------------------------------------------------
# VC strings and the pretraining path rewrite


def test_vc_string_join_and_resampling():
    concepts = [f"c{i}" for i in range(15)]
    assert build_vc_string(concepts[:3], sep_token=False, randkw_p=None) == "c0 c1 c2"
    assert build_vc_string(concepts[:3], sep_token=True, randkw_p=None) == "c0 [SEP] c1 [SEP] c2"
    random.seed(0)
    draws = [build_vc_string(concepts, sep_token=False, randkw_p=0.3).split(" ") for _ in range(200)]
    assert all(len(d) == 4 and set(d) <= set(concepts) for d in draws)
    assert any(len(set(d)) < 4 for d in draws)  # with replacement: duplicates happen
    assert len(build_vc_string(concepts, sep_token=True, randkw_p=0.3).split(" [SEP] ")) == 4


def test_pretrain_path_rewrite():
    path = "/data/mshukor/data/coco/train2014/COCO_train2014_000000000009.jpg"
    assert rewrite_pretrain_path(path, "/mnt/d") == "/mnt/d/coco/train2014/COCO_train2014_000000000009.jpg"


# ----------------------------------------------------------------------------------------------
# Datasets on generated data


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    generate(str(out), seed=0, image_size=24, num_pretrain=6, num_retrieval=4, num_vqa=4, num_ve=3,
             num_nlvr=3, num_grounding=3, num_eval=3)
    return str(out)


def _config(script: str, demo: str, **extra) -> dict:
    base = {"image_res": RES, "sep_token": False}
    keys = {
        "Pretrain": {"train_file": ["synth_kw.json"]},
        "Retrieval": {"train_file": "retrieval_train.json", "val_file": "retrieval_val.json",
                      "test_file": "retrieval_test.json", "image_root": "images/retrieval"},
        "VQA": {"train_file": ["vqa_train.json", "vqa_val.json", "vg_qa.json"], "test_file": ["vqa_test.json"],
                "answer_list": "answer_list.json", "vqa_root": "images/vqa/", "vg_root": "images/"},
        "VE": {"train_file": "ve_train.json", "val_file": "ve_dev.json", "test_file": "ve_test.json",
               "image_root": "images/ve"},
        "NLVR": {"train_file": "nlvr_train.json", "val_file": "nlvr_dev.json", "test_file": "nlvr_test.json",
                 "image_root": "images/nlvr"},
        "Grounding": {"train_file": ["refcoco+_train.json"], "test_file": ["refcoco+_val.json", "refcoco+_test.json"],
                      "det_file": "refcoco+/dets.json", "coco_file": "refcoco+/cocos.json",
                      "refcoco_data": "data", "image_root": "images/refcoco"},
    }[script]
    json_dir = f"{demo}/json_pretrain" if script == "Pretrain" else f"{demo}/json"
    return resolve_paths(script, {**base, **keys, **extra}, demo, json_dir)


def _is_image(x) -> bool:
    return isinstance(x, torch.Tensor) and x.shape == (3, RES, RES)


def test_resolve_paths_table():
    cfg = resolve_paths("VQA", {"train_file": ["a.json"], "test_file": ["t.json"], "answer_list": "al.json",
                                "vqa_root": "coco/", "vg_root": "/abs/vg"}, "/D", "/J")
    assert cfg == {"train_file": ["/J/a.json"], "test_file": ["/J/t.json"], "answer_list": "/J/al.json",
                   "vqa_root": "/D/coco/", "vg_root": "/abs/vg"}
    cfg = resolve_paths("Grounding", {"train_file": ["a"], "test_file": ["b", "c"], "det_file": "d", "coco_file": "e",
                                      "refcoco_data": "data", "image_root": "coco/"}, "/D", "/J")
    assert cfg["test_file"] == ["/J/b", "/J/c"] and cfg["det_file"] == "/J/d" and cfg["coco_file"] == "/J/e"
    assert cfg["refcoco_data"] == "/J" and cfg["image_root"] == "/D/coco/"
    cfg = resolve_paths("VE", {"train_file": "a", "val_file": "b", "test_file": "c", "image_root": "snli"}, "/D", "/J")
    assert cfg == {"train_file": "/J/a", "val_file": "/J/b", "test_file": "/J/c", "image_root": "/D/snli"}
    assert resolve_paths("Pretrain_nlvr", {"train_file": ["x.json"]}, "/D", "/J") == {"train_file": ["/J/x.json"]}
    with pytest.raises(KeyError, match="image_root"):
        resolve_paths("NLVR", {"train_file": "a", "val_file": "b", "test_file": "c"}, "/D", "/J")
    with pytest.raises(ValueError, match="unknown script"):
        resolve_paths("Caption", {}, "/D", "/J")


def test_pretrain_dataset_items(demo):
    ds = create_dataset("pretrain", _config("Pretrain", demo, randkw_p=0.3), data_dir=demo)
    assert isinstance(ds, PretrainDataset) and len(ds) == 6
    assert ds.image_path(0) == f"{demo}/images/pretrain/000000.jpg"
    for i in range(len(ds)):
        image, (caption, vc) = ds[i]
        assert _is_image(image) and isinstance(caption, str) and caption == pre_caption(caption, 30)
        assert len(vc.split(" ")) == 4  # int(0.3 * 15) concepts
    with pytest.raises(ValueError, match="data_dir"):
        create_dataset("pretrain", _config("Pretrain", demo))


def test_retrieval_datasets(demo):
    train, val, test = create_dataset("re", _config("Retrieval", demo))
    assert isinstance(train, RetrievalTrainDataset) and isinstance(val, RetrievalEvalDataset)
    assert len(train) == 4 * 5 and sorted(set(train.img_ids.values())) == [0, 1, 2, 3]
    image, (caption, vc), idx = train[7]
    assert _is_image(image) and isinstance(caption, str) and idx == 1
    assert vc == " ".join(train.ann[7]["kwords"])  # all 15 concepts in stored order
    assert len(val) == 3 and len(val.text) == 15 and all(isinstance(t, str) for t in val.text)
    assert val.img2txt[1] == [5, 6, 7, 8, 9] and val.txt2img[9] == 1
    assert val.image[2] == "val_000002.jpg"
    (image, vc), index = val[2]
    assert _is_image(image) and index == 2 and len(vc.split(" ")) == 15
    assert test.image[0] == "test_000000.jpg"


def test_vqa_datasets_and_collate(demo):
    train, test = create_dataset("vqa", _config("VQA", demo))
    assert isinstance(train, VQADataset) and len(train) == 4 * 3 + 3 * 3 + 4
    image, (question, vc), answers, weights = train[0]
    assert _is_image(image) and isinstance(question, str) and isinstance(vc, str)
    assert all(a.endswith("[SEP]") and not a.endswith(" [SEP]") for a in answers)
    assert sum(weights) == pytest.approx(1.0)
    vg_index = len(train) - 1
    assert train.ann[vg_index]["dataset"] == "vg"
    image, _, answers, weights = train[vg_index]
    assert _is_image(image) and answers == [train.ann[vg_index]["answer"] + "[SEP]"] and weights == [0.5]
    image, (question, vc), question_id = test[1]
    assert _is_image(image) and isinstance(question_id, int)
    assert test.max_ques_words == 50 and "yes" in test.answer_list
    images, (questions, vcs), flat, w, n = vqa_collate_fn([train[0], train[1], train[vg_index]])
    assert images.shape == (3, 3, RES, RES) and len(questions) == len(vcs) == 3
    assert len(flat) == w.numel() == sum(n) and w.dtype == torch.float32 and n[2] == 1


def test_vqa_weights_from_answer_counts(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.jpg")
    record = {"question": "What?", "answer": ["net"] * 6 + ["pitcher"] * 3 + ["ball"], "image": "x.jpg",
              "dataset": "vqa", "kwords": ["a"]}
    (tmp_path / "q.json").write_text(json.dumps([record]))
    ds = VQADataset([str(tmp_path / "q.json")], build_transform("test", 8), str(tmp_path), str(tmp_path))
    _, (question, _), answers, weights = ds[0]
    assert question == "what"
    assert answers == ["net[SEP]", "pitcher[SEP]", "ball[SEP]"]
    assert weights == pytest.approx([0.6, 0.3, 0.1])
    bad = dict(record, dataset="gqa")
    (tmp_path / "bad.json").write_text(json.dumps([bad]))
    ds = VQADataset(str(tmp_path / "bad.json"), build_transform("test", 8), str(tmp_path), str(tmp_path))
    with pytest.raises(AnnotationError, match="bad.json.*record 0.*'gqa'"):
        ds[0]


def test_ve_dataset(demo):
    train, val, test = create_dataset("ve", _config("VE", demo, randkw_p=0.3))
    assert isinstance(train, VEDataset) and len(train) == 9 and len(val) == len(test) == 9
    labels = {train.ann[i]["label"]: train[i][2] for i in range(3)}
    assert labels == {"entailment": 2, "neutral": 1, "contradiction": 0}
    assert len(train[0][1][1].split(" ")) == 4  # randkw_p: int(0.3 * 15) concepts in training
    image, (sentence, vc), label = val[0]
    # Evaluation keeps every concept (the original passes randkw_p to the training datasets only).
    assert _is_image(image) and isinstance(sentence, str) and vc.split(" ") == val.ann[0]["kwords"]


def test_nlvr_dataset(demo):
    train, val, test = create_dataset("nlvr", _config("NLVR", demo, randkw_p=0.3, sep_token=True))
    assert isinstance(train, NLVRDataset) and len(train) == 6
    left, right, (sentence, vc_left, vc_right), label = train[0]
    assert _is_image(left) and _is_image(right) and isinstance(sentence, str)
    assert len(vc_left.split(" [SEP] ")) == len(vc_right.split(" [SEP] ")) == 4
    assert sorted(train[i][3] for i in range(2)) == [0, 1]
    assert {train.ann[i]["label"] for i in range(len(train))} == {"True", "False"}


def test_grounding_datasets(demo):
    train, test = create_dataset("grounding", _config("Grounding", demo))
    assert isinstance(train, GroundingDataset) and train.mode == "train" and test.mode == "test"
    names = [train.ann[i]["image"].split("/")[-1] for i in range(len(train))]
    expected = {name: k for k, name in enumerate(dict.fromkeys(names))}
    image, (text, vc), idx = train[len(train) - 1]
    assert _is_image(image) and isinstance(text, str) and idx == expected[names[-1]] == 2
    (image, vc), text, ref_id = test[0]
    assert _is_image(image) and isinstance(vc, str) and isinstance(text, str) and ref_id == test.ann[0]["ref_id"]
    expected_len = sum(len(json.load(open(f))) for f in _config("Grounding", demo)["test_file"])
    assert len(test) == expected_len


def test_unknown_dataset_name(demo):
    with pytest.raises(ValueError, match="unknown dataset"):
        create_dataset("caption", {"image_res": RES})
    with pytest.raises(KeyError, match="val_file"):
        create_dataset("ve", {"image_res": RES, "train_file": "x", "image_root": "y"})


# ----------------------------------------------------------------------------------------------
# Errors name the file


def test_missing_image_names_file_and_record(demo, tmp_path):
    records = json.load(open(f"{demo}/json/ve_dev.json"))
    records[1] = dict(records[1], image="does_not_exist")
    ann = tmp_path / "ve_broken.json"
    ann.write_text(json.dumps(records))
    ds = VEDataset(str(ann), build_transform("test", RES), f"{demo}/images/ve")
    with pytest.raises(FileNotFoundError, match=r"does_not_exist\.jpg.*ve_broken\.json, record 1"):
        ds[1]


def test_corrupt_image_names_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"this is not a jpeg")
    with pytest.raises(OSError, match="broken.jpg"):
        load_image(str(path), "ann.json", 3)
    assert load_image(_write_png(tmp_path)).mode == "RGB"


def _write_png(tmp_path) -> str:
    path = tmp_path / "gray.png"
    Image.new("L", (4, 4), 7).save(path)
    return str(path)


def test_annotation_errors_name_file_and_field(tmp_path):
    transform = build_transform("test", 8)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        VEDataset(str(tmp_path / "nope.json"), transform, str(tmp_path))
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(AnnotationError, match="bad.json"):
        VEDataset(str(tmp_path / "bad.json"), transform, str(tmp_path))
    (tmp_path / "first.json").write_text(json.dumps([{"image": "a", "caption": "x", "image_id": 1}]))
    (tmp_path / "second.json").write_text(json.dumps([{"image": "a", "caption": "x", "image_id": 1}, {"image": "b"}]))
    with pytest.raises(AnnotationError, match=r"second\.json, record 1: missing required field 'image_id'"):
        RetrievalTrainDataset([str(tmp_path / "first.json"), str(tmp_path / "second.json")], transform, str(tmp_path))
    (tmp_path / "nokw.json").write_text(json.dumps([{"image": "gray", "sentence": "s", "label": "neutral"}]))
    Image.new("RGB", (4, 4)).save(tmp_path / "gray.jpg")
    ds = VEDataset(str(tmp_path / "nokw.json"), transform, str(tmp_path))
    with pytest.raises(AnnotationError, match=r"nokw\.json, record 0: missing required field 'kwords'"):
        ds[0]


# ----------------------------------------------------------------------------------------------
# Samplers and loaders


def test_create_sampler_is_distributed_and_deterministic(demo):
    train, val, test = create_dataset("ve", _config("VE", demo))
    samplers = create_sampler([train, val, test], [True, False, None], num_replicas=1, rank=0, seed=3)
    assert isinstance(samplers[0], DistributedSampler) and samplers[2] is None
    assert not samplers[1].shuffle and list(samplers[1]) == list(range(len(val)))
    samplers[0].set_epoch(2)
    order = list(samplers[0])
    again = create_sampler([train], [True], 1, 0, seed=3)[0]
    again.set_epoch(2)
    assert list(again) == order and sorted(order) == list(range(len(train)))
    again.set_epoch(3)
    assert list(again) != order
    halves = create_sampler([val, val], [False, False], num_replicas=2, rank=0) + create_sampler([val], [False], 2, 1)
    assert len(list(halves[0])) + len(list(halves[2])) == 10  # 9 items padded to a multiple of 2
    assert create_sampler([None], [True], 1, 0) == [None]


def test_resumable_sampler_skips_what_a_mid_epoch_checkpoint_did(demo):
    """start_at(k * batch) leaves this rank's order after its first k batches; with 2 processes the
    skipped samples are the first 2 k batch positions of the epoch's global order, so a run with the same
    global batch continues where any layout stopped. set_epoch starts the next epoch from its beginning."""
    train = create_dataset("ve", _config("VE", demo))[0]
    sampler = create_sampler([train], [True], 1, 0, seed=3)[0]
    sampler.set_epoch(1)
    order = list(sampler)
    sampler.start_at(4)
    assert list(sampler) == order[4:] and len(sampler) == len(order) - 4
    loader = create_loader([train], [sampler], [2], [0], [True], [None])[0]
    assert len(loader) == (len(order) - 4) // 2
    sampler.set_epoch(1)
    assert list(sampler) == order
    with pytest.raises(ValueError, match="cannot start the epoch at sample"):
        sampler.start_at(len(order) + 1)
    ranks = create_sampler([train, train], [True, True], 2, 0, seed=3)
    ranks[1] = create_sampler([train], [True], 2, 1, seed=3)[0]
    for rank_sampler in ranks:
        rank_sampler.set_epoch(1)
        rank_sampler.start_at(2)
    assert len(order) == 9  # 2 processes pad the order to 10 with its first item
    assert sorted(list(ranks[0]) + list(ranks[1])) == sorted(order[4:] + order[:1])


def test_seeded_samples_draw_per_sample_and_leave_the_callers_streams(demo):
    from dataset import SeededSamples

    train = create_dataset("pretrain", _config("Pretrain", demo), data_dir=demo)
    sampler = create_sampler([train], [True], 1, 0)[0]
    seeded = SeededSamples(train, seed=7, sampler=sampler)
    assert len(pickle.loads(pickle.dumps(seeded))) == len(train)  # as a loader worker gets it
    assert len(seeded) == len(train) and seeded.max_words == train.max_words  # attributes pass through
    torch.manual_seed(0)
    first = seeded[3][0]
    after_one = torch.rand(1)
    torch.manual_seed(0)
    seeded[5]
    seeded[3]
    assert torch.equal(torch.rand(1), after_one)  # the caller's stream is untouched
    assert torch.equal(seeded[3][0], first) and not torch.equal(seeded[4][0], first)
    sampler.set_epoch(1)
    assert not torch.equal(seeded[3][0], first)  # a new epoch draws anew


def test_create_loader_batches(demo):
    train, test = create_dataset("vqa", _config("VQA", demo))
    samplers = create_sampler([train, test], [True, False], 1, 0)
    train_loader, test_loader = create_loader([train, test], samplers, [4, 5], [0, 0], [True, False],
                                              [vqa_collate_fn, None])
    assert train_loader.drop_last and not test_loader.drop_last
    assert len(train_loader) == len(train) // 4
    images, (questions, vcs), answers, weights, n = next(iter(train_loader))
    assert images.shape == (4, 3, RES, RES) and len(questions) == 4 and weights.numel() == sum(n)
    images, (questions, vcs), question_ids = next(iter(test_loader))
    assert images.shape == (5, 3, RES, RES) and question_ids.dtype == torch.int64
    loader = create_loader([test], [None], [2], [0], [True], [None])[0]
    assert loader.sampler.__class__.__name__ == "RandomSampler"


def test_datasets_pickle_for_workers(demo):
    ds = create_dataset("pretrain", _config("Pretrain", demo), data_dir=demo)
    clone = copy.deepcopy(ds)
    torch.manual_seed(0)
    assert clone[0][0].shape == (3, RES, RES)
    assert len(pickle.loads(pickle.dumps(ds))) == len(ds)
