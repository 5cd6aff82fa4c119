"""verl 0.9.1 configuration: Hydra overrides built from settings, and their validation.

The overrides are the single source of truth for a verl run: ``launch`` passes them to
``python -m verl.trainer.main_ppo`` and ``--dry-run`` composes them with Hydra's compose API
against verl's own ``ppo_trainer`` config, so a typo in a key fails here and not on a GPU node.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agemem.reward import score as score_module
from agemem.settings import ENV_PREFIX, PROFILES, Settings

logger = logging.getLogger(__name__)

AGENT_NAME = "staged_memory_agent"
#: Imported by verl on every Ray worker (the loop module imports verl; this module does not).
LOOP_CLASS = "agemem.train.verl.loop.StagedMemoryAgentLoop"
CONF_DIR = Path(__file__).resolve().parent / "conf"
AGENT_LOOP_YAML = CONF_DIR / "agent_loop.yaml"
#: verl's ``trainer.v1.sampler.custom_sampler`` (loaded in verl's trainer process).
SAMPLER_PATH = "pkg://agemem.train.verl.sampler"
SAMPLER_CLASS = "RolloutMetricsReplayBuffer"


@dataclass(frozen=True)
class VerlPaths:
    """Files a verl run reads or writes (all absolute)."""

    train_files: Path
    val_files: Path
    agent_loop_config: Path = AGENT_LOOP_YAML
    checkpoint_dir: Path | None = None


def reward_function_path() -> Path:
    """The file verl loads ``compute_score`` from (``reward.custom_reward_function.path``)."""
    return Path(score_module.__file__).resolve()


def checkpoint_dir(settings: Settings) -> Path:
    """Absolute ``trainer.default_local_dir``: verl's auto-resume needs an absolute path."""
    return settings.path(settings.train.output_dir).resolve() / "verl"


@dataclass(frozen=True)
class VerlBudget:
    """The lengths and batch shape a verl run gets from the settings (printed by the dry run)."""

    prompt_length: int
    response_length: int
    token_budget: int
    mini_batch_prompts: int
    rollouts_per_step: int
    rollouts_per_prompt: int

    def updates_per_step(self, segments_per_trajectory: float) -> float:
        """verl cuts the step's rows (one per segment) into mini-batches of ``mini_batch_prompts x n`` rows."""
        rows = self.rollouts_per_step * segments_per_trajectory
        return rows / (self.mini_batch_prompts * self.rollouts_per_prompt)


def budget(settings: Settings) -> VerlBudget:
    """The run's lengths (derived from the context budget unless set) and its mini-batch shape."""
    t = settings.train
    return VerlBudget(
        prompt_length=t.max_prompt_length,
        response_length=settings.response_budget,
        token_budget=settings.token_budget,
        mini_batch_prompts=t.ppo_mini_batch_size or t.tasks_per_batch,
        rollouts_per_step=t.tasks_per_batch * t.rollouts_per_prompt,
        rollouts_per_prompt=t.rollouts_per_prompt,
    )


def attn_implementation(settings: Settings) -> str:
    """``train.attn_implementation``; 'auto' is flash_attention_2 where flash-attn imports, else sdpa."""
    chosen = settings.train.attn_implementation
    if chosen != "auto":
        return chosen
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") is not None else "sdpa"


def _data_overrides(settings: Settings, paths: VerlPaths) -> dict[str, Any]:
    t = settings.train
    return {
        "data.train_files": str(paths.train_files.resolve()),
        "data.val_files": str(paths.val_files.resolve()),
        "data.train_batch_size": t.tasks_per_batch,
        "data.max_prompt_length": t.max_prompt_length,
        "data.max_response_length": settings.response_budget,
        "data.filter_overlong_prompts": True,
        "data.truncation": "error",
        "data.return_raw_chat": True,
        "data.seed": t.seed,
    }


def _model_overrides(settings: Settings, model: str) -> dict[str, Any]:
    t = settings.train
    out: dict[str, Any] = {
        "actor_rollout_ref.model.path": model,
        "actor_rollout_ref.model.use_remove_padding": True,
        "actor_rollout_ref.model.enable_gradient_checkpointing": True,
        "actor_rollout_ref.model.lora_rank": t.lora_rank,
        "actor_rollout_ref.model.lora_alpha": t.lora_alpha,
        "actor_rollout_ref.model.target_modules": t.lora_target_modules,
        # verl reads it from override_config (default flash_attention_2, which fails without flash-attn).
        "+actor_rollout_ref.model.override_config.attn_implementation": attn_implementation(settings),
    }
    return out


def _actor_overrides(settings: Settings) -> dict[str, Any]:
    t = settings.train
    b = budget(settings)
    return {
        "actor_rollout_ref.actor.optim.lr": t.lr,
        "actor_rollout_ref.actor.optim.clip_grad": t.grad_clip,
        "actor_rollout_ref.actor.grad_clip": t.grad_clip,
        "actor_rollout_ref.actor.ppo_epochs": t.ppo_epochs,
        # In prompts; verl multiplies by rollout.n and cuts the step's rows (one per segment, shuffled
        # across groups, padded to a multiple) into mini-batches: ~segments x tasks / this updates per step.
        "actor_rollout_ref.actor.ppo_mini_batch_size": b.mini_batch_prompts,
        "actor_rollout_ref.actor.use_dynamic_bsz": True,
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": b.token_budget,
        "actor_rollout_ref.actor.use_kl_loss": True,
        "actor_rollout_ref.actor.kl_loss_coef": t.kl_coef,
        "actor_rollout_ref.actor.kl_loss_type": t.kl_loss_type,
        "actor_rollout_ref.actor.clip_ratio": t.clip_ratio,
        "actor_rollout_ref.actor.loss_agg_mode": "token-mean",
        "actor_rollout_ref.ref.log_prob_use_dynamic_bsz": True,
        "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu": b.token_budget,
    }


def _rollout_overrides(settings: Settings, paths: VerlPaths) -> dict[str, Any]:
    t, ep = settings.train, settings.episode
    out: dict[str, Any] = {
        "actor_rollout_ref.rollout.name": t.rollout_engine,
        "actor_rollout_ref.rollout.mode": "async",
        "actor_rollout_ref.rollout.n": t.rollouts_per_prompt,
        "actor_rollout_ref.rollout.temperature": ep.temperature,
        "actor_rollout_ref.rollout.top_p": ep.top_p,
        "actor_rollout_ref.rollout.tensor_model_parallel_size": t.rollout_tp,
        "actor_rollout_ref.rollout.gpu_memory_utilization": t.gpu_memory_utilization,
        # Rollout log-probs give verl's training/rollout_probs_diff_* (the LoRA weight-sync check).
        "actor_rollout_ref.rollout.calculate_log_probs": True,
        "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz": True,
        "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu": budget(settings).token_budget,
        # No multi_turn tool config: the engine runs the tools itself, verl's multi_turn limits never
        # apply to this loop, and verl's overlong filter would count the schemas a second time
        # (chat-template tools= on top of the system prompt that already lists them).
        "actor_rollout_ref.rollout.agent.agent_loop_config_path": str(paths.agent_loop_config.resolve()),
        "actor_rollout_ref.rollout.agent.default_agent_loop": AGENT_NAME,
        "actor_rollout_ref.rollout.agent.num_workers": t.agent_workers,
    }
    if t.lora_rank > 0:
        # vLLM must load adapter weights by safetensors; 'dummy' would drop the LoRA sync.
        out["actor_rollout_ref.rollout.load_format"] = "safetensors"
        out["actor_rollout_ref.rollout.layered_summon"] = True
    return out


def _trainer_overrides(settings: Settings, ckpt: Path) -> dict[str, Any]:
    t = settings.train
    return {
        "algorithm.adv_estimator": "grpo",
        "algorithm.use_kl_in_reward": False,
        "algorithm.norm_adv_by_std_in_grpo": t.norm_adv_by_std,
        "reward.custom_reward_function.path": str(reward_function_path()),
        "reward.custom_reward_function.name": "compute_score",
        # V1 is the trainer that accepts a list of outputs per trajectory (V0 crashes on it).
        "trainer.use_v1": True,
        "trainer.v1.trainer_mode": "sync",
        # verl's supported sampler hook: its metrics dict is logged every step (our rollout metrics).
        "trainer.v1.sampler.custom_sampler.path": SAMPLER_PATH,
        "trainer.v1.sampler.custom_sampler.name": SAMPLER_CLASS,
        "trainer.logger": ["console", "mlflow"],
        "trainer.project_name": settings.tracking.experiment,
        "trainer.experiment_name": t.experiment_name,
        "trainer.n_gpus_per_node": t.n_gpus_per_node,
        "trainer.nnodes": t.nnodes,
        "trainer.total_epochs": t.total_epochs,
        "trainer.total_training_steps": t.total_steps,
        "trainer.save_freq": t.save_every,
        "trainer.max_actor_ckpt_to_keep": t.keep_checkpoints or None,
        "trainer.test_freq": -1,
        "trainer.val_before_train": False,
        "trainer.default_local_dir": str(ckpt),
        "trainer.resume_mode": "auto",
    }


def build_overrides(settings: Settings, paths: VerlPaths, *, model_path: str | None = None) -> list[str]:
    """verl Hydra overrides for GRPO with the staged memory agent loop.

    ``model_path`` replaces ``settings.train.model`` (the launcher passes the materialised tiny
    model's directory, or the local snapshot of a hub model, there).
    """
    ckpt = (paths.checkpoint_dir or checkpoint_dir(settings)).resolve()
    overrides: dict[str, Any] = {
        **_trainer_overrides(settings, ckpt),
        **_data_overrides(settings, paths),
        **_model_overrides(settings, model_path or settings.train.model),
        **_actor_overrides(settings),
        **_rollout_overrides(settings, paths),
    }
    out = {key: _hydra_value(value) for key, value in overrides.items()}
    # settings.train.extra_overrides win over ours; Hydra rejects the same key given twice.
    for pair in settings.train.extra_overrides:
        if "=" not in pair:
            raise ValueError(f"train.extra_overrides entry {pair!r} must look like key=value")
        key, value = pair.split("=", 1)
        out[key.strip()] = value
    return [f"{key}={value}" for key, value in out.items()]


def _hydra_value(value: Any) -> str:
    """Render a Python value as a Hydra override value (lists, bools, paths with '=' quoted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if value is None:
        return "null"
    text = str(value)
    if any(ch in text for ch in " ,=[]{}'\"") and not isinstance(value, (int, float)):
        return "'" + text.replace("'", "\\'") + "'"
    return text


def verl_config_dir() -> Path:
    """verl's own ``trainer/config`` directory (where ``ppo_trainer.yaml`` lives)."""
    import verl

    return Path(verl.__file__).resolve().parent / "trainer" / "config"


def compose(overrides: list[str], config_name: str = "ppo_trainer") -> Any:
    """Compose verl's ``config_name`` (``ppo_trainer``, ``sft_trainer_engine``) with ``overrides``
    (raises on an unknown key or bad value).

    Returns the composed ``DictConfig``. Uses Hydra's compose API, so nothing is launched.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    # A previous compose in this process leaves Hydra initialised; compose is re-entrant only after clear().
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(verl_config_dir()), version_base=None):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    return cfg


def check_composed(cfg: Any) -> None:
    """Checks verl itself does only at launch time (or never), on facts this project relies on."""
    from omegaconf import OmegaConf

    required = {
        "reward.custom_reward_function.name": "compute_score",
        "actor_rollout_ref.rollout.agent.default_agent_loop": AGENT_NAME,
        "trainer.resume_mode": "auto",
        # The loop returns a list of outputs per trajectory: only the V1 trainer takes one.
        "trainer.use_v1": True,
        # The sampler subclasses verl's sync ReplayBuffer (the async modes use another class).
        "trainer.v1.trainer_mode": "sync",
        "trainer.v1.sampler.custom_sampler.path": SAMPLER_PATH,
        "trainer.v1.sampler.custom_sampler.name": SAMPLER_CLASS,
    }
    for key, expected in required.items():
        got = OmegaConf.select(cfg, key)
        if got != expected:
            raise ValueError(f"verl config {key}={got!r}, expected {expected!r}")
    local_dir = OmegaConf.select(cfg, "trainer.default_local_dir")
    if not os.path.isabs(str(local_dir)):
        raise ValueError(f"trainer.default_local_dir must be absolute for resume, got {local_dir!r}")
    sequence = int(cfg.data.max_prompt_length) + int(cfg.data.max_response_length)
    for key in ("actor_rollout_ref.actor.ppo_max_token_len_per_gpu",
                "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu",
                "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu"):
        if int(OmegaConf.select(cfg, key)) < sequence:
            raise ValueError(f"verl config {key}={OmegaConf.select(cfg, key)} is below the longest sequence "
                             f"({sequence} = data.max_prompt_length + data.max_response_length): verl asserts on it")


# Settings sections the agent-loop workers build their episode engine from (agemem.train.verl.loop).
WORKER_SECTIONS = ("episode", "memory", "llm", "judge")


def _env_value(value: Any) -> str:
    """A settings value as pydantic-settings reads it back from an env var (complex values as JSON)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def worker_settings_env(settings: Settings) -> dict[str, str]:
    """``AGEMEM_<SECTION>__<FIELD>`` for every worker-read value that differs from the profile.

    Ray workers rebuild settings from their environment (``load_settings()``), so without this a
    ``--set episode.max_turn_tokens=...`` or an override in code would reach the driver only and the
    rollouts would silently run with the profile's values. Secrets are never copied into the runtime
    env (it is visible in Ray's dashboard and job metadata): workers read them from their own env.
    """
    from pydantic import SecretStr

    env: dict[str, str] = {}
    profile = PROFILES.get(settings.profile, {})
    for name in WORKER_SECTIONS:
        section = getattr(settings, name)
        # The profile's values over the field defaults, without reading this process's env.
        baseline = type(section)(**profile.get(name, {}))
        for field in type(section).model_fields:
            value, base = getattr(section, field), getattr(baseline, field)
            if value == base or value is None or isinstance(value, SecretStr):
                continue
            dumped = section.model_dump(mode="json", include={field})[field]
            env[f"{ENV_PREFIX}{name.upper()}__{field.upper()}"] = _env_value(dumped)
    return env


#: Hub look-ups the workers skip when the model is a local directory (else they must reach the hub).
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def ray_runtime_env(settings: Settings, *, memory_server_url: str | None, mlflow_run_id: str | None,
                    model_is_local: bool = False) -> dict[str, Any]:
    """Environment every Ray worker needs: the settings the driver runs with (profile plus what
    differs from it), the tool server URL, the MLflow run; the hub's offline flags only when the
    model is a local directory (a hub name must stay downloadable on a fresh node).

    Never a secret: verl prints this config, logs it as MLflow params, and Ray's dashboard shows
    runtime envs. ``memory.server_token`` reaches local Ray workers through the launching process's
    environment (:func:`secret_env`); on a cluster set it in the nodes' own environment.
    """
    env: dict[str, str] = {
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        **worker_settings_env(settings),
        "AGEMEM_PROFILE": settings.profile,
        "AGEMEM_RUNS_DIR": str(settings.runs_dir),
    }
    if memory_server_url:
        env["AGEMEM_MEMORY__SERVER_URL"] = memory_server_url
    if mlflow_run_id:
        env["MLFLOW_RUN_ID"] = mlflow_run_id
    if model_is_local:
        env.update({key: "1" for key in OFFLINE_VARS})
    return {"env_vars": env}


def secret_env(settings: Settings) -> dict[str, str]:
    """Secrets the workers need, for the launching process's own environment (inherited by local Ray):
    also those read from ``.env`` or ``--set``, which the workers' own environment would lack."""
    secrets = {
        f"{ENV_PREFIX}MEMORY__SERVER_TOKEN": settings.memory.server_token,
        f"{ENV_PREFIX}LLM__API_KEY": settings.llm.api_key,
        f"{ENV_PREFIX}JUDGE__API_KEY": settings.judge.api_key,
        "DASHSCOPE_API_KEY": settings.dashscope_api_key,
    }
    return {key: value.get_secret_value() for key, value in secrets.items() if value is not None}


def runtime_env_overrides(runtime_env: dict[str, Any]) -> list[str]:
    """The runtime env as ``+ray_kwargs...`` overrides (verl's local ``ray.init`` reads them)."""
    # Always quoted: Ray accepts only string env values, and Hydra would turn 1024 or true into int/bool.
    return [
        f"+ray_kwargs.ray_init.runtime_env.env_vars.{key}='{_quoted(str(value))}'"
        for key, value in sorted(runtime_env["env_vars"].items())
    ]


def _quoted(text: str) -> str:
    """Escape ``text`` for a single-quoted Hydra string (backslashes before a quote, the quote itself)."""
    import re

    return re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)


def write_agent_loop_config(path: Path) -> Path:
    """Write the agent-loop registry YAML verl reads (``agent_loop_config_path``)."""
    entries = [{"name": AGENT_NAME, "_target_": LOOP_CLASS}]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(entries, sort_keys=False))
    return path
