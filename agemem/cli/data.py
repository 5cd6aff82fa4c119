"""``agemem data prepare`` and ``agemem data distractors``."""

from __future__ import annotations

from typing import Annotated

import typer
from tqdm import tqdm

from agemem.cli.common import ProfileOpt, SetOpt, VerboseOpt, command, new_app, progress_bar, settings_from_cli
from agemem.data.distractors import EPISODES_STATS, synthesize
from agemem.data.prepare import prepare_scripts

app = new_app("Prepare HotpotQA episodes and synthesize distractors.")

ForceOpt = Annotated[bool, typer.Option("--force", help="Rebuild even if the outputs are up to date.")]


@app.command()
@command
def prepare(profile: ProfileOpt = None, set_: SetOpt = None, force: ForceOpt = False, verbose: VerboseOpt = False) -> None:
    """Load HotpotQA (data.source) and write scripts.jsonl + scripts.stats.json."""
    settings = settings_from_cli(profile, set_)
    bars: dict[str, tqdm] = {}

    def progress(phase: str, n: int) -> None:
        if phase not in bars:
            bars[phase] = progress_bar(phase, "rec")
        bars[phase].update(n)

    try:
        path = prepare_scripts(settings, force=force, progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
    typer.echo(f"scripts: {path}")
    typer.echo(f"stats:   {path.with_name('scripts.stats.json')}")


@app.command()
@command
def distractors(
    profile: ProfileOpt = None, set_: SetOpt = None, force: ForceOpt = False, verbose: VerboseOpt = False
) -> None:
    """Fill stage-2 distractor slots (data.distractor_backend) and write episodes.jsonl (resumable)."""
    settings = settings_from_cli(profile, set_)
    bar = progress_bar("distractors", "ep")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        path = synthesize(settings, force=force, progress=progress)
    finally:
        bar.close()
    typer.echo(f"episodes: {path}")
    typer.echo(f"stats:    {path.with_name(EPISODES_STATS)}")
