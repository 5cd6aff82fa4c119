"""Answer metrics with the official HotpotQA normalisation (``hotpot_evaluate_v1.py``)."""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_SPECIAL = ("yes", "no", "noanswer")


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and articles, collapse whitespace (official HotpotQA)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str | None, gold: str | None) -> float:
    if prediction is None or gold is None:
        return 0.0
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str | None, gold: str | None) -> float:
    """Token F1; yes/no/noanswer must match exactly, as in the official script."""
    if prediction is None or gold is None:
        return 0.0
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if (pred in _SPECIAL or ref in _SPECIAL) and pred != ref:
        return 0.0
    pred_tokens, ref_tokens = pred.split(), ref.split()
    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_recall(needle: str, haystack_tokens: set[str]) -> float:
    """Share of ``needle``'s normalised tokens present in ``haystack_tokens`` (coverage checks)."""
    tokens = normalize_answer(needle).split()
    if not tokens:
        return 0.0
    return sum(t in haystack_tokens for t in tokens) / len(tokens)


def coverage(sentences: list[str], texts: list[str], threshold: float = 0.8) -> float | None:
    """Share of ``sentences`` whose tokens are (almost all) present in one of ``texts``; None if no sentences."""
    if not sentences:
        return None
    token_sets = [set(normalize_answer(t).split()) for t in texts]
    hits = 0
    for sentence in sentences:
        if any(token_recall(sentence, ts) >= threshold for ts in token_sets):
            hits += 1
    return hits / len(sentences)


__all__ = ["coverage", "exact_match", "f1_score", "normalize_answer", "token_recall"]
