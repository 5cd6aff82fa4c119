"""The whole AgeMem pipeline: data -> distractors -> training -> evaluation -> registration.

Each stage is a subflow (visible on its own in the Prefect UI) and an MLflow child run of one
parent run per pipeline run. Re-running with unchanged inputs reuses the cached data (and
training) steps; re-running after a crash resumes where it stopped. The pipeline run publishes
its own summary artifact (``agemem-pipeline-summary``) linking each stage's artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from agemem import tracking
from agemem.inputs import check_pipeline_inputs
from agemem.settings import Settings
from agemem.train.models import RANDOM_WEIGHTS_LABEL, has_random_weights
from agemem.train.run import TrainResult, config_hash
from flows.common import Profile, artifact_link, load, md_table, random_weights_banner, timed
from flows.data import DATA_STATS_KEY, prepare_data, synthesize_distractors
from flows.evaluate import EVAL_REPORT_KEY, evaluate
from flows.register import REGISTRATION_KEY, register
from flows.train import TRAINING_CURVE_KEY, WARM_START_KEY, grpo_overrides, train, warm_start

#: Aggregates returned in the pipeline's result (all of them are in MLflow and the report).
HEADLINE = ("n", "judge_score", "em", "f1", "memory_quality", "reward", "rounds", "tool_call_count",
            "format_errors", "overflow_events", "judge_fallbacks", "errors")
#: The keyed artifact each stage publishes (linked from the pipeline run's summary).
STAGE_ARTIFACTS = {"prepare_data": DATA_STATS_KEY, "synthesize_distractors": DATA_STATS_KEY,
                   "warm_start": WARM_START_KEY, "train": TRAINING_CURVE_KEY, "evaluate": EVAL_REPORT_KEY, "register": REGISTRATION_KEY}


SUMMARY_KEY = "agemem-pipeline-summary"


def run_name(settings: Settings, flow_run_name: str | None) -> str:
    """The MLflow parent run's name: profile, backend, model, configuration hash, Prefect run name."""
    model = Path(settings.train.model).name or settings.train.model
    parts = [settings.profile, settings.train.backend, model, config_hash(settings)[:8], flow_run_name]
    return "-".join(p for p in parts if p)


@flow(name="agemem-pipeline")
def agemem_pipeline(profile: Profile = "smoke", overrides: list[str] | None = None, backend: str | None = None,
                    force: bool = False) -> dict:
    """Run every stage; returns where to look (MLflow run, registered version, Prefect run) and timings.

    Args:
        profile: Settings profile: "smoke" (CPU, shipped sample, tiny model) or "paper" (Qwen2.5-7B, verl).
        overrides: Settings overrides as "section.key=value" strings, e.g. "train.total_steps=200".
        backend: Training backend, "local" or "verl"; empty = the profile's train.backend.
        force: Rebuild the data and train from step 0 even when nothing changed (ignore the caches).
    """
    logger = get_run_logger()
    pairs = list(overrides or []) + ([f"train.backend={backend}"] if backend else [])
    settings = load(profile, pairs)
    check_pipeline_inputs(settings)  # before the MLflow parent run: a wrong path leaves no FAILED run
    timings: dict[str, float] = {}
    parent = tracking.start_pipeline_run(settings, run_name=run_name(settings, flow_run.name), tags={
        "prefect.flow_run_id": str(flow_run.id or ""), "agemem.backend": settings.train.backend,
        "agemem.config_hash": config_hash(settings), "agemem.random_weights": str(has_random_weights(settings.train.model)).lower()})
    logger.info("MLflow pipeline run %s (%s)", parent, settings.tracking_uri)
    stages: dict[str, dict] = {}
    try:
        with timed(timings, "prepare_data"):
            stages["prepare_data"] = prepare_data(profile, pairs, parent_run_id=parent, force=force)
        with timed(timings, "synthesize_distractors"):
            stages["synthesize_distractors"] = synthesize_distractors(
                profile, pairs, scripts=stages["prepare_data"]["scripts"], parent_run_id=parent, force=force)
        trained = _train_and_evaluate(profile, pairs, stages, timings, parent, force)
        with timed(timings, "register"):
            stages["register"] = register(profile, pairs, adapter_dir=trained["adapter_dir"],
                                          model_dir=trained["model_dir"], metrics=stages["evaluate"]["aggregates"],
                                          parent_run_id=parent)
    except BaseException:
        tracking.end_run(settings, parent, status="FAILED")
        raise
    tracking.log_metrics(settings, parent, {f"time.{k}_s": v for k, v in timings.items()})
    tracking.end_run(settings, parent)
    result = _result(settings, parent, stages, timings)
    result["summary_artifact_id"] = _publish_summary(settings, result, stages)
    reg = stages["register"]
    logger.info("registered %s v%s %s%s; J=%.3f; stage times %s", reg["name"], reg["version"], reg["aliases"],
                f" [{RANDOM_WEIGHTS_LABEL}]" if reg["random_weights"] else "",
                result["metrics"]["judge_score"] or 0.0, timings)
    return result


def _train_and_evaluate(profile: str, pairs: list[str], stages: dict[str, dict], timings: dict[str, float],
                        parent: str, force: bool) -> dict:
    """Warm start (when enabled), GRPO from it, evaluation beside the base and warm start (when asked)."""
    episodes = stages["synthesize_distractors"]["episodes"]
    settings = load(profile, pairs)
    warm = None
    if settings.warm_start.enabled:
        with timed(timings, "warm_start"):
            stages["warm_start"] = warm = warm_start(profile, pairs, episodes=episodes, parent_run_id=parent)
    with timed(timings, "train"):
        stages["train"] = trained = train(profile, pairs + grpo_overrides(warm), episodes=episodes,
                                          parent_run_id=parent, force=force)
    model_path = str(TrainResult.from_dict(trained).policy_path)
    with timed(timings, "evaluate"):
        stages["evaluate"] = evaluate(profile, pairs, model_path=model_path, episodes=episodes, parent_run_id=parent,
                                      label="GRPO", compare=_compared(settings, warm))
    return trained


def _result(settings: Settings, parent: str, stages: dict[str, dict], timings: dict[str, float]) -> dict:
    reg, evaluated, trained = stages["register"], stages["evaluate"], stages["train"]
    return {
        "flow_run_id": str(flow_run.id) if flow_run.id else None,
        "mlflow_run_id": parent,
        "mlflow_run": tracking.run_url(settings, parent),
        "tracking_uri": settings.tracking_uri,
        "model": {"name": reg["name"], "version": reg["version"], "aliases": reg["aliases"],
                  "uri": reg["model_uri"], "reused": reg["reused"], "gate": reg["gate"],
                  "random_weights": reg["random_weights"]},
        "metrics": {k: evaluated["aggregates"].get(k) for k in HEADLINE},
        "policy": evaluated["label"],
        "report": evaluated["report"],
        "checkpoint": trained["checkpoint_dir"],
        "cached": {k: stages[k]["cached"] for k in ("prepare_data", "synthesize_distractors", "warm_start", "train")
                   if k in stages},
        "timings": timings,
        "artifacts": {name: stage["artifact_id"] for name, stage in stages.items()},
        "train_flow_run_id": trained.get("flow_run_id"),
    }


def _compared(settings: Any, warm: dict[str, Any] | None) -> dict[str, str] | None:
    """The checkpoints the report sets beside GRPO's numbers (``eval.compare_checkpoints``)."""
    if not settings.eval.compare_checkpoints:
        return None
    return {"base": settings.train.model, **({"warm start": warm["model_dir"]} if warm else {})}


def _publish_summary(settings: Settings, result: dict, stages: dict[str, dict]) -> str:
    """The pipeline run's own artifact: one row per stage with its outcome and a link to its artifact."""
    model = result["model"]
    outcome = {
        "prepare_data": "cached" if stages["prepare_data"]["cached"] else "built",
        "synthesize_distractors": "cached" if stages["synthesize_distractors"]["cached"] else "built",
        **({"warm_start": f"kept {stages['warm_start']['report']['kept']} of "
                          f"{stages['warm_start']['report']['trajectories']} teacher trajectories"
                          + (" (cached)" if stages["warm_start"]["cached"] else "")} if "warm_start" in stages else {}),
        "train": f"{stages['train']['steps']} steps" + (" (cached)" if stages["train"]["cached"] else ""),
        "evaluate": f"J={result['metrics']['judge_score'] or 0.0:.3f} on {int(result['metrics']['n'] or 0)} questions",
        "register": f"{model['name']} v{model['version']} ({', '.join(model['aliases'])})",
    }
    rows = [[name, outcome[name], f"{result['timings'].get(name, 0.0):.1f}",
             f"[{STAGE_ARTIFACTS[name]}]({artifact_link(stages[name]['artifact_id'])})"] for name in outcome]
    mlflow = result["mlflow_run"]
    lines = [f"# AgeMem pipeline ({settings.profile}, {settings.train.backend}, {settings.train.model})", "",
             *random_weights_banner(settings),
             md_table(["stage", "outcome", "seconds", "artifact"], rows), "",
             f"- champion gate: {model['gate']}",
             f"- MLflow: {f'[parent run]({mlflow})' if mlflow.startswith('http') else mlflow}",
             f"- evaluation report on disk: `{result['report']}`", ""]
    return str(create_markdown_artifact("\n".join(lines), key=SUMMARY_KEY,
                                        description="Stages of this pipeline run, with links to their artifacts"))


__all__ = ["SUMMARY_KEY", "agemem_pipeline", "run_name"]
