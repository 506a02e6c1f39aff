"""Config files and engine.config: YAML 1.2 loading, validation, overrides, saving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.config import (
    DEFAULTS,
    KNOWN_KEYS,
    OPTIMIZER_KEYS,
    SCHEDULER_KEYS,
    apply_overrides,
    get_option,
    load_config,
    save_config,
    validate_config,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
ORIGINAL_CONFIGS = [
    "Pretrain.yaml", "Pretrain_4m.yaml", "NLVR_pretrain.yaml", "NLVR_pretrain_4m.yaml",
    "Retrieval_coco.yaml", "Retrieval_4m_coco.yaml", "Retrieval_flickr.yaml", "Retrieval_4m_flickr.yaml",
    "VQA.yaml", "VQA_4m.yaml", "VE.yaml", "VE_4m.yaml", "NLVR.yaml", "NLVR_4m.yaml", "Grounding.yaml",
]
VC_BLOCK = {"kw_img_dataset": True, "sep_token": False, "kw_img_model": True, "num_hidden_layers_kw": 2}


def _opt(lr: float) -> dict:
    return {"opt": "adamW", "lr": lr, "weight_decay": 0.02}


def _sch(lr: float, epochs: int, min_lr: float, warmup: int) -> dict:
    return {"sched": "cosine", "lr": lr, "epochs": epochs, "min_lr": min_lr, "decay_rate": 1,
            "warmup_lr": 1e-5, "warmup_epochs": warmup, "cooldown_epochs": 0}


_PRETRAIN = {
    "train_file": ["coco_kw.json", "sbu_kw.json", "vg_kw.json"], "image_res": 256, "vision_width": 768,
    "embed_dim": 256, "batch_size": 32, "temp": 0.07, "mlm_probability": 0.15, "queue_size": 65536,
    "momentum": 0.995, "alpha": 0.4, "optimizer": _opt(1e-4), "schedular": _sch(1e-4, 11, 1e-5, 20),
    **VC_BLOCK, "randkw_p": 0.3, "return_hidden_state": True, "num_hidden_align": 5, "ita_hidden_weight": 0.1,
    "ita_hidden_weights": [1, 1, 1, 1, 1], "bert_config": "configs/config_bert_multiscale.json", "mae": True,
    "mask_ratio": 0.75, "unimodal_mae": True,
}
_NLVR_PRETRAIN = {
    "train_file": ["coco_kw.json", "sbu_kw.json", "vg_kw.json"], "bert_config": "configs/config_bert.json",
    "image_res": 256, "vision_width": 768, "embed_dim": 256, "batch_size": 32, "optimizer": _opt(2e-5),
    "schedular": _sch(2e-5, 1, 1e-5, 1), **VC_BLOCK,
}
_RETRIEVAL_COCO = {
    "train_file": "karpathy_coco/coco_train.json", "val_file": "karpathy_coco/coco_val.json",
    "test_file": "karpathy_coco/coco_test.json", "image_root": "coco/",
    "bert_config": "configs/config_bert.json", "image_res": 380, "batch_size_train": 16,
    "batch_size_test": 16, "queue_size": 65536, "momentum": 0.995,
    "vision_width": 768, "embed_dim": 256, "temp": 0.07, "k_test": 256, "alpha": 0.4, "distill": True,
    "warm_up": True, "optimizer": _opt(1e-5), "schedular": _sch(1e-5, 5, 1e-6, 1), **VC_BLOCK,
    "dual_metrics": False,
}
_RETRIEVAL_FLICKR = {
    **_RETRIEVAL_COCO, "train_file": "flickr30k_train_ttl_kw.json", "val_file": "flickr30k_val_ttl_kw.json",
    "test_file": "flickr30k_test_ttl_kw.json", "image_root": "flicker30k/", "k_test": 128,
    "schedular": _sch(1e-5, 10, 1e-6, 1),
}
_VQA = {
    "train_file": ["vqa_train.json", "vqa_val.json"], "test_file": ["vqa_test.json"],
    "answer_list": "answer_list.json", "vqa_root": "coco/", "vg_root": "visual_genome/", "image_res": 380,
    "batch_size_train": 16, "batch_size_test": 16, "k_test": 128, "alpha": 0.4, "distill": True,
    "warm_up": True, "eos": "[SEP]", "bert_config": "configs/config_bert.json", "optimizer": _opt(2e-5),
    "schedular": _sch(2e-5, 8, 1e-6, 4), "vision_width": 768, **VC_BLOCK,
}
_VE = {
    "train_file": "ve_train.json", "val_file": "ve_dev.json", "test_file": "ve_test.json",
    "image_root": "snli/data/images", "image_res": 380, "batch_size_train": 16, "batch_size_test": 64,
    "alpha": 0.4, "distill": True, "warm_up": False, "bert_config": "configs/config_bert.json",
    "optimizer": _opt(2e-5), "schedular": _sch(2e-5, 5, 1e-6, 1), "vision_width": 768, **VC_BLOCK,
}
_NLVR = {
    "train_file": "nlvr_train.json", "val_file": "nlvr_dev.json", "test_file": "nlvr_test.json",
    "image_root": "nlvr/", "image_res": 380, "batch_size": 8, "bert_config": "configs/config_bert.json",
    "alpha": 0.4, "distill": True, "warm_up": True, "eval_ema": False, "optimizer": _opt(2e-5),
    "schedular": _sch(2e-5, 10, 1e-6, 1), "vision_width": 768, **VC_BLOCK,
}
_GROUNDING = {
    "train_file": ["refcoco+_train.json"], "test_file": ["refcoco+_val.json", "refcoco+_test.json"],
    "refcoco_data": "data", "det_file": "refcoco+/dets.json", "coco_file": "refcoco+/cocos.json",
    "image_root": "coco/", "bert_config": "configs/config_bert.json", "image_res": 380, "batch_size": 16,
    "queue_size": 65536, "momentum": 0.995, "vision_width": 768, "embed_dim": 256, "temp": 0.07, "alpha": 0.4,
    "distill": True, "warm_up": True, "optimizer": _opt(1e-5), "schedular": _sch(1e-5, 5, 1e-6, 1),
    **VC_BLOCK, "dual_metrics": False,
}
# Expected content of every original config (pipeline spec §7.2).
EXPECTED = {
    "Pretrain.yaml": _PRETRAIN,
    "Pretrain_4m.yaml": {
        **_PRETRAIN, "schedular": _sch(1e-4, 30, 1e-5, 20),
        "train_file": ["coco_karp_kw.json", "sbu_kw.json", "vg_kw.json", "cc3m_kw.json", "cc3m_val_kw.json"],
    },
    "NLVR_pretrain.yaml": _NLVR_PRETRAIN,
    "NLVR_pretrain_4m.yaml": {
        **_NLVR_PRETRAIN,
        "train_file": ["coco_karp_kw.json", "sbu_kw.json", "vg_albef.json", "cc3m_filter1_kw.json",
                       "cc3m_val.json"],
    },
    "Retrieval_coco.yaml": _RETRIEVAL_COCO,
    "Retrieval_4m_coco.yaml": _RETRIEVAL_COCO,
    "Retrieval_flickr.yaml": _RETRIEVAL_FLICKR,
    "Retrieval_4m_flickr.yaml": _RETRIEVAL_FLICKR,
    "VQA.yaml": _VQA,
    "VQA_4m.yaml": {**_VQA, "train_file": ["vqa_train.json", "vqa_val.json", "vg_qa.json"], "image_res": 384,
                    "batch_size_train": 8},
    "VE.yaml": _VE,
    "VE_4m.yaml": {**_VE, "batch_size_test": 32},
    "NLVR.yaml": _NLVR,
    "NLVR_4m.yaml": {**_NLVR, "image_res": 384},
    "Grounding.yaml": _GROUNDING,
}


@pytest.mark.parametrize("name", ORIGINAL_CONFIGS)
def test_original_config_has_the_original_keys_and_values(name: str) -> None:
    config = load_config(CONFIG_DIR / name)  # validates too
    assert config == EXPECTED[name]
    assert isinstance(config["optimizer"]["lr"], float)
    assert isinstance(config["schedular"]["min_lr"], float)
    assert isinstance(config["schedular"]["warmup_lr"], float)


def test_every_yaml_in_configs_is_listed() -> None:
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(ORIGINAL_CONFIGS)


def test_bert_json_configs() -> None:
    base = json.loads((CONFIG_DIR / "config_bert.json").read_text())
    assert base["hidden_size"] == 768 and base["fusion_layer"] == 6 and base["encoder_width"] == 768
    assert base["vocab_size"] == 30522 and base["layer_norm_eps"] == 1e-12 and base["num_hidden_layers"] == 12
    extras = {
        "config_bert_multiscale.json": {"output_hidden_states": True},
        "config_bert_attn_out.json": {"output_attentions": True},
        "config_bert_multiscale_attn_out.json": {"output_hidden_states": True, "output_attentions": True},
    }
    for name, extra in extras.items():
        assert json.loads((CONFIG_DIR / name).read_text()) == {**base, **extra}, name


def test_yaml_1_2_numbers_are_floats(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("temp: 0.07\noptimizer: {opt: adamW, lr: 1e-4, weight_decay: 0.02}\n")
    config = load_config(path)
    assert config["optimizer"]["lr"] == pytest.approx(1e-4)
    assert type(config["optimizer"]["lr"]) is float


def test_missing_and_invalid_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer: {opt: adamW, lr: [1e-4\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_config(bad)
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="list.yaml"):
        load_config(not_a_mapping)


def test_unknown_top_level_key_names_key_file_and_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("image_res: 256\nqueue_sise: 10\n")
    with pytest.raises(ValueError) as info:
        load_config(path)
    message = str(info.value)
    assert "queue_sise" in message and "typo.yaml" in message and "queue_size" in message


def test_unknown_nested_key_is_named_with_its_block() -> None:
    config = {"optimizer": {"opt": "adamW", "lr": 1e-4, "weight_decai": 0.02}}
    with pytest.raises(ValueError, match=r"optimizer\.weight_decai.*optimizer\.weight_decay"):
        validate_config(config, source="x.yaml")
    with pytest.raises(ValueError, match=r"schedular\.warmup_epoch"):
        validate_config({"schedular": {"sched": "cosine", "epochs": 1, "warmup_epoch": 1}})


def test_numbers_given_as_strings_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"optimizer\.lr.*PyYAML"):
        validate_config({"optimizer": {"opt": "adamW", "lr": "1e-4"}}, source="c.yaml")
    with pytest.raises(ValueError, match="temp"):
        validate_config({"temp": "0.07"})
    with pytest.raises(ValueError, match="distill"):
        validate_config({"distill": "yes"})  # a string under YAML 1.2
    with pytest.raises(ValueError, match="image_res"):
        validate_config({"image_res": 256.5})


def test_overrides_parse_yaml_1_2_scalars() -> None:
    config = load_config(CONFIG_DIR / "VE.yaml")
    new = apply_overrides(config, ["optimizer.lr=3e-5", "batch_size_train=4", "distill=false", "bf16=true",
                                   "train_file=[a.json, b.json]", "max_grad_norm=1.0", "randkw_p="])
    assert new["optimizer"]["lr"] == pytest.approx(3e-5) and type(new["optimizer"]["lr"]) is float
    assert new["batch_size_train"] == 4 and new["distill"] is False and new["bf16"] is True
    assert new["train_file"] == ["a.json", "b.json"] and new["max_grad_norm"] == 1.0
    assert new["randkw_p"] is None
    assert config["optimizer"]["lr"] == pytest.approx(2e-5) and config["batch_size_train"] == 16  # unchanged
    validate_config(new)


def test_overrides_reject_unknown_keys_and_bad_values() -> None:
    config = load_config(CONFIG_DIR / "VE.yaml")
    with pytest.raises(ValueError, match=r"batch_sise_train.*batch_size_train"):
        apply_overrides(config, ["batch_sise_train=4"])
    with pytest.raises(ValueError, match=r"optimizer\.lrr"):
        apply_overrides(config, ["optimizer.lrr=1e-4"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(config, ["optimizer.lr"])
    with pytest.raises(ValueError, match="image_res"):
        apply_overrides(config, ["image_res=big"])
    with pytest.raises(ValueError, match="nested"):
        apply_overrides(config, ["image_res.x=1"])


def test_switches_of_code_the_vc_models_lack_are_refused_unless_at_the_original_value() -> None:
    config = load_config(CONFIG_DIR / "Retrieval_coco.yaml")
    validate_config({**config, "clip_vit": False, "kw_model": None})  # the original's values pass
    with pytest.raises(ValueError, match=r"'clip_vit' in Retrieval_coco.yaml = True is not supported.*CLIP"):
        validate_config({**config, "clip_vit": True}, source="Retrieval_coco.yaml")
    with pytest.raises(ValueError, match=r"'kw_model'.*initialize"):
        apply_overrides(config, ["kw_model=true"])


def test_save_config_round_trips(tmp_path: Path) -> None:
    config = load_config(CONFIG_DIR / "Pretrain.yaml")
    config["optimizer"]["opt_betas"] = (0.9, 0.98)  # tuples are written as lists
    path = tmp_path / "config.yaml"
    path.write_text("old")
    save_config(config, path)
    again = load_config(path)
    assert again == {**config, "optimizer": {**config["optimizer"], "opt_betas": [0.9, 0.98]}}
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_declared_keys_and_defaults() -> None:
    added = {"patch_size": 16, "vision_depth": 12, "vision_heads": 12, "mae_decoder_depth": 2,
             "mae_decoder_heads": 16, "init_deit": True, "init_bert": True, "bf16": False,
             "grad_checkpointing": False, "fused_attention": True, "num_workers": 4, "print_freq": 50,
             "eval_batch_size_text": 64, "max_grad_norm": None, "fix_hitc_rank_offset": False,
             "fix_vqa_distill_alpha": False, "fix_vqa_rank_double_count": False, "fix_nlvr_teacher": False,
             "mae_cls_pos_embed": False, "mask_vc_padding": False, "cuda_graph": False, "mlm_mask_draws": None}
    for name, default in added.items():
        assert name in KNOWN_KEYS and DEFAULTS[name] == default, name
    optional = ["save_step", "avoid_optim", "model_mae", "clip_vit", "kw_model", "uni_cross_modal_mae",
                "register_blk_id", "mae_lambda", "return_attention", "eval_ema", "dual_metrics", "num_kws",
                "multinodes", "refcoco_data", "det_file", "coco_file", "deit_checkpoint"]
    assert set(optional) <= set(KNOWN_KEYS)
    assert set(OPTIMIZER_KEYS) == {"opt", "lr", "weight_decay", "opt_eps", "opt_betas", "opt_args",
                                   "momentum", "fused"}
    assert set(SCHEDULER_KEYS) == {"sched", "lr", "epochs", "min_lr", "decay_rate", "warmup_lr",
                                   "warmup_epochs", "cooldown_epochs"}
    assert all(isinstance(doc, str) and doc for doc in KNOWN_KEYS.values())


def test_get_option() -> None:
    assert get_option({}, "sep_token") is True
    assert get_option({"sep_token": False}, "sep_token") is False
    assert get_option({"register_blk_id": None}, "register_blk_id") == -1
    with pytest.raises(KeyError, match="image_res"):
        get_option({}, "image_res")
    with pytest.raises(KeyError, match="image_ress"):
        get_option({}, "image_ress")


def test_boolean_flags_accept_the_original_spelling_and_mean_what_they_say(capsys) -> None:
    from engine.cli import build_parser

    parser = build_parser("test", config="c.yaml", output_dir="out", data_json_dir="json")
    parsed = {tuple(argv): parser.parse_args(argv) for argv in
              (["--resume"], ["--resume", "True"], ["--resume", "False"], ["--no-resume"], [],
               ["--resume", "--evaluate"], ["--bf16", "false"])}
    assert [args.resume for args in parsed.values()] == [True, True, False, False, False, True, False]
    assert parsed[("--resume", "--evaluate")].evaluate and parsed[("--bf16", "false")].bf16 is False
    assert parsed[()].bf16 is None  # unset: the config decides
    with pytest.raises(SystemExit):
        parser.parse_args(["--resume", "maybe"])
    assert "--resume takes true or false, not 'maybe'" in capsys.readouterr().err


def test_the_launchers_local_rank_flag_is_accepted() -> None:
    """python -m torch.distributed.launch without --use_env appends --local-rank=N (older PyTorch:
    --local_rank=N); the rank comes from LOCAL_RANK, so the flag must only not be an error."""
    from engine.cli import build_parser

    parser = build_parser("test", config="c.yaml", output_dir="out", data_json_dir="json")
    for flag in ("--local-rank=1", "--local_rank=1"):
        assert parser.parse_args(["--config", "x.yaml", flag]).config == "x.yaml"
    assert "--local" not in parser.format_help()  # hidden


def test_every_declared_key_is_listed_with_its_default_and_meaning():
    from engine.config import KNOWN_KEYS, OPTIMIZER_KEYS, SCHEDULER_KEYS, describe_keys

    lines = describe_keys().splitlines()
    names = [line.split("  (")[0] for line in lines]
    expected = ([name for name in KNOWN_KEYS if name not in ("optimizer", "schedular")]
                + [f"optimizer.{name}" for name in OPTIMIZER_KEYS] + [f"schedular.{name}" for name in SCHEDULER_KEYS])
    assert names == expected
    assert "queue_size  (int, default required): " in describe_keys("queue_size")
    assert describe_keys("PICK_IMAGE_ROWS").startswith("pick_image_rows_by_product  (bool, default True): ")
    assert describe_keys("no key mentions this") == ""
