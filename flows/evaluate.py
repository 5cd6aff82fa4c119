"""Evaluation flows: ``evaluate`` (a checkpoint, an endpoint or the scripted policy) and
``evaluate_champion`` (the nightly check of the registry's champion).

Evaluation calls the judge (an LLM endpoint in the paper profile), so the task retries with
exponential backoff; inside it, a judge that times out or answers garbage is retried by the LLM
client, then scored offline and flagged per question (``judge_fallback``), so a flaky judge slows
a run down but never hangs or fails it. Evaluation is not cached: it is what a nightly run is for.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from agemem import tracking
from agemem.data.prepare import episodes_path
from agemem.eval.report import comparison_markdown, render_markdown
from agemem.eval.runner import ROWS_FILE, TRANSCRIPTS_DIR
from agemem.eval.runner import evaluate as run_evaluation
from agemem.logs import LogProgress
from flows.common import OUTSIDE_RETRIES, Profile, artifact_link, load, png_data_uri, stage

EVAL_REPORT_KEY = "agemem-eval-report"
CHAMPION_REPORT_KEY = "agemem-champion-eval"


#: Transcripts published as their own artifacts (linked from the report); the rest are in MLflow.
TRANSCRIPT_ARTIFACTS = 20


@task(name="evaluate-policy", cache_policy=NO_CACHE, **OUTSIDE_RETRIES)
def evaluate_task(settings: Any, episodes: str, model_path: str | None = None,
                  output_dir: str | None = None) -> dict[str, Any]:
    """Run the episode engine over the evaluation episodes; returns aggregates and report paths.

    ``model_path``: a checkpoint directory or a ``models:/`` URI (default: ``eval.model``, else the
    newest checkpoint of the current training configuration).
    """
    result = run_evaluation(settings, Path(episodes), model_path=model_path,
                            output_dir=Path(output_dir) if output_dir else None,
                            progress=LogProgress(get_run_logger(), "questions evaluated (episode + judge)"))
    return {"aggregates": result.aggregates, "report": str(result.report_path), "plot": str(result.plot_path),
            "rows": str(result.output_dir / ROWS_FILE), "output_dir": str(result.output_dir), "label": result.label,
            "random_weights": result.random_weights, "meta": result.meta, "title": result.title}


def _log_eval(settings: Any, run_ids: list[str | None], out: dict[str, Any]) -> None:
    for run_id in filter(None, run_ids):
        tracking.log_metrics(settings, run_id, {f"eval.{k}": v for k, v in out["aggregates"].items()})
    if run_ids and run_ids[0]:
        client = tracking.configure(settings)
        client.set_tag(run_ids[0], "agemem.policy", out["label"][:5000])
        client.set_tag(run_ids[0], "agemem.random_weights", str(bool(out.get("random_weights"))).lower())
        report = Path(out["report"])
        tracking.log_artifacts(settings, run_ids[0], [report, Path(out["plot"]), Path(out["rows"]),
                                                      report.with_name("aggregates.json")], "eval")
        transcripts = report.with_name(TRANSCRIPTS_DIR)
        if transcripts.is_dir():
            tracking.log_artifacts(settings, run_ids[0], [transcripts], f"eval/{TRANSCRIPTS_DIR}")


def _publish(out: dict[str, Any], key: str, description: str, extra: str = "") -> str:
    """The report as a Prefect artifact: the plot embedded, each question linked to its transcript
    (published as its own artifact); returns the report artifact's id."""
    rows = [json.loads(line) for line in Path(out["rows"]).read_text(encoding="utf-8").splitlines() if line]
    links: dict[str, str] = {}
    base = Path(out["output_dir"])
    for row in rows[:TRANSCRIPT_ARTIFACTS]:
        name = row.get("transcript_file")
        if name and (base / name).is_file():
            art = create_markdown_artifact((base / name).read_text(encoding="utf-8"),
                                           description=f"Transcript of {row['episode_id']} ({out['label']})")
            links[str(row["episode_id"])] = artifact_link(art)
    body = render_markdown(out["aggregates"], rows, title=out.get("title") or f"AgeMem evaluation: {out['label']}",
                           meta=out.get("meta"), plot=png_data_uri(out["plot"]),
                           link=lambda row: links.get(str(row.get("episode_id"))))
    return str(create_markdown_artifact(body + (f"\n{extra}" if extra else ""), key=key, description=description))


def _episodes_or_default(settings: Any, episodes: str | None) -> str:
    path = episodes or str(episodes_path(settings))
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no episodes file; run the synthesize-distractors flow first")
    return path


@flow(name="evaluate")
def evaluate(profile: Profile = "smoke", overrides: list[str] | None = None, model_path: str | None = None,
             episodes: str | None = None, parent_run_id: str | None = None, label: str | None = None,
             compare: dict[str, str] | None = None) -> dict[str, Any]:
    """Evaluate ``model_path`` (or ``eval.policy``) on the eval episodes; publishes the report.

    Args:
        profile: Settings profile: "smoke" or "paper".
        overrides: Settings overrides as "section.key=value" strings.
        model_path: A checkpoint directory or a models:/ URI (default: eval.model, else the newest
            checkpoint of the current training configuration).
        episodes: episodes.jsonl to evaluate on (default: the synthesize-distractors flow's output).
        parent_run_id: MLflow run to log under (the pipeline's parent run).
        label: The checkpoint's name in the report (e.g. "GRPO").
        compare: More checkpoints by name (e.g. the base and the warm start), evaluated on the same
            questions and shown in one table with this one.
    """
    logger = get_run_logger()
    settings = load(profile, overrides)
    path = _episodes_or_default(settings, episodes)
    with stage(settings, parent_run_id, "evaluate") as run_id:
        out = evaluate_task(settings, path, model_path)
        _log_eval(settings, [run_id, parent_run_id], out)
        compared = _compare(settings, path, out, label, compare or {}, run_id)
    agg = out["aggregates"]
    if agg.get("judge_fallbacks"):
        logger.warning("%d of %d answers were scored by the offline fallback (judge unavailable or unparseable)",
                       int(agg["judge_fallbacks"]), int(agg.get("n", 0)))
    name = f"{label} ({out['label']})" if label else out["label"]
    logger.info("evaluated %s: J=%.3f EM=%.3f F1=%.3f MQ=%.3f; report %s", name, agg.get("judge_score", 0.0),
                agg.get("em", 0.0), agg.get("f1", 0.0), agg.get("memory_quality", 0.0), out["report"])
    artifact = _publish(out, EVAL_REPORT_KEY, f"Evaluation of {name}", extra=compared)
    return {**out, "mlflow_run_id": run_id, "artifact_id": artifact, "compared": compared}


def _compare(settings: Any, episodes: str, out: dict[str, Any], label: str | None, compare: dict[str, str],
             run_id: str) -> str:
    """Evaluate ``compare``'s checkpoints on the same questions; the table (also appended to the report)."""
    if not compare:
        return ""
    results = {name: evaluate_task(settings, episodes, other,
                                   str(Path(out["output_dir"]) / f"compare-{_slug(name)}"))["aggregates"]
               for name, other in compare.items()}
    results[label or out["label"]] = out["aggregates"]
    table = comparison_markdown(results)
    with Path(out["report"]).open("a", encoding="utf-8") as fh:
        fh.write("\n" + table)
    for name, agg in results.items():
        tracking.log_metrics(settings, run_id, {f"compare.{_slug(name)}.{k}": v for k, v in agg.items()})
    return table


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in label.lower()).strip("_")


@flow(name="evaluate-champion")
def evaluate_champion(profile: Profile = "smoke", overrides: list[str] | None = None,
                      alias: str = "champion") -> dict:
    """Nightly: download ``<tracking.registered_model>@alias``, evaluate it, record the result.

    One MLflow parent run per night (``nightly-<alias>-v<version>-<date>``) holds the data and
    evaluation stage runs. The data steps run as cached subflows (nothing is rebuilt when inputs are
    unchanged). The metrics go onto the version as ``nightly.<metric>`` tags (the gate's ``eval.*``
    tags from registration are left alone).

    Args:
        profile: Settings profile: "smoke" or "paper".
        overrides: Settings overrides as "section.key=value" strings, e.g. "eval.limit=500".
        alias: Registry alias of the agemem-policy version to evaluate ("champion" or "candidate").
    """
    from flows.data import prepare_data, synthesize_distractors

    logger = get_run_logger()
    settings = load(profile, overrides)
    version, model_dir = _resolve(settings, alias)
    name = settings.tracking.registered_model
    logger.info("evaluating %s v%s (@%s) from %s", name, version, alias, model_dir)
    parent = tracking.start_pipeline_run(
        settings, run_name=f"nightly-{alias}-v{version}-{time.strftime('%Y-%m-%d')}",
        tags={"agemem.kind": "nightly", "agemem.alias": alias, "agemem.model_version": version,
              "prefect.flow_run_id": str(flow_run.id or "")})
    try:
        scripts = prepare_data(profile, overrides, parent_run_id=parent)
        data = synthesize_distractors(profile, overrides, scripts=scripts["scripts"], parent_run_id=parent)
        with stage(settings, parent, f"evaluate-{alias}") as run_id:
            client = tracking.configure(settings)
            client.set_tag(run_id, "agemem.model_version", version)
            client.set_tag(run_id, "agemem.alias", alias)
            out = evaluate_task(settings, data["episodes"], str(model_dir))
            _log_eval(settings, [run_id, parent], out)
            _tag_version(settings, version, out["aggregates"])
    except BaseException:
        tracking.end_run(settings, parent, status="FAILED")
        raise
    tracking.end_run(settings, parent)
    artifact = _publish(out, CHAMPION_REPORT_KEY, f"Nightly evaluation of {name} v{version} (@{alias})")
    return {**out, "version": version, "alias": alias, "mlflow_run_id": run_id, "mlflow_parent_run_id": parent,
            "artifact_id": artifact}


def _tag_version(settings: Any, version: str, aggregates: dict[str, float]) -> None:
    client = tracking.configure(settings)
    name = settings.tracking.registered_model
    for key in ("judge_score", "em", "f1", "memory_quality", "judge_fallbacks"):
        if key in aggregates:
            client.set_model_version_tag(name, version, f"nightly.{key}", repr(float(aggregates[key])))
    client.set_model_version_tag(name, version, "nightly.at", time.strftime("%Y-%m-%dT%H:%M:%S"))


@task(name="resolve-alias", cache_policy=NO_CACHE, **OUTSIDE_RETRIES)
def _resolve_task(settings: Any, alias: str) -> tuple[str, str]:
    version, path = tracking.resolve_alias(settings, alias)
    return version, str(path)


def _resolve(settings: Any, alias: str) -> tuple[str, Path]:
    # A missing alias is not transient: say so at once instead of retrying it three times.
    client = tracking.configure(settings)
    try:
        client.get_model_version_by_alias(settings.tracking.registered_model, alias)
    except Exception as exc:  # noqa: BLE001 - MlflowException: no such model or alias
        raise LookupError(f"registered model {settings.tracking.registered_model!r} has no alias {alias!r} in "
                          f"{settings.tracking_uri}; run the pipeline first") from exc
    version, path = _resolve_task(settings, alias)
    return version, Path(path)


__all__ = ["CHAMPION_REPORT_KEY", "EVAL_REPORT_KEY", "evaluate", "evaluate_champion", "evaluate_task"]
