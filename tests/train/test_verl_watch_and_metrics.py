"""What a verl run reports: our per-step rollout metrics from segment rows, the rollout-vs-actor watch on
verl's own console lines, and the MLflow run verl's real Tracking ends (reopened, checked for metrics)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agemem.settings import load_settings
from agemem.train.verl.sampler import segment_rollout_metrics
from agemem.train.verl.watch import PROBS_DIFF_KEY, ProbsDiffWatch, parse_console_metrics


def _fields(score: float, *, answered: bool = True, truncated: bool = False) -> dict:
    return {"answered": answered, "tool_calls": {"Add_memory": {"ok": 2}, "Retrieve_memory": {"ok": 1, "error": 1}},
            "total_rounds": 4, "format_error_count": 1, "model_tokens": {"1": 10, "3": 5}, "truncated": truncated,
            "reward_extra_info": {"score": score, "task": score, "r_storage": 0.5}}


def test_segment_metrics_use_the_last_segment_and_count_groups_and_truncation() -> None:
    keys = ["a_0_0", "a_0_1", "a_1_0", "b_0_0", "b_0_1", "b_0_2"]
    rows = [_fields(0.0), _fields(1.0), _fields(0.0, answered=False), _fields(0.5), _fields(0.5, truncated=True),
            _fields(0.5)]
    out = segment_rollout_metrics(keys, rows)
    assert out["rollout/trajectories"] == 3 and out["rollout/segments_per_trajectory"] == 2
    assert out["rollout/truncated_segments"] == 1
    assert out["rollout/single_trajectory_groups"] == 1  # group b: one trajectory, GRPO uses its raw score
    assert out["reward/mean"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    assert out["tools/Retrieve_memory"] == 2 and out["episode/parse_failure_rate"] == pytest.approx(0.25)
    assert out["episode/answered_rate"] == pytest.approx(2 / 3) and out["episode/response_tokens"] == 15


def test_watch_parses_verls_console_lines_and_warns_on_zero_or_exploding_difference() -> None:
    from verl.utils.logger.aggregate_logger import concat_dict_to_str

    line = concat_dict_to_str({PROBS_DIFF_KEY: np.float64(0.012), "reward/mean": 0.5, "note": "x"}, step=3)
    assert parse_console_metrics(line) == (3, {PROBS_DIFF_KEY: 0.012, "reward/mean": 0.5})
    assert parse_console_metrics("(TaskRunner pid=1) loading weights") is None
    seen: list[str] = []
    healthy = ProbsDiffWatch(seen.append)
    for step, value in enumerate((0.01, 0.012, 0.011), 1):
        healthy(concat_dict_to_str({PROBS_DIFF_KEY: value}, step=step))
    assert healthy.warnings == [] and len(seen) == 3  # every line still reaches the sink
    exploded = ProbsDiffWatch(lambda _: None)
    for step, value in enumerate((0.01, 0.5), 1):
        exploded(concat_dict_to_str({PROBS_DIFF_KEY: value}, step=step))
    assert len(exploded.warnings) == 1 and "weight sync" in exploded.warnings[0]
    zero = ProbsDiffWatch(lambda _: None)
    for step in (1, 2):
        zero(concat_dict_to_str({PROBS_DIFF_KEY: 0.0}, step=step))
    assert len(zero.warnings) == 1 and "exactly 0" in zero.warnings[0]


def test_settle_reopens_the_run_verls_logger_ended_and_fails_without_metrics(
    runs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from verl.utils.tracking import Tracking

    from agemem import tracking
    from agemem.train.verl.launch import settle_mlflow_run

    settings = load_settings("smoke", {"runs_dir": str(runs_dir)})
    run_id = tracking.start_pipeline_run(settings)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.tracking_uri)
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    logger = Tracking(project_name=settings.tracking.experiment, experiment_name="x", default_backend=["mlflow"])
    logger.log({"training/global_step": 1, "reward/mean": 0.2}, step=1)
    logger.finish()
    client = tracking.configure(settings)
    assert client.get_run(run_id).info.status == "FINISHED"  # verl ended the pipeline's run
    settle_mlflow_run(settings, run_id)
    assert client.get_run(run_id).info.status == "RUNNING"

    untracked = tracking.start_pipeline_run(settings)
    with pytest.raises(RuntimeError, match="logged no metrics"):
        settle_mlflow_run(settings, untracked)
