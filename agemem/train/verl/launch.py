"""Launch verl GRPO: preflight, tool server up, ``main_ppo`` on local Ray or ``ray job submit``, logs streamed.

verl itself needs NVIDIA GPUs for rollout; everything before ``main_ppo`` (data, Hydra
composition) runs anywhere, and ``dry_run=True`` stops right after composing. A real launch first
runs the doctor's checks (:func:`agemem.doctor.require`) and stops with its report when something
is missing, instead of a verl traceback after Ray start-up.

The model: a local directory (or the tiny test model) is handed to the workers as a path and the
hub's offline flags are set; a hub name is downloaded once here (``snapshot_download``) for local
Ray, or left to the cluster's nodes for ``ray job submit`` (no offline flags then).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from agemem import doctor
from agemem.agent.prompts import episode_system_prompt
from agemem.data.episodes_io import read_episodes
from agemem.data.hotpot import require_labelled
from agemem.memory.process import free_port, start_server_process, stop_server_process
from agemem.settings import Settings
from agemem.tracking.runs import configure as mlflow_client
from agemem.train.models import is_tiny, materialise_tiny_model
from agemem.train.run import TrainResult, config_hash
from agemem.train.verl import config as verl_config
from agemem.train.verl.config import VerlPaths
from agemem.train.verl.merge import latest_verl_step_dir, merge_checkpoint, record_adapter_base, step_number
from agemem.train.verl.rows import write_verl_parquet
from agemem.train.verl.watch import ProbsDiffWatch

logger = logging.getLogger(__name__)

LineSink = Callable[[str], None]
#: A metric verl's V1 trainer logs every step: its absence means verl tracked nothing.
STEP_METRIC = "training/global_step"


@dataclass
class VerlRun:
    """What a verl launch did (or, for a dry run, would do)."""

    overrides: list[str]
    command: list[str]
    paths: VerlPaths
    dry_run: bool
    returncode: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    model: str = ""
    summary: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def verl_work_dir(settings: Settings) -> Path:
    return settings.runs_dir / "verl"


def plan_paths(settings: Settings) -> VerlPaths:
    """Where the launch writes its parquet, tool config and checkpoints."""
    work = verl_work_dir(settings)
    return VerlPaths(
        train_files=work / "train.parquet",
        val_files=work / "val.parquet",
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
    """Write train/val parquet and the agent-loop registry for verl."""
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


def resolve_model(settings: Settings, *, download: bool) -> tuple[str | None, bool]:
    """(the model path to hand verl, or None for ``train.model`` as given; whether it is local)."""
    model = settings.train.model
    if is_tiny(model):
        return (str(materialise_tiny_model(settings, verl_work_dir(settings) / "tiny-model")) if download else None,
                True)
    if Path(model).expanduser().exists():
        return str(Path(model).expanduser().resolve()), True
    if not download or settings.train.ray_address is not None:
        return None, False  # a cluster's nodes download (or share HF_HOME) themselves
    from huggingface_hub import snapshot_download

    logger.info("resolving %s once for every worker (snapshot_download)", model)
    return snapshot_download(model), True


def plan_summary(settings: Settings, model: str, *, local_model: bool) -> list[str]:
    """What the run will do, in numbers: lengths, token budgets, updates per step, retention, model."""
    b = verl_config.budget(settings)
    t, ep = settings.train, settings.episode
    kept = t.keep_checkpoints or "all"
    return [
        f"segment prompt <= {b.prompt_length} tokens; segment response <= {b.response_length} tokens"
        + ("" if t.max_response_length else f" (derived: context {ep.max_context_tokens} + turn {ep.max_turn_tokens})"),
        f"token budget per GPU (actor update, rollout and ref log-probs): {b.token_budget}"
        + ("" if t.ppo_max_token_len_per_gpu else " (derived: prompt + response)"),
        f"rollouts per step: {b.rollouts_per_step} ({t.tasks_per_batch} tasks x {t.rollouts_per_prompt}); "
        f"mini-batch: {b.mini_batch_prompts} prompts = {b.mini_batch_prompts * t.rollouts_per_prompt} rows, "
        "rows shuffled across groups",
        f"optimizer updates per step: ~{b.updates_per_step(2):g} at 2 segments per trajectory (stage 1; stages 2-3), "
        f"+{b.updates_per_step(1):g} per context rewrite (Summary/Filter/overflow) per trajectory",
        f"checkpoints: every {t.save_every} steps, newest {kept} kept (trainer.max_actor_ckpt_to_keep)",
        f"model: {model} ({'local: workers run offline' if local_model else 'hub name: downloaded at launch'}"
        f"{'' if local_model or t.ray_address is None else ' by every node'})",
    ]


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
    needs neither episodes nor a GPU. Real run: the doctor's checks (``PreflightError`` listing
    what is missing), inputs, the tool server, ``main_ppo`` locally (``train.ray_address`` unset)
    or via ``ray job submit`` with the logs streamed to ``sink``. Raises ``RuntimeError`` when
    training fails.
    """
    sink = sink or (lambda line: logger.info("verl | %s", line))
    if not dry_run:
        doctor.require(settings, "verl")
        if episodes_path is None:
            raise ValueError("episodes_path is required unless dry_run")
    paths = plan_paths(settings)
    if not dry_run:
        prepare_inputs(settings, Path(episodes_path), paths)  # type: ignore[arg-type]
    model_path, local_model = resolve_model(settings, download=not dry_run)
    overrides = verl_config.build_overrides(settings, paths, model_path=model_path)
    placeholder_url = settings.memory.server_url or f"http://{settings.memory.host}:{settings.memory.port}"
    runtime_env = verl_config.ray_runtime_env(settings, memory_server_url=placeholder_url, mlflow_run_id=mlflow_run_id,
                                              model_is_local=local_model)
    local = settings.train.ray_address is None
    full = overrides + (verl_config.runtime_env_overrides(runtime_env) if local else [])
    verl_config.check_composed(verl_config.compose(full))
    run = VerlRun(overrides=full, command=main_ppo_command(full), paths=paths, dry_run=dry_run,
                  env=runtime_env["env_vars"], model=model_path or settings.train.model,
                  summary=plan_summary(settings, model_path or settings.train.model, local_model=local_model))
    if dry_run:
        return run
    with tool_server(settings) as url:
        runtime_env = verl_config.ray_runtime_env(settings, memory_server_url=url, mlflow_run_id=mlflow_run_id,
                                                  model_is_local=local_model)
        run = _launch(settings, run, overrides, runtime_env, sink)
    if mlflow_run_id:
        settle_mlflow_run(settings, mlflow_run_id)
    return run


def _launch(settings: Settings, run: VerlRun, overrides: list[str], runtime_env: dict, sink: LineSink) -> VerlRun:
    """Run ``main_ppo`` (local Ray, or ``ray job submit``), streaming its lines through the probs-diff watch."""
    env = {**os.environ, **verl_config.secret_env(settings), **runtime_env["env_vars"]}
    if settings.train.ray_address is None:
        full = overrides + verl_config.runtime_env_overrides(runtime_env)
        cmd = main_ppo_command(full)
    else:
        full = overrides
        cmd = ray_submit_command(settings.train.ray_address, runtime_env,
                                 main_ppo_command(overrides, python="python"), working_dir=None)
    logger.info("launching verl (%s): %d overrides", settings.train.ray_address or "local Ray", len(full))
    watch = ProbsDiffWatch(sink)
    code = stream(cmd, env=env, sink=watch)
    run.overrides, run.command, run.returncode, run.env = full, cmd, code, runtime_env["env_vars"]
    run.warnings = list(watch.warnings)
    if code != 0:
        raise RuntimeError(f"verl training failed with exit code {code} (command: {' '.join(cmd[:4])} ...)")
    return run


def settle_mlflow_run(settings: Settings, run_id: str) -> None:
    """verl's MLflow logger ends the run it was handed: reopen it for the pipeline, and fail loudly
    when verl logged no step metric (its logger carries on untracked when the server is unreachable)."""
    client = mlflow_client(settings)
    run = client.get_run(run_id)
    if run.info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
    if STEP_METRIC not in run.data.metrics:
        raise RuntimeError(
            f"verl finished but logged no metrics to MLflow run {run_id} at {settings.tracking_uri} (no "
            f"{STEP_METRIC!r}): its logger could not reach the tracking server, so the run is untracked"
        )


def train_verl(settings: Settings, episodes_path: Path, *, mlflow_run_id: str | None = None) -> TrainResult:
    """verl GRPO on ``episodes_path``, then verl's merger on the newest checkpoint.

    A LoRA run's merged directory holds the *base* weights plus ``lora_adapter/``: the result names
    the adapter as the trained policy (with its base recorded in ``adapter_config.json``) and no
    model directory, so nothing evaluates or registers the base by mistake. A full fine-tune's
    merged directory is the trained model.
    """
    run = run_verl(settings, episodes_path, mlflow_run_id=mlflow_run_id)
    step_dir = latest_verl_step_dir(run.paths.checkpoint_dir) if run.paths.checkpoint_dir else None
    if step_dir is None:
        raise RuntimeError(f"verl finished but wrote no global_step_* under {run.paths.checkpoint_dir}")
    merged = merge_checkpoint(step_dir, verl_work_dir(settings) / f"merged-{step_dir.name}")
    adapter = merged / "lora_adapter"
    has_adapter = (adapter / "adapter_config.json").is_file()
    if has_adapter:
        record_adapter_base(adapter, run.model)
    return TrainResult(
        backend="verl",
        checkpoint_dir=step_dir,
        model_dir=None if has_adapter else merged,
        adapter_dir=adapter if has_adapter else None,
        steps=step_number(step_dir),
        history=[],
        config_hash=config_hash(settings),
    )


__all__ = ["VerlRun", "main_ppo_command", "plan_paths", "plan_summary", "ray_submit_command", "resolve_model",
           "run_verl", "settle_mlflow_run", "tool_server", "train_verl"]
