"""Issue 7 §2: a pipeline killed during training, then re-run, resumes where it stopped (slow).

``agemem pipeline`` runs as a subprocess on Prefect's ephemeral API (its own PREFECT_HOME). When
the first training checkpoint appears, the whole process group (the ephemeral Prefect server and
the milvus-lite server included) gets SIGKILL. The re-run must take the data steps from the
Prefect cache and continue training from step 1 instead of starting over.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures_pipeline import as_pairs
from tests.fixtures_train import TINY_TRAIN

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
AGEMEM = str(Path(sys.executable).with_name("agemem"))


def _pairs(runs_dir: Path) -> list[str]:
    return as_pairs(TINY_TRAIN) + [f"runs_dir={runs_dir}", "data.limit=4", "eval.limit=2", "train.total_steps=3"]


def _command(runs_dir: Path) -> list[str]:
    cmd = [AGEMEM, "pipeline", "--profile", "smoke"]
    for pair in _pairs(runs_dir):
        cmd += ["--set", pair]
    return cmd


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _checkpoint_root(runs_dir: Path) -> Path:
    """Where this configuration's local checkpoints go (a directory keyed by its config hash)."""
    from agemem.settings import load_settings
    from agemem.train.local import output_root

    return output_root(load_settings("smoke", _pairs(runs_dir)))


def test_killed_during_training_resumes_from_checkpoint_with_cached_data(tmp_path: Path) -> None:
    runs_dir = tmp_path / "runs"
    first_ckpt = _checkpoint_root(runs_dir) / "step_000001" / "trainer_state.pt"
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(_command(runs_dir), cwd=ROOT, env=_env(tmp_path), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 480
        while not first_ckpt.exists():
            assert proc.poll() is None, f"pipeline ended before its first checkpoint:\n{(tmp_path / 'first.log').read_text()[-4000:]}"
            assert time.monotonic() < deadline, "no training checkpoint within 8 minutes"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: no cleanup code gets to run
        proc.wait(timeout=60)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    ckpts = sorted(p.name for p in first_ckpt.parents[1].glob("step_*"))
    assert ckpts and ckpts[-1] < "step_000003", ckpts
    first_state_mtime = first_ckpt.stat().st_mtime_ns

    rerun = subprocess.run(_command(runs_dir) + ["--json"], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                           text=True, timeout=600)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-6000:]
    assert "scripts.jsonl (cached: not redone)" in out and "episodes.jsonl (cached: not redone)" in out
    assert "resuming from" in out and ("(step 1)" in out or "(step 2)" in out)
    assert "step 1/3" not in out  # step 1 was not trained again
    # --json: the flow's result, the only line that is a lone "{" and all after it
    summary = json.loads(rerun.stdout[re.search(r"^\{$", rerun.stdout, re.M).start():])
    cached = {k: summary["cached"][k] for k in ("prepare_data", "synthesize_distractors", "train")}
    assert cached == {"prepare_data": True, "synthesize_distractors": True, "train": False}
    assert (first_ckpt.parents[1] / "step_000003" / "trainer_state.pt").is_file()
    assert first_ckpt.stat().st_mtime_ns == first_state_mtime or not first_ckpt.exists()  # pruned or untouched
    # The tiny model has random weights: registered, labelled, and not crowned (the gate's default).
    assert str(summary["model"]["version"]) == "1" and summary["model"]["aliases"] == ["candidate"]
    assert summary["model"]["random_weights"]
    history = [json.loads(line)["step"] for line in
               (first_ckpt.parents[1] / "metrics.jsonl").read_text().splitlines()]
    assert history == [1, 2, 3]
