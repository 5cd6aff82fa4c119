"""verl configuration: overrides compose against verl's own ppo_trainer (no GPU needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from omegaconf import OmegaConf
from typer.testing import CliRunner

from agemem.settings import load_settings
from agemem.train.verl import config as verl_config
from agemem.cli.train import train
from agemem.train.verl.launch import plan_paths, ray_submit_command


@pytest.fixture(scope="module")
def paper_cfg(tmp_path_factory: pytest.TempPathFactory):
    runs = tmp_path_factory.mktemp("runs")
    settings = load_settings("paper", {"runs_dir": str(runs)})
    overrides = verl_config.build_overrides(settings, plan_paths(settings))
    env = verl_config.ray_runtime_env(settings, memory_server_url="http://127.0.0.1:9", mlflow_run_id="run123")
    cfg = verl_config.compose(overrides + verl_config.runtime_env_overrides(env))
    return settings, cfg


def test_paper_profile_composes_with_the_values_we_rely_on(paper_cfg) -> None:
    settings, cfg = paper_cfg
    verl_config.check_composed(cfg)
    arr = cfg.actor_rollout_ref
    assert cfg.algorithm.adv_estimator == "grpo"
    assert arr.rollout.n == 8 and arr.rollout.temperature == pytest.approx(0.6)
    assert arr.model.lora_rank == 32 and arr.model.lora_alpha == 32 and arr.model.target_modules == "all-linear"
    assert arr.rollout.load_format == "safetensors"
    assert arr.actor.use_kl_loss is True and arr.actor.kl_loss_coef == pytest.approx(0.1)
    assert arr.actor.use_dynamic_bsz is True
    assert arr.rollout.multi_turn.max_parallel_calls > 1
    assert arr.rollout.multi_turn.max_tool_response_length > 256
    # The 0.9.1 key; a top-level custom_reward_function would be silently ignored.
    assert cfg.reward.custom_reward_function.name == "compute_score"
    assert Path(cfg.reward.custom_reward_function.path).name == "score.py"
    assert Path(cfg.reward.custom_reward_function.path).is_file()
    assert "mlflow" in list(cfg.trainer.logger)
    assert Path(cfg.trainer.default_local_dir).is_absolute() and cfg.trainer.resume_mode == "auto"
    assert cfg.data.max_prompt_length == 8192 and cfg.data.max_response_length == 2048
    env = OmegaConf.to_container(cfg.ray_kwargs.ray_init.runtime_env.env_vars)
    assert env["AGEMEM_MEMORY__SERVER_URL"] == "http://127.0.0.1:9" and env["MLFLOW_RUN_ID"] == "run123"


def test_agent_loop_registry_yaml_points_at_our_loop(tmp_path: Path) -> None:
    for path in (verl_config.AGENT_LOOP_YAML, verl_config.write_agent_loop_config(tmp_path / "loops.yaml")):
        entries = OmegaConf.load(path)
        assert [e.name for e in entries] == [verl_config.AGENT_NAME]
        assert entries[0]["_target_"] == "agemem.train.verl.loop.StagedMemoryAgentLoop"


def test_unknown_override_key_is_rejected(runs_dir: Path) -> None:
    settings = load_settings("smoke", {"runs_dir": str(runs_dir), "train": {"extra_overrides": ["trainer.nonsense_key=1"]}})
    with pytest.raises(Exception, match="nonsense_key"):
        verl_config.compose(verl_config.build_overrides(settings, plan_paths(settings)))


def test_extra_overrides_replace_ours_instead_of_duplicating(runs_dir: Path) -> None:
    settings = load_settings("smoke", {"runs_dir": str(runs_dir), "train": {"extra_overrides": ["trainer.save_freq=7"]}})
    overrides = verl_config.build_overrides(settings, plan_paths(settings))
    assert [o for o in overrides if o.startswith("trainer.save_freq=")] == ["trainer.save_freq=7"]


def test_ray_submit_command_carries_runtime_env() -> None:
    cmd = ray_submit_command("http://head:8265", {"env_vars": {"A": "1"}}, ["python", "-m", "x"], working_dir=None)
    assert cmd[:5] == ["ray", "job", "submit", "--address", "http://head:8265"]
    assert cmd[cmd.index("--runtime-env-json") + 1] == '{"env_vars": {"A": "1"}}'
    assert cmd[-4:] == ["--", "python", "-m", "x"]


def test_cli_dry_run_paper_prints_composed_overrides(runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGEMEM_RUNS_DIR", str(runs_dir))
    app = typer.Typer()
    app.command()(train)
    result = CliRunner().invoke(app, ["--backend", "verl", "--dry-run", "--profile", "paper"])
    assert result.exit_code == 0, result.output
    assert "composed against verl's ppo_trainer: OK" in result.output
    assert "actor_rollout_ref.rollout.n=8" in result.output
    assert "reward.custom_reward_function.name=compute_score" in result.output
    assert not (runs_dir / "verl" / "train.parquet").exists()  # a dry run writes nothing


def test_ray_workers_rebuild_the_drivers_settings_from_the_runtime_env(
    runs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Agent-loop workers call load_settings() on their env: every driver override must arrive intact."""
    driver = load_settings("paper", {
        "runs_dir": str(runs_dir),
        "episode": {"max_turn_tokens": 77, "use_context_tools": False, "reward_overrides": {"w_answer": 0.5}},
        "llm": {"model": "it's a \\'quoted\\' name", "api_key": "sk-secret"},
        "judge": {"backend": "offline"},
    })
    env = verl_config.ray_runtime_env(driver, memory_server_url="http://127.0.0.1:9", mlflow_run_id=None)
    assert "sk-secret" not in str(env)  # secrets come from the workers' own environment
    cfg = verl_config.compose(verl_config.build_overrides(driver, plan_paths(driver))
                              + verl_config.runtime_env_overrides(env))
    worker_env = OmegaConf.to_container(cfg.ray_kwargs.ray_init.runtime_env.env_vars)
    assert all(isinstance(v, str) for v in worker_env.values())  # Ray rejects non-string env values
    for key, value in worker_env.items():
        monkeypatch.setenv(key, value)
    worker = load_settings()
    for section in verl_config.WORKER_SECTIONS:
        mine, theirs = getattr(driver, section), getattr(worker, section)
        assert mine.model_dump(exclude={"api_key", "server_url"}) == theirs.model_dump(exclude={"api_key", "server_url"})
    assert worker.memory.server_url == "http://127.0.0.1:9" and worker.profile == "paper"
