"""Datasets, transforms and loaders for every ViCHA task (spec pipeline §2.1, §4).

Scripts call `resolve_paths` on their config, then `create_dataset`, `create_sampler` and
`create_loader`. Datasets return raw strings; tokenisation happens in the task code.
"""

from __future__ import annotations

import itertools
import os
import random
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from utils import seed_everything

from .base import AnnotationDataset, build_vc_string
from .collate import vqa_collate_fn
from .grounding_dataset import GroundingDataset
from .loading import AnnotationError, load_image, load_json
from .nlvr_dataset import NLVRDataset
from .pretrain_dataset import PretrainDataset, rewrite_pretrain_path
from .retrieval_dataset import RetrievalEvalDataset, RetrievalTrainDataset
from .text import pre_caption, pre_question
from .transforms import CLIP_MEAN, CLIP_STD, build_transform
from .ve_dataset import VE_LABELS, VEDataset
from .vqa_dataset import VQADataset

__all__ = [
    "AnnotationDataset", "AnnotationError", "CLIP_MEAN", "CLIP_STD", "GroundingDataset", "NLVRDataset",
    "PretrainDataset", "ResumableSampler", "RetrievalEvalDataset", "RetrievalTrainDataset", "SeededSamples",
    "VEDataset", "VE_LABELS", "VQADataset", "build_transform", "build_vc_string", "create_dataset", "create_loader",
    "create_sampler", "load_image", "load_json", "pre_caption", "pre_question", "resolve_paths",
    "rewrite_pretrain_path", "vqa_collate_fn", "with_seeded_samples",
]

# Per script: config keys joined with --data_json_dir and with --data_dir (spec pipeline §2.1).
# Values may be a string or a list of strings; each element is joined.
PATH_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Pretrain": (("train_file",), ()),
    "Pretrain_nlvr": (("train_file",), ()),
    "Retrieval": (("train_file", "val_file", "test_file"), ("image_root",)),
    "VE": (("train_file", "val_file", "test_file"), ("image_root",)),
    "NLVR": (("train_file", "val_file", "test_file"), ("image_root",)),
    "VQA": (("train_file", "test_file", "answer_list"), ("vqa_root", "vg_root")),
    "Grounding": (("train_file", "test_file", "det_file", "coco_file"), ("image_root",)),
}


def _require(config: dict, key: str, where: str) -> Any:
    if key not in config:
        raise KeyError(f"config is missing '{key}' (needed by {where})")
    return config[key]


def _join(base: str, value: str | list[str]) -> str | list[str]:
    if isinstance(value, list):
        return [os.path.join(base, v) for v in value]
    return os.path.join(base, value)


def resolve_paths(script: str, config: dict, data_dir: str, data_json_dir: str) -> dict:
    """Join the config's relative paths in place (and return it), per script as the original.

    Plain `os.path.join`, so an absolute value in the YAML is kept. Grounding also sets
    `refcoco_data` to `data_json_dir` (the REFER files live there). Pretraining image paths are
    not in the config; `PretrainDataset` maps them onto `data_dir`.
    """
    if script not in PATH_KEYS:
        raise ValueError(f"unknown script {script!r}; expected one of {sorted(PATH_KEYS)}")
    json_keys, data_keys = PATH_KEYS[script]
    for base, keys in ((data_json_dir, json_keys), (data_dir, data_keys)):
        for key in keys:
            config[key] = _join(base, _require(config, key, f"{script} path joining"))
    if script == "Grounding":
        config["refcoco_data"] = data_json_dir
    return config


def _vc_options(config: dict) -> dict:
    """VC keys of the training datasets: `sep_token` (code default True) and `randkw_p` (default off)."""
    return {"sep_token": config.get("sep_token", True), "randkw_p": config.get("randkw_p")}


def _eval_vc(vc: dict) -> dict:
    """Evaluation datasets keep every VC: the original passes `randkw_p` to the training datasets only."""
    return {**vc, "randkw_p": None}


def _train_transform(kind: str, config: dict, res: int) -> Any:
    """The training transform with the config's augmentation keys (`crop_min_scale`, `horizontal_flip`,
    `fix_autocontrast`)."""
    return build_transform(kind, res, crop_min_scale=config.get("crop_min_scale"),
                           horizontal_flip=config.get("horizontal_flip", True),
                           fix_autocontrast=config.get("fix_autocontrast", False))


def _pretrain(config: dict, res: int, vc: dict, data_dir: str | None) -> Dataset:
    if data_dir is None:
        raise ValueError("create_dataset('pretrain') needs data_dir: pretraining image paths are remapped onto it")
    return PretrainDataset(config["train_file"], _train_transform("pretrain", config, res), data_dir, **vc)


def _retrieval(config: dict, res: int, vc: dict, data_dir: str | None) -> tuple[Dataset, ...]:
    root, test_t = config["image_root"], build_transform("test", res)
    return (
        RetrievalTrainDataset(config["train_file"], _train_transform("train", config, res), root, **vc),
        RetrievalEvalDataset(config["val_file"], test_t, root, **_eval_vc(vc)),
        RetrievalEvalDataset(config["test_file"], test_t, root, **_eval_vc(vc)),
    )


def _vqa(config: dict, res: int, vc: dict, data_dir: str | None) -> tuple[Dataset, ...]:
    roots = (config["vqa_root"], config["vg_root"])
    return (
        VQADataset(config["train_file"], _train_transform("train", config, res), *roots, split="train", **vc),
        VQADataset(config["test_file"], build_transform("test", res), *roots, split="test",
                   answer_list=config["answer_list"], **_eval_vc(vc)),
    )


def _three_splits(cls: type) -> Callable[..., tuple[Dataset, ...]]:
    """Builder for formats with train/val/test files under one image root (VE, NLVR)."""
    def build(config: dict, res: int, vc: dict, data_dir: str | None) -> tuple[Dataset, ...]:
        root, test_t = config["image_root"], build_transform("test", res)
        return (
            cls(config["train_file"], _train_transform("train", config, res), root, **vc),
            cls(config["val_file"], test_t, root, **_eval_vc(vc)),
            cls(config["test_file"], test_t, root, **_eval_vc(vc)),
        )
    return build


def _grounding(config: dict, res: int, vc: dict, data_dir: str | None) -> tuple[Dataset, ...]:
    root = config["image_root"]
    return (
        GroundingDataset(config["train_file"], _train_transform("grounding_train", config, res), root, mode="train", **vc),
        GroundingDataset(config["test_file"], build_transform("test", res), root, mode="test", **_eval_vc(vc)),
    )


# name -> (config keys it reads besides image_res and the optional VC keys, builder)
DATASET_BUILDERS: dict[str, tuple[tuple[str, ...], Callable[..., Dataset | tuple[Dataset, ...]]]] = {
    "pretrain": (("train_file",), _pretrain),
    "re": (("train_file", "val_file", "test_file", "image_root"), _retrieval),
    "vqa": (("train_file", "test_file", "answer_list", "vqa_root", "vg_root"), _vqa),
    "ve": (("train_file", "val_file", "test_file", "image_root"), _three_splits(VEDataset)),
    "nlvr": (("train_file", "val_file", "test_file", "image_root"), _three_splits(NLVRDataset)),
    "grounding": (("train_file", "test_file", "image_root"), _grounding),
}


def create_dataset(name: str, config: dict, data_dir: str | None = None) -> Dataset | tuple[Dataset, ...]:
    """Build the datasets of task `name` from an already path-resolved config.

    pretrain -> dataset; re -> (train, val, test); vqa -> (train, test); ve -> (train, val, test);
    nlvr -> (train, val, test); grounding -> (train, test). `data_dir` is needed only by
    'pretrain' (its JSONs hold absolute paths that are remapped onto it). Every key the task
    reads is checked first, so a missing one is reported by name before any file is opened.
    """
    if name not in DATASET_BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASET_BUILDERS)}")
    keys, build = DATASET_BUILDERS[name]
    for key in ("image_res", *keys):
        _require(config, key, f"create_dataset({name!r})")
    return build(config, config["image_res"], _vc_options(config), data_dir)


class ResumableSampler(DistributedSampler):
    """A `DistributedSampler` that can start an epoch part-way: ``start_at(n)`` skips the first ``n``
    indices of this rank's order for the current epoch (a run resumed from a mid-epoch checkpoint), without
    loading them; ``set_epoch`` starts the next epoch from its beginning again."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start_index = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start_index = 0

    def start_at(self, index: int) -> None:
        if not 0 <= index <= self.num_samples:
            raise ValueError(f"cannot start the epoch at sample {index}: this rank has {self.num_samples} samples")
        self.start_index = index

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start_index, None)

    def __len__(self) -> int:
        return self.num_samples - self.start_index


class SeededSamples(Dataset):
    """A training dataset whose every sample draws its augmentation (and any other randomness of
    ``__getitem__``) from its own seed, made of (``seed``, the epoch of ``sampler``, the sample's index):
    the draws no longer depend on which loader worker loads the sample, so ``num_workers`` does not
    change a run and a mid-epoch resume repeats them. The calling process's random streams are restored
    afterwards. Other attributes are the wrapped dataset's."""

    def __init__(self, dataset: Dataset, seed: int, sampler: DistributedSampler) -> None:
        self.dataset = dataset
        self.seed = seed
        self.sampler = sampler  # its set_epoch (the trainer's, every epoch) sets the epoch here too

    def sample_seed(self, index: int) -> int:
        return int(np.random.SeedSequence([self.seed, self.sampler.epoch, index]).generate_state(1)[0])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        # A loader worker's streams serve its samples only: no need to keep them (~0.1 ms a sample).
        in_worker = torch.utils.data.get_worker_info() is not None
        saved = None if in_worker else (random.getstate(), np.random.get_state(), torch.get_rng_state())
        seed_everything(self.sample_seed(index), cuda=False)
        try:
            return self.dataset[index]
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def with_seeded_samples(loader: DataLoader, seed: int) -> DataLoader:
    """``loader`` with its dataset wrapped in `SeededSamples` that follows the loader's sampler (same
    sampler, batches and workers)."""
    return DataLoader(SeededSamples(loader.dataset, seed, loader.sampler), batch_size=loader.batch_size,
                      sampler=loader.sampler, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last, persistent_workers=False)


def create_sampler(
    datasets: Sequence[Dataset | None],
    shuffles: Sequence[bool | None],
    num_replicas: int,
    rank: int,
    seed: int = 0,
) -> list[ResumableSampler | None]:
    """One `ResumableSampler` (a `DistributedSampler`) per dataset, also for a single process (`num_replicas=1`).

    Always using it makes `set_epoch(epoch)` give the same order per epoch whether or not the run
    is distributed, so a resumed run replays the same order. A None dataset or a None shuffle flag
    gives no sampler (retrieval val/test: every rank loads the whole set). Non-shuffling samplers
    pad with repeated items to a multiple of `num_replicas`, as the original.
    """
    samplers: list[ResumableSampler | None] = []
    for dataset, shuffle in zip(datasets, shuffles, strict=True):
        if dataset is None or shuffle is None:
            samplers.append(None)
        else:
            samplers.append(
                ResumableSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
            )
    return samplers


def create_loader(
    datasets: Sequence[Dataset],
    samplers: Sequence[torch.utils.data.Sampler | None],
    batch_size: Sequence[int],
    num_workers: Sequence[int],
    is_trains: Sequence[bool],
    collate_fns: Sequence[Callable | None],
) -> list[DataLoader]:
    """One DataLoader per dataset: training loaders drop the last partial batch and shuffle only
    when they have no sampler; memory is pinned only when CUDA is available. Workers are not
    persistent: they are seeded afresh from the epoch's RNG state."""
    loaders = []
    for dataset, sampler, bs, workers, is_train, collate in zip(
        datasets, samplers, batch_size, num_workers, is_trains, collate_fns, strict=True
    ):
        loaders.append(
            DataLoader(
                dataset,
                batch_size=bs,
                num_workers=workers,
                pin_memory=torch.cuda.is_available(),
                sampler=sampler,
                shuffle=is_train and sampler is None,
                collate_fn=collate,
                drop_last=is_train,
                # Workers are re-created (and re-seeded) each epoch, so a resumed run replays the
                # same augmentations as an uninterrupted one.
                persistent_workers=False,
            )
        )
    return loaders
