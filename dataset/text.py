"""Text cleaning applied to captions, sentences, expressions and VQA questions (spec pipeline §4.4)."""

from __future__ import annotations

import re

# Characters deleted outright before anything else: , . ' ! ? " ( ) * # : ; ~
_DELETE = str.maketrans("", "", ",.'!?\"()*#:;~")
_MULTI_SPACE = re.compile(r"\s{2,}")


def _strip_common(text: str) -> str:
    """Lower-case, drop the punctuation set, turn '-' and '/' into spaces."""
    return text.lower().translate(_DELETE).replace("-", " ").replace("/", " ")


def _truncate(text: str, max_words: int) -> str:
    words = text.split(" ")
    if len(words) > max_words:
        return " ".join(words[:max_words])
    return text


def pre_caption(text: str, max_words: int) -> str:
    """Clean a caption/sentence/referring expression and keep its first `max_words` words.

    Runs of two or more whitespace characters collapse to one space and both ends are stripped,
    so the result splits cleanly on single spaces.
    """
    text = _strip_common(text).replace("<person>", "person")
    text = _MULTI_SPACE.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    return _truncate(text, max_words)


def pre_question(text: str, max_words: int) -> str:
    """Clean a VQA question: like `pre_caption` but only trailing spaces are stripped.

    The original does not collapse whitespace, strip leading spaces or rewrite `<person>` for
    questions; keeping that difference keeps the tokenised questions identical.
    """
    text = _strip_common(text).rstrip(" ")
    return _truncate(text, max_words)
