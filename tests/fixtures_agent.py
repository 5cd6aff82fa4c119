"""Fixtures for the agent tests (a pytest plugin listed in conftest.py)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest



@pytest.fixture(scope="session")
def chat_tokenizer():
    """The shipped Qwen2.5 tokenizer wrapped for chat rendering (loaded once)."""
    from agemem.agent.context import ChatTokenizer
    from agemem.assets import TOKENIZER_DIR

    return ChatTokenizer.from_path(str(TOKENIZER_DIR))


@pytest.fixture(scope="session")
def embed() -> Callable[[list[str]], np.ndarray]:
    """The real bundled embedding model (normalised vectors)."""
    from agemem.memory.embedder import get_embedder

    embedder = get_embedder(None, "cpu")
    return embedder.encode


@pytest.fixture(scope="session")
def pipeline_episodes(tmp_path_factory) -> Callable[[int], list[Any]]:
    """``pipeline_episodes(n_distractors)``: every episode of the shipped sample, built the way the
    pipeline builds them (:func:`agemem.data.samples.sample_episodes`), cached per distractor count."""
    from agemem.data.samples import sample_episodes
    from agemem.settings import load_settings

    built: dict[int, list[Any]] = {}

    def make(distractors: int) -> list[Any]:
        if distractors not in built:
            settings = load_settings("smoke", {"runs_dir": str(tmp_path_factory.mktemp("samples")),
                                               "data": {"distractor_messages": distractors, "limit": None}})
            built[distractors] = sample_episodes(settings)
        return built[distractors]

    return make


@pytest.fixture
def episode_script(pipeline_episodes):
    """Record 0 of the sample (Scott Derrickson / Ed Wood) with two offline distractors."""
    return pipeline_episodes(2)[0]


@pytest.fixture
def agent_settings(runs_dir):
    """Smoke settings with room for the scripted agent's replies (its stage-1 reply is ~500 tokens)."""
    from agemem.settings import load_settings

    return load_settings("smoke", {
        "runs_dir": str(runs_dir),
        "memory": {"uri": str(runs_dir / "agent_memory.db")},
        "episode": {"max_turn_tokens": 1024, "max_context_tokens": 4096, "stage1_max_rounds": 4,
                    "stage2_max_rounds": 3, "stage3_max_rounds": 3},
    })


@pytest.fixture
def agent_memory(agent_settings):
    """A real in-process memory client over a milvus-lite file in tmp_path."""
    from agemem.memory.service import MemoryService

    service = MemoryService.from_settings(agent_settings)
    try:
        from agemem.memory.client import InProcessMemoryClient
    except ImportError:  # the client module lands separately; the service speaks the same protocol
        client = service
    else:
        client = InProcessMemoryClient(service)
    yield client
    service.close()
