"""``prefect deploy --all`` against a real ``prefect server start`` on loopback (slow).

The test launches the server as a subprocess with its own PREFECT_HOME (database, settings) in a
temporary directory, creates the process work pool, deploys the project's ``prefect.yaml`` and
reads the deployments back through Prefect's client. A process worker then runs the nightly
evaluation once against an empty MLflow store: the run must get through the pull step and the
entrypoint into the flow, and fail with the flow's own "no alias" error.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator
from uuid import UUID

import httpx
import pytest
import yaml

from agemem.memory.process import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "agemem-process"
EXPECTED = {
    "agemem-pipeline": ("agemem-pipeline", "flows/pipeline.py:agemem_pipeline"),
    "nightly-champion-eval": ("evaluate-champion", "flows/evaluate.py:evaluate_champion"),
}


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process we started in its own session, and everything it spawned."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _run(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run([PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A ``prefect server start`` on a free loopback port; yields (API URL, env for the CLI)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AGEMEM_"))}
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "COLUMNS": "250",  # rich tables (deployment ls) must not cut names
        "AGEMEM_PROJECT_DIR": str(ROOT),
        "HF_HUB_OFFLINE": "1",
    })
    log = (home / "server.log").open("w")
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                pytest.fail(f"prefect server exited with {server.returncode}:\n{(home / 'server.log').read_text()}")
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server not healthy after 120 s:\n{(home / 'server.log').read_text()}")
            time.sleep(0.5)
        yield api, env
    finally:
        _stop(server)
        log.close()


@pytest.fixture(scope="module")
def deployed(prefect_server: tuple[str, dict[str, str]]) -> tuple[str, dict[str, str]]:
    api, env = prefect_server
    _run(["work-pool", "create", POOL, "--type", "process"], env)
    _run(["--no-prompt", "deploy", "--all"], env)
    return api, env


async def _read(api: str, name: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        async with get_client() as client:
            deployment = await client.read_deployment_by_name(name)
            pool = await client.read_work_pool(deployment.work_pool_name)
            return deployment, pool


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_deploy_all_creates_the_deployments(deployed: tuple[str, dict[str, str]], name: str) -> None:
    api, _ = deployed
    flow_name, entrypoint = EXPECTED[name]
    deployment, pool = await _read(api, f"{flow_name}/{name}")
    assert deployment.entrypoint == entrypoint
    assert deployment.work_pool_name == POOL and pool.type == "process"
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
    ]
    assert deployment.parameters["profile"] == "smoke" and deployment.parameters["overrides"] == []
    assert deployment.enforce_parameter_schema
    assert set(deployment.parameter_openapi_schema["properties"]) >= {"profile", "overrides"}
    # `profile` is validated like `overrides`: the server's schema only admits the two profiles.
    assert "smoke" in str(deployment.parameter_openapi_schema) and "paper" in str(deployment.parameter_openapi_schema)
    assert "enum" in str(deployment.parameter_openapi_schema)
    # The UI's run form shows these (from the flow docstrings' Args sections).
    assert all("description" in prop for prop in deployment.parameter_openapi_schema["properties"].values())
    if name == "nightly-champion-eval":
        assert deployment.parameters["alias"] == "champion"
        assert len(deployment.schedules) == 1
        schedule = deployment.schedules[0]
        assert schedule.active
        assert schedule.schedule.cron == "0 3 * * *" and schedule.schedule.timezone == "UTC"
    else:
        assert "backend" in deployment.parameter_openapi_schema["properties"]
        assert deployment.schedules == []


def test_deployments_match_prefect_yaml(deployed: tuple[str, dict[str, str]]) -> None:
    """`prefect deployment ls` lists exactly what prefect.yaml declares."""
    _, env = deployed
    declared = {d["name"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert declared == set(EXPECTED)
    listing = _run(["deployment", "ls"], env).stdout
    for name, (flow_name, _) in EXPECTED.items():
        assert f"{flow_name}/{name}" in listing


async def test_worker_runs_the_nightly_deployment(deployed: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    """A process worker picks the run up, pulls into the checkout and reaches the flow's own code.

    The MLflow store is empty, so the flow must fail fast with its "no alias" message: proof that
    the pull step, the entrypoint and the parameters work end to end, in about half a minute.
    """
    api, env = deployed
    runs = tmp_path / "runs"
    proc = _run(["deployment", "run", "evaluate-champion/nightly-champion-eval",
                 "--param", f'overrides=["runs_dir={runs}"]'], env)
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", proc.stdout)
    assert found, proc.stdout
    # The schedule has queued tomorrow's runs too; a 1 s look-ahead keeps the worker to ours.
    worker = subprocess.run([PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--run-once",
                             "--prefetch-seconds", "1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        async with get_client() as client:
            run = await client.read_flow_run(UUID(found.group(1)))
            assert run.state is not None and run.state.is_final(), (run.state, worker.stdout + worker.stderr)
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    messages = "\n".join(log.message for log in logs)
    assert run.state.is_failed(), messages
    assert "has no alias 'champion'" in messages, messages
    assert runs.is_dir()  # the flow ran with our overrides (its MLflow store landed there)
