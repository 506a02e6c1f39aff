"""Shared fixtures: generated data in the real formats and a tiny pretraining checkpoint.

Both are built once per test session (a few seconds), so the task tests can fine-tune from a real
checkpoint written by our own Pretrain.py.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread: predictable timings on the 2-core CI machine, no OpenMP oversubscription
# when the 2-process tests or other jobs share the cores.
torch.set_num_threads(1)

DEMO_SIZES = dict(num_pretrain=256, num_retrieval=96, num_vqa=96, num_ve=96, num_nlvr=96, num_grounding=96,
                  num_eval=24)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> str:
    """A small generated data set (``tools/make_demo_data.py`` layout); returns its folder."""
    from dataset.synthetic import generate

    out = str(tmp_path_factory.mktemp("demo_data"))
    generate(out, seed=0, image_size=64, **DEMO_SIZES)
    return out


def demo_flags(data: str, json_subdir: str, output_dir: str, config: str) -> list[str]:
    """Common flags of a script run on the generated data, on CPU, without workers, from random weights."""
    return ["--config", config, "--output_dir", output_dir, "--data_dir", data,
            "--data_json_dir", os.path.join(data, json_subdir), "--text_encoder", os.path.join(data, "tokenizer"),
            "--device", "cpu", "--override", "num_workers=0", "print_freq=1000",
            # random starting weights unless a test asks for the tiny init (later overrides win)
            "init_deit=false", "init_bert=false"]


TINY_INIT_STEPS = 400
PRETRAIN_EPOCHS = 12  # of the shared pretraining checkpoint


@pytest.fixture(scope="session")
def tiny_init(demo_data, tmp_path_factory) -> dict:
    """Starting weights of the demo (tools/make_tiny_init.py) on the generated corpus: {'dir', 'result'}."""
    from tools.make_tiny_init import train_tiny_towers

    out = str(tmp_path_factory.mktemp("tiny_init"))
    result = train_tiny_towers(os.path.join(REPO, "configs/demo/Pretrain.yaml"), demo_data, out,
                               os.path.join(demo_data, "tokenizer"), steps=TINY_INIT_STEPS, batch_size=32,
                               log_every=100)
    return {"dir": out, "result": result}


@pytest.fixture(scope="session")
def pretrain_checkpoint(demo_data, tiny_init, tmp_path_factory) -> str:
    """checkpoint_last.pth of a 12-epoch tiny pretraining run on the generated data, from the tiny init
    (5 epochs left ITM at the class prior, and grounding at a random proposal's accuracy)."""
    import Pretrain

    out = str(tmp_path_factory.mktemp("pretrain"))
    flags = demo_flags(demo_data, "json_pretrain", out, os.path.join(REPO, "configs/demo/Pretrain.yaml"))
    flags[flags.index("--text_encoder") + 1] = os.path.join(tiny_init["dir"], "bert")
    deit = os.path.join(tiny_init["dir"], "vit.pth")
    Pretrain.main(flags + [f"schedular.epochs={PRETRAIN_EPOCHS}", "save_step=0", "init_deit=true", "init_bert=true",
                           f"deit_checkpoint={deit}"])
    return os.path.join(out, "checkpoint_last.pth")


def demo_config(name: str, **overrides) -> dict:
    """``configs/demo/<name>.yaml`` with its BERT config path made absolute, random starting weights and
    ``overrides`` applied."""
    from engine.config import load_config

    config = load_config(os.path.join(REPO, "configs", "demo", f"{name}.yaml"))
    config["bert_config"] = os.path.join(REPO, config["bert_config"])
    config.update(init_deit=False, init_bert=False)  # random weights: nothing to read
    config.update(overrides)
    return config


@pytest.fixture(scope="session")
def tokenizer(demo_data):
    """The generated data's WordPiece tokenizer (189 tokens)."""
    from models.tokenization import build_tokenizer

    return build_tokenizer(os.path.join(demo_data, "tokenizer"))


def pytest_addoption(parser) -> None:
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (the whole demo at its real size, 22+ min on 2 cores)")


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``slow`` are skipped unless ``--run-slow`` is given (they exceed the suite's budget)."""
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# ----------------------------------------------------------------------------------------------
# A tiny random pretraining model and batch, for the tests of the fast paths (no data generation)

TINY_CAPTIONS = ["a small red circle on the left", "a large blue square",
                 "there is a green star in the middle of the picture", "a white cross"]
TINY_CONCEPTS = ["red circle small left", "blue square", "green star middle picture shape", "white cross"]


@pytest.fixture(scope="session")
def vocab_tokenizer(tmp_path_factory):
    """The tokenizer of the generated demo vocabulary, without generating the data."""
    from dataset.synthetic import vocabulary
    from models.tokenization import build_tokenizer

    folder = tmp_path_factory.mktemp("vocab")
    (folder / "vocab.txt").write_text("\n".join(vocabulary()) + "\n")
    return build_tokenizer(str(folder))


def tiny_pretrain_model(tokenizer, dropout: bool = True, **config_overrides) -> torch.nn.Module:
    """``configs/demo/Pretrain.yaml``'s model with seed-0 random weights; ``dropout=False`` makes every
    dropout the identity (train mode kept: MAE masking, negatives and MLM masks still drawn)."""
    from models import MODEL_BUILDERS

    torch.manual_seed(0)
    model = MODEL_BUILDERS["pretrain"](demo_config("Pretrain", **config_overrides), text_encoder=None,
                                       tokenizer=tokenizer)
    if not dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return model


def tiny_pretrain_batch(tokenizer, seed: int = 1):
    """(images, captions, VCs) of 4 samples at 64 px; texts of different lengths, so padding matters."""
    image = torch.randn(len(TINY_CAPTIONS), 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    return image, tokenizer(TINY_CAPTIONS, max_length=25), tokenizer(TINY_CONCEPTS, max_length=55)


def compile_with_dynamo_only(monkeypatch) -> None:
    """Make ``nn.Module.compile`` trace with dynamo and run the traced operators as they are (backend
    'eager'): what compiling changes about the model's code is checked in seconds, while inductor's CPU
    code generation would take minutes (bench/check_cuda.py checks inductor's kernels on a GPU)."""
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: original(self, backend="eager"))
    torch._dynamo.reset()
