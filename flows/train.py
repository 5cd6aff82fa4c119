"""Training flow: GRPO with the local trainer (CPU / one GPU) or verl (GPUs, Ray).

The task is cached by input hash (episodes bytes + the settings that shape training), so an
unchanged re-run does not train again; a run killed mid-training left no cache record, and the
re-run's ``train_local`` resumes from the newest checkpoint (verl: ``trainer.resume_mode=auto``).
The MLflow run id of the stage is handed to the trainer (``MLFLOW_RUN_ID`` for verl) so per-step
metrics land in the pipeline's run tree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import TRAIN_RETRIES, cache_policy, load, mark_cached, md_table, run_cached, stage

TRAINING_CURVE_KEY = "agemem-training-curve"
_CURVE_COLUMNS = ("reward/mean", "reward/std", "reward/judge_score", "train/loss", "train/grad_norm",
                  "episode/tool_call_count", "episode/format_error_count", "time/step_s")


def _train_verl(settings: Any, episodes: Path, mlflow_run_id: str | None) -> dict[str, Any]:
    from agemem.train.launch import run_verl
    from agemem.train.merge import latest_verl_step_dir, merge_checkpoint

    run = run_verl(settings, episodes, mlflow_run_id=mlflow_run_id)
    step_dir = latest_verl_step_dir(run.paths.checkpoint_dir) if run.paths.checkpoint_dir else None
    if step_dir is None:
        raise RuntimeError(f"verl finished but wrote no global_step_* under {run.paths.checkpoint_dir}")
    merged = merge_checkpoint(step_dir, settings.runs_dir / "verl" / f"merged-{step_dir.name}")
    adapter = merged / "lora_adapter"
    return {"checkpoint_dir": str(merged), "model_dir": str(merged),
            "adapter_dir": str(adapter) if (adapter / "adapter_config.json").is_file() else None,
            "steps": int(step_dir.name.rsplit("_", 1)[1]), "history": []}


@task(
    name="train-policy",
    cache_policy=cache_policy(files=("episodes",), sections=("train", "episode", "judge"),
                              fields={"llm": ("backend", "model", "base_url"), "memory": ("embedding_model",)},
                              exclude=("mlflow_run_id",)),
    **TRAIN_RETRIES,
)
def train_task(settings: Any, episodes: str, mlflow_run_id: str | None = None) -> dict[str, Any]:
    """Train (or resume) up to ``train.total_steps``; returns checkpoint paths and the step history."""
    if settings.train.backend == "verl":
        return _train_verl(settings, Path(episodes), mlflow_run_id)
    from agemem.train.local import train_local

    result = train_local(settings, Path(episodes), mlflow_run_id=mlflow_run_id)
    model_dir = result.checkpoint_dir if (result.checkpoint_dir / "config.json").is_file() else None
    return {"checkpoint_dir": str(result.checkpoint_dir), "model_dir": str(model_dir) if model_dir else None,
            "adapter_dir": str(result.adapter_dir) if result.adapter_dir else None,
            "steps": result.steps, "history": result.history}


def curve_markdown(history: list[dict[str, Any]], *, backend: str, cached: bool) -> str:
    """The training-curve summary: first / last / best reward and a per-step table."""
    lines = [f"# Training curve ({backend})", ""]
    if cached:
        lines += ["_Reused from the Prefect cache: inputs unchanged, training not redone._", ""]
    if not history:
        return "\n".join(lines + ["No per-step history (see the MLflow run for verl's metrics)."]) + "\n"
    rewards = [float(h.get("reward/mean", 0.0)) for h in history]
    best = max(range(len(rewards)), key=rewards.__getitem__)
    lines += [md_table(["steps", "first reward", "last reward", "best reward (step)"],
                       [[len(history), rewards[0], rewards[-1], f"{rewards[best]:.3f} ({int(history[best]['step'])})"]]),
              ""]
    columns = [c for c in _CURVE_COLUMNS if any(c in h for h in history)]
    lines.append(md_table(["step", *columns], [[int(h.get("step", i + 1)), *(float(h.get(c, 0.0)) for c in columns)]
                                              for i, h in enumerate(history)]))
    return "\n".join(lines) + "\n"


@flow(name="train")
def train(profile: str = "smoke", overrides: list[str] | None = None, backend: str | None = None,
          episodes: str | None = None, parent_run_id: str | None = None) -> dict[str, Any]:
    """GRPO training on ``episodes`` (default ``<data.output_dir>/episodes.jsonl``); publishes the curve."""
    from agemem import tracking
    from agemem.data.distractors import episodes_path_for
    from agemem.data.prepare import scripts_path

    logger = get_run_logger()
    settings = load(profile, overrides, **{"train.backend": backend})
    path = episodes or str(episodes_path_for(scripts_path(settings)))
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no episodes file; run the synthesize-distractors flow first")
    with stage(settings, parent_run_id, "train") as run_id:
        out, cached = run_cached(train_task, settings, ["checkpoint_dir"], settings=settings, episodes=path,
                                 mlflow_run_id=run_id)
        logger.info("training (%s): %d steps -> %s (%s)", settings.train.backend, out["steps"], out["checkpoint_dir"],
                    "cached: not redone" if cached else "trained")
        last = out["history"][-1] if out["history"] else {}
        tracking.log_metrics(settings, run_id, {"train.steps": out["steps"],
                                                **{f"train.final.{k}": v for k, v in last.items() if k != "step"}})
        mark_cached(settings, run_id, cached)
    create_markdown_artifact(curve_markdown(out["history"], backend=settings.train.backend, cached=cached),
                             key=TRAINING_CURVE_KEY, description="GRPO reward and loss per step")
    return {**out, "cached": cached}


__all__ = ["TRAINING_CURVE_KEY", "curve_markdown", "train", "train_task"]
