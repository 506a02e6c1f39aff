"""Each loss on a small input with a hand-computed answer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import losses


def test_distilled_targets_at_alpha_0_and_1():
    teacher = torch.tensor([[2.0, 0.0, -1.0]])
    hard = torch.tensor([[1.0, 0.0, 0.0]])
    torch.testing.assert_close(losses.distilled_targets(teacher, hard, 0.0), hard)
    torch.testing.assert_close(losses.distilled_targets(teacher, hard, 1.0), F.softmax(teacher, dim=1))
    mixed = losses.distilled_targets(teacher, hard, 0.4)
    torch.testing.assert_close(mixed, 0.4 * F.softmax(teacher, dim=1) + 0.6 * hard)


def test_contrastive_loss_hand_computed():
    sim = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    targets = torch.eye(2)
    expected = -math.log(math.e / (math.e + 1))  # each row: -log softmax of the diagonal
    assert losses.contrastive_loss(sim, sim, targets, targets).item() == pytest.approx(expected, rel=1e-6)
    # symmetric average of the two directions
    other = torch.zeros(2, 2)
    value = losses.contrastive_loss(sim, other, targets, targets).item()
    assert value == pytest.approx((expected + math.log(2)) / 2, rel=1e-6)


def test_hierarchical_loss_targets_and_rank_offset():
    a = F.normalize(torch.randn(2, 4), dim=1)
    b = F.normalize(torch.randn(2, 4), dim=1)
    others_a, others_b = F.normalize(torch.randn(2, 4), dim=1), F.normalize(torch.randn(2, 4), dim=1)
    temp = torch.tensor(0.1)
    # rank 1 of 2: gathered = [rank0; rank1]
    all_a, all_b = torch.cat([others_a, a]), torch.cat([others_b, b])
    buggy = losses.hierarchical_contrastive_loss([a], [b], [all_a], [all_b], temp, [1.0], positive_offset=0)
    fixed = losses.hierarchical_contrastive_loss([a], [b], [all_a], [all_b], temp, [1.0], positive_offset=2)
    y_bug = torch.zeros(2, 4)
    y_bug[[0, 1], [0, 1]] = 1
    y_fix = torch.zeros(2, 4)
    y_fix[[0, 1], [2, 3]] = 1
    expected_bug = losses.contrastive_loss(a @ all_b.t() / temp, b @ all_a.t() / temp, y_bug, y_bug)
    expected_fix = losses.contrastive_loss(a @ all_b.t() / temp, b @ all_a.t() / temp, y_fix, y_fix)
    torch.testing.assert_close(buggy, expected_bug)
    torch.testing.assert_close(fixed, expected_fix)
    weighted = losses.hierarchical_contrastive_loss([a, a], [b, b], [all_a, all_a], [all_b, all_b], temp,
                                                    [1.0, 0.5], positive_offset=2)
    torch.testing.assert_close(weighted, 1.5 * expected_fix)


def test_mlm_loss_mixes_ce_and_distillation_over_masked_positions():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]])
    labels = torch.tensor([[0, -100, 2]])
    soft = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    log_p = F.log_softmax(logits, dim=-1)[0]
    ce = -(log_p[0, 0] + log_p[2, 2]) / 2
    distill = -((0.5 * log_p[0, 0] + 0.5 * log_p[0, 1]) + log_p[2, 2]) / 2
    assert losses.mlm_loss(logits, labels).item() == pytest.approx(ce.item(), rel=1e-6)
    mixed = losses.mlm_loss(logits, labels, soft, alpha=0.4).item()
    assert mixed == pytest.approx((0.6 * ce + 0.4 * distill).item(), rel=1e-6)


def test_mlm_loss_on_bf16_logits_equals_the_loss_of_their_fp32_copy():
    """Autocast gives bf16 logits; the loss upcasts inside one log-softmax instead of copying them."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 50).bfloat16().requires_grad_()
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 3], labels[1, 4] = 7, 0, 49
    soft = torch.softmax(torch.randn(2, 5, 50), dim=-1)
    reference_logits = logits.detach().clone().requires_grad_()
    upcast = reference_logits.float()
    ce = F.cross_entropy(upcast.reshape(-1, 50), labels.reshape(-1), ignore_index=-100)
    selected = labels != -100
    distill = (-(soft * F.log_softmax(upcast, dim=-1)).sum(-1) * selected).sum() / selected.sum()
    expected = 0.6 * ce + 0.4 * distill
    loss = losses.mlm_loss(logits, labels, soft, alpha=0.4)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(logits.grad, reference_logits.grad)


def test_lm_sequence_loss_is_a_per_sequence_sum():
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, 2, -100], [4, -100, -100]])
    out = losses.lm_sequence_loss(logits, labels)
    log_p = F.log_softmax(logits, dim=-1)
    expected = torch.stack([-(log_p[0, 0, 1] + log_p[0, 1, 2]), -log_p[1, 0, 4]])
    torch.testing.assert_close(out, expected)


def test_distilled_classification_loss():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.0, 0.0, 0.0]])
    target = torch.tensor([0])
    ce = F.cross_entropy(logits, target)
    distill = -(F.log_softmax(logits, dim=1).mean())
    value = losses.distilled_classification_loss(logits, target, teacher, 0.4)
    assert value.item() == pytest.approx((0.6 * ce + 0.4 * distill).item(), rel=1e-6)


def test_mask_tokens_never_masks_cls_or_pad_and_follows_80_10_10():
    ids = torch.full((400, 30), 50, dtype=torch.long)
    ids[:, 0] = 2  # [CLS]
    ids[:, 20:] = 0  # [PAD]
    generator = torch.Generator().manual_seed(0)
    masked, labels = losses.mask_tokens(ids, vocab_size=100, mask_token_id=4, pad_token_id=0, cls_token_id=2,
                                        probability=0.15, generator=generator)
    assert (labels[:, 0] == -100).all() and (labels[:, 20:] == -100).all()
    assert (masked[:, 0] == 2).all() and (masked[:, 20:] == 0).all()
    selected = labels != -100
    assert 0.12 < selected[:, 1:20].float().mean() < 0.18
    assert (labels[selected] == 50).all()
    as_mask = (masked == 4) & selected
    assert 0.75 < as_mask.sum() / selected.sum() < 0.85
    unchanged = (masked == 50) & selected
    assert 0.05 < unchanged.sum() / selected.sum() < 0.16  # 10 % kept + random draws that hit 50


def test_mask_tokens_draws_the_originals_masks_for_a_seed():
    """Same four CPU draws, in the original's order, applied to the ids in place (original's steps)."""
    ids = torch.randint(5, 100, (8, 25), generator=torch.Generator().manual_seed(3))
    ids[:, 0], ids[:, 18:] = 2, 0
    masked, labels = losses.mask_tokens(ids, 100, 4, 0, 2, 0.15, generator=torch.Generator().manual_seed(11))

    generator = torch.Generator().manual_seed(11)
    expected, expected_labels = ids.clone(), ids.clone()
    selected = torch.bernoulli(torch.full(ids.shape, 0.15), generator=generator).bool()
    selected[ids == 0] = False
    selected[ids == 2] = False
    expected_labels[~selected] = -100
    replaced = torch.bernoulli(torch.full(ids.shape, 0.8), generator=generator).bool() & selected
    expected[replaced] = 4
    randomised = torch.bernoulli(torch.full(ids.shape, 0.5), generator=generator).bool() & selected & ~replaced
    random_words = torch.randint(100, ids.shape, dtype=torch.long, generator=generator)
    expected[randomised] = random_words[randomised]
    assert torch.equal(masked, expected) and torch.equal(labels, expected_labels)
    assert replaced.any() and randomised.any()  # every branch was exercised


def test_sample_negatives_draws_what_multinomial_draws():
    weights = torch.rand(16, 16).masked_fill(torch.eye(16, dtype=torch.bool), 0)
    for seed in range(5):
        torch.manual_seed(seed)
        expected = torch.multinomial(weights, 1).squeeze(1)
        torch.manual_seed(seed)
        assert torch.equal(losses.sample_negatives(weights), expected)
    counts = torch.zeros(3)
    for _ in range(3000):  # proportional to the weights
        counts[losses.sample_negatives(torch.tensor([[1.0, 2.0, 7.0]]))] += 1
    assert torch.allclose(counts / 3000, torch.tensor([0.1, 0.2, 0.7]), atol=0.03)


def test_sample_negatives_never_returns_an_excluded_item():
    weights = torch.rand(6, 6).masked_fill(torch.eye(6, dtype=torch.bool), 0)
    for _ in range(200):
        picks = losses.sample_negatives(weights)
        assert (picks != torch.arange(6)).all()


def test_patchify_order_and_mae_targets():
    image = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).view(2, 3, 4, 4)
    patches = losses.patchify(image, 2)
    assert patches.shape == (2, 4, 12)
    # first patch: rows 0-1, cols 0-1, channel fastest
    expected = torch.stack([image[0, :, r, c] for r in range(2) for c in range(2)]).flatten()
    torch.testing.assert_close(patches[0, 0], expected)
    with pytest.raises(ValueError, match="divisible"):
        losses.patchify(torch.zeros(1, 3, 5, 4), 2)


def test_mae_loss_normalises_per_patch_with_unbiased_variance_and_counts_masked_only():
    torch.manual_seed(0)
    image = torch.randn(1, 3, 4, 4)
    target = losses.patchify(image, 2)
    normalised = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True, unbiased=True) + 1e-6) ** 0.5
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    assert losses.mae_loss(normalised, image, mask, 2).item() == pytest.approx(0.0, abs=1e-6)
    pred = normalised.clone()
    pred[0, 1] += 100.0  # an unmasked patch: ignored
    assert losses.mae_loss(pred, image, mask, 2).item() == pytest.approx(0.0, abs=1e-6)
    pred[0, 0] += 1.0  # a masked patch off by 1 everywhere: mean (1) over 2 masked patches
    assert losses.mae_loss(pred, image, mask, 2).item() == pytest.approx(0.5, rel=1e-5)
