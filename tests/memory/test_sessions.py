"""Session lifecycle under attack (issue 16 §2, §9): deletion under concurrency, caps, idle expiry."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from agemem.memory.client import HttpMemoryClient, InProcessMemoryClient
from agemem.memory.service import MemoryService
from tests.fixtures_memory import memory_settings, running_server


async def _session(http: httpx.AsyncClient) -> tuple[str, dict[str, str]]:
    r = await http.post("/sessions")
    assert r.status_code == 201, r.text
    return r.json()["session_id"], {"Authorization": f"Bearer {r.json()['session_token']}"}


async def test_delete_revokes_at_once_while_the_session_keeps_calling(tmp_path) -> None:
    """A DELETE raced by the session's own calls: after its 204 the token opens nothing, ever, and
    nothing those calls wrote is left in the store. Before the fix the token kept working (a call
    re-cached the row being deleted) and later writes stayed behind as orphans."""
    with running_server(memory_settings(tmp_path)) as (base_url, _, service):
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as http:
            for trial in range(4):
                sid, auth = await _session(http)
                stop = asyncio.Event()

                async def hammer(k: int) -> None:
                    n = 0
                    while not stop.is_set():
                        n += 1
                        # Two writers; the others make cheap calls that only pass the token check.
                        tool, body = ("Add_memory", {"content": f"trial {trial} write {k}.{n}"}) if k < 2 else \
                            ("Delete_memory", {"memory_id": f"{k:032x}"})
                        r = await http.post(f"/sessions/{sid}/tools/{tool}", json=body, headers=auth)
                        assert r.status_code in (200, 404), r.text

                workers = [asyncio.create_task(hammer(k)) for k in range(12)]
                await asyncio.sleep(0.05 + 0.03 * (trial % 3))
                r = await http.delete(f"/sessions/{sid}", headers=auth)
                assert r.status_code == 204, r.text
                await asyncio.sleep(0.2)  # the session's calls keep coming after the 204
                stop.set()
                await asyncio.gather(*workers)
                for method, url, body in [
                    ("POST", f"/sessions/{sid}/tools/Add_memory", {"content": "after the delete"}),
                    ("POST", f"/sessions/{sid}/tools/Retrieve_memory", {"query": "write"}),
                    ("GET", f"/sessions/{sid}/memories", None),
                    ("DELETE", f"/sessions/{sid}", None),
                ]:
                    r = await http.request(method, url, json=body, headers=auth)
                    assert r.status_code == 404, (trial, method, url, r.status_code, r.text[:200])
                left = await asyncio.to_thread(service.store.list, sid)
                assert left == [], (trial, len(left))


async def test_two_racing_deletes_one_wins_the_other_finds_nothing(tmp_path) -> None:
    with running_server(memory_settings(tmp_path)) as (base_url, _, _service):
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
            for _ in range(5):
                sid, auth = await _session(http)
                await http.post(f"/sessions/{sid}/tools/Add_memory", json={"content": "x"}, headers=auth)
                codes = sorted(r.status_code for r in await asyncio.gather(
                    *(http.delete(f"/sessions/{sid}", headers=auth) for _ in range(2))))
                assert codes == [204, 404]


async def test_live_sessions_are_capped(tmp_path) -> None:
    settings = memory_settings(tmp_path, max_sessions=3)
    with running_server(settings) as (base_url, _, _service):
        client = HttpMemoryClient(base_url, retries=0)
        try:
            sessions = [await client.create_session() for _ in range(3)]
            from agemem.memory.base import MemoryUnavailableError

            with pytest.raises(MemoryUnavailableError, match="max_sessions") as info:
                await client.create_session()
            assert type(info.value).__name__ == "SessionLimitError"
            async with httpx.AsyncClient(base_url=base_url) as http:
                r = await http.post("/sessions")
                assert r.status_code == 429 and "memory.max_sessions" in r.json()["detail"]
            await client.delete_session(sessions[0])
            await client.delete_session(sessions[0])  # already gone: no error
            assert (await client.create_session()).session_id
        finally:
            await client.aclose()


async def test_idle_sessions_expire_with_their_memories(tmp_path) -> None:
    settings = memory_settings(tmp_path, session_idle_ttl_s=0.6, session_sweep_interval_s=0.2)
    service = MemoryService.from_settings(settings)
    client = InProcessMemoryClient(service)
    try:
        idle, busy = await client.create_session(), await client.create_session()
        for s in (idle, busy):
            assert (await client.call_tool(s, "Add_memory", {"content": "a fact to keep"})).ok
        for _ in range(6):
            await asyncio.sleep(0.2)
            await client.call_tool(busy, "Retrieve_memory", {"query": "fact"})  # keeps it alive
        assert await service.sweep_idle() == 1
        from agemem.memory.service import UnknownSessionError

        with pytest.raises(UnknownSessionError):
            await client.list_memories(idle)
        assert await asyncio.to_thread(service.store.list, idle.session_id) == []
        assert [m.content for m in await client.list_memories(busy)] == ["a fact to keep"]
        # A restart does not expire everything at once: sessions it never saw count from its start.
        later = MemoryService(service.store, service.embedder, service.config)
        assert await later.sweep_idle() == 0
        assert await later.sweep_idle(now=time.time() + 1.0) == 1
    finally:
        service.close()


async def test_the_server_sweeps_idle_sessions_by_itself(tmp_path) -> None:
    settings = memory_settings(tmp_path, session_idle_ttl_s=0.5, session_sweep_interval_s=0.2)
    with running_server(settings) as (base_url, _, _service):
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            sid, auth = await _session(http)
            assert (await http.get(f"/sessions/{sid}/memories", headers=auth)).status_code == 200
            deadline = time.monotonic() + 10
            while (await http.get("/healthz")).status_code == 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                if sid not in await asyncio.to_thread(_service.store.sessions):
                    break
            assert (await http.get(f"/sessions/{sid}/memories", headers=auth)).status_code == 404
