"""Learning-rate schedule (pipeline spec §2.7 tables) and optimizer parameter groups (§2.6)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.config import load_config
from optim import create_optimizer
from scheduler import WARMUP_STEP_ITERS, CosineLRScheduler, create_scheduler, warmup_step_due

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class Tiny(nn.Module):
    """Parameters of every kind the grouping rule distinguishes."""

    def __init__(self) -> None:
        super().__init__()
        self.temp = nn.Parameter(torch.tensor(0.07))  # 0-D: decayed, as the original
        self.linear = nn.Linear(4, 3)  # weight decayed, bias not
        self.norm = nn.LayerNorm(3)  # 1-D weight and bias: not decayed
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 3))  # 3-D: decayed
        self.frozen = nn.Linear(3, 3)  # a momentum copy: not in the optimizer
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(3, 2, bias=False)


class TinyWithSkip(Tiny):
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


def _ids(params: list[torch.Tensor]) -> list[int]:
    return [id(p) for p in params]


def _optimizer_for(config: dict) -> torch.optim.Optimizer:
    return create_optimizer(config["optimizer"], Tiny())


def _epoch_lrs(config: dict, end_of_epoch_step: bool) -> tuple[list[float], list[float]]:
    """Run the trainer's call protocol; return (lr of each epoch-0 iteration, lr of each epoch).

    Epoch 0 is long enough for the whole warm-up. ``end_of_epoch_step`` selects the variant of
    Retrieval/VE/NLVR/Grounding (step(e + W + 1) after epoch e) instead of the one of Pretrain/VQA
    (step(e + W) before epoch e >= 1).
    """
    optimizer = _optimizer_for(config)
    scheduler, _ = create_scheduler(config["schedular"], optimizer)
    warmup, epochs = config["schedular"]["warmup_epochs"], config["schedular"]["epochs"]
    iteration_lrs = []
    for i in range(WARMUP_STEP_ITERS * warmup + 50):
        iteration_lrs.append(optimizer.param_groups[0]["lr"])
        t = warmup_step_due(0, i, warmup)
        if t is not None:
            scheduler.step(t)
    epoch_lrs = [optimizer.param_groups[0]["lr"]]
    for epoch in range(1, epochs):
        if end_of_epoch_step:
            scheduler.step(epoch - 1 + warmup + 1)
        else:
            scheduler.step(epoch + warmup)
        epoch_lrs.append(optimizer.param_groups[0]["lr"])
        assert optimizer.param_groups[1]["lr"] == epoch_lrs[-1]
    return iteration_lrs, epoch_lrs


# (config, end-of-epoch protocol, warm-up values at t = 0, 1, W-1, W, epoch LRs) from the spec's table;
# None = not listed there.
LR_TABLE = [
    ("Pretrain.yaml", False, [1e-5, 1.45e-5, None, 9.55e-5, 1e-4],
     [1e-4, 9.82e-5, 9.29e-5, 8.45e-5, 7.37e-5, 6.14e-5, 4.86e-5, 3.63e-5, 2.55e-5, 1.71e-5, 1.18e-5]),
    ("Retrieval_coco.yaml", True, [1e-5, 1e-5], [1e-5, 9.14e-6, 6.89e-6, 4.11e-6, 1.86e-6]),
    ("VQA.yaml", False, [1e-5, 1.25e-5, 1.5e-5, 1.75e-5, 2e-5],
     [2e-5, 1.93e-5, 1.72e-5, 1.41e-5, 1.05e-5, 6.86e-6, 3.78e-6, 1.72e-6]),
    ("VE.yaml", True, [1e-5, 2e-5], [2e-5, 1.82e-5, 1.34e-5, 7.56e-6, 2.81e-6]),
    ("Grounding.yaml", True, [1e-5, 1e-5], [1e-5, 9.14e-6, 6.89e-6, 4.11e-6, 1.86e-6]),
]


@pytest.mark.parametrize("name,end_of_epoch,warmup_values,epoch_values", LR_TABLE)
def test_lr_table(name: str, end_of_epoch: bool, warmup_values: list, epoch_values: list[float]) -> None:
    config = load_config(CONFIG_DIR / name)
    iteration_lrs, epoch_lrs = _epoch_lrs(config, end_of_epoch)
    assert epoch_lrs == pytest.approx(epoch_values, rel=5e-3)
    # warm-up value k (t = k) is in force from iteration 100k + 1 (k >= 1); iterations 0..100 run at warmup_lr
    warmup = config["schedular"]["warmup_epochs"]
    expected_k = {0: warmup_values[0], 1: warmup_values[1], warmup - 1: warmup_values[-2],
                  warmup: warmup_values[-1]}
    for k, value in expected_k.items():
        if value is None:
            continue
        first = 0 if k == 0 else WARMUP_STEP_ITERS * k + 1
        last = WARMUP_STEP_ITERS if k == 0 else WARMUP_STEP_ITERS * (k + 1)
        for i in (first, min(last, len(iteration_lrs) - 1)):
            assert iteration_lrs[i] == pytest.approx(value, rel=5e-3), (k, i)
    assert iteration_lrs[-1] == pytest.approx(config["optimizer"]["lr"])  # epoch 0 after warm-up runs at L0


def test_warmup_iteration_boundaries_pretrain() -> None:
    config = load_config(CONFIG_DIR / "Pretrain.yaml")
    iteration_lrs, _ = _epoch_lrs(config, False)
    assert set(iteration_lrs[:101]) == {1e-5}
    assert iteration_lrs[101] == pytest.approx(1.45e-5) and iteration_lrs[200] == pytest.approx(1.45e-5)
    assert iteration_lrs[2000] == pytest.approx(9.55e-5) and iteration_lrs[2001] == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "name,epochs,last",
    [("Pretrain_4m.yaml", 30, 1.02e-5), ("Retrieval_flickr.yaml", 10, 1.22e-6), ("NLVR.yaml", 10, 1.46e-6)],
)
def test_last_epoch_lr(name: str, epochs: int, last: float) -> None:
    config = load_config(CONFIG_DIR / name)
    _, epoch_lrs = _epoch_lrs(config, name != "Pretrain_4m.yaml")
    assert len(epoch_lrs) == epochs and epoch_lrs[-1] == pytest.approx(last, rel=5e-3)


def test_nlvr_pretrain_single_epoch() -> None:
    config = load_config(CONFIG_DIR / "NLVR_pretrain.yaml")
    iteration_lrs, epoch_lrs = _epoch_lrs(config, False)
    assert set(iteration_lrs[:101]) == {1e-5} and set(iteration_lrs[101:]) == {2e-5} and epoch_lrs == [2e-5]


def test_warmup_step_due() -> None:
    assert [warmup_step_due(0, i, 2) for i in (0, 1, 99, 100, 150, 200, 201, 300)] == [
        0, None, None, 1, None, 2, None, None]
    assert warmup_step_due(1, 0, 2) is None and warmup_step_due(1, 100, 20) is None
    assert warmup_step_due(0, 0, 0) == 0 and warmup_step_due(0, 100, 0) is None


def test_formula_after_the_cycle_and_decay_rate() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=1.0)
    scheduler = CosineLRScheduler(optimizer, t_initial=4, lr_min=0.1, decay_rate=0.5, warmup_t=2,
                                  warmup_lr_init=0.0)
    assert optimizer.param_groups[0]["lr"] == 0.0  # set to warmup_lr at construction
    assert scheduler.lr_at(1) == [0.5]
    assert scheduler.lr_at(2) == [1.0]
    assert scheduler.lr_at(4) == pytest.approx([0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))])
    assert scheduler.lr_at(6) == [0.1] and scheduler.lr_at(100) == [0.1]  # past the single cycle: lr_min
    scheduler.step(3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))


def test_no_warmup_keeps_base_lr() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.3)
    block = {"sched": "cosine", "epochs": 5, "min_lr": 0.0, "cooldown_epochs": 2}
    scheduler, epochs = create_scheduler(block, optimizer)
    assert epochs == 7 and optimizer.param_groups[0]["lr"] == 0.3 and scheduler.lr_at(0) == [0.3]


def test_scheduler_state_dict_round_trip() -> None:
    config = load_config(CONFIG_DIR / "VQA.yaml")
    optimizer = _optimizer_for(config)
    scheduler, _ = create_scheduler(config["schedular"], optimizer)
    scheduler.step(5)
    state = scheduler.state_dict()
    assert "optimizer" not in state and state["base_values"] == [2e-5, 2e-5] and state["warmup_t"] == 4
    torch.save(state, io.BytesIO())  # picklable, as it goes into checkpoints
    fresh_optimizer = _optimizer_for(config)
    fresh, _ = create_scheduler({**config["schedular"], "epochs": 99, "warmup_epochs": 0}, fresh_optimizer)
    fresh.load_state_dict(state)
    assert fresh.optimizer is fresh_optimizer
    fresh.step(6)
    scheduler.step(6)
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_unknown_schedule_is_rejected() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="'step'"):
        create_scheduler({"sched": "step", "epochs": 3}, optimizer)


def test_optimizer_groups_order_and_membership() -> None:
    model = Tiny()
    optimizer = create_optimizer({"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02}, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    no_decay, decay = optimizer.param_groups
    # named_parameters() order: the module's own parameters first, then sub-modules in definition order
    assert _ids(no_decay["params"]) == _ids([model.linear.bias, model.norm.weight, model.norm.bias])
    expected_decay = [model.temp, model.pos_embed, model.linear.weight, model.head.weight]
    assert _ids(decay["params"]) == _ids(expected_decay)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.02
    assert optimizer.defaults["weight_decay"] == 0.0
    assert decay["betas"] == (0.9, 0.999) and decay["eps"] == 1e-8 and decay["lr"] == 1e-4
    in_optimizer = set(_ids(no_decay["params"] + decay["params"]))
    assert not in_optimizer & set(_ids(list(model.frozen.parameters())))


def test_model_no_weight_decay_is_honoured() -> None:
    model = TinyWithSkip()
    optimizer = create_optimizer({"opt": "adamw", "lr": 1e-4, "weight_decay": 0.02}, model)
    no_decay, decay = optimizer.param_groups
    expected_no_decay = [model.pos_embed, model.linear.bias, model.norm.weight, model.norm.bias]
    assert _ids(no_decay["params"]) == _ids(expected_no_decay)
    assert _ids(decay["params"]) == _ids([model.temp, model.linear.weight, model.head.weight])


def test_optimizer_variants_and_options() -> None:
    model = Tiny()
    adam = create_optimizer({"opt": "Adam", "lr": 0.1, "weight_decay": 0.0, "opt_eps": 1e-6,
                             "opt_betas": [0.8, 0.9], "opt_args": {"amsgrad": True}}, model)
    assert isinstance(adam, torch.optim.Adam) and len(adam.param_groups) == 1
    group = adam.param_groups[0]
    assert group["eps"] == 1e-6 and group["betas"] == (0.8, 0.9) and group["amsgrad"] is True
    assert len(group["params"]) == sum(1 for p in model.parameters() if p.requires_grad)
    sgd = create_optimizer({"opt": "sgd", "lr": 0.1, "weight_decay": 1e-4}, model)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    plain = create_optimizer({"opt": "momentum", "lr": 0.1, "weight_decay": 1e-4, "momentum": 0.5}, model)
    assert not plain.defaults["nesterov"] and plain.defaults["momentum"] == 0.5
    auto = create_optimizer({"opt": "adamw", "lr": 0.1, "weight_decay": 0.02}, model)  # CPU: foreach
    assert auto.defaults["foreach"] is True and not auto.defaults["fused"]
    forced = create_optimizer({"opt": "adamw", "lr": 0.1, "weight_decay": 0.02, "fused": False}, model)
    assert not forced.defaults["fused"]
    rmsprop = create_optimizer({"opt": "RMSprop", "lr": 0.1, "weight_decay": 1e-4, "momentum": 0.5}, model)
    assert isinstance(rmsprop, torch.optim.RMSprop) and rmsprop.defaults["alpha"] == 0.9
    assert rmsprop.defaults["momentum"] == 0.5 and rmsprop.defaults["foreach"] is True
    adadelta = create_optimizer({"opt": "adadelta", "lr": 1.0, "weight_decay": 0.0, "fused": False}, model)
    assert isinstance(adadelta, torch.optim.Adadelta) and adadelta.defaults["eps"] == 1e-6
    assert adadelta.defaults["foreach"] is False
    wrapped = create_optimizer({"opt": "lookahead_adamw", "lr": 0.1, "weight_decay": 0.02}, model)
    from timm.optim import Lookahead

    assert isinstance(wrapped, Lookahead) and wrapped.defaults["lookahead_k"] == 6
    assert len(wrapped.param_groups) == 2 and wrapped.param_groups[1]["weight_decay"] == 0.02
    before = model.linear.weight.detach().clone()
    model.linear(torch.randn(3, 4)).sum().backward()
    wrapped.step()
    assert not torch.equal(before, model.linear.weight)
    for bad in ("lamb", "fancy_adamw"):
        with pytest.raises(ValueError, match=bad):
            create_optimizer({"opt": bad, "lr": 0.1}, model)


def test_optimizer_steps_and_state_dict_loads() -> None:
    model = Tiny()
    config = {"opt": "adamW", "lr": 1e-2, "weight_decay": 0.02}
    optimizer = create_optimizer(config, model)
    loss = model.head(model.norm(model.linear(torch.randn(5, 4)))).sum() + model.temp + model.pos_embed.sum()
    loss.backward()
    before = model.temp.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.temp.detach())
    again = create_optimizer(config, Tiny())
    again.load_state_dict(optimizer.state_dict())
