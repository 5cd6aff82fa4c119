"""The whole AgeMem pipeline: data -> distractors -> training -> evaluation -> registration.

Each stage is a subflow (visible on its own in the Prefect UI) and an MLflow child run of one
parent run per pipeline run. Re-running with unchanged inputs reuses the cached data (and
training) steps; re-running after a crash resumes where it stopped.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from agemem import tracking
from agemem.train.run import TrainResult
from flows.common import load, timed
from flows.data import prepare_data, synthesize_distractors
from flows.evaluate import evaluate
from flows.register import register
from flows.train import grpo_overrides, train, warm_start

#: Aggregates returned in the pipeline's result (all of them are in MLflow and the report).
HEADLINE = ("n", "judge_score", "em", "f1", "memory_quality", "reward", "rounds", "tool_call_count",
            "format_errors", "overflow_events", "judge_fallbacks", "errors")


@flow(name="agemem-pipeline")
def agemem_pipeline(profile: str = "smoke", overrides: list[str] | None = None, backend: str | None = None) -> dict:
    """Run every stage; returns where to look (MLflow run, registered version, Prefect run) and timings.

    Args:
        profile: Settings profile: "smoke" (CPU, shipped sample, tiny model) or "paper" (Qwen2.5-7B, verl).
        overrides: Settings overrides as "section.key=value" strings, e.g. "train.total_steps=200".
        backend: Training backend, "local" or "verl"; empty = the profile's train.backend.
    """
    logger = get_run_logger()
    pairs = list(overrides or []) + ([f"train.backend={backend}"] if backend else [])
    settings = load(profile, pairs)
    timings: dict[str, float] = {}
    parent = tracking.start_pipeline_run(settings, tags={"prefect.flow_run_id": str(flow_run.id or ""),
                                                         "agemem.backend": settings.train.backend})
    logger.info("MLflow pipeline run %s (%s)", parent, settings.tracking_uri)
    try:
        with timed(timings, "prepare_data"):
            scripts = prepare_data(profile, pairs, parent_run_id=parent)
        with timed(timings, "synthesize_distractors"):
            data = synthesize_distractors(profile, pairs, scripts=scripts["scripts"], parent_run_id=parent)
        warm = None
        if settings.warm_start.enabled:
            with timed(timings, "warm_start"):
                warm = warm_start(profile, pairs, episodes=data["episodes"], parent_run_id=parent)
        with timed(timings, "train"):
            trained = train(profile, pairs + grpo_overrides(warm), episodes=data["episodes"], parent_run_id=parent)
        model_path = str(TrainResult.from_dict(trained).policy_path)
        with timed(timings, "evaluate"):
            evaluated = evaluate(profile, pairs, model_path=model_path, episodes=data["episodes"],
                                 parent_run_id=parent, label="GRPO", compare=_compared(settings, warm))
        with timed(timings, "register"):
            reg = register(profile, pairs, adapter_dir=trained["adapter_dir"], model_dir=trained["model_dir"],
                           metrics=evaluated["aggregates"], parent_run_id=parent)
    except BaseException:
        tracking.end_run(settings, parent, status="FAILED")
        raise
    tracking.log_metrics(settings, parent, {f"time.{k}_s": v for k, v in timings.items()})
    tracking.end_run(settings, parent)
    result = {
        "flow_run_id": str(flow_run.id) if flow_run.id else None,
        "mlflow_run_id": parent,
        "mlflow_run": tracking.run_url(settings, parent),
        "tracking_uri": settings.tracking_uri,
        "model": {"name": reg["name"], "version": reg["version"], "aliases": reg["aliases"],
                  "uri": reg["model_uri"], "reused": reg["reused"], "gate": reg["gate"]},
        "metrics": {k: evaluated["aggregates"].get(k) for k in HEADLINE},
        "report": evaluated["report"],
        "checkpoint": trained["checkpoint_dir"],
        "cached": {"prepare_data": scripts["cached"], "synthesize_distractors": data["cached"],
                   **({"warm_start": warm["cached"]} if warm else {}), "train": trained["cached"]},
        "timings": timings,
    }
    logger.info("registered %s v%s %s; J=%.3f; stage times %s", reg["name"], reg["version"], reg["aliases"],
                result["metrics"]["judge_score"] or 0.0, timings)
    return result


def _compared(settings: Any, warm: dict[str, Any] | None) -> dict[str, str] | None:
    """The checkpoints the report sets beside GRPO's numbers (``eval.compare_checkpoints``)."""
    if not settings.eval.compare_checkpoints:
        return None
    return {"base": settings.train.model, **({"warm start": warm["model_dir"]} if warm else {})}


__all__ = ["agemem_pipeline"]
