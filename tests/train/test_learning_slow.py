"""GRPO after the teacher warm start raises the training reward (slow: a real warm start and GRPO run).

A fixed seed, the tiny model warm-started on the compact scripted teacher (3 epochs: it teaches the
format half-way, so about half the first rollouts end unanswered), then local GRPO on short episodes
(stage 1: one round, no distractors, stage 3: two rounds) at the smoke profile's temperature, 0.6.
Every step trains on the same four tasks, so the reward it measures moves with the policy and not
with which tasks the batch drew; step 1's rollouts come from the warm-started model, before any
update, and are the baseline. The gain is the mean reward of the last two steps over step 1's.

Why this shape (measured, dev runs on this sample): the first version of this test drew two new
tasks a step at temperature 1.0 and lr 2e-3 with std-normalised advantages. Its gain was mostly the
batch mix: +0.79, +0.87, +0.27, +0.28 and -0.06 (a CI run) on the same seed; on two fixed tasks the
same trainer gained nothing in 8 steps. At temperature 1.0 the tiny model samples near-uniform
tokens (entropy 8.4 nats a token) and learns little; at 0.6 (entropy 0.4) it learns the format in
two steps. With std-normalised advantages the reward then collapses again at steps 7-8 (-0.99 and
-1.49 at lr 5e-4 and 2e-3): once every rollout answers, (r - mean) / std blows reward differences of
0.001 up to unit advantages. Unscaled advantages (Dr. GRPO, the smoke profile's) stay at the ceiling.
This configuration, for train seeds 7, 1, 2, 3 and 11 (the last two with 2 torch threads, which
changes the float sums the way another machine does): gains +1.00, +1.38, +1.44, +1.63 and +1.95;
with the advantage sign flipped -1.00, -0.61, -0.00, -0.25 and -0.00 (the reward falls to the -1.74
floor, or stays there when the warm start never answers). The margin, 0.5, lies between them with
room on both sides: the test tells a learning trainer from a broken one.
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
        "train": {"lora_rank": 0, "lr": 1e-3, "kl_coef": 0.0, "norm_adv_by_std": False, "tasks_per_batch": TASKS,
                  "rollouts_per_prompt": 4, "total_steps": STEPS, "device": "cpu", "seed": 7},
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
