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


def pretrain_crashing_at_step(step: int, argv: list[str], monkeypatch) -> None:
    """Pretrain.main(argv), made to raise as training step ``step`` (0-based, over the whole run) starts."""
    import engine.trainer

    train_step = engine.trainer.GraphedTrainStep.__call__
    calls = []

    def crashing(self, *args):
        calls.append(1)
        if len(calls) == step + 1:
            raise RuntimeError("simulated crash")
        return train_step(self, *args)

    monkeypatch.setattr(engine.trainer.GraphedTrainStep, "__call__", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Pretrain.main(argv)
    monkeypatch.setattr(engine.trainer.GraphedTrainStep, "__call__", train_step)


def test_mid_epoch_checkpoint_resumes_at_the_next_step(demo_data, tmp_path, monkeypatch):
    """save_every_steps: a run that crashes part-way through epoch 0 resumes from its last mid-epoch checkpoint
    and ends with the log and weights of an uninterrupted run (CPU, no loader workers: the same data order,
    random draws, warm-up steps, alpha ramp and epoch averages)."""

    def flags(out):  # 8 steps of 32 per epoch; mid-epoch checkpoints after steps 3 and 6
        return demo_flags(demo_data, "json_pretrain", str(out), CONFIG) + [
            "schedular.epochs=2", "batch_size=32", "save_every_steps=3", "schedular.warmup_epochs=1"]

    full = tmp_path / "full"
    Pretrain.main(flags(full))
    # the crashed run and its restart are one command: --auto_resume starts afresh, then resumes
    auto = ["--auto_resume"]
    crashed = tmp_path / "crashed"
    pretrain_crashing_at_step(5, flags(crashed) + auto, monkeypatch)
    saved = torch.load(crashed / "checkpoint_last.pth", map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["step"], saved["epoch_steps"], len(saved["rank_states"])) == (0, 3, 8, 1)
    assert not (crashed / "log.txt").exists()

    Pretrain.main(flags(crashed) + auto)
    assert read_log(crashed) == read_log(full)
    resumed = torch.load(crashed / "checkpoint_last.pth", map_location="cpu", weights_only=False)
    expected = torch.load(full / "checkpoint_last.pth", map_location="cpu", weights_only=False)
    assert "step" not in resumed and resumed["epoch"] == expected["epoch"] == 1
    for name, value in expected["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=0, atol=0, msg=name)
    Pretrain.main(flags(crashed) + auto)  # a requeue of the finished run trains nothing and logs nothing
    assert read_log(crashed) == read_log(full)


def test_seed_per_sample_makes_runs_independent_of_loader_workers_and_resumes_exact(demo_data, tmp_path,
                                                                                     monkeypatch):
    """seed_per_sample: a run with 2 loader workers, crashed in epoch 0 and resumed from its mid-epoch
    checkpoint, ends with the log and weights of an uninterrupted run without workers."""
    def flags(out, workers):
        return demo_flags(demo_data, "json_pretrain", str(out), CONFIG) + [
            "schedular.epochs=1", "batch_size=32", "save_every_steps=3", "seed_per_sample=true",
            f"num_workers={workers}", "--auto_resume"]

    plain, workers = tmp_path / "no_workers", tmp_path / "two_workers"
    Pretrain.main(flags(plain, 0))
    pretrain_crashing_at_step(5, flags(workers, 2), monkeypatch)
    Pretrain.main(flags(workers, 2))
    assert read_log(workers) == read_log(plain)
    resumed, expected = (torch.load(out / "checkpoint_last.pth", map_location="cpu", weights_only=False)["model"]
                         for out in (workers, plain))
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)


def test_auto_resume_takes_the_output_dirs_last_checkpoint_when_training(tmp_path):
    from argparse import Namespace

    from engine.trainer import apply_auto_resume

    def args(**extra):
        return Namespace(output_dir=str(tmp_path), checkpoint="pretrained.pth", resume=False, auto_resume=True,
                         **extra)

    first = args()
    apply_auto_resume(first)  # nothing saved yet: start from --checkpoint
    assert (first.checkpoint, first.resume) == ("pretrained.pth", False)
    (tmp_path / "checkpoint_last.pth").write_bytes(b"")
    requeued, evaluation = args(), args(evaluate=True)
    apply_auto_resume(requeued)
    apply_auto_resume(evaluation)
    assert (requeued.checkpoint, requeued.resume) == (str(tmp_path / "checkpoint_last.pth"), True)
    assert (evaluation.checkpoint, evaluation.resume) == ("pretrained.pth", False)


def test_negative_save_every_steps_is_named():
    from engine.trainer import train_one_epoch

    with pytest.raises(ValueError, match="save_every_steps is -5"):
        train_one_epoch(None, None, None, None, None, 0, {"save_every_steps": -5}, torch.device("cpu"))


def test_mid_epoch_start_falls_back_when_the_run_layout_changed(capsys):
    from engine.trainer import MidEpochStart, _mid_epoch_start

    saved = {"step": 3, "epoch_steps": 8, "rank_states": [{"rng": "r0", "meters": {}}]}
    assert _mid_epoch_start({}, 1, 8) is None  # an epoch-end checkpoint
    assert _mid_epoch_start(saved, 1, 8) == MidEpochStart(3, {"rng": "r0", "meters": {}})
    assert _mid_epoch_start(saved, 1, 16) is None  # another batch size: the epoch restarts
    assert "this run has 16 steps per epoch" in capsys.readouterr().out
    assert _mid_epoch_start({**saved, "rank_states": [{}, {}]}, 1, 8) == MidEpochStart(3)
    assert "random states of 2 processes, this run has 1" in capsys.readouterr().out


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
