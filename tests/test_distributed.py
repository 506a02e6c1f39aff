"""Two real processes on gloo: the gathered queue writes and the gathered (hierarchical) contrastive loss
equal a single process run on the same global batch."""

from __future__ import annotations

import json
import math
import os
import socket

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import REPO

GLOBAL_BATCH = 4
CAPTIONS = ["a small red circle on the left", "a large blue square at the top", "a green star in the middle",
            "a white cross at the bottom"]
VCS = ["red circle", "blue square", "green star", "white cross"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(tokenizer_dir: str, fix_offset: bool):
    from engine.config import load_config
    from models import MODEL_BUILDERS
    from models.tokenization import build_tokenizer

    config = load_config(os.path.join(REPO, "configs/demo/Pretrain.yaml"))
    config["bert_config"] = os.path.join(REPO, config["bert_config"])
    config["init_deit"] = False  # random weights: nothing to read
    config["queue_size"] = 16
    config["fix_hitc_rank_offset"] = fix_offset
    tokenizer = build_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = MODEL_BUILDERS["pretrain"](config, text_encoder=None, tokenizer=tokenizer).eval()
    return model, tokenizer


def _step(model, tokenizer, rows: slice) -> dict:
    """The gathered parts of a pretraining step on ``rows`` of the global batch."""
    torch.manual_seed(123)
    images = torch.randn(GLOBAL_BATCH, 3, 64, 64)[rows]
    caption = tokenizer(CAPTIONS[rows], padding="max_length", max_length=12)
    vc = tokenizer(VCS[rows], padding="max_length", max_length=6)
    with torch.no_grad():
        (image_embeds, image_hidden), _ = model.encode_image(images, vc, return_hidden_state=True)
        text = model.text_encoder.bert(caption.input_ids, caption.attention_mask, mode="text",
                                       output_hidden_states=True)
        hitc = model.hierarchical_loss(image_hidden, text.hidden_states)
        image_feat_m = F.normalize(model.vision_proj_m(model.encode_image(images, vc, momentum=True)[0][:, 0]), dim=-1)
        text_m = model.text_encoder_m.bert(caption.input_ids, caption.attention_mask, mode="text")
        text_feat_m = F.normalize(model.text_proj_m(text_m.last_hidden_state[:, 0]), dim=-1)
        image_feat = F.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1)
        text_feat = F.normalize(model.text_proj(text.last_hidden_state[:, 0]), dim=-1)
        itc, _, _ = model.momentum_contrastive_loss(image_feat, text_feat, image_feat_m, text_feat_m, alpha=0.4)
        model._dequeue_and_enqueue(image_feat_m, text_feat_m)
    return {"hitc": hitc, "itc": itc, "image_queue": model.image_queue.clone(), "text_queue": model.text_queue.clone(),
            "ptr": int(model.queue_ptr)}


def _worker(rank: int, port: int, tokenizer_dir: str, out_dir: str, fix_offset: bool) -> None:
    import utils

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        os.environ.pop(name, None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    args = utils.AttrDict(device="cpu", dist_url="env://", world_size=2)
    utils.init_distributed_mode(args)
    model, tokenizer = _build(tokenizer_dir, fix_offset)
    if rank == 1:  # ranks seed differently: the trainer's broadcast must give every rank rank 0's queues
        model.image_queue.copy_(F.normalize(torch.randn_like(model.image_queue), dim=0))
        model.text_queue.copy_(F.normalize(torch.randn_like(model.text_queue), dim=0))
    utils.broadcast_buffers(model)
    half = GLOBAL_BATCH // 2
    result = _step(model, tokenizer, slice(rank * half, (rank + 1) * half))
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _run_two_processes(demo_data: str, out_dir: str, fix_offset: bool) -> list[dict]:
    mp.spawn(_worker, args=(_free_port(), os.path.join(demo_data, "tokenizer"), out_dir, fix_offset), nprocs=2,
             join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]


def test_two_processes_equal_one_process_on_the_global_batch(demo_data, tmp_path):
    ranks = _run_two_processes(demo_data, str(tmp_path), fix_offset=True)
    model, tokenizer = _build(os.path.join(demo_data, "tokenizer"), fix_offset=True)
    single = _step(model, tokenizer, slice(0, GLOBAL_BATCH))
    # rank 0's initial queues everywhere, then all-gathered writes in rank order == the single process's order
    for result in ranks:
        torch.testing.assert_close(result["image_queue"], single["image_queue"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result["text_queue"], single["text_queue"], atol=1e-5, rtol=1e-5)
        assert result["ptr"] == single["ptr"] == GLOBAL_BATCH
    # H-ITC contrasts against all ranks' features: the mean over ranks is the global-batch loss
    torch.testing.assert_close((ranks[0]["hitc"] + ranks[1]["hitc"]) / 2, single["hitc"], atol=1e-5, rtol=1e-5)
    # ITC (as ALBEF) contrasts each rank's batch with its own momentum features + the shared queue
    model2, _ = _build(os.path.join(demo_data, "tokenizer"), fix_offset=True)
    rank1_alone = _step(model2, tokenizer, slice(2, 4))
    torch.testing.assert_close(ranks[1]["itc"], rank1_alone["itc"], atol=1e-5, rtol=1e-5)


def test_faithful_hitc_rank_offset_bug_on_rank_1(demo_data, tmp_path):
    faithful = _run_two_processes(demo_data, str(tmp_path), fix_offset=False)
    model, tokenizer = _build(os.path.join(demo_data, "tokenizer"), fix_offset=True)
    single = _step(model, tokenizer, slice(0, GLOBAL_BATCH))
    # rank 0 is unaffected by the bug; rank 1's positives point at rank 0's samples
    mean = (faithful[0]["hitc"] + faithful[1]["hitc"]) / 2
    assert not torch.allclose(mean, single["hitc"], atol=1e-4)


def test_pretrain_script_under_torchrun_on_two_processes(demo_data, tmp_path):
    """Pretrain.py launched as the README says (torchrun, 2 processes, gloo): DDP training, gathered queue
    writes, a mid-epoch checkpoint gathering both ranks' random states, rank 0 writing the log and a
    checkpoint with the bare model's keys."""
    import subprocess
    import sys

    from conftest import demo_flags

    out = tmp_path / "ddp"
    batch, queue = 32, 1024  # 256 images: 4 steps of 32 per rank
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO, "Pretrain.py"),
               *demo_flags(demo_data, "json_pretrain", str(out), os.path.join(REPO, "configs/demo/Pretrain.yaml")),
               "schedular.epochs=1", f"batch_size={batch}", f"queue_size={queue}", "save_every_steps=2",
               "--auto_resume"]  # nothing to resume yet: rank 0 tells both processes to start afresh
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed init (rank 1): env://, backend gloo" in result.stdout + result.stderr
    assert "(epoch 0, step 2, random states of 2 processes)" in result.stdout
    assert "--auto_resume: no " in result.stdout
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(records) == 1 and all(math.isfinite(float(records[0][f"train_loss_{k}"]))
                                     for k in ("mlm", "ita", "itm", "mae"))
    saved = torch.load(out / "checkpoint_last.pth", map_location="cpu", weights_only=False)
    model, _ = _build(os.path.join(demo_data, "tokenizer"), fix_offset=False)
    assert set(saved["model"]) == set(model.state_dict())  # no 'module.' prefix
    # every step enqueued both ranks' features: 4 steps x 2 ranks x 32
    assert int(saved["model"]["queue_ptr"]) == 4 * 2 * batch and saved["epoch"] == 0
