"""tools/demo_summary.py: the best epoch of each demo task, from logs in each script's format."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from tools.demo_summary import FLOORS, TASKS, below_floors, format_summary, summarize


def _write_log(root, task: str, records: list[dict], tail: str = "") -> None:
    folder = root / task
    folder.mkdir(parents=True)
    lines = [json.dumps(record) for record in records] + ([tail] if tail else [])
    (folder / "log.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture()
def demo_logs(tmp_path):
    # VE / NLVR log accuracies as 4-decimal strings and end with 'best epoch: N' (the original's format)
    _write_log(tmp_path, "nlvr", [
        {"train_lr": "0.0002", "train_loss": "0.65", "val_acc": "0.6300", "test_acc": "0.7300", "epoch": 0},
        {"train_lr": "0.0001", "train_loss": "0.60", "val_acc": "0.8000", "test_acc": "0.8600", "epoch": 1},
        {"train_lr": "0.0000", "train_loss": "0.55", "val_acc": "0.8000", "test_acc": "0.9000", "epoch": 2},
    ], tail="best epoch: 1")
    # Retrieval (run_demo.sh): the best val_r_mean picks the epoch whose test recalls are shown
    recalls = {f"test_{side}_r{k}": 10.0 * k for side in ("txt", "img") for k in (1, 5, 10)}
    _write_log(tmp_path, "retrieval", [{"val_r_mean": 50.0, **recalls, "epoch": 0},
                                       {"val_r_mean": 40.0, **{k: v + 1 for k, v in recalls.items()}, "epoch": 1}])
    # VQA: only the last epoch carries the accuracy
    _write_log(tmp_path, "vqa", [{"train_lr": "0.001", "train_loss": "2.1", "epoch": 0},
                                 {"train_lr": "0.000", "train_loss": "1.2", "test_vqa_acc": 41.5, "epoch": 1}])
    _write_log(tmp_path, "grounding", [
        {"train_lr": "0.001", "val_d": 0.40, "testA_d": 0.5, "testB_d": 0.45, "epoch": 0},
        {"train_lr": "0.000", "val_d": 0.35, "testA_d": 0.6, "testB_d": 0.55, "epoch": 1},
    ])
    return tmp_path


def test_best_epoch_of_each_task(demo_logs):
    summary = summarize(str(demo_logs))
    assert list(summary) == ["retrieval", "vqa", "nlvr", "grounding"]  # TASKS order; no VE log: skipped
    assert summary["retrieval"] == {"epoch": 0, "test_txt_r1": 10.0, "test_txt_r5": 50.0, "test_txt_r10": 100.0,
                                    "test_img_r1": 10.0, "test_img_r5": 50.0, "test_img_r10": 100.0}
    # ties keep the first best epoch, as the original's 'best epoch' (strict >)
    assert summary["nlvr"] == {"epoch": 1, "val_acc": 0.8, "test_acc": 0.86}
    assert summary["vqa"] == {"epoch": 1, "test_vqa_acc": 41.5}
    assert summary["grounding"] == {"epoch": 0, "val_d": 0.4, "testA_d": 0.5, "testB_d": 0.45}
    text = format_summary(summary)
    assert "[demo] nlvr      epoch 1: val_acc 0.8  test_acc 0.86  (chance 0.50)" in text.splitlines()


def test_named_tasks_must_have_logs_and_be_known(demo_logs):
    with pytest.raises(FileNotFoundError, match=r"ve/log.txt not found: run the ve demo first"):
        summarize(str(demo_logs), ["nlvr", "ve"])
    with pytest.raises(ValueError, match="unknown demo task 'nlrv'"):
        summarize(str(demo_logs), ["nlrv"])
    _write_log(demo_logs, "ve", [{"train_lr": "0.0002", "train_loss": "1.0", "epoch": 0}])
    with pytest.raises(ValueError, match=r"ve/log.txt: no epoch logged 'val_acc'"):
        summarize(str(demo_logs), ["ve"])


def test_command_line(demo_logs, tmp_path_factory):
    run = [sys.executable, os.path.join(REPO, "tools", "demo_summary.py")]
    done = subprocess.run(run + [str(demo_logs), "--tasks", "vqa"], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["[demo] vqa       epoch 1: test_vqa_acc 41.5  (chance below 15: always the most frequent answer)"]
    empty = tmp_path_factory.mktemp("empty")
    failed = subprocess.run(run + [str(empty)], capture_output=True, text=True)
    assert failed.returncode == 1 and f"no demo task logs under {empty}" in failed.stderr


def test_floors_are_printed_metrics_above_chance():
    for task, floors in FLOORS.items():
        assert set(floors) <= set(TASKS[task][1]), task
    # far above chance: retrieval R@1 2.0, VE 1/3, VQA's most frequent answer 8.9, NLVR 1/2, grounding ~0.22
    assert min(FLOORS["retrieval"].values()) >= 15 * 2.0 and min(FLOORS["ve"].values()) >= 0.6
    assert FLOORS["vqa"]["test_vqa_acc"] >= 2.5 * 8.9 and min(FLOORS["nlvr"].values()) >= 0.7
    assert min(FLOORS["grounding"].values()) >= 2 * 0.22


def test_check_names_each_metric_below_its_floor(demo_logs):
    summary = summarize(str(demo_logs))
    # retrieval R@1 10 / 10 and grounding val 0.40 / testA 0.5 / testB 0.45 (best epoch 0); nlvr, vqa pass
    assert below_floors(summary) == ["retrieval test_txt_r1 10 < 30", "retrieval test_img_r1 10 < 30",
                                     "grounding val_d 0.4 < 0.45"]
    assert below_floors({"nlvr": summary["nlvr"], "vqa": summary["vqa"]}) == []


def test_check_flag_sets_the_exit_status(demo_logs):
    run = [sys.executable, os.path.join(REPO, "tools", "demo_summary.py"), str(demo_logs), "--check"]
    passed = subprocess.run(run + ["--tasks", "nlvr", "vqa"], capture_output=True, text=True)
    assert passed.returncode == 0 and len(passed.stdout.splitlines()) == 2
    failed = subprocess.run(run + ["--tasks", "nlvr", "grounding"], capture_output=True, text=True)
    assert failed.returncode == 1 and "[demo] grounding epoch 0" in failed.stdout
    assert failed.stderr.strip().endswith("below the floor of the default demo settings (it did not learn as it "
                                          "should): grounding val_d 0.4 < 0.45")
