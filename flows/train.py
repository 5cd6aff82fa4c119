"""Training flow: GRPO with the local trainer (CPU / one GPU) or verl (GPUs, Ray).

The task is cached by input hash (episodes bytes + :func:`agemem.train.run.inputs_hash`), so an
unchanged re-run does not train again; a run killed mid-training left no cache record, and the
re-run resumes from the newest checkpoint of the same configuration (verl: ``trainer.resume_mode=auto``).
The MLflow run id of the stage is handed to the trainer (``MLFLOW_RUN_ID`` for verl) so per-step
metrics land in the pipeline's run tree.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from agemem import tracking
from agemem.data.prepare import episodes_path
from agemem.logs import LogProgress
from agemem.train.curve import write_curve_plot
from agemem.train.models import RANDOM_WEIGHTS_LABEL, has_random_weights
from agemem.train.run import WARM_START_REPORT as REPORT_FILE
from agemem.train.run import config_hash, inputs_hash, set_aside_checkpoints, warm_start_hash
from agemem.train.run import run as run_training
from flows.common import (
    TRAIN_RETRIES,
    Profile,
    cache_policy,
    load,
    mark_cached,
    md_table,
    png_data_uri,
    random_weights_banner,
    run_cached,
    stage,
)

TRAINING_CURVE_KEY = "agemem-training-curve"
WARM_START_KEY = "agemem-warm-start"
_CURVE_COLUMNS = ("reward/mean", "reward/std", "reward/judge_score", "tools/any_call_rate", "episode/tool_call_count",
                  "episode/parse_failure_rate", "episode/answered_rate", "train/entropy", "train/kl_loss",
                  "train/grad_norm", "time/step_s")


@task(
    name="train-policy",
    cache_policy=cache_policy(files=("episodes",), hasher=inputs_hash, exclude=("mlflow_run_id", "force")),
    **TRAIN_RETRIES,
)
def train_task(settings: Any, episodes: str, mlflow_run_id: str | None = None, force: bool = False) -> dict[str, Any]:
    """Train (or resume) up to ``train.total_steps``; returns the :class:`TrainResult` as a dict.

    ``force``: the local trainer's checkpoints of this configuration are moved aside first (step 0).
    """
    if force and settings.train.backend == "local":
        set_aside_checkpoints(settings)
    logger, total = get_run_logger(), settings.train.total_steps
    steps: dict[int, LogProgress] = {}

    def progress(step: int, done: int, of: int) -> None:
        steps.setdefault(step, LogProgress(logger, f"step {step}/{total}: rollouts finished"))(done, of)

    return run_training(settings, Path(episodes), mlflow_run_id=mlflow_run_id, progress=progress).as_dict()


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
    artifact = create_markdown_artifact(warm_start_markdown(report, out["model_dir"], cached=cached),
                                        key=WARM_START_KEY, description="Teacher warm start: kept trajectories and SFT loss")
    return {**out, "report": report, "cached": cached, "artifact_id": str(artifact)}


def grpo_overrides(warm: dict[str, Any] | None) -> list[str]:
    """Overrides that make GRPO start from a warm-started model (and not warm-start again)."""
    return [f"train.model={warm['model_dir']}", "warm_start.enabled=false"] if warm else []


def _episodes(settings: Any, episodes: str | None) -> str:
    path = episodes or str(episodes_path(settings))
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no episodes file; run the synthesize-distractors flow first")
    return path


def curve_markdown(history: list[dict[str, Any]], *, backend: str, cached: bool, banner: list[str] | None = None,
                   plot: str | None = None) -> str:
    """The training-curve summary: first / last / best reward, the curve plot and a per-step table.

    ``banner``: lines shown under the title (the random-weights label); ``plot``: an image target.
    """
    lines = [f"# Training curve ({backend})", "", *(banner or [])]
    if cached:
        lines += ["_Reused from the Prefect cache: inputs unchanged, training not redone._", ""]
    if not history:
        return "\n".join(lines + ["No per-step history (see the MLflow run for verl's metrics)."]) + "\n"
    rewards = [float(h.get("reward/mean", 0.0)) for h in history]
    best = max(range(len(rewards)), key=rewards.__getitem__)
    lines += [md_table(["steps", "first reward", "last reward", "best reward (step)"],
                       [[len(history), rewards[0], rewards[-1], f"{rewards[best]:.3f} ({int(history[best]['step'])})"]]),
              ""]
    if plot:
        lines += [f"![reward and loss per step]({plot})", ""]
    columns = [c for c in _CURVE_COLUMNS if any(c in h for h in history)]
    lines.append(md_table(["step", *columns], [[int(h.get("step", i + 1)), *(float(h.get(c, 0.0)) for c in columns)]
                                              for i, h in enumerate(history)]))
    return "\n".join(lines) + "\n"


def _model_card(checkpoint_dir: str) -> Path | None:
    for folder in (Path(checkpoint_dir), Path(checkpoint_dir).parent):
        if (folder / "README.md").is_file():
            return folder / "README.md"
    return None


def _log_training(settings: Any, run_id: str, out: dict[str, Any], plot: Path | None, folder: Path) -> None:
    """The train stage run: final metrics, tags, and as artifacts the curve (plot + history), the
    configuration and the checkpoint's model card (files staged in ``folder``)."""
    last = out["history"][-1] if out["history"] else {}
    tracking.log_metrics(settings, run_id, {"train.steps": out["steps"],
                                            **{f"train.final.{k}": v for k, v in last.items() if k != "step"}})
    client = tracking.configure(settings)
    client.set_tag(run_id, "agemem.config_hash", out.get("config_hash") or config_hash(settings))
    client.set_tag(run_id, "agemem.random_weights", str(has_random_weights(settings.train.model)).lower())
    (folder / "history.json").write_text(json.dumps(out["history"], indent=2))
    (folder / "settings.json").write_text(json.dumps(settings.public_dict(), indent=2, default=str))
    tracking.log_artifacts(settings, run_id, [p for p in (plot, folder / "history.json") if p], "training")
    tracking.log_artifacts(settings, run_id, [folder / "settings.json"], "config")
    card = _model_card(out["checkpoint_dir"])
    if card is not None:
        tracking.log_artifacts(settings, run_id, [card], "model_card")


@flow(name="train")
def train(profile: Profile = "smoke", overrides: list[str] | None = None, backend: str | None = None,
          episodes: str | None = None, parent_run_id: str | None = None, force: bool = False) -> dict[str, Any]:
    """GRPO training on ``episodes`` (default ``<data.output_dir>/episodes.jsonl``); publishes the curve.

    Args:
        profile: Settings profile: "smoke" or "paper".
        overrides: Settings overrides as "section.key=value" strings.
        backend: Training backend, "local" or "verl"; empty = the profile's train.backend.
        episodes: episodes.jsonl to train on (default: the synthesize-distractors flow's output).
        parent_run_id: MLflow run to log under (the pipeline's parent run).
        force: Train from step 0 even when this configuration was trained (ignore the Prefect cache).
    """
    logger = get_run_logger()
    settings = load(profile, overrides, **{"train.backend": backend})
    path = _episodes(settings, episodes)
    label = f" [{RANDOM_WEIGHTS_LABEL}: {settings.train.model}]" if has_random_weights(settings.train.model) else ""
    with stage(settings, parent_run_id, "train") as run_id:
        out, cached = run_cached(train_task, settings, ["checkpoint_dir"], refresh=force, settings=settings,
                                 episodes=path, mlflow_run_id=run_id, force=force)
        logger.info("training (%s)%s: %d steps -> %s (%s)", settings.train.backend, label, out["steps"],
                    out["checkpoint_dir"], "cached: not redone" if cached else "trained")
        with tempfile.TemporaryDirectory(prefix="agemem-train-") as tmp:
            plot = write_curve_plot(out["history"], Path(tmp) / "curve.png", title=f"GRPO training{label}")
            _log_training(settings, run_id, out, plot, Path(tmp))
            image = png_data_uri(plot) if plot else None
        mark_cached(settings, run_id, cached)
    body = curve_markdown(out["history"], backend=settings.train.backend, cached=cached,
                          banner=random_weights_banner(settings), plot=image)
    artifact = create_markdown_artifact(body, key=TRAINING_CURVE_KEY, description=f"GRPO reward and loss per step{label}")
    return {**out, "cached": cached, "artifact_id": str(artifact), "flow_run_id": str(flow_run.id or "")}


__all__ = ["TRAINING_CURVE_KEY", "WARM_START_KEY", "curve_markdown", "grpo_overrides", "train", "train_task",
           "warm_start", "warm_start_task"]
