"""Fixtures for the data tests (a pytest plugin listed in conftest.py); other areas reuse them.

* ``fake_openai``: a started :class:`tests.fake_openai.FakeOpenAI` (real HTTP on 127.0.0.1, OpenAI
  chat-completions protocol), stopped after the test. Point a client at it with
  ``load_settings("smoke", {"llm": fake_openai.llm_overrides(), ...})`` (or ``"judge": ...``) and
  script it with ``fake_openai.reply = fn``, ``.delay_s``, ``.fail_first``, ``.garbage``; read
  ``.count`` / ``.requests`` / ``.max_in_flight``. See tests/fake_openai.py.
* ``sample_rows``: the shipped HotpotQA sample as raw dicts (original shape).
* ``hub_shape``: a function converting one original-shape row to the hub's column shape.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator

import pytest

from agemem.assets import SAMPLE_DATA
from tests.fake_openai import FakeOpenAI


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="session")
def sample_rows() -> list[dict[str, Any]]:
    return json.loads(SAMPLE_DATA.read_text(encoding="utf-8"))


def to_hub_shape(row: dict[str, Any]) -> dict[str, Any]:
    """Original HotpotQA row -> the Hugging Face ``hotpot_qa`` column shape."""
    return {
        "id": row["_id"],
        "question": row["question"],
        "answer": row["answer"],
        "type": row["type"],
        "level": row["level"],
        "supporting_facts": {
            "title": [t for t, _ in row["supporting_facts"]],
            "sent_id": [int(i) for _, i in row["supporting_facts"]],
        },
        "context": {"title": [t for t, _ in row["context"]], "sentences": [s for _, s in row["context"]]},
    }


@pytest.fixture(scope="session")
def hub_shape() -> Callable[[dict[str, Any]], dict[str, Any]]:
    return to_hub_shape
