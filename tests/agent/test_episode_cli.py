"""``agemem episode`` with a model: a checkpoint directory or an OpenAI-compatible endpoint plays."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from agemem.agent.prompts import episode_system_prompt
from agemem.cli import app
from agemem.settings import load_settings
from tests.fake_openai import FakeOpenAI


def _json(out: str) -> dict:
    return json.loads(out[out.index("{"):])


def test_episode_with_a_checkpoint_directory(tmp_path: Path) -> None:
    from agemem.train.models import materialise_tiny_model

    runs = tmp_path / "runs"
    sets = [f"runs_dir={runs}", "train.device=cpu", "train.tiny_hidden_size=32", "train.tiny_num_layers=1",
            "episode.max_turn_tokens=8", "episode.stage1_max_rounds=1", "episode.stage2_max_rounds=1",
            "episode.stage3_max_rounds=1", "data.distractor_messages=1"]
    model_dir = materialise_tiny_model(load_settings("smoke", {"runs_dir": str(runs)}), tmp_path / "tiny")
    res = CliRunner().invoke(app, ["episode", *[a for s in sets for a in ("--set", s)], "--model", str(model_dir),
                                   "--json"])
    assert res.exit_code == 0, res.output
    shown = _json(res.stdout)
    assert shown["policy"] == f"checkpoint:{model_dir} [RANDOM WEIGHTS]"
    assert shown["stats"]["total_rounds"] >= 2 and "penalty_no_answer" in shown["reward"]


def test_episode_with_an_endpoint_and_chat_with_it(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with FakeOpenAI(reply="<think>I know it.</think>\n<answer>Paris</answer>") as server:
        res = CliRunner().invoke(app, ["episode", "--set", f"runs_dir={runs}", "--policy-url", server.base_url,
                                       "--policy-model", "served", "--json"])
        assert res.exit_code == 0, res.output
        shown = _json(res.stdout)
        assert shown["policy"] == "openai:served" and shown["stats"]["final_answer"] == "Paris"
        first = server.requests[0]
        expected = episode_system_prompt(load_settings("smoke", {"runs_dir": str(runs)}).episode)
        assert first["model"] == "served" and first["messages"][0] == {"role": "system", "content": expected}

        # `agemem chat` against the same endpoint: the same system prompt (tool schemas included).
        seen = server.count
        chat = CliRunner().invoke(app, ["chat", "--set", f"runs_dir={runs}", "--base-url", server.base_url,
                                        "--model", "served", "--json", "-m", "capital of France?"])
        assert chat.exit_code == 0, chat.output
        turn = json.loads(chat.stdout.strip().splitlines()[-1])
        assert turn["reply"] == "Paris" and turn["answered"] and server.count == seen + 1
        messages = server.requests[-1]["messages"]
        assert messages[0] == {"role": "system", "content": expected} and messages[-1]["content"] == "capital of France?"

    bad = CliRunner().invoke(app, ["episode", "--set", f"runs_dir={runs}", "--policy", "openai", "--model", "m"])
    assert bad.exit_code == 2 and "base_url" in bad.output and "Traceback" not in bad.output
