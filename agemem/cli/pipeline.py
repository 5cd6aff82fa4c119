"""``agemem pipeline``: run the whole Prefect pipeline (``flows.pipeline.agemem_pipeline``).

Without ``PREFECT_API_URL`` the flow runs on Prefect's ephemeral local API (nothing to start);
with it, the run is recorded on that server and visible in its UI.
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Optional

import typer

from agemem.cli.common import ProfileOpt, SetOpt, configure_logging, settings_from_cli


def pipeline(
    profile: ProfileOpt = None,
    sets: SetOpt = None,
    backend: Annotated[
        Optional[str], typer.Option("--backend", "-b", help="Training backend: 'local' or 'verl' (train.backend).")
    ] = None,
) -> None:
    """Data -> distractors -> training -> evaluation -> MLflow registration, as one Prefect flow run."""
    if backend is not None and backend not in ("local", "verl"):
        raise typer.BadParameter(f"backend must be 'local' or 'verl', got {backend!r}", param_hint="--backend")
    # Check the settings before Prefect starts, so a typo costs a second, not a server start.
    settings = settings_from_cli(profile, sets, **{"train.backend": backend})
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    configure_logging()
    from flows.pipeline import agemem_pipeline

    result = agemem_pipeline(profile=settings.profile, overrides=list(sets or []), backend=backend)
    model = result["model"]
    typer.echo(json.dumps({"metrics": result["metrics"], "timings_s": result["timings"],
                           "cached": result["cached"]}, indent=2, default=str))
    typer.echo(f"MLflow run:       {result['mlflow_run']}")
    typer.echo(f"Registered model: {model['name']} v{model['version']} aliases {', '.join(model['aliases'])} "
               f"({model['uri']}{'; content unchanged, version reused' if model['reused'] else ''})")
    typer.echo(f"Champion gate:    {model['gate']}")
    typer.echo(f"Eval report:      {result['report']}")
    api = os.environ.get("PREFECT_API_URL")
    where = f"{api.removesuffix('/api')}/runs/flow-run/{result['flow_run_id']}" if api else (
        "ephemeral API; run `prefect server start` and set PREFECT_API_URL to keep runs in the UI")
    typer.echo(f"Prefect run:      {result['flow_run_id']} ({where})")
