"""Training flow: GRPO with the local trainer (CPU / one GPU) or verl (GPUs, Ray).

The task is cached by input hash (episodes bytes + :func:`agemem.train.run.inputs_hash`), so an
unchanged re-run does not train again; a run killed mid-training left no cache record, and the
re-run resumes from the newest checkpoint of the same configuration (verl: ``trainer.resume_mode=auto``).
The MLflow run id of the stage is handed to the trainer (``MLFLOW_RUN_ID`` for verl) so per-step
metrics land in the pipeline's run tree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from agemem import tracking
from agemem.data.prepare import episodes_path
from agemem.train.run import inputs_hash, warm_start_hash
from agemem.train.run import run as run_training
from agemem.train.run import WARM_START_REPORT as REPORT_FILE
from flows.common import TRAIN_RETRIES, cache_policy, load, mark_cached, md_table, run_cached, stage

TRAINING_CURVE_KEY = "agemem-training-curve"
WARM_START_KEY = "agemem-warm-start"
_CURVE_COLUMNS = ("reward/mean", "reward/std", "reward/judge_score", "tools/any_call_rate", "episode/tool_call_count",
                  "episode/parse_failure_rate", "episode/answered_rate", "train/entropy", "train/kl_loss",
                  "train/grad_norm", "time/step_s")


@task(
    name="train-policy",
    cache_policy=cache_policy(files=("episodes",), hasher=inputs_hash, exclude=("mlflow_run_id",)),
    **TRAIN_RETRIES,
)
def train_task(settings: Any, episodes: str, mlflow_run_id: str | None = None) -> dict[str, Any]:
    """Train (or resume) up to ``train.total_steps``; returns the :class:`TrainResult` as a dict."""
    return run_training(settings, Path(episodes), mlflow_run_id=mlflow_run_id).as_dict()


@task(
    name="warm-start",
    cache_policy=cache_policy(files=("episodes",), hasher=warm_start_hash),
    **TRAIN_RETRIES,
)
def warm_start_task(settings: Any, episodes: str) -> dict[str, Any]:
    """Teacher trajectories -> rejection sampling -> SFT; returns the warm-started model as a TrainResult dict."""
    return run_training(settings, Path(episodes), algo="sft").as_dict()


def warm_start_markdown(report: dict[str, Any], model_dir: str, *, cached: bool) -> str:
    """The warm-start summary: the teacher, how many trajectories rejection sampling kept, the SFT loss."""
    lines = ["# Teacher warm start (SFT)", ""]
    if cached:
        lines += ["_Reused from the Prefect cache: inputs unchanged, warm start not redone._", ""]
    lines.append(md_table(["field", "value"], [
        ["teacher", report.get("teacher", "-")],
        ["kept trajectories", f"{report.get('kept', 0)} of {report.get('trajectories', 0)} "
                              f"({report.get('keep_metric')} >= {report.get('min_score')})"],
        ["mean score (all / kept)", f"{report.get('mean_score_all', 0):.3f} / {report.get('mean_score_kept', 0):.3f}"],
        ["model tokens trained", report.get("model_tokens", 0)],
        ["model", model_dir],
    ]))
    epochs = report.get("epochs") or []
    if epochs:
        lines += ["", md_table(["epoch", "loss", "grad norm"],
                               [[int(e["epoch"]), e["sft/loss"], e["sft/grad_norm"]] for e in epochs])]
    return "\n".join(lines) + "\n"


@flow(name="warm-start")
def warm_start(profile: str = "smoke", overrides: list[str] | None = None, episodes: str | None = None,
               parent_run_id: str | None = None) -> dict[str, Any]:
    """Supervised warm start on teacher trajectories; publishes its report (artifact ``agemem-warm-start``)."""
    logger = get_run_logger()
    settings = load(profile, overrides)
    path = _episodes(settings, episodes)
    with stage(settings, parent_run_id, "warm_start") as run_id:
        out, cached = run_cached(warm_start_task, settings, ["model_dir"], settings=settings, episodes=path)
        report = json.loads((Path(out["model_dir"]).parent / REPORT_FILE).read_text())
        logger.info("warm start: kept %d of %d teacher trajectories -> %s (%s)", report["kept"],
                    report["trajectories"], out["model_dir"], "cached: not redone" if cached else "trained")
        tracking.log_metrics(settings, run_id, {"warm_start.kept": report["kept"],
                                                "warm_start.trajectories": report["trajectories"],
                                                "warm_start.mean_score_kept": report["mean_score_kept"]})
        for entry in report.get("epochs", []):
            tracking.log_metrics(settings, run_id, {k: v for k, v in entry.items() if k != "epoch"},
                                 step=int(entry["epoch"]))
        mark_cached(settings, run_id, cached)
    create_markdown_artifact(warm_start_markdown(report, out["model_dir"], cached=cached), key=WARM_START_KEY,
                             description="Teacher warm start: kept trajectories and SFT loss")
    return {**out, "report": report, "cached": cached}


def grpo_overrides(warm: dict[str, Any] | None) -> list[str]:
    """Overrides that make GRPO start from a warm-started model (and not warm-start again)."""
    return [f"train.model={warm['model_dir']}", "warm_start.enabled=false"] if warm else []


def _episodes(settings: Any, episodes: str | None) -> str:
    path = episodes or str(episodes_path(settings))
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no episodes file; run the synthesize-distractors flow first")
    return path


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
    logger = get_run_logger()
    settings = load(profile, overrides, **{"train.backend": backend})
    path = _episodes(settings, episodes)
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


__all__ = ["TRAINING_CURVE_KEY", "WARM_START_KEY", "curve_markdown", "grpo_overrides", "train", "train_task",
           "warm_start", "warm_start_task"]
