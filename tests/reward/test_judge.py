"""The judge: offline EM/F1, LLM grading over real HTTP, fallbacks (dead port, hang, garbage), cache."""

from __future__ import annotations

import socket
import time

import pytest

from agemem.reward.judge import Judge, parse_grade
from agemem.reward.metrics import exact_match, f1_score, normalize_answer
from agemem.settings import load_settings
from tests.fake_openai import FakeOpenAI


def _judge_for(base_url: str, runs_dir, **extra) -> Judge:
    judge_cfg = {"backend": "openai", "base_url": base_url, "api_key": "k", "model": "m", "timeout_s": 2.0,
                 "max_retries": 1, "backoff_s": 0.01, **extra}
    settings = load_settings("smoke", {"runs_dir": str(runs_dir), "judge": judge_cfg})
    return Judge.from_settings(settings)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_official_normalisation_and_metrics() -> None:
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert exact_match("the United States", "United States") == 1.0
    assert f1_score("yes", "no") == 0.0 and f1_score("no", "no") == 1.0
    assert f1_score("Edward Davis Wood Jr.", "Ed Wood") == pytest.approx(2 * (1 / 4) * (1 / 2) / (1 / 4 + 1 / 2))


@pytest.mark.parametrize(("text", "value"), [("0.8", 0.8), (" 1 ", 1.0), ("Score: 0.25", 0.25), ("0.5.", 0.5),
                                             ("1.5", None), ("about 0.5", None), ("", None), ("0.5 because", None)])
def test_strict_grade_parsing(text: str, value) -> None:
    assert parse_grade(text) == value


async def test_offline_backend_scores_f1() -> None:
    judge = Judge(None)
    s = await judge.score_answer("q", "Ed Wood", "Ed Wood")
    assert (s.score, s.em, s.f1, s.source, s.fallback) == (1.0, 1.0, 1.0, "offline", False)
    assert (await judge.score_answer("q", "yes", None)).source == "no_answer"
    assert (await judge.score_answer("q", None, "x")).source == "no_gold"


async def test_llm_grade_and_cache(fake_openai: FakeOpenAI, runs_dir) -> None:
    fake_openai.reply = "0.9"
    judge = _judge_for(fake_openai.base_url, runs_dir)
    s = await judge.score_answer("Who?", "Ed Wood", "Edward Wood")
    assert (s.score, s.source, s.fallback) == (0.9, "llm", False)
    assert "Edward Wood" in fake_openai.requests[0]["messages"][0]["content"]
    assert fake_openai.requests[0]["temperature"] == 0.0
    again = await judge.score_answer("Who?", "Ed Wood", "Edward Wood")
    assert again == s and fake_openai.count == 1


async def test_garbage_reply_is_retried_then_falls_back(fake_openai: FakeOpenAI, runs_dir) -> None:
    fake_openai.reply = "I think the answer is pretty good"
    judge = _judge_for(fake_openai.base_url, runs_dir, parse_retries=2)
    s = await judge.score_answer("q", "Ed Wood", "Ed Wood")
    assert fake_openai.count == 3
    assert (s.score, s.source, s.fallback) == (1.0, "fallback", True)
    assert "unparseable" in s.error


async def test_dead_endpoint_falls_back_fast(runs_dir) -> None:
    judge = _judge_for(f"http://127.0.0.1:{_closed_port()}/v1", runs_dir)
    start = time.perf_counter()
    s = await judge.score_answer("q", "Ed Wood", "Wood")
    assert s.fallback and s.source == "fallback" and s.score == pytest.approx(f1_score("Wood", "Ed Wood"))
    assert time.perf_counter() - start < 10


async def test_hanging_endpoint_times_out_and_falls_back(fake_openai: FakeOpenAI, runs_dir) -> None:
    fake_openai.delay_s = 30
    judge = _judge_for(fake_openai.base_url, runs_dir, timeout_s=0.3, max_retries=0)
    start = time.perf_counter()
    s = await judge.score_answer("q", "Ed Wood", "Ed Wood")
    assert s.fallback and s.score == 1.0
    assert time.perf_counter() - start < 5


async def test_memory_quality_offline_by_embeddings(embed) -> None:
    judge = Judge(None, encode=embed)
    gold = ["Scott Derrickson (born July 16, 1966) is an American director, screenwriter and producer.",
            "Edward Davis Wood Jr. was an American filmmaker, actor, writer, producer, and director."]
    good = await judge.memory_quality_report(gold, gold)
    assert good.score == pytest.approx(1.0) and good.source == "offline"
    half = await judge.memory_quality_report([gold[0], "I like cake recipes with chocolate."], gold)
    assert half.recall == 0.5 and half.precision == 0.5
    assert await judge.memory_quality([], gold) == 0.0


async def test_memory_quality_llm_and_fallback(fake_openai: FakeOpenAI, runs_dir, embed) -> None:
    fake_openai.reply = "0.7"
    judge = _judge_for(fake_openai.base_url, runs_dir)
    judge._encode = embed
    r = await judge.memory_quality_report(["a fact"], ["a gold fact"])
    assert (r.score, r.source) == (0.7, "llm")
    fake_openai.reply = "nonsense"
    r = await judge.memory_quality_report(["a fact"], ["a gold fact"])
    assert r.fallback and r.source == "fallback"


async def test_dead_judge_trips_the_circuit_breaker_once(fake_openai: FakeOpenAI, runs_dir, caplog) -> None:
    """A judge that times out cost every question its timeouts and retries (about 4 minutes each with
    the defaults); after judge.breaker_failures failures in a row the rest is scored without it."""
    fake_openai.delay_s = 30
    judge = _judge_for(fake_openai.base_url, runs_dir, timeout_s=0.3, max_retries=0, breaker_failures=2)
    start = time.perf_counter()
    with caplog.at_level("WARNING"):
        scores = [await judge.score_answer(f"question {i}?", "Ed Wood", "Ed Wood") for i in range(6)]
        quality = await judge.memory_quality_report(["a fact"], ["a gold fact"]) if judge._encode else None
    assert fake_openai.count == 2  # only the two calls that tripped it
    assert all(s.fallback and s.source == "fallback" and s.score == 1.0 for s in scores)
    assert "circuit open" in scores[-1].error and judge.short_circuited >= 4 and judge.breaker_open
    assert quality is None or quality.fallback
    assert caplog.text.count("failed 2 times in a row") == 1
    assert time.perf_counter() - start < 5


async def test_a_success_resets_the_breaker(fake_openai: FakeOpenAI, runs_dir) -> None:
    from tests.fake_openai import Reply

    calls = {"n": 0}

    def flaky(_: dict) -> Reply:
        calls["n"] += 1
        return Reply(status=500) if calls["n"] % 2 else Reply(text="0.5")

    fake_openai.reply = flaky
    judge = _judge_for(fake_openai.base_url, runs_dir, max_retries=0, breaker_failures=2)
    scores = [await judge.score_answer(f"q{i}", "Ed Wood", "Edward") for i in range(6)]
    assert not judge.breaker_open and fake_openai.count == 6
    assert [s.source for s in scores] == ["fallback", "llm"] * 3
