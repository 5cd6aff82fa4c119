"""The answer judge, the memory-quality metric and the paper's memory graders.

LLM backend: a 0-1 grade parsed strictly (a bare number; anything else is retried, then the
offline score is used and flagged). Offline backend (``client.offline`` or no client): token F1 /
EM with the official HotpotQA normalisation, and embedding similarity between stored memories and
gold supporting sentences. Judge results are cached by (question, gold, prediction).

``storage_quality`` (the paper's R_storage) and ``retrieval_relevance`` (R_relevance) grade *what
was stored* and *what was retrieved* against the question and its answer: with an LLM judge, the
share of stored memories it counts as high quality and its relevance grade of the retrieved items
(the reference's graders, fed the gold sentences instead of their indices); offline (and as the
flagged fallback), the share of items that hold a gold supporting sentence (embedding cosine at
``match_threshold``) or the gold answer. Both are shares, so storing everything lowers them.

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

from agemem.reward.prompts import (
    ANSWER_JUDGE_PROMPT,
    MEMORY_JUDGE_PROMPT,
    RELEVANCE_JUDGE_PROMPT,
    STORAGE_JUDGE_PROMPT,
)
from agemem.llm import LLMClient, LLMError, build_llm_client
from agemem.memory.embedder import get_embedder
from agemem.reward.metrics import exact_match, f1_score, normalize_answer

if TYPE_CHECKING:
    from agemem.settings import Settings

logger = logging.getLogger(__name__)

_STRICT_NUMBER = re.compile(r"^\s*(?:score\s*[:=]\s*)?(\d+(?:\.\d+)?|\.\d+)\s*\.?\s*$", re.IGNORECASE)
_SENTENCES = re.compile(r"(?<=[.!?])\s+|\n+")
_CACHE_MAX = 100_000
_INTEGER = re.compile(r"^\s*(?:count\s*[:=]\s*)?(\d+)\s*\.?\s*$", re.IGNORECASE)
#: The reference's graders look at up to 10 items, each cut to 300 characters.
GRADED_ITEMS, GRADED_CHARS = 10, 300

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


class ItemGrade(BaseModel):
    """A share in [0, 1] over stored or retrieved items (R_storage, R_relevance)."""

    score: float
    items: int
    source: Literal["llm", "offline", "fallback", "none"]
    fallback: bool = False
    error: str | None = None


def parse_count(text: str, most: int) -> float | None:
    """A bare integer in [0, most] as a share of ``most``, else None."""
    match = _INTEGER.match(text or "")
    if not match or most <= 0:
        return None
    value = int(match.group(1))
    return value / most if value <= most else None


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
        cfg = settings.judge

        def embed(texts: list[str]) -> np.ndarray:
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

    async def _grade(self, prompt: str, parse: Callable[[str], float | None] = parse_grade
                     ) -> tuple[float | None, str | None]:
        """Ask the LLM for a grade; (grade, None) or (None, why it failed)."""
        assert self.client is not None
        if self.breaker_open:
            self.short_circuited += 1
            return None, f"judge circuit open after {self.breaker_failures} consecutive failures"
        grade, error = await self._ask(prompt, parse)
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

    async def _ask(self, prompt: str, parse: Callable[[str], float | None]) -> tuple[float | None, str | None]:
        """One grade: the call, then up to ``parse_retries`` more when the reply does not parse."""
        assert self.client is not None
        error = "no reply"
        for attempt in range(self.parse_retries + 1):
            try:
                reply = await self.client.complete_text(prompt)
            except LLMError as exc:
                return None, f"judge call failed: {exc}"
            grade = parse(reply)
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

    def _offline_share(self, items: Sequence[str], gold: Sequence[str], answer: str | None) -> float:
        """Share of items holding a gold sentence (a sentence at cosine >= match_threshold) or the answer."""
        norm_answer = normalize_answer(answer or "")
        if norm_answer in ("yes", "no"):  # comparison answers say nothing about what a memory holds
            norm_answer = ""
        hits = [bool(norm_answer) and f" {norm_answer} " in f" {normalize_answer(item)} " for item in items]
        pieces = [(i, p.strip()) for i, item in enumerate(items) for p in _SENTENCES.split(item) if p.strip()]
        if gold and pieces:
            if self._encode is None:
                raise RuntimeError("offline memory grading needs an embedding function")
            vecs = np.asarray(self._encode([p for _, p in pieces] + list(gold)), dtype=np.float32)
            match = (vecs[: len(pieces)] @ vecs[len(pieces):].T >= self.match_threshold).any(axis=1)
            for (i, _), matched in zip(pieces, match.tolist()):
                hits[i] = hits[i] or matched
        return sum(hits) / len(items)

    async def _grade_items(self, items: Sequence[str], question: str, answer: str | None,
                           supporting_sentences: Sequence[str], *, storage: bool) -> ItemGrade:
        items = [i for i in items if i and i.strip()]
        if not items:
            return ItemGrade(score=0.0, items=0, source="none")
        gold = [s.strip() for s in supporting_sentences if s and s.strip()]
        offline = await asyncio.to_thread(self._offline_share, items, gold, answer)
        if self.offline:
            return ItemGrade(score=offline, items=len(items), source="offline")
        shown = items[:GRADED_ITEMS]
        listed = "\n".join(f"{n}. {m[:GRADED_CHARS]}" for n, m in enumerate(shown, 1))
        fields = {"question": question, "answer": answer or "(none)", "memories": listed,
                  "facts": "\n".join(f"- {g}" for g in gold) or "(none)"}
        if storage:
            grade, error = await self._grade(STORAGE_JUDGE_PROMPT.format(count=len(shown), **fields),
                                             lambda text: parse_count(text, len(shown)))
        else:
            grade, error = await self._grade(RELEVANCE_JUDGE_PROMPT.format(**fields))
        if grade is None:
            self.fallbacks += 1
            return ItemGrade(score=offline, items=len(items), source="fallback", fallback=True, error=error)
        return ItemGrade(score=grade, items=len(items), source="llm")

    async def storage_quality(self, stored: Sequence[str], question: str, answer: str | None,
                              supporting_sentences: Sequence[str]) -> ItemGrade:
        """R_storage: the share of stored memories that are high quality for the question (0 when none)."""
        return await self._grade_items(stored, question, answer, supporting_sentences, storage=True)

    async def retrieval_relevance(self, retrieved: Sequence[str], question: str, answer: str | None,
                                  supporting_sentences: Sequence[str]) -> ItemGrade:
        """R_relevance: how relevant the retrieved memories are to answering the question (0 when none)."""
        return await self._grade_items(retrieved, question, answer, supporting_sentences, storage=False)

    async def memory_quality(self, memories: Sequence[str], supporting_sentences: Sequence[str]) -> float:
        """Memory quality in [0, 1] (stored memories vs gold supporting sentences)."""
        return (await self.memory_quality_report(memories, supporting_sentences)).score


__all__ = ["ItemGrade", "Judge", "JudgeScore", "MemoryQuality", "parse_count", "parse_grade"]
