"""The speed paths compute what the plain ones compute (issue 6).

Fused (SDPA) vs explicit attention on the whole tiny pretraining model, a bf16-autocast training
step vs the fp32 step, the foreach momentum update vs the original per-parameter formula, the
in-place queue write vs the original slice assignment, and fused vs foreach vs for-loop AdamW.
The retrieval batched-vs-per-query check lives in test_retrieval.py.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import REPO, compile_with_dynamo_only, demo_config, tiny_pretrain_batch, tiny_pretrain_model
from engine.cuda_graph import autocast_context
from models import losses
from models.backbone import QueueMixin
from models import xbert
from models.xbert import ImageKeysValues, StackedKeysValues, block_rows, pick_rows
from optim import create_optimizer

sys.path.insert(0, os.path.join(REPO, "bench"))  # check_cuda: order-independent random draws


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these tiny models gain nothing from more, and on a shared CPU
    spinning thread pools make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(vocab_tokenizer):
    return vocab_tokenizer


def count_sdpa_calls(monkeypatch) -> list[int]:
    """Count calls of F.scaled_dot_product_attention (used by our BERT and by timm's blocks)."""
    calls = [0]
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


def terms_and_gradients(model: nn.Module, batch, alpha=0.4, seed: int = 7) -> tuple[dict, dict]:
    """One forward + backward from ``seed`` (same dropout draws, MLM masks and negatives for twins):
    the loss terms and every parameter's gradient."""
    image, caption, vc = batch
    torch.manual_seed(seed)
    terms = model(image, (caption, vc), alpha=alpha)
    sum(terms.values()).backward()
    return terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_terms_and_gradients(expected: tuple[dict, dict], actual: tuple[dict, dict], term_tol: float = 1e-5,
                                    grad_atol: float = 5e-5, grad_rtol: float = 1e-3) -> None:
    (terms_e, grads_e), (terms_a, grads_a) = expected, actual
    for name in terms_e:
        torch.testing.assert_close(terms_a[name], terms_e[name], atol=term_tol, rtol=term_tol, msg=name)
    assert grads_a.keys() == grads_e.keys() and len(grads_e) > 100
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_a[name], grad, atol=grad_atol, rtol=grad_rtol, msg=name)


# --- fused vs explicit attention -----------------------------------------------------------------


@pytest.mark.parametrize("mask_vc_padding", [False, True], ids=["faithful", "masked_vc_padding"])
def test_fused_and_explicit_attention_give_the_same_losses_and_gradients(tokenizer, monkeypatch, mask_vc_padding):
    fused = tiny_pretrain_model(tokenizer, mask_vc_padding=mask_vc_padding)
    fused.eval()  # no dropout: the two paths draw the same masks and negatives from the same seed
    explicit = copy.deepcopy(fused)
    explicit.set_fused_attention(False)
    for block in explicit.decoder_blocks:  # the MAE decoder is not reached by set_fused_attention
        block.attn.fused_attn = False
    batch = tiny_pretrain_batch(tokenizer)
    calls = count_sdpa_calls(monkeypatch)
    results, call_counts = [], []
    for model in (fused, explicit):
        calls[0] = 0
        results.append(terms_and_gradients(model, batch))
        call_counts.append(calls[0])
    assert call_counts[0] > 0 and call_counts[1] == 0  # each model really ran its own path
    assert_same_terms_and_gradients(results[0], results[1])


def test_fused_and_explicit_attention_agree_on_each_encoder(tokenizer):
    model = tiny_pretrain_model(tokenizer, mask_vc_padding=True).eval()
    image, caption, vc = tiny_pretrain_batch(tokenizer)
    outputs = []
    with torch.no_grad():
        for fused in (True, False):
            model.set_fused_attention(fused)
            image_embeds, image_mask = model.encode_image(image, vc)
            text = model.text_encoder.bert(caption.input_ids, caption.attention_mask, mode="text").last_hidden_state
            fused_cls = model.fusion(text, caption.attention_mask, image_embeds, image_mask)
            outputs.append((image_embeds, text, fused_cls))
    for name, a, b in zip(("vit", "text", "fusion"), outputs[0], outputs[1]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=name)
    assert all(not block.attn.fused_attn for block in model.visual_encoder.blocks)


# --- cross-attention keys/values projected once vs per fusion pass -----------------------------


@pytest.mark.parametrize("mask_vc_padding", [False, True], ids=["faithful", "masked_vc_padding"])
def test_shared_image_keys_values_give_the_same_losses_and_gradients(tokenizer, mask_vc_padding):
    shared = tiny_pretrain_model(tokenizer, mask_vc_padding=mask_vc_padding)  # train mode: dropout on
    per_pass = copy.deepcopy(shared)
    per_pass.share_image_keys_values = False
    batch = tiny_pretrain_batch(tokenizer)
    results, projections = [], []
    for model in (shared, per_pass):
        count = [0]
        bert = model.text_encoder.bert
        key_layer = bert.encoder.layer[-1].crossattention.self.key  # per pass: each layer's own projection
        handle = key_layer.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        project_all = bert.image_keys_values  # shared: every layer's keys/values in one product

        def counting(*args, project_all=project_all):
            count[0] += 1
            return project_all(*args)

        bert.image_keys_values = counting
        results.append(terms_and_gradients(model, batch))  # projecting draws no random numbers
        handle.remove()
        del bert.image_keys_values
        projections.append(count[0])
    assert projections == [1, 2]  # one projection for ITM + MLM, against one per pass
    assert_same_terms_and_gradients(results[0], results[1])


def test_pick_rows_is_indexing_with_a_summing_backward():
    """The one-hot product gives source[rows] bit for bit (bf16 too); its backward sums the gradients
    of repeated rows (as indexing's scatter-add, summed in fp32)."""
    torch.manual_seed(0)
    rows = torch.tensor([2, 0, 2, 4, 4, 4])  # repeats, and rows 1 and 3 never picked
    for dtype in (torch.float32, torch.bfloat16):
        source = torch.randn(5, 3, 4, dtype=dtype, requires_grad=True)
        picked = pick_rows(source, rows)
        assert picked.shape == (6, 3, 4) and torch.equal(picked, source[rows])
        upstream = torch.randn_like(picked)
        (gradient,) = torch.autograd.grad(picked, source, upstream)
        expected = torch.zeros(5, 3, 4).index_add_(0, rows, upstream.float())
        tolerance = 0.0 if dtype == torch.float32 else 8e-3  # bf16: the sum rounded once
        torch.testing.assert_close(gradient.float(), expected, atol=tolerance, rtol=tolerance)
        assert not gradient[[1, 3]].any()


def test_rows_are_picked_by_product_only_where_the_product_is_exact_and_a_gradient_flows():
    layers, heads = (6, 7), 2
    projection = torch.randn(3, 5, 2 * len(layers) * 8, requires_grad=True)
    precision = torch.get_float32_matmul_precision()
    try:
        assert ImageKeysValues.from_projection(projection, layers, heads)._picks_by_product()
        assert not ImageKeysValues.from_projection(projection, layers, heads, pick_rows_by_product=False
                                                   )._picks_by_product()
        assert not ImageKeysValues.from_projection(projection.detach(), layers, heads)._picks_by_product()
        with torch.no_grad():
            assert not ImageKeysValues.from_projection(projection, layers, heads)._picks_by_product()
        torch.set_float32_matmul_precision("high")  # fp32 products may run in TF32: indexing
        assert not ImageKeysValues.from_projection(projection, layers, heads)._picks_by_product()
        assert ImageKeysValues.from_projection(projection.bfloat16(), layers, heads)._picks_by_product()
    finally:
        torch.set_float32_matmul_precision(precision)
    picked = ImageKeysValues.from_projection(projection, layers, heads).select(torch.tensor([2, 2, 0]))
    full = ImageKeysValues.from_projection(projection, layers, heads)
    for layer in layers:  # every layer's keys and values, in head layout, of the picked images
        assert picked.keys[layer].shape == (3, heads, 5, 4)
        assert torch.equal(picked.keys[layer], full.keys[layer][[2, 2, 0]])
        assert torch.equal(picked.values[layer], full.values[layer][[2, 2, 0]])


@pytest.mark.parametrize("merge_text_passes", [False, True], ids=["separate_passes", "merged_passes"])
def test_image_rows_picked_by_product_give_the_same_losses_and_gradients(tokenizer, monkeypatch, merge_text_passes):
    """pick_image_rows_by_product: the ITM hard negatives' rows of the shared keys/values are picked by
    a one-hot product in training (once per step for every fusion layer), by indexing when off. Neither
    draws random numbers, so both models see the same dropout, masks and negatives."""
    product = tiny_pretrain_model(tokenizer, merge_text_passes=merge_text_passes)  # train mode: dropout on
    indexing = copy.deepcopy(product)
    indexing.pick_image_rows_by_product = False
    calls = [0]

    def counting(source, rows):
        calls[0] += 1
        return pick_rows(source, rows)

    monkeypatch.setattr(xbert, "pick_rows", counting)
    results, products = [], []
    for model in (product, indexing):
        calls[0] = 0
        results.append(terms_and_gradients(model, tiny_pretrain_batch(tokenizer)))
        products.append(calls[0])
    assert products == [1, 0]
    assert_same_terms_and_gradients(results[1], results[0])
    with torch.no_grad():  # no backward: indexing, also with the switch on (evaluation, momentum passes)
        image_embeds, _ = product.encode_image(*tiny_pretrain_batch(tokenizer)[::2])
        product.text_encoder.bert.image_keys_values(image_embeds).select(torch.tensor([1, 0]))
    assert calls[0] == 0


@pytest.mark.parametrize("share_image_keys_values, mask_vc_padding", [(True, False), (True, True), (False, False)],
                         ids=["stacked_keys_values", "stacked_masked_vc_padding", "per_pass"])
def test_merged_text_passes_give_the_same_losses_and_gradients(tokenizer, share_image_keys_values, mask_vc_padding):
    """merge_text_passes: one text pass of 2B captions and one fusion pass of 4B texts instead of two
    each; per text the same math. The random draws come in another order (MLM masks first), so both
    models draw order-independent stand-ins (bench/check_cuda.py); dropout is off."""
    from check_cuda import order_independent_draws

    separate = tiny_pretrain_model(tokenizer, mask_vc_padding=mask_vc_padding).eval()
    separate.share_image_keys_values = share_image_keys_values
    merged = copy.deepcopy(separate)
    merged.merge_text_passes = True
    batch = tiny_pretrain_batch(tokenizer)
    results, passes = [], []
    for model in (separate, merged):
        layers = model.text_encoder.bert.encoder.layer
        count = {"text": 0, "fusion": 0}
        hooks = [layers[0].register_forward_hook(lambda *_: count.__setitem__("text", count["text"] + 1)),
                 layers[-1].register_forward_hook(lambda *_: count.__setitem__("fusion", count["fusion"] + 1))]
        with order_independent_draws():
            results.append(terms_and_gradients(model, batch))
        for hook in hooks:
            hook.remove()
        passes.append(count)
    assert passes == [{"text": 2, "fusion": 2}, {"text": 1, "fusion": 1}]
    assert_same_terms_and_gradients(results[0], results[1])


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "image_mask"])
def test_stacked_keys_values_attend_as_block_by_block_attention(masked):
    """Texts in blocks of B: the in-order blocks share one call (queries stacked), the others gather."""
    torch.manual_seed(0)
    batch, heads, length, tokens, dim = 3, 2, 5, 7, 4
    keys, values = torch.randn(batch, heads, tokens, dim), torch.randn(batch, heads, tokens, dim)
    blocks = (None, torch.tensor([2, 0, 0]), None, None)
    queries = torch.randn(len(blocks) * batch, heads, length, dim)
    stacked = StackedKeysValues(keys, values, blocks)
    rows = block_rows(blocks, batch, "cpu")
    assert rows.tolist() == [0, 1, 2, 2, 0, 0, 0, 1, 2, 0, 1, 2]
    mask = None
    if masked:  # image i ignores its last i tokens, gathered per text like the image masks
        keep = torch.arange(tokens)[None, :] < tokens - torch.arange(batch)[:, None]
        mask = ((~keep).float() * -1e9)[rows][:, None, None, :]
    expected = F.scaled_dot_product_attention(queries, keys[rows], values[rows], attn_mask=mask)
    torch.testing.assert_close(stacked.attend(queries, mask, 0.0), expected, atol=1e-6, rtol=1e-5)
    gathered_keys, gathered_values = stacked.gathered()  # what the explicit (Grad-CAM) path reads
    assert torch.equal(gathered_keys, keys[rows]) and torch.equal(gathered_values, values[rows])
    with pytest.raises(ValueError, match="unselected"):
        ImageKeysValues({6: keys}, {6: values}).select(rows).select_blocks(blocks)


def test_image_keys_values_pick_the_rows_a_pass_attends_to(tokenizer):
    model = tiny_pretrain_model(tokenizer).eval()
    image, caption, vc = tiny_pretrain_batch(tokenizer)
    rows = torch.tensor([2, 0, 0, 3, 1])
    bert = model.text_encoder.bert
    with torch.no_grad():
        image_embeds, _ = model.encode_image(image, vc)
        text = bert(caption.input_ids, caption.attention_mask, mode="text").last_hidden_state[rows % 4]
        text_mask = caption.attention_mask[rows % 4]
        direct = model.fusion(text, text_mask, image_embeds[rows], None)
        projected = model.fusion(text, text_mask, bert.image_keys_values(image_embeds).select(rows), None)
        twice = bert.image_keys_values(image_embeds).select(torch.tensor([3, 2, 1, 0])).select(torch.tensor([1, 3]))
        first_layer = min(twice.keys)
        keys, values = twice.layer(first_layer)
    torch.testing.assert_close(projected, direct, atol=1e-5, rtol=1e-5)
    all_keys, all_values = bert.image_keys_values(image_embeds).layer(first_layer)
    torch.testing.assert_close(keys, all_keys[[2, 0]])
    torch.testing.assert_close(values, all_values[[2, 0]])
    with pytest.raises(KeyError, match="layer 0"):
        twice.layer(0)


# --- MLM prediction heads on the masked rows only ------------------------------------------------


@pytest.mark.parametrize("merge_text_passes, capacity", [(False, "exact"), (False, "static"), (True, "static")],
                         ids=["separate_exact_rows", "separate_static_rows", "merged_static_rows"])
def test_mlm_heads_on_masked_rows_give_the_same_losses_and_gradients(tokenizer, monkeypatch, merge_text_passes,
                                                                    capacity):
    """mlm_logits_on_masked: the vocabulary heads run on the masked rows (exactly those, or a static
    number with the masked rows first) instead of all B x L; the loss reads only those rows."""
    all_rows = tiny_pretrain_model(tokenizer, merge_text_passes=merge_text_passes,
                                   mlm_logits_on_masked=False)  # train mode: dropout on
    masked_rows = copy.deepcopy(all_rows)
    masked_rows.mlm_logits_on_masked = True
    if capacity == "static":  # what an accelerator or a compiled step uses
        monkeypatch.setattr(masked_rows, "mlm_rows_capacity",
                            lambda labels: losses.mlm_row_capacity(labels.numel(), masked_rows.mlm_probability))
    head_input_shapes, results = [], []
    for model in (all_rows, masked_rows):
        shapes = []  # the online head's input; the momentum head (text_encoder_m.cls) is not hooked
        hook = model.text_encoder.cls.register_forward_hook(lambda _m, args, _o: shapes.append(tuple(args[0].shape)))
        results.append(terms_and_gradients(model, tiny_pretrain_batch(tokenizer)))
        hook.remove()
        head_input_shapes.append(shapes)
    assert_same_terms_and_gradients(results[0], results[1])
    [(batch, length, width)], [(rows, row_width)] = head_input_shapes
    assert batch == 4 and row_width == width
    if capacity == "static":
        assert rows == losses.mlm_row_capacity(batch * length, 0.15)
    else:
        assert rows < batch * length / 2


def test_masked_rows_put_every_masked_position_first_within_the_capacity():
    labels = torch.full((3, 6), losses.IGNORE_INDEX)
    labels[0, 2], labels[1, 0], labels[2, 5] = 11, 12, 13
    assert losses.masked_rows(labels).tolist() == [2, 6, 17]
    static = losses.masked_rows(labels, capacity=5)
    assert static[:3].tolist() == [2, 6, 17] and len(static) == 5 and len(set(static.tolist())) == 5
    assert (labels.reshape(-1)[static[3:]] == losses.IGNORE_INDEX).all()
    assert losses.masked_rows(labels, capacity=2).tolist() == [2, 6]  # overflow: the surplus is left out


@pytest.mark.parametrize("rows, probability, expected", [(1600, 0.15, 407), (100, 0.15, 57), (40, 0.5, 40)])
def test_mlm_row_capacity_is_the_hoeffding_bound(rows, probability, expected):
    capacity = losses.mlm_row_capacity(rows, probability)
    assert capacity == expected
    if capacity < rows:  # P(Binomial(rows, p) >= capacity) is below 1e-15, exactly computed here
        log_terms = (math.lgamma(rows + 1) - math.lgamma(k + 1) - math.lgamma(rows - k + 1)
                     + k * math.log(probability) + (rows - k) * math.log1p(-probability)
                     for k in range(capacity, rows + 1))
        tail = sum(math.exp(term) for term in log_terms)
        assert tail < 1e-15


# --- bf16 autocast step vs fp32 step -------------------------------------------------------------


def _train_steps(model: nn.Module, batch, bf16: bool, steps: int = 2) -> tuple[list[dict], list[torch.Tensor]]:
    """``steps`` trainer-ordered steps; returns each step's losses and the first step's gradients."""
    config = demo_config("Pretrain")
    optimizer = create_optimizer(config["optimizer"], model)
    image, caption, vc = batch
    history, first_grads = [], []
    for step in range(steps):
        torch.manual_seed(100 + step)
        with autocast_context(torch.device("cpu"), bf16):
            terms = model(image, (caption, vc), alpha=0.4)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            first_grads = [p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None]
        optimizer.step()
        history.append({name: float(value.detach()) for name, value in terms.items()})
    return history, first_grads


@pytest.mark.parametrize("bf16_residual", [False, True], ids=["fp32_stream", "bf16_stream"])
def test_bf16_training_step_is_close_to_the_fp32_step(tokenizer, bf16_residual):
    """bf16 autocast, with autocast's fp32 residual streams or (config bf16_residual) bf16 ones."""
    from engine.trainer import configure_runtime

    reference = tiny_pretrain_model(tokenizer, dropout=False)
    low = copy.deepcopy(reference)
    configure_runtime(low, {"bf16_residual": bf16_residual})
    batch = tiny_pretrain_batch(tokenizer)
    fp32_losses, fp32_grads = _train_steps(reference, batch, bf16=False)
    bf16_losses, bf16_grads = _train_steps(low, batch, bf16=True)
    for step, (a, b) in enumerate(zip(fp32_losses, bf16_losses)):
        assert a.keys() == b.keys() == {"loss_mlm", "loss_ita", "loss_itm", "loss_mae"}
        for name in a:
            assert abs(a[name] - b[name]) <= 0.01 * abs(a[name]) + 0.005, (step, name, a[name], b[name])
    cosine = F.cosine_similarity(torch.cat(fp32_grads), torch.cat(bf16_grads), dim=0)
    assert cosine > 0.99, float(cosine)
    moved = [(p - q).abs().max() for p, q in zip(reference.parameters(), low.parameters())]
    assert max(moved) > 0  # the two runs really differ (bf16 was applied), yet stay close above


def test_bf16_residual_keeps_every_encoder_stream_in_bf16_under_autocast_only(tokenizer):
    """With config bf16_residual the ViT blocks (image and MAE encoder passes), the MAE decoder blocks and
    every BERT layer (text, VC, fusion; online and momentum) take and give bf16 under bf16 autocast; the
    off switch keeps autocast's fp32 streams, and without autocast the switch changes nothing (bit-equal
    losses)."""
    from timm.models.vision_transformer import Block

    from engine.trainer import configure_runtime
    from models.precision import set_low_precision_residual
    from models.xbert import BertLayer

    batch = tiny_pretrain_batch(tokenizer)
    model = tiny_pretrain_model(tokenizer, dropout=False)
    seen = []
    for name, module in model.named_modules():
        if isinstance(module, (Block, BertLayer)):
            module.register_forward_hook(
                lambda module, inputs, output, name=name: seen.append((name, inputs[0].dtype, output.dtype)))

    def stream_dtypes(bf16_residual: bool) -> set:
        configure_runtime(model, {"bf16_residual": bf16_residual})
        seen.clear()
        torch.manual_seed(0)
        with autocast_context(torch.device("cpu"), True):
            model(batch[0], (batch[1], batch[2]), alpha=0.4)
        return {dtype for _, *dtypes in seen for dtype in dtypes}

    assert stream_dtypes(True) == {torch.bfloat16}
    layers = {name.split(".")[0] for name, *_ in seen}
    assert {"visual_encoder", "visual_encoder_m", "decoder_blocks", "text_encoder", "text_encoder_m",
            "kw_encoder", "kw_encoder_m"} <= layers
    assert torch.float32 in stream_dtypes(False)

    start = copy.deepcopy(model)  # a step moves the momentum weights and the queues: each run starts here

    def fp32_losses(enabled: bool) -> list:
        twin = copy.deepcopy(start)
        assert set_low_precision_residual(twin, enabled) > 10  # ViTs, MAE decoder, BERT outputs/embeddings
        torch.manual_seed(0)
        return [float(v.detach()) for v in twin(batch[0], (batch[1], batch[2]), alpha=0.4).values()]

    assert fp32_losses(True) == fp32_losses(False)


# --- momentum update -----------------------------------------------------------------------------


def test_foreach_momentum_update_equals_the_per_parameter_formula(tokenizer):
    model = tiny_pretrain_model(tokenizer)
    model.momentum = 0.9
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    twins = {name_m for _, name_m in model.model_pairs}
    assert twins == {name for name, _ in model.named_children() if name.endswith("_m")}
    expected = copy.deepcopy(model)
    with torch.no_grad():  # the original's loop: param_m = param_m * m + param * (1 - m)
        for name, name_m in expected.model_pairs:
            for param, param_m in zip(getattr(expected, name).parameters(), getattr(expected, name_m).parameters()):
                param_m.data = param_m.data * expected.momentum + param.data * (1.0 - expected.momentum)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model._momentum_update()
    after, reference = model.state_dict(), expected.state_dict()
    changed = set()
    for key, value in after.items():
        torch.testing.assert_close(value, reference[key], atol=1e-6, rtol=1e-6, msg=key)
        if not torch.equal(value, before[key]):
            changed.add(key)
    twin_parameters = {f"{name_m}.{name}" for name_m in twins
                       for name, _ in getattr(model, name_m).named_parameters(remove_duplicate=False)}
    assert changed == twin_parameters  # every twin parameter moved, nothing else did


# --- queue write ---------------------------------------------------------------------------------


class _Queues(nn.Module, QueueMixin):
    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        self.create_queues(dim, size, with_idx=True)


@pytest.mark.parametrize("batch,dtype", [(4, torch.float32), (8, torch.bfloat16)])
def test_in_place_queue_write_equals_slice_assignment(batch, dtype):
    torch.manual_seed(0)
    queues = _Queues(dim=6, size=24)
    image_ref, text_ref, idx_ref = queues.image_queue.clone(), queues.text_queue.clone(), queues.idx_queue.clone()
    ptr = 0
    for _ in range(24 // batch + 2):  # wraps around the end once
        image = F.normalize(torch.randn(batch, 6), dim=1).to(dtype)
        text = F.normalize(torch.randn(batch, 6), dim=1).to(dtype)
        idx = torch.randint(0, 1000, (batch,))
        queues._dequeue_and_enqueue(image, text, idx)
        # the original: queue[:, ptr:ptr + B] = feats.T; ptr = (ptr + B) % Q  (Q a multiple of B)
        image_ref[:, ptr:ptr + batch] = image.t().float()
        text_ref[:, ptr:ptr + batch] = text.t().float()
        idx_ref[:, ptr:ptr + batch] = idx.view(1, -1)
        ptr = (ptr + batch) % 24
        assert int(queues.queue_ptr) == ptr
    assert queues.image_queue.dtype == torch.float32
    assert torch.equal(queues.image_queue, image_ref)
    assert torch.equal(queues.text_queue, text_ref)
    assert torch.equal(queues.idx_queue, idx_ref)


def test_queue_refuses_a_batch_that_does_not_divide_it():
    queues = _Queues(dim=6, size=24)
    with pytest.raises(ValueError, match="multiple"):
        queues._dequeue_and_enqueue(torch.randn(5, 6), torch.randn(5, 6), torch.arange(5))


# --- optimizer kernels ---------------------------------------------------------------------------


def test_fused_foreach_and_loop_adamw_give_the_same_weights(tokenizer):
    base = tiny_pretrain_model(tokenizer)
    finals = []
    for fused in (True, None, False):  # fused kernel, automatic (foreach on CPU), plain loop
        model = copy.deepcopy(base)
        optimizer = create_optimizer({"opt": "adamW", "lr": 1e-3, "weight_decay": 0.02, "fused": fused}, model)
        assert bool(optimizer.defaults.get("fused")) == bool(fused)
        generator = torch.Generator().manual_seed(3)
        for _ in range(3):
            for param in model.parameters():
                if param.requires_grad:
                    param.grad = torch.randn(param.shape, generator=generator)
            optimizer.step()
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(finals[0], torch.cat([p.detach().flatten() for p in base.parameters()]))
    torch.testing.assert_close(finals[1], finals[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(finals[2], finals[0], atol=1e-6, rtol=1e-5)


# --- torch.compile (config key compile) ----------------------------------------------------------


def test_compile_blocks_compiles_each_vit_block_and_bert_layer_in_place(tokenizer):
    from timm.models.vision_transformer import Block

    from engine.trainer import configure_runtime
    from models.xbert import BertLayer

    model = tiny_pretrain_model(tokenizer)
    keys = list(model.state_dict())
    configure_runtime(model, {"compile": "blocks"})
    compiled = [name for name, module in model.named_modules() if module._compiled_call_impl is not None]
    layers = [name for name, module in model.named_modules() if isinstance(module, (Block, BertLayer))]
    assert compiled == layers and len(layers) > 20  # 7 encoders' layers, nothing else
    assert list(model.state_dict()) == keys  # checkpoints keep their names
    with pytest.raises(ValueError, match="config key compile is 'fast'"):
        configure_runtime(tiny_pretrain_model(tokenizer), {"compile": "fast"})


def test_compile_mode_reaches_torch_compile_and_bad_combinations_are_refused(tokenizer, monkeypatch):
    """Config key compile_mode is torch.compile's ``mode`` for every compiled module; modes that capture
    CUDA graphs themselves are refused with cuda_graph, and the autotuning modes on CPU (NaN gradients
    from the second step with PyTorch 2.14.1), each naming the key."""
    from engine.config import apply_overrides, describe_keys
    from engine.trainer import configure_runtime

    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: seen.append(kwargs))
    autotune = "max-autotune-no-cudagraphs"
    configure_runtime(tiny_pretrain_model(tokenizer), {"compile": "model", "compile_mode": autotune},
                      torch.device("cuda"))  # a device object only: nothing runs
    assert seen == [{"mode": autotune}]
    seen.clear()
    configure_runtime(tiny_pretrain_model(tokenizer), {"compile": "blocks", "cuda_graph": True,
                                                       "compile_mode": autotune}, torch.device("cuda"))
    assert len(seen) > 20 and all(kwargs == {"mode": autotune} for kwargs in seen)
    seen.clear()
    configure_runtime(tiny_pretrain_model(tokenizer), {"compile": "blocks"})
    assert len(seen) > 20 and all(kwargs == {} for kwargs in seen)  # default: torch.compile's own default

    refused = [({"compile": "model", "compile_mode": "fastest"}, None, "compile_mode is 'fastest'"),
               ({"compile": "model", "compile_mode": "reduce-overhead", "cuda_graph": True}, None,
                "captures CUDA graphs itself"),
               ({"compile": "blocks", "compile_mode": autotune}, torch.device("cpu"), "refused on CPU"),
               ({"compile": "model", "compile_mode": "max-autotune"}, torch.device("cpu"), "refused on CPU")]
    for config, device, message in refused:
        seen.clear()
        with pytest.raises(ValueError, match=message):
            configure_runtime(tiny_pretrain_model(tokenizer), config, device)
        assert seen == []  # refused before anything is compiled
    assert apply_overrides({}, [f"compile_mode={autotune}"])["compile_mode"] == autotune  # a declared key
    assert "compile_mode" in describe_keys("compile_mode")


@pytest.mark.parametrize("mode, merge_text_passes", [("model", False), ("blocks", True)],
                         ids=["whole_model", "blocks_merged_passes"])
def test_a_compiled_training_step_equals_the_eager_step(tokenizer, monkeypatch, mode, merge_text_passes):
    """The whole forward traced by dynamo (the eager backend here: inductor's CPU code generation takes
    minutes; on a GPU bench/check_cuda.py --compile_model checks inductor's kernels): same losses and
    gradients. Compiled blocks are checked with merged passes, whose fusion layers receive
    StackedKeysValues (the default blocks also run in test_grounding's Grad-CAM check). The whole model
    runs under check_cuda's order_independent_draws, which must survive the tracing (its GPU check)."""
    from check_cuda import order_independent_draws
    from engine.trainer import apply_compile

    compile_with_dynamo_only(monkeypatch)
    eager = tiny_pretrain_model(tokenizer)
    eager.merge_text_passes = merge_text_passes
    compiled = apply_compile(copy.deepcopy(eager), mode)
    batch = tiny_pretrain_batch(tokenizer)
    draws = order_independent_draws() if mode == "model" else contextlib.nullcontext()
    with draws:
        results = [terms_and_gradients(model, batch, alpha=torch.tensor(0.4)) for model in (eager, compiled)]
    torch._dynamo.reset()
    assert_same_terms_and_gradients(results[0], results[1], term_tol=1e-6, grad_atol=1e-6, grad_rtol=1e-5)
