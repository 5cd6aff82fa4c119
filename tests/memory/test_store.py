"""The Milvus store itself: session partitions, and collections made by earlier versions."""

from __future__ import annotations

import secrets

import numpy as np
from pymilvus import DataType, MilvusClient

from agemem.memory.base import MemoryItem
from agemem.memory.store import MilvusMemoryStore

DIM = 8


def _vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _add(store: MilvusMemoryStore, session_id: str, texts: list[str], seed: int) -> list[str]:
    items = [MemoryItem(memory_id=secrets.token_hex(16), content=t) for t in texts]
    store.add(session_id, items, _vectors(len(items), seed))
    return [i.memory_id for i in items]


def _roundtrip(store: MilvusMemoryStore) -> None:
    a, b = secrets.token_hex(16), secrets.token_hex(16)
    ids_a = _add(store, a, ["a1", "a2"], 1)
    _add(store, b, ["b1"], 2)
    query = _vectors(1, 1)[0]
    hits = store.search(a, query, 5)
    assert {m.memory_id for m in hits} == set(ids_a)
    assert abs(hits[0].score - 1.0) < 1e-5  # the query is a1's own vector: cosine 1 under either metric
    assert [m.content for m in store.search(b, query, 5)] == ["b1"]
    store.update(a, ids_a[0], content="a1 v2", vector=query)
    assert store.search(a, query, 1)[0].content == "a1 v2"
    assert store.delete(a, ids_a[1]) and not store.delete(b, ids_a[0])
    assert [m.content for m in store.list(a)] == ["a1 v2"]
    store.drop_session(a)
    assert store.list(a) == [] and [m.content for m in store.list(b)] == ["b1"]


def test_sessions_live_in_their_own_partition(tmp_path) -> None:
    store = MilvusMemoryStore(str(tmp_path / "m.db"), dim=DIM, partitions=8)
    client = store._client  # milvus-lite: one connection per file and process
    assert sorted(p for p in client.list_partitions(store.collection) if p.startswith("sessions_")) == [
        f"sessions_{i:04d}" for i in range(8)
    ]
    assert store._metric == "IP"  # unit vectors: inner product is cosine, and cheaper on milvus-lite
    sessions = [secrets.token_hex(16) for _ in range(16)]
    for n, sid in enumerate(sessions):
        _add(store, sid, [f"memory of session {n}"], n)
    home = {sid: store._scope(sid)["partition_names"][0] for sid in sessions}
    assert len(set(home.values())) > 1  # spread out, not all in one
    for sid in sessions:
        rows = client.query(store.collection, filter="", output_fields=["session_id"], partition_names=[home[sid]],
                            limit=100)
        assert sid in {r["session_id"] for r in rows}
        others = [p for p in set(home.values()) if p != home[sid]]
        rows = client.query(store.collection, filter="", output_fields=["session_id"], partition_names=others, limit=100)
        assert sid not in {r["session_id"] for r in rows}
    _roundtrip(store)
    store.close()


def test_partition_count_is_kept_from_creation(tmp_path) -> None:
    store = MilvusMemoryStore(str(tmp_path / "m.db"), dim=DIM, partitions=4)
    sid = secrets.token_hex(16)
    ids = _add(store, sid, ["kept"], 0)
    store.close()
    # A later process with another setting must still find the session where it was put.
    reopened = MilvusMemoryStore(str(tmp_path / "m.db"), dim=DIM, partitions=64)
    assert reopened._partitions == 4
    assert [m.memory_id for m in reopened.list(sid)] == ids
    reopened.close()


def test_collection_with_a_partition_key_still_works(tmp_path) -> None:
    """Collections made by earlier versions have the session id as partition key and no own partitions."""
    client = MilvusClient(uri=str(tmp_path / "legacy.db"))
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, max_length=64, is_primary=True)
    schema.add_field("session_id", DataType.VARCHAR, max_length=64, is_partition_key=True)
    schema.add_field("content", DataType.VARCHAR, max_length=65535)
    schema.add_field("memory_type", DataType.VARCHAR, max_length=64)
    schema.add_field("metadata", DataType.JSON)
    schema.add_field("created_at", DataType.DOUBLE)
    schema.add_field("updated_at", DataType.DOUBLE)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
    index = client.prepare_index_params()
    index.add_index("vector", index_type="AUTOINDEX", metric_type="COSINE")
    client.create_collection("agemem_memories", schema=schema, index_params=index, consistency_level="Strong")
    client.close()
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(str(tmp_path / "legacy.db"))  # pymilvus' own server keeps the lock
    store = MilvusMemoryStore(str(tmp_path / "legacy.db"), dim=DIM)
    assert store._partitions == 0 and store._scope("abc") == {} and store._metric == "COSINE"
    _roundtrip(store)
    store.close()


def test_each_write_returns_after_a_flush_that_covers_it_and_flushes_are_shared(tmp_path) -> None:
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    store = MilvusMemoryStore(str(tmp_path / "m.db"), dim=DIM, flush_interval_s=0)
    inner = store._client._client
    real_insert, real_flush = inner.insert, inner.flush
    inserted: dict[int, float] = {}
    flushes: list[tuple[float, float]] = []

    def insert(*args, **kwargs):
        out = real_insert(*args, **kwargs)
        inserted[threading.get_ident()] = time.perf_counter()
        return out

    def flush(*args, **kwargs):
        start = time.perf_counter()
        time.sleep(0.05)  # a slow flush, so that writes pile up behind it
        out = real_flush(*args, **kwargs)
        flushes.append((start, time.perf_counter()))
        return out

    inner.insert, inner.flush = insert, flush

    def one(n: int) -> tuple[float, float]:
        _add(store, secrets.token_hex(16), [f"memory {n}"], n)
        return inserted[threading.get_ident()], time.perf_counter()

    with ThreadPoolExecutor(16) as pool:
        writes = list(pool.map(one, range(48)))
    for done_insert, returned in writes:
        assert any(start >= done_insert and end <= returned for start, end in flushes), (done_insert, returned)
    assert len(flushes) < len(writes) / 2, len(flushes)
    store.close()
