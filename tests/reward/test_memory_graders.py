"""R_storage and R_relevance: shares of stored / retrieved memories, graded by the LLM judge over real HTTP
or by the offline approximation with the real embedding model; storing everything does not max them."""

from __future__ import annotations

import pytest

from agemem.reward.judge import Judge, parse_count
from agemem.settings import load_settings
from tests.fake_openai import FakeOpenAI

GOLD = ["Scott Derrickson (born July 16, 1966) is an American director, screenwriter and producer.",
        "Edward Davis Wood Jr. was an American filmmaker, actor, writer, producer, and director."]
RELEVANT = GOLD[0]
NOISE = ["The Eiffel Tower is in Paris.", "Bananas are rich in potassium.", "The 2014 World Cup was in Brazil."]


def _offline_judge(runs_dir) -> Judge:
    return Judge.from_settings(load_settings("smoke", {"runs_dir": str(runs_dir)}))


@pytest.mark.parametrize(("text", "most", "value"), [("2", 4, 0.5), (" 0 ", 3, 0.0), ("Count: 3", 3, 1.0),
                                                     ("5", 4, None), ("two", 4, None), ("0.5", 4, None)])
def test_strict_count_parsing(text: str, most: int, value) -> None:
    assert parse_count(text, most) == value


async def test_offline_storage_is_a_share_so_hoarding_scores_lower(runs_dir) -> None:
    judge = _offline_judge(runs_dir)
    focused = await judge.storage_quality([RELEVANT], "Were they American?", "yes", GOLD)
    hoarded = await judge.storage_quality([RELEVANT, *NOISE], "Were they American?", "yes", GOLD)
    assert (focused.score, focused.source) == (1.0, "offline")
    assert hoarded.score == pytest.approx(0.25) and hoarded.items == 4
    assert (await judge.storage_quality([], "q", "a", GOLD)).score == 0.0  # nothing stored, nothing earned


async def test_offline_relevance_counts_the_answer_and_gold_facts(runs_dir) -> None:
    judge = _offline_judge(runs_dir)
    by_answer = await judge.retrieval_relevance(["Ed Wood directed Plan 9.", NOISE[0]], "Who directed Plan 9?",
                                                "Ed Wood", [])
    assert by_answer.score == pytest.approx(0.5)
    assert (await judge.retrieval_relevance(NOISE, "Were they American?", "yes", GOLD)).score == 0.0


async def test_llm_graders_use_question_answer_and_sentences(fake_openai: FakeOpenAI, runs_dir) -> None:
    settings = load_settings("smoke", {"runs_dir": str(runs_dir), "judge": {
        "backend": "openai", "base_url": fake_openai.base_url, "api_key": "k", "model": "m", "timeout_s": 2.0,
        "max_retries": 1, "backoff_s": 0.01}})
    judge = Judge.from_settings(settings)
    fake_openai.reply = "1"
    stored = await judge.storage_quality([RELEVANT, *NOISE], "Were they American?", "yes", GOLD)
    assert (stored.score, stored.source) == (0.25, "llm")
    prompt = fake_openai.requests[-1]["messages"][0]["content"]
    assert "Were they American?" in prompt and GOLD[1] in prompt and "4. The 2014 World Cup" in prompt
    fake_openai.reply = "0.7"
    relevance = await judge.retrieval_relevance([RELEVANT], "Were they American?", "yes", GOLD)
    assert (relevance.score, relevance.source) == (0.7, "llm")
    fake_openai.reply = "lots"  # unparseable: the offline share, flagged
    fallback = await judge.storage_quality([RELEVANT, *NOISE], "Were they American?", "yes", GOLD)
    assert fallback.fallback and fallback.source == "fallback" and fallback.score == pytest.approx(0.25)
