"""``agemem doctor``: what a run needs on this machine, one line per requirement, each miss with its fix."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from agemem.cli.common import ProfileOpt, SetOpt, VerboseOpt, command, settings_from_cli
from agemem.doctor import report, run_checks

BackendOpt = Annotated[
    Optional[str], typer.Option("--backend", "-b", help="'verl' or 'local' (default: settings train.backend).")
]


@command
def doctor(backend: BackendOpt = None, profile: ProfileOpt = None, sets: SetOpt = None,
           verbose: VerboseOpt = False) -> None:
    """Check GPUs, packages, model, disk, Milvus, MLflow, keys and Ray for a run; exit 1 when one is missing."""
    if backend is not None and backend not in ("verl", "local"):
        raise ValueError(f"--backend must be 'verl' or 'local', got {backend!r}")
    settings = settings_from_cli(profile, sets, **{"train.backend": backend})
    checks = run_checks(settings, settings.train.backend)
    typer.echo(report(checks))
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(1)
