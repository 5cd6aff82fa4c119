"""A transformers model behind verl's server-manager interface, for the local trainer and evaluation.

``await server.generate(request_id, prompt_ids=..., sampling_params=...)`` returns an object with
``token_ids`` and ``log_probs`` exactly like verl's ``LLMServerClient.generate``, so the episode
engine (and the verl agent loop) drive it unchanged. ``temperature``, ``top_p``, ``top_k``,
``max_tokens``, ``stop``, ``stop_token_ids``, ``ignore_eos`` and ``seed`` are honoured; ``temperature == 0`` is
greedy; ``log_probs`` are the raw (untempered) log-probabilities of the sampled tokens, as vLLM
reports them.

Concurrent calls (the GRPO siblings and tasks of a step, each an asyncio task of the engine) are
served together by a continuous batcher in a worker thread, so the event loop keeps serving tool
I/O: between two decode steps it admits waiting requests (prefilling each), then one forward pass
decodes a token for every running sequence; a finished sequence is answered at once and leaves the
batch. Each prefill first looks up the longest cached token prefix (:class:`PrefixKVCache`): a
trajectory's next turn extends its previous prompt + response + injected tokens, and GRPO
siblings start from the same stage-1 prompt, so only the new tokens are computed. A rewritten
context (a new segment) differs early and simply matches less.

The cache is keyed by tokens only, so it must not outlive the weights: the trainer calls
:meth:`LocalTokenServer.invalidate` after every optimizer step, and the server also compares the
parameters' version counters (bumped by every in-place update: optimizer steps, ``load_state_dict``)
before each admission and drops the cache when they moved.

transformers' continuous-batching manager (``generate_batch`` / paged attention) was not used: on
CPU its ``sdpa_paged`` attention packs all sequences into one row with a block-diagonal mask, so
each step's attention costs (all query tokens) x (all cached tokens), and it reports processed
(tempered) log-probs, supports neither stop strings nor per-request stop tokens, and has no way
to drop its prefix blocks when the weights change.

On CPU a grouped-query model is switched to :mod:`agemem.train.cpu_attention` (the same SDPA
without copying repeated key/value heads under the decode batch's padding mask).

Generation runs in eval mode: the server switches the model to it and leaves it there (the local
trainer's update switches back to train mode itself).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from agemem.agent.policy import GenerationOutput
from agemem.train.cpu_attention import use_gqa_sdpa_on_cpu
from agemem.train.kv_cache import KV, PrefixKVCache, RunningBatch, dynamic_cache, kv_of
from agemem.train.sampling import SamplingParams, StopStrings, select_tokens

if TYPE_CHECKING:
    from agemem.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class GenerationStats:
    """Counters since the last :meth:`reset` (the trainer resets them every step), plus the cache size.

    ``seconds`` is the time the model was busy (prefill, decode, sampling): with requests served
    together it is wall time, not the sum of the requests' latencies, so rollout time minus it is
    the time spent outside generation.
    """

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    cached_prompt_tokens: int = 0
    cache_hits: int = 0
    decode_steps: int = 0
    decode_rows: int = 0
    cancelled: int = 0
    evictions: int = 0
    cached_tokens: int = 0  # a gauge: tokens held in the prefix cache now; not reset

    @property
    def cache_hit_rate(self) -> float:
        """Share of prompt tokens whose keys/values came from the prefix cache."""
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def mean_batch(self) -> float:
        return self.decode_rows / self.decode_steps if self.decode_steps else 0.0

    def reset(self) -> None:
        for name in ("calls", "prompt_tokens", "completion_tokens", "prefill_tokens", "cached_prompt_tokens",
                     "cache_hits", "decode_steps", "decode_rows", "cancelled", "evictions"):
            setattr(self, name, 0)
        self.seconds = self.prefill_seconds = self.decode_seconds = 0.0

    def metrics(self) -> dict[str, float]:
        """Per-step training metrics (MLflow keys)."""
        return {
            "server/cache_hit_rate": self.cache_hit_rate,
            "server/cached_tokens": float(self.cached_tokens),
            "server/prefill_tokens": float(self.prefill_tokens),
            "server/prefill_s": self.prefill_seconds,
            "server/decode_s": self.decode_seconds,
            "server/mean_decode_batch": self.mean_batch,
            "server/cache_evictions": float(self.evictions),
        }


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    generator: Any = None
    cancelled: bool = False
    version: int = 0
    tokens: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled by its caller meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class LocalTokenServer:
    """Continuous batching with KV-prefix reuse on one transformers model (CPU or one GPU)."""

    def __init__(self, model: Any, tokenizer: Any, *, device: str, default_max_tokens: int = 512,
                 max_cached_tokens: int = 32768, max_batch_size: int = 16) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.default_max_tokens = default_max_tokens
        self.max_batch_size = max_batch_size
        self.stats = GenerationStats()
        self._cache = PrefixKVCache(max_cached_tokens)
        self._stops = StopStrings(tokenizer)
        self._vocab = int(model.get_input_embeddings().num_embeddings)
        self._cv = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._worker_alive = False
        self._model_lock = threading.Lock()
        self._batch = RunningBatch()
        self._rows: list[_Request] = []
        self._leaving: set[int] = set()  # rows done (finished or cancelled), dropped at the next repack
        self._version = 0
        self._fingerprint: int | None = None
        use_gqa_sdpa_on_cpu(model, device)

    @classmethod
    def from_settings(cls, model: Any, tokenizer: Any, settings: "Settings", *, device: str) -> "LocalTokenServer":
        t = settings.train
        return cls(model, tokenizer, device=device, default_max_tokens=settings.episode.max_turn_tokens,
                   max_cached_tokens=t.token_server_cache_tokens, max_batch_size=t.token_server_max_batch)

    # -- the asyncio side ---------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        *,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        **kwargs: Any,
    ) -> GenerationOutput:
        """Sample a continuation of ``prompt_ids``; extra verl kwargs (images, priority) are ignored."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError(f"request {request_id}: empty prompt_ids")
        if min(prompt) < 0 or max(prompt) >= self._vocab:
            raise ValueError(f"request {request_id}: token ids must lie in [0, {self._vocab}), got "
                             f"[{min(prompt)}, {max(prompt)}]")
        params = SamplingParams.from_request(dict(sampling_params), default_max_tokens=self.default_max_tokens,
                                             eos_token_id=self.tokenizer.eos_token_id)
        loop = asyncio.get_running_loop()
        request = _Request(request_id, prompt, params, loop, loop.create_future())
        if params.seed is not None:
            import torch

            request.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        with self._cv:
            self.stats.calls += 1
            self._pending.append(request)
            if not self._worker_alive:
                self._worker_alive = True
                threading.Thread(target=self._work, name="agemem-token-server", daemon=True).start()
        try:
            return await request.future
        except asyncio.CancelledError:
            request.cancelled = True  # the worker drops it before its next step; the others go on
            raise

    def invalidate(self) -> None:
        """Forget every cached prefix: the weights changed (call after each optimizer step)."""
        with self._model_lock:
            self._version += 1
            self._cache.clear()
            self._fingerprint = None
            self.stats.cached_tokens = 0

    @property
    def cached_tokens(self) -> int:
        return self._cache.tokens

    # -- the worker thread --------------------------------------------------------------------

    def _work(self) -> None:
        """Runs while there is work: admit waiting requests, then one decode step for all rows."""
        import torch

        try:
            while True:
                with self._cv:
                    while self._pending and self._pending[0].cancelled:
                        self._pending.popleft()
                        self.stats.cancelled += 1
                    room = self.max_batch_size - len(self._rows) + len(self._leaving)
                    admitted = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
                    if not admitted and len(self._rows) == len(self._leaving):
                        self._rows, self._leaving, self._batch = [], set(), RunningBatch()
                        self._worker_alive = False
                        return
                started = time.perf_counter()
                with self._model_lock, torch.inference_mode():
                    if self.model.training:
                        self.model.eval()  # left so: the trainer's update sets train mode itself
                    if admitted:
                        self._check_weights()
                    joining = [(r, kv) for r in admitted if (kv := self._admit(r)) is not None]
                    self._repack(joining)
                    prefilled = time.perf_counter()
                    self.stats.prefill_seconds += prefilled - started
                    if self._rows:
                        self._decode_step()
                        self.stats.decode_seconds += time.perf_counter() - prefilled
                    self.stats.cached_tokens = self._cache.tokens
                self.stats.seconds += time.perf_counter() - started
        except BaseException as exc:  # a bug here must fail the waiting callers, never hang them
            logger.exception("token server worker failed")
            with self._cv:
                failed = list(self._pending) + self._rows
                self._pending.clear()
                self._rows, self._leaving, self._batch = [], set(), RunningBatch()
                self._worker_alive = False
            for request in failed:
                self._deliver(request, None, exc)

    def _check_weights(self) -> None:
        # Parameter version counters move with every in-place update (optimizer.step, copy_), and
        # identities with every replaced tensor: either means the cached K/V belong to old weights.
        fingerprint = hash(tuple((id(p), p._version) for p in self.model.parameters()))
        if self._fingerprint is not None and fingerprint != self._fingerprint:
            if len(self._cache):
                logger.info("weights changed without invalidate(): dropping %d cached prefix tokens",
                            self._cache.tokens)
            self._version += 1
            self._cache.clear()
        self._fingerprint = fingerprint

    def _admit(self, request: _Request) -> KV | None:
        """Prefill one request; its K/V when it goes on decoding, else None (answered or failed)."""
        if request.cancelled:
            self.stats.cancelled += 1
            return None
        try:
            prompt = np.asarray(request.prompt, dtype=np.int64)
            # At least the last prompt token is run: its logits give the first new token.
            hit, prefix = self._cache.lookup(prompt, limit=len(prompt) - 1)
            logits, kv = self._prefill(request.prompt[hit:], prefix, hit)
            self.stats.prompt_tokens += len(prompt)
            self.stats.prefill_tokens += len(prompt) - hit
            self.stats.cached_prompt_tokens += hit
            self.stats.cache_hits += int(hit > 0)
            request.version = self._version
            self._store(prompt, kv)  # GRPO siblings arriving after this one share it
            tokens, log_probs = select_tokens(logits, [request.params], [request.generator])
            reason = self._append(request, tokens[0], log_probs[0])
        except Exception as exc:
            logger.warning("request %s failed in prefill: %s", request.request_id, exc)
            self._deliver(request, None, exc)
            return None
        if reason is not None:
            self._deliver(request, reason, None)
            return None
        return kv

    def _repack(self, joining: list[tuple[_Request, KV]]) -> None:
        """One repack of the decode batch: rows that are done leave, newly prefilled ones join."""
        for i, request in enumerate(self._rows):
            if request.cancelled and i not in self._leaving:
                self.stats.cancelled += 1
                self._leaving.add(i)
        if not joining and not self._leaving:
            return
        self._batch.update(remove=sorted(self._leaving), add=[kv for _, kv in joining])
        self._rows = [r for i, r in enumerate(self._rows) if i not in self._leaving] + [r for r, _ in joining]
        self._leaving = set()

    def _store(self, tokens: np.ndarray, kv: KV) -> None:
        evictions = self._cache.evictions
        self._cache.insert(tokens, kv)
        self.stats.evictions += self._cache.evictions - evictions

    def _prefill(self, tokens: list[int], prefix: KV | None, start: int) -> tuple[Any, KV]:
        import torch

        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + len(tokens), device=self.device)[None, :]
        out = self.model(input_ids=ids, position_ids=positions, past_key_values=dynamic_cache(prefix),
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], kv_of(out.past_key_values)

    def _decode_step(self) -> None:
        import torch

        if self._leaving:
            self._repack([])
        rows = self._rows
        try:
            ids = torch.tensor([[r.tokens[-1]] for r in rows], dtype=torch.long, device=self.device)
            mask, positions = self._batch.step_inputs(self.device)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             past_key_values=self._batch.cache, use_cache=True)
            self._batch.advance()
            tokens, log_probs = select_tokens(out.logits[:, -1], [r.params for r in rows],
                                              [r.generator for r in rows])
        except Exception as exc:
            logger.warning("decode step failed for %d requests: %s", len(rows), exc)
            for request in rows:
                self._deliver(request, None, exc)
            self._rows, self._leaving, self._batch = [], set(), RunningBatch()
            return
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(rows)
        for i, (request, token, log_prob) in enumerate(zip(rows, tokens, log_probs)):
            reason = self._append(request, token, log_prob)
            if reason is None:
                continue
            # Left in the batch until the next repack, which new requests usually join in the same copy.
            self._leaving.add(i)
            if request.version == self._version:
                # The K/V of prompt + all new tokens but the last (never fed back): the next turn's prefix.
                self._store(np.asarray(request.prompt + request.tokens[:-1], dtype=np.int64), self._batch.row(i))
            self._deliver(request, reason, None)

    def _append(self, request: _Request, token: int, log_prob: float) -> str | None:
        """Record one sampled token; the finish reason ('stop' / 'length') when the request is done."""
        request.tokens.append(token)
        request.log_probs.append(log_prob)
        self.stats.completion_tokens += 1
        p = request.params
        if token in p.stop_token_ids or self._stops.hit(p.stop, request.tokens):
            return "stop"
        if len(request.tokens) >= p.max_tokens:
            return "length"
        return None

    def _deliver(self, request: _Request, reason: str | None, error: BaseException | None) -> None:
        result = None if error is not None else GenerationOutput(
            token_ids=list(request.tokens), log_probs=list(request.log_probs), stop_reason=reason)
        try:
            request.loop.call_soon_threadsafe(_settle, request.future, result, error)
        except RuntimeError:  # the caller's event loop is closed: nobody is waiting any more
            pass


__all__ = ["GenerationStats", "LocalTokenServer"]
