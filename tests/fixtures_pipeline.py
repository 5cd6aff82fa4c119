"""Fixtures for the pipeline tests (a pytest plugin listed in conftest.py).

* ``prefect_harness``: ONE session-scoped ``prefect_test_harness`` (a temporary Prefect database
  and API; each harness costs ~10 s, so every pipeline test shares this one).
* ``tiny_adapter``: a function writing a real PEFT LoRA adapter (and the merged HF model) of a
  tiny Qwen2 into a directory; ``seed`` changes the weights and therefore the content hash.
* ``tracking_settings``: smoke settings with a fresh sqlite MLflow store under the test's runs dir.
* ``tiny_pipeline_overrides``: the flows' ``overrides`` list for a fast pipeline (TINY_TRAIN's
  model and episodes, 4 records, 2 eval questions) under the test's runs dir; ``as_pairs`` turns
  a nested settings dict into such a list.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import pytest

from agemem.settings import Settings, load_settings


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_tiny_adapter(directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """A real LoRA adapter + merged model of a 2-layer Qwen2 with a 128-token vocabulary."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    base = Qwen2ForCausalLM(config)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    adapter, merged = directory / "adapter", directory / "model"
    model.save_pretrained(adapter)
    model.merge_and_unload().save_pretrained(merged)
    return adapter, merged


@pytest.fixture
def tiny_adapter() -> Callable[[Path, int], tuple[Path, Path]]:
    return write_tiny_adapter


@pytest.fixture
def tracking_settings(runs_dir: Path) -> Settings:
    return load_settings("smoke", {"runs_dir": str(runs_dir)})


def as_pairs(nested: dict, prefix: str = "") -> list[str]:
    """``{"train": {"lr": 0.1}}`` -> ``["train.lr=0.1"]`` (the flows' ``overrides`` parameter)."""
    import json

    pairs: list[str] = []
    for key, value in nested.items():
        if isinstance(value, dict):
            pairs += as_pairs(value, f"{prefix}{key}.")
        else:
            pairs.append(f"{prefix}{key}={json.dumps(value) if not isinstance(value, str) else value}")
    return pairs


@pytest.fixture
def tiny_pipeline_overrides(runs_dir: Path) -> list[str]:
    """Overrides for a fast pipeline: TINY_TRAIN's model and episodes, 4 records, 2 eval questions.

    ``eval.split=all``: 4 records hold a single eval-split episode; the tests want two questions.
    """
    from tests.fixtures_train import TINY_TRAIN

    # The pipeline runs the warm start (one epoch, every teacher trajectory kept: 8-token turns cut its
    # replies) and the base / warm start / GRPO comparison, as the smoke profile does.
    return as_pairs(TINY_TRAIN) + [f"runs_dir={runs_dir}", "data.limit=4", "eval.limit=2", "eval.split=all",
                                   "eval.concurrency=2", "warm_start.enabled=true", "warm_start.epochs=1",
                                   "warm_start.min_score=-10", "warm_start.drop_malformed=false"]
