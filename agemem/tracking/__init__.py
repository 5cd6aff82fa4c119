"""MLflow tracking (:mod:`agemem.tracking.runs`) and the model registry (:mod:`agemem.tracking.registry`)."""

from agemem.tracking.registry import (
    CANDIDATE,
    CHAMPION,
    Registration,
    apply_gate,
    content_hash,
    register_model,
    resolve_alias,
)
from agemem.tracking.runs import (
    artifact_root,
    configure,
    end_run,
    finite_metrics,
    flatten,
    log_artifacts,
    log_metrics,
    log_params,
    run_url,
    settings_params,
    stage_run,
    start_pipeline_run,
)

__all__ = [
    "CANDIDATE",
    "CHAMPION",
    "Registration",
    "apply_gate",
    "artifact_root",
    "configure",
    "content_hash",
    "end_run",
    "finite_metrics",
    "flatten",
    "log_artifacts",
    "log_metrics",
    "log_params",
    "register_model",
    "resolve_alias",
    "run_url",
    "settings_params",
    "stage_run",
    "start_pipeline_run",
]
