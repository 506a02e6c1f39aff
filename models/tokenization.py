"""Tokenizer with the original ViCHA/ALBEF convention: a single text is ``[CLS] pieces`` with no [SEP].

The original subclassed transformers' slow BertTokenizer to drop the trailing [SEP]. Here the
word-piece split comes from transformers' BertTokenizer (loaded from a folder holding
``vocab.txt`` or from a hub name) and the special tokens, truncation and padding are applied by
this wrapper, so the ids are exactly the original's:

* ``max_length=25, truncation=True`` keeps [CLS] + at most 24 word-pieces;
* a literal ``[SEP]`` inside a text stays one special token (VQA answers end with it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

# The real bert-base-uncased vocabulary ships with the repository (models/bert-base-uncased).
BUNDLED_BERT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bert-base-uncased")


@dataclass
class TokenBatch:
    """The two fields of a tokenised batch that every model reads."""

    input_ids: torch.Tensor  # (B, L) int64
    attention_mask: torch.Tensor  # (B, L) int64, 1 = real token

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TokenBatch":
        return TokenBatch(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.attention_mask.to(device, non_blocking=non_blocking),
        )

    def __getitem__(self, index) -> "TokenBatch":
        return TokenBatch(self.input_ids[index], self.attention_mask[index])

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class ViCHATokenizer:
    """Callable like a transformers tokenizer, returning :class:`TokenBatch`."""

    def __init__(self, hf_tokenizer, source: str = "") -> None:
        self.hf = hf_tokenizer
        self.source = source  # what it was built from (hub name or folder), for error messages
        self.pad_token_id: int = hf_tokenizer.pad_token_id
        self.cls_token_id: int = hf_tokenizer.cls_token_id
        self.sep_token_id: int = hf_tokenizer.sep_token_id
        self.mask_token_id: int = hf_tokenizer.mask_token_id
        self.unk_token_id: int = hf_tokenizer.unk_token_id
        self.vocab_size: int = len(hf_tokenizer)

    def __len__(self) -> int:
        return self.vocab_size

    def encode_pieces(self, texts: Sequence[str]) -> list[list[int]]:
        """Word-piece ids of each text, without any special token added."""
        return self.hf(list(texts), add_special_tokens=False)["input_ids"]

    def __call__(
        self,
        texts: str | Sequence[str],
        padding: str = "longest",
        truncation: bool = True,
        max_length: int | None = None,
        return_tensors: str = "pt",
    ) -> TokenBatch:
        if isinstance(texts, str):
            texts = [texts]
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        sequences = []
        for pieces in self.encode_pieces(texts):
            if truncation and max_length is not None:
                pieces = pieces[: max_length - 1]  # one slot is reserved for [CLS]
            sequences.append([self.cls_token_id] + pieces)
        width = max(len(s) for s in sequences) if padding == "longest" else max_length
        width = max(width, max(len(s) for s in sequences))
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return TokenBatch(ids, mask)

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)


def build_tokenizer(name_or_dir: str = "bert-base-uncased") -> ViCHATokenizer:
    """Load the WordPiece vocabulary from a local folder (``vocab.txt``) or a hub name.

    ``bert-base-uncased`` resolves to the bundled copy of its vocabulary, so it works offline.
    The vocabulary size is checked: transformers silently returns a near-empty tokenizer when a
    hub name cannot be reached, which would otherwise surface much later as a shape error.
    """
    from transformers import BertTokenizer

    source = name_or_dir
    if name_or_dir == "bert-base-uncased" and not os.path.isdir(name_or_dir):
        source = BUNDLED_BERT_DIR
    if os.path.isfile(source) and os.path.basename(source) == "vocab.txt":
        source = os.path.dirname(source)
    if os.path.isdir(source):
        vocab_file = os.path.join(source, "vocab.txt")
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"tokenizer folder {source!r} has no vocab.txt")
        with open(vocab_file, encoding="utf-8") as handle:
            expected = sum(1 for line in handle if line.rstrip("\n"))
        hf = BertTokenizer.from_pretrained(source, do_lower_case=True)
    else:
        hf = BertTokenizer.from_pretrained(source, do_lower_case=True)
        expected = None
    size = len(hf)
    if size < 10 or (expected is not None and size != expected):
        raise RuntimeError(
            f"tokenizer {name_or_dir!r} loaded {size} tokens"
            + (f" but vocab.txt lists {expected}" if expected is not None else "")
            + "; pass a folder that holds vocab.txt"
        )
    for token in ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"):
        if hf.convert_tokens_to_ids(token) in (None, hf.unk_token_id) and token != "[UNK]":
            raise RuntimeError(f"tokenizer {name_or_dir!r} has no {token} token")
    return ViCHATokenizer(hf, source=name_or_dir)
