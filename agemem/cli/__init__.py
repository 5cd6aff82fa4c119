"""The ``agemem`` command line: one module per command group, composed here.

The library never imports this package; this package is the only one that imports ``flows``.
"""

from __future__ import annotations

import typer

from agemem.cli import data, doctor, episode, eval, memory, pipeline, train

app = typer.Typer(help="AgeMem: RL-trained memory management for LLM agents.", no_args_is_help=True)
app.add_typer(data.app, name="data", help="Prepare HotpotQA episodes and synthesize distractors.")
app.command("serve-tools", help="Run the memory tool server.")(memory.serve_tools)
app.command("episode", help="Run one episode and print its transcript and reward.")(episode.episode)
app.command("train", help="GRPO training with verl (GPUs) or the local trainer (CPU / one GPU).")(train.train)
app.command("eval", help="Evaluate a model with the episode engine and the judge.")(eval.evaluate)
app.command("pipeline", help="Run the whole Prefect pipeline.")(pipeline.pipeline)
app.command("doctor", help="Check what a run needs on this machine (GPUs, packages, model, stores, keys, Ray).")(
    doctor.doctor)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
