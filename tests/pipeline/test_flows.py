"""The Prefect flows on a tiny slice: real Prefect (one shared test harness), real MLflow sqlite
store, real training of the tiny random model, real evaluation with the offline judge."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from prefect import flow, task

from agemem.reward.metrics import f1_score
from agemem.settings import load_settings

STAGES = {"prepare_data", "synthesize_distractors", "train", "evaluate", "register"}


async def _artifacts(keys: list[str]) -> dict[str, list[Any]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    out: dict[str, list[Any]] = {k: [] for k in keys}
    for art in found:
        out[art.key].append(art)
    return out


def test_pipeline_registers_evaluates_publishes_and_reuses_cache(prefect_harness, tiny_pipeline_overrides,
                                                                 runs_dir: Path) -> None:
    from flows.data import DATA_STATS_KEY
    from flows.evaluate import CHAMPION_REPORT_KEY, EVAL_REPORT_KEY, evaluate_champion
    from flows.pipeline import agemem_pipeline
    from flows.register import REGISTRATION_KEY
    from flows.train import TRAINING_CURVE_KEY

    first = agemem_pipeline(profile="smoke", overrides=tiny_pipeline_overrides)

    assert first["model"]["name"] == "agemem-policy" and first["model"]["version"] == "1"
    assert first["model"]["aliases"] == ["candidate", "champion"] and not first["model"]["reused"]
    assert first["cached"] == {"prepare_data": False, "synthesize_distractors": False, "train": False}
    assert first["metrics"]["n"] == 2.0 and first["flow_run_id"]
    assert set(first["timings"]) == STAGES

    settings = load_settings("smoke", tiny_pipeline_overrides)
    client = MlflowClient(settings.tracking_uri)
    version = client.get_model_version_by_alias("agemem-policy", "candidate")
    assert str(version.version) == "1"
    assert float(version.tags["eval.judge_score"]) == pytest.approx(first["metrics"]["judge_score"])
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["prefect.flow_run_id"] == first["flow_run_id"]
    assert "eval.judge_score" in parent.data.metrics and "eval.memory_quality" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{first['mlflow_run_id']}'")
    by_stage = {r.data.tags["agemem.stage"]: r for r in children}
    assert set(by_stage) == STAGES and all(r.info.status == "FINISHED" for r in children)
    # The trainer logged its steps into the train stage's run (the run id was handed to it).
    assert len(client.get_metric_history(by_stage["train"].info.run_id, "reward/mean")) == 2
    eval_files = {a.path for a in client.list_artifacts(by_stage["evaluate"].info.run_id, "eval")}
    assert {"eval/report.md", "eval/plot.png", "eval/rows.jsonl"} <= eval_files

    keys = [DATA_STATS_KEY, TRAINING_CURVE_KEY, EVAL_REPORT_KEY, REGISTRATION_KEY]
    arts = asyncio.run(_artifacts(keys))
    assert all(arts[k] for k in keys), {k: len(v) for k, v in arts.items()}
    assert "reward" in arts[TRAINING_CURVE_KEY][0].data and "## Aggregates" in arts[EVAL_REPORT_KEY][0].data

    # Unchanged inputs: the data steps and training come from the cache (files untouched).
    scripts = Path(first["report"]).parents[2] / "data" / "scripts.jsonl"
    stamp = scripts.stat().st_mtime_ns
    second = agemem_pipeline(profile="smoke", overrides=tiny_pipeline_overrides)
    assert second["cached"] == {"prepare_data": True, "synthesize_distractors": True, "train": True}
    assert scripts.stat().st_mtime_ns == stamp
    assert second["model"]["version"] == "1" and second["model"]["reused"]
    assert len(client.search_model_versions("name='agemem-policy'")) == 1
    cached_stage = client.search_runs([parent.info.experiment_id],
                                      f"tags.`mlflow.parentRunId` = '{second['mlflow_run_id']}' "
                                      "and tags.`agemem.stage` = 'prepare_data'")[0]
    assert cached_stage.data.tags["agemem.cached"] == "true"

    # The nightly flow evaluates the champion from the registry and tags the version.
    nightly = evaluate_champion(profile="smoke", overrides=tiny_pipeline_overrides)
    assert nightly["version"] == "1" and nightly["aggregates"]["n"] == 2.0
    tags = client.get_model_version("agemem-policy", "1").tags
    assert "nightly.judge_score" in tags and "nightly.at" in tags
    assert asyncio.run(_artifacts([CHAMPION_REPORT_KEY]))[CHAMPION_REPORT_KEY]


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


def test_pipeline_command_rejects_bad_input_before_starting(runs_dir: Path) -> None:
    from typer.testing import CliRunner

    from agemem.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["pipeline", "--set", "train.lr=fast", "--set", f"runs_dir={runs_dir}"])
    assert bad.exit_code == 2 and "train.lr" in bad.output
    backend = runner.invoke(app, ["pipeline", "--backend", "tpu"])
    assert backend.exit_code == 2 and "'local' or 'verl'" in backend.output
    assert not (runs_dir / "mlflow.db").exists()
