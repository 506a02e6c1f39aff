"""The benchmark scripts run on CPU with the tiny config and report what docs/benchmarks.md says.

Nothing here is timed: only the records' fields and the correctness numbers they carry are checked.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))

import bench_attention  # noqa: E402
import bench_pretrain  # noqa: E402
import bench_retrieval_eval  # noqa: E402
import check_cuda  # noqa: E402


def test_pretrain_bench_reports_losses_memory_and_a_profile(capsys, tmp_path):
    table_path = tmp_path / "kernels.json"
    record = bench_pretrain.main(["--tiny", "--device", "cpu", "--threads", "1", "--steps", "1", "--warmup", "0",
                                  "--profile", "1", "--kernel_table", str(table_path)])
    assert record["bench"] == "pretrain_step" and record["samples_per_s"] > 0
    assert set(record["losses"]) == {"loss_mlm", "loss_ita", "loss_itm", "loss_mae"}
    assert all(value > 0 for value in record["losses"].values())
    profile = record["profile"]
    assert profile["profiled_steps"] == 1 and profile["device_busy_ms_per_step"] is None  # no GPU here
    assert profile["cpu_self_ms_per_step"] > 0 and len(profile["top_ops_ms_per_step"]) > 5
    table = json.loads(table_path.read_text())  # every operator (CPU), largest first, more than the top list
    times = [row["ms_per_step"] for row in table["rows"]]
    assert table["device"] == "cpu" and len(times) > len(profile["top_ops_ms_per_step"])
    assert times == sorted(times, reverse=True)
    assert sum(times) == pytest.approx(profile["cpu_self_ms_per_step"], rel=0.01)
    assert {"aten::addmm", "aten::scaled_dot_product_attention"} & {row["name"] for row in table["rows"]}
    assert capsys.readouterr().out.strip().startswith("{")  # one JSON line on stdout


def test_pretrain_bench_attention_kernel_choice_runs_every_call_with_the_same_losses():
    """flash serves no additive mask (BERT's padded texts): those calls must fall back, not fail."""
    base = ["--tiny", "--device", "cpu", "--threads", "1", "--steps", "1", "--warmup", "0", "--batch_size", "8",
            "--queue_size", "64"]
    records = {kind: bench_pretrain.main(base + ["--sdpa_backend", kind]) for kind in ("auto", "flash", "math")}
    assert records["flash"]["sdpa_backend"] == "flash"
    for kind in ("flash", "math"):
        for name, value in records["auto"]["losses"].items():
            assert records[kind]["losses"][name] == pytest.approx(value, rel=1e-4), (kind, name)


def test_kernel_times_are_grouped_by_family():
    """Names as an H100 profile of the step printed them."""
    kernel_ms = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1": 7.5,
        "nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN": 6.5,
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": 1.0,
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::": 4.0,
        "triton_per_fused__to_copy_add_native_layer_norm_native_layer_norm_backward_view_": 3.0,
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>": 2.5,
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::": 0.5,
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>": 0.25,
        "Memset (Device)": 0.125,
    }
    groups = bench_pretrain.group_kernel_times(kernel_ms)
    assert groups == {"attention": 7.5, "matmul": 7.5, "optimizer_foreach": 4.0, "triton_fused": 3.0,
                      "elementwise": 2.5, "copy_index_cat": 0.5, "reduction": 0.25, "other": 0.12}
    assert list(groups)[:2] == ["attention", "matmul"]  # largest first


def test_attention_bench_times_every_shape_and_reports_kernels_that_cannot_serve_it():
    record = bench_attention.main(["--device", "cpu", "--batch_size", "1", "--iterations", "1", "--warmup", "0",
                                   "--kernels", "auto", "efficient", "explicit"])
    assert set(record["results"]) == {"vit_self_312", "text_self_25", "vc_self_55", "fusion_cross_25x312_itm"}
    for name, result in record["results"].items():
        assert result["auto"]["forward_backward_ms"] > 0 and result["explicit"]["forward_ms"] > 0, name
        assert "error" in result["efficient"]  # no memory-efficient kernel on a CPU: reported, not raised
    assert record["results"]["fusion_cross_25x312_itm"]["shape"]["rows"] == 3  # the ITM pass: 3 texts per image


def test_attention_bench_explicit_path_equals_the_fused_kernel():
    torch.manual_seed(0)
    shape = bench_attention.attention_shapes(batch=2)["fusion_cross_25x312_itm"]
    q, k, v, mask = bench_attention.make_inputs(shape, 2, 8, torch.float32, torch.device("cpu"))
    assert mask is not None and (mask < 0).any()
    fused = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(bench_attention.explicit_attention(q, k, v, attn_mask=mask), fused, atol=1e-5)


def test_pretrain_bench_refuses_a_queue_that_the_batch_does_not_divide():
    with pytest.raises(ValueError, match="queue_size 100 is not a multiple of the batch size 16"):
        bench_pretrain.main(["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--queue_size", "100"])


def test_retrieval_bench_batched_scores_equal_the_loop():
    record = bench_retrieval_eval.main(["--device", "cpu", "--threads", "1", "--num_images", "6",
                                        "--captions_per_image", "2", "--k_test", "4", "--group_size", "3",
                                        "--pairs_per_batch", "10", "--image_batch_size", "4"])
    assert record["pairs"] == 6 * 4 + 12 * 4
    assert record["max_abs_diff"] < 1e-5
    assert set(record["extrapolated_scoring_seconds"]) == {"coco5k", "flickr1k"}
    features = record["extrapolated_feature_seconds"]
    assert features["coco5k"] == pytest.approx(5 * features["flickr1k"], rel=0.01)
    # each encoder extrapolated by its own count; the total adds the batched scoring
    expected = 5000 / record["images_per_s"] + 25000 / record["texts_per_s"]
    assert features["coco5k"] == pytest.approx(expected, rel=0.01)
    total = record["extrapolated_total_seconds"]["coco5k"]
    assert total == pytest.approx(features["coco5k"] + record["extrapolated_scoring_seconds"]["coco5k"]["batched"],
                                  abs=0.02)


def test_cuda_check_script_passes_on_cpu(capsys):
    assert check_cuda.main(["--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)  # stdout holds the one JSON line and nothing else
    assert report["ok"] and set(report["exact_rewrites"]) == {"patch_embedding", "mlm_masked_rows", "image_rows_by_product", "ok"}
    stream = report["bf16_step"]["bf16_residual"]  # the bf16 residual streams: close to fp32, yet not bf16's
    assert stream["ok"] and stream["bf16_losses"] != report["bf16_step"]["bf16_losses"]


def test_the_dropout_check_of_compiled_steps_flags_non_finite_gradients(vocab_tokenizer):
    """check_cuda.train_with_dropout (run for autotuned compiles, whose CPU failure was NaN gradients from
    the second step): an unchanged model passes with moving losses; one whose ViT gradients turn NaN from
    the second backward on fails, naming those steps."""
    cpu = torch.device("cpu")
    plain = check_cuda.train_with_dropout(vocab_tokenizer, cpu, lambda model: None, merge_text_passes=False, steps=2)
    assert plain["ok"] and plain["non_finite_steps"] == [] and plain["losses"][0] != plain["losses"][1]

    def poison_from_second_backward(model):
        calls = []

        def hook(grad):
            calls.append(1)
            return grad * float("nan") if len(calls) > 1 else grad
        model.visual_encoder.cls_token.register_hook(hook)

    poisoned = check_cuda.train_with_dropout(vocab_tokenizer, cpu, poison_from_second_backward,
                                             merge_text_passes=False, steps=3)
    assert not poisoned["ok"] and poisoned["non_finite_steps"] == [1, 2]


def test_gpu_suite_records_one_line_per_chosen_part_even_when_it_fails(tmp_path):
    """bench/run_all_gpu.sh without a GPU: each part picked by BENCH_ONLY (opt-in groups switched on) runs
    with its flags (BENCH_MODEL_FLAGS reaching the whole-model part), fails, and still appends its line
    (part, rc, error) and its logs; parts not picked leave no line."""
    import subprocess

    parts = ["pretrain_bf16_compile_graph_b64_bf16_residual", "pretrain_bf16_compile_model_graph_b64"]
    env = dict(os.environ, OUT=str(tmp_path), BENCH_AB="1", BENCH_COMPILE_MODEL="1", BENCH_ONLY=" ".join(parts),
               BENCH_MODEL_FLAGS="--bf16_residual", BENCH_TOTAL_S="120", PYTHON=sys.executable,
               CUDA_VISIBLE_DEVICES="")
    subprocess.run(["bash", os.path.join(REPO, "bench", "run_all_gpu.sh")], env=env, check=True, timeout=300,
                   capture_output=True)
    lines = [json.loads(line) for line in (tmp_path / "bench_results.jsonl").read_text().splitlines()]
    assert [line["part"] for line in lines] == parts
    for line in lines:
        assert line["rc"] != 0 and "error" in line and line["bf16_residual"] is True
        assert (tmp_path / "bench_logs" / f"{line['part']}.err").is_file()
    assert lines[1]["compile"] == "model" and lines[0]["compile"] == "blocks"


def test_hashed_uniform_draws_are_uniform_exact_and_salted():
    first = check_cuda.hashed_uniform((100, 100), 3, "cpu")
    assert torch.equal(first, check_cuda.hashed_uniform((100, 100), 3, "cpu"))  # no generator involved
    assert 0.0 <= float(first.min()) and float(first.max()) < 1.0
    assert abs(float(first.mean()) - 0.5) < 0.01 and abs(float((first < 0.15).float().mean()) - 0.15) < 0.01
    other = check_cuda.hashed_uniform((100, 100), 4, "cpu")
    assert abs(float(torch.corrcoef(torch.stack([first.flatten(), other.flatten()]))[0, 1])) < 0.05


def test_order_independent_draws_make_the_step_deterministic(vocab_tokenizer):
    """Under order_independent_draws the step draws nothing from a generator (two seeds, same losses)
    and the masks are still real draws; afterwards torch's draws are back. (Through dynamo: the
    whole-model case of test_fast_paths' compiled-step test runs under it.)"""
    from models import losses as loss_functions

    tokenizer = vocab_tokenizer
    model = check_cuda.tiny_model("pretrain", tokenizer, torch.device("cpu"))
    twin = check_cuda.copy.deepcopy(model)  # a step writes the queue: each run starts from the same state
    image, caption, vc = check_cuda.make_batch(tokenizer, torch.device("cpu"))
    losses = []
    with check_cuda.order_independent_draws():
        _, labels = loss_functions.mask_tokens(caption.input_ids, len(tokenizer), tokenizer.mask_token_id,
                                               tokenizer.pad_token_id, tokenizer.cls_token_id, draw_on_device=True)
        assert 0 < int((labels != -100).sum()) < int(caption.attention_mask.sum())
        for seed, module in ((0, model), (1, twin)):
            torch.manual_seed(seed)
            terms = module(image, (caption, vc), alpha=0.4)
            losses.append([float(value.detach()) for value in terms.values()])
    assert torch.rand(1).item() != torch.rand(1).item()  # restored
    assert losses[0] == losses[1]


def test_kernel_tables_compare_by_family_and_match_inductor_kernels_across_compilations(tmp_path):
    import compare_kernels

    def table(path, rows):
        path.write_text(json.dumps({"device": "cuda", "steps": 2, "rows": [
            {"name": name, "ms_per_step": ms, "calls_per_step": calls} for name, ms, calls in rows]}))
        return str(path)

    gemm, add = "nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN", "vectorized_elementwise_kernel<4, add<float>"
    before = table(tmp_path / "a.json", [(gemm, 6.0, 64), ("triton_poi_fused_gelu_view_8", 2.5, 44), (add, 2.75, 448)])
    after = table(tmp_path / "b.json", [(gemm, 6.0, 64), ("triton_poi_fused_gelu_view_56", 1.0, 12),
                                        ("triton_poi_fused_gelu_view_89", 1.0, 12)])
    result = compare_kernels.main([before, after, "--top", "2"])
    assert (result["total_ms_before"], result["total_ms_after"]) == (11.25, 8.0)
    assert result["groups_ms"]["matmul"] == [6.0, 6.0] and result["groups_ms"]["elementwise"] == [2.75, 0.0]
    first, second = result["largest_changes"]
    assert first["delta_ms"] == -2.75 and first["calls_after"] == 0.0
    assert second["name"] == "triton_poi_fused_gelu_view" and second["calls_after"] == 24.0  # 2 kernels, one fusion
    with pytest.raises(SystemExit, match="not a kernel table"):
        compare_kernels.main([str(tmp_path / "missing.json"), after])
