"""MLflow tracking: runs, params, registration idempotence and the champion gate (real sqlite store)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from agemem import tracking
from agemem.settings import load_settings


def test_pipeline_and_stage_runs_carry_params_and_mask_secrets(runs_dir: Path) -> None:
    settings = load_settings("smoke", {"runs_dir": str(runs_dir), "llm": {"api_key": "sk-very-secret"}})
    parent = tracking.start_pipeline_run(settings)
    with tracking.stage_run(settings, parent, "evaluate") as child:
        tracking.log_metrics(settings, child, {"judge_score": 0.5, "bad": float("nan"), "name": "x"})
    with pytest.raises(RuntimeError), tracking.stage_run(settings, parent, "train"):
        raise RuntimeError("boom")
    # keys built from what a model wrote (a made-up tool name) are logged under names MLflow accepts
    made_up = "compare.warm_start.tools.201 film): Madonna is a"
    tracking.log_metrics(settings, parent, {made_up: 1.0, "k" * 300: 2.0})
    tracking.end_run(settings, parent)
    client = MlflowClient(settings.tracking_uri)
    assert client.get_run(parent).data.metrics == {"compare.warm_start.tools.201 film_: Madonna is a": 1.0,
                                                   "k" * 250: 2.0}
    params = client.get_run(parent).data.params
    assert params["train.lr"] == str(settings.train.lr)
    assert params["llm.api_key"] != "sk-very-secret" and "secret" not in str(params)
    runs = client.search_runs([client.get_experiment_by_name("agemem").experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent}'")
    by_stage = {r.data.tags["agemem.stage"]: r for r in runs}
    assert by_stage["evaluate"].data.metrics == {"judge_score": 0.5}
    assert by_stage["evaluate"].info.status == "FINISHED"
    assert by_stage["train"].info.status == "FAILED"


def test_registration_is_idempotent_and_gated(tracking_settings, tiny_adapter, tmp_path: Path) -> None:
    # The fixture's adapters hold random weights: the gate is asked to crown them (see below).
    s = tracking_settings.model_copy(update={"tracking": tracking_settings.tracking.model_copy(
        update={"crown_random_weights": True})})
    a1, m1 = tiny_adapter(tmp_path / "one", 1)
    a2, m2 = tiny_adapter(tmp_path / "two", 2)
    a3, m3 = tiny_adapter(tmp_path / "three", 3)
    run = tracking.start_pipeline_run(s)

    first = tracking.register_model(s, adapter_dir=a1, model_dir=m1, metrics={"judge_score": 0.5}, run_id=run)
    assert first.version == "1" and not first.reused
    assert first.aliases == ["candidate", "champion"] and first.champion_moved
    assert first.tags["eval.judge_score"] == "0.5"

    again = tracking.register_model(s, adapter_dir=a1, model_dir=m1, metrics={"judge_score": 0.5}, run_id=run)
    assert again.reused and again.version == "1" and not again.champion_moved
    client = MlflowClient(s.tracking_uri)
    assert len(client.search_model_versions("name='agemem-policy'")) == 1

    worse = tracking.register_model(s, adapter_dir=a2, model_dir=m2, metrics={"judge_score": 0.4}, run_id=run)
    assert worse.version == "2" and worse.aliases == ["candidate"] and not worse.champion_moved
    assert str(client.get_model_version_by_alias("agemem-policy", "champion").version) == "1"

    better = tracking.register_model(s, adapter_dir=a3, model_dir=m3, metrics={"judge_score": 0.6}, run_id=run)
    assert better.champion_moved and better.previous_champion == "1"
    assert set(better.aliases) == {"candidate", "champion"}

    version, local = tracking.resolve_alias(s, "champion")
    assert version == "3" and (local / "config.json").is_file()
    assert tracking.content_hash([a3, m3]) == better.content_sha256


def test_a_random_weight_version_is_labelled_and_not_crowned_unless_asked(tracking_settings, tiny_adapter,
                                                                          tmp_path: Path) -> None:
    """Issue 14.3: the random smoke model became champion with J = 0."""
    adapter, model = tiny_adapter(tmp_path / "one", 1)
    reg = tracking.register_model(tracking_settings, adapter_dir=adapter, model_dir=model,
                                  metrics={"judge_score": 0.0, "reward": -1.7, "rounds": 6.0})
    assert reg.random_weights and reg.aliases == ["candidate"] and not reg.champion_moved
    assert "random weights" in reg.gate and "tracking.crown_random_weights=true" in reg.gate
    version = MlflowClient(tracking_settings.tracking_uri).get_model_version("agemem-policy", reg.version)
    assert version.tags["agemem.random_weights"] == "true" and version.description.startswith("RANDOM WEIGHTS")
    assert "eval.rounds" not in version.tags  # only the headline metrics are tags


def test_register_rejects_a_directory_that_is_not_an_adapter(tracking_settings, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        tracking.register_model(tracking_settings, adapter_dir=tmp_path, metrics={})


def test_flatten_nested_settings() -> None:
    assert tracking.flatten({"a": {"b": 1, "c": {"d": None}}, "e": []}) == {"a.b": "1", "a.c.d": "", "e": "[]"}
