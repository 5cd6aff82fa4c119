"""Shared test setup. Area fixtures live in tests/fixtures_<area>.py (pytest plugins below)."""

from __future__ import annotations

import os
from pathlib import Path

# Before any library import: no hub look-ups (they fail only after 23-69 s here), no analytics.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_DISABLE_DASHBOARD", "1")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
for _key in [k for k in os.environ if k.startswith("AGEMEM_")]:
    del os.environ[_key]  # a developer's shell must not change what the tests see
os.environ.pop("DASHSCOPE_API_KEY", None)

import pytest  # noqa: E402

from agemem.settings import Settings, load_settings  # noqa: E402

pytest_plugins = [
    "tests.fixtures_data",
    "tests.fixtures_memory",
    "tests.fixtures_agent",
    "tests.fixtures_train",
    "tests.fixtures_pipeline",
]

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    return path


@pytest.fixture
def smoke_settings(runs_dir: Path) -> Settings:
    """The smoke profile with every output under a fresh temporary runs dir."""
    return load_settings("smoke", {"runs_dir": str(runs_dir)})


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the checkout (real HotpotQA train sample, tokenizers, GGUF model)."""
    if not SHARED.exists():
        pytest.skip("../shared is not beside this checkout")
    return SHARED
