"""Settings: profiles, precedence (overrides > env > profile > defaults), clear errors, masked secrets."""

from __future__ import annotations

import json
import logging

import pytest

from agemem.settings import PROFILES, load_settings, parse_overrides


def test_profiles_carry_the_reference_values() -> None:
    paper = load_settings("paper")
    assert paper.train.model == "Qwen/Qwen2.5-7B-Instruct"
    assert (paper.train.rollouts_per_prompt, paper.train.tasks_per_batch) == (8, 16)
    assert (paper.train.lora_rank, paper.train.lora_alpha, paper.train.lr) == (32, 32, 1e-5)
    assert paper.data.distractor_messages == 3
    assert paper.episode.stage1_max_rounds == paper.episode.stage2_max_rounds == paper.episode.stage3_max_rounds == 5
    assert (paper.episode.temperature, paper.episode.max_context_tokens) == (0.6, 8192)
    assert paper.episode.max_turn_tokens == 2048 and paper.train.max_response_length is None
    assert paper.response_budget == 8192 + 2048  # a segment holds the context plus a turn
    assert paper.train.n_gpus_per_node == 8
    smoke = load_settings("smoke")
    assert smoke.data.source == "sample" and smoke.train.backend == "local" and smoke.train.n_gpus_per_node == 0


def test_env_beats_profile_and_overrides_beat_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGEMEM_TRAIN__LR", "3e-5")
    monkeypatch.setenv("AGEMEM_PROFILE", "paper")
    s = load_settings()
    assert s.profile == "paper" and s.train.lr == 3e-5
    # Env changed one key of a section: the profile's other keys in that section survive.
    assert s.train.lora_rank == 32
    s = load_settings("smoke", ["train.lr=5e-5", "data.limit=3"])
    assert (s.profile, s.train.lr, s.data.limit) == ("smoke", 5e-5, 3)
    assert s.train.model == PROFILES["smoke"]["train"]["model"]


@pytest.mark.parametrize(
    ("override", "names"),
    [("train.lr=abc", "train.lr"), ("episode.temperature=-1", "episode.temperature"), ("nope.key=1", "nope")],
)
def test_malformed_value_names_the_key(override: str, names: str) -> None:
    with pytest.raises(ValueError, match=names.replace(".", r"\.")):
        load_settings("smoke", [override])


def test_malformed_env_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGEMEM_MEMORY__PORT", "not-a-port")
    with pytest.raises(ValueError, match=r"memory\.port"):
        load_settings("smoke")


def test_unknown_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="profile"):
        load_settings("huge")


def test_override_syntax_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="section.key=value"):
        parse_overrides(["train.lr"])
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_secrets_are_masked(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-very-secret")
    monkeypatch.setenv("AGEMEM_MEMORY__SERVER_TOKEN", "tok-very-secret")
    s = load_settings("paper")
    assert s.secret_for(s.llm) == "sk-very-secret"
    dumped = json.dumps(s.public_dict())
    with caplog.at_level(logging.INFO):
        logging.getLogger("agemem.test").info("settings %s %r", s, s)
    for text in (dumped, repr(s), caplog.text):
        assert "very-secret" not in text


def test_runs_dir_moves_every_default_path(tmp_path) -> None:
    s = load_settings("smoke", {"runs_dir": str(tmp_path)})
    assert s.path(s.data.output_dir) == tmp_path / "data"
    assert s.memory_uri == str(tmp_path / "memory.db")
    assert s.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.mark.parametrize("origin", ["flag", "env", ".env"])
def test_a_misspelt_key_is_refused_with_a_suggestion(origin: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Issue 14.2: ``train.lrr`` inside a valid section used to be accepted silently."""
    monkeypatch.chdir(tmp_path)
    overrides: list[str] = []
    if origin == "flag":
        overrides = ["train.lrr=1e-5"]
    elif origin == "env":
        monkeypatch.setenv("AGEMEM_TRAIN__LRR", "3")
    else:
        (tmp_path / ".env").write_text("AGEMEM_TRAIN__LRR=3\n")
    with pytest.raises(ValueError, match=r"unknown setting 'train\.lrr'.*did you mean 'train\.lr'"):
        load_settings("smoke", overrides)


def test_config_show_prints_values_with_their_source(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from typer.testing import CliRunner

    from agemem.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("AGEMEM_EVAL__LIMIT=3\n")
    monkeypatch.setenv("AGEMEM_TRAIN__LR", "3e-5")
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-very-secret")
    res = CliRunner().invoke(app, ["config", "show", "--profile", "smoke", "--set", "train.seed=7", "--json"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.output)
    assert shown["train.seed"] == {"value": 7, "source": "flag"}
    assert shown["train.lr"] == {"value": 3e-5, "source": "env"}
    assert shown["eval.limit"] == {"value": 3, "source": ".env"}
    assert shown["train.model"] == {"value": "tiny-random-qwen2", "source": "profile"}
    assert shown["memory.port"] == {"value": 8765, "source": "default"}
    assert shown["dashscope_api_key"]["source"] == "env" and "very-secret" not in res.output
    text = CliRunner().invoke(app, ["config", "show"]).output
    assert any(line.split()[:3] == ["train.lr", "3e-05", "env"] for line in text.splitlines()), text
    bad = CliRunner().invoke(app, ["config", "show", "--set", "train.lrr=1"])
    assert bad.exit_code == 2 and bad.output.strip() == (
        "error: unknown setting 'train.lrr' (--set); did you mean 'train.lr'?")


def test_config_keys_lists_every_key_with_its_description() -> None:
    from typer.testing import CliRunner

    from agemem.cli import app
    from agemem.settings import setting_keys

    res = CliRunner().invoke(app, ["config", "keys", "--json"])
    assert res.exit_code == 0 and json.loads(res.output) == setting_keys()
    assert all(setting_keys().values())  # every field is described
    text = CliRunner().invoke(app, ["config", "keys"]).output
    assert "tracking.crown_random_weights" in text and "train.lr " in text


def test_the_infra_scripts_variables_are_not_taken_for_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """infra/prefect/worker.sh exports AGEMEM_PROJECT_DIR; a flow run on that worker inherits it."""
    monkeypatch.setenv("AGEMEM_PROJECT_DIR", "/srv/agemem")
    monkeypatch.setenv("AGEMEM_WORK_POOL", "agemem-process")
    assert load_settings("smoke").profile == "smoke"
