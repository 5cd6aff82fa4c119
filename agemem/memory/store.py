"""Milvus-backed storage of memories and of tool-server sessions.

The same code serves a milvus-lite file (the default, ``memory.uri = runs/memory.db``) and a
Milvus standalone/cluster (``AGEMEM_MEMORY__URI=http://host:19530``). Everything here is
synchronous; the service calls it from worker threads.

Filter expressions are built only from values this project generates (hex memory ids, session ids)
or that were checked against :data:`SAFE_TOKEN` (memory types): milvus-lite does not support
``filter_params`` templates, so nothing a client sends is ever spliced into an expression raw.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from agemem.memory.base import MemoryItem, MemoryUnavailableError
from agemem.settings import Settings

logger = logging.getLogger(__name__)

SAFE_TOKEN = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
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


class MemoryStoreLockedError(MemoryUnavailableError):
    """The milvus-lite file is owned by another process."""


class MemoryNotFoundError(KeyError):
    """No memory with this id in this session."""


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "tcp://", "unix:"))


def _quote(value: str) -> str:
    if not SAFE_TOKEN.match(value):
        raise ValueError(f"unsafe filter value {value[:80]!r}")
    return f'"{value}"'


def _unit(vector: np.ndarray) -> np.ndarray:
    """``vector`` as float32 of length 1 (the embedder's already are; this keeps IP equal to cosine)."""
    v = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def _lite_lock_holder(path: str) -> bool:
    """True when another process holds milvus-lite's lock on ``path`` (asks milvus-lite itself)."""
    try:
        from milvus_lite.db import MilvusLite
        from milvus_lite.exceptions import DataDirLockedError
    except ImportError:
        return False
    try:
        probe = MilvusLite(path)
    except DataDirLockedError:
        return True
    except Exception:  # noqa: BLE001 - any other failure is not a lock problem; caller reports its own error
        return False
    probe.close()
    return False


def connect(uri: str, *, token: str | None = None, timeout_s: float = 5.0) -> MilvusClient:
    """A ``MilvusClient`` for ``uri``, or ONE clear :class:`MemoryUnavailableError`."""
    if not _is_remote(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    try:
        return MilvusClient(uri=uri, token=token or "", timeout=timeout_s)
    except MilvusException as exc:
        if not _is_remote(uri) and _lite_lock_holder(uri):
            raise MemoryStoreLockedError(
                f"the milvus-lite store {uri!r} is locked by another process: one tool-server process must own "
                "it (point other processes at that server with memory.server_url, or use another "
                f"{_URI_SETTING})"
            ) from None
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

    def flush(self, *args: Any, **kwargs: Any) -> Any:
        with self._cond:
            self._flush_waiting += 1
            self._cond.wait_for(lambda: not self._flushing and self._active == 0)
            self._flush_waiting -= 1
            self._flushing = True
        try:
            return self._client.flush(*args, **kwargs)
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
        self._client = _FlushExclusiveClient(connect(uri, token=token, timeout_s=timeout_s))
        self._partitions = 0  # 0: no session partitions (a collection made with a partition key)
        self._metric = _METRIC  # collections made by earlier versions use COSINE
        self._ensure_collections(partitions)

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

    def _wrote(self, collection: str, rows: int) -> None:
        """Record a write; with ``flush_interval_s == 0`` return only once it is flushed.

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
        if not later:
            self._flush_through(collection, ticket)

    def _flush_through(self, collection: str, ticket: int) -> None:
        """Return once write number ``ticket`` of ``collection`` is flushed (flushing it if nobody is)."""
        with self._flush_cond:
            while self._sealed.get(collection, 0) < ticket:
                if collection not in self._flushing:
                    self._flushing.add(collection)
                    target = self._written[collection]
                    self._unflushed[collection] = 0
                    break
                self._flush_cond.wait()
            else:
                return
        try:
            self._client.flush(collection)
        except MilvusException as exc:  # the rows are written; only their sealing failed
            logger.warning("flush of %s failed: %s", collection, exc.message)
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

    def add(self, session_id: str, items: list[MemoryItem], vectors: np.ndarray) -> None:
        """Insert memories of one session (ids chosen by the caller)."""
        if len(items) != len(vectors):
            raise ValueError(f"{len(items)} memories but {len(vectors)} vectors")
        rows = [self._row(session_id, item, vec) for item, vec in zip(items, vectors)]
        if rows:
            self._client.insert(self.collection, rows, **self._partition(session_id))
            self._wrote(self.collection, len(rows))

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
        if not SAFE_TOKEN.match(memory_id):
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
    ) -> MemoryItem:
        """Replace content and vector, merge metadata. Raises :class:`MemoryNotFoundError`."""
        current = self.get(session_id, memory_id)
        if current is None:
            raise MemoryNotFoundError(memory_id)
        updated = current.model_copy(
            update={
                "content": content,
                "metadata": {**current.metadata, **(metadata or {})},
                "updated_at": time.time(),
            }
        )
        self._client.upsert(self.collection, [self._row(session_id, updated, vector)], **self._partition(session_id))
        self._wrote(self.collection, 1)
        return updated

    def delete(self, session_id: str, memory_id: str) -> bool:
        """Delete one memory of this session; False when it is not there."""
        if self.get(session_id, memory_id) is None:
            return False
        self._client.delete(
            self.collection,
            filter=f"id == {_quote(memory_id)} and session_id == {_quote(session_id)}",
            **self._partition(session_id),
        )
        self._wrote(self.collection, 1)
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

    def list(self, session_id: str) -> list[MemoryItem]:
        """All memories of a session, oldest first."""
        rows = self._client.query(
            self.collection,
            filter=f"session_id == {_quote(session_id)}",
            output_fields=_FIELDS,
            limit=QUERY_LIMIT,
            **self._scope(session_id),
        )
        return sorted((self._item(r) for r in rows), key=lambda m: (m.created_at, m.memory_id))

    def drop_session(self, session_id: str) -> None:
        """Delete every memory of a session and the session itself."""
        self._client.delete(self.collection, filter=f"session_id == {_quote(session_id)}", **self._partition(session_id))
        self._client.delete(self.sessions_collection, filter=f"session_id == {_quote(session_id)}")
        self._wrote(self.collection, 1)
        self._wrote(self.sessions_collection, 1)

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
        self._client.insert(
            self.sessions_collection,
            [{"session_id": session_id, "token_hash": token_hash, "created_at": time.time(), "unused_vector": [0, 0]}],
        )
        self._wrote(self.sessions_collection, 1)

    def session_token_hash(self, session_id: str) -> str | None:
        """The stored token hash, or None for an unknown session."""
        if not SAFE_TOKEN.match(session_id):
            return None
        rows = self._client.query(
            self.sessions_collection, filter=f"session_id == {_quote(session_id)}", output_fields=["token_hash"]
        )
        return rows[0]["token_hash"] if rows else None

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Flush and close the client. milvus-lite keeps its file lock until the process exits."""
        with self._flush_cond:
            self._closed = True
            timer, self._flush_timer = self._flush_timer, None
        if timer is not None:
            timer.cancel()
        self.flush()
        self._client.close()


__all__ = [
    "MemoryNotFoundError",
    "MemoryStoreLockedError",
    "MilvusMemoryStore",
    "SAFE_TOKEN",
    "connect",
]
