"""Every acknowledged operation is reflected (issue 16 §3, §4, §5).

Races on one memory id through the service (its store calls run in worker threads, really
concurrent), retried requests, and the caps on what one session and one memory may hold.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from agemem.memory.client import HttpMemoryClient, InProcessMemoryClient
from tests.fixtures_memory import ToolServer, memory_settings, running_server


async def _add(client: InProcessMemoryClient, session, content: str) -> str:
    result = await client.call_tool(session, "Add_memory", {"content": content})
    assert result.ok, result
    return result.data["memory_id"]


async def test_an_acknowledged_delete_is_never_undone_by_a_racing_update(memory_client: InProcessMemoryClient) -> None:
    session = await memory_client.create_session()
    rewrite = "a rewritten text"
    await memory_client.call_tool(session, "Retrieve_memory", {"query": rewrite})  # its vector is cached now
    resurrected = []
    for n in range(25):
        mid = await _add(memory_client, session, f"round {n}: the original text")
        deleted, *updates = await asyncio.gather(
            memory_client.call_tool(session, "Delete_memory", {"memory_id": mid}),
            *(memory_client.call_tool(session, "Update_memory", {"memory_id": mid, "content": rewrite})
              for _ in range(3)),
        )
        present = {m.memory_id for m in await memory_client.list_memories(session)}
        assert deleted.ok or mid in present
        if deleted.ok and mid in present:
            resurrected.append(n)
        if mid in present:
            await memory_client.call_tool(session, "Delete_memory", {"memory_id": mid})
    assert resurrected == []


async def test_concurrent_updates_keep_every_metadata_key(memory_client: InProcessMemoryClient) -> None:
    session = await memory_client.create_session()
    for n in range(4):
        mid = await _add(memory_client, session, f"memory {n}")
        results = await asyncio.gather(*(
            memory_client.call_tool(session, "Update_memory", {
                "memory_id": mid, "content": f"memory {n} v{k}", "metadata_json": json.dumps({f"key{k}": k})})
            for k in range(6)
        ))
        assert all(r.ok for r in results), results
        [item] = [m for m in await memory_client.list_memories(session) if m.memory_id == mid]
        assert {k: v for k, v in item.metadata.items() if k.startswith("key")} == {f"key{k}": k for k in range(6)}


async def test_of_two_racing_deletes_one_reports_not_found(memory_client: InProcessMemoryClient) -> None:
    session = await memory_client.create_session()
    for n in range(10):
        mid = await _add(memory_client, session, f"to delete {n}")
        first, second = await asyncio.gather(*(
            memory_client.call_tool(session, "Delete_memory", {"memory_id": mid}) for _ in range(2)))
        assert sorted([first.ok, second.ok]) == [False, True], (first, second)
        assert (second if first.ok else first).data["error"] == "not_found"


async def test_a_repeated_request_id_is_answered_not_run_again(tool_server: ToolServer) -> None:
    async with httpx.AsyncClient(base_url=tool_server.base_url, timeout=30) as http:
        r = await http.post("/sessions")
        sid, auth = r.json()["session_id"], {"Authorization": f"Bearer {r.json()['session_token']}"}
        headers = {**auth, "Idempotency-Key": "add-once-1"}
        answers = await asyncio.gather(*(
            http.post(f"/sessions/{sid}/tools/Add_memory", json={"content": "stored once"}, headers=headers)
            for _ in range(3)))
        later = await http.post(f"/sessions/{sid}/tools/Add_memory", json={"content": "stored once"}, headers=headers)
        assert {a.json()["data"]["memory_id"] for a in [*answers, later]} == {answers[0].json()["data"]["memory_id"]}
        r = await http.get(f"/sessions/{sid}/memories", headers=auth)
        assert [m["content"] for m in r.json()["memories"]] == ["stored once"]
        # A Delete's retry gets the first answer (ok), not "not found".
        mid = answers[0].json()["data"]["memory_id"]
        for _ in range(2):
            r = await http.post(f"/sessions/{sid}/tools/Delete_memory", json={"memory_id": mid},
                                headers={**auth, "Idempotency-Key": "delete-1"})
            assert r.json()["ok"] is True
        r = await http.post(f"/sessions/{sid}/tools/Add_memory", json={"content": "x"},
                            headers={**auth, "Idempotency-Key": "bad key!"})
        assert r.status_code == 422


async def test_client_retries_after_read_timeouts_do_not_duplicate_adds(tool_server: ToolServer) -> None:
    """The client retried reads that timed out after the server got the request: 48 acknowledged
    adds left 132 rows. Its retries now carry the same request id."""
    slow = HttpMemoryClient(tool_server.base_url, timeout_s=0.05, retries=8, backoff_s=0.05)
    patient = HttpMemoryClient(tool_server.base_url, timeout_s=60.0, retries=0)
    from agemem.memory.base import MemoryUnavailableError

    try:
        session = await patient.create_session()
        long_text = " ".join(f"word{i}" for i in range(600))  # slow to embed: longer than the client waits
        outcomes = await asyncio.gather(
            *(slow.call_tool(session, "Add_memory", {"content": f"fact {i}: {long_text}"}) for i in range(12)),
            return_exceptions=True,
        )
        assert all(isinstance(o, MemoryUnavailableError) or o.ok for o in outcomes), outcomes
        acked = {o.data["memory_id"] for o in outcomes if not isinstance(o, BaseException)}
        await asyncio.sleep(1.0)  # attempts still running on the server finish
        stored = await patient.list_memories(session)
        contents = [m.content.split(":")[0] for m in stored]
        assert len(contents) == len(set(contents)), sorted(contents)  # no fact stored twice
        assert acked <= {m.memory_id for m in stored}
    finally:
        await slow.aclose()
        await patient.aclose()


async def test_metadata_growth_is_capped(tool_server: ToolServer, http_memory_client: HttpMemoryClient) -> None:
    """40 Updates of 60 KB keys grew one memory to 2.47 MB; stored metadata is capped after the merge."""
    limit = tool_server.settings.memory.max_metadata_bytes
    c = http_memory_client
    session = await c.create_session()
    mid = (await c.call_tool(session, "Add_memory", {"content": "grows"})).data["memory_id"]
    refused = 0
    for k in range(8):
        r = await c.call_tool(session, "Update_memory", {
            "memory_id": mid, "content": "grows", "metadata_json": json.dumps({f"k{k}": "v" * (limit // 3)})})
        refused += not r.ok
        assert r.ok or ("metadata is too large" in r.text and r.data["error"] == "content_too_large"), r
    [item] = await c.list_memories(session)
    assert len(json.dumps(item.metadata, separators=(",", ":"))) <= limit and refused >= 5


async def test_memories_per_session_are_capped(tmp_path) -> None:
    from agemem.memory.service import MemoryService

    service = MemoryService.from_settings(memory_settings(tmp_path, max_memories_per_session=3))
    client = InProcessMemoryClient(service)
    try:
        session = await client.create_session()
        ids = [await _add(client, session, f"fact {i}") for i in range(3)]
        over = await client.call_tool(session, "Add_memory", {"content": "one too many"})
        assert not over.ok and over.data["error"] == "memory_limit" and "limit" in over.text
        assert (await client.call_tool(session, "Delete_memory", {"memory_id": ids[0]})).ok
        assert (await client.call_tool(session, "Add_memory", {"content": "fits again"})).ok
        # Counted from the store when the service did not create the session (after a restart).
        again = InProcessMemoryClient(MemoryService(service.store, service.embedder, service.config))
        assert not (await again.call_tool(session, "Add_memory", {"content": "still over"})).ok
    finally:
        service.close()


async def test_listing_pages_in_order_without_truncation(tmp_path) -> None:
    """GET /memories truncated at 16,384 rows and sorted after truncating; now it pages by cursor."""
    settings = memory_settings(tmp_path, list_page_size=4)
    with running_server(settings) as (base_url, _, _service):
        client = HttpMemoryClient(base_url, retries=0)
        try:
            session = await client.create_session()
            contents = [f"fact number {i}" for i in range(11)]
            for text in contents:
                assert (await client.call_tool(session, "Add_memory", {"content": text})).ok
            assert [m.content for m in await client.list_memories(session)] == contents
            async with httpx.AsyncClient(base_url=base_url) as http:
                auth = {"Authorization": f"Bearer {session.session_token}"}
                url = f"/sessions/{session.session_id}/memories"
                first = (await http.get(url, headers=auth)).json()
                assert len(first["memories"]) == 4 and first["next_cursor"]
                second = (await http.get(url, params={"cursor": first["next_cursor"], "limit": 2}, headers=auth)).json()
                assert [m["content"] for m in second["memories"]] == contents[4:6]
                for params in ({"cursor": "garbage"}, {"limit": 5}, {"limit": 0}):
                    assert (await http.get(url, params=params, headers=auth)).status_code == 422, params
        finally:
            await client.aclose()


@pytest.mark.parametrize("scope", ["shared", "session"])
async def test_embedding_cache_scope(tmp_path, scope: str) -> None:
    """Issue 16 §13: with a shared cache a Retrieve of another session's text is a cache hit (a timing
    side channel); memory.embed_cache_scope=session keys the cache by session."""
    from agemem.memory.service import MemoryService

    service = MemoryService.from_settings(memory_settings(tmp_path, embed_cache_scope=scope))
    client = InProcessMemoryClient(service)
    try:
        a, b = await client.create_session(), await client.create_session()
        secret = "The vault code is 4417."
        assert (await client.call_tool(a, "Add_memory", {"content": secret})).ok
        model = service.embedder._model
        service.embedder._model = None  # from here on a forward pass fails: only cache hits succeed
        try:
            hit = await client.call_tool(b, "Retrieve_memory", {"query": secret})
        except AttributeError:
            hit = None
        finally:
            service.embedder._model = model
        assert (hit is not None) == (scope == "shared")
    finally:
        service.close()
