"""Runtime helpers shared by the scripts: distributed setup and collectives, seeding, metric logging,
atomic checkpoint writing and the JSON-lines training log.

Everything here also works in a single, non-distributed process: the collectives are identities and
the barrier is a no-op when no process group is initialised or the world has one process.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime
import json
import os
import random
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "init_distributed_mode",
    "setup_for_distributed",
    "is_dist_avail_and_initialized",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "concat_all_gather",
    "all_reduce_sum",
    "seed_everything",
    "rng_state",
    "set_rng_state",
    "SmoothedValue",
    "MetricLogger",
    "AttrDict",
    "atomic_path",
    "atomic_save",
    "append_log_line",
    "compute_n_params",
]


# ----------------------------------------------------------------------------------------------------
# distributed


_BUILTIN_PRINT = builtins.print


def setup_for_distributed(is_master: bool) -> None:
    """Silence ``print`` on non-master processes; ``print(..., force=True)`` always prints.

    Installed on every rank (and in single-process runs) so that ``force=True`` is always accepted.
    """

    def print_(*args: Any, **kwargs: Any) -> None:
        force = kwargs.pop("force", False)
        if is_master or force:
            _BUILTIN_PRINT(*args, **kwargs)

    builtins.print = print_


def init_distributed_mode(args: Any) -> None:
    """Set ``args.distributed``, ``rank``, ``world_size``, ``gpu`` from the launcher and join the group.

    Reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun, ``torch.distributed.launch --use_env``) or
    ``SLURM_PROCID`` (world size then comes from ``args.world_size``). Without either, the run is a
    single process: ``distributed=False``, rank 0, world size 1, ``gpu=None``. The backend is NCCL when
    ``args.device`` is a CUDA device and gloo otherwise, so CPU runs (and tests) work too.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        default_local = args.rank % max(1, torch.cuda.device_count())
        args.gpu = int(os.environ.get("LOCAL_RANK", default_local))
    elif "SLURM_PROCID" in os.environ:
        args.rank = int(os.environ["SLURM_PROCID"])
        args.world_size = int(getattr(args, "world_size", 1))
        args.gpu = args.rank % max(1, torch.cuda.device_count())
    else:
        print("Not using distributed mode")
        args.distributed = False
        args.rank, args.world_size, args.gpu = 0, 1, None
        setup_for_distributed(True)
        return

    args.distributed = True
    on_cuda = torch.device(getattr(args, "device", "cuda")).type == "cuda"
    args.dist_backend = "nccl" if on_cuda else "gloo"
    dist_url = getattr(args, "dist_url", None) or "env://"
    init_kwargs: dict[str, Any] = {}
    if on_cuda:
        torch.cuda.set_device(args.gpu)
        init_kwargs["device_id"] = torch.device("cuda", args.gpu)
    print(f"| distributed init (rank {args.rank}): {dist_url}, backend {args.dist_backend}", flush=True)
    dist.init_process_group(
        backend=args.dist_backend,
        init_method=dist_url,
        world_size=args.world_size,
        rank=args.rank,
        **init_kwargs,
    )
    dist.barrier()
    setup_for_distributed(args.rank == 0)


def is_dist_avail_and_initialized() -> bool:
    """Whether a process group is initialised (False in plain single-process runs)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Rank of this process; 0 when not distributed."""
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_world_size() -> int:
    """Number of processes; 1 when not distributed."""
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0, the process that writes files and prints."""
    return get_rank() == 0


def barrier() -> None:
    """Synchronise all processes; a no-op in a single process."""
    if get_world_size() > 1:
        dist.barrier()


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Gradient-free all_gather of equally shaped tensors, concatenated along dim 0 in rank order.

    With one process this is ``tensor.detach()`` (the same values, and no gradient, as the gathered copy).
    """
    world_size = get_world_size()
    if world_size == 1:
        return tensor.detach()
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over processes in place (a no-op in a single process); returns it."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s buffers (in place; a no-op in a single process).

    Called once before training: ranks seed differently, so buffers drawn at construction (the
    randomly initialised ITC queues) would otherwise differ per rank until every column has been
    overwritten. The original's DDP broadcast them from rank 0 at every step.
    """
    if get_world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=src)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process.

    Used to collect evaluation results (VQA answers, Grad-CAM maps) on every rank instead of the
    original's per-rank files.
    """
    if get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _reduce_device() -> torch.device:
    """Device of tensors handed to collectives: NCCL needs CUDA tensors, gloo takes CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------
# seeding


def seed_everything(seed: int, cuda: bool = True) -> None:
    """Seed Python's, NumPy's and torch's CPU generators, and CUDA's unless ``cuda`` is False (a per-sample
    seed in the data pipeline must leave the training step's CUDA stream alone); callers add the rank,
    as the original."""
    random.seed(seed)
    np.random.seed(seed)
    if cuda:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's random generator states (Python, NumPy, torch CPU and the current CUDA device) as
    tensors, numbers and tuples, so a checkpoint holding them still loads with ``weights_only=True``;
    ``set_rng_state`` restores them."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {"python": random.getstate(),
                             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                                       float(cached_gaussian)),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned; a CUDA state is skipped when this process has no GPU."""
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------------
# metric logging


class SmoothedValue:
    """A series of values: a sliding window (median, avg, max, last value) and a global average.

    ``update`` accepts numbers or one-element tensors. Tensors are kept as they are and read in one batch
    when a statistic is asked for (typically every ``print_freq`` iterations), so logging a CUDA loss does
    not force a host-device synchronisation at every step.
    """

    _MAX_PENDING = 1000  # bound on the unread tensors kept alive between two reads

    def __init__(self, window_size: int = 20, fmt: str | None = None) -> None:
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"
        self.deque: deque[float] = deque(maxlen=window_size)
        self._total = 0.0
        self._count = 0
        self._pending: list[tuple[float | torch.Tensor, int]] = []

    def update(self, value: float | torch.Tensor, n: int = 1) -> None:
        """Record ``value`` (weight ``n`` in the global average)."""
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"expected a number or a one-element tensor, got shape {tuple(value.shape)}")
            value = value.detach().reshape(()).clone()  # async copy: later in-place edits do not leak in
        self._pending.append((value, n))
        if len(self._pending) >= self._MAX_PENDING:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        tensors = [v for v, _ in self._pending if isinstance(v, torch.Tensor)]
        if len({t.device for t in tensors}) == 1:
            read = iter(torch.stack([t.to(torch.float64) for t in tensors]).tolist())  # one device sync
        else:
            read = iter([t.item() for t in tensors])
        for value, n in self._pending:
            number = float(next(read)) if isinstance(value, torch.Tensor) else float(value)
            self.deque.append(number)
            self._count += n
            self._total += number * n
        self._pending.clear()

    def synchronize_between_processes(self) -> None:
        """Sum ``count`` and ``total`` over processes (the window stays local); no-op in one process."""
        if get_world_size() == 1:
            return
        self._flush()
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=_reduce_device())
        dist.barrier()
        dist.all_reduce(t)
        self._count = int(t[0].item())
        self._total = t[1].item()

    def state_dict(self) -> dict[str, Any]:
        """Window and running totals, for a mid-epoch checkpoint (``load_state_dict`` restores them)."""
        self._flush()
        return {"window": list(self.deque), "total": self._total, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending.clear()
        self.deque.clear()
        self.deque.extend(state["window"])
        self._total = float(state["total"])
        self._count = int(state["count"])

    @property
    def count(self) -> int:
        self._flush()
        return self._count

    @property
    def total(self) -> float:
        self._flush()
        return self._total

    # The statistics are NaN while nothing has been recorded.
    @property
    def median(self) -> float:
        self._flush()
        return torch.tensor(list(self.deque)).median().item() if self.deque else float("nan")

    @property
    def avg(self) -> float:
        self._flush()
        if not self.deque:
            return float("nan")
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self) -> float:
        self._flush()
        return self._total / self._count if self._count else float("nan")

    @property
    def max(self) -> float:
        self._flush()
        return max(self.deque) if self.deque else float("nan")

    @property
    def value(self) -> float:
        self._flush()
        return self.deque[-1] if self.deque else float("nan")

    def __str__(self) -> str:
        return self.fmt.format(
            median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max, value=self.value
        )


class MetricLogger:
    """Named ``SmoothedValue`` meters plus a progress-printing iterator (``log_every``)."""

    def __init__(self, delimiter: str = "\t") -> None:
        self.meters: defaultdict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs: float | torch.Tensor) -> None:
        for name, value in kwargs.items():
            if not isinstance(value, (int, float, torch.Tensor)) or isinstance(value, bool):
                kind = type(value).__name__
                raise TypeError(f"meter '{name}' takes a number or a one-element tensor, got {kind}")
            self.meters[name].update(value)

    def __getattr__(self, name: str) -> SmoothedValue:
        meters = self.__dict__.get("meters", {})
        if name in meters:
            return meters[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def global_avg(self) -> str:
        """``"name: x.xxxx"`` for every meter, joined by the delimiter."""
        return self.delimiter.join(f"{name}: {meter.global_avg:.4f}" for name, meter in self.meters.items())

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Every meter's window and totals (this process's, not yet summed over processes)."""
        return {name: meter.state_dict() for name, meter in self.meters.items()}

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        """Continue the meters of ``state`` (a resumed epoch's averages then cover the whole epoch)."""
        for name, meter_state in state.items():
            self.meters[name].load_state_dict(meter_state)

    def synchronize_between_processes(self) -> None:
        """Sum every meter's count and total over processes in one all-reduce; no-op in one process.

        Every process must hold the same meter names.
        """
        if get_world_size() == 1:
            return
        names = sorted(self.meters)
        stats = [x for name in names for x in (self.meters[name].count, self.meters[name].total)]
        t = torch.tensor(stats, dtype=torch.float64, device=_reduce_device())
        dist.barrier()
        dist.all_reduce(t)
        values = t.tolist()
        for i, name in enumerate(names):
            self.meters[name]._count = int(values[2 * i])
            self.meters[name]._total = values[2 * i + 1]

    def log_every(self, iterable: Iterable, print_freq: int, header: str | None = None, start: int = 0) -> Iterator:
        """Yield from ``iterable``; print progress at every ``print_freq``-th iteration and at the last.

        Line: ``header [i/N] eta: H:MM:SS <meters> time: <avg s/it> data: <avg s> max mem: <MB>``
        (``max mem`` on CUDA only), then ``header Total time: H:MM:SS (x s / it)``. ``start``: the
        iterations already done before ``iterable``'s first item (a resumed epoch), so i and N count
        the whole epoch.
        """
        header = header or ""
        n = start + len(iterable)
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        parts = [header, "[{0:" + str(len(str(n))) + "d}/{1}]", "eta: {eta}", "{meters}", "time: {time}",
                 "data: {data}"]
        if torch.cuda.is_available():
            parts.append("max mem: {memory:.0f}")
        line = self.delimiter.join(parts)
        started = end = time.time()
        for i, obj in enumerate(iterable, start=start):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == n - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (n - i)))
                memory = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
                fields = dict(eta=str(eta), meters=str(self), time=str(iter_time), data=str(data_time))
                print(line.format(i, n, memory=memory, **fields))
            end = time.time()
        total = time.time() - started
        total_str = str(datetime.timedelta(seconds=int(total)))
        print(f"{header} Total time: {total_str} ({total / max(n - start, 1):.4f} s / it)")


# ----------------------------------------------------------------------------------------------------
# misc


class AttrDict(dict):
    """A dict whose keys are also attributes (``cfg.lr``); a missing attribute raises AttributeError."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """A fresh temporary path beside ``path`` (same folder, created if missing) for the caller to write.

    When the block ends normally the file replaces ``path`` with ``os.replace`` (atomic on one file
    system); when it raises, the temporary file is removed and ``path`` keeps its old content, so an
    interrupted or failing write never leaves a truncated checkpoint, config or result behind.
    ``suffix`` ends the temporary name (``np.save`` appends '.npy' to names without it).
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    # A name no other process uses; created by the writer, so it gets the usual permissions.
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through ``atomic_path``, flushed to disk before it replaces ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def append_log_line(path: str | os.PathLike, record: dict | str) -> None:
    """Append one JSON line (a dict) or a verbatim string to the log file (the caller checks the rank).

    Strings are written as given, without an added newline, so the original's final ``best epoch: N``
    (no trailing newline) can be reproduced.
    """
    text = json.dumps(record) + "\n" if isinstance(record, dict) else record
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def compute_n_params(model: nn.Module, return_str: bool = True) -> str | int:
    """Number of parameters of ``model``: an int, or a string such as '86.6M' / '12.3K'."""
    total = sum(p.numel() for p in model.parameters())
    if not return_str:
        return total
    return f"{total / 1e6:.1f}M" if total >= 1e6 else f"{total / 1e3:.1f}K"
