"""Screenshots of what a user sees after a pipeline run: the Prefect flow run (artifacts, logs, the
evaluation report) and the MLflow registered model version and train run, in headless Chromium.

Starts a Prefect server and an MLflow server on free loopback ports with a temporary home, runs
``agemem pipeline --profile smoke`` against both, and writes full-page PNGs to ``--out`` (default
``runs/screenshots``), driving Chromium over its DevTools protocol (``websockets``, already a
dependency of uvicorn) to click the flow run's tabs. Needs Chromium (Debian: ``apt-get install
chromium``); about five minutes on 2 cores. Everything it starts is stopped when it ends.

    .venv/bin/python scripts/ui_screenshots.py --out runs/screenshots
"""

from __future__ import annotations

import argparse
import base64
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
                  "--hide-scrollbars", "--window-size=1440,1100"]


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


class Page:
    """One headless Chromium tab driven over the DevTools protocol (navigate, click, full-page PNG)."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.next_id = 0

    def send(self, method: str, **params: object) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=120))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str) -> object:
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


#: Clicks the first tab/button/link whose own text is exactly the argument (the Prefect UI's tabs
#: do not follow a ?tab= query while the run loads).
_CLICK = """(text => { const el = [...document.querySelectorAll('button, a, [role=tab], li, span')]
  .find(e => e.textContent.trim() === text); if (el) { el.click(); return true; } return false; })"""
#: The tallest scrolling box: the UIs scroll an inner element, not the document.
_HEIGHT = "Math.max(...[...document.querySelectorAll('*')].map(e => e.scrollHeight))"


@contextmanager
def browser(chromium: str) -> Iterator[Page]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="agemem-chromium-") as profile:
        proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--remote-debugging-port={port}",
                                 f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    tabs = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2))
                    ws_url = next(t["webSocketDebuggerUrl"] for t in tabs if t.get("type") == "page")
                    break
                except (OSError, StopIteration, ValueError):
                    if time.monotonic() > deadline:
                        raise RuntimeError("chromium's DevTools endpoint did not come up") from None
                    time.sleep(0.5)
            page = Page(ws_url)
            page.send("Page.enable")
            yield page
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)


def screenshot(page: Page, url: str, path: Path, *, click: str | None = None, settle_s: float = 8.0) -> Path:
    """``url`` as a full-page PNG, after clicking the element whose text is ``click``."""
    page.send("Emulation.setDeviceMetricsOverride", width=1440, height=1100, deviceScaleFactor=1, mobile=False)
    page.send("Page.navigate", url=url)
    time.sleep(settle_s)
    if click is not None and not page.evaluate(f"{_CLICK}({json.dumps(click)})"):
        raise RuntimeError(f"{url}: nothing to click labelled {click!r}")
    time.sleep(3 if click else 0)
    height = min(max(int(page.evaluate(_HEIGHT) or 1100), 1100), 8000)
    page.send("Emulation.setDeviceMetricsOverride", width=1440, height=height, deviceScaleFactor=1, mobile=False)
    time.sleep(1.5)
    shot = page.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    print(f"{path}  <- {url}" + (f" (clicked {click!r})" if click else ""))
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
        # The port goes in the environment, not --port: the UI takes its API address from it.
        stack.enter_context(service(
            [str(BIN / "prefect"), "server", "start"],
            {**env, "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(prefect_port)},
            home / "prefect.log", f"{prefect}/api/health"))
        stack.enter_context(service(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
             "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination",
             str(home / "mlartifacts")], env, home / "mlflow.log", f"{mlflow}/health"))
        result = run_pipeline({**env, "PREFECT_API_URL": f"{prefect}/api", "MLFLOW_TRACKING_URI": mlflow},
                              home / "runs")
        run, model = result["flow_run_id"], result["model"]
        shots = [
            ("prefect-run-artifacts", f"{prefect}/runs/flow-run/{run}", "Artifacts"),
            ("prefect-run-logs", f"{prefect}/runs/flow-run/{run}", "Logs"),
            ("prefect-train-logs", f"{prefect}/runs/flow-run/{result['train_flow_run_id']}", "Logs"),
            ("prefect-summary-artifact", f"{prefect}/artifacts/artifact/{result['summary_artifact_id']}", None),
            ("prefect-eval-report", f"{prefect}/artifacts/artifact/{result['artifacts']['evaluate']}", None),
            ("prefect-training-curve", f"{prefect}/artifacts/artifact/{result['artifacts']['train']}", None),
            ("prefect-data-stats", f"{prefect}/artifacts/artifact/{result['artifacts']['synthesize_distractors']}",
             None),
            ("mlflow-model-version", f"{mlflow}/#/models/{model['name']}/versions/{model['version']}", None),
            ("mlflow-pipeline-run", result["mlflow_run"], None),
        ]
        with browser(args.chromium) as page:
            for name, url, click in shots:
                screenshot(page, url, args.out / f"{name}.png", click=click)
    print(f"screenshots in {args.out}; servers' logs and stores in {home}")


if __name__ == "__main__":
    main()
