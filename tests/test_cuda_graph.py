"""The CUDA-graph training step (engine/cuda_graph.py, config key ``cuda_graph``) on CPU.

The capture itself needs a GPU (``bench/check_cuda.py`` compares replayed and eager steps there);
these tests check what runs everywhere: the static-buffer copies and their errors, the eager path
being the trainer's step, a tensor ``alpha`` (as the graph passes it) giving the float's losses,
device-side MLM masks, the configuration rules and the fixed text padding.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from conftest import REPO, demo_config, tiny_pretrain_batch, tiny_pretrain_model
from engine.cli import build_parser, parse_and_load
from engine.cuda_graph import GraphedTrainStep, copy_into_static, flatten_tensors, map_tensors
from engine.tasks import TASKS
from engine.trainer import build_train_step
from models import losses
from models.model_pretrain import mlm_draws_on_device
from models.tokenization import TokenBatch
from optim import create_optimizer


@pytest.fixture(scope="module")
def tokenizer(vocab_tokenizer):
    return vocab_tokenizer


def tiny_model(tokenizer, **overrides) -> nn.Module:
    return tiny_pretrain_model(tokenizer, dropout=False, **overrides)


def compute_terms(model, batch, alpha):
    image, caption, vc = batch
    return model(image, (caption, vc), alpha=alpha)


# --- static buffers ------------------------------------------------------------------------------


def test_batch_tensors_are_flattened_and_copied_in_place(tokenizer):
    batch = (torch.zeros(2, 3), (TokenBatch(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)),))
    static = map_tensors(torch.clone, batch)
    assert isinstance(static[1][0], TokenBatch) and len(flatten_tensors(static)) == 3
    pointers = [t.data_ptr() for t in flatten_tensors(static)]
    fresh = map_tensors(lambda t: t + 5, batch)
    copy_into_static(static, fresh)
    assert [t.data_ptr() for t in flatten_tensors(static)] == pointers  # same memory: what the graph reads
    for target, source in zip(flatten_tensors(static), flatten_tensors(fresh)):
        assert torch.equal(target, source)


def test_a_batch_of_another_shape_is_refused_with_the_field_and_shapes():
    static = (torch.zeros(4, 3), TokenBatch(torch.zeros(4, 25, dtype=torch.long), torch.zeros(4, 25, dtype=torch.long)))
    shorter = (torch.zeros(4, 3),
               TokenBatch(torch.zeros(4, 25, dtype=torch.long), torch.zeros(4, 17, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"batch tensor 2 has shape \(4, 17\).*expects \(4, 25\).*fixed shapes"):
        copy_into_static(static, shorter)
    with pytest.raises(ValueError, match="batch tensor 0 .*torch.float64"):
        copy_into_static(static, (torch.zeros(4, 3, dtype=torch.float64), static[1]))
    assert torch.equal(static[1].attention_mask, torch.zeros(4, 25, dtype=torch.long))  # nothing half-copied


# --- the step ------------------------------------------------------------------------------------


def test_without_cuda_the_step_is_the_plain_trainer_step(tokenizer):
    model = tiny_model(tokenizer)
    reference = copy.deepcopy(model)
    config = demo_config("Pretrain")
    runner = GraphedTrainStep(model, create_optimizer(config["optimizer"], model), compute_terms, bf16=False,
                              max_grad_norm=1.0, warmup_steps=1, enabled=True)
    assert not runner.enabled  # no CUDA here: every call runs eagerly
    optimizer = create_optimizer(config["optimizer"], reference)
    batch = tiny_pretrain_batch(tokenizer)
    for step in range(3):  # seeds that mask some caption token (none masked: MLM is 0/0, as the original's)
        torch.manual_seed(100 + step)
        loss, terms = runner(batch, 0.2 * step)
        torch.manual_seed(100 + step)
        expected = compute_terms(reference, batch, 0.2 * step)
        optimizer.zero_grad(set_to_none=True)
        total = sum(expected.values())
        total.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        optimizer.step()
        assert set(terms) == {"loss_mlm", "loss_ita", "loss_itm", "loss_mae"}
        assert not loss.requires_grad and torch.equal(loss, total.detach())
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert not runner.captured


def test_a_tensor_alpha_gives_the_losses_of_the_float(tokenizer):
    """The captured step passes alpha as a device scalar (filled before each replay)."""
    model = tiny_model(tokenizer).eval()
    batch = tiny_pretrain_batch(tokenizer)
    results = []
    for alpha in (0.4, torch.tensor(0.4)):  # each on a fresh copy: a step moves the queues and twins
        torch.manual_seed(3)
        results.append(compute_terms(copy.deepcopy(model), batch, alpha))
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-6, atol=1e-6, msg=name)
    torch.manual_seed(3)
    other = compute_terms(copy.deepcopy(model), batch, torch.tensor(0.0))
    assert not torch.allclose(other["loss_ita"], results[0]["loss_ita"])  # alpha really acts


# --- device-side MLM masks -----------------------------------------------------------------------


def test_device_drawn_mlm_masks_follow_the_same_rules():
    ids = torch.full((400, 30), 50, dtype=torch.long)
    ids[:, 0], ids[:, 20:] = 2, 0
    torch.manual_seed(0)
    cpu_state = torch.get_rng_state()
    masked, labels = losses.mask_tokens(ids, 100, 4, 0, 2, 0.15, draw_on_device=True)
    assert not torch.equal(torch.get_rng_state(), cpu_state)  # drew from the ids' device generator (CPU here)
    assert (labels[:, 0] == -100).all() and (labels[:, 20:] == -100).all()
    selected = labels != -100
    assert 0.12 < selected[:, 1:20].float().mean() < 0.18
    assert 0.75 < ((masked == 4) & selected).sum() / selected.sum() < 0.85


def test_mlm_mask_draws_follow_cuda_graph_unless_set():
    assert mlm_draws_on_device({}) is False  # the original's CPU stream
    assert mlm_draws_on_device({"cuda_graph": True}) is True
    assert mlm_draws_on_device({"mlm_mask_draws": "device"}) is True
    with pytest.raises(ValueError, match="mlm_mask_draws: cpu cannot be used with cuda_graph"):
        mlm_draws_on_device({"cuda_graph": True, "mlm_mask_draws": "cpu"})
    with pytest.raises(ValueError, match="mlm_mask_draws is 'gpu'"):
        mlm_draws_on_device({"mlm_mask_draws": "gpu"})


# --- configuration -------------------------------------------------------------------------------


def test_cuda_graph_is_refused_where_it_cannot_run(tokenizer):
    model = tiny_model(tokenizer)
    optimizer = create_optimizer(demo_config("Pretrain")["optimizer"], model)
    config = demo_config("Pretrain", cuda_graph=True)
    with pytest.raises(ValueError, match=r"cuda_graph: true needs a CUDA device \(this run uses cpu\)"):
        build_train_step(TASKS["pretrain"](), model, optimizer, config, torch.device("cpu"))
    with pytest.raises(ValueError, match="fixed batch shapes \\(Pretrain; not Retrieval\\)"):
        build_train_step(TASKS["retrieval"](), model, optimizer, config, torch.device("cpu"))
    eager = build_train_step(TASKS["pretrain"](), model, optimizer, demo_config("Pretrain"), torch.device("cpu"))
    assert not eager.enabled


def test_cuda_graph_pads_pretraining_texts_to_fixed_lengths(tokenizer):
    task = TASKS["pretrain"]()
    args = type("Args", (), {"seed": 0})()
    dataset = [(torch.zeros(3, 8, 8), ("a red circle", "red circle")), (torch.zeros(3, 8, 8), ("a cross", "cross"))]
    for graphed, lengths in ((False, None), (True, (25, 55))):
        config = demo_config("Pretrain", cuda_graph=graphed, batch_size=2, num_workers=0)
        loader = task.build_loaders({"train": dataset}, config, args, tokenizer)["train"]
        _, (caption, vc) = next(iter(loader))
        if lengths is None:
            assert caption.input_ids.shape[1] < 25 and vc.input_ids.shape[1] < 55  # padded to the longest
        else:
            assert (caption.input_ids.shape[1], vc.input_ids.shape[1]) == lengths


def test_the_command_line_switches_set_the_config_keys():
    parser = build_parser("test", os.path.join(REPO, "configs/demo/Pretrain.yaml"), "out", "json")
    _, config = parse_and_load(parser, ["--cuda_graph", "--compile", "blocks"])
    assert config["cuda_graph"] is True and config["compile"] == "blocks"
    _, config = parse_and_load(parser, [])
    assert not config.get("cuda_graph") and config.get("compile", "none") == "none"
    with pytest.raises(SystemExit):
        parse_and_load(parser, ["--compile", "fast"])


def test_resuming_a_cuda_graph_run_without_it_restores_a_plain_optimizer(tmp_path):
    """A cuda_graph run saves ``capturable: True`` groups; on CPU such an AdamW refuses to step."""
    from argparse import Namespace

    from engine.trainer import load_initial_weights

    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    for group in saved["param_groups"]:
        group["capturable"] = True  # as GraphedTrainStep leaves them
    path = tmp_path / "checkpoint_last.pth"
    torch.save({"model": model.state_dict(), "optimizer": saved, "lr_scheduler": scheduler.state_dict(),
                "config": {}, "epoch": 0}, path)

    resumed = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-3, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    start, _ = load_initial_weights(None, Namespace(checkpoint=str(path), resume=True), {}, resumed, optimizer,
                                    scheduler)
    assert start == 1 and not any(group["capturable"] for group in optimizer.param_groups)
    resumed(torch.randn(4, 3)).sum().backward()
    optimizer.step()  # would raise "If capturable=True, params and state_steps must be on supported devices"


def test_a_failed_capture_says_so_and_leaves_the_learning_rates_as_floats(tokenizer, monkeypatch):
    """What happens when an operation of the step cannot be captured (simulated: no GPU here)."""
    import contextlib

    @contextlib.contextmanager
    def refusing_capture(graph, **kwargs):  # fails as the first uncapturable operation would
        raise RuntimeError("operation not permitted when stream is capturing")
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", refusing_capture)
    model = tiny_model(tokenizer)
    optimizer = create_optimizer(demo_config("Pretrain")["optimizer"], model)
    runner = GraphedTrainStep(model, optimizer, compute_terms, bf16=False, enabled=False)
    with pytest.raises(RuntimeError, match="cuda_graph: capturing the training step failed .*not permitted.*"
                                           "cuda_graph: false"):
        runner._capture(tiny_pretrain_batch(tokenizer), 0.4)
    assert all(isinstance(group["lr"], float) for group in optimizer.param_groups)
    assert not runner.captured


def test_a_compiled_model_is_not_recompiled_by_the_capture(monkeypatch):
    """The warm-up passes alpha as the capture will (one device tensor): a compiled forward that saw a
    float there recompiled inside the capture on an H100, where the compiler's host syncs fail."""
    import contextlib

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, **kwargs: contextlib.nullcontext())
    torch._dynamo.reset()
    compilations = []

    def counting_backend(graph_module, example_inputs):
        compilations.append(len(example_inputs))
        return graph_module

    def weighted_terms(model, batch, alpha):
        return {"loss": model(batch[0], alpha)}

    class Weighted(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x, alpha):
            return self.linear(x).square().mean() * alpha

    counts = {}
    for warmup_kind in ("runner", "float alpha"):
        torch.manual_seed(0)
        model = Weighted()
        model.compile(backend=counting_backend)
        runner = GraphedTrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3), weighted_terms,
                                  bf16=False, enabled=False)
        batch = (torch.randn(4, 3),)
        compilations.clear()
        for alpha in (0.1, 0.2):
            if warmup_kind == "runner":
                runner._warmup(batch, alpha)
            else:  # what the warm-up did before: the caller's float
                runner._plain_step(batch, alpha)
        runner._capture(batch, 0.3)
        counts[warmup_kind] = len(compilations)
        torch._dynamo.reset()
    assert counts["runner"] == 1
    assert counts["float alpha"] >= 2  # the failure this guards against: a recompile inside the capture
