"""BERT text / fusion encoder with the ALBEF modifications, written for current PyTorch.

Parameter names equal those of transformers 4.8's BERT (and so the official ViCHA checkpoints).
What differs from stock BERT (models.md §1.2):

* layer ``i`` has a ``crossattention`` block iff ``i >= fusion_layer``; its key/value read
  ``encoder_width``-wide image tokens;
* ``mode`` selects the layers run: ``'text'`` = [0, fusion_layer), ``'fusion'`` =
  [fusion_layer, L), ``'multi_modal'`` = all;
* ``encoder_embeds`` skips the embedding layer (fusion on top of an earlier text pass);
* a list of image token sequences is used round-robin by the fusion layers (NLVR2);
* the image side of the cross-attention can be projected once (``BertModel.image_keys_values``) and
  reused by several fusion passes over rows of the same images (pretraining ITM + MLM), and texts
  that attend to the same image can share one attention call (``StackedKeysValues``);
* hidden states are collected over the executed layers only.

Attention runs through ``F.scaled_dot_product_attention``; an explicit path that materialises
the probabilities is used when a cross-attention module has ``save_attention`` set (Grad-CAM) or
when ``fused`` is switched off (parity tests).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models import losses
from models.precision import to_autocast_dtype


def attention_probabilities(queries: torch.Tensor, keys: torch.Tensor,
                            additive_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask): the explicit attention maps (what the fused kernel never writes)."""
    scores = queries @ keys.transpose(-1, -2) / math.sqrt(queries.shape[-1])  # (B, nh, T, S)
    if additive_mask is not None:
        scores = scores + additive_mask
    return scores.softmax(dim=-1)


def pick_rows(source: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``source[rows]`` (rows of dim 0) as a product with a one-hot matrix. Each output row is one
    input row times 1 plus zeros, so the values are exact also in bf16 (the one exception: an inf or
    NaN in ``source`` spreads to every row, which only happens when the step is lost anyway). The
    backward pass is one more product, summing in fp32, where indexing's backward is an accumulating
    scatter with atomic adds (the ``index_put`` kernels of the H100 profile: 1.06 ms per step at
    batch 64 for the ITM hard negatives' image keys/values)."""
    one_hot = (rows[:, None] == torch.arange(source.shape[0], device=rows.device)).to(source.dtype)
    return (one_hot @ source.reshape(source.shape[0], -1)).view(rows.shape[0], *source.shape[1:])


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, heads * head_dim) -> (B, heads, T, head_dim), a view."""
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def block_rows(blocks: Sequence[Optional[torch.Tensor]], batch: int, device) -> torch.Tensor:
    """The image row of every text of ``blocks`` (each a block of ``batch`` texts: ``None`` = the images
    in order, else the image index of each text), flattened."""
    identity = torch.arange(batch, device=device)
    return torch.cat([identity if block is None else block for block in blocks])


@dataclass
class StackedKeysValues:
    """One fusion layer's image keys/values (B, heads, S, head_dim) for texts in blocks of B rows
    (``ImageKeysValues.select_blocks``). The blocks whose texts attend to the images in order (``None``)
    are stacked along the query axis: cross-attention has no query-query interaction, so the texts of
    one image read its keys/values in one call (75 queries for the pretraining's three such blocks,
    where 25-token texts fill a 64-row query tile badly) and those keys/values are never gathered.
    The other blocks gather their rows. Same math as attending block by block."""

    keys: torch.Tensor
    values: torch.Tensor
    blocks: tuple
    # Keys/values of the gathered blocks' rows (in block order), when picked beforehand by a product
    # (``ImageKeysValues.select_blocks``); None = index ``keys``/``values`` here.
    picked_keys: Optional[torch.Tensor] = None
    picked_values: Optional[torch.Tensor] = None

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every text's image row (what a flat selection gives)."""
        rows = block_rows(self.blocks, self.keys.shape[0], self.keys.device)
        return self.keys[rows], self.values[rows]

    def attend(self, queries: torch.Tensor, additive_mask: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
        """Attention of ``queries`` (n_blocks * B, heads, T, head_dim); ``additive_mask`` per text
        (n_blocks * B, 1, 1, S) or None. Returns the context in the queries' layout."""
        count, batch = len(self.blocks), self.keys.shape[0]
        _, heads, length, dim = queries.shape
        queries = queries.view(count, batch, heads, length, dim)
        masks = None if additive_mask is None else additive_mask.view(count, batch, *additive_mask.shape[1:])
        in_order = [i for i, block in enumerate(self.blocks) if block is None]
        gathered = [i for i, block in enumerate(self.blocks) if block is not None]
        contexts: list[Optional[torch.Tensor]] = [None] * count
        if in_order:
            stacked = queries[in_order].permute(1, 2, 0, 3, 4).reshape(batch, heads, len(in_order) * length, dim)
            mask = None if masks is None else masks[in_order[0]]  # the same images: the same mask
            context = F.scaled_dot_product_attention(stacked, self.keys, self.values, attn_mask=mask,
                                                     dropout_p=dropout_p)
            context = context.view(batch, heads, len(in_order), length, dim).permute(2, 0, 1, 3, 4)
            for position, index in enumerate(in_order):
                contexts[index] = context[position]
        if gathered:
            rows = torch.cat([self.blocks[i] for i in gathered])
            block_queries = queries[gathered].reshape(len(gathered) * batch, heads, length, dim)
            mask = None if masks is None else masks[gathered].reshape(len(gathered) * batch, *masks.shape[2:])
            if self.picked_keys is not None:
                keys, values = self.picked_keys, self.picked_values
            else:
                keys, values = self.keys[rows], self.values[rows]
            context = F.scaled_dot_product_attention(block_queries, keys, values, attn_mask=mask, dropout_p=dropout_p)
            context = context.view(len(gathered), batch, heads, length, dim)
            for position, index in enumerate(gathered):
                contexts[index] = context[position]
        return torch.stack(contexts).view(count * batch, heads, length, dim)


@dataclass
class ImageKeysValues:
    """Cross-attention keys and values of a batch of image tokens, per fusion layer, in head layout.

    Pretraining runs the fusion layers four times per image (ITM positive, ITM negatives, MLM), and
    each pass would project the same image tokens (CLS + patches + VCs: 312 at the paper config) again
    in every fusion layer: about a tenth of the step's FLOPs. Projecting them once and picking rows is
    the same math (a linear map commutes with row selection). ``rows`` (optional) names, for each text
    of a pass, the image row it attends to; ``blocks`` (optional, ``select_blocks``) does the same by
    blocks of B texts, so the blocks that attend to the images in order can share their reads.
    In training (a gradient flows back), rows are picked from the whole projection at once by a
    one-hot product (``pick_rows``), when built with ``pick_rows_by_product``; otherwise by indexing.
    """

    keys: dict[int, torch.Tensor]  # layer index -> (B, heads, S, head_dim)
    values: dict[int, torch.Tensor]
    rows: Optional[torch.Tensor] = None
    blocks: Optional[tuple] = None
    # The projection the keys/values are views of, (B, S, 2 * len(layers) * width): each layer's keys
    # then values, side by side. Kept only when rows are to be picked by a product (``pick_rows``).
    projection: Optional[torch.Tensor] = None
    layers: tuple = ()
    num_heads: int = 0
    picked: Optional["ImageKeysValues"] = None  # select_blocks: the gathered blocks' rows, picked already

    @classmethod
    def from_projection(cls, projection: torch.Tensor, layers: Sequence[int], num_heads: int,
                        pick_rows_by_product: bool = True) -> "ImageKeysValues":
        """Keys/values of ``layers`` as head-layout views of one projection (see ``projection``)."""
        chunks = projection.split(projection.shape[-1] // (2 * len(layers)), dim=-1)
        keys = {index: split_heads(chunks[2 * n], num_heads) for n, index in enumerate(layers)}
        values = {index: split_heads(chunks[2 * n + 1], num_heads) for n, index in enumerate(layers)}
        return cls(keys, values, projection=projection if pick_rows_by_product else None, layers=tuple(layers),
                   num_heads=num_heads)

    def _picks_by_product(self) -> bool:
        """Rows are picked by a product only where a gradient flows back (training); evaluation and
        the momentum passes index (no backward to save, and no product over large candidate sets).
        An fp32 product may run in TF32 (10-bit mantissa) and round the picked values: indexing then."""
        if self.projection is None or not (self.projection.requires_grad and torch.is_grad_enabled()):
            return False
        return self.projection.dtype != torch.float32 or torch.get_float32_matmul_precision() == "highest"

    def select(self, rows: torch.Tensor) -> "ImageKeysValues":
        """The same projections, attended by texts whose images are ``rows`` (indices into this batch)."""
        if self.blocks is not None:
            raise ValueError("select() after select_blocks() is not supported")
        if self._picks_by_product():
            return ImageKeysValues.from_projection(pick_rows(self.projection, rows), self.layers, self.num_heads)
        return ImageKeysValues(self.keys, self.values, rows if self.rows is None else self.rows[rows])

    def select_blocks(self, blocks: Sequence[Optional[torch.Tensor]]) -> "ImageKeysValues":
        """The same projections, attended by ``len(blocks)`` blocks of B texts: ``None`` = text i of the
        block attends to image i, else the block's image index per text (see ``StackedKeysValues``)."""
        if self.rows is not None or self.blocks is not None:
            raise ValueError("select_blocks() needs the unselected keys/values of the batch")
        gathered = [block for block in blocks if block is not None]
        picked = self.select(torch.cat(gathered)) if gathered and self._picks_by_product() else None
        return ImageKeysValues(self.keys, self.values, blocks=tuple(blocks), picked=picked)

    def layer(self, index: int) -> Union[tuple[torch.Tensor, torch.Tensor], StackedKeysValues]:
        if index not in self.keys:
            raise KeyError(f"no precomputed image keys/values for BERT layer {index} "
                           f"(have layers {sorted(self.keys)})")
        keys, values = self.keys[index], self.values[index]
        if self.blocks is not None:
            if self.picked is None:
                return StackedKeysValues(keys, values, self.blocks)
            return StackedKeysValues(keys, values, self.blocks, self.picked.keys[index], self.picked.values[index])
        if self.rows is not None:
            keys, values = keys[self.rows], values[self.rows]
        return keys, values


ImageStates = Union[torch.Tensor, ImageKeysValues, Sequence[torch.Tensor], None]


@dataclass
class BertConfig:
    """The subset of a BERT JSON config this encoder reads (extra JSON keys are ignored)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    fusion_layer: int = 6
    encoder_width: int = 768
    output_hidden_states: bool = False
    output_attentions: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, values: dict, **overrides) -> "BertConfig":
        known = {f.name for f in fields(cls)} - {"extra"}
        merged = {**values, **overrides}
        kwargs = {k: v for k, v in merged.items() if k in known}
        config = cls(**kwargs)
        config.extra = {k: v for k, v in merged.items() if k not in known}
        return config

    @classmethod
    def from_json_file(cls, path: str, **overrides) -> "BertConfig":
        try:
            with open(path, encoding="utf-8") as handle:
                values = json.load(handle)
        except FileNotFoundError:
            raise FileNotFoundError(f"BERT config file not found: {path}") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"BERT config {path} is not valid JSON: {error}") from None
        return cls.from_dict(values, **overrides)


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None


@dataclass
class LMOutput:
    loss: Optional[torch.Tensor]
    logits: torch.Tensor


def _activation(name: str):
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported hidden_act {name!r} in the BERT config")


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Persistent, as in transformers 4.8: every official checkpoint carries this key.
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).unsqueeze(0))
        self.low_precision_residual = False  # config bf16_residual (models/precision.py)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        x = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids[:, :length])
        x = x + self.token_type_embeddings.weight[0]  # token_type_ids are always zero
        return self.dropout(to_autocast_dtype(self.LayerNorm(x), self.low_precision_residual))


class BertSelfAttention(nn.Module):
    """Multi-head attention; keys/values come from image tokens when ``is_cross``."""

    def __init__(self, config: BertConfig, is_cross: bool) -> None:
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        kv_width = config.encoder_width if is_cross else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.is_cross = is_cross
        self.fused = True
        # Grad-CAM (grounding): keep the cross-attention probabilities and their gradient.
        self.save_attention = False
        self.attention_map: Optional[torch.Tensor] = None
        self.attn_gradients: Optional[torch.Tensor] = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return split_heads(x, self.num_heads)  # (B, nh, T, hs)

    def save_attn_gradients(self, grad: torch.Tensor) -> None:
        self.attn_gradients = grad

    def get_attention_map(self) -> Optional[torch.Tensor]:
        return self.attention_map

    def get_attn_gradients(self) -> Optional[torch.Tensor]:
        return self.attn_gradients

    def project_keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, heads, S, head_dim) of ``source`` tokens."""
        return self._heads(self.key(source)), self._heads(self.value(source))

    def forward(
        self, hidden: torch.Tensor, additive_mask: Optional[torch.Tensor],
        keys_values: Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor], "StackedKeysValues", None] = None,
    ) -> torch.Tensor:
        """``keys_values`` (cross-attention only): image tokens, their projected (keys, values), or
        projected keys/values for texts in blocks (``StackedKeysValues``)."""
        q = self._heads(self.query(hidden))
        dropout_p = self.dropout.p if self.training else 0.0
        explicit = (self.save_attention and self.is_cross) or not self.fused
        if self.is_cross and isinstance(keys_values, StackedKeysValues):
            if not explicit:
                context = keys_values.attend(q, additive_mask, dropout_p)
                batch, _, length, _ = context.shape
                return context.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
            keys_values = keys_values.gathered()
        if self.is_cross and isinstance(keys_values, tuple):
            k, v = keys_values
        else:
            k, v = self.project_keys_values(keys_values if self.is_cross else hidden)
        if explicit:
            probs = attention_probabilities(q, k, additive_mask)
            if self.save_attention and self.is_cross:
                self.attention_map = probs
                if probs.requires_grad:
                    probs.register_hook(self.save_attn_gradients)
            context = self.dropout(probs) @ v
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask, dropout_p=dropout_p)
        batch, _, length, _ = context.shape
        return context.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.low_precision_residual = False  # config bf16_residual (models/precision.py)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out = self.LayerNorm(self.dropout(self.dense(hidden)) + residual)
        return to_autocast_dtype(out, self.low_precision_residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig, is_cross: bool = False) -> None:
        super().__init__()
        self.self = BertSelfAttention(config, is_cross)
        self.output = BertSelfOutput(config)

    def forward(self, hidden, additive_mask, keys_values=None):
        return self.output(self.self(hidden, additive_mask, keys_values), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _activation(config.hidden_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden))


class BertOutput(BertSelfOutput):
    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)


class BertLayer(nn.Module):
    """Self-attention -> (cross-attention to image tokens) -> feed-forward, post-LN."""

    def __init__(self, config: BertConfig, layer_index: int) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.has_cross_attention = layer_index >= config.fusion_layer
        if self.has_cross_attention:
            self.crossattention = BertAttention(config, is_cross=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden, self_mask, image_states=None, image_mask=None):
        hidden = self.attention(hidden, self_mask)
        if self.has_cross_attention:
            if image_states is None:
                raise ValueError("a fusion layer needs encoder_hidden_states (image tokens)")
            hidden = self.crossattention(hidden, image_mask, image_states)
        return self.output(self.intermediate(hidden), hidden)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([BertLayer(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def layer_range(self, mode: str) -> range:
        fusion = self.config.fusion_layer
        if mode == "text":
            return range(0, fusion)
        if mode == "fusion":
            return range(fusion, self.config.num_hidden_layers)
        if mode == "multi_modal":
            return range(0, self.config.num_hidden_layers)
        raise ValueError(f"mode must be 'text', 'fusion' or 'multi_modal', got {mode!r}")

    def forward(self, hidden, self_mask, image_states, image_masks, mode, output_hidden_states):
        collected = [hidden] if output_hidden_states else None
        fusion = self.config.fusion_layer
        for i in self.layer_range(mode):
            layer = self.layer[i]
            states = mask = None
            if layer.has_cross_attention and image_states is not None:
                slot = (i - fusion) % len(image_states)
                states, mask = image_states[slot], image_masks[slot]
                if isinstance(states, ImageKeysValues):
                    states = states.layer(i)
            if self.gradient_checkpointing and self.training:
                hidden = checkpoint(layer, hidden, self_mask, states, mask, use_reentrant=False)
            else:
                hidden = layer(hidden, self_mask, states, mask)
            if collected is not None:
                collected.append(hidden)
        return hidden, (tuple(collected) if collected is not None else None)


def self_attention_mask(attention_mask: torch.Tensor, is_decoder: bool, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (1 - mask) * -10000, causal x padding for the decoder; (B, 1, 1|T, T)."""
    mask = attention_mask[:, None, None, :].to(dtype)
    if is_decoder:
        length = attention_mask.shape[1]
        causal = torch.tril(torch.ones(length, length, device=attention_mask.device, dtype=dtype))
        mask = mask * causal[None, None]
    return (1.0 - mask) * -10000.0


def cross_attention_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Additive mask (1 - mask) * -1e9 over image tokens; None means every token is attended."""
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * -1e9


class BertModel(nn.Module):
    """Embeddings + layers; no pooler (the ALBEF family never uses it)."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = False) -> None:
        super().__init__()
        if add_pooling_layer:
            raise ValueError("the pooler is not used by any ViCHA model")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def set_fused_attention(self, fused: bool) -> None:
        for module in self.modules():
            if isinstance(module, BertSelfAttention):
                module.fused = fused

    def image_keys_values(self, image_states: torch.Tensor, pick_rows_by_product: bool = True) -> ImageKeysValues:
        """Every fusion layer's cross-attention keys/values of ``image_states``, computed once, by one
        product with the layers' key and value weights side by side: the image tokens are read (and,
        under autocast, cast) once instead of 12 times, and the backward pass gets their gradient from
        one product instead of summing 12 (same values; the weights keep their own parameters).
        ``pick_rows_by_product``: rows selected for later passes are picked by a product (``pick_rows``)."""
        attentions = {index: layer.crossattention.self for index, layer in enumerate(self.encoder.layer)
                      if layer.has_cross_attention}
        projections = [linear for attention in attentions.values() for linear in (attention.key, attention.value)]
        weight = torch.cat([linear.weight for linear in projections])
        bias = torch.cat([linear.bias for linear in projections])
        num_heads = next(iter(attentions.values())).num_heads
        return ImageKeysValues.from_projection(F.linear(image_states, weight, bias), list(attentions), num_heads,
                                               pick_rows_by_product)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        encoder_embeds: Optional[torch.Tensor] = None,
        encoder_hidden_states: ImageStates = None,
        encoder_attention_mask: Union[torch.Tensor, Sequence[Optional[torch.Tensor]], None] = None,
        mode: str = "multi_modal",
        is_decoder: bool = False,
        output_hidden_states: Optional[bool] = None,
        return_dict: bool = True,
    ) -> EncoderOutput:
        if encoder_embeds is None:
            if input_ids is None:
                raise ValueError("BertModel needs input_ids or encoder_embeds")
            hidden = self.embeddings(input_ids)
        else:
            hidden = encoder_embeds
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        dtype = hidden.dtype if hidden.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        if torch.is_autocast_enabled(hidden.device.type):
            dtype = torch.get_autocast_dtype(hidden.device.type)
        self_mask = self_attention_mask(attention_mask, is_decoder, dtype)

        image_states = image_masks = None
        if encoder_hidden_states is not None:
            if isinstance(encoder_hidden_states, (torch.Tensor, ImageKeysValues)):
                image_states = [encoder_hidden_states]
                image_masks = [encoder_attention_mask]
            else:
                image_states = list(encoder_hidden_states)
                masks = encoder_attention_mask if encoder_attention_mask is not None else [None] * len(image_states)
                image_masks = list(masks)
            image_masks = [cross_attention_mask(m, dtype) for m in image_masks]
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        last, hidden_states = self.encoder(hidden, self_mask, image_states, image_masks, mode, output_hidden_states)
        return EncoderOutput(last_hidden_state=last, hidden_states=hidden_states)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = _activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(hidden)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        # The decoder bias *is* this parameter: both keys appear in the state_dict (models.md §1.2).
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.predictions(hidden)


class _BertWithHead(nn.Module):
    """``bert.*`` + ``cls.*`` with the decoder weight tied to the word embeddings."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertOnlyMLMHead(config)
        self.bert._init_weights(self.cls.predictions.transform.dense)
        self.cls.predictions.transform.LayerNorm.reset_parameters()
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight


class BertForMaskedLM(_BertWithHead):
    """Masked-LM BERT (pretraining text encoder); loss of models.md §1.2 item 8."""

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        encoder_embeds: Optional[torch.Tensor] = None,
        encoder_hidden_states: ImageStates = None,
        encoder_attention_mask=None,
        labels: Optional[torch.Tensor] = None,
        is_decoder: bool = False,
        mode: str = "multi_modal",
        soft_labels: Optional[torch.Tensor] = None,
        alpha: float = 0.0,
        return_logits: bool = False,
    ):
        out = self.bert(input_ids, attention_mask, encoder_embeds, encoder_hidden_states,
                        encoder_attention_mask, mode=mode, is_decoder=is_decoder)
        logits = self.cls(out.last_hidden_state)  # (B, L, V)
        if return_logits:
            return logits
        loss = None
        if labels is not None:
            loss = losses.mlm_loss(logits, labels, soft_labels, alpha)
        return LMOutput(loss=loss, logits=logits)


class BertLMHeadModel(_BertWithHead):
    """Causal decoder (VQA answers); per-sequence summed next-token loss (models.md §1.2 item 9)."""

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        encoder_hidden_states: ImageStates = None,
        encoder_attention_mask=None,
        labels: Optional[torch.Tensor] = None,
        return_logits: bool = False,
        is_decoder: bool = True,
        reduction: str = "none",
        mode: str = "multi_modal",
        soft_labels: Optional[torch.Tensor] = None,
        alpha: float = 0.0,
    ):
        out = self.bert(input_ids, attention_mask, None, encoder_hidden_states, encoder_attention_mask,
                        mode=mode, is_decoder=is_decoder)
        logits = self.cls(out.last_hidden_state)
        shifted = logits[:, :-1, :]
        if return_logits:
            return shifted
        loss = None
        if labels is not None:
            loss = losses.lm_sequence_loss(shifted, labels[:, 1:], soft_labels, alpha)
            if reduction == "mean":
                loss = loss.mean()
        return LMOutput(loss=loss, logits=logits)
