"""README's "Deploy, schedule and watch (Prefect)" block, pasted into bash as written (slow).

Only the port (4200: a free one) and ``.venv/bin/`` (this interpreter's bin folder, when the
checkout has no .venv) are substituted; PREFECT_HOME and the runs folder are temporary. The smoke
pipeline run it triggers must complete on the worker it started. Then the scripts run again on
that existing home (the pool exists: no "already exists" failure).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest

from agemem.memory.process import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def readme_block(heading: str) -> str:
    """The first ```bash block under ``heading`` in README.md."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


async def _wait_for_run(api: str, run_id: str, timeout_s: float) -> str:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + timeout_s
    with temporary_settings({PREFECT_API_URL: api}):
        async with get_client() as client:
            while True:
                run = await client.read_flow_run(UUID(run_id))
                if run.state is not None and run.state.is_final():
                    return run.state.type.value
                if time.monotonic() > deadline:
                    return f"not final after {timeout_s} s: {run.state}"
                await asyncio.sleep(3)


def _env(tmp_path: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AGEMEM_", "MLFLOW_"))}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_API_PORT": str(port),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false",
                "AGEMEM_RUNS_DIR": str(tmp_path / "runs"), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    if not (ROOT / ".venv").exists():
        env["PREFECT"] = str(BIN / "prefect")  # the scripts' default is <checkout>/.venv/bin/prefect
    return env


async def test_readme_deploy_walkthrough_runs_as_written(tmp_path: Path) -> None:
    port = free_port()
    block = readme_block("## Deploy, schedule and watch (Prefect)").replace("4200", str(port))
    if not (ROOT / ".venv").exists():
        block = block.replace(".venv/bin/", f"{BIN}/")
    env = _env(tmp_path, port)
    log = (tmp_path / "walkthrough.log").open("w")
    shell = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert shell.wait(timeout=300) == 0, (tmp_path / "walkthrough.log").read_text()
        output = (tmp_path / "walkthrough.log").read_text()
        found = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
        assert found, output
        api = f"http://127.0.0.1:{port}/api"
        state = await _wait_for_run(api, found.group(1), timeout_s=900)
        assert state == "COMPLETED", (state, (tmp_path / "walkthrough.log").read_text()[-6000:])
        # An existing home: the scripts run again without tripping over the pool they made.
        again = {**env, "PREFECT_API_URL": api}
        for script in (["infra/prefect/deploy.sh"], ["infra/prefect/worker.sh", "--run-once"]):
            proc = subprocess.run(script, cwd=ROOT, env=again, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert "already exists" not in proc.stdout + proc.stderr
    finally:
        try:
            os.killpg(shell.pid, signal.SIGTERM)  # the server and worker the block started with `&`
        except ProcessLookupError:
            pass
        time.sleep(2)
        try:
            os.killpg(shell.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
