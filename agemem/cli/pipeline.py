"""``agemem pipeline``: run the whole Prefect pipeline (``flows.pipeline.agemem_pipeline``).

Without ``PREFECT_API_URL`` the flow runs on Prefect's ephemeral local API (nothing to start; the
run is still stored in the database under ``PREFECT_HOME``); with it, the run is recorded on that
server and visible in its UI.
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any, Optional

import typer

from agemem.cli.common import JsonOpt, ProfileOpt, SetOpt, VerboseOpt, command, settings_from_cli, tool
from agemem.inputs import check_pipeline_inputs
from agemem.settings import Settings
from agemem.train.models import RANDOM_WEIGHTS_LABEL


@command
def pipeline(
    profile: ProfileOpt = None,
    sets: SetOpt = None,
    backend: Annotated[
        Optional[str], typer.Option("--backend", "-b", help="Training backend: 'local' or 'verl' (train.backend).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Ignore the caches: rebuild the data and train from step 0.")
    ] = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Data -> distractors -> training -> evaluation -> MLflow registration, as one Prefect flow run."""
    if backend is not None and backend not in ("local", "verl"):
        raise ValueError(f"--backend must be 'local' or 'verl', got {backend!r}")
    # Settings and inputs are checked before Prefect starts: a typo costs a second, not a server start.
    settings = settings_from_cli(profile, sets, **{"train.backend": backend})
    check_pipeline_inputs(settings)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's ephemeral API gets 20 s to start; a busy 2-core machine has been seen to need more.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.pipeline import agemem_pipeline

    result = agemem_pipeline(profile=settings.profile, overrides=list(sets or []), backend=backend, force=force)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    for line in summary_lines(settings, result):
        typer.echo(line)


def summary_lines(settings: Settings, result: dict[str, Any]) -> list[str]:
    """What the run did and where to look, with commands that run as printed in a fresh shell."""
    model, metrics = result["model"], result["metrics"]
    label = f" [{RANDOM_WEIGHTS_LABEL}]" if model.get("random_weights") else ""
    cached = [name for name, hit in result["cached"].items() if hit]
    lines = [
        f"Policy:           {result['policy']}",
        f"Metrics:          J={metrics['judge_score'] or 0.0:.3f} EM={metrics['em'] or 0.0:.3f} "
        f"F1={metrics['f1'] or 0.0:.3f} MQ={metrics['memory_quality'] or 0.0:.3f} on {int(metrics['n'] or 0)} "
        f"questions{label}",
        f"Stage times (s):  {', '.join(f'{k} {v}' for k, v in result['timings'].items())}"
        + (f"; from cache: {', '.join(cached)}" if cached else ""),
        f"Registered model: {model['name']} v{model['version']}{label} aliases {', '.join(model['aliases'])} "
        f"({model['uri']}{'; content unchanged, version reused' if model['reused'] else ''})",
        f"Champion gate:    {model['gate']}",
        f"Eval report:      {result['report']}",
    ]
    return lines + _mlflow_lines(result) + _prefect_lines(result)


def _mlflow_lines(result: dict[str, Any]) -> list[str]:
    uri = result["tracking_uri"]
    if uri.startswith("http"):
        return [f"MLflow run:       {result['mlflow_run']}"]
    return [f"MLflow run:       {result['mlflow_run']}",
            f"  browse it:      {tool('mlflow')} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000",
            f"  then open       http://127.0.0.1:5000/#/models/{result['model']['name']}"]


def _prefect_lines(result: dict[str, Any]) -> list[str]:
    run_id = result["flow_run_id"]
    api = os.environ.get("PREFECT_API_URL")
    if api:
        return [f"Prefect run:      {api.rstrip('/').removesuffix('/api')}/runs/flow-run/{run_id}"]
    from prefect.settings import get_current_settings

    home = get_current_settings().home
    return [f"Prefect run:      {run_id} (ephemeral API; the run is kept in {home})",
            f"  browse it:      {tool('prefect')} server start",
            f"  then open       http://127.0.0.1:4200/runs/flow-run/{run_id}"]
