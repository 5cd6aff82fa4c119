"""README's first command, as a user runs it: ``agemem pipeline --profile smoke`` in a subprocess
(slow: about two minutes on 2 cores). A successful run prints no ERROR and no traceback, no
third-party noise, and next steps that run as printed in a fresh shell."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
#: What a first run printed before issue 14: each is harmless third-party noise, or a progress bar
#: of a step that takes milliseconds.
NOISE = ("ERROR", "Traceback", "Method not implemented", "ModuleNotFoundError", "CloudPickle", "\x1b[",
         "Generating train split", "Loading weights", "Writing model shards", "Downloading artifacts",
         "too_many_pings")


def test_smoke_run_is_quiet_and_prints_commands_that_run(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGEMEM_", "PREFECT_", "MLFLOW_"))}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(ROOT), "COLUMNS": "200",
                "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    proc = subprocess.run([sys.executable, "-m", "agemem.cli", "pipeline", "--profile", "smoke",
                           "--set", f"runs_dir={tmp_path / 'runs'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    lines = output.splitlines()
    found = {needle: "\n".join(lines[max(0, i - 5): i + 25]) for i, line in enumerate(lines) for needle in NOISE
             if needle in line}
    assert not found, "\n\n".join(f"{needle!r} in:\n{context}" for needle, context in found.items())
    assert "[RANDOM WEIGHTS]" in output and "not crowned champion" in output
    commands = [line.split("browse it:", 1)[1].split() for line in output.splitlines() if "browse it:" in line]
    assert len(commands) == 2, output  # MLflow UI and Prefect server
    for argv in commands:
        assert Path(argv[0]).is_absolute() and os.access(argv[0], os.X_OK), argv  # no activated venv needed
    assert str(tmp_path / "prefect-home") in output  # where the ephemeral run is kept
