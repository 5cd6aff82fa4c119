"""GRPO after the teacher warm start raises the training reward (slow: a real warm start and GRPO run).

A fixed seed, the tiny model warm-started on the compact scripted teacher, then local GRPO on short
episodes (stage 1: one round, no distractors, stage 3: two rounds, temperature 1.0). The warm start
is deliberately short (3 epochs): it teaches the format half-way, so about half the first rollouts
end unanswered and GRPO has room to raise the reward (after 8 epochs the rollouts start near this
model's ceiling, and 8 steps at lr 2e-4 measured -0.33: nothing left to learn, which says nothing
about the trainer). Rollouts are seeded per trajectory and memory-id aliases keep random store ids
out of the prompts, so the real and flipped runs share their first step. Something still varies
between runs (most likely the batch composition of decoding): three runs of this same code measured
+0.79 (-1.07 -> +0.34), +0.87 and +0.27 for the reward of the last two of 8 steps over that of the
first two. The same run with the advantage sign flipped measured -0.34 (the reward falls to -1.75
and stays there), and -1.03 with a longer warm start. The margin, 0.1, lies between
them with room on both sides: the test tells a learning trainer from a broken one.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest

from agemem.data.episodes_io import write_episodes
from agemem.data.samples import sample_episodes
from agemem.settings import Settings, load_settings
from agemem.train import grpo
from agemem.train.local import train_local
from agemem.train.sft import after_warm_start, warm_start

pytestmark = pytest.mark.slow

STEPS = 8
MARGIN = 0.1


@pytest.fixture(scope="module")
def learning_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Path, Any]:
    runs = tmp_path_factory.mktemp("learning")
    settings = load_settings("smoke", {
        "runs_dir": str(runs),
        "data": {"limit": 16, "distractor_messages": 0},
        # Aliases (the default, pinned here): without them the store's random memory ids reach the
        # prompts and the run is not the same twice (measured gains +0.52, +0.19 and more on one seed).
        "episode": {"enable_stage2": False, "stage1_max_rounds": 1, "stage3_max_rounds": 2, "temperature": 1.0,
                    "alias_memory_ids": True},
        "train": {"lora_rank": 0, "lr": 2e-3, "kl_coef": 0.0, "norm_adv_by_std": True, "tasks_per_batch": 2,
                  "rollouts_per_prompt": 6, "total_steps": STEPS, "device": "cpu", "seed": 7},
        "warm_start": {"epochs": 3, "lr": 3e-3, "batch_segments": 1, "min_score": -10.0},
    })
    episodes = runs / "episodes.jsonl"
    write_episodes([e for e in sample_episodes(settings) if e.split == "train"], episodes)
    return settings, episodes, warm_start(settings, episodes)


def reward_gain(settings: Settings, episodes: Path, warm: Any, output_dir: Path) -> float:
    grpo_settings = after_warm_start(settings, warm)
    grpo_settings = grpo_settings.model_copy(update={"train": grpo_settings.train.model_copy(
        update={"output_dir": output_dir})})
    history = train_local(grpo_settings, episodes).history
    rewards = [h["reward/mean"] for h in history]
    return statistics.fmean(rewards[-2:]) - statistics.fmean(rewards[:2])


def test_grpo_after_the_warm_start_raises_the_training_reward(learning_run: tuple[Settings, Path, Any],
                                                              tmp_path: Path) -> None:
    settings, episodes, warm = learning_run
    assert reward_gain(settings, episodes, warm, tmp_path / "grpo") > MARGIN


def test_a_flipped_advantage_sign_does_not_pass_that_check(learning_run: tuple[Settings, Path, Any], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    settings, episodes, warm = learning_run
    real = grpo.trajectory_advantages
    monkeypatch.setattr(grpo, "trajectory_advantages",
                        lambda rewards, groups, **kw: [-a for a in real(rewards, groups, **kw)])
    assert reward_gain(settings, episodes, warm, tmp_path / "flipped") <= MARGIN
