"""Pretrain.py end to end on generated data: log format, checkpoints, learning, resume equality and the
behaviour on bad input (missing image, unknown config key, mismatched checkpoint, NaN loss)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import Pretrain
from conftest import PRETRAIN_EPOCHS, REPO, demo_flags
from engine.trainer import NonFiniteLossError

CONFIG = os.path.join(REPO, "configs/demo/Pretrain.yaml")
LOG_KEYS = ["train_lr", "train_loss_mlm", "train_loss_ita", "train_loss_itm", "train_loss_mae", "epoch"]


def read_log(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "log.txt")) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_pretrain_log_checkpoint_and_falling_losses(pretrain_checkpoint):
    output_dir = os.path.dirname(pretrain_checkpoint)
    records = read_log(output_dir)
    assert [r["epoch"] for r in records] == list(range(PRETRAIN_EPOCHS))
    assert all(list(r) == LOG_KEYS for r in records)
    assert all(isinstance(r["train_loss_ita"], str) for r in records)  # formatted strings, as the original
    first, last = records[0], records[-1]
    for key in ("train_loss_ita", "train_loss_itm", "train_loss_mlm", "train_loss_mae"):
        assert float(last[key]) < float(first[key]), key
    checkpoint = torch.load(pretrain_checkpoint, map_location="cpu", weights_only=False)
    assert set(checkpoint) == {"model", "optimizer", "lr_scheduler", "config", "epoch"}
    assert checkpoint["epoch"] == PRETRAIN_EPOCHS - 1
    assert os.path.isfile(os.path.join(output_dir, "config.yaml"))
    assert not [f for f in os.listdir(output_dir) if ".tmp" in f]


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(demo_data, tmp_path):
    def flags(out, epochs):
        return demo_flags(demo_data, "json_pretrain", str(out), CONFIG) + [f"schedular.epochs={epochs}", "save_step=1"]

    full = tmp_path / "full"
    Pretrain.main(flags(full, 2) + ["batch_size=32"])
    resumed = tmp_path / "resumed"
    # checkpoint_00 is the state an interrupted run would have left after epoch 0
    Pretrain.main(flags(resumed, 2) + ["batch_size=32", "--checkpoint", str(full / "checkpoint_00.pth"), "--resume"])
    expected = read_log(full)[1]
    assert read_log(resumed) == [expected]


def test_missing_image_names_the_file(demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    os.remove(data / "images" / "pretrain" / "000003.jpg")
    with pytest.raises(FileNotFoundError, match="000003.jpg"):
        Pretrain.main(demo_flags(str(data), "json_pretrain", str(tmp_path / "out"), CONFIG) + ["schedular.epochs=1"])


def test_unknown_config_key_is_named(demo_data, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(CONFIG).read() + "\nqueue_sise: 128\n")
    with pytest.raises(ValueError, match="queue_sise"):
        Pretrain.main(demo_flags(demo_data, "json_pretrain", str(tmp_path / "out"), str(bad)))
    with pytest.raises(ValueError, match="momentm"):
        Pretrain.main(demo_flags(demo_data, "json_pretrain", str(tmp_path / "out"), CONFIG) + ["momentm=0.9"])


def test_checkpoint_with_wrong_shapes_names_the_key(demo_data, pretrain_checkpoint, tmp_path):
    checkpoint = torch.load(pretrain_checkpoint, map_location="cpu", weights_only=False)
    checkpoint["model"]["itm_head.weight"] = torch.zeros(3, 64)
    bad = tmp_path / "bad.pth"
    torch.save(checkpoint, bad)
    with pytest.raises(ValueError, match="itm_head.weight"):
        Pretrain.main(demo_flags(demo_data, "json_pretrain", str(tmp_path / "out"), CONFIG)
                      + ["schedular.epochs=1", "--checkpoint", str(bad)])


def test_nan_loss_stops_with_step_and_terms_and_keeps_the_last_checkpoint(demo_data, tmp_path, monkeypatch):
    from models.model_pretrain import ViCHAPretrain

    out = tmp_path / "out"
    flags = demo_flags(demo_data, "json_pretrain", str(out), CONFIG) + ["schedular.epochs=2", "batch_size=32"]
    Pretrain.main(flags[:-2] + ["schedular.epochs=1", "batch_size=32"])
    saved = (out / "checkpoint_last.pth").read_bytes()
    calls = {"n": 0}
    original = ViCHAPretrain.mae_loss

    def poisoned(self, image):
        calls["n"] += 1
        value = original(self, image)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(ViCHAPretrain, "mae_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"epoch 0, step 2: loss=nan.*loss_mae=nan"):
        Pretrain.main(flags)
    assert (out / "checkpoint_last.pth").read_bytes() == saved
