"""The Prefect flows on a tiny slice: real Prefect (one shared test harness), real MLflow sqlite
store, real training of the tiny random model, real evaluation with the offline judge."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from prefect import flow, task

from agemem.reward.metrics import f1_score
from agemem.settings import load_settings

STAGES = {"prepare_data", "synthesize_distractors", "warm_start", "train", "evaluate", "register"}


async def _artifacts(keys: list[str]) -> dict[str, list[Any]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    out: dict[str, list[Any]] = {k: [] for k in keys}
    for art in found:
        out[art.key].append(art)
    return out


async def _flow_logs(flow_run_ids: list[str]) -> list[Any]:
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        ids = [UUID(i) for i in flow_run_ids]
        children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=ids)))
        ids += [run.id for run in children]
        return await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))


def _check_mlflow(client: MlflowClient, first: dict[str, Any]) -> dict[str, Any]:
    """The first run's MLflow side: parent and stage runs, train artifacts, few version tags."""
    version = client.get_model_version_by_alias("agemem-policy", "candidate")
    assert str(version.version) == "1"
    assert float(version.tags["eval.judge_score"]) == pytest.approx(first["metrics"]["judge_score"])
    # A few headline tags only; every aggregate is a metric of the version's logged model.
    assert len([k for k in version.tags if k.startswith("eval.")]) <= 6, version.tags
    logged = client.get_logged_model(version.model_id or version.source.removeprefix("models:/"))
    assert {"eval.reward", "eval.rounds", "eval.tools.Add_memory"} & {m.key for m in logged.metrics}
    # The random-weight label follows the model into the registry.
    assert version.tags["agemem.random_weights"] == "true" and "RANDOM WEIGHTS" in version.description
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["prefect.flow_run_id"] == first["flow_run_id"]
    assert parent.info.run_name.startswith("smoke-local-tiny-random-qwen2-")
    assert "eval.judge_score" in parent.data.metrics and "eval.memory_quality" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{first['mlflow_run_id']}'")
    by_stage = {r.data.tags["agemem.stage"]: r for r in children}
    assert set(by_stage) == STAGES and all(r.info.status == "FINISHED" for r in children)
    train_run = by_stage["train"].info.run_id
    # The trainer logged its steps into the train stage's run (the run id was handed to it) ...
    assert len(client.get_metric_history(train_run, "reward/mean")) == 2
    # ... and the stage logged the curve, the configuration and the model card beside them.
    train_files = {a.path for folder in ("training", "config", "model_card")
                   for a in client.list_artifacts(train_run, folder)}
    assert {"training/curve.png", "training/history.json", "config/settings.json",
            "model_card/README.md"} <= train_files
    assert by_stage["train"].data.tags["agemem.random_weights"] == "true"
    eval_files = {a.path for a in client.list_artifacts(by_stage["evaluate"].info.run_id, "eval")}
    assert {"eval/report.md", "eval/plot.png", "eval/rows.jsonl", "eval/transcripts"} <= eval_files
    return by_stage


def _check_prefect(first: dict[str, Any]) -> None:
    """The first run's Prefect side: a summary on the pipeline run linking every stage's artifact,
    readable data stats, embedded plots, transcript links, the label, the library's log lines."""
    from flows.data import DATA_STATS_KEY
    from flows.evaluate import EVAL_REPORT_KEY
    from flows.pipeline import SUMMARY_KEY
    from flows.register import REGISTRATION_KEY
    from flows.train import TRAINING_CURVE_KEY

    keys = [DATA_STATS_KEY, TRAINING_CURVE_KEY, EVAL_REPORT_KEY, REGISTRATION_KEY, SUMMARY_KEY]
    arts = asyncio.run(_artifacts(keys))
    assert all(arts[k] for k in keys), {k: len(v) for k, v in arts.items()}
    latest = {k: max(v, key=lambda a: a.created) for k, v in arts.items()}
    summary = latest[SUMMARY_KEY]
    assert str(summary.flow_run_id) == first["flow_run_id"]
    for key in (DATA_STATS_KEY, TRAINING_CURVE_KEY, EVAL_REPORT_KEY, REGISTRATION_KEY):
        assert f"/artifacts/artifact/{latest[key].id}" in summary.data, key
    stats = latest[DATA_STATS_KEY].data
    assert "{" not in stats and ".000" not in stats and "| episodes | 4 |" in stats, stats
    curve, report = latest[TRAINING_CURVE_KEY].data, latest[EVAL_REPORT_KEY].data
    assert "reward" in curve and "](data:image/png;base64," in curve
    assert "## Aggregates" in report and "](data:image/png;base64," in report and "| episode | question |" in report
    # Each question links to its transcript, published as an artifact of its own.
    assert len(re.findall(r"\]\([^)]*/artifacts/artifact/[0-9a-f-]{36}\)", report)) == 2, report
    for key in (TRAINING_CURVE_KEY, EVAL_REPORT_KEY, REGISTRATION_KEY, SUMMARY_KEY):
        assert "RANDOM WEIGHTS" in latest[key].data, key
    messages = [(log.name, log.message) for log in asyncio.run(_flow_logs([first["flow_run_id"]]))]
    assert any(name == "agemem.train.local" and "step 2/2" in msg for name, msg in messages), messages[:20]
    assert any(name == "agemem.train.models" and "RANDOM WEIGHTS" in msg for name, msg in messages)


def _check_eval_command(overrides: list[str], first: dict[str, Any]) -> None:
    """Issue 14.6: ``agemem eval`` right after the pipeline evaluates the newest checkpoint of the same
    configuration, and takes a registry URI wherever it takes a model."""
    from typer.testing import CliRunner

    from agemem.cli import app

    sets = [arg for pair in overrides for arg in ("--set", pair)]
    newest = CliRunner().invoke(app, ["eval", "--profile", "smoke", "--json", *sets])
    assert newest.exit_code == 0, newest.output
    shown = json.loads(newest.output[newest.output.index("{"):])
    assert shown["policy"] == f"checkpoint:{first['checkpoint']} [RANDOM WEIGHTS]" and shown["random_weights"]
    registered = CliRunner().invoke(app, ["eval", "--profile", "smoke", "--json", *sets,
                                          "--model", "models:/agemem-policy@candidate"])
    assert registered.exit_code == 0, registered.output
    shown = json.loads(registered.output[registered.output.index("{"):])
    assert shown["policy"] == "models:/agemem-policy@candidate (v1) [RANDOM WEIGHTS]" and shown["n"] == 2.0
    missing = CliRunner().invoke(app, ["eval", "--profile", "smoke", *sets, "--model", "models:/agemem-policy@nope"])
    assert missing.exit_code == 2 and "has no alias 'nope'" in missing.output


def test_pipeline_registers_evaluates_publishes_and_reuses_cache(prefect_harness, tiny_pipeline_overrides,
                                                                 runs_dir: Path, caplog) -> None:
    from flows.evaluate import CHAMPION_REPORT_KEY, evaluate_champion
    from flows.pipeline import agemem_pipeline

    first = agemem_pipeline(profile="smoke", overrides=tiny_pipeline_overrides)

    # Quiet success: no ERROR record and no traceback (a fresh milvus-lite store used to log
    # pymilvus' AllocTimestamp "Method not implemented" twice, with tracebacks).
    loud = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, loud

    assert first["model"]["name"] == "agemem-policy" and first["model"]["version"] == "1"
    # The tiny random model is registered but not crowned unless asked.
    assert first["model"]["aliases"] == ["candidate"] and not first["model"]["reused"]
    assert first["model"]["random_weights"] and "not crowned" in first["model"]["gate"]
    assert first["policy"].endswith("[RANDOM WEIGHTS]")
    assert first["cached"] == {"prepare_data": False, "synthesize_distractors": False, "warm_start": False,
                               "train": False}
    assert first["metrics"]["n"] == 2.0 and first["flow_run_id"]
    assert set(first["timings"]) == STAGES

    settings = load_settings("smoke", tiny_pipeline_overrides)
    client = MlflowClient(settings.tracking_uri)
    _check_mlflow(client, first)
    _check_prefect(first)
    _check_eval_command(tiny_pipeline_overrides, first)

    # Unchanged inputs: the data steps and training come from the cache (files untouched). Asked to,
    # the gate crowns the random-weight version.
    scripts = Path(first["report"]).parents[2] / "data" / "scripts.jsonl"
    stamp = scripts.stat().st_mtime_ns
    crown = tiny_pipeline_overrides + ["tracking.crown_random_weights=true"]
    second = agemem_pipeline(profile="smoke", overrides=crown)
    assert second["cached"] == {"prepare_data": True, "synthesize_distractors": True, "warm_start": True, "train": True}
    assert scripts.stat().st_mtime_ns == stamp
    assert second["model"]["version"] == "1" and second["model"]["reused"]
    assert second["model"]["aliases"] == ["candidate", "champion"]
    assert len(client.search_model_versions("name='agemem-policy'")) == 1
    parent = client.get_run(first["mlflow_run_id"])
    cached_stage = client.search_runs([parent.info.experiment_id],
                                      f"tags.`mlflow.parentRunId` = '{second['mlflow_run_id']}' "
                                      "and tags.`agemem.stage` = 'prepare_data'")[0]
    assert cached_stage.data.tags["agemem.cached"] == "true"

    # The nightly flow evaluates the champion from the registry, under one parent run, and tags the version.
    nightly = evaluate_champion(profile="smoke", overrides=tiny_pipeline_overrides)
    assert nightly["version"] == "1" and nightly["aggregates"]["n"] == 2.0
    tags = client.get_model_version("agemem-policy", "1").tags
    assert "nightly.judge_score" in tags and "nightly.at" in tags
    assert asyncio.run(_artifacts([CHAMPION_REPORT_KEY]))[CHAMPION_REPORT_KEY]
    night = client.get_run(nightly["mlflow_parent_run_id"])
    assert night.info.run_name.startswith("nightly-champion-v1-") and night.info.status == "FINISHED"
    under = client.search_runs([parent.info.experiment_id],
                               f"tags.`mlflow.parentRunId` = '{nightly['mlflow_parent_run_id']}'")
    assert {r.data.tags["agemem.stage"] for r in under} == {"prepare_data", "synthesize_distractors",
                                                             "evaluate-champion"}

    # Issue 14.1: another seed is another configuration: trained anew (no resume of seed 42's
    # checkpoint), a different curve, a new version.
    reseeded = agemem_pipeline(profile="smoke", overrides=tiny_pipeline_overrides + ["train.seed=7"])
    assert reseeded["cached"]["train"] is False and reseeded["checkpoint"] != first["checkpoint"]
    assert reseeded["model"]["version"] == "2" and not reseeded["model"]["reused"]


def test_evaluate_champion_without_a_champion_says_what_to_do(prefect_harness, runs_dir: Path) -> None:
    from flows.evaluate import evaluate_champion

    with pytest.raises(LookupError, match="no alias 'champion'.*run the pipeline first"):
        evaluate_champion(profile="smoke", overrides=[f"runs_dir={runs_dir}"])


def test_outside_tasks_retry_with_exponential_backoff(prefect_harness) -> None:
    """A task with the flows' outside-world options fails once, is retried by Prefect, succeeds."""
    from flows.common import OUTSIDE_RETRIES, TRAIN_RETRIES
    from flows.data import prepare_scripts_task, synthesize_task
    from flows.evaluate import evaluate_task
    from flows.register import register_task
    from flows.train import train_task

    for t in (prepare_scripts_task, synthesize_task, evaluate_task, register_task):
        assert t.retries == 3 and t.retry_delay_seconds == [2, 4, 8] and t.retry_jitter_factor == 0.5, t.name
    assert train_task.retries == TRAIN_RETRIES["retries"] == 1

    calls: list[int] = []

    @task(**OUTSIDE_RETRIES)
    def flaky_download() -> str:
        calls.append(len(calls) + 1)
        if len(calls) == 1:
            raise ConnectionError("registry briefly unreachable")
        return "ok"

    @flow
    def wrapper() -> Any:
        return flaky_download(return_state=True)

    state = wrapper()
    assert state.is_completed() and state.result() == "ok"
    assert calls == [1, 2]


def _judge_overrides(fake, runs_dir: Path) -> list[str]:
    return [f"runs_dir={runs_dir}", "data.limit=4", "eval.policy=scripted", "eval.limit=2", "eval.split=all",
            "episode.max_turn_tokens=1024", "episode.max_context_tokens=4096",
            "judge.backend=openai", f"judge.base_url={fake.base_url}", "judge.api_key=test-key",
            f"judge.model={fake.model}", "judge.timeout_s=0.5", "judge.max_retries=1", "judge.backoff_s=0.01",
            "judge.parse_retries=1"]


@pytest.mark.parametrize("fault", ["timeout", "not_json", "unparseable"])
def test_judge_faults_are_retried_then_scored_offline_and_flagged(prefect_harness, fake_openai, runs_dir: Path,
                                                                  fault: str) -> None:
    from flows.data import prepare_data, synthesize_distractors
    from flows.evaluate import evaluate

    overrides = _judge_overrides(fake_openai, runs_dir)
    synthesize_distractors(profile="smoke", overrides=overrides,
                           scripts=prepare_data(profile="smoke", overrides=overrides)["scripts"])
    if fault == "timeout":
        fake_openai.delay_s = 3.0  # longer than judge.timeout_s
    elif fault == "not_json":
        fake_openai.garbage = True
    else:
        fake_openai.reply = "I would say it is mostly right"

    out = evaluate(profile="smoke", overrides=overrides)

    agg = out["aggregates"]
    assert agg["n"] == 2.0 and agg["errors"] == 0.0
    assert agg["judge_fallbacks"] == 2.0 and agg["judge_fallback_rate"] == 1.0
    rows = [json.loads(line) for line in Path(out["rows"]).read_text().splitlines()]
    assert all(r["judge_source"] == "fallback" and r["judge_fallback"] for r in rows)
    # Offline fallback score = token F1, exactly what the offline judge would give.
    assert all(r["judge_score"] == pytest.approx(f1_score(r["prediction"], r["gold_answer"])) for r in rows)
    # Retried: more judge requests than judged questions (answer + memory judge, each retried).
    assert fake_openai.count > 2 * len(rows)
    assert "(fallback)" in Path(out["report"]).read_text()


@pytest.mark.parametrize("args", [
    ["--set", "train.lr=fast"],
    ["--set", "train.lrr=1e-5"],
    ["--set", "data.source=/nope.json"],
    ["--set", "train.model=/nope/model.gguf"],
    ["--backend", "tpu"],
])
def test_pipeline_command_rejects_bad_input_in_one_line_before_starting(runs_dir: Path, args: list[str]) -> None:
    """Issue 14.7: ``--set data.source=/nope.json`` was a 324-line traceback and a FAILED MLflow run."""
    from typer.testing import CliRunner

    from agemem.cli import app

    bad = CliRunner().invoke(app, ["pipeline", *args, "--set", f"runs_dir={runs_dir}"])
    assert bad.exit_code == 2, bad.output
    lines = bad.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), bad.output
    assert args[1].split("=")[0] in lines[0] or "'local' or 'verl'" in lines[0] or "/nope" in lines[0]
    assert not (runs_dir / "mlflow.db").exists()  # neither MLflow nor Prefect was started


def test_pipeline_flow_checks_inputs_before_its_mlflow_run(prefect_harness, runs_dir: Path) -> None:
    """A deployment run with a wrong path fails at once and leaves no FAILED MLflow parent run behind;
    its ``profile`` parameter is validated by the schema the deployment enforces."""
    from prefect.utilities.callables import parameter_schema

    from agemem.data.hotpot import HotpotDataError
    from flows.evaluate import evaluate_champion
    from flows.pipeline import agemem_pipeline

    with pytest.raises(HotpotDataError, match="/nope.json"):
        agemem_pipeline(profile="smoke", overrides=[f"runs_dir={runs_dir}", "data.source=/nope.json"])
    settings = load_settings("smoke", [f"runs_dir={runs_dir}"])
    client = MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name(settings.tracking.experiment)
    assert experiment is None or not client.search_runs([experiment.experiment_id])
    for flow_fn in (agemem_pipeline, evaluate_champion):
        schema = parameter_schema(flow_fn).model_dump()
        profile = schema["properties"]["profile"]
        assert profile.get("enum") == ["smoke", "paper"] or \
            schema["definitions"][profile["$ref"].rsplit("/", 1)[1]]["enum"] == ["smoke", "paper"], profile
