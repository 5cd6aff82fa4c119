"""The memory tools' semantics through the in-process client (real milvus-lite, real embedder)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from agemem.memory.base import MemoryClient, MemoryUnavailableError
from agemem.memory.client import InProcessMemoryClient, build_memory_client
from agemem.memory.embedder import get_embedder
from agemem.memory.service import SessionAuthError, UnknownSessionError
from agemem.memory.store import MilvusMemoryStore
from tests.fixtures_memory import memory_settings


async def test_embedder_normalised_and_batched(memory_service) -> None:
    emb = memory_service.embedder
    assert emb is get_embedder(None, "cpu", batch_size=emb.batch_size, forward_batch_size=emb.forward_batch_size,
                               wait_ms=emb.wait_s * 1000, cache_size=emb.cache_size,
                               cache_per_owner=emb.cache_per_owner)
    sync = emb.encode(["a cat sat on the mat", "quantum chromodynamics"])
    assert sync.shape == (2, emb.dim) and sync.dtype == np.float32
    assert np.allclose(np.linalg.norm(sync, axis=1), 1.0, atol=1e-5)
    # Concurrent aencode calls give the same vectors as one sync call.
    parts = await asyncio.gather(*(emb.aencode([t]) for t in ["a cat sat on the mat", "quantum chromodynamics"]))
    assert np.allclose(np.vstack(parts), sync, atol=1e-5)
    assert (await emb.aencode([])).shape == (0, emb.dim)


async def test_micro_batches_run_shortest_first_and_answer_each_request_when_ready(memory_service) -> None:
    from agemem.memory.embedder import Embedder

    emb = memory_service.embedder
    streaming = Embedder(emb.model_name, "cpu", batch_size=64, forward_batch_size=2, wait_ms=20)
    long_text = "The Eiffel Tower, completed in 1889 for the World's Fair, stands on the Champ de Mars in Paris. " * 4
    requests = [[long_text], ["Short."], ["Bananas are yellow.", long_text[:150], "Rome", "A fact of medium length."]]
    finished: list[int] = []

    async def one(i: int) -> np.ndarray:
        vectors = await streaming.aencode(requests[i])
        finished.append(i)
        return vectors

    results = await asyncio.gather(*(one(i) for i in range(len(requests))))
    for texts, vectors in zip(requests, results):
        assert np.allclose(vectors, emb.encode(texts), atol=1e-5)  # right vector in the right slot
    # One batch of six texts in forward passes of two, shortest first: the one-word request is
    # answered first although it came second, the single long text last although it came first.
    assert finished == [1, 2, 0]


async def test_a_failed_forward_pass_reaches_every_waiter(memory_service) -> None:
    from agemem.memory.embedder import Embedder

    broken = Embedder(memory_service.embedder.model_name, "cpu", forward_batch_size=1, wait_ms=20)
    broken._model = None
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(broken.aencode([t]) for t in ["one", "two", "three"]), return_exceptions=True), timeout=30
    )
    assert all(isinstance(o, AttributeError) for o in outcomes), outcomes


async def test_embedding_cache_is_exact_and_bounded(memory_service) -> None:
    from agemem.memory.embedder import Embedder

    emb = memory_service.embedder
    cached = Embedder(emb.model_name, "cpu", cache_size=2)
    texts = ["Paris is the capital of France.", "Bananas are yellow.", "Paris is the capital of France."]
    first = await cached.aencode(texts)
    assert np.allclose(first, emb.encode(texts), atol=1e-5)
    assert list(cached._cache) == [(None, t) for t in texts[:2]]  # each distinct text embedded once
    cached._model = None  # from now on a forward pass would fail: hits must not need one
    assert np.array_equal(await cached.aencode(texts[::-1]), first[::-1])
    cached._model = emb._model
    third = "A third text evicts the least recently used one."
    await cached.aencode([third])
    assert list(cached._cache) == [(None, texts[1]), (None, third)]


async def test_add_retrieve_update_delete(memory_client: InProcessMemoryClient) -> None:
    assert isinstance(memory_client, MemoryClient)
    s = await memory_client.create_session()
    add = await memory_client.call_tool(
        s, "Add_memory", {"content": "Paris is the capital of France.", "metadata_json": '{"topic": {"geo": [1]}}'}
    )
    assert add.ok and add.data["memory_id"] in add.text
    mid = add.data["memory_id"]
    other = await memory_client.call_tool(s, "Add_memory", {"content": "Bananas are yellow.", "memory_type": "knowledge"})
    assert other.ok

    hit = await memory_client.call_tool(s, "Retrieve_memory", {"query": "capital city of France", "top_k": 1})
    assert hit.ok
    assert hit.text == f"[retrieved memories]\n- Paris is the capital of France. (Memory ID: {mid})"
    assert hit.data["memories"][0]["memory_id"] == mid and hit.data["memories"][0]["score"] > 0.5
    typed = await memory_client.call_tool(s, "Retrieve_memory", {"query": "capital of France", "memory_type": "knowledge"})
    assert [m["content"] for m in typed.data["memories"]] == ["Bananas are yellow."]

    upd = await memory_client.call_tool(
        s, "Update_memory", {"memory_id": mid, "content": "Berlin is the capital of Germany.", "metadata_json": '{"v": 2}'}
    )
    assert upd.ok
    hit = await memory_client.call_tool(s, "Retrieve_memory", {"query": "German capital", "top_k": 1})
    assert hit.data["memories"][0] == {**hit.data["memories"][0], "memory_id": mid, "content": "Berlin is the capital of Germany."}
    items = {m.memory_id: m for m in await memory_client.list_memories(s)}
    assert items[mid].metadata == {"topic": {"geo": [1]}, "v": 2}
    assert items[mid].updated_at >= items[mid].created_at

    assert (await memory_client.call_tool(s, "Delete_memory", {"memory_id": mid})).ok
    again = await memory_client.call_tool(s, "Delete_memory", {"memory_id": mid})
    assert not again.ok and "no memory" in again.text
    assert [m.content for m in await memory_client.list_memories(s)] == ["Bananas are yellow."]
    await memory_client.delete_session(s)
    with pytest.raises(UnknownSessionError):
        await memory_client.list_memories(s)


async def test_empty_store_and_tool_failures(memory_client: InProcessMemoryClient) -> None:
    s = await memory_client.create_session()
    empty = await memory_client.call_tool(s, "Retrieve_memory", {"query": "anything"})
    assert empty.ok and empty.text == "[no related memories found]" and empty.data == {"memories": []}
    cases = {
        ("Add_memory", json.dumps({"content": "   "})): "empty",
        ("Add_memory", json.dumps({"content": "x" * 9000})): "content_too_large",
        ("Add_memory", json.dumps({"content": "ok", "metadata_json": "[1, 2]"})): "invalid_arguments",
        ("Add_memory", json.dumps({"content": "ok", "metadata_json": "{not json"})): "invalid_arguments",
        ("Add_memory", json.dumps({"content": 5})): "invalid_arguments",
        ("Add_memory", json.dumps({})): "invalid_arguments",
        ("Add_memory", json.dumps({"content": "ok", "memory_type": 'x" or 1==1'})): "invalid_arguments",
        ("Retrieve_memory", json.dumps({"query": "q", "top_k": "3"})): "invalid_arguments",
        ("Retrieve_memory", json.dumps({"query": "q", "top_k": 0})): "invalid_arguments",
        ("Retrieve_memory", json.dumps({"query": "q", "top_k": True})): "invalid_arguments",
        ("Update_memory", json.dumps({"memory_id": "nope", "content": "c"})): "not_found",
        ("Delete_memory", json.dumps({"memory_id": "nope", "confirmation": True})): "invalid_arguments",
        ("Nope_memory", json.dumps({})): "unknown_tool",
    }
    for (tool, args), kind in cases.items():
        result = await memory_client.call_tool(s, tool, json.loads(args))
        assert not result.ok and result.data["error"] == kind, (tool, args, result)
        assert tool.split("_")[0] in result.text or kind == "unknown_tool"
    assert await memory_client.list_memories(s) == []


async def test_sessions_are_isolated(memory_client: InProcessMemoryClient) -> None:
    a, b = await memory_client.create_session(), await memory_client.create_session()
    mid = (await memory_client.call_tool(a, "Add_memory", {"content": "Alice's PIN is 4321"})).data["memory_id"]
    for tool, args in [
        ("Update_memory", {"memory_id": mid, "content": "stolen"}),
        ("Delete_memory", {"memory_id": mid}),
    ]:
        result = await memory_client.call_tool(b, tool, args)
        assert not result.ok and "no memory" in result.text
    seen = await memory_client.call_tool(b, "Retrieve_memory", {"query": "Alice's PIN", "top_k": 20})
    assert seen.text == "[no related memories found]"
    assert await memory_client.list_memories(b) == []
    # B's token does not open A's session.
    forged = a.model_copy(update={"session_token": b.session_token})
    with pytest.raises(SessionAuthError):
        await memory_client.call_tool(forged, "Retrieve_memory", {"query": "PIN"})
    with pytest.raises(SessionAuthError):
        await memory_client.delete_session(forged)
    assert [m.content for m in await memory_client.list_memories(a)] == ["Alice's PIN is 4321"]


async def test_concurrent_sessions(memory_client: InProcessMemoryClient) -> None:
    sessions = await asyncio.gather(*(memory_client.create_session() for _ in range(12)))

    async def work(i: int, s) -> None:
        for j in range(3):
            assert (await memory_client.call_tool(s, "Add_memory", {"content": f"session {i} fact {j}"})).ok
        got = await memory_client.call_tool(s, "Retrieve_memory", {"query": f"session {i} fact", "top_k": 10})
        assert sorted(m["content"] for m in got.data["memories"]) == [f"session {i} fact {j}" for j in range(3)]

    await asyncio.gather(*(work(i, s) for i, s in enumerate(sessions)))


def test_unreachable_milvus_uri_is_one_clear_error(tmp_path) -> None:
    settings = memory_settings(tmp_path)
    settings = settings.model_copy(update={"memory": settings.memory.model_copy(update={"uri": "http://127.0.0.1:9"})})
    with pytest.raises(MemoryUnavailableError) as info:
        MilvusMemoryStore.from_settings(settings, dim=384)
    message = str(info.value)
    assert "http://127.0.0.1:9" in message and "AGEMEM_MEMORY__URI" in message


def test_lock_held_by_another_process_is_clear(tmp_path) -> None:
    import subprocess
    import sys

    db = tmp_path / "locked.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from pymilvus import MilvusClient; MilvusClient({str(db)!r}); print('ok', flush=True); input()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ok"
        with pytest.raises(MemoryUnavailableError) as info:
            MilvusMemoryStore(str(db), dim=8)
        assert str(db) in str(info.value) and "one tool-server process" in str(info.value)
    finally:
        holder.kill()
        holder.wait()


async def test_build_memory_client(tmp_path) -> None:
    settings = memory_settings(tmp_path)
    client = build_memory_client(settings)
    assert isinstance(client, InProcessMemoryClient)
    s = await client.create_session()
    assert (await client.call_tool(s, "Add_memory", {"content": "persist me"})).ok
    await client.aclose()
    http_settings = settings.model_copy(
        update={"memory": settings.memory.model_copy(update={"server_url": "http://127.0.0.1:9"})}
    )
    http = build_memory_client(http_settings)
    assert type(http).__name__ == "HttpMemoryClient"
    with pytest.raises(MemoryUnavailableError, match="127.0.0.1:9"):
        await http.create_session()
    await http.aclose()
