"""Kept teacher trajectories as verl multi-turn SFT data, read back by verl's own MultiTurnSFTDataset."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from agemem.assets import TOKENIZER_DIR
from agemem.settings import Settings, load_settings
from agemem.train.sft import collect
from agemem.train.verl.config import verl_config_dir
from agemem.train.verl.sft import sft_overrides, sft_rows, write_sft_parquet


def _teacher(settings: Settings, scripts: list[Any]) -> list[Any]:
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    return asyncio.run(collect(settings, scripts, tokenizer))


def test_export_reads_back_with_loss_on_exactly_the_assistant_turns(tiny_train_settings: Settings,
                                                                    train_scripts: list[Any], tmp_path: Path) -> None:
    from verl.utils.dataset.multiturn_sft_dataset import MultiTurnSFTDataset

    settings = tiny_train_settings.model_copy(update={"episode": tiny_train_settings.episode.model_copy(
        update={"max_turn_tokens": 96, "max_context_tokens": 4096, "stage1_max_rounds": 2})})
    trajectories = _teacher(settings, train_scripts[:2])
    path = write_sft_parquet(trajectories, tmp_path / "sft.parquet")
    rows = sft_rows(trajectories)
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    config = OmegaConf.create({"max_length": 8192, "truncation": "error", "messages_key": "messages",
                               "pad_mode": "no_padding"})
    dataset = MultiTurnSFTDataset(str(path), tokenizer, config)  # its sanity check: per-turn == whole render
    assert len(dataset) == len(rows) > 0
    for i, row in enumerate(rows):
        item = dataset[i]
        trained = tokenizer.decode(item["input_ids"][item["loss_mask"].bool()])
        replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        # Loss on the assistant turns and their end-of-turn token, nothing else (no tool result, no user turn).
        assert trained.replace("<|im_end|>\n", "\x00").split("\x00")[:-1] == replies
        assert int(item["loss_mask"].sum()) < int(torch.numel(item["loss_mask"]))


def test_sft_overrides_compose_with_verls_sft_config(tmp_path: Path) -> None:
    settings = load_settings("paper", {"runs_dir": str(tmp_path)})
    overrides = sft_overrides(settings, tmp_path / "sft.parquet", "Qwen/Qwen2.5-7B-Instruct", tmp_path / "out")
    with initialize_config_dir(config_dir=str(verl_config_dir()), version_base=None):
        cfg = compose(config_name="sft_trainer_engine", overrides=overrides)
    assert cfg.model.lora_rank == settings.train.lora_rank and cfg.optim.lr == settings.warm_start.lr
    assert cfg.data.max_length >= settings.episode.max_context_tokens
    assert "hf_model" in cfg.checkpoint.save_contents
