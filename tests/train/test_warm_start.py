"""The teacher warm start: teacher trajectories as token segments, rejection sampling, SFT, reuse."""

from __future__ import annotations

import json
from itertools import groupby
from pathlib import Path
from typing import Any

import pytest

from agemem.agent.episode import EpisodeEngine
from agemem.agent.scripted import COMPACT, ScriptedChatPolicy, default_responses
from agemem.settings import Settings
from agemem.train.sft import TeacherTrajectory, after_warm_start, select, warm_start


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


def test_rejection_sampling_keeps_what_reaches_the_threshold(warm_settings: Settings) -> None:
    def traj(score: float, judge: float) -> TeacherTrajectory:
        return TeacherTrajectory(None, None, {"score": score, "judge_score": judge})  # type: ignore[arg-type]

    items = [traj(-2.0, 0.0), traj(0.5, 0.9), traj(1.5, 0.2)]
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


def test_a_threshold_nothing_reaches_fails_with_one_clear_line(warm_settings: Settings, episodes_file: Path) -> None:
    strict = warm_settings.model_copy(update={"warm_start": warm_settings.warm_start.model_copy(
        update={"min_score": 100.0})})
    with pytest.raises(RuntimeError, match="kept no teacher trajectory.*lower warm_start.min_score"):
        warm_start(strict, episodes_file)
