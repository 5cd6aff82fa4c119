"""Prefect cache keys come from the modules' own input hashes: every setting the output depends on
invalidates the cache (a second list of fields in flows/ once forgot ``llm.max_tokens``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agemem.train.run import config_hash, inputs_hash, warm_start_hash
from agemem.settings import load_settings
from tests.data.test_distractors import numbered_reply
from tests.fake_openai import FakeOpenAI
from tests.fixtures_pipeline import as_pairs


def test_llm_distractor_cache_follows_llm_max_tokens(prefect_harness: None, fake_openai: FakeOpenAI,
                                                     runs_dir: Path) -> None:
    from flows.data import prepare_data, synthesize_distractors

    fake_openai.reply = numbered_reply
    base = as_pairs({"data": {"limit": 2, "distractor_messages": 1, "distractor_backend": "llm"},
                     "llm": fake_openai.llm_overrides(max_retries=0)}) + [f"runs_dir={runs_dir}"]
    scripts = prepare_data("smoke", base)["scripts"]
    first = synthesize_distractors("smoke", base, scripts=scripts)
    again = synthesize_distractors("smoke", base, scripts=scripts)
    changed = synthesize_distractors("smoke", base + ["llm.max_tokens=64"], scripts=scripts)
    assert not first["cached"] and again["cached"]
    assert not changed["cached"], "a changed llm.max_tokens must not return the cached episodes"
    forced = synthesize_distractors("smoke", base, scripts=scripts, force=True)
    assert not forced["cached"], "--force must ignore the cache"


@pytest.mark.parametrize(("key", "value", "same_config"), [
    ("train.seed", 7, False), ("train.lr", 3e-4, False), ("train.lora_rank", 4, False),
    ("episode.max_turn_tokens", 12, False), ("judge.backend", "offline", True),
    ("train.total_steps", 9, True), ("train.keep_checkpoints", 1, True), ("train.torch_threads", 2, True),
])
def test_training_hashes_follow_what_shapes_training(key: str, value: object, same_config: bool) -> None:
    base = load_settings("smoke")
    other = load_settings("smoke", [f"{key}={value}"])
    assert (config_hash(other) == config_hash(base)) is same_config
    # The finished-result key also follows the step count.
    assert (inputs_hash(other) == inputs_hash(base)) is (same_config and key != "train.total_steps")


@pytest.mark.parametrize(("key", "value", "same_warm_start"), [
    ("warm_start.epochs", 3, False), ("warm_start.lr", 1e-3, False), ("train.tiny_hidden_size", 32, False),
    ("warm_start.torch_threads", 1, True), ("train.lr", 3e-4, True),
])
def test_warm_start_hash_follows_what_shapes_the_warm_start(key: str, value: object, same_warm_start: bool) -> None:
    assert (warm_start_hash(load_settings("smoke", [f"{key}={value}"])) == warm_start_hash(load_settings("smoke"))) \
        is same_warm_start
