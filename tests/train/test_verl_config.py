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
    assert cfg.algorithm.adv_estimator == "grpo" and cfg.algorithm.norm_adv_by_std_in_grpo is True
    assert arr.rollout.n == 8 and arr.rollout.temperature == pytest.approx(0.6)
    assert arr.model.lora_rank == 32 and arr.model.lora_alpha == 32 and arr.model.target_modules == "all-linear"
    assert arr.rollout.load_format == "safetensors"
    assert arr.actor.use_kl_loss is True and arr.actor.kl_loss_coef == pytest.approx(0.1)
    assert arr.actor.use_dynamic_bsz is True and arr.actor.ppo_mini_batch_size == 16
    # The 0.9.1 key; a top-level custom_reward_function would be silently ignored.
    assert cfg.reward.custom_reward_function.name == "compute_score"
    assert Path(cfg.reward.custom_reward_function.path).name == "score.py"
    assert Path(cfg.reward.custom_reward_function.path).is_file()
    assert "mlflow" in list(cfg.trainer.logger)
    assert Path(cfg.trainer.default_local_dir).is_absolute() and cfg.trainer.resume_mode == "auto"
    # A segment's response holds up to the whole context plus a turn; every token budget holds a sequence.
    assert cfg.data.max_prompt_length == 8192 and cfg.data.max_response_length == 8192 + 2048
    for budget in (arr.actor.ppo_max_token_len_per_gpu, arr.rollout.log_prob_max_token_len_per_gpu,
                   arr.ref.log_prob_max_token_len_per_gpu):
        assert budget == 8192 + 10240
    assert cfg.trainer.use_v1 is True and cfg.trainer.max_actor_ckpt_to_keep == settings.train.keep_checkpoints == 3
    assert cfg.trainer.v1.sampler.custom_sampler.name == "RolloutMetricsReplayBuffer"
    # No tool config: its schemas would be counted twice by verl's overlong filter, its limits do nothing here.
    assert arr.rollout.multi_turn.tool_config_path is None and cfg.data.tool_config_path is None
    assert arr.model.override_config.attn_implementation in ("flash_attention_2", "sdpa")
    env = OmegaConf.to_container(cfg.ray_kwargs.ray_init.runtime_env.env_vars)
    assert env["AGEMEM_MEMORY__SERVER_URL"] == "http://127.0.0.1:9" and env["MLFLOW_RUN_ID"] == "run123"
    assert not {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"} & set(env)  # a hub model must stay downloadable


def test_verl_validate_config_passes_up_to_its_vllm_only_check(paper_cfg, runs_dir: Path) -> None:
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    _, cfg = paper_cfg
    # The last check imports vLLM for its LoRA rank limit: everything before it ran and passed.
    with pytest.raises(ValueError, match="vllm version None") as info:
        validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    raised_at = [e for e in info.traceback if e.name == "validate_config"][-1]
    assert "get_vllm_max_lora_rank" in str(raised_at.statement)
    full = load_settings("paper", {"runs_dir": str(runs_dir), "train": {"lora_rank": 0}})
    full_cfg = verl_config.compose(verl_config.build_overrides(full, plan_paths(full)))
    validate_config(full_cfg, use_reference_policy=need_reference_policy(full_cfg), use_critic=need_critic(full_cfg))


def test_v0_trainer_and_other_trainer_modes_are_refused(runs_dir: Path) -> None:
    for pair in ("trainer.use_v1=false", "trainer.v1.trainer_mode=colocate_async"):
        settings = load_settings("smoke", {"runs_dir": str(runs_dir), "train": {"extra_overrides": [pair]}})
        with pytest.raises(ValueError, match=pair.split("=")[0]):
            verl_config.check_composed(verl_config.compose(verl_config.build_overrides(settings, plan_paths(settings))))


def test_lengths_are_derived_and_too_small_values_refused(runs_dir: Path) -> None:
    paper = load_settings("paper", {"runs_dir": str(runs_dir)})
    assert (paper.response_budget, paper.token_budget) == (10240, 18432)
    with pytest.raises(ValueError, match="max_response_length .* must be at least"):
        load_settings("paper", {"train": {"max_response_length": 2048}})
    with pytest.raises(ValueError, match="ppo_max_token_len_per_gpu .* must be at least"):
        load_settings("paper", {"train": {"ppo_max_token_len_per_gpu": 16384}})
    bigger = load_settings("paper", {"train": {"max_response_length": 12000}})
    assert bigger.token_budget == 8192 + 12000


def test_loop_outputs_flag_truncated_segments(paper_cfg) -> None:
    """A segment cut to verl's lengths is flagged on its output (counted as rollout/truncated_segments)."""
    from transformers import AutoTokenizer

    from agemem.agent.episode import EpisodeResult, Segment
    from agemem.agent.stats import EpisodeStats
    from agemem.assets import TOKENIZER_DIR
    from tests.train.test_verl_loop_on_cpu import make_loop

    _, cfg = paper_cfg
    loop = make_loop(cfg, AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)), server_manager=None)
    loop.response_length = 2
    seg = Segment(prompt_ids=[1], response_ids=[4, 5, 6], response_mask=[1, 1, 1], response_logprobs=[0.0] * 3)
    ok = Segment(prompt_ids=[1], response_ids=[4], response_mask=[1], response_logprobs=[0.0])
    result = EpisodeResult("e", [seg, ok], EpisodeStats(), [], {"min_global_steps": 2, "max_global_steps": 3})
    outs = loop.outputs(result, "traj")
    assert [o.extra_fields["truncated"] for o in outs] == [True, False]
    assert all((o.extra_fields["min_global_steps"], o.extra_fields["max_global_steps"]) == (2, 3) for o in outs)


def test_our_tool_config_loads_with_verls_load_all_tools(tmp_path: Path) -> None:
    """The BaseTool adapters stay usable by verl's own ToolAgentLoop (our loop runs the tools itself)."""
    from verl.tools.tool_registry import load_all_tools

    from agemem.agent.tools import MEMORY_TOOL_NAMES
    from agemem.train.verl.tools import MemoryTool, write_tool_config

    tools = load_all_tools(tool_config_path=str(write_tool_config(tmp_path / "tools.yaml")), function_tool_path=None)
    assert sorted(t.name for t in tools) == sorted(MEMORY_TOOL_NAMES)
    assert all(isinstance(t, MemoryTool) for t in tools)
    ablation = load_all_tools(tool_config_path=str(write_tool_config(tmp_path / "t2.yaml", use_context_tools=False)),
                              function_tool_path=None)
    assert "Retrieve_memory" not in {t.name for t in ablation}


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


def test_unscaled_grpo_advantages_reach_verl(runs_dir: Path) -> None:
    settings = load_settings("smoke", {"runs_dir": str(runs_dir), "train": {"norm_adv_by_std": False}})
    cfg = verl_config.compose(verl_config.build_overrides(settings, plan_paths(settings)))
    assert cfg.algorithm.norm_adv_by_std_in_grpo is False


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
    # the plan: derived lengths, token budgets, updates per step, checkpoint retention
    assert "segment response <= 10240 tokens (derived: context 8192 + turn 2048)" in result.output
    assert "token budget per GPU (actor update, rollout and ref log-probs): 18432" in result.output
    assert "optimizer updates per step: ~2 at 2 segments per trajectory" in result.output
    assert "newest 3 kept" in result.output and "trainer.max_actor_ckpt_to_keep=3" in result.output
    assert "OFFLINE" not in result.output  # no forced offline variables for a hub model
    assert not (runs_dir / "verl" / "train.parquet").exists()  # a dry run writes nothing


def test_offline_flags_only_for_a_local_model_and_no_secret_in_the_runtime_env(runs_dir: Path) -> None:
    settings = load_settings("smoke", {"runs_dir": str(runs_dir), "memory": {"server_token": "tok-secret"},
                                       "judge": {"api_key": "judge-secret"}})
    local = verl_config.ray_runtime_env(settings, memory_server_url="http://x:1", mlflow_run_id=None,
                                        model_is_local=True)["env_vars"]
    hub = verl_config.ray_runtime_env(settings, memory_server_url="http://x:1", mlflow_run_id=None)["env_vars"]
    assert local["HF_HUB_OFFLINE"] == "1" and "HF_HUB_OFFLINE" not in hub
    overrides = verl_config.build_overrides(settings, plan_paths(settings)) + verl_config.runtime_env_overrides(
        {"env_vars": local})
    shown = str(local) + " ".join(overrides)  # verl prints these, MLflow logs them
    assert "tok-secret" not in shown and "judge-secret" not in shown
    secrets = verl_config.secret_env(settings)  # for the launching process's env (local Ray inherits it)
    assert secrets["AGEMEM_MEMORY__SERVER_TOKEN"] == "tok-secret" and secrets["AGEMEM_JUDGE__API_KEY"] == "judge-secret"


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


def test_model_resolution_local_path_hub_name_and_cluster(runs_dir: Path, tmp_path: Path) -> None:
    from agemem.train.verl.launch import resolve_model

    local = tmp_path / "my-model"
    local.mkdir()
    settings = load_settings("paper", {"runs_dir": str(runs_dir), "train": {"model": str(local)}})
    assert resolve_model(settings, download=True) == (str(local.resolve()), True)
    hub = load_settings("paper", {"runs_dir": str(runs_dir)})
    assert resolve_model(hub, download=False) == (None, False)  # dry run: nothing downloaded
    cluster = load_settings("paper", {"runs_dir": str(runs_dir), "train": {"ray_address": "http://head:8265"}})
    assert resolve_model(cluster, download=True) == (None, False)  # every node fetches (or shares HF_HOME)
    tiny = load_settings("smoke", {"runs_dir": str(runs_dir), "train": {"tiny_hidden_size": 16, "tiny_num_layers": 1}})
    path, is_local = resolve_model(tiny, download=True)
    assert is_local and (Path(path) / "config.json").is_file()


def test_verls_overlong_filter_counts_the_tool_schemas_once(runs_dir: Path, tmp_path: Path,
                                                            train_scripts: list) -> None:
    """verl's RLHFDataset keeps a row whose prompt (system prompt with the schemas + first message) fits
    exactly; with a tool config it would add the schemas again through the chat template and drop it."""
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from agemem.agent.prompts import episode_system_prompt
    from agemem.assets import TOKENIZER_DIR
    from agemem.train.verl.rows import write_verl_parquet

    settings = load_settings("smoke", {"runs_dir": str(runs_dir)})
    cfg = verl_config.compose(verl_config.build_overrides(settings, plan_paths(settings)))
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    path = write_verl_parquet(train_scripts[:1], tmp_path / "train.parquet",
                              system_prompt=episode_system_prompt(settings.episode))
    row = __import__("pyarrow.parquet", fromlist=["x"]).read_table(path).to_pylist()[0]
    from agemem.agent.context import ChatTokenizer

    exact = len(ChatTokenizer(tokenizer).prompt_ids(row["prompt"]))  # what the engine's first turn sees
    cfg.data.max_prompt_length = exact
    kept = RLHFDataset(data_files=[str(path)], tokenizer=tokenizer, config=cfg.data, processor=None)
    assert kept.tool_schemas is None and len(kept) == 1
