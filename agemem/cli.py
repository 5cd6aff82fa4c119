"""The ``agemem`` command line. Each area registers its commands from its own module."""

from __future__ import annotations

import typer

from agemem.agent import commands as agent_commands
from agemem.data import commands as data_commands
from agemem.eval import commands as eval_commands
from agemem.memory import commands as memory_commands
from agemem.train import commands as train_commands
from agemem import pipeline_commands

app = typer.Typer(help="AgeMem: RL-trained memory management for LLM agents.", no_args_is_help=True)
app.add_typer(data_commands.app, name="data", help="Prepare HotpotQA episodes and synthesize distractors.")
app.command("serve-tools", help="Run the memory tool server.")(memory_commands.serve_tools)
app.command("episode", help="Run one episode and print its transcript and reward.")(agent_commands.episode)
app.command("train", help="GRPO training with verl (GPUs) or the local trainer (CPU / one GPU).")(
    train_commands.train
)
app.command("eval", help="Evaluate a model with the episode engine and the judge.")(eval_commands.evaluate)
app.command("pipeline", help="Run the whole Prefect pipeline.")(pipeline_commands.pipeline)


if __name__ == "__main__":
    app()
