"""Milvus-backed storage of memories and of tool-server sessions.

The same code serves a milvus-lite file (the default, ``memory.uri = runs/memory.db``) and a
Milvus standalone/cluster (``AGEMEM_MEMORY__URI=http://host:19530``). Everything here is
synchronous; the service calls it from worker threads.

Filter expressions are built only from values this project generates (hex memory ids, session ids)
or that were checked against :data:`SAFE_TOKEN` (memory types): milvus-lite does not support
``filter_params`` templates, so nothing a client sends is ever spliced into an expression raw.

A milvus-lite file is served to this process alone: the store runs milvus-lite's gRPC service on a
unix socket in a private (0700) temporary directory, not on a TCP port that any local process
could reach without credentials, and keeps the data directory 0700.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
import zlib
from concurrent import futures
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from agemem.memory.arguments import SAFE_TOKEN, is_safe_token
from agemem.memory.base import MemoryItem, MemoryUnavailableError
from agemem.settings import Settings

logger = logging.getLogger(__name__)

# Milvus' hard cap on rows returned by one query.
QUERY_LIMIT = 16384
_CONTENT_MAX = 65535
_FIELDS = ["id", "session_id", "content", "memory_type", "metadata", "created_at", "updated_at"]
# What a search returns: fetching metadata and timestamps too made every search ~15% dearer.
_SEARCH_FIELDS = ["content", "memory_type"]
_URI_SETTING = "AGEMEM_MEMORY__URI"
_PARTITION_PREFIX = "sessions_"
# Vectors are stored and searched unit-length, so inner product is cosine similarity; milvus-lite's
# brute-force path re-normalised every stored vector on each COSINE search (10k memories: 30 -> 20 ms).
_METRIC = "IP"
_ROW_LOCKS = 64
# How long a flush waits for writers already queued, so that it seals them too.
_GROUP_COMMIT_WAIT_S = 0.02


class MemoryStoreLockedError(MemoryUnavailableError):
    """The milvus-lite file is owned by another process."""


class MemoryNotFoundError(KeyError):
    """No memory with this id in this session."""


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "tcp://", "unix:"))


def _quote(value: str) -> str:
    if not is_safe_token(value):
        raise ValueError(f"unsafe filter value {value[:80]!r}")
    return f'"{value}"'


def _unit(vector: np.ndarray) -> np.ndarray:
    """``vector`` as float32 of length 1 (the embedder's already are; this keeps IP equal to cosine)."""
    v = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


_LOCKED = (
    "the milvus-lite store {uri!r} is locked by another process: one tool-server process must own it (point "
    "other processes at that server with memory.server_url, or use another " + _URI_SETTING + ")"
)
# As milvus-lite's own server: large query results must fit one message.
_GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20),
    # pymilvus pings every 10 s, also while idle; gRPC's default server policy (one ping per 5 min
    # without data) answered that with GOAWAY "too_many_pings", logged by gRPC as an E-level line.
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000), ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_ping_strikes", 0),
]


class _LiteServer:
    """milvus-lite's gRPC service for one data directory, on a unix socket only this user can open.

    pymilvus' own ``.db`` handling binds an unauthenticated TCP port on 127.0.0.1, through which
    any local process could read every session's memories and write session rows. One server
    per directory and process, shared by the stores of this process that open it.
    """

    _lock = threading.Lock()
    _running: dict[str, _LiteServer] = {}

    def __init__(self, path: str) -> None:
        import grpc
        from milvus_lite.adapter.grpc.servicer import MilvusServicer
        from milvus_lite.db import MilvusLite
        from milvus_lite.exceptions import DataDirLockedError
        from pymilvus.grpc_gen import milvus_pb2_grpc

        self.path = path
        data = Path(path)
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        data.chmod(0o700)  # also a store made world-readable by an earlier version
        try:
            self._db = MilvusLite(path)
        except DataDirLockedError:
            raise MemoryStoreLockedError(_LOCKED.format(uri=path)) from None
        self._dir = tempfile.mkdtemp(prefix="agemem-milvus-")  # 0700, short enough for a socket path
        self.uri = "unix:" + os.path.join(self._dir, "milvus.sock")
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=10), options=_GRPC_OPTIONS)

        class Servicer(MilvusServicer):
            def AllocTimestamp(self, request: Any, context: Any) -> Any:  # noqa: N802 - the gRPC method name
                # pymilvus asks while it creates an index; the base answered by raising, which gRPC
                # logged as an ERROR with a traceback. The answer is the same: not implemented.
                context.abort(grpc.StatusCode.UNIMPLEMENTED, "milvus-lite allocates no timestamps")

        milvus_pb2_grpc.add_MilvusServiceServicer_to_server(Servicer(self._db), self._server)
        if not self._server.add_insecure_port(self.uri):
            self._db.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            raise MemoryUnavailableError(f"cannot open a unix socket for the milvus-lite store {path!r}")
        self._server.start()
        self._users = 0
        logger.debug("milvus-lite %s served on %s", path, self.uri)

    @classmethod
    def acquire(cls, path: str) -> _LiteServer:
        key = os.path.abspath(path)
        with cls._lock:
            server = cls._running.get(key)
            if server is None:
                server = cls._running[key] = cls(key)
                if len(cls._running) == 1:
                    atexit.register(cls._stop_all)
            server._users += 1
            return server

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users > 0:
                return
            self._running.pop(self.path, None)
        self._stop()

    def _stop(self) -> None:
        self._server.stop(grace=2).wait()
        self._db.close()  # releases the data directory's lock
        shutil.rmtree(self._dir, ignore_errors=True)

    @classmethod
    def _stop_all(cls) -> None:
        with cls._lock:
            servers, cls._running = list(cls._running.values()), {}
        for server in servers:
            try:
                server._stop()
            except Exception:  # noqa: BLE001 - at exit: nothing left to report to
                pass


def connect(uri: str, *, token: str | None = None, timeout_s: float = 5.0) -> MilvusClient:
    """A ``MilvusClient`` for a Milvus ``uri``, or ONE clear :class:`MemoryUnavailableError`."""
    try:
        return MilvusClient(uri=uri, token=token or "", timeout=timeout_s)
    except MilvusException as exc:
        raise MemoryUnavailableError(
            f"cannot connect to Milvus at {uri!r} within {timeout_s:g}s ({exc.message or type(exc).__name__}); "
            f"check the setting {_URI_SETTING} (memory.uri)"
        ) from None


class _FlushExclusiveClient:
    """A ``MilvusClient`` whose ``flush`` runs alone: other calls share, a flush waits for them and blocks them.

    On milvus-lite, a flush racing other calls failed ("current_seq is monotonic") and a query
    racing a flush returned no rows for a memory just added (seen about 1 in 200 under load).
    A waiting flush holds back new calls, so a steady stream of searches cannot starve it.
    """

    def __init__(self, client: MilvusClient) -> None:
        self._client = client
        self._cond = threading.Condition()
        self._active = 0
        self._flushing = False
        self._flush_waiting = 0

    def flush(self, collection: str, *, exclusive: Callable[[], None] | None = None) -> Any:
        """Flush ``collection``; ``exclusive`` runs first, once no other call is running."""
        with self._cond:
            self._flush_waiting += 1
            self._cond.wait_for(lambda: not self._flushing and self._active == 0)
            self._flush_waiting -= 1
            self._flushing = True
        try:
            if exclusive is not None:
                exclusive()
            return self._client.flush(collection)
        finally:
            with self._cond:
                self._flushing = False
                self._cond.notify_all()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def shared(*args: Any, **kwargs: Any) -> Any:
            with self._cond:
                self._cond.wait_for(lambda: not self._flushing and self._flush_waiting == 0)
                self._active += 1
            try:
                return attr(*args, **kwargs)
            finally:
                with self._cond:
                    self._active -= 1
                    if self._active == 0:
                        self._cond.notify_all()

        return shared


# Long on purpose (~480 lines): the one adapter to pymilvus. Every method goes through the same
# per-collection write serialisation, flush gate (group commit) and session-partition scheme, and
# milvus-lite's quirks (no partition pruning by key, torn WAL under concurrent inserts) are handled
# here once; split up, each part would need the others' locks.
class MilvusMemoryStore:
    """Memories (one collection) and sessions (a small second collection).

    Sessions are spread over ``partitions`` partitions by a hash of their id, and every operation
    on a session names its partition: milvus-lite does not prune partitions by a partition-key
    filter, so with one partition key every search scanned every session's rows (10 ms instead of
    1.7 ms for a small session beside a 10k-memory one). Collections made with a partition key by
    earlier versions keep working, unpruned.
    """

    def __init__(
        self,
        uri: str,
        *,
        dim: int,
        collection: str = "agemem_memories",
        token: str | None = None,
        timeout_s: float = 5.0,
        flush_interval_s: float = 0.0,
        flush_rows: int = 256,
        partitions: int = 64,
    ) -> None:
        self.uri = uri
        self.dim = dim
        self.collection = collection
        self.sessions_collection = f"{collection}_sessions"
        self._flush_interval_s = flush_interval_s
        self._flush_rows = flush_rows
        # Per collection: writes made, writes sealed by a finished flush, rows not yet flushed.
        self._written: dict[str, int] = {}
        self._sealed: dict[str, int] = {}
        self._unflushed: dict[str, int] = {}
        self._flushing: set[str] = set()
        self._flush_timer: threading.Timer | None = None
        self._flush_cond = threading.Condition()
        self._closed = False
        # A read-modify-write of one memory (update, delete) runs alone: concurrent Updates each
        # merged into the metadata they read, and an Update could re-insert a memory just deleted.
        self._row_locks = [threading.Lock() for _ in range(_ROW_LOCKS)]
        # milvus-lite writes one collection at a time (its engine is single-writer per collection):
        # concurrent inserts interleaved their records in its write-ahead log, and a killed server
        # lost rows at the first torn one (11 of 60 concurrent adds). Writers queued per collection.
        self._write_locks: dict[str, threading.Lock] = {}
        self._queued: dict[str, int] = {}
        self._lite = None if _is_remote(uri) else _LiteServer.acquire(uri)
        try:
            target = self._lite.uri if self._lite is not None else uri
            self._client = _FlushExclusiveClient(connect(target, token=token, timeout_s=timeout_s))
            self._partitions = 0  # 0: no session partitions (a collection made with a partition key)
            self._metric = _METRIC  # collections made by earlier versions use COSINE
            self._ensure_collections(partitions)
        except BaseException:
            if self._lite is not None:
                self._lite.release()
            raise

    @classmethod
    def from_settings(cls, settings: Settings, dim: int) -> MilvusMemoryStore:
        mem = settings.memory
        return cls(
            settings.memory_uri,
            dim=dim,
            collection=mem.collection,
            token=mem.token.get_secret_value() if mem.token else None,
            timeout_s=mem.connect_timeout_s,
            flush_interval_s=mem.flush_interval_s,
            flush_rows=mem.flush_rows,
            partitions=mem.partitions,
        )

    # -- schema ---------------------------------------------------------------------------------

    def _ensure_collections(self, partitions: int) -> None:
        c = self._client
        if not c.has_collection(self.collection):
            schema = c.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.VARCHAR, max_length=64, is_primary=True)
            schema.add_field("session_id", DataType.VARCHAR, max_length=64)
            schema.add_field("content", DataType.VARCHAR, max_length=_CONTENT_MAX)
            schema.add_field("memory_type", DataType.VARCHAR, max_length=64)
            schema.add_field("metadata", DataType.JSON)
            schema.add_field("created_at", DataType.DOUBLE)
            schema.add_field("updated_at", DataType.DOUBLE)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
            index = c.prepare_index_params()
            index.add_index("vector", index_type="AUTOINDEX", metric_type=_METRIC)
            # Strong: a Retrieve right after an Add must see it (matters on Milvus standalone).
            c.create_collection(self.collection, schema=schema, index_params=index, consistency_level="Strong")
            for i in range(partitions):
                c.create_partition(self.collection, f"{_PARTITION_PREFIX}{i:04d}")
            logger.info("created memory collection %s (dim %d, %d partitions)", self.collection, self.dim, partitions)
        else:
            existing = self._vector_dim(self.collection)
            if existing != self.dim:
                raise ValueError(
                    f"collection {self.collection!r} in {self.uri!r} holds {existing}-dim vectors but the embedder "
                    f"makes {self.dim}-dim ones; use another memory.collection or the original embedding model"
                )
        if not c.has_collection(self.sessions_collection):
            schema = c.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("session_id", DataType.VARCHAR, max_length=64, is_primary=True)
            schema.add_field("token_hash", DataType.VARCHAR, max_length=128)
            schema.add_field("created_at", DataType.DOUBLE)
            # Milvus needs a vector field in every collection; this one is never searched.
            schema.add_field("unused_vector", DataType.FLOAT_VECTOR, dim=2)
            index = c.prepare_index_params()
            index.add_index("unused_vector", index_type="AUTOINDEX", metric_type="L2")
            c.create_collection(
                self.sessions_collection, schema=schema, index_params=index, consistency_level="Strong"
            )
        self._metric = c.describe_index(self.collection, "vector").get("metric_type") or _METRIC
        # The count is fixed when the collection is made: sessions must stay where they were put.
        self._partitions = sum(name.startswith(_PARTITION_PREFIX) for name in c.list_partitions(self.collection))
        if self._partitions != partitions:
            logger.info("collection %s has %d session partitions (setting: %d); using %d",
                        self.collection, self._partitions, partitions, self._partitions)
        # After a restart the collections exist but are not loaded.
        c.load_collection(self.collection)
        c.load_collection(self.sessions_collection)

    def _partition(self, session_id: str) -> dict[str, Any]:
        """Keyword arguments naming the session's partition on a write (none on a legacy collection)."""
        if not self._partitions:
            return {}
        return {"partition_name": f"{_PARTITION_PREFIX}{zlib.crc32(session_id.encode()) % self._partitions:04d}"}

    def _scope(self, session_id: str) -> dict[str, Any]:
        """Keyword arguments restricting a read or delete to the session's partition."""
        named = self._partition(session_id)
        return {"partition_names": [named["partition_name"]]} if named else {}

    def _vector_dim(self, collection: str) -> int:
        for field in self._client.describe_collection(collection)["fields"]:
            if field["name"] == "vector":
                return int(field["params"]["dim"])
        raise ValueError(f"collection {collection!r} has no 'vector' field; it was not made by agemem")

    # -- flushing -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self, collection: str) -> Iterator[None]:
        """Hold ``collection``'s write turn (milvus-lite); a flush lets the queued writers land first."""
        if self._lite is None:  # Milvus standalone takes concurrent writes
            yield
            return
        with self._flush_cond:
            self._queued[collection] = self._queued.get(collection, 0) + 1
            lock = self._write_locks.setdefault(collection, threading.Lock())
        try:
            with lock:
                yield
        finally:
            with self._flush_cond:
                self._queued[collection] -= 1
                self._flush_cond.notify_all()

    def _note_write(self, collection: str, rows: int) -> int | None:
        """Count a write; the ticket to wait for when it must be flushed before it is acknowledged.

        Group commit: writes that arrive while a flush runs share the next one, so under load one
        flush (about 15 ms on milvus-lite) seals many writes instead of each paying its own.
        """
        with self._flush_cond:
            self._written[collection] = ticket = self._written.get(collection, 0) + 1
            self._unflushed[collection] = self._unflushed.get(collection, 0) + rows
            later = self._flush_interval_s > 0 and self._unflushed[collection] < self._flush_rows
            if later and self._flush_timer is None and not self._closed:
                self._flush_timer = threading.Timer(self._flush_interval_s, self.flush)
                self._flush_timer.daemon = True
                self._flush_timer.start()
        return None if later else ticket

    def _sealed_through(self, collection: str, ticket: int | None) -> None:
        if ticket is not None:
            self._flush_through(collection, ticket)

    def _flush_through(self, collection: str, ticket: int) -> None:
        """Return once write number ``ticket`` of ``collection`` is flushed (flushing it if nobody is)."""
        with self._flush_cond:
            while self._sealed.get(collection, 0) < ticket:
                if collection not in self._flushing:
                    self._flushing.add(collection)
                    break
                self._flush_cond.wait()
            else:
                return
            # Writers already queued land in this flush (bounded: a steady stream must not delay it).
            self._flush_cond.wait_for(lambda: not self._queued.get(collection), timeout=_GROUP_COMMIT_WAIT_S)
        target = self._sealed.get(collection, 0)

        def seal_what_is_written() -> None:  # runs once no other call is running
            nonlocal target
            with self._flush_cond:
                target = self._written[collection]
                self._unflushed[collection] = 0

        started = time.perf_counter()
        try:
            self._client.flush(collection, exclusive=seal_what_is_written)
        except MilvusException as exc:  # the rows are written; only their sealing failed
            logger.warning("flush of %s failed: %s", collection, exc.message)
        else:
            took = time.perf_counter() - started
            if took > 1.0:  # every other call of the store waits for a flush
                logger.info("flush of %s took %.1fs", collection, took)
        finally:
            with self._flush_cond:
                self._flushing.discard(collection)
                self._sealed[collection] = max(self._sealed.get(collection, 0), target)
                self._flush_cond.notify_all()

    def flush(self) -> None:
        """Seal every pending write, so searches stay on the indexed fast path and survive a crash."""
        with self._flush_cond:
            self._flush_timer = None
            pending = {name: n for name, n in self._written.items() if n > self._sealed.get(name, 0)}
        for name, ticket in pending.items():
            self._flush_through(name, ticket)

    # -- memories -------------------------------------------------------------------------------

    def _row_lock(self, session_id: str, memory_id: str) -> threading.Lock:
        return self._row_locks[zlib.crc32(f"{session_id}/{memory_id}".encode()) % _ROW_LOCKS]

    def add(self, session_id: str, items: list[MemoryItem], vectors: np.ndarray) -> None:
        """Insert memories of one session (ids chosen by the caller)."""
        if len(items) != len(vectors):
            raise ValueError(f"{len(items)} memories but {len(vectors)} vectors")
        rows = [self._row(session_id, item, vec) for item, vec in zip(items, vectors)]
        if rows:
            with self._writing(self.collection):
                self._client.insert(self.collection, rows, **self._partition(session_id))
                ticket = self._note_write(self.collection, len(rows))
            self._sealed_through(self.collection, ticket)

    def add_once(self, session_id: str, item: MemoryItem, vector: np.ndarray) -> bool:
        """Insert one memory unless one with its id exists in the session (a retried Add); True if inserted."""
        with self._row_lock(session_id, item.memory_id):
            if self.get(session_id, item.memory_id) is not None:
                return False
            with self._writing(self.collection):
                self._client.insert(
                    self.collection, [self._row(session_id, item, vector)], **self._partition(session_id)
                )
                ticket = self._note_write(self.collection, 1)
        self._sealed_through(self.collection, ticket)
        return True

    def _row(self, session_id: str, item: MemoryItem, vector: np.ndarray) -> dict[str, Any]:
        return {
            "id": item.memory_id,
            "session_id": session_id,
            "content": item.content,
            "memory_type": item.memory_type,
            "metadata": item.metadata,
            "created_at": item.created_at,
            "updated_at": item.updated_at,
            "vector": _unit(vector).tolist(),
        }

    def get(self, session_id: str, memory_id: str) -> MemoryItem | None:
        """The memory, or None when it does not exist in THIS session."""
        if not is_safe_token(memory_id):
            return None
        rows = self._client.query(
            self.collection,
            filter=f"id == {_quote(memory_id)} and session_id == {_quote(session_id)}",
            output_fields=_FIELDS,
            **self._scope(session_id),
        )
        return self._item(rows[0]) if rows else None

    def update(
        self,
        session_id: str,
        memory_id: str,
        *,
        content: str,
        vector: np.ndarray,
        metadata: dict[str, Any] | None = None,
        check: Callable[[dict[str, Any]], None] | None = None,
    ) -> MemoryItem:
        """Replace content and vector, merge metadata. Raises :class:`MemoryNotFoundError`.

        ``check`` sees the merged metadata before anything is written and may raise to refuse it.
        """
        with self._row_lock(session_id, memory_id):
            current = self.get(session_id, memory_id)
            if current is None:
                raise MemoryNotFoundError(memory_id)
            merged = {**current.metadata, **(metadata or {})}
            if check is not None:
                check(merged)
            updated = current.model_copy(update={"content": content, "metadata": merged, "updated_at": time.time()})
            with self._writing(self.collection):
                self._client.upsert(
                    self.collection, [self._row(session_id, updated, vector)], **self._partition(session_id)
                )
                ticket = self._note_write(self.collection, 1)
        self._sealed_through(self.collection, ticket)
        return updated

    def delete(self, session_id: str, memory_id: str) -> bool:
        """Delete one memory of this session; False when it is not there (also for the second of two racing)."""
        with self._row_lock(session_id, memory_id):
            if self.get(session_id, memory_id) is None:
                return False
            with self._writing(self.collection):
                self._client.delete(
                    self.collection,
                    filter=f"id == {_quote(memory_id)} and session_id == {_quote(session_id)}",
                    **self._partition(session_id),
                )
                ticket = self._note_write(self.collection, 1)
        self._sealed_through(self.collection, ticket)
        return True

    def search(
        self, session_id: str, vector: np.ndarray, top_k: int, memory_type: str | None = None
    ) -> list[MemoryItem]:
        """This session's ``top_k`` nearest memories by cosine, best first.

        Hits carry id, content, memory type and ``score``; :meth:`get` gives a memory's metadata
        and timestamps.
        """
        expr = f"session_id == {_quote(session_id)}"
        if memory_type is not None:
            expr += f" and memory_type == {_quote(memory_type)}"
        hits = self._client.search(
            self.collection,
            data=[_unit(vector).tolist()],
            limit=top_k,
            filter=expr,
            output_fields=_SEARCH_FIELDS,
            search_params={"metric_type": self._metric},
            **self._scope(session_id),
        )[0]
        out = []
        for hit in hits:
            entity = hit.get("entity", hit)
            out.append(self._item({**entity, "id": hit["id"]}, score=float(hit["distance"])))
        return out

    def _query_all(self, collection: str, expr: str, fields: list[str], **scope: Any) -> list[dict[str, Any]]:
        """Every row matching ``expr``: one query, or an iterator past Milvus' per-query cap."""
        rows = self._client.query(collection, filter=expr, output_fields=fields, limit=QUERY_LIMIT, **scope)
        if len(rows) < QUERY_LIMIT:
            return rows
        iterator = self._client.query_iterator(collection, filter=expr, output_fields=fields, batch_size=4096, **scope)
        rows = []
        try:
            while batch := iterator.next():
                rows.extend(batch)
        finally:
            iterator.close()
        return rows

    def list(self, session_id: str) -> list[MemoryItem]:
        """All memories of a session, oldest first."""
        return self.page(session_id, after=None, limit=None)[0]

    def page(
        self, session_id: str, *, after: tuple[float, str] | None, limit: int | None
    ) -> tuple[list[MemoryItem], tuple[float, str] | None]:
        """A session's memories in (created_at, id) order after the key ``after``; and the key to go on from.

        Milvus cannot sort a query, so the keys of the whole session are read and sorted first
        (a session holds at most ``memory.max_memories_per_session``), then only the page's rows.
        """
        scope = self._scope(session_id)
        expr = f"session_id == {_quote(session_id)}"
        keys = sorted(
            (float(r.get("created_at") or 0.0), r["id"]) for r in self._query_all(self.collection, expr, ["id", "created_at"], **scope)
        )
        if after is not None:
            keys = [k for k in keys if k > after]
        chosen = keys if limit is None else keys[:limit]
        more = chosen[-1] if limit is not None and len(keys) > limit else None
        if not chosen:
            return [], None
        if limit is None:
            rows = self._query_all(self.collection, expr, _FIELDS, **scope)
        else:
            ids = ", ".join(_quote(mid) for _, mid in chosen)
            rows = self._client.query(
                self.collection, filter=f"{expr} and id in [{ids}]", output_fields=_FIELDS, limit=len(chosen), **scope
            )
        items = sorted((self._item(r) for r in rows), key=lambda m: (m.created_at, m.memory_id))
        return items, more

    def memory_ids(self, session_id: str) -> set[str]:
        """The ids of a session's memories."""
        expr = f"session_id == {_quote(session_id)}"
        return {r["id"] for r in self._query_all(self.collection, expr, ["id"], **self._scope(session_id))}

    def taken_ids(self, ids: list[str]) -> set[str]:
        """Which of ``ids`` any session uses (a primary key is unique across the whole collection:
        a second row with it would be deleted along with the first)."""
        taken: set[str] = set()
        for start in range(0, len(ids), 1000):
            chunk = [i for i in ids[start:start + 1000] if is_safe_token(i)]
            if chunk:
                expr = f"id in [{', '.join(_quote(i) for i in chunk)}]"
                taken.update(r["id"] for r in self._client.query(self.collection, filter=expr, output_fields=["id"],
                                                                 limit=len(chunk)))
        return taken

    def count_memories(self, session_id: str) -> int:
        """Rows of one session."""
        rows = self._client.query(
            self.collection, filter=f"session_id == {_quote(session_id)}", output_fields=["count(*)"],
            **self._scope(session_id),
        )
        return int(rows[0]["count(*)"])

    def drop_session(self, session_id: str) -> None:
        """Delete every memory of a session and the session itself."""
        with self._writing(self.collection):
            self._client.delete(self.collection, filter=f"session_id == {_quote(session_id)}",
                                **self._partition(session_id))
            memories = self._note_write(self.collection, 1)
        with self._writing(self.sessions_collection):
            self._client.delete(self.sessions_collection, filter=f"session_id == {_quote(session_id)}")
            sessions = self._note_write(self.sessions_collection, 1)
        self._sealed_through(self.collection, memories)
        self._sealed_through(self.sessions_collection, sessions)

    def count(self) -> int:
        """Rows in the memory collection (all sessions)."""
        rows = self._client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    @staticmethod
    def _item(row: dict[str, Any], score: float | None = None) -> MemoryItem:
        return MemoryItem(
            memory_id=row["id"],
            content=row["content"],
            memory_type=row.get("memory_type") or "general",
            metadata=row.get("metadata") or {},
            created_at=float(row.get("created_at") or 0.0),
            updated_at=float(row.get("updated_at") or 0.0),
            score=score,
        )

    # -- sessions -------------------------------------------------------------------------------

    def put_session(self, session_id: str, token_hash: str) -> None:
        row = {"session_id": session_id, "token_hash": token_hash, "created_at": time.time(), "unused_vector": [0, 0]}
        with self._writing(self.sessions_collection):
            self._client.insert(self.sessions_collection, [row])
            ticket = self._note_write(self.sessions_collection, 1)
        self._sealed_through(self.sessions_collection, ticket)

    def session_token_hash(self, session_id: str) -> str | None:
        """The stored token hash, or None for an unknown session."""
        if not is_safe_token(session_id):
            return None
        rows = self._client.query(
            self.sessions_collection, filter=f"session_id == {_quote(session_id)}", output_fields=["token_hash"]
        )
        return rows[0]["token_hash"] if rows else None

    def sessions(self) -> dict[str, float]:
        """Every stored session: id -> creation time."""
        rows = self._query_all(self.sessions_collection, 'session_id != ""', ["session_id", "created_at"])
        return {r["session_id"]: float(r.get("created_at") or 0.0) for r in rows}

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Flush and close; a milvus-lite file is released when its last store in this process closes."""
        with self._flush_cond:
            if self._closed:
                return
            self._closed = True
            timer, self._flush_timer = self._flush_timer, None
        if timer is not None:
            timer.cancel()
        self.flush()
        self._client.close()
        if self._lite is not None:
            self._lite.release()


__all__ = [
    "MemoryNotFoundError",
    "MemoryStoreLockedError",
    "MilvusMemoryStore",
    "SAFE_TOKEN",
    "connect",
]
