"""The ``agemem`` command line: one module per command group, composed here.

The library never imports this package; this package is the only one that imports ``flows``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from agemem import __version__
from agemem.cli import chat, config, data, doctor, episode, eval, memory, pipeline, train
from agemem.cli.common import new_app

app = new_app("AgeMem: RL-trained memory management for LLM agents.")
app.add_typer(data.app, name="data", help="Prepare HotpotQA episodes and synthesize distractors.")
app.add_typer(config.app, name="config", help="Show the resolved settings and every settable key.")
app.add_typer(memory.app, name="memory", help="The memory tool server and its memory: list, show, export, import, "
                                              "delete spaces and sessions.")
app.command("serve-tools", help="Run the memory tool server (same as `agemem memory serve`).")(memory.serve_tools)
app.command("chat", help="Chat with the memory agent; long-term memory in a named space.")(chat.chat)
app.command("episode", help="Run one episode and print its transcript and reward.")(episode.episode)
app.command("train", help="GRPO training with verl (GPUs) or the local trainer (CPU / one GPU).")(train.train)
app.command("eval", help="Evaluate a model with the episode engine and the judge.")(eval.evaluate)
app.command("pipeline", help="Run the whole Prefect pipeline.")(pipeline.pipeline)
app.command("doctor", help="Check what a run needs on this machine (GPUs, packages, model, stores, keys, Ray).")(
    doctor.doctor)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"agemem {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """AgeMem: RL-trained memory management for LLM agents."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
