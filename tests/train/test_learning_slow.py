"""GRPO after the teacher warm start raises the training reward (slow: a real warm start and GRPO run).

A fixed seed, the tiny model warm-started on the compact scripted teacher (3 epochs: it teaches the
format half-way, so about half the first rollouts end unanswered), then local GRPO on short episodes
(stage 1: one round, no distractors, stage 3: two rounds) at the smoke profile's temperature, 0.6,
with unscaled advantages. Every step trains on the same four tasks, so the reward moves with the
policy, not with which tasks a batch drew; step 1's rollouts come from the warm-started model and
are the baseline. Five seeds (two with 2 torch threads, as another machine sums floats) measured
gains of +1.00 to +1.95, and -1.00 to 0.00 with the advantage sign flipped: the margin, 0.5, lies
between them. Why this shape and not the first one (whose gain was the batch mix: -0.06 in CI):
benchmarks/README.md, "The slow learning test".
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

STEPS = 6
TASKS = 4
MARGIN = 0.5


@pytest.fixture(scope="module")
def learning_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Path, Any]:
    runs = tmp_path_factory.mktemp("learning")
    settings = load_settings("smoke", {
        "runs_dir": str(runs),
        "data": {"limit": 16, "distractor_messages": 0},
        # Aliases (the default, pinned here): without them the store's random memory ids reach the
        # prompts and the run is not the same twice (measured gains +0.52, +0.19 and more on one seed).
        "episode": {"enable_stage2": False, "stage1_max_rounds": 1, "stage3_max_rounds": 2, "temperature": 0.6,
                    "alias_memory_ids": True},
        # The model these margins were measured on (the smoke profile's until 2026-12-08).
        "train": {"tiny_hidden_size": 64, "tiny_num_layers": 2, "lora_rank": 0, "lr": 1e-3, "kl_coef": 0.0,
                  "norm_adv_by_std": False, "tasks_per_batch": TASKS, "rollouts_per_prompt": 4, "total_steps": STEPS,
                  "device": "cpu", "seed": 7},
        "warm_start": {"epochs": 3, "lr": 3e-3, "batch_segments": 1, "min_score": -10.0},
    })
    train = [e for e in sample_episodes(settings) if e.split == "train"]
    teacher_episodes, grpo_episodes = runs / "episodes.jsonl", runs / "grpo_episodes.jsonl"
    write_episodes(train, teacher_episodes)
    # tasks_per_batch == len(file): every step's batch is these same tasks.
    write_episodes(train[:TASKS], grpo_episodes)
    return settings, grpo_episodes, warm_start(settings, teacher_episodes)


def reward_gain(settings: Settings, episodes: Path, warm: Any, output_dir: Path) -> float:
    grpo_settings = after_warm_start(settings, warm)
    grpo_settings = grpo_settings.model_copy(update={"train": grpo_settings.train.model_copy(
        update={"output_dir": output_dir})})
    history = train_local(grpo_settings, episodes).history
    rewards = [h["reward/mean"] for h in history]
    return statistics.fmean(rewards[-2:]) - rewards[0]


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
