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
    assert (await http.get(f"/sessions/{b}/memories", headers=auth_b)).json() == {"memories": [], "next_cursor": None}
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


async def test_unknown_session_on_every_endpoint(http: httpx.AsyncClient) -> None:
    sid, auth = await _session(http)
    ghost = "e" * 32  # well-formed, never created
    for method, url, body in [
        ("POST", f"/sessions/{ghost}/tools/Add_memory", {"content": "x"}),
        ("GET", f"/sessions/{ghost}/memories", None),
        ("DELETE", f"/sessions/{ghost}", None),
        ("GET", "/sessions/" + "z" * 200 + "/memories", None),  # not even well-formed
        ("POST", "/sessions/a%20b/tools/Add_memory", {"content": "x"}),
    ]:
        r = await http.request(method, url, json=body, headers=auth)
        assert r.status_code == 404, (method, url, r.text)
        assert r.json() == {"detail": "unknown session"}
    # A path that escapes the route is the router's plain 404.
    r = await http.post("/sessions/..%2F..%2Fetc/tools/Add_memory", json={"content": "x"}, headers=auth)
    assert r.status_code == 404
    # A deleted session is unknown from then on, whatever the token.
    assert (await http.delete(f"/sessions/{sid}", headers=auth)).status_code == 204
    for method, url in [("DELETE", f"/sessions/{sid}"), ("GET", f"/sessions/{sid}/memories")]:
        assert (await http.request(method, url, headers=auth)).status_code == 404


async def test_auth_errors_leak_nothing(http: httpx.AsyncClient) -> None:
    sid, auth = await _session(http)
    r = await http.post(f"/sessions/{sid}/tools/Add_memory", json={"content": "Orchid codename is VELVET"}, headers=auth)
    mid = r.json()["data"]["memory_id"]
    token = auth["Authorization"].split()[1]
    # Unknown tool with a wrong token: the token is checked first (no tool list for strangers).
    r = await http.post(f"/sessions/{sid}/tools/Frobnicate", json={}, headers={"Authorization": "Bearer x"})
    assert r.status_code == 403
    for headers in ({}, {"Authorization": "Bearer " + token[:-1]}, {"Authorization": "Bearer " + token + "x"},
                    {"Authorization": token}, {"Authorization": "Bearer"}):
        for method, url, body in [
            ("POST", f"/sessions/{sid}/tools/Retrieve_memory", {"query": "codename"}),
            ("POST", f"/sessions/{sid}/tools/Update_memory", {"memory_id": mid, "content": "hijacked"}),
            ("POST", f"/sessions/{sid}/tools/Delete_memory", {"memory_id": mid}),
            ("GET", f"/sessions/{sid}/memories", None),
            ("DELETE", f"/sessions/{sid}", None),
        ]:
            r = await http.request(method, url, json=body, headers=headers)
            assert r.status_code in (401, 403), (headers, url, r.status_code)
            for private in ("VELVET", mid, token):
                assert private not in r.text
    r = await http.get(f"/sessions/{sid}/memories", headers=auth)
    assert [(m["memory_id"], m["content"]) for m in r.json()["memories"]] == [(mid, "Orchid codename is VELVET")]


@pytest.mark.parametrize(
    ("tool", "body", "fragment"),
    [
        ("Add_memory", {}, "missing required argument 'content'"),
        ("Add_memory", {"content": 7}, "'content'"),
        ("Add_memory", {"content": "x", "metadata_json": {"a": 1}}, "'metadata_json'"),
        ("Add_memory", {"content": "x", "memory_type": "bad type!"}, "memory_type"),
        ("Add_memory", {"content": "x", "metadata_json": "[1]"}, "JSON object"),
        ("Update_memory", {"content": "x"}, "missing required argument 'memory_id'"),
        ("Update_memory", {"memory_id": 5, "content": "x"}, "'memory_id'"),
        ("Delete_memory", {"memory_id": ["a"]}, "'memory_id'"),
        ("Delete_memory", {"id": "a"}, "unexpected argument 'id'"),
        ("Retrieve_memory", {"query": "q", "top_k": 0}, "top_k"),
        ("Retrieve_memory", {"query": "q", "top_k": 2.5}, "'top_k'"),
    ],
)
async def test_422_names_what_to_fix(http: httpx.AsyncClient, tool: str, body: dict, fragment: str) -> None:
    sid, auth = await _session(http)
    r = await http.post(f"/sessions/{sid}/tools/{tool}", json=body, headers=auth)
    assert r.status_code == 422, r.text
    payload = r.json()
    assert payload["ok"] is False and payload["data"]["error"] == "invalid_arguments"
    assert payload["detail"].startswith(tool) and fragment in payload["detail"], payload["detail"]
    assert (await http.get(f"/sessions/{sid}/memories", headers=auth)).json() == {"memories": [], "next_cursor": None}


async def test_size_limits_at_the_boundary(http: httpx.AsyncClient, tool_server: ToolServer) -> None:
    sid, auth = await _session(http)
    mem = tool_server.settings.memory
    tool = f"/sessions/{sid}/tools"
    # Exactly the content limit is accepted; one byte more is 413, for every text argument.
    r = await http.post(f"{tool}/Add_memory", json={"content": "a" * mem.max_content_bytes}, headers=auth)
    assert r.status_code == 200 and r.json()["ok"], r.text[:200]
    mid = r.json()["data"]["memory_id"]
    over = "a" * (mem.max_content_bytes + 1)
    for name, body in [
        ("Add_memory", {"content": over}),
        ("Update_memory", {"memory_id": mid, "content": over}),
        ("Retrieve_memory", {"query": over}),
    ]:
        r = await http.post(f"{tool}/{name}", json=body, headers=auth)
        assert r.status_code == 413 and str(mem.max_content_bytes) in r.json()["detail"], (name, r.text[:200])
    # A body just under the body limit is parsed (and judged on its content); just over is refused unread.
    under = b'{"content": "b"' + b" " * (mem.max_body_bytes - 20) + b"}"  # JSON whitespace: parsed, not stored
    assert mem.max_body_bytes - 10 < len(under) <= mem.max_body_bytes
    r = await http.post(f"{tool}/Add_memory", content=under, headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["ok"], r.text[:200]
    too_big = b'{"content": "' + b"c" * mem.max_body_bytes + b'"}'
    r = await http.post(f"{tool}/Add_memory", content=too_big, headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]
    contents = [m["content"][:1] for m in (await http.get(f"/sessions/{sid}/memories", headers=auth)).json()["memories"]]
    assert contents == ["a", "b"]


async def test_concurrent_sessions_over_http(tool_server: ToolServer) -> None:
    """32 sessions at once, each adding, retrieving, updating and deleting; nothing crosses over."""
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=tool_server.base_url, timeout=60, limits=limits) as http:

        async def worker(i: int) -> tuple[str, dict[str, str], list[str], list[str]]:
            sid, auth = await _session(http)
            tool = f"/sessions/{sid}/tools"
            ids = []
            for k in range(3):
                r = await http.post(f"{tool}/Add_memory", json={"content": f"session {i} fact {k} about topic {i * 7}"}, headers=auth)
                assert r.status_code == 200 and r.json()["ok"], r.text
                ids.append(r.json()["data"]["memory_id"])
            r = await http.post(f"{tool}/Retrieve_memory", json={"query": f"topic {i * 7}", "top_k": 20}, headers=auth)
            assert {m["memory_id"] for m in r.json()["data"]["memories"]} == set(ids)
            r = await http.post(f"{tool}/Update_memory", json={"memory_id": ids[0], "content": f"session {i} updated"}, headers=auth)
            assert r.json()["ok"], r.text
            r = await http.post(f"{tool}/Delete_memory", json={"memory_id": ids[1]}, headers=auth)
            assert r.json()["ok"], r.text
            return sid, auth, ids, [f"session {i} updated", f"session {i} fact 2 about topic {i * 7}"]

        results = await asyncio.gather(*(worker(i) for i in range(32)))
        all_ids = {mid for _, _, ids, _ in results for mid in ids}
        for sid, auth, ids, expected in results:
            r = await http.get(f"/sessions/{sid}/memories", headers=auth)
            got = r.json()["memories"]
            assert sorted(m["content"] for m in got) == sorted(expected)
            assert {m["memory_id"] for m in got} == {ids[0], ids[2]}
            # Another session's id is invisible here even when it exists.
            foreign = next(iter(all_ids - set(ids)))
            r = await http.post(f"/sessions/{sid}/tools/Delete_memory", json={"memory_id": foreign}, headers=auth)
            assert r.json()["ok"] is False


@pytest.mark.slow
async def test_restart_persistence(tmp_path) -> None:
    """The server process is killed (SIGKILL) and restarted on the same milvus-lite file."""
    from tests.fixtures_memory import start_server_process, stop_server_process

    db = tmp_path / "memory.db"
    proc, base_url = await asyncio.to_thread(start_server_process, db)
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            a, auth_a = await _session(http)
            b, auth_b = await _session(http)
            ids = []
            for text in ("The Danube flows into the Black Sea.", "Ada Lovelace wrote the first program.", "to delete"):
                r = await http.post(f"/sessions/{a}/tools/Add_memory", json={"content": text, "memory_type": "fact"}, headers=auth_a)
                ids.append(r.json()["data"]["memory_id"])
            rb = await http.post(f"/sessions/{b}/tools/Add_memory", json={"content": "B's own note"}, headers=auth_b)
            b_id = rb.json()["data"]["memory_id"]
            before = (await http.get(f"/sessions/{a}/memories", headers=auth_a)).json()
        proc.kill()  # no shutdown hook runs: whatever was acknowledged must already be durable
        await asyncio.to_thread(proc.wait, 30)
        proc, base_url = await asyncio.to_thread(start_server_process, db)
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            assert (await http.get(f"/sessions/{a}/memories", headers=auth_a)).json() == before
            r = await http.post(f"/sessions/{a}/tools/Retrieve_memory", json={"query": "Which sea does the Danube reach?", "top_k": 1}, headers=auth_a)
            assert [m["memory_id"] for m in r.json()["data"]["memories"]] == [ids[0]]
            # Tokens survive too, and still only open their own session.
            assert (await http.get(f"/sessions/{a}/memories", headers=auth_b)).status_code == 403
            r = await http.post(f"/sessions/{b}/tools/Delete_memory", json={"memory_id": ids[0]}, headers=auth_b)
            assert r.json()["ok"] is False
            # Writes keep working after the restart.
            r = await http.post(f"/sessions/{a}/tools/Update_memory", json={"memory_id": ids[1], "content": "Ada Lovelace, 1843."}, headers=auth_a)
            assert r.json()["ok"], r.text
            assert (await http.post(f"/sessions/{a}/tools/Delete_memory", json={"memory_id": ids[2]}, headers=auth_a)).json()["ok"]
            after = (await http.get(f"/sessions/{a}/memories", headers=auth_a)).json()["memories"]
            assert [(m["memory_id"], m["content"], m["memory_type"]) for m in after] == [
                (ids[0], "The Danube flows into the Black Sea.", "fact"), (ids[1], "Ada Lovelace, 1843.", "fact")]
            assert [m["memory_id"] for m in (await http.get(f"/sessions/{b}/memories", headers=auth_b)).json()["memories"]] == [b_id]
    finally:
        await asyncio.to_thread(stop_server_process, proc)


async def test_undecodable_or_deep_bodies_are_422(http: httpx.AsyncClient) -> None:
    """Found by the schemathesis test: FastAPI answered these with a bare 400."""
    sid, auth = await _session(http)
    headers = {**auth, "Content-Type": "application/json"}
    for raw in (b"\x80", b'{"content": "\xff\xfe"}', b"[" * 20_000 + b"]" * 20_000, b""):
        r = await http.post(f"/sessions/{sid}/tools/Add_memory", content=raw, headers=headers)
        assert r.status_code == 422, (raw[:20], r.text[:200])
        assert r.json()["ok"] is False and "not valid JSON" in r.json()["detail"]
