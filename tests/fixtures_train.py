"""Fixtures for the train tests (a pytest plugin listed in conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from agemem.data.records import EpisodeScript
from agemem.settings import Settings, load_settings

# An even smaller run than the smoke profile: the tests check the mechanics, not learning.
TINY_TRAIN: dict[str, Any] = {
    "episode": {"max_context_tokens": 1024, "stage1_max_rounds": 1, "stage2_max_rounds": 1,
                "stage3_max_rounds": 1, "max_turn_tokens": 8},
    "train": {"tiny_hidden_size": 32, "tiny_num_layers": 1, "tasks_per_batch": 2, "rollouts_per_prompt": 2,
              "total_steps": 2, "lr": 1e-2, "kl_coef": 0.01, "lora_rank": 4, "lora_alpha": 8, "device": "cpu"},
    "data": {"distractor_messages": 1},
    # The trainer tests check GRPO's mechanics from the base model; the warm start has its own tests.
    "warm_start": {"enabled": False},
}


@pytest.fixture
def train_scripts(pipeline_episodes) -> list[EpisodeScript]:
    """Three real HotpotQA episodes of the train split with offline distractors (no LLM)."""
    return [e for e in pipeline_episodes(1) if e.split == "train"][:3]


@pytest.fixture
def episodes_file(tmp_path: Path, train_scripts: list[EpisodeScript]) -> Path:
    from agemem.data.episodes_io import write_episodes

    path = tmp_path / "episodes.jsonl"
    write_episodes(train_scripts, path)
    return path


@pytest.fixture
def tiny_train_settings(runs_dir: Path) -> Settings:
    """The smoke profile shrunk further (1-layer 32-wide random Qwen2, 8-token turns)."""
    return load_settings("smoke", {**TINY_TRAIN, "runs_dir": str(runs_dir)})


@dataclass
class RunningToolServer:
    url: str
    service: Any
    settings: Settings


@pytest.fixture
def train_tool_server(runs_dir: Path) -> Iterator[RunningToolServer]:
    """The real memory tool server (FastAPI + milvus-lite in tmp) served by uvicorn on 127.0.0.1."""
    from tests.fixtures_memory import serve_in_thread

    settings = load_settings("smoke", {"runs_dir": str(runs_dir)})
    url, server, thread, service = serve_in_thread(settings)
    try:
        yield RunningToolServer(url, service, settings)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        service.close()
