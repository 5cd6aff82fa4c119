"""``train.model`` as a GGUF file (or a folder holding one): resolution, and one real training step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from agemem.settings import Settings, load_settings
from agemem.train.models import ModelSourceError, gguf_source
from tests.fixtures_train import TINY_TRAIN

GGUF_RELATIVE = Path("models/smollm2-135m-instruct-gguf/SmolLM2-135M-Instruct.Q4_1.gguf")


def test_gguf_sources_resolve_to_folder_and_file(tmp_path: Path) -> None:
    single = tmp_path / "single"
    single.mkdir()
    (single / "m.Q4_1.gguf").write_bytes(b"GGUF")
    assert gguf_source(str(single / "m.Q4_1.gguf")) == (str(single), "m.Q4_1.gguf")
    assert gguf_source(str(single)) == (str(single), "m.Q4_1.gguf")

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "other.gguf").write_bytes(b"GGUF")
    assert gguf_source(str(hf)) is None  # an HF model directory wins
    assert gguf_source("tiny-random-qwen2") is None and gguf_source("Qwen/Qwen2.5-7B-Instruct") is None

    several = tmp_path / "several"
    several.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (several / name).write_bytes(b"GGUF")
    with pytest.raises(ModelSourceError, match=r"2 \.gguf files \(a\.gguf, b\.gguf\)"):
        gguf_source(str(several))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="not a .gguf"):
        gguf_source(str(tmp_path / "weights.bin"))


@pytest.mark.slow
def test_one_training_step_from_the_smollm2_gguf(shared_dir: Path, runs_dir: Path, episodes_file: Path) -> None:
    from agemem.eval.policies import load_checkpoint_model
    from agemem.train.local import train_local
    from agemem.train.models import load_tokenizer

    gguf = shared_dir / GGUF_RELATIVE
    if not gguf.is_file():
        pytest.skip(f"{gguf} is not in the shared folder")
    train = {**TINY_TRAIN["train"], "model": str(gguf.parent), "total_steps": 1, "tasks_per_batch": 1,
             "lr": 1e-3}
    settings: Settings = load_settings("smoke", {**TINY_TRAIN, "train": train, "runs_dir": str(runs_dir)})

    tokenizer = load_tokenizer(settings)
    # The GGUF's own eos (<|im_end|>, id 2) ends a turn, not the bos transformers' conversion reports.
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None

    result = train_local(settings, episodes_file)
    assert result.steps == 1
    metrics = result.history[0]
    assert math.isfinite(metrics["train/loss"]) and metrics["train/model_tokens"] > 0

    # Checkpoints are plain HF: a Llama config beside the tokenizer, the base recorded for evaluation.
    config = json.loads((result.checkpoint_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (result.checkpoint_dir / "tokenizer_config.json").is_file()
    adapter_config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(gguf)
    assert str(gguf.parent) in (result.checkpoint_dir.parent / "README.md").read_text()

    # Evaluation rebuilds the recorded GGUF base under the adapter, even with train.model left at the
    # default: it matches the merged model saved beside it.
    eval_settings = load_settings("smoke", {"runs_dir": str(runs_dir)})
    rebuilt, _ = load_checkpoint_model(eval_settings, result.adapter_dir, "cpu")
    merged, merged_tok = load_checkpoint_model(eval_settings, result.checkpoint_dir, "cpu")
    ids = torch.tensor([merged_tok.encode("Scott Derrickson directed Doctor Strange.")])
    with torch.no_grad():
        assert torch.allclose(rebuilt(ids).logits, merged(ids).logits, atol=1e-3)
