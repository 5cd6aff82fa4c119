"""A local training run SIGKILLed after its first checkpoint resumes from it when re-run.

The first run is a real ``agemem train --backend local`` subprocess (the way the pipeline and a
user start it); it is killed without warning as soon as a checkpoint exists, possibly in the middle
of writing the next one. The re-run must pick the newest complete checkpoint, keep its history,
redo none of its steps and finish the remaining ones.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from agemem.settings import load_settings
from agemem.train.checkpoint import STATE_FILE, latest_checkpoint
from agemem.train.local import output_root, train_local
from tests.fixtures_train import TINY_TRAIN

TOTAL_STEPS = 4


def _set_flags(tree: dict[str, Any], prefix: str = "") -> list[str]:
    flags: list[str] = []
    for key, value in tree.items():
        if isinstance(value, dict):
            flags += _set_flags(value, f"{prefix}{key}.")
        else:
            flags += ["--set", f"{prefix}{key}={json.dumps(value) if isinstance(value, str) else value}"]
    return flags


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(runs_dir: Path, episodes_file: Path) -> None:
    overrides = {**TINY_TRAIN, "train": {**TINY_TRAIN["train"], "total_steps": TOTAL_STEPS, "keep_checkpoints": 0}}
    settings = load_settings("smoke", {**overrides, "runs_dir": str(runs_dir)})
    root = output_root(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGEMEM_")}
    env.update({"AGEMEM_RUNS_DIR": str(runs_dir), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    cmd = [sys.executable, "-m", "agemem.cli", "train", "--backend", "local", "--profile", "smoke",
           "--episodes", str(episodes_file), *_set_flags(overrides)]
    # Only the trainer process is killed (as an OOM kill would): whatever it started must not keep
    # the store locked for the re-run. Its own process group lets the test clean up after itself.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while latest_checkpoint(root) is None:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                pytest.fail(f"training exited ({proc.returncode}) before its first checkpoint:\n{out[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 240 s")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    killed_at = latest_checkpoint(root)
    assert killed_at is not None
    raw = torch.load(killed_at / STATE_FILE, weights_only=False)
    done, saved = int(raw["step"]), raw["history"]
    assert 1 <= done < TOTAL_STEPS, "the run finished before it could be killed"
    written_ns = (killed_at / STATE_FILE).stat().st_mtime_ns

    try:
        result = train_local(settings, episodes_file)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything the killed trainer left behind (ours only)

    assert result.steps == TOTAL_STEPS
    assert result.history[:done] == saved  # the finished steps come from the checkpoint...
    assert (killed_at / STATE_FILE).stat().st_mtime_ns == written_ns  # ...and were not redone
    assert [m["step"] for m in result.history] == [float(s) for s in range(1, TOTAL_STEPS + 1)]
    for metrics in result.history[done:]:
        assert math.isfinite(metrics["train/loss"])
    lines = [json.loads(x) for x in (root / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [float(s) for s in range(1, TOTAL_STEPS + 1)]  # no duplicated steps
    assert not list(root.glob(".tmp-*"))  # a checkpoint torn by the kill was cleared, not resumed from
    assert latest_checkpoint(root).name == f"step_{TOTAL_STEPS:06d}"
