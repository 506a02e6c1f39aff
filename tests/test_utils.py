"""utils.py: metric logging, atomic checkpoint writes, seeding, and the distributed helpers in one and in
two real (gloo, CPU) processes."""

from __future__ import annotations

import builtins
import io
import json
import os
import random
import re
import socket
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import utils
from utils import (
    AttrDict,
    MetricLogger,
    SmoothedValue,
    all_reduce_sum,
    append_log_line,
    atomic_path,
    atomic_save,
    barrier,
    compute_n_params,
    concat_all_gather,
    get_rank,
    get_world_size,
    init_distributed_mode,
    is_main_process,
    rng_state,
    seed_everything,
    set_rng_state,
    setup_for_distributed,
)

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID")


@pytest.fixture
def restore_print(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo any replacement of builtins.print made by the test."""
    monkeypatch.setattr(builtins, "print", builtins.print)


def test_smoothed_value_statistics() -> None:
    meter = SmoothedValue(window_size=3)
    for v in (1.0, 2.0, 3.0, 4.0):
        meter.update(v)
    assert meter.median == 3.0 and meter.avg == 3.0 and meter.max == 4.0 and meter.value == 4.0
    assert meter.global_avg == 2.5 and meter.count == 4 and meter.total == 10.0
    meter.update(10.0, n=2)
    assert meter.global_avg == pytest.approx(30.0 / 6) and list(meter.deque) == [3.0, 4.0, 10.0]
    assert str(meter) == "4.0000 (5.0000)"
    assert str(SmoothedValue(fmt="{value:.1f}/{max:.1f}/{avg:.2f}")) == "nan/nan/nan"


def test_tensors_are_read_lazily_and_in_order() -> None:
    meter = SmoothedValue(window_size=10)
    meter.update(torch.tensor(1.0))
    meter.update(2.0)
    meter.update(torch.tensor([3.0]), n=3)
    assert len(meter._pending) == 3 and len(meter.deque) == 0  # nothing read yet: no device sync per step
    assert list(meter.deque) == [] and meter.value == 3.0
    assert list(meter.deque) == [1.0, 2.0, 3.0] and meter.count == 5 and meter.total == 12.0
    with pytest.raises(ValueError, match="one-element"):
        meter.update(torch.ones(2))


def test_metric_logger_strings() -> None:
    logger = MetricLogger(delimiter="  ")
    logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    logger.update(lr=1e-4, loss_ita=torch.tensor(2.0))
    logger.update(lr=3e-4, loss_ita=torch.tensor(4.0))
    assert str(logger) == "lr: 0.000300  loss_ita: 2.0000 (3.0000)"  # torch's median: the lower middle
    assert logger.global_avg() == "lr: 0.0002  loss_ita: 3.0000"
    assert f"{logger.meters['loss_ita'].global_avg:.3f}" == "3.000" and logger.loss_ita.count == 2
    with pytest.raises(TypeError, match="loss"):
        logger.update(loss="1.0")
    with pytest.raises(AttributeError):
        logger.missing
    logger.synchronize_between_processes()  # one process: no-op
    assert logger.loss_ita.count == 2


def test_log_every_format(capsys: pytest.CaptureFixture, restore_print: None) -> None:
    setup_for_distributed(True)
    logger = MetricLogger(delimiter="  ")
    seen = []
    for i in logger.log_every(range(5), print_freq=2, header="Train Epoch: [0]"):
        logger.update(loss=torch.tensor(float(i)))
        seen.append(i)
    assert seen == [0, 1, 2, 3, 4]
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4  # iterations 0, 2, 4 and the total
    memory = r"  max mem: \d+" if torch.cuda.is_available() else ""
    pattern = (r"Train Epoch: \[0\]  \[{i}/5\]  eta: \d+:\d\d:\d\d  loss: {median} \({avg}\)  "
               r"time: \d+\.\d{{4}}  data: \d+\.\d{{4}}" + memory + "$")
    assert re.match(pattern.format(i=0, median="0.0000", avg="0.0000"), lines[0]), lines[0]
    assert re.match(pattern.format(i=2, median="1.0000", avg="1.0000"), lines[1]), lines[1]
    assert re.match(pattern.format(i=4, median="2.0000", avg="2.0000"), lines[2]), lines[2]
    total = r"Train Epoch: \[0\] Total time: \d+:\d\d:\d\d \(\d+\.\d{4} s / it\)$"
    assert re.match(total, lines[3]), lines[3]


def test_log_every_counts_a_resumed_epoch_from_its_start(capsys: pytest.CaptureFixture, restore_print: None) -> None:
    setup_for_distributed(True)
    logger = MetricLogger(delimiter="  ")
    assert list(logger.log_every(range(3), print_freq=2, header="E", start=5)) == [0, 1, 2]
    lines = capsys.readouterr().out.strip().splitlines()
    assert [re.match(r"E  \[(\d)/8\]", line).group(1) for line in lines[:-1]] == ["6", "7"]


def test_meter_state_continues_the_averages() -> None:
    logger = MetricLogger()
    for value in (1.0, 2.0, 6.0):
        logger.update(loss=torch.tensor(value))
    saved = logger.state_dict()
    resumed = MetricLogger()
    resumed.add_meter("loss", SmoothedValue(window_size=2))
    resumed.load_state_dict(saved)
    resumed.update(loss=3.0)
    assert resumed.loss.global_avg == 3.0 and resumed.loss.count == 4
    assert resumed.loss.median == 3.0  # window of 2: (6, 3), median takes the lower


def test_rng_state_round_trip_through_a_weights_only_load() -> None:
    seed_everything(5)
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    buffer = io.BytesIO()
    torch.save({"rng": rng_state()}, buffer)
    first = (random.random(), np.random.randn(), np.random.rand(), torch.rand(2).tolist())
    seed_everything(6)
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True)["rng"])
    assert (random.random(), np.random.randn(), np.random.rand(), torch.rand(2).tolist()) == first


def test_print_silenced_on_non_master(restore_print: None) -> None:
    setup_for_distributed(False)
    out = io.StringIO()
    with redirect_stdout(out):
        print("hidden")
        print("shown", force=True)
    assert out.getvalue() == "shown\n"


def test_attr_dict() -> None:
    cfg = AttrDict({"opt": "adamW", "lr": 1e-4})
    assert cfg.lr == 1e-4 and cfg["opt"] == "adamW" and getattr(cfg, "opt_eps", None) is None
    cfg.momentum = 0.9
    assert cfg["momentum"] == 0.9
    del cfg.momentum
    assert "momentum" not in cfg
    with pytest.raises(AttributeError):
        cfg.missing


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_atomic_save_keeps_old_file_when_the_write_fails(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint_last.pth"
    atomic_save({"epoch": 1, "model": {"w": torch.ones(2)}}, path)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"epoch": 2, "bad": _Unpicklable()}, path)
    ckpt = torch.load(path, map_location="cpu")
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pth"]  # no temporary file left
    atomic_save({"epoch": 2}, path)
    assert torch.load(path)["epoch"] == 2


def test_atomic_path_replaces_the_file_only_when_the_write_succeeds(tmp_path: Path) -> None:
    path = tmp_path / "new_folder" / "result.json"
    with atomic_path(path) as tmp:
        assert os.path.dirname(tmp) == str(path.parent) and not os.path.exists(path)
        Path(tmp).write_text("first")
    assert path.read_text() == "first"
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # the usual permissions
    with pytest.raises(ValueError, match="half written"):
        with atomic_path(path) as tmp:
            Path(tmp).write_text("second, trunc")
            raise ValueError("half written")
    assert path.read_text() == "first" and os.listdir(path.parent) == ["result.json"]
    with atomic_path(tmp_path / "array.npy", suffix=".npy") as tmp:
        assert tmp.endswith(".npy")
        np.save(tmp, np.arange(3))  # np.save keeps a name that already ends with .npy
    assert np.load(tmp_path / "array.npy").tolist() == [0, 1, 2]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_append_log_line(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    append_log_line(path, {"train_lr": "0.000", "epoch": 0})
    append_log_line(path, {"train_lr": "0.000", "epoch": 1})
    append_log_line(path, "best epoch: 1")
    text = path.read_text()
    assert text.endswith("\nbest epoch: 1")  # no trailing newline, as the original
    lines = text.split("\n")
    assert json.loads(lines[0]) == {"train_lr": "0.000", "epoch": 0} and json.loads(lines[1])["epoch"] == 1


def test_compute_n_params() -> None:
    model = nn.Linear(1000, 1000)  # 1,001,000 parameters
    assert compute_n_params(model) == "1.0M" and compute_n_params(model, return_str=False) == 1_001_000
    assert compute_n_params(nn.Linear(10, 10)) == "0.1K"


def test_seed_everything() -> None:
    seed_everything(3)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_single_process_helpers(monkeypatch: pytest.MonkeyPatch, restore_print: None) -> None:
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    args = AttrDict(device="cpu", dist_url="env://", world_size=1)
    init_distributed_mode(args)
    assert args.distributed is False and args.rank == 0 and args.world_size == 1
    assert get_rank() == 0 and get_world_size() == 1 and is_main_process()
    barrier()
    x = torch.arange(6.0, requires_grad=True).reshape(3, 2)
    gathered = concat_all_gather(x)
    assert torch.equal(gathered, x.detach()) and not gathered.requires_grad
    y = torch.ones(3)
    assert all_reduce_sum(y) is y and torch.equal(y, torch.ones(3))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_process_worker(rank: int, world_size: int, port: int) -> None:
    """Runs in a spawned process: join a gloo group through the torchrun-style environment."""
    for name in LAUNCHER_VARS:
        os.environ.pop(name, None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    args = AttrDict(device="cpu", dist_url="env://", world_size=1)
    out = io.StringIO()
    with redirect_stdout(out):
        init_distributed_mode(args)
        print("rank message")
    try:
        assert args.distributed and args.rank == rank and args.world_size == world_size
        assert args.dist_backend == "gloo" and utils.get_world_size() == world_size
        assert ("rank message" in out.getvalue()) == (rank == 0)  # print silenced off rank 0

        local = torch.arange(4.0).reshape(2, 2) + 10 * rank
        gathered = concat_all_gather(local)
        expected = torch.cat([torch.arange(4.0).reshape(2, 2) + 10 * r for r in range(world_size)])
        assert torch.equal(gathered, expected), gathered  # rank order

        total = all_reduce_sum(torch.tensor([float(rank + 1)]))
        assert total.item() == sum(range(1, world_size + 1))

        logger = MetricLogger()
        for _ in range(rank + 1):  # rank 0 logs one value 1.0, rank 1 two values 2.0
            logger.update(loss=torch.tensor(float(rank + 1)), acc=float(rank))
        logger.synchronize_between_processes()
        assert logger.loss.count == 3 and logger.loss.total == pytest.approx(1.0 + 2.0 * 2)
        assert logger.acc.total == pytest.approx(2.0)
        meter = SmoothedValue()
        meter.update(torch.tensor(float(rank)), n=2)
        meter.synchronize_between_processes()
        assert meter.count == 4 and meter.global_avg == pytest.approx(0.5)
        barrier()
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gloo_collectives() -> None:
    mp.spawn(_two_process_worker, args=(2, _free_port()), nprocs=2, join=True)
