"""One training step (forward, backward, clipping, optimizer) captured in a CUDA graph and replayed.

Why: at the paper size a ViCHA pretraining step launches ~6,800 kernels (seven encoders, four
losses, the momentum update). On an H100 with bf16 the GPU was busy 81 ms of a 166 ms step: the
host could not launch kernels faster (docs/benchmarks.md). A CUDA graph replays every kernel of the
step with one launch.

What a captured step needs, and what :class:`GraphedTrainStep` does about it:

- fixed shapes: the batch is copied into static buffers; a batch of another shape is an error that
  names the field (pad texts to a fixed length, drop the last partial batch);
- no host synchronisation and no host-to-device copies inside the step (the MLM masks are drawn on
  the device: ``mlm_mask_draws``), random draws from the CUDA generator (graph-safe);
- a ``capturable`` optimizer whose learning rate is a device tensor: the schedulers keep writing
  floats into ``param_group['lr']``, and each replay first copies them into the captured tensors;
- ``alpha`` (the distillation ramp) is a device scalar filled before each replay;
- a few eager warm-up steps on a side stream before the capture (PyTorch's recipe).

Without CUDA (or ``enabled=False``) every call runs the plain eager step, so the same code path
serves the CPU tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional

import torch
from torch import nn

from models.tokenization import TokenBatch

ComputeTerms = Callable[[nn.Module, Any, Any], dict]


def flatten_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a batch (nested tuples/lists/dicts/TokenBatches) in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, TokenBatch):
        return [value.input_ids, value.attention_mask]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in flatten_tensors(item)]
    if isinstance(value, dict):
        return [t for key in sorted(value) for t in flatten_tensors(value[key])]
    return []


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], value: Any) -> Any:
    """``value`` with every tensor replaced by ``fn(tensor)`` (same nesting as :func:`flatten_tensors`)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, TokenBatch):
        return dataclasses.replace(value, input_ids=fn(value.input_ids), attention_mask=fn(value.attention_mask))
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(fn, item) for item in value)
    if isinstance(value, dict):
        return {key: map_tensors(fn, item) for key, item in value.items()}
    return value


def copy_into_static(static: Any, batch: Any) -> None:
    """Copy ``batch`` into the captured buffers; a field of another shape or dtype is an error."""
    targets, sources = flatten_tensors(static), flatten_tensors(batch)
    if len(targets) != len(sources):
        raise ValueError(f"cuda_graph: the batch has {len(sources)} tensors, the captured step {len(targets)}")
    for index, (target, source) in enumerate(zip(targets, sources)):
        if target.shape != source.shape or target.dtype != source.dtype:
            raise ValueError(
                f"cuda_graph: batch tensor {index} has shape {tuple(source.shape)} ({source.dtype}), the captured "
                f"step expects {tuple(target.shape)} ({target.dtype}). A graphed step needs fixed shapes: pad "
                "texts to a fixed length and drop the last partial batch (or set cuda_graph: false)"
            )
    for target, source in zip(targets, sources):
        target.copy_(source, non_blocking=True)


def autocast_context(device: torch.device, bf16: bool):
    """bf16 autocast on ``device`` when ``bf16``, else nothing (the config key ``bf16``)."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class GraphedTrainStep:
    """``step(batch, alpha) -> (loss, terms)``: the trainer's step, captured once and then replayed.

    ``compute_terms(model, batch, alpha)`` returns the named loss terms (called under bf16
    autocast when ``bf16``); the step sums them, zeroes the gradients, back-propagates, clips to
    ``max_grad_norm`` and steps the optimizer, exactly as ``engine.trainer.train_one_epoch``. The
    returned tensors are fresh copies (the graph's outputs are overwritten by the next replay).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, compute_terms: ComputeTerms, *,
                 bf16: bool, max_grad_norm: Optional[float] = None, warmup_steps: int = 3,
                 enabled: bool = True) -> None:
        self.model, self.optimizer, self.compute_terms = model, optimizer, compute_terms
        self.bf16, self.max_grad_norm = bf16, max_grad_norm
        self.warmup_steps = warmup_steps
        self.device = next(model.parameters()).device
        self.enabled = enabled and self.device.type == "cuda"
        self.calls = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self._static_batch: Any = None
        self._static_alpha: Optional[torch.Tensor] = None
        self._static_outputs: Optional[tuple[torch.Tensor, dict[str, torch.Tensor]]] = None
        self._lr_tensors: list[torch.Tensor] = []
        if self.enabled:
            for group in optimizer.param_groups:  # before the first step: step counters live on the device
                group["capturable"] = True
            optimizer.defaults["capturable"] = True

    @property
    def captured(self) -> bool:
        return self.graph is not None

    # ------------------------------------------------------------------------------------------
    def _plain_step(self, batch: Any, alpha: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with autocast_context(self.device, self.bf16):
            terms = self.compute_terms(self.model, batch, alpha)
        loss = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        return loss.detach(), {name: value.detach() for name, value in terms.items()}

    def _alpha_input(self, alpha: float) -> torch.Tensor:
        """The device tensor the warm-up and the capture both pass as alpha, holding ``alpha``."""
        if self._static_alpha is None:
            self._static_alpha = torch.tensor(float(alpha), device=self.device)
        else:
            self._static_alpha.fill_(float(alpha))
        return self._static_alpha

    def _warmup(self, batch: Any, alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """An eager step on a side stream (cuBLAS workspaces, autograd's stream bookkeeping) with the
        argument types of the capture: a compiled model that saw a float alpha here would recompile
        inside the capture, which cannot run the compiler's host syncs."""
        alpha_tensor = self._alpha_input(alpha)
        if self.device.type != "cuda":
            return self._plain_step(batch, alpha_tensor)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            result = self._plain_step(batch, alpha_tensor)
        torch.cuda.current_stream().wait_stream(side)
        return result

    def _capture(self, batch: Any, alpha: float) -> None:
        device = self.device
        self._static_batch = map_tensors(lambda t: t.detach().clone(), batch)
        self._alpha_input(alpha)
        # The captured optimizer reads its learning rates from device tensors; the groups get their
        # floats back afterwards, so schedulers, logging and state_dict() work as before.
        floats = [group["lr"] for group in self.optimizer.param_groups]
        self._lr_tensors = [torch.tensor(float(lr), device=device) for lr in floats]
        for group, tensor in zip(self.optimizer.param_groups, self._lr_tensors):
            group["lr"] = tensor
        self.optimizer.zero_grad(set_to_none=True)  # gradients get allocated inside the graph's pool
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._static_outputs = self._plain_step(self._static_batch, self._static_alpha)
        except Exception as error:
            raise RuntimeError(
                f"cuda_graph: capturing the training step failed ({type(error).__name__}: {error}). Some operation "
                "in the step cannot be captured (a host sync, a host-to-device copy or a shape read from a tensor); "
                "set cuda_graph: false to train without the graph"
            ) from error
        finally:
            for group, lr in zip(self.optimizer.param_groups, floats):
                group["lr"] = lr
        self.graph = graph

    def _replay(self, batch: Any, alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        copy_into_static(self._static_batch, batch)
        self._static_alpha.fill_(float(alpha))
        for group, tensor in zip(self.optimizer.param_groups, self._lr_tensors):
            tensor.fill_(float(group["lr"]))
        self.graph.replay()
        loss, terms = self._static_outputs
        return loss.clone(), {name: value.clone() for name, value in terms.items()}

    # ------------------------------------------------------------------------------------------
    def __call__(self, batch: Any, alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.calls += 1
        if not self.enabled:
            return self._plain_step(batch, alpha)
        if self.calls <= self.warmup_steps:
            return self._warmup(batch, alpha)
        if self.graph is None:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the warm-up's cached blocks go back, so the graph's pool can take them
            self._capture(batch, alpha)  # records the kernels without running them
        return self._replay(batch, alpha)
