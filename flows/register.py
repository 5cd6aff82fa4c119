"""Registration flow: log the trained policy to the MLflow registry, alias ``candidate``, gate
``champion`` on J.

Registration is idempotent by the adapter's content hash, so a retried or re-run task never
creates a duplicate version; the task retries because a registry server can be briefly down.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact

from agemem import tracking
from agemem.train.models import RANDOM_WEIGHTS_LABEL
from flows.common import OUTSIDE_RETRIES, Profile, load, md_table, random_weights_banner, stage

REGISTRATION_KEY = "agemem-registration"


@task(name="register-model", cache_policy=NO_CACHE, **OUTSIDE_RETRIES)
def register_task(settings: Any, adapter_dir: str | None, model_dir: str | None, metrics: dict[str, float],
                  run_id: str | None) -> dict[str, Any]:
    from pathlib import Path

    reg = tracking.register_model(settings, adapter_dir=Path(adapter_dir) if adapter_dir else None,
                                  model_dir=Path(model_dir) if model_dir else None, metrics=metrics, run_id=run_id)
    return asdict(reg)


@flow(name="register")
def register(profile: Profile = "smoke", overrides: list[str] | None = None, adapter_dir: str | None = None,
             model_dir: str | None = None, metrics: dict[str, float] | None = None,
             parent_run_id: str | None = None) -> dict[str, Any]:
    """Register a trained adapter / model with its eval metrics; publishes the outcome.

    Args:
        profile: Settings profile: "smoke" or "paper".
        overrides: Settings overrides as "section.key=value" strings.
        adapter_dir: The trained LoRA adapter (the train flow's output).
        model_dir: The trained (merged) HF model.
        metrics: The evaluation's aggregates (the gate compares tracking.gate_metric).
        parent_run_id: MLflow run to log under (the pipeline's parent run).
    """
    logger = get_run_logger()
    settings = load(profile, overrides)
    if not adapter_dir and not model_dir:
        raise ValueError("register needs adapter_dir or model_dir (the train flow's output)")
    with stage(settings, parent_run_id, "register") as run_id:
        reg = register_task(settings, adapter_dir, model_dir, dict(metrics or {}), run_id)
    label = f" [{RANDOM_WEIGHTS_LABEL}]" if reg["random_weights"] else ""
    logger.info("%s v%s%s aliases %s (%s); gate: %s", reg["name"], reg["version"], label, reg["aliases"],
                "existing version reused" if reg["reused"] else "new version", reg["gate"])
    gate_metric = settings.tracking.gate_metric
    body = "\n".join([
        f"# Registered {reg['name']} v{reg['version']}{label}", "",
        *(random_weights_banner(settings) if reg["random_weights"] else []),
        md_table(["field", "value"], [
            ["model URI", reg["model_uri"]], ["aliases", ", ".join(reg["aliases"])],
            ["new version", not reg["reused"]], ["champion moved", reg["champion_moved"]],
            ["previous champion", reg["previous_champion"] or "-"], ["gate", reg["gate"]],
            [gate_metric, (metrics or {}).get(gate_metric, "-")], ["random weights", reg["random_weights"]],
            ["content sha256", reg["content_sha256"][:16]],
        ]),
    ]) + "\n"
    artifact = create_markdown_artifact(body, key=REGISTRATION_KEY, description=f"MLflow registry outcome{label}")
    return {**reg, "mlflow_run_id": run_id, "artifact_id": str(artifact)}


__all__ = ["REGISTRATION_KEY", "register", "register_task"]
