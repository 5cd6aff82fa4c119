"""Fixtures for the agent tests (a pytest plugin listed in conftest.py)."""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np
import pytest

from agemem.assets import SAMPLE_DATA


@pytest.fixture(scope="session")
def sample_records() -> list[dict[str, Any]]:
    """The shipped HotpotQA dev sample as raw json records."""
    return json.loads(SAMPLE_DATA.read_text())


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


@pytest.fixture
def episode_script(sample_records):
    """Record 0 of the sample (Scott Derrickson / Ed Wood) with two offline distractors."""
    from agemem.agent.scripted import episode_from_raw

    return episode_from_raw(sample_records, 0, distractors=2)


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
