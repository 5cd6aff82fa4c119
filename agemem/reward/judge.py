"""The answer judge and the memory-quality metric.

LLM backend: a 0-1 grade parsed strictly (a bare number; anything else is retried, then the
offline score is used and flagged). Offline backend (``client.offline`` or no client): token F1 /
EM with the official HotpotQA normalisation, and embedding similarity between stored memories and
gold supporting sentences. Judge results are cached by (question, gold, prediction).

A circuit breaker bounds what a dead judge costs: after ``judge.breaker_failures`` failed grades
in a row, every later score of this judge is the flagged fallback, without an LLM call (a dead
endpoint otherwise costs every question its timeouts and retries).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import numpy as np
from pydantic import BaseModel

from agemem.agent.prompts import ANSWER_JUDGE_PROMPT, MEMORY_JUDGE_PROMPT
from agemem.llm import LLMClient, LLMError
from agemem.reward.metrics import exact_match, f1_score

if TYPE_CHECKING:
    from agemem.settings import Settings

logger = logging.getLogger(__name__)

_STRICT_NUMBER = re.compile(r"^\s*(?:score\s*[:=]\s*)?(\d+(?:\.\d+)?|\.\d+)\s*\.?\s*$", re.IGNORECASE)
_SENTENCES = re.compile(r"(?<=[.!?])\s+|\n+")
_CACHE_MAX = 100_000

Source = Literal["llm", "offline", "fallback", "no_answer", "no_gold"]


class JudgeScore(BaseModel):
    score: float
    em: float
    f1: float
    source: Source
    fallback: bool = False
    error: str | None = None


class MemoryQuality(BaseModel):
    score: float
    precision: float | None = None
    recall: float | None = None
    source: Literal["llm", "offline", "fallback", "no_gold"]
    fallback: bool = False
    error: str | None = None


def parse_grade(text: str) -> float | None:
    """A bare number in [0, 1] (optionally 'score: x'), else None."""
    match = _STRICT_NUMBER.match(text or "")
    if not match:
        return None
    value = float(match.group(1))
    return value if 0.0 <= value <= 1.0 else None


class Judge:
    """Scores answers and memory quality; never raises on judge failures (falls back, flags)."""

    def __init__(
        self,
        client: LLMClient | None = None,
        *,
        encode: Callable[[list[str]], np.ndarray] | None = None,
        parse_retries: int = 2,
        cache: bool = True,
        offline_metric: Literal["f1", "em"] = "f1",
        match_threshold: float = 0.75,
        breaker_failures: int = 0,
    ) -> None:
        self.client = client
        self._encode = encode
        self.parse_retries = parse_retries
        self.offline_metric = offline_metric
        self.match_threshold = match_threshold
        self._cache: OrderedDict[tuple[str, str, str], JudgeScore] | None = OrderedDict() if cache else None
        self.calls = 0
        self.fallbacks = 0
        self.breaker_failures = breaker_failures
        self.consecutive_failures = 0
        self.breaker_open = False
        self.short_circuited = 0  # grades not asked for because the breaker was open

    @classmethod
    def from_settings(
        cls,
        settings: "Settings",
        client: LLMClient | None = None,
        *,
        encode: Callable[[list[str]], np.ndarray] | None = None,
    ) -> "Judge":
        """``encode`` replaces the settings' embedder (e.g. the episode engine's per-text cache)."""
        from agemem.llm import build_llm_client

        cfg = settings.judge

        def embed(texts: list[str]) -> np.ndarray:
            from agemem.memory.embedder import get_embedder

            return get_embedder(settings.memory.embedding_model, settings.memory.embedding_device).encode(texts)

        return cls(
            client if client is not None else build_llm_client(settings, "judge"),
            encode=encode or embed,
            parse_retries=cfg.parse_retries,
            cache=cfg.cache,
            offline_metric=cfg.offline_metric,
            match_threshold=cfg.memory_match_threshold,
            breaker_failures=cfg.breaker_failures,
        )

    @property
    def offline(self) -> bool:
        return self.client is None or self.client.offline

    async def _grade(self, prompt: str) -> tuple[float | None, str | None]:
        """Ask the LLM for a grade; (grade, None) or (None, why it failed)."""
        assert self.client is not None
        if self.breaker_open:
            self.short_circuited += 1
            return None, f"judge circuit open after {self.breaker_failures} consecutive failures"
        grade, error = await self._ask(prompt)
        if grade is not None:
            self.consecutive_failures = 0
            return grade, None
        self.consecutive_failures += 1
        if self.breaker_failures and self.consecutive_failures >= self.breaker_failures and not self.breaker_open:
            self.breaker_open = True
            logger.warning(
                "judge failed %d times in a row (last: %s); the rest of this run is scored by the flagged "
                "offline fallback without calling it (judge.breaker_failures)", self.consecutive_failures, error,
            )
        return None, error

    async def _ask(self, prompt: str) -> tuple[float | None, str | None]:
        assert self.client is not None
        error = "no reply"
        for attempt in range(self.parse_retries + 1):
            try:
                reply = await self.client.complete_text(prompt)
            except LLMError as exc:
                return None, f"judge call failed: {exc}"
            grade = parse_grade(reply)
            if grade is not None:
                return grade, None
            error = f"unparseable judge reply {reply[:60]!r}"
            logger.warning("%s (attempt %d/%d)", error, attempt + 1, self.parse_retries + 1)
        return None, error

    async def score_answer(self, question: str, gold: str | None, prediction: str | None) -> JudgeScore:
        """Judge one answer. No answer -> 0; no gold -> 0 flagged ``no_gold``."""
        em, f1 = exact_match(prediction, gold), f1_score(prediction, gold)
        offline_score = f1 if self.offline_metric == "f1" else em
        if prediction is None or not prediction.strip():
            return JudgeScore(score=0.0, em=0.0, f1=0.0, source="no_answer")
        if gold is None or not gold.strip():
            return JudgeScore(score=0.0, em=0.0, f1=0.0, source="no_gold")
        if self.offline:
            return JudgeScore(score=offline_score, em=em, f1=f1, source="offline")
        key = (question, gold, prediction)
        if self._cache is not None and key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        self.calls += 1
        grade, error = await self._grade(ANSWER_JUDGE_PROMPT.format(question=question, gold=gold,
                                                                   prediction=prediction))
        if grade is None:
            self.fallbacks += 1
            return JudgeScore(score=offline_score, em=em, f1=f1, source="fallback", fallback=True, error=error)
        result = JudgeScore(score=grade, em=em, f1=f1, source="llm")
        if self._cache is not None:
            self._cache[key] = result
            if len(self._cache) > _CACHE_MAX:
                self._cache.popitem(last=False)
        return result

    def _offline_memory_quality(self, memories: Sequence[str], gold: Sequence[str]) -> MemoryQuality:
        """F1 of matches between memory sentences and gold sentences by embedding cosine.

        recall = gold sentences matched by some memory sentence; precision = memories holding at
        least one matching sentence (storing every paragraph lowers precision, as the reference's
        "without irrelevant entries" intends).
        """
        if not memories:
            return MemoryQuality(score=0.0, precision=0.0, recall=0.0, source="offline")
        if self._encode is None:
            raise RuntimeError("offline memory quality needs an embedding function")
        pieces: list[tuple[int, str]] = []
        for idx, memory in enumerate(memories):
            for sentence in _SENTENCES.split(memory):
                if sentence.strip():
                    pieces.append((idx, sentence.strip()))
        if not pieces:
            return MemoryQuality(score=0.0, precision=0.0, recall=0.0, source="offline")
        vecs = np.asarray(self._encode([p for _, p in pieces] + list(gold)), dtype=np.float32)
        sims = vecs[: len(pieces)] @ vecs[len(pieces):].T  # normalised embeddings -> cosine
        match = sims >= self.match_threshold
        recall = float(match.any(axis=0).mean())
        relevant = {pieces[i][0] for i in np.nonzero(match.any(axis=1))[0].tolist()}
        precision = len(relevant) / len(memories)
        score = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
        return MemoryQuality(score=score, precision=precision, recall=recall, source="offline")

    async def memory_quality_report(self, memories: Sequence[str], supporting_sentences: Sequence[str]) -> MemoryQuality:
        gold = [s.strip() for s in supporting_sentences if s and s.strip()]
        if not gold:
            return MemoryQuality(score=1.0 if not memories else 0.0, source="no_gold")
        # Embedding is synchronous CPU work: off the event loop, so other rollouts keep going.
        offline = await asyncio.to_thread(self._offline_memory_quality, list(memories), gold)
        if self.offline:
            return offline
        shown = "\n".join(f"- {m[:300]}" for m in list(memories)[:20]) or "(none)"
        grade, error = await self._grade(MEMORY_JUDGE_PROMPT.format(gold="\n".join(f"- {g}" for g in gold),
                                                                    memories=shown))
        if grade is None:
            self.fallbacks += 1
            return offline.model_copy(update={"source": "fallback", "fallback": True, "error": error})
        return MemoryQuality(score=grade, precision=offline.precision, recall=offline.recall, source="llm")

    async def memory_quality(self, memories: Sequence[str], supporting_sentences: Sequence[str]) -> float:
        """Memory quality in [0, 1] (stored memories vs gold supporting sentences)."""
        return (await self.memory_quality_report(memories, supporting_sentences)).score


__all__ = ["Judge", "JudgeScore", "MemoryQuality", "parse_grade"]
