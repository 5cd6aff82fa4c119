"""Fixtures for the memory tests (a pytest plugin listed in conftest.py).

- ``memory_service`` (session scope): a real MemoryService over a milvus-lite file in a tmp dir
  and the real embedding model.
- ``memory_client``: an InProcessMemoryClient over it.
- ``tool_server`` (session scope): a real uvicorn server on 127.0.0.1 (free port, background
  thread, its own milvus-lite file); yields ``ToolServer(base_url, settings)`` (unpackable).
- ``http_memory_client``: an HttpMemoryClient for ``tool_server``.
- ``running_server(settings)`` (helper): a dedicated in-thread server, as a context manager.
- ``start_server_process`` (helper, not a fixture): the server as a subprocess, for restart and
  load tests.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from agemem.memory.client import HttpMemoryClient, InProcessMemoryClient
from agemem.memory.process import free_port, start_server_process, stop_server_process
from agemem.memory.service import MemoryService
from agemem.settings import Settings, load_settings

class ToolServer(NamedTuple):
    base_url: str
    settings: Settings


def memory_settings(root: Path, db_name: str = "memory.db", **memory: Any) -> Settings:
    """Smoke settings with the store at ``root/db_name``; ``memory`` overrides the memory section."""
    return load_settings("smoke", {"runs_dir": str(root), "memory": {"uri": str(root / db_name), **memory}})


@pytest.fixture(scope="session")
def memory_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MemoryService]:
    settings = memory_settings(tmp_path_factory.mktemp("memory_service"))
    service = MemoryService.from_settings(settings)
    yield service
    service.close()


@pytest.fixture
def memory_client(memory_service: MemoryService) -> InProcessMemoryClient:
    return InProcessMemoryClient(memory_service)


def serve_in_thread(settings: Settings) -> tuple[str, Any, threading.Thread, MemoryService]:
    """Start the tool server for ``settings`` (its real uvicorn configuration) on a pre-bound loopback
    socket in a thread; returns once it answers. Stopping it (``server.should_exit``) closes the service."""
    import uvicorn

    from agemem.memory.server import create_app, server_config

    service = MemoryService.from_settings(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(create_app(service, settings), settings))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="tool-server")
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("tool server thread did not start")
        time.sleep(0.02)
    return base_url, server, thread, service


@pytest.fixture(scope="session")
def tool_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ToolServer]:
    settings = memory_settings(tmp_path_factory.mktemp("tool_server"))
    base_url, server, thread, service = serve_in_thread(settings)
    yield ToolServer(base_url, settings)
    server.should_exit = True
    thread.join(timeout=10)
    service.close()


@contextlib.contextmanager
def running_server(settings: Settings) -> Iterator[tuple[str, Any, MemoryService]]:
    """``with running_server(settings) as (base_url, server, service):`` a dedicated in-thread server."""
    base_url, server, thread, service = serve_in_thread(settings)
    try:
        yield base_url, server, service
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        service.close()


@pytest.fixture
async def http_memory_client(tool_server: ToolServer) -> AsyncIterator[HttpMemoryClient]:
    client = HttpMemoryClient(tool_server.base_url, timeout_s=30.0, retries=1)
    yield client
    await client.aclose()


# The subprocess helpers live in the package so the benchmarks share them.
__all__ = ["ToolServer", "free_port", "memory_settings", "running_server", "serve_in_thread", "start_server_process",
           "stop_server_process"]
