"""The teacher warm start: teacher trajectories as token segments, rejection sampling, SFT, reuse."""

from __future__ import annotations

import json
from itertools import groupby
from pathlib import Path
from typing import Any

import pytest

from agemem.agent.episode import EpisodeEngine, EpisodeResult
from agemem.agent.parsing import parse_response
from agemem.agent.scripted import COMPACT, ScriptedChatPolicy, content_words, default_responses
from agemem.agent.stats import EpisodeStats
from agemem.settings import Settings, load_settings
from agemem.train.run import warm_start_dir
from agemem.train.sft import TeacherTrajectory, after_warm_start, select, teacher_style, warm_start


def retrieve_query(reply: str) -> str:
    """The query of the one Retrieve_memory call in a teacher reply, read by the agent's own parser."""
    parsed = parse_response(reply)
    assert not parsed.issues and [c.name for c in parsed.tool_calls] == ["Retrieve_memory"], parsed
    return parsed.tool_calls[0].arguments["query"]


@pytest.fixture
def warm_settings(tiny_train_settings: Settings) -> Settings:
    episode = tiny_train_settings.episode.model_copy(update={"max_turn_tokens": 96, "max_context_tokens": 4096,
                                                             "stage1_max_rounds": 2})
    warm = tiny_train_settings.warm_start.model_copy(update={"enabled": True, "style": "compact", "epochs": 4,
                                                             "lr": 1e-2, "min_score": -10.0})
    train = tiny_train_settings.train.model_copy(update={"lora_rank": 0})
    return tiny_train_settings.model_copy(update={"episode": episode, "warm_start": warm, "train": train})


async def test_teacher_replies_become_model_tokens_and_injections_stay_masked(
    warm_settings: Settings, train_scripts: list[Any], chat_tokenizer: Any, embed: Any
) -> None:
    engine = EpisodeEngine.from_settings(warm_settings, tokenizer=chat_tokenizer, encode=embed)
    script = train_scripts[0]
    try:
        result = await engine.run_teacher(script, ScriptedChatPolicy(script, default_responses(script, COMPACT)))
    finally:
        await engine.aclose()
    replies = [t["content"] for t in result.transcript if t["role"] == "assistant"]
    decoded = []
    for seg in result.segments:
        pos = 0
        for mask, run in groupby(seg.response_mask):
            n = len(list(run))
            text = chat_tokenizer.decode(seg.response_ids[pos:pos + n], skip_special_tokens=True)
            if mask:
                decoded.append(text)
            else:
                assert "<think>" not in text  # injected turns (stage messages, tool results) are never trained
            pos += n
    assert decoded == replies and replies
    assert result.stats.tool_ok_counts.get("Add_memory", 0) >= 1 and result.stats.format_error_count == 0


def test_every_compact_teacher_reply_fits_the_smoke_turn_budget(pipeline_episodes: Any, chat_tokenizer: Any) -> None:
    # A reply cut at max_turn_tokens is malformed (dropped); the stage-3 query is the question's content
    # words, not the whole question (which made replies of up to 101 tokens and is what a small model
    # fails to copy).
    budget = load_settings("smoke").episode.max_turn_tokens
    for script in pipeline_episodes(2):
        responses = default_responses(script, COMPACT)
        replies = [r for rs in responses.values() for r in rs if isinstance(r, str)]
        longest = max(len(chat_tokenizer.encode(r)) for r in replies)
        assert longest < budget, (script.episode_id, longest)  # and room for <|im_end|>
        assert 0 < len(retrieve_query(responses[(3, 0)][0]).split()) <= 6


def test_the_compact_teachers_query_has_warm_start_query_words_content_words(pipeline_episodes: Any) -> None:
    script = pipeline_episodes(1)[0]
    for n in (2, 3):
        style = teacher_style(load_settings("smoke", {"warm_start": {"query_words": n}}).warm_start)
        query = retrieve_query(default_responses(script, style)[(3, 0)][0])
        assert query == content_words(script.question, n) and len(query.split()) == n
    with pytest.raises(ValueError, match="query_words"):
        load_settings("smoke", {"warm_start": {"query_words": 0}})


async def test_a_teacher_reply_cut_by_the_turn_budget_makes_its_trajectory_malformed(
    warm_settings: Settings, train_scripts: list[Any], chat_tokenizer: Any, embed: Any
) -> None:
    episode = warm_settings.episode.model_copy(update={"max_turn_tokens": 24})
    short = warm_settings.model_copy(update={"episode": episode})
    engine = EpisodeEngine.from_settings(short, tokenizer=chat_tokenizer, encode=embed)
    script = train_scripts[0]
    try:
        result = await engine.run_teacher(script, ScriptedChatPolicy(script, default_responses(script)))
    finally:
        await engine.aclose()
    trajectory = TeacherTrajectory(script, result, {"score": 10.0})
    assert trajectory.malformed and select([trajectory], short) == []


def test_rejection_sampling_keeps_what_reaches_the_threshold(warm_settings: Settings) -> None:
    def traj(score: float, judge: float, format_errors: int = 0) -> TeacherTrajectory:
        result = EpisodeResult("e", [], EpisodeStats(format_error_count=format_errors), [])
        return TeacherTrajectory(None, result, {"score": score, "judge_score": judge})  # type: ignore[arg-type]

    # The last one reaches every threshold but has a malformed reply: never a demonstration.
    items = [traj(-2.0, 0.0), traj(0.5, 0.9), traj(1.5, 0.2), traj(3.0, 1.0, format_errors=1)]
    by_reward = warm_settings.model_copy(update={"warm_start": warm_settings.warm_start.model_copy(
        update={"keep_metric": "reward", "min_score": 0.5})})
    by_judge = warm_settings.model_copy(update={"warm_start": warm_settings.warm_start.model_copy(
        update={"keep_metric": "judge_score", "min_score": 0.8})})
    assert [t.scores["score"] for t in select(items, by_reward)] == [0.5, 1.5]
    assert [t.scores["score"] for t in select(items, by_judge)] == [0.5]


def test_warm_start_trains_on_kept_trajectories_and_is_reused(warm_settings: Settings, episodes_file: Path) -> None:
    first = warm_start(warm_settings, episodes_file)
    assert first.model_dir is not None and (first.model_dir / "config.json").is_file()
    report = json.loads((first.model_dir.parent / "warm_start.json").read_text())
    assert report["kept"] == report["trajectories"] > 0 and report["model_tokens"] > 0
    losses = [e["sft/loss"] for e in report["epochs"]]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5
    # The random-weights label travels with the warm-started tiny model.
    assert json.loads((first.model_dir / "config.json").read_text())["agemem_random_weights"] is True
    stamp = (first.model_dir.parent / "warm_start.json").stat().st_mtime_ns
    again = warm_start(warm_settings, episodes_file)
    assert again.model_dir == first.model_dir
    assert (first.model_dir.parent / "warm_start.json").stat().st_mtime_ns == stamp  # reused, not retrained
    grpo = after_warm_start(warm_settings, first)
    assert grpo.train.model == str(first.model_dir) and not grpo.warm_start.enabled
    # A GRPO-only change (its learning rate, KL, group size) keeps the warm start; what shapes SFT does not.
    sweep = warm_settings.model_copy(update={"train": warm_settings.train.model_copy(
        update={"lr": 7e-4, "kl_coef": 0.5, "rollouts_per_prompt": 8})})
    assert warm_start_dir(sweep) == first.model_dir.parent
    reseeded = warm_settings.model_copy(update={"train": warm_settings.train.model_copy(update={"seed": 7})})
    assert warm_start_dir(reseeded) != first.model_dir.parent


def test_a_threshold_nothing_reaches_fails_with_one_clear_line(warm_settings: Settings, episodes_file: Path) -> None:
    strict = warm_settings.model_copy(update={"warm_start": warm_settings.warm_start.model_copy(
        update={"min_score": 100.0})})
    with pytest.raises(RuntimeError, match="kept no teacher trajectory.*lower warm_start.min_score"):
        warm_start(strict, episodes_file)
