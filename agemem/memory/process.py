"""Run the tool server as a child process on loopback (tests, fault and load benchmarks)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import httpx

from agemem.settings import offline_env

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_server_process(
    uri: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    extra: list[str] | None = None,
    timeout_s: float = 120.0,
    log_path: Path | None = None,
    inherit_settings_env: bool = False,
    preexec_fn: Callable[[], None] | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m agemem.cli.memory`` on ``host`` over ``uri``; returns once /healthz answers.

    By default the child sees no ``AGEMEM_*`` variables of this process (only ``uri`` and ``extra``
    settings: tests and benchmarks must not depend on a developer's shell); ``inherit_settings_env``
    passes them on (training: the user's server token and memory settings). Its output goes to
    ``log_path`` when given, else to a pipe read by :func:`stop_server_process` (a long-running
    child should get a file: a full pipe would block it). ``preexec_fn`` runs in the child before
    it starts (tests: resource limits).
    """
    port = port or free_port(host)
    cmd = [
        sys.executable, "-m", "agemem.cli.memory",
        "--host", host, "--port", str(port),
        "--set", f"memory.uri={uri}",
        *(extra or []),
    ]  # fmt: skip
    env = offline_env()
    if not inherit_settings_env:
        env = {k: v for k, v in env.items() if not k.startswith("AGEMEM_")}
    env["PYTHONPATH"] = str(_PACKAGE_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = open(log_path, "wb") if log_path is not None else subprocess.PIPE  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(cmd, cwd=_PACKAGE_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            preexec_fn=preexec_fn)
    if log_path is not None:
        out.close()  # the child holds its own descriptor
    base_url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tool server exited with {proc.returncode}:\n{_output(proc, log_path)[-3000:]}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1.0).status_code == 200:
                return proc, base_url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server_process(proc)
    raise RuntimeError(f"tool server did not answer on {base_url} within {timeout_s}s")


def stop_server_process(proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> str:
    """Stop the server (SIGTERM, then SIGKILL) and return what it printed to its pipe."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)
    return _output(proc, None)


def _output(proc: subprocess.Popen[bytes], log_path: Path | None) -> str:
    if log_path is not None:
        return Path(log_path).read_text(errors="replace")
    return proc.stdout.read().decode(errors="replace") if proc.stdout else ""


__all__ = ["free_port", "start_server_process", "stop_server_process"]
