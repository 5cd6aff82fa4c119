"""``agemem eval``: evaluate a checkpoint, a registered model, an endpoint or the scripted policy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from agemem.cli.common import JsonOpt, ProfileOpt, SetOpt, VerboseOpt, command, progress_bar, settings_from_cli
from agemem.data.prepare import episodes_path as episodes_path_for_settings
from agemem.eval.hotpot_format import GOLD_FILE, PREDICTIONS_FILE
from agemem.eval.runner import evaluate as run_eval

HEADLINE = ("n", "judge_score", "em", "f1", "memory_quality", "reward", "rounds", "format_errors", "judge_fallbacks")


@command
def evaluate(
    episodes: Annotated[
        Optional[Path], typer.Option("--episodes", help="episodes.jsonl (default: <data.output_dir>/episodes.jsonl).")
    ] = None,
    model: Annotated[
        Optional[str], typer.Option(
            "--model", help="An HF model or LoRA adapter directory, or a registry URI such as "
                            "models:/agemem-policy@champion (default: eval.model, else the newest checkpoint of "
                            "the current training configuration).")
    ] = None,
    policy: Annotated[
        Optional[str], typer.Option("--policy", help="checkpoint | openai | dashscope | scripted (eval.policy).")
    ] = None,
    no_context_tools: Annotated[
        bool, typer.Option("--no-context-tools", help="Ablation: remove Summary/Filter/Retrieve, auto-retrieve.")
    ] = False,
    no_stage2: Annotated[bool, typer.Option("--no-stage2", help="Ablation: skip the distractor stage.")] = False,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Evaluate the first N questions.")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", help="Where the report goes.")] = None,
    profile: ProfileOpt = None,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run the episode engine over the evaluation episodes and write a report."""
    extra: dict[str, object] = {"eval.policy": policy, "eval.limit": limit}
    if no_context_tools:
        extra["episode.use_context_tools"] = "false"
    if no_stage2:
        extra["episode.enable_stage2"] = "false"
    settings = settings_from_cli(profile, sets, **extra)
    episodes_path = episodes or episodes_path_for_settings(settings)
    if not episodes_path.is_file():
        raise FileNotFoundError(f"--episodes: {episodes_path} does not exist (run `agemem data prepare` and "
                                "`agemem data distractors`, or the pipeline, first)")
    bar = progress_bar("evaluating", "question")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        result = run_eval(settings, episodes_path, model_path=model, output_dir=output_dir, progress=progress)
    finally:
        bar.close()
    summary = {k: result.aggregates.get(k) for k in HEADLINE}
    if as_json:
        typer.echo(json.dumps({"policy": result.label, "random_weights": result.random_weights, **summary,
                               "report": str(result.report_path), "plot": str(result.plot_path),
                               "hotpot_predictions": str(result.output_dir / PREDICTIONS_FILE)}, indent=2))
        return
    typer.echo(f"policy: {result.label}")
    typer.echo(json.dumps(summary, indent=2))
    typer.echo(f"report: {result.report_path}")
    typer.echo(f"plot:   {result.plot_path}")
    typer.echo(f"hotpot: {result.output_dir / PREDICTIONS_FILE} (official format; gold beside it: {GOLD_FILE})")
