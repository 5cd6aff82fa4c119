"""``agemem train``: verl GRPO (GPUs, Ray) or the local trainer (CPU / one GPU)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from agemem.cli.common import ProfileOpt, SetOpt, VerboseOpt, command, progress_bar, settings_from_cli
from agemem.doctor import PreflightError
from agemem.data.prepare import episodes_path as episodes_path_for_settings
from agemem.train.run import run as run_training

BackendOpt = Annotated[
    Optional[str], typer.Option("--backend", "-b", help="'verl' or 'local' (default: settings train.backend).")
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Print the resolved configuration (verl: composed with Hydra) and exit.")
]
EpisodesOpt = Annotated[
    Optional[Path], typer.Option("--episodes", help="episodes.jsonl (default: <data.output_dir>/episodes.jsonl).")
]
RunIdOpt = Annotated[Optional[str], typer.Option("--mlflow-run-id", help="Attach metrics to this MLflow run.")]
AlgoOpt = Annotated[
    str, typer.Option("--algo", help="'grpo' (after the warm start when warm_start.enabled) or 'sft' (the warm start only).")
]


@command
def train(
    backend: BackendOpt = None,
    dry_run: DryRunOpt = False,
    episodes: EpisodesOpt = None,
    profile: ProfileOpt = None,
    sets: SetOpt = None,
    mlflow_run_id: RunIdOpt = None,
    algo: AlgoOpt = "grpo",
    verbose: VerboseOpt = False,
) -> None:
    """GRPO training with verl or the local trainer, and the teacher warm start (SFT)."""
    if algo not in ("grpo", "sft"):
        raise ValueError(f"--algo must be 'grpo' or 'sft', got {algo!r}")
    if backend is not None and backend not in ("verl", "local"):
        raise ValueError(f"--backend must be 'verl' or 'local', got {backend!r}")
    settings = settings_from_cli(profile, sets, **{"train.backend": backend})
    episodes_path = episodes or episodes_path_for_settings(settings)
    if settings.train.backend == "verl" and dry_run:
        from agemem.train.verl.launch import run_verl  # verl's Hydra config: only for a verl dry run

        try:
            run = run_verl(settings, None, dry_run=True, mlflow_run_id=mlflow_run_id, sink=typer.echo)
        except (ValueError, FileNotFoundError) as exc:
            raise typer.BadParameter(str(exc)) from exc
        typer.echo("# plan")
        for line in run.summary:
            typer.echo(f"- {line}")
        typer.echo("# verl overrides (composed against verl's ppo_trainer: OK)")
        for item in run.overrides:
            typer.echo(item)
        typer.echo("# command")
        typer.echo(" ".join(run.command[:3]) + " <overrides above>")
        return
    if dry_run:
        typer.echo(json.dumps({"backend": "local", "episodes": str(episodes_path),
                               "train": settings.train.model_dump(mode="json")}, indent=2))
        return
    if not episodes_path.exists():
        raise FileNotFoundError(f"--episodes: {episodes_path} does not exist (run `agemem data prepare` and "
                                "`agemem data distractors` first)")
    bars: dict[int, Any] = {}

    def progress(step: int, done: int, total: int) -> None:
        bar = bars.setdefault(step, progress_bar(f"step {step}/{settings.train.total_steps} rollouts", "rollout",
                                                 total))
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    try:
        result = run_training(settings, episodes_path, algo=algo, mlflow_run_id=mlflow_run_id,  # type: ignore[arg-type]
                              progress=progress)
    except PreflightError as exc:  # verl: the doctor's report, not a traceback minutes into Ray start-up
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps({"backend": result.backend, "checkpoint_dir": str(result.checkpoint_dir),
                           "model_dir": str(result.model_dir) if result.model_dir else None,
                           "adapter_dir": str(result.adapter_dir) if result.adapter_dir else None,
                           "steps": result.steps, "last": result.history[-1] if result.history else None},
                          indent=2, default=str))
