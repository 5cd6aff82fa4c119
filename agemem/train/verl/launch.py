"""Launch verl GRPO: tool server up, ``main_ppo`` on local Ray or ``ray job submit``, logs streamed.

verl itself needs NVIDIA GPUs for rollout; everything before ``main_ppo`` (data, tool config,
Hydra composition) runs anywhere, and ``dry_run=True`` stops right after composing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from agemem.agent.prompts import episode_system_prompt
from agemem.data.episodes_io import read_episodes
from agemem.data.hotpot import require_labelled
from agemem.memory.process import free_port, start_server_process, stop_server_process
from agemem.settings import Settings, offline_env
from agemem.train.models import is_tiny, materialise_tiny_model
from agemem.train.run import TrainResult, config_hash
from agemem.train.verl import config as verl_config
from agemem.train.verl.config import VerlPaths
from agemem.train.verl.merge import latest_verl_step_dir, merge_checkpoint, step_number
from agemem.train.verl.rows import write_verl_parquet
from agemem.train.verl.tools import write_tool_config

logger = logging.getLogger(__name__)

LineSink = Callable[[str], None]


@dataclass
class VerlRun:
    """What a verl launch did (or, for a dry run, would do)."""

    overrides: list[str]
    command: list[str]
    paths: VerlPaths
    dry_run: bool
    returncode: int | None = None
    env: dict[str, str] = field(default_factory=dict)


def verl_work_dir(settings: Settings) -> Path:
    return settings.runs_dir / "verl"


def plan_paths(settings: Settings) -> VerlPaths:
    """Where the launch writes its parquet, tool config and checkpoints."""
    work = verl_work_dir(settings)
    return VerlPaths(
        train_files=work / "train.parquet",
        val_files=work / "val.parquet",
        tool_config=work / "tool_config.yaml",
        agent_loop_config=work / "agent_loop.yaml",
        checkpoint_dir=verl_config.checkpoint_dir(settings),
    )


def main_ppo_command(overrides: list[str], *, python: str | None = None) -> list[str]:
    return [python or sys.executable, "-m", "verl.trainer.main_ppo", *overrides]


def ray_submit_command(address: str, runtime_env: dict, inner: list[str], *, working_dir: Path | None) -> list[str]:
    """``ray job submit`` streaming the job's logs (it waits for the job unless --no-wait)."""
    env = dict(runtime_env)
    if working_dir is not None:
        env["working_dir"] = str(working_dir)
    return ["ray", "job", "submit", "--address", address, "--runtime-env-json", json.dumps(env), "--", *inner]


def prepare_inputs(settings: Settings, episodes_path: Path, paths: VerlPaths) -> None:
    """Write train/val parquet, the tool config and the agent-loop registry for verl."""
    episodes = read_episodes(Path(episodes_path))
    if not episodes:
        raise ValueError(f"no episodes in {episodes_path}")
    train = [e for e in episodes if e.split == "train"] or episodes
    require_labelled(train, "training")
    val = [e for e in episodes if e.split != "train"] or train[:1]
    # The episode engine's own system prompt: verl filters overlong rows by it.
    prompt = episode_system_prompt(settings.episode)
    write_verl_parquet(train, paths.train_files, verl_config.AGENT_NAME, system_prompt=prompt)
    write_verl_parquet(val, paths.val_files, verl_config.AGENT_NAME, system_prompt=prompt)
    write_tool_config(paths.tool_config, use_context_tools=settings.episode.use_context_tools)
    verl_config.write_agent_loop_config(paths.agent_loop_config)


@contextlib.contextmanager
def tool_server(settings: Settings, *, startup_timeout_s: float = 120.0) -> Iterator[str]:
    """Yield the tool server URL: ``memory.server_url`` if set, else a ``agemem serve-tools`` subprocess."""
    if settings.memory.server_url:
        yield settings.memory.server_url
        return
    host = settings.memory.host
    port = settings.memory.port or free_port(host)
    log_path = settings.runs_dir / "tool-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("starting tool server on %s:%d (store %s, log %s)", host, port, settings.memory_uri, log_path)
    proc, url = start_server_process(
        settings.memory_uri,
        host=host,
        port=port,
        extra=["--profile", settings.profile, "--set", f"runs_dir={settings.runs_dir}"],
        timeout_s=startup_timeout_s,
        log_path=log_path,
        inherit_settings_env=True,
    )
    try:
        yield url
    finally:
        stop_server_process(proc)
        logger.info("tool server stopped (code %s)", proc.returncode)


def stream(cmd: list[str], *, env: dict[str, str], sink: LineSink) -> int:
    """Run ``cmd``, passing every output line to ``sink``; returns the exit code."""
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sink(line.rstrip("\n"))
        return proc.wait()


def run_verl(
    settings: Settings,
    episodes_path: Path | None = None,
    *,
    dry_run: bool = False,
    mlflow_run_id: str | None = None,
    sink: LineSink | None = None,
) -> VerlRun:
    """Compose and (unless ``dry_run``) run verl GRPO training.

    Dry run: builds and validates the overrides with Hydra's compose API; writes nothing and
    needs neither episodes nor a GPU. Real run: writes inputs, starts the tool server, runs
    ``main_ppo`` locally (``train.ray_address`` unset) or via ``ray job submit``, streams the
    logs to ``sink`` and stops the server. Raises ``RuntimeError`` when training fails.
    """
    sink = sink or (lambda line: logger.info("verl | %s", line))
    paths = plan_paths(settings)
    model_path = None
    if not dry_run:
        if episodes_path is None:
            raise ValueError("episodes_path is required unless dry_run")
        prepare_inputs(settings, episodes_path, paths)
        if is_tiny(settings.train.model):
            model_path = str(materialise_tiny_model(settings, verl_work_dir(settings) / "tiny-model"))
    overrides = verl_config.build_overrides(settings, paths, model_path=model_path)
    placeholder_url = settings.memory.server_url or f"http://{settings.memory.host}:{settings.memory.port}"
    runtime_env = verl_config.ray_runtime_env(settings, memory_server_url=placeholder_url, mlflow_run_id=mlflow_run_id)
    local = settings.train.ray_address is None
    full = overrides + (verl_config.runtime_env_overrides(runtime_env) if local else [])
    cfg = verl_config.compose(full)
    verl_config.check_composed(cfg)
    if dry_run:
        return VerlRun(overrides=full, command=main_ppo_command(full), paths=paths, dry_run=True)

    with tool_server(settings) as url:
        runtime_env = verl_config.ray_runtime_env(settings, memory_server_url=url, mlflow_run_id=mlflow_run_id)
        env = offline_env()
        env.update(runtime_env["env_vars"])
        if local:
            full = overrides + verl_config.runtime_env_overrides(runtime_env)
            cmd = main_ppo_command(full)
        else:
            full = overrides
            cmd = ray_submit_command(
                settings.train.ray_address, runtime_env, main_ppo_command(overrides, python="python"), working_dir=None
            )
        logger.info("launching verl (%s): %d overrides", "local Ray" if local else settings.train.ray_address, len(full))
        code = stream(cmd, env=env, sink=sink)
    run = VerlRun(overrides=full, command=cmd, paths=paths, dry_run=False, returncode=code, env=runtime_env["env_vars"])
    if code != 0:
        raise RuntimeError(f"verl training failed with exit code {code} (command: {' '.join(cmd[:4])} ...)")
    return run


def train_verl(settings: Settings, episodes_path: Path, *, mlflow_run_id: str | None = None) -> TrainResult:
    """verl GRPO on ``episodes_path``, then verl's merger on the newest checkpoint.

    A LoRA run's merged directory holds the *base* weights plus ``lora_adapter/``: the result names
    the adapter as the trained policy and no model directory, so nothing evaluates the base by
    mistake. A full fine-tune's merged directory is the trained model.
    """
    run = run_verl(settings, episodes_path, mlflow_run_id=mlflow_run_id)
    step_dir = latest_verl_step_dir(run.paths.checkpoint_dir) if run.paths.checkpoint_dir else None
    if step_dir is None:
        raise RuntimeError(f"verl finished but wrote no global_step_* under {run.paths.checkpoint_dir}")
    merged = merge_checkpoint(step_dir, verl_work_dir(settings) / f"merged-{step_dir.name}")
    adapter = merged / "lora_adapter"
    has_adapter = (adapter / "adapter_config.json").is_file()
    return TrainResult(
        backend="verl",
        checkpoint_dir=step_dir,
        model_dir=None if has_adapter else merged,
        adapter_dir=adapter if has_adapter else None,
        steps=step_number(step_dir),
        history=[],
        config_hash=config_hash(settings),
    )


__all__ = ["VerlRun", "main_ppo_command", "plan_paths", "ray_submit_command", "run_verl", "tool_server",
           "train_verl"]
