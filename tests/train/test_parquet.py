"""EpisodeScript -> verl parquet, read back by verl's own RLHFDataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from agemem.train.verl.rows import DATA_SOURCE, decode_script, read_verl_parquet, write_verl_parquet
from agemem.data.records import EpisodeScript
from agemem.assets import TOKENIZER_DIR
from agemem.agent.prompts import episode_system_prompt
from agemem.settings import load_settings

SMOKE_SYSTEM_PROMPT = episode_system_prompt(load_settings("smoke").episode)


def test_rows_carry_prompt_reward_model_script_and_agent_name(tmp_path: Path, train_scripts: list[EpisodeScript]) -> None:
    path = write_verl_parquet(train_scripts, tmp_path / "train.parquet", "staged_memory_agent", system_prompt="SYS")
    rows = read_verl_parquet(path)
    assert len(rows) == len(train_scripts)
    for i, (row, script) in enumerate(zip(rows, train_scripts)):
        assert row["data_source"] == DATA_SOURCE and row["agent_name"] == "staged_memory_agent"
        assert row["prompt"] == [{"role": "system", "content": "SYS"},
                                 {"role": "user", "content": script.stage1_turns[0]}]
        assert row["reward_model"] == {"style": "rule", "ground_truth": script.gold_answer}
        assert row["extra_info"]["index"] == i
        assert decode_script(row["extra_info"]) == script  # all three stages survive the round trip


def test_bad_input_is_rejected_clearly(tmp_path: Path, train_scripts: list[EpisodeScript]) -> None:
    with pytest.raises(ValueError, match="no episodes"):
        write_verl_parquet([], tmp_path / "x.parquet", system_prompt="SYS")
    with pytest.raises(ValueError, match="extra_info.script"):
        decode_script({"index": 0})
    with pytest.raises(ValueError, match="not a valid episode script"):
        decode_script({"script": "{not json"})
    assert not (tmp_path / "x.parquet").exists()


def test_verl_rlhf_dataset_reads_our_parquet(tmp_path: Path, train_scripts: list[EpisodeScript]) -> None:
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    path = write_verl_parquet(train_scripts, tmp_path / "train.parquet", system_prompt=SMOKE_SYSTEM_PROMPT)
    config = OmegaConf.create({"max_prompt_length": 8192, "filter_overlong_prompts": True, "truncation": "error",
                               "return_raw_chat": True, "prompt_key": "prompt", "dataloader_num_workers": 1,
                               "filter_overlong_prompts_workers": 1})
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    dataset = RLHFDataset(data_files=[str(path)], tokenizer=tokenizer, config=config)
    assert len(dataset) == len(train_scripts)
    item = dataset[1]
    assert item["agent_name"] == "staged_memory_agent"
    assert decode_script(item["extra_info"]) == train_scripts[1]
    assert item["raw_prompt"][1]["content"] == train_scripts[1].stage1_turns[0]
