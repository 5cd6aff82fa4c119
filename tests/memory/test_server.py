"""The tool server over real HTTP on 127.0.0.1: every endpoint and error code."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest

from agemem.memory.base import MemoryUnavailableError
from agemem.memory.client import HttpMemoryClient
from agemem.memory.service import SessionAuthError, UnknownSessionError
from tests.fixtures_memory import ToolServer, memory_settings, serve_in_thread


@pytest.fixture
async def http(tool_server: ToolServer):
    async with httpx.AsyncClient(base_url=tool_server.base_url, timeout=30) as client:
        yield client


async def _session(http: httpx.AsyncClient) -> tuple[str, dict[str, str]]:
    r = await http.post("/sessions")
    assert r.status_code == 201
    body = r.json()
    return body["session_id"], {"Authorization": f"Bearer {body['session_token']}"}


async def test_healthz_and_session_lifecycle(http: httpx.AsyncClient) -> None:
    r = await http.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    sid, auth = await _session(http)
    r = await http.post(f"/sessions/{sid}/tools/Add_memory", json={"content": "The Nile is in Africa."}, headers=auth)
    assert r.status_code == 200 and r.json()["ok"] is True
    mid = r.json()["data"]["memory_id"]
    r = await http.post(f"/sessions/{sid}/tools/Retrieve_memory", json={"query": "river in Africa"}, headers=auth)
    assert r.status_code == 200
    assert r.json()["text"] == f"[retrieved memories]\n- The Nile is in Africa. (Memory ID: {mid})"
    r = await http.get(f"/sessions/{sid}/memories", headers=auth)
    assert r.status_code == 200 and [m["memory_id"] for m in r.json()["memories"]] == [mid]
    # Tool-level failure: 200 with ok false.
    r = await http.post(f"/sessions/{sid}/tools/Delete_memory", json={"memory_id": "0" * 32}, headers=auth)
    assert r.status_code == 200 and r.json()["ok"] is False and "no memory" in r.json()["text"]
    r = await http.delete(f"/sessions/{sid}", headers=auth)
    assert r.status_code == 204 and r.content == b""
    assert (await http.get(f"/sessions/{sid}/memories", headers=auth)).status_code == 404


async def test_error_codes(http: httpx.AsyncClient, tool_server: ToolServer) -> None:
    sid, auth = await _session(http)
    secret = "Secret fact of session one"
    await http.post(f"/sessions/{sid}/tools/Add_memory", json={"content": secret}, headers=auth)
    tool = f"/sessions/{sid}/tools/Retrieve_memory"
    # unknown session
    assert (await http.post("/sessions/" + "f" * 32 + "/tools/Add_memory", json={"content": "x"}, headers=auth)).status_code == 404
    assert (await http.get("/sessions/not-a-session/memories", headers=auth)).status_code == 404
    # missing / wrong token: no data of the session in the body
    for headers, code in [({}, 401), ({"Authorization": "Bearer wrong"}, 403), ({"Authorization": "Basic abc"}, 401)]:
        for method, url, body in [
            ("POST", tool, {"query": secret}),
            ("GET", f"/sessions/{sid}/memories", None),
            ("DELETE", f"/sessions/{sid}", None),
        ]:
            r = await http.request(method, url, json=body, headers=headers)
            assert r.status_code == code, (method, url, headers, r.text)
            assert secret not in r.text
    # unknown tool
    r = await http.post(f"/sessions/{sid}/tools/Drop_database", json={}, headers=auth)
    assert r.status_code == 404 and "unknown tool" in r.json()["detail"]
    # malformed JSON, non-object body, wrong types, missing and extra arguments
    r = await http.post(tool, content=b"{not json", headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 422
    for body in ([1, 2], "text", None):
        assert (await http.post(tool, json=body, headers=auth)).status_code == 422, body
    for body in ({"query": 3}, {}, {"query": "q", "top_k": "many"}, {"query": "q", "bogus": 1}, {"query": "q", "top_k": 99}):
        r = await http.post(tool, json=body, headers=auth)
        assert r.status_code == 422, body
        assert r.json()["ok"] is False and r.json()["detail"].startswith("Retrieve_memory")
    # content over max_content_bytes, body over max_body_bytes (declared and chunked)
    limit = tool_server.settings.memory.max_content_bytes
    r = await http.post(f"/sessions/{sid}/tools/Add_memory", json={"content": "é" * limit}, headers=auth)
    assert r.status_code == 413 and str(limit) in r.json()["detail"]
    big = json.dumps({"content": "x" * 200_000}).encode()
    r = await http.post(f"/sessions/{sid}/tools/Add_memory", content=big, headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 413

    async def chunks():
        for _ in range(100):
            yield b"x" * 4096

    r = await http.post(f"/sessions/{sid}/tools/Add_memory", content=chunks(), headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 413
    # the session is untouched by all of the above
    r = await http.get(f"/sessions/{sid}/memories", headers=auth)
    assert [m["content"] for m in r.json()["memories"]] == [secret]


async def test_isolation_over_http(http: httpx.AsyncClient) -> None:
    a, auth_a = await _session(http)
    b, auth_b = await _session(http)
    mid = (await http.post(f"/sessions/{a}/tools/Add_memory", json={"content": "A's private note"}, headers=auth_a)).json()["data"]["memory_id"]
    # B's token on A's session
    for method, url, body in [
        ("POST", f"/sessions/{a}/tools/Retrieve_memory", {"query": "private note"}),
        ("GET", f"/sessions/{a}/memories", None),
        ("DELETE", f"/sessions/{a}", None),
    ]:
        r = await http.request(method, url, json=body, headers=auth_b)
        assert r.status_code == 403 and "private" not in r.text
    # A's memory id through B's own session
    for tool, body in [("Update_memory", {"memory_id": mid, "content": "B was here"}), ("Delete_memory", {"memory_id": mid})]:
        r = await http.post(f"/sessions/{b}/tools/{tool}", json=body, headers=auth_b)
        assert r.status_code == 200 and r.json()["ok"] is False
    r = await http.post(f"/sessions/{b}/tools/Retrieve_memory", json={"query": "A's private note", "top_k": 20}, headers=auth_b)
    assert r.json()["data"]["memories"] == []
    assert (await http.get(f"/sessions/{b}/memories", headers=auth_b)).json() == {"memories": []}
    r = await http.get(f"/sessions/{a}/memories", headers=auth_a)
    assert [m["content"] for m in r.json()["memories"]] == ["A's private note"]


async def test_http_client_matches_in_process(http_memory_client: HttpMemoryClient) -> None:
    c = http_memory_client
    assert await c.healthz()
    s = await c.create_session()
    add = await c.call_tool(s, "Add_memory", {"content": "Mount Everest is 8849 m high.", "memory_type": "knowledge"})
    assert add.ok
    bad = await c.call_tool(s, "Retrieve_memory", {"query": "q", "top_k": "x"})
    assert not bad.ok and bad.data["error"] == "invalid_arguments"
    big = await c.call_tool(s, "Add_memory", {"content": "y" * 10_000})
    assert not big.ok and bad.text
    unknown = await c.call_tool(s, "Frobnicate", {})
    assert not unknown.ok and "unknown tool" in unknown.text
    got = await c.call_tool(s, "Retrieve_memory", {"query": "how high is Everest"})
    assert got.data["memories"][0]["memory_id"] == add.data["memory_id"]
    items = await c.list_memories(s)
    assert items[0].memory_type == "knowledge"
    with pytest.raises(SessionAuthError):
        await c.list_memories(s.model_copy(update={"session_token": "nope"}))
    await c.delete_session(s)
    with pytest.raises(UnknownSessionError):
        await c.call_tool(s, "Retrieve_memory", {"query": "q"})

    sessions = await asyncio.gather(*(c.create_session() for _ in range(16)))
    results = await asyncio.gather(
        *(c.call_tool(x, "Add_memory", {"content": f"fact number {i}"}) for i, x in enumerate(sessions))
    )
    assert all(r.ok for r in results)
    for i, x in enumerate(sessions):
        assert [m.content for m in await c.list_memories(x)] == [f"fact number {i}"]


async def test_server_down_raises_memory_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = HttpMemoryClient(f"http://127.0.0.1:{port}", retries=1, backoff_s=0.01)
    with pytest.raises(MemoryUnavailableError, match=f"127.0.0.1:{port}"):
        await client.create_session()
    await client.aclose()


async def test_server_token_required(tmp_path) -> None:
    settings = memory_settings(tmp_path, server_token="s3cret-token")
    base_url, server, thread, service = await asyncio.to_thread(serve_in_thread, settings)
    try:
        async with httpx.AsyncClient(base_url=base_url) as http:
            assert (await http.post("/sessions")).status_code == 401
            r = await http.post("/sessions", headers={"Authorization": "Bearer nope"})
            assert r.status_code == 403 and "s3cret" not in r.text
            assert (await http.post("/sessions", headers={"Authorization": "Bearer s3cret-token"})).status_code == 201
        good = HttpMemoryClient(base_url, server_token="s3cret-token")
        assert (await good.create_session()).session_token
        await good.aclose()
        bad = HttpMemoryClient(base_url, server_token="wrong")
        with pytest.raises(SessionAuthError, match="server token"):
            await bad.create_session()
        await bad.aclose()
    finally:
        server.should_exit = True
        await asyncio.to_thread(thread.join, 10)
        service.close()
