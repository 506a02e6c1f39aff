"""Every ViCHA loss, each a small function whose docstring states its formula.

Notation: log_softmax is over the last dimension; "mean over masked" means over positions whose
label is not -100.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-mean_rows sum_j targets[i, j] * log_softmax(logits)[i, j]."""
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def distilled_targets(teacher_logits: torch.Tensor, hard_targets: torch.Tensor, alpha: float) -> torch.Tensor:
    """Momentum distillation targets: alpha * softmax(teacher) + (1 - alpha) * hard."""
    return alpha * F.softmax(teacher_logits, dim=1) + (1 - alpha) * hard_targets


def contrastive_loss(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, targets_i2t: torch.Tensor, targets_t2i: torch.Tensor
) -> torch.Tensor:
    """ITC: (CE_soft(s_i2t, q_i2t) + CE_soft(s_t2i, q_t2i)) / 2 (models.md §3.3 step 4)."""
    return (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2


def hierarchical_contrastive_loss(
    image_cls: list[torch.Tensor],
    text_cls: list[torch.Tensor],
    gathered_image_cls: list[torch.Tensor],
    gathered_text_cls: list[torch.Tensor],
    temp: torch.Tensor,
    weights: list[float],
    positive_offset: int = 0,
) -> torch.Tensor:
    """H-ITC (models.md §3.4): sum_i w_i * (CE_soft(a_i Bk_i^T / t, Y) + CE_soft(b_i A_i^T / t, Y)) / 2.

    ``image_cls``/``text_cls`` are the local, normalised level features (B, E); the gathered
    ones are all ranks' features (B*W, E). ``Y[r, positive_offset + r] = 1``: the original uses
    offset 0 on every rank (its bug); ``rank * B`` is the correct offset.
    """
    total = image_cls[0].new_zeros(())
    for a, b, all_a, all_b, weight in zip(image_cls, text_cls, gathered_image_cls, gathered_text_cls, weights):
        sim_i2t = a @ all_b.t() / temp
        sim_t2i = b @ all_a.t() / temp
        # One-hot Y built by comparison: an index_put of a scalar would copy it from the host (a sync).
        rows = torch.arange(a.shape[0], device=a.device) + positive_offset
        columns = torch.arange(sim_i2t.shape[1], device=a.device)
        targets = (columns[None, :] == rows[:, None]).to(sim_i2t.dtype)
        total = total + weight * contrastive_loss(sim_i2t, sim_t2i, targets, targets)
    return total


def mlm_loss(
    logits: torch.Tensor, labels: torch.Tensor, soft_labels: Optional[torch.Tensor] = None, alpha: float = 0.0
) -> torch.Tensor:
    """(1 - alpha) * CE_mean_over_masked + alpha * mean_over_masked(-sum_v soft * log_softmax(logits)).

    With alpha = 0 or no soft labels only the cross-entropy is computed.
    """
    vocab = logits.shape[-1]
    # One fp32 log-softmax serves both terms (cross-entropy is its NLL); the cast happens inside the
    # kernel, so no fp32 copy of the (B, L, V) logits is written first.
    log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32)
    ce = F.nll_loss(log_probs.reshape(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    if soft_labels is None:
        return ce
    selected = labels != IGNORE_INDEX
    distill = -(soft_labels * log_probs).sum(dim=-1)
    distill = (distill * selected).sum() / selected.sum()
    return (1 - alpha) * ce + alpha * distill


def mlm_row_capacity(num_rows: int, probability: float, tail: float = 1e-15) -> int:
    """A static number of rows that holds every masked position of ``num_rows`` except with
    probability below ``tail``: each row is masked with probability at most ``probability``, so by
    Hoeffding P(masked >= p*N + t) <= exp(-2 t^2 / N); t = sqrt(N ln(1/tail) / 2).
    At the paper size (64 x 25 = 1,600 rows, p = 0.15): 407 rows."""
    spread = math.sqrt(num_rows * math.log(1.0 / tail) / 2.0)
    return min(num_rows, math.ceil(probability * num_rows + spread))


def masked_rows(labels: torch.Tensor, capacity: Optional[int] = None) -> torch.Tensor:
    """Flat row indices of ``labels`` that the MLM loss reads: every masked position (label != -100).

    ``capacity`` None: exactly the masked rows (a data-dependent size; a host sync on a GPU).
    ``capacity`` K: a static size for compiled or CUDA-graph-captured steps: the masked rows first,
    then unmasked ones (label -100: they weigh nothing in the loss) up to K. If more than K rows are
    masked the surplus is left out (see ``mlm_row_capacity`` for how unlikely that is)."""
    unmasked = labels.reshape(-1) == IGNORE_INDEX
    if capacity is None:
        return torch.nonzero(~unmasked).squeeze(1)
    return torch.argsort(unmasked.to(torch.uint8), stable=True)[:capacity]


def lm_sequence_loss(
    shifted_logits: torch.Tensor,
    shifted_labels: torch.Tensor,
    soft_labels: Optional[torch.Tensor] = None,
    alpha: float = 0.0,
) -> torch.Tensor:
    """Per-sequence summed next-token loss, (B,): sum_t CE_t, mixed with the distillation term
    sum_t [label_t != -100] * (-sum_v soft * log_softmax) as (1 - alpha) * CE + alpha * distill."""
    batch, length, vocab = shifted_logits.shape
    ce = F.cross_entropy(
        shifted_logits.reshape(-1, vocab).float(), shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(batch, length).sum(dim=1)
    if soft_labels is None:
        return ce
    distill = -(soft_labels * F.log_softmax(shifted_logits.float(), dim=-1)).sum(dim=-1)
    distill = (distill * (shifted_labels != IGNORE_INDEX)).sum(dim=1)
    return (1 - alpha) * ce + alpha * distill


def distilled_classification_loss(
    logits: torch.Tensor, targets: torch.Tensor, teacher_logits: Optional[torch.Tensor], alpha: float
) -> torch.Tensor:
    """VE / NLVR2: (1 - alpha) * CE(logits, y) - alpha * mean_b sum_c softmax(teacher) log_softmax(logits)."""
    ce = F.cross_entropy(logits.float(), targets)
    if teacher_logits is None:
        return ce
    distill = -(F.softmax(teacher_logits.float(), dim=1) * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()
    return (1 - alpha) * ce + alpha * distill


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, p*p*3), patches row-major, each ordered (row, col, channel)."""
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image side {height}x{width} is not divisible by the patch size {patch_size}")
    h, w = height // patch_size, width // patch_size
    x = images.reshape(batch, channels, h, patch_size, w, patch_size)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(batch, h * w, patch_size * patch_size * channels)


def mae_loss(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Masked-patch regression (models.md §3.7).

    target = (patch - mean) / sqrt(var + 1e-6) per patch, var unbiased;
    loss = sum_{b,p} mask * mean_d (pred - target)^2 / sum mask  (mask 1 = removed patch).
    """
    target = patchify(images, patch_size).float()
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)  # unbiased, as torch's default (and the original)
    target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def mask_tokens(
    input_ids: torch.Tensor,
    vocab_size: int,
    mask_token_id: int,
    pad_token_id: int,
    cls_token_id: int,
    probability: float = 0.15,
    generator: Optional[torch.Generator] = None,
    draw_on_device: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (models.md §3.6): select with p=0.15 (never [PAD] / [CLS]); 80 % -> [MASK],
    half of the rest -> a random id in [0, vocab) (any id), the remainder unchanged.

    By default the four draws come from the CPU generator in the original's order (so the masks
    equal the original's for the same seed). ``draw_on_device`` draws them on the ids' device
    instead (same distribution, another random stream): a CUDA-graph-captured step needs this,
    since a captured host-to-device copy would replay the same masks at every step.
    Returns (masked ids, labels).
    """
    shape, device = input_ids.shape, input_ids.device
    if draw_on_device:
        draw_device = device
    else:
        # Every draw is made on the CPU generator, independently of the ids, and only then moved to
        # the ids' device (non-blocking): no device-to-host copy of the ids, so no host sync on a GPU.
        draw_device = torch.device("cpu")
    selected = torch.bernoulli(torch.full(shape, probability, device=draw_device), generator=generator).bool()
    replaced = torch.bernoulli(torch.full(shape, 0.8, device=draw_device), generator=generator).bool()
    randomised = torch.bernoulli(torch.full(shape, 0.5, device=draw_device), generator=generator).bool()
    random_ids = torch.randint(vocab_size, shape, dtype=torch.long, generator=generator, device=draw_device)
    if not draw_on_device:
        selected, replaced, randomised, random_ids = (
            t.to(device, non_blocking=True) for t in (selected, replaced, randomised, random_ids))
    selected &= (input_ids != pad_token_id) & (input_ids != cls_token_id)
    replaced &= selected
    randomised &= selected & ~replaced
    labels = input_ids.masked_fill(~selected, IGNORE_INDEX)
    ids = torch.where(replaced, torch.full_like(input_ids, mask_token_id), input_ids)
    ids = torch.where(randomised, random_ids, ids)
    return ids, labels


def sample_negatives(weights: torch.Tensor) -> torch.Tensor:
    """One index per row drawn with probability proportional to ``weights`` (B, B).

    argmax(weights / q) with q ~ Exp(1): the algorithm ``torch.multinomial(weights, 1)`` itself runs,
    so the draws equal its draws for the same generator state, but without its input checks (host
    syncs in some PyTorch versions, and nothing a CUDA-graph-captured step may contain). Non-finite
    weights give an arbitrary index; the trainer's non-finite loss guard reports the cause.
    """
    weights = weights.float()
    race = torch.empty_like(weights).exponential_(1)
    return (weights / race).argmax(dim=1)
