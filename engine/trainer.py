"""The one training / evaluation loop shared by every script (pipeline.md §3).

``run(task, args, config)`` does what each original script did, with the task supplying what
differs: set-up (distributed, seed, output folder, config.yaml), data, model, optimiser and
scheduler, checkpoint loading or resuming, then per epoch: scheduler protocol, training with the
alpha ramp and the step-wise warm-up, evaluation, ``log.txt`` and an atomic checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

import utils
from dataset import resolve_paths, with_seeded_samples
from engine.config import get_option, save_config
from engine.cuda_graph import GraphedTrainStep
from engine.tasks.base import Task, to_device
from models.checkpoint import LoadReport, load_checkpoint, load_state_dict_checked, model_state_dict, read_checkpoint
from models.precision import set_low_precision_residual
from models.tokenization import build_tokenizer
from optim import create_optimizer
from scheduler import create_scheduler
from scheduler.cosine_lr import warmup_step_due


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss becomes NaN/inf; the message names the epoch, the step and every term."""


class NonFiniteGuard:
    """Records the first non-finite loss on the device, so the check costs no sync per step."""

    def __init__(self) -> None:
        self.first_step: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        self.names: list[str] = []

    def observe(self, step: int, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        stacked = torch.stack([loss.detach().float()] + [t.detach().float().reshape(()) for t in terms.values()])
        if self.first_step is None:
            self.first_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self.values = torch.zeros_like(stacked)
            self.names = ["loss"] + list(terms)
        fresh = (~torch.isfinite(stacked[0])) & (self.first_step < 0)
        self.first_step = torch.where(fresh, torch.full_like(self.first_step, step), self.first_step)
        self.values = torch.where(fresh, stacked, self.values)

    def check(self, epoch: int, cause: Optional[BaseException] = None) -> None:
        """Raise :class:`NonFiniteLossError` if a non-finite loss was seen (``cause``: a later error)."""
        if self.first_step is None:
            return
        step = int(self.first_step)
        if step >= 0:
            terms = ", ".join(f"{n}={v:.4g}" for n, v in zip(self.names, self.values.tolist()))
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch}, step {step}: {terms}. "
                "Stopped before writing a checkpoint; the last saved checkpoint is intact."
            ) from cause


@dataclass
class MidEpochStart:
    """Where a resumed epoch continues: ``step`` training steps were done, and (when the run has as many
    processes as the one that saved it) this process's random generator and meter states at that point."""

    step: int
    rank_state: Optional[dict] = None


# (epoch, steps done, the epoch's MetricLogger) -> None; writes a mid-epoch checkpoint.
MidEpochSaver = Callable[[int, int, utils.MetricLogger], None]


def train_one_epoch(task: Task, model: nn.Module, loader, optimizer, scheduler, epoch: int, config: dict,
                    device: torch.device, train_step: Optional[GraphedTrainStep] = None,
                    start: Optional[MidEpochStart] = None, save_mid_epoch: Optional[MidEpochSaver] = None,
                    ) -> dict[str, str]:
    """One epoch; returns the meters' global averages formatted as the original's log strings.

    ``train_step`` runs forward, backward and the optimizer (``build_train_step``: eager, or captured in
    a CUDA graph with ``cuda_graph``); by default an eager one is built for this epoch. ``start``
    continues the epoch after the steps a mid-epoch checkpoint holds (the loader's sampler skips their
    samples without loading them); ``save_mid_epoch`` is called every ``save_every_steps`` steps.
    """
    save_every = get_option(config, "save_every_steps")
    if save_every < 0:
        raise ValueError(f"config key save_every_steps is {save_every}; expected 0 (off) or a number of steps")
    model.train()
    if train_step is None:
        train_step = build_train_step(task, model, optimizer, config, device)
    logger = utils.MetricLogger(delimiter="  ")
    logger.add_meter("lr", utils.SmoothedValue(window_size=task.meter_window, fmt="{value:.6f}"))
    warmup_epochs = config["schedular"]["warmup_epochs"]
    iterations = len(loader)
    first_step = start.step if start else 0
    if first_step:
        loader.sampler.start_at(first_step * loader.batch_size)
    # Made here, before any state is restored: the loader draws its workers' base seed from the epoch's
    # stream, as in an uninterrupted epoch.
    batches = iter(loader)
    if start and start.rank_state:
        utils.set_rng_state(start.rank_state["rng"])
        logger.load_state_dict(start.rank_state["meters"])
    print_freq = get_option(config, "print_freq")
    guard = NonFiniteGuard()
    header = f"Train Epoch: [{epoch}]"
    for step, batch in enumerate(logger.log_every(batches, print_freq, header, start=first_step), start=first_step):
        batch = to_device(batch, device)
        alpha = task.alpha(config, epoch, step, iterations)
        try:
            loss, terms = train_step(batch, alpha)
            guard.observe(step, loss, terms)
        except Exception as error:
            # An error after a non-finite loss (NaN weights break later ops): report the loss as its cause.
            if not isinstance(error, NonFiniteLossError):
                guard.check(epoch, cause=error)
            raise
        logger.update(lr=optimizer.param_groups[0]["lr"], **terms)
        due = warmup_step_due(epoch, step, warmup_epochs)
        if due is not None:
            scheduler.step(due)
        if (step + 1) % print_freq == 0:
            guard.check(epoch)
        if save_mid_epoch and save_every and (step + 1) % save_every == 0 and step + 1 < iterations:
            guard.check(epoch)  # never save weights that a non-finite loss has touched
            save_mid_epoch(epoch, step + 1, logger)
    guard.check(epoch)
    logger.synchronize_between_processes()
    print("Averaged stats:", logger.global_avg())
    return {name: task.log_format.format(meter.global_avg) for name, meter in logger.meters.items()}


def build_train_step(task: Task, model: nn.Module, optimizer, config: dict, device: torch.device) -> GraphedTrainStep:
    """The step of ``train_one_epoch``: bf16 autocast (``bf16``), the sum of the task's loss terms,
    backward, clipping (``max_grad_norm``), optimizer; captured in a CUDA graph with ``cuda_graph``."""
    graphed = bool(get_option(config, "cuda_graph"))
    if graphed:
        problems = []
        if device.type != "cuda":
            problems.append(f"a CUDA device (this run uses {device})")
        if utils.get_world_size() > 1:
            problems.append("a single process (not yet measured with DistributedDataParallel)")
        if not task.supports_cuda_graph:
            problems.append(f"a task with fixed batch shapes (Pretrain; not {task.script})")
        if problems:
            raise ValueError("config key cuda_graph: true needs " + " and ".join(problems) + "; set it to false")

    def compute_terms(module: nn.Module, batch, alpha) -> dict:
        return task.train_step(module, batch, alpha, device)

    return GraphedTrainStep(model, optimizer, compute_terms, bf16=get_option(config, "bf16"),
                            max_grad_norm=get_option(config, "max_grad_norm"), enabled=graphed)


def _checkpoint_payload(model: nn.Module, optimizer, scheduler, config: dict, epoch: int, extra: dict) -> dict:
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "config": config,
        "epoch": epoch,
    }
    payload.update(extra)
    return payload


def load_initial_weights(task: Task, args: argparse.Namespace, config: dict, model: nn.Module, optimizer,
                         scheduler) -> tuple[int, dict]:
    """``--checkpoint`` with ``--resume``: restore model, optimiser, scheduler and continue at the next
    epoch. Without ``--resume``: task-specific remap of a (pretraining) checkpoint. Returns
    (start_epoch, extra state such as the best metric so far)."""
    if not args.checkpoint:
        return 0, {}
    if getattr(args, "resume", False):
        checkpoint = read_checkpoint(args.checkpoint)
        for key in ("model", "lr_scheduler", "epoch"):
            if key not in checkpoint:
                raise KeyError(f"cannot resume from {args.checkpoint}: it has no '{key}' entry")
        report = load_state_dict_checked(model, model_state_dict(checkpoint), source=args.checkpoint)
        if report.missing_keys:
            raise ValueError(f"cannot resume from {args.checkpoint}: {report.summary()}")
        if not config.get("avoid_optim", False):
            optimizer.load_state_dict(checkpoint["optimizer"])
            for group in optimizer.param_groups:  # a cuda_graph run saves True; this run decides again
                group["capturable"] = optimizer.defaults.get("capturable", False)
        scheduler.load_state_dict(checkpoint["lr_scheduler"])
        state = {k: checkpoint[k] for k in ("best", "best_epoch") if k in checkpoint}
        if checkpoint.get("step"):  # written part-way through that epoch (save_every_steps)
            print(f"resumed from {args.checkpoint} (epoch {checkpoint['epoch']}, after step {checkpoint['step']})")
            state.update({k: checkpoint.get(k) for k in ("step", "epoch_steps", "rank_states")})
            return checkpoint["epoch"], state
        print(f"resumed from {args.checkpoint} (epoch {checkpoint['epoch']})")
        return checkpoint["epoch"] + 1, state
    report: LoadReport
    report, _ = load_checkpoint(model, args.checkpoint, task.name, training=not getattr(args, "evaluate", False),
                                distill=config.get("distill", True))
    task.check_load_report(report, args.checkpoint, model)
    print(f"loaded {args.checkpoint}: {report.summary()}")
    return 0, {}


def apply_auto_resume(args: argparse.Namespace) -> None:
    """``--auto_resume``: point ``--checkpoint`` and ``--resume`` at ``--output_dir``'s checkpoint_last.pth
    when a previous run of this command left one (training only). Rank 0 decides for every process, so
    that they all resume or all start afresh (a process that cannot read the file then says so)."""
    if not getattr(args, "auto_resume", False) or getattr(args, "evaluate", False):
        return
    last = os.path.join(args.output_dir, "checkpoint_last.pth")
    if utils.all_gather_object(os.path.isfile(last))[0]:
        print(f"--auto_resume: resuming from {last}" + (f" (not --checkpoint {args.checkpoint})" if args.checkpoint
                                                        else ""))
        args.checkpoint, args.resume = last, True
    else:
        print(f"--auto_resume: no {last} yet, starting " + (f"from {args.checkpoint}" if args.checkpoint
                                                            else "from the initial weights"))


def _mid_epoch_start(state: dict, epoch: int, epoch_steps: int) -> Optional[MidEpochStart]:
    """Where the resumed ``epoch`` continues, from the ``state`` of ``load_initial_weights``; None when the
    checkpoint was written at an epoch's end. A checkpoint from a run with another number of steps per
    epoch (other batch size, data or number of processes) restarts the epoch from its first step: its
    samples cannot be mapped onto this run's order."""
    step = state.get("step")
    if not step:
        return None
    if state.get("epoch_steps") != epoch_steps or step >= epoch_steps:
        print(f"warning: the mid-epoch checkpoint was written after step {step} of {state.get('epoch_steps')} of "
              f"epoch {epoch}, but this run has {epoch_steps} steps per epoch (another batch size, data or number "
              f"of processes): epoch {epoch} restarts from its first step")
        return None
    rank_states = state.get("rank_states") or []
    if len(rank_states) != utils.get_world_size():
        print(f"warning: the mid-epoch checkpoint holds the random states of {len(rank_states)} processes, this run "
              f"has {utils.get_world_size()}: the epoch continues at step {step} with fresh random streams")
        return MidEpochStart(step)
    return MidEpochStart(step, rank_states[utils.get_rank()])


COMPILE_MODES = ("none", "blocks", "model")
# torch.compile's own modes (config key compile_mode). The ones that capture CUDA graphs themselves
# (inductor's cudagraph trees) cannot run inside the trainer's captured step (cuda_graph).
TORCH_COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def check_compile_mode(compile_mode: str, cuda_graph: bool = False, device: Optional[torch.device] = None) -> None:
    """Validate config key ``compile_mode``, alone and against ``cuda_graph`` and the device.

    The autotuning modes are refused on CPU: with PyTorch 2.14.1 the tiny pretraining model trained
    with ``compile: blocks`` that way got NaN gradients from its second step on (the compiled BERT
    layers' backward, dropout on; the default mode matched eager)."""
    if compile_mode not in TORCH_COMPILE_MODES:
        raise ValueError(f"config key compile_mode is {compile_mode!r}; expected one of {TORCH_COMPILE_MODES}")
    if cuda_graph and compile_mode in CUDAGRAPH_COMPILE_MODES:
        raise ValueError(f"config key compile_mode {compile_mode!r} captures CUDA graphs itself, which cannot "
                         "happen inside the step that cuda_graph: true captures; use 'max-autotune-no-cudagraphs' "
                         "or 'default' with cuda_graph")
    if device is not None and device.type == "cpu" and compile_mode.startswith("max-autotune"):
        raise ValueError(f"config key compile_mode {compile_mode!r} is refused on CPU: there it gave NaN gradients "
                         "from the second training step (compile: blocks, PyTorch 2.14.1); use 'default'")


def apply_compile(model: nn.Module, mode: str, compile_mode: str = "default") -> nn.Module:
    """Config key ``compile``. ``blocks``: compile each ViT block and BERT layer in place (fused
    layer norms, GELU, residuals; about a minute); ``model``: the whole forward as one graph (also the
    loss heads; several minutes on first use). ``compile_mode`` is torch.compile's ``mode``:
    'max-autotune-no-cudagraphs' times Triton matrix-product templates against cuBLAS for every shape
    and can fuse the elementwise work after a product into it (much longer first compile).
    Parameter names stay the same (checkpoints unchanged). Returns ``model``."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"config key compile is {mode!r}; expected one of {COMPILE_MODES}")
    check_compile_mode(compile_mode)
    if mode == "none":
        return model
    options = {} if compile_mode == "default" else {"mode": compile_mode}
    import torch._dynamo
    from timm.models.vision_transformer import Block

    from models.xbert import BertLayer

    # One compiled graph per (layer kind, shapes); the default limit of 8 is too low for 7 encoders.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if mode == "model":
        model.compile(**options)
        return model
    for module in model.modules():
        if isinstance(module, (Block, BertLayer)):
            module.compile(**options)
    return model


def configure_runtime(model: nn.Module, config: dict, device: Optional[torch.device] = None) -> None:
    """Apply the speed switches of the config to a freshly built model (compilation included) that
    will run on ``device``."""
    if hasattr(model, "set_fused_attention"):
        model.set_fused_attention(get_option(config, "fused_attention"))
    if hasattr(model, "share_image_keys_values"):
        model.share_image_keys_values = get_option(config, "share_image_keys_values")
    set_low_precision_residual(model, get_option(config, "bf16_residual"))
    if get_option(config, "grad_checkpointing") and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    compile_mode = get_option(config, "compile_mode")
    check_compile_mode(compile_mode, bool(get_option(config, "cuda_graph")), device)
    apply_compile(model, get_option(config, "compile"), compile_mode)


def run(task: Task, args: argparse.Namespace, config: dict) -> dict[str, Any]:
    """Train and/or evaluate ``task``; returns the last log record (handy for tests)."""
    utils.init_distributed_mode(args)
    device = torch.device(args.device)
    if device.type == "cuda" and args.gpu is not None:
        device = torch.device("cuda", args.gpu)
    rank = utils.get_rank()
    utils.seed_everything(args.seed + rank)
    os.makedirs(args.output_dir, exist_ok=True)
    if utils.is_main_process():
        save_config(config, os.path.join(args.output_dir, "config.yaml"))  # as given, before path joining
    config = resolve_paths(task.script, copy.deepcopy(config), args.data_dir, args.data_json_dir)

    tokenizer = build_tokenizer(args.text_encoder)
    datasets = task.build_datasets(config, args)
    loaders = task.build_loaders(datasets, config, args, tokenizer)
    if get_option(config, "seed_per_sample") and loaders.get("train") is not None:
        loaders["train"] = with_seeded_samples(loaders["train"], args.seed)
    model = task.build_model(config, args, tokenizer)
    configure_runtime(model, config, device)
    model.to(device)
    print(f"parameters: {utils.compute_n_params(model)}")

    optimizer = create_optimizer(config["optimizer"], model)
    scheduler, _ = create_scheduler(config["schedular"], optimizer)
    apply_auto_resume(args)
    start_epoch, state = load_initial_weights(task, args, config, model, optimizer, scheduler)
    model_without_ddp = model
    if args.distributed:
        utils.broadcast_buffers(model)  # e.g. the random initial queues: rank 0's everywhere
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None,
            find_unused_parameters=task.find_unused_parameters,
            broadcast_buffers=False,  # once above; afterwards the queues stay equal (gathered writes)
        )

    train_step = None if getattr(args, "evaluate", False) else build_train_step(task, model, optimizer, config, device)
    epochs = config["schedular"]["epochs"]
    warmup_epochs = config["schedular"]["warmup_epochs"]
    evaluate_only = getattr(args, "evaluate", False)
    best, best_epoch = state.get("best", 0.0), state.get("best_epoch", 0)
    log_path = os.path.join(args.output_dir, "log.txt")
    last_path = os.path.join(args.output_dir, "checkpoint_last.pth")
    record: dict[str, Any] = {}
    mid_epoch_start = None if evaluate_only else _mid_epoch_start(state, start_epoch, len(loaders["train"]))
    if task.scheduler_step_at == "epoch_end" and start_epoch > 0 and not mid_epoch_start and not evaluate_only:
        # An epoch-end checkpoint is written before the scheduler's step for the next epoch: take it here.
        scheduler.step(start_epoch + warmup_epochs)

    def checkpoint(epoch: int, **extra: Any) -> dict:
        """The checkpoint of ``epoch``: the original's five entries, the best metric so far for
        best-selection tasks, and ``extra``."""
        if task.checkpoint_policy == "best":
            extra.update(best=best, best_epoch=best_epoch)
        return _checkpoint_payload(model_without_ddp, optimizer, scheduler, config, epoch, extra)

    def save_mid_epoch(epoch: int, steps_done: int, logger: utils.MetricLogger) -> None:
        """checkpoint_last.pth after ``steps_done`` steps of ``epoch``, with every process's random
        generator and meter states, so that ``--resume`` continues with the next step."""
        rank_states = utils.all_gather_object({"rng": utils.rng_state(), "meters": logger.state_dict()})
        if utils.is_main_process():
            utils.atomic_save(checkpoint(epoch, step=steps_done, epoch_steps=len(loaders["train"]),
                                         rank_states=rank_states), last_path)
            print(f"saved {last_path} (epoch {epoch}, step {steps_done}, random states of {len(rank_states)} "
                  "processes)")

    if start_epoch >= epochs and not evaluate_only:
        print(f"nothing to train: {args.checkpoint} ends epoch {start_epoch - 1} of {epochs} (schedular.epochs)")
        return record
    start_time = time.time()
    print(f"start {'evaluation' if evaluate_only else 'training'} (epochs {start_epoch}..{epochs - 1})")
    for epoch in range(start_epoch, epochs):
        if task.scheduler_step_at == "epoch_start" and epoch > 0 and not evaluate_only:
            scheduler.step(epoch + warmup_epochs)
        utils.seed_everything((args.seed + rank) * 1000 + epoch)  # per-epoch streams: resume = no restart
        train_stats: dict[str, str] = {}
        if not evaluate_only:
            loaders["train"].sampler.set_epoch(epoch)
            train_stats = train_one_epoch(task, model, loaders["train"], optimizer, scheduler, epoch, config, device,
                                          train_step, start=mid_epoch_start if epoch == start_epoch else None,
                                          save_mid_epoch=save_mid_epoch)
        metrics = task.evaluate(model_without_ddp, loaders, config, args, epoch, device)
        record = {**{f"train_{k}": v for k, v in train_stats.items()}, **metrics, "epoch": epoch}
        if utils.is_main_process():
            utils.append_log_line(log_path, record)
            if not evaluate_only:
                selection = task.selection_metric(metrics)
                improved = selection is not None and selection > best
                if improved:
                    best, best_epoch = selection, epoch
                payload = checkpoint(epoch)
                utils.atomic_save(payload, last_path)
                if improved:
                    utils.atomic_save(payload, os.path.join(args.output_dir, "checkpoint_best.pth"))
                save_step = config.get("save_step")
                if save_step and (epoch + 1) % save_step == 0:
                    utils.atomic_save(payload, os.path.join(args.output_dir, f"checkpoint_{epoch:02d}.pth"))
        if evaluate_only:
            break
        if task.scheduler_step_at == "epoch_end":
            scheduler.step(epoch + warmup_epochs + 1)
        utils.barrier()
    if task.checkpoint_policy == "best" and task.log_best_epoch and not evaluate_only and utils.is_main_process():
        utils.append_log_line(log_path, f"best epoch: {best_epoch}")
    elapsed = str(datetime.timedelta(seconds=int(time.time() - start_time)))
    print(f"{'evaluation' if evaluate_only else 'training'} time {elapsed}; log: {os.path.abspath(log_path)}")
    if not evaluate_only:
        print(f"checkpoint: {os.path.abspath(last_path)}")
    return record
