"""Screenshots of what a user sees after a pipeline run: the Prefect flow run (artifacts, logs, the
evaluation report) and the MLflow registered model version and train run, in headless Chromium.

Starts a Prefect server and an MLflow server on free loopback ports with a temporary home, runs
``agemem pipeline --profile smoke`` against both, and writes PNGs to ``--out`` (default
``runs/screenshots``). Needs Chromium (Debian: ``apt-get install chromium``); about four minutes
on 2 cores. Everything it starts is stopped when it ends.

    .venv/bin/python scripts/ui_screenshots.py --out runs/screenshots
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1440,1300"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def service(argv: list[str], env: dict[str, str], log: Path, health: str, timeout_s: float = 180) -> Iterator[None]:
    """A server subprocess in its own session, healthy before the block runs, stopped after it."""
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{argv[0]} exited with {proc.returncode}; see {log}")
                try:
                    urllib.request.urlopen(health, timeout=2)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{health} not healthy after {timeout_s} s; see {log}") from None
                    time.sleep(1)
            yield
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def screenshot(chromium: str, url: str, path: Path, wait_ms: int = 12000) -> Path:
    """One page as a PNG; ``wait_ms`` of virtual time lets the single-page apps fetch and render."""
    with tempfile.TemporaryDirectory(prefix="agemem-chromium-") as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={wait_ms}",
                        f"--screenshot={path}", url], check=True, capture_output=True, timeout=180)
    print(f"{path}  <- {url}")
    return path


def run_pipeline(env: dict[str, str], runs: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "agemem.cli", "pipeline", "--profile", "smoke", "--json",
                           "--set", f"runs_dir={runs}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "screenshots")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="agemem-ui-"))
    prefect_port, mlflow_port = free_port(), free_port()
    prefect, mlflow = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AGEMEM_", "MLFLOW_"))}
    env.update({"PREFECT_HOME": str(home / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "MLFLOW_ENABLE_TELEMETRY": "false"})
    with ExitStack() as stack:
        stack.enter_context(service(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            env, home / "prefect.log", f"{prefect}/api/health"))
        stack.enter_context(service(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
             "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination",
             str(home / "mlartifacts")], env, home / "mlflow.log", f"{mlflow}/health"))
        result = run_pipeline({**env, "PREFECT_API_URL": f"{prefect}/api", "MLFLOW_TRACKING_URI": mlflow},
                              home / "runs")
        run, model = result["flow_run_id"], result["model"]
        shots = {
            "prefect-run-artifacts": f"{prefect}/runs/flow-run/{run}?tab=Artifacts",
            "prefect-run-logs": f"{prefect}/runs/flow-run/{run}?tab=Logs",
            "prefect-summary-artifact": f"{prefect}/artifacts/artifact/{result['summary_artifact_id']}",
            "prefect-eval-report": f"{prefect}/artifacts/artifact/{result['artifacts']['evaluate']}",
            "prefect-training-curve": f"{prefect}/artifacts/artifact/{result['artifacts']['train']}",
            "prefect-data-stats": f"{prefect}/artifacts/artifact/{result['artifacts']['synthesize_distractors']}",
            "mlflow-model-version": f"{mlflow}/#/models/{model['name']}/versions/{model['version']}",
            "mlflow-pipeline-run": result["mlflow_run"],
        }
        for name, url in shots.items():
            screenshot(args.chromium, url, args.out / f"{name}.png")
    print(f"screenshots in {args.out}; servers' logs and stores in {home}")


if __name__ == "__main__":
    main()
