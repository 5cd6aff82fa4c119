"""Our EM/F1 against the definitions of HotpotQA's official evaluation script, and the prediction
files ``agemem eval`` writes in that script's format.

The reference functions below are written here from the script's published definition (not copied):
normalisation = lower case, then drop every ``string.punctuation`` character, then replace the
whole words a/an/the by a space, then collapse whitespace; EM = equal normalised strings; F1 =
token F1 over the normalised tokens (multiset overlap), except that when either normalised side is
``yes``, ``no`` or ``noanswer`` and the two differ, F1 is 0; no overlap is 0. The script scores the
mean over its gold file, reading ``prediction["answer"][gold["_id"]]``.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agemem.eval.hotpot_format import GOLD_FILE, PREDICTIONS_FILE
from agemem.eval.runner import evaluate
from agemem.reward.metrics import exact_match, f1_score, normalize_answer
from agemem.settings import load_settings


_WORD_ARTICLE = re.compile(r"\b(?:a|an|the)\b")  # whole words, as the script's \b-delimited pattern


def ref_normalize(s: str) -> str:
    no_punct = s.lower().translate({ord(c): None for c in string.punctuation})
    no_articles = _WORD_ARTICLE.sub(" ", no_punct)
    return " ".join(no_articles.split())


def ref_em(pred: str, gold: str) -> float:
    return 1.0 if ref_normalize(pred) == ref_normalize(gold) else 0.0


def ref_f1(pred: str, gold: str) -> float:
    p, g = ref_normalize(pred), ref_normalize(gold)
    special = {"yes", "no", "noanswer"}
    if p != g and (p in special or g in special):
        return 0.0
    p_tokens, g_tokens = p.split(), g.split()
    remaining = list(g_tokens)
    overlap = 0
    for token in p_tokens:
        if token in remaining:
            remaining.remove(token)
            overlap += 1
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(p_tokens), overlap / len(g_tokens)
    return 2 * precision * recall / (precision + recall)


PAIRS = [
    ("yes", "yes"), ("Yes.", "yes"), ("no", "yes"), ("yes", "yes sir"), ("yes sir", "yes"),
    ("noanswer", "noanswer"), ("no answer", "noanswer"), ("No", "no way"), ("the no", "no"),
    ("The Beatles", "Beatles"), ("an apple a day", "apple day"), ("A", ""), ("", ""), ("", "Paris"),
    ("Paris, France", "paris"), ("Scott Derrickson", "Scott Derrickson"), ("Ed Wood", "Scott Derrickson"),
    ("1,200", "1200"), ("U.S.A.", "usa"), ("New  York\tCity", "new york city"), ("the the the", "the"),
    ("Théâtre de l'Odéon", "theatre de lodeon"), ("Zoë", "zoë"), ("well-known", "wellknown"),
    ("theatre", "the atre"), ("Anne Frank", "frank anne"), ("red red blue", "red blue blue"),
    ("Answer: 42", "42"), ("3 May 1990", "May 3, 1990"), ("an", "a"), ("Ananas", "ananas"),
    ("President Richard Nixon", "Richard Nixon"), ("Chicago Bulls", "Chicago Bulls basketball team"),
    ("—dash—", "dash"), ("über", "Über"), ("it's", "its"), ("A.B.C", "abc"), ("x " * 50, "x"),
]


@pytest.mark.parametrize(("pred", "gold"), PAIRS)
def test_em_and_f1_match_the_official_definitions(pred: str, gold: str) -> None:
    assert normalize_answer(pred) == ref_normalize(pred)
    assert exact_match(pred, gold) == ref_em(pred, gold)
    assert f1_score(pred, gold) == pytest.approx(ref_f1(pred, gold))


words = st.sampled_from(["a", "an", "the", "yes", "no", "noanswer", "Paris", "paris.", "New", "York", "1,200",
                         "U.S.", "it's", "—", "Zoë", "and", "of", "A", "The", "x"])
answers = st.lists(words, max_size=8).map(" ".join) | st.text(max_size=30)


@settings(max_examples=400, deadline=None)
@given(pred=answers, gold=answers)
def test_em_and_f1_match_on_generated_pairs(pred: str, gold: str) -> None:
    assert exact_match(pred, gold) == ref_em(pred, gold)
    assert f1_score(pred, gold) == pytest.approx(ref_f1(pred, gold))


def test_eval_writes_the_official_prediction_format_and_it_scores_as_we_do(pipeline_episodes, tmp_path: Path) -> None:
    from agemem.data.episodes_io import write_episodes

    scripts = [e.model_copy(update={"split": "eval"}) for e in pipeline_episodes(1)[:3]]
    scripts[0] = scripts[0].model_copy(update={"gold_answer": "Scott Derrickson"})
    path = tmp_path / "episodes.jsonl"
    write_episodes(scripts, path)
    s = load_settings("smoke", {
        "runs_dir": str(tmp_path / "runs"),
        "episode": {"max_turn_tokens": 1024, "max_context_tokens": 4096, "stage1_max_rounds": 4,
                    "stage2_max_rounds": 3, "stage3_max_rounds": 3},
        "eval": {"policy": "scripted", "limit": None, "concurrency": 2},
    })
    result = evaluate(s, path, output_dir=tmp_path / "out")
    prediction = json.loads((tmp_path / "out" / PREDICTIONS_FILE).read_text(encoding="utf-8"))
    gold = json.loads((tmp_path / "out" / GOLD_FILE).read_text(encoding="utf-8"))
    assert set(prediction) == {"answer", "sp"} and prediction["sp"] == {}
    assert [g["_id"] for g in gold] == [e.record_id for e in scripts] == list(prediction["answer"])
    assert gold[0]["answer"] == "Scott Derrickson" and all(len(f) == 2 for g in gold for f in g["supporting_facts"])
    # The official script's loop over its gold file, with the reference metrics.
    em = sum(ref_em(prediction["answer"][g["_id"]], g["answer"]) for g in gold) / len(gold)
    f1 = sum(ref_f1(prediction["answer"][g["_id"]], g["answer"]) for g in gold) / len(gold)
    assert em == pytest.approx(result.aggregates["em"]) and f1 == pytest.approx(result.aggregates["f1"])
    assert f1 > 0  # episode 0 overlaps, so the comparison is not 0 == 0
