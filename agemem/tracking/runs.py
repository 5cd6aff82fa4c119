"""MLflow runs: the store, one parent run per pipeline run, a child run per stage, metrics and artifacts.

Everything goes through MLflow's own APIs (``MlflowClient``); the store is whatever
``settings.tracking_uri`` names (a sqlite file under ``runs_dir`` by default, or an MLflow server).
Layout: one parent run per pipeline run (tag ``agemem.kind=pipeline``), one child run per stage
(``mlflow.parentRunId`` set, tag ``agemem.stage``); params are the settings, flattened
(``train.lr``), secrets masked by ``Settings.public_dict``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from agemem.settings import Settings

logger = logging.getLogger(__name__)

_MAX_PARAM_LEN = 6000  # MLflow's param value limit (8000 on recent stores); long lists are cut
# MLflow's rule for metric names (``validate_param_and_metric_name``, POSIX) and its key length cap.
_REFUSED_IN_KEYS = re.compile(r"[^/\w.\- :]")
_MAX_KEY_LEN = 250


# ------------------------------------------------------------------------------------- setup
def artifact_root(settings: "Settings") -> Path:
    """Where a local (sqlite) store keeps artifacts: ``<runs_dir>/mlartifacts``."""
    return settings.runs_dir / "mlartifacts"


def configure(settings: "Settings") -> "MlflowClient":
    """Point MLflow (fluent API and a client) at the settings' store; create the experiment.

    MLFLOW_TRACKING_URI wins only when ``tracking.tracking_uri`` is unset (settings are the one
    source of configuration; the env var is MLflow's own convention and users expect it to work).
    """
    import mlflow
    from mlflow import MlflowClient

    uri = settings.tracking_uri
    if uri.startswith("sqlite:"):
        settings.runs_dir.mkdir(parents=True, exist_ok=True)
    # mlflow.set_*_uri also export MLFLOW_*_URI; left there, the first store configured would
    # shadow the settings of every later call in this process (read above as the user's choice).
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = settings.tracking.experiment
    if client.get_experiment_by_name(name) is None:
        # A file store location only makes sense for a local store; a server picks its own.
        location = artifact_root(settings).as_uri() if uri.startswith(("sqlite:", "file:")) or "://" not in uri else None
        try:
            client.create_experiment(name, artifact_location=location)
        except Exception:  # noqa: BLE001 - created concurrently by another process: fine
            if client.get_experiment_by_name(name) is None:
                raise
    return client


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1e-5}}`` -> ``{"train.lr": "1e-05"}`` (strings, cut to MLflow's limit)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = "" if value is None else str(value)
            out[name] = text[:_MAX_PARAM_LEN]
    return out


def settings_params(settings: "Settings") -> dict[str, str]:
    """The settings as flat MLflow params; secrets stay masked (``public_dict``)."""
    return flatten(settings.public_dict())


def metric_key(key: str) -> str:
    """``key`` as a name MLflow accepts: its refused characters become ``_``, cut to its length cap."""
    return _REFUSED_IN_KEYS.sub("_", str(key).replace("@", "_at_"))[:_MAX_KEY_LEN]


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of ``metrics`` under keys MLflow accepts (non-numbers and NaN/inf skipped)."""
    out = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[metric_key(key)] = number
    return out


def log_metrics(settings: "Settings", run_id: str, metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log numeric metrics (non-numbers and NaN/inf skipped) in one batch."""
    from mlflow.entities import Metric

    client = configure(settings)
    now = int(time.time() * 1000)
    batch = [Metric(key=k, value=v, timestamp=now, step=step or 0) for k, v in finite_metrics(metrics).items()]
    if batch:
        client.log_batch(run_id, metrics=batch)


def log_params(settings: "Settings", run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    client = configure(settings)
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=items[start : start + 100])


# ---------------------------------------------------------------------------------------- runs
def start_pipeline_run(settings: "Settings", *, run_name: str | None = None, tags: Mapping[str, str] | None = None) -> str:
    """Create the parent run of one pipeline run, with the settings as params; returns its id."""
    client = configure(settings)
    exp = client.get_experiment_by_name(settings.tracking.experiment)
    run = client.create_run(
        exp.experiment_id,
        run_name=run_name or f"pipeline-{settings.profile}",
        tags={"agemem.kind": "pipeline", "agemem.profile": settings.profile, **(tags or {})},
    )
    log_params(settings, run.info.run_id, settings_params(settings))
    return run.info.run_id


def end_run(settings: "Settings", run_id: str, *, status: str = "FINISHED") -> None:
    configure(settings).set_terminated(run_id, status=status)


@contextlib.contextmanager
def stage_run(settings: "Settings", parent_run_id: str | None, stage: str) -> Iterator[str]:
    """A child run for one stage (a top-level run when there is no parent); FAILED on error."""
    client = configure(settings)
    exp = client.get_experiment_by_name(settings.tracking.experiment)
    tags = {"agemem.kind": "stage", "agemem.stage": stage}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp.experiment_id, run_name=stage, tags=tags)
    try:
        yield run.info.run_id
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")


def log_artifacts(settings: "Settings", run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    """Attach files (e.g. the eval report and plot) to a run; missing files are skipped with a warning."""
    client = configure(settings)
    for path in paths:
        if path is None or not Path(path).exists():
            logger.warning("artifact %s does not exist; not logged", path)
            continue
        if Path(path).is_dir():
            client.log_artifacts(run_id, str(path), artifact_path)
        else:
            client.log_artifact(run_id, str(path), artifact_path)


def run_url(settings: "Settings", run_id: str) -> str:
    """A human pointer to a run: the UI URL on a server, the store and id otherwise."""
    uri = settings.tracking_uri
    client = configure(settings)
    exp_id = client.get_run(run_id).info.experiment_id
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"
    return f"run {run_id} in {uri}"


__all__ = [
    "artifact_root",
    "configure",
    "end_run",
    "finite_metrics",
    "flatten",
    "log_artifacts",
    "log_metrics",
    "log_params",
    "run_url",
    "settings_params",
    "stage_run",
    "start_pipeline_run",
]
