"""The command line itself: --version, -h, defaults in help, real boolean flags, --verbose everywhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from agemem import __version__
from agemem.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> dict[str, Any]:
    """Every command by its words (``data prepare``); typer ships its own copy of click's classes."""
    root = typer.main.get_command(app)
    out: dict[str, Any] = {}
    for name, cmd in root.commands.items():  # type: ignore[attr-defined]
        if hasattr(cmd, "commands"):
            out.update({f"{name} {sub}": c for sub, c in cmd.commands.items()})
        else:
            out[name] = cmd
    return out


def test_version_and_short_help() -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["--version"]).output.strip() == f"agemem {__version__}"
    assert "Usage:" in runner.invoke(app, ["-h"]).output
    proc = subprocess.run([sys.executable, "-m", "agemem.cli", "--version"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout.strip() == f"agemem {__version__}", proc.stderr


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_command_has_help_verbose_and_real_flags(name: str) -> None:
    command = _commands()[name]
    res = CliRunner().invoke(app, [*name.split(), "-h"])
    assert res.exit_code == 0, res.output
    assert "<bool>" not in res.output  # flags are shown as flags, not as options taking a value
    options = {opt for param in command.params for opt in param.opts}
    assert "--verbose" in options, name
    for param in command.params:
        if param.param_type_name == "option" and param.type_descriptor.annotation is bool:
            assert param.is_flag, f"{name} {param.opts}"
    if "--profile" in options:
        assert "smoke (the default)" in res.output


def test_flags_take_no_value_and_defaults_are_shown() -> None:
    runner = CliRunner()
    bad = runner.invoke(app, ["config", "keys", "--json", "true"])
    assert bad.exit_code != 0  # `--json` is a flag: "true" is an unexpected argument
    assert runner.invoke(app, ["config", "keys", "--json"]).exit_code == 0
    assert "[default: 0]" in runner.invoke(app, ["episode", "-h"]).output
    assert "--force" in runner.invoke(app, ["pipeline", "-h"]).output
