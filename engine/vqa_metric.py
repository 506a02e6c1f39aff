"""The VQA accuracy of the official evaluation (GT-Vision-Lab VQA API, ``vqaEval.py``), locally.

A predicted answer scores ``min(#humans who gave it / 3, 1)``, averaged over the ten leave-one-out
subsets of the ten human answers (so 3 agreeing humans give 0.9, not 1.0); answers are compared
after the official normalisation: punctuation, number words -> digits, articles dropped,
contractions restored. Reported as percentages, overall and per answer type.

One deliberate difference, switchable with ``official_gt_rule``: the official script normalises
the *human* answers only by punctuation, and only when they disagree, because the official
annotation files are already normalised. Here the human answers get the same full normalisation
as the prediction by default, so raw ground truth (e.g. generated data, "two") still matches a
prediction "two" (normalised to "2"). On official annotations both rules give the same numbers
except in rare corner cases.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Collection, Mapping, Optional, Sequence

# Number words the official evaluation rewrites as digits ("none" counts as zero).
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
# Characters removed (next to a space, or when the text has a digit,digit group) or else replaced by a space.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
# The official pattern (its "(?!<=" is a typo for a look-behind, kept: it removes every period not
# followed by a digit).
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")

# Apostrophe-less spellings -> the official contraction (the official table, same entries).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


def process_punctuation(text: str) -> str:
    """Official punctuation rule: a mark next to a space (or any mark when the text contains a
    digit,digit group such as "1,000") is deleted, otherwise replaced by a space; then periods not
    followed by a digit are deleted."""
    out = text
    has_number_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or has_number_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def process_digit_article(text: str) -> str:
    """Official word rule: lower-case, number words -> digits, drop articles, restore contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """A predicted answer as the official evaluation compares it."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def _normalize_humans(answers: Sequence[str], official_gt_rule: bool) -> list[str]:
    answers = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if not official_gt_rule:
        return [normalize_answer(a) for a in answers]
    if len(set(answers)) > 1:  # the official script leaves unanimous answers untouched
        return [process_punctuation(a) for a in answers]
    return answers


def _score(predicted: str, humans: Sequence[str]) -> float:
    # Leaving out a matching answer leaves matches - 1 matches, leaving out another one leaves matches.
    matches = sum(h == predicted for h in humans)
    return sum(min(1.0, (matches - (h == predicted)) / 3.0) for h in humans) / len(humans)


def question_accuracy(prediction: str, human_answers: Sequence[str], official_gt_rule: bool = False) -> float:
    """Accuracy in [0, 1] of one prediction: mean over the leave-one-out subsets of the human
    answers of min(#matches in the subset / 3, 1)."""
    if not human_answers:
        raise ValueError("a question needs at least one human answer to be scored")
    return _score(normalize_answer(prediction), _normalize_humans(human_answers, official_gt_rule))


def best_achievable_accuracy(human_answers: Sequence[str], normalized_candidates: Collection[str],
                             official_gt_rule: bool = False) -> float:
    """The highest accuracy any candidate answer can reach; ``normalized_candidates`` holds the
    answer list passed through :func:`normalize_answer` (once, outside the per-question loop)."""
    humans = _normalize_humans(human_answers, official_gt_rule)
    return max((_score(h, humans) for h in set(humans) if h in normalized_candidates), default=0.0)


def vqa_accuracy(predictions: Mapping[int, str], ground_truth: Mapping[int, Sequence[str]],
                 answer_types: Optional[Mapping[int, str]] = None, official_gt_rule: bool = False,
                 digits: int = 2) -> dict[str, float]:
    """{'overall': %, '<answer type>': % ...} over the questions of ``predictions``.

    Every predicted question must have ground truth (a KeyError names the first that does not).
    """
    if not predictions:
        raise ValueError("no predictions to score")
    missing = [qid for qid in predictions if qid not in ground_truth]
    if missing:
        raise KeyError(f"{len(missing)} predicted question ids have no ground truth, e.g. {missing[0]}")
    scores: dict[int, float] = {
        qid: question_accuracy(answer, ground_truth[qid], official_gt_rule) for qid, answer in predictions.items()}
    result = {"overall": round(100.0 * sum(scores.values()) / len(scores), digits)}
    if answer_types:
        by_type: dict[str, list[float]] = defaultdict(list)
        for qid, score in scores.items():
            if qid in answer_types:
                by_type[answer_types[qid]].append(score)
        for kind, values in sorted(by_type.items()):
            result[kind] = round(100.0 * sum(values) / len(values), digits)
    return result
