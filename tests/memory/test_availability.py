"""Slow and idle clients, floods and noisy neighbours (issue 16 §8, §10), on loopback only."""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time

import httpx
import numpy as np
import pytest

from agemem.memory.client import InProcessMemoryClient
from agemem.memory.service import MemoryService
from tests.fixtures_memory import memory_settings, running_server


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes ``sock`` within ``seconds`` (recv sees EOF or a reset)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def test_connections_that_never_send_a_request_head_are_closed(tmp_path) -> None:
    """uvicorn never timed out a connection that sent nothing, or a head that trickles in."""
    settings = memory_settings(tmp_path, header_timeout_s=0.5, body_timeout_s=0.5)
    with running_server(settings) as (base_url, _, _service):
        port = int(base_url.rsplit(":", 1)[1])
        silent = socket.create_connection(("127.0.0.1", port))
        trickle = socket.create_connection(("127.0.0.1", port))
        trickle.sendall(b"POST /sessions HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
        body = socket.create_connection(("127.0.0.1", port))
        body.sendall(b"POST /sessions/x/tools/Add_memory HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        try:
            async with httpx.AsyncClient(base_url=base_url, timeout=5) as http:
                assert (await http.get("/healthz")).status_code == 200  # others are served meanwhile
            started = time.monotonic()
            assert await asyncio.to_thread(_closed_within, silent, 5.0)
            assert await asyncio.to_thread(_closed_within, trickle, 5.0)
            assert time.monotonic() - started < 4.0
            body.settimeout(5.0)
            assert body.recv(4096).startswith(b"HTTP/1.1 408"), "a body that never completes gets a 408"
        finally:
            for s in (silent, trickle, body):
                s.close()


def test_flood_log_lines_are_rate_limited() -> None:
    from agemem.memory.server import RateLimitedLog

    log = logging.getLogger("agemem.test.flood")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler, guard = Keep(), RateLimitedLog(("socket.accept() out of system resource",), interval_s=60)
    log.addHandler(handler)
    log.addFilter(guard)
    log.propagate = False
    try:
        for _ in range(1000):
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                log.error("socket.accept() out of system resource", exc_info=True)
        log.warning("something else")
    finally:
        log.removeHandler(handler)
        log.removeFilter(guard)
    assert [r.getMessage().split(" (")[0] for r in records] == ["socket.accept() out of system resource", "something else"]
    assert records[0].exc_info is None and "held back" in records[0].getMessage()


def test_open_file_limit_is_raised_for_the_connection_limit() -> None:
    from agemem.memory.server import raise_open_file_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        wanted = min(4096, hard)
        assert raise_open_file_limit(wanted) == wanted
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == wanted
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_noisy_session_does_not_starve_another(tmp_path) -> None:
    """48 concurrent adds of one session used to fill every embedding batch ahead of another
    session's single call; batches now admit sessions round-robin."""
    settings = memory_settings(tmp_path, embed_batch_size=4, embed_forward_batch_size=4, embed_batch_wait_ms=5,
                               embed_cache_size=0)
    service = MemoryService.from_settings(settings)
    client = InProcessMemoryClient(service)
    finished: list[str] = []
    try:
        noisy, quiet = await client.create_session(), await client.create_session()

        async def call(session, tag: str, text: str) -> None:
            result = await client.call_tool(session, "Add_memory", {"content": text})
            assert result.ok
            finished.append(tag)

        noise = [asyncio.create_task(call(noisy, "noisy", f"noisy fact {i}: " + "filler " * 40)) for i in range(48)]
        await asyncio.sleep(0.01)  # the flood is queued first
        await call(quiet, "quiet", "the quiet session's one fact")
        await asyncio.gather(*noise)
    finally:
        service.close()
    # FIFO served the quiet call after all 48 (in the last batch); round-robin, in the next one.
    assert finished.index("quiet") < 12, finished.index("quiet")


async def test_round_robin_batches_by_owner(memory_service) -> None:
    from agemem.memory.embedder import Embedder

    emb = Embedder(memory_service.embedder.model_name, "cpu", batch_size=2, forward_batch_size=2, wait_ms=20)
    order: list[str] = []

    async def one(owner: str, text: str) -> np.ndarray:
        vector = await emb.aencode([text], owner=owner)
        order.append(owner)
        return vector

    vectors = await asyncio.gather(*(one("a", f"a{i}") for i in range(6)), one("b", "b0"), one("c", "c0"))
    assert np.allclose(np.vstack(vectors), emb.encode([f"a{i}" for i in range(6)] + ["b0", "c0"]), atol=1e-5)
    assert set(order[:4]) == {"a", "b", "c"}, order  # b and c ride in the first two batches


@pytest.mark.slow
def test_idle_connection_flood_does_not_lock_anyone_out(tmp_path) -> None:
    """1,100 idle connections against a server started with the usual soft limit of 1,024 open
    files: health checks and a connected worker are still answered, the idle connections are
    closed by the head deadline, and the log does not flood."""
    from agemem.memory.process import start_server_process, stop_server_process

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4096:
        pytest.skip(f"hard open-file limit {hard}: cannot hold the flood's connections here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    log = tmp_path / "server.log"

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))

    proc, base_url = start_server_process(tmp_path / "memory.db", log_path=log, preexec_fn=low_soft_limit,
                                          extra=["--set", "memory.header_timeout_s=3"])
    port = int(base_url.rsplit(":", 1)[1])
    idle: list[socket.socket] = []
    try:
        with httpx.Client(base_url=base_url, timeout=10) as worker:
            r = worker.post("/sessions")
            sid, auth = r.json()["session_id"], {"Authorization": f"Bearer {r.json()['session_token']}"}
            for _ in range(1100):
                idle.append(socket.create_connection(("127.0.0.1", port)))
            time.sleep(0.5)
            health = [httpx.get(f"{base_url}/healthz", timeout=5).status_code for _ in range(4)]
            calls = [worker.post(f"/sessions/{sid}/tools/Retrieve_memory", json={"query": "q"}, headers=auth).status_code
                     for _ in range(5)]
            assert health == [200] * 4 and calls == [200] * 5, (health, calls)
            closed = sum(_closed_within(s, 8.0) for s in idle[:50])
            assert closed == 50
    finally:
        for s in idle:
            s.close()
        stop_server_process(proc)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert log.stat().st_size < 200_000, log.stat().st_size
