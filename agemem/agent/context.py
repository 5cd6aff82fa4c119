"""The short-term context: messages, real token counts with the policy tokenizer, and rewrites.

Counting uses the policy's own tokenizer and chat template (never chars/4, reference defect 12).
Rewrites (Summary_context, Filter_context, overflow truncation) never touch the system prompt or
the current stage message (the latest injected user turn: facts, distractor or question), nor the
turn being executed (the invoking assistant message and its results), so a tool's own result
always stays next to its call (reference defects 3, 10, 11).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

Message = dict[str, str]

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")


class TokenizerLoadError(ValueError):
    """The tokenizer path is missing or holds no tokenizer (one line, naming the setting)."""


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything else is meant as a place on disk.
    return name.startswith((".", "~", os.sep)) or name.count("/") > 1 or os.sep != "/" and os.sep in name


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str) -> Any:
    """The policy tokenizer, loaded once per process (``AutoTokenizer.from_pretrained``).

    Raises :class:`TokenizerLoadError` for a path that does not exist (transformers would take
    it for a hub id and fail deep in the hub client) or one it cannot load.
    """
    from transformers import AutoTokenizer

    where = "(setting episode.tokenizer, AGEMEM_EPISODE__TOKENIZER)"
    if _looks_like_path(path) and not os.path.exists(os.path.expanduser(path)):
        raise TokenizerLoadError(f"tokenizer {path!r} not found: no such file or directory {where}")
    logger.info("loading tokenizer %s", path)
    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(path))
    except (OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise TokenizerLoadError(f"cannot load tokenizer {path!r}: {reason} {where}") from None


class ChatTokenizer:
    """Chat-template rendering and encoding with the policy tokenizer (cached per process)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.eos_id: int | None = getattr(tokenizer, "eos_token_id", None)
        # Texts a template puts between an assistant turn's end token and the next turn; used to
        # close a turn the model did not close itself (max_tokens reached).
        self._close_ids = self.encode(self._turn_close_text())

    @classmethod
    def from_path(cls, path: str) -> "ChatTokenizer":
        return _chat_tokenizer(path)

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of the whole context, ready for the next assistant turn."""
        return self.encode(self.render(messages, add_generation_prompt=True))

    def count(self, messages: Sequence[Message]) -> int:
        return len(self.prompt_ids(messages))

    def _turn_close_text(self) -> str:
        probe = "\u2063PROBE\u2063"
        rendered = self.render(
            [{"role": "system", "content": "s"}, {"role": "assistant", "content": probe}], add_generation_prompt=False
        )
        after = rendered.split(probe, 1)[1] if probe in rendered else ""
        return after

    def delta_ids(self, new_messages: Sequence[Message], *, last_response_ids: Sequence[int]) -> list[int]:
        """Ids that continue a token stream ending with a model turn: close it, add messages, reopen.

        Rendered as ``[system] + new_messages`` minus the ``[system]`` prefix (verl's trick), so
        the result equals what a full re-render of the context would produce, token for token.
        """
        prefix: list[int] = []
        if last_response_ids:
            close = self._close_ids
            if self.eos_id is not None and last_response_ids[-1] == self.eos_id:
                prefix = close[1:] if close and close[0] == self.eos_id else []
            else:
                prefix = list(close)  # the model was cut off: close its turn as the template would
        base = [{"role": "system", "content": "s"}]
        full = self.render(base + list(new_messages), add_generation_prompt=True)
        head = self.render(base, add_generation_prompt=False)
        tail = full[len(head):] if full.startswith(head) else full
        return prefix + self.encode(tail)


@functools.lru_cache(maxsize=8)
def _chat_tokenizer(path: str) -> ChatTokenizer:
    return ChatTokenizer(load_tokenizer(path))


@dataclass
class Entry:
    """One message plus what the engine needs to know about it."""

    role: str
    content: str
    kind: str  # system | stage | assistant | tool | summary | auto_retrieve
    stage: int = 0
    protected: bool = False
    round_id: int = -1

    def as_message(self) -> Message:
        return {"role": self.role, "content": self.content}


@dataclass
class SpanSelection:
    indices: list[int] = field(default_factory=list)
    error: str | None = None


class ContextWindow:
    """The message list, its exact token count and the rewrites the context tools perform."""

    def __init__(self, tokenizer: ChatTokenizer, system_prompt: str, budget: int) -> None:
        self.tokenizer = tokenizer
        self.budget = budget
        self.system_prompt = system_prompt
        self.entries: list[Entry] = []
        self.version = 0
        self._count_cache: tuple[int, int] | None = None
        self.reset()

    # -- basic operations -------------------------------------------------------------------
    def reset(self) -> None:
        """Only the system prompt remains (stage boundary 1 -> 2, as in the reference)."""
        self.entries = [Entry("system", self.system_prompt, "system", protected=True)]
        self._touch()

    def _touch(self) -> None:
        self.version += 1
        self._count_cache = None

    def append(self, role: str, content: str, kind: str, *, stage: int = 0, round_id: int = -1) -> Entry:
        entry = Entry(role, content, kind, stage=stage, round_id=round_id)
        if kind == "stage":
            # Only the latest injected stage message is protected: earlier ones may be rewritten.
            for other in self.entries:
                if other.kind == "stage":
                    other.protected = False
            entry.protected = True
        self.entries.append(entry)
        self._touch()
        return entry

    def messages(self) -> list[Message]:
        return [e.as_message() for e in self.entries]

    def token_count(self) -> int:
        """Exact prompt length for the next turn (template + generation prompt), cached per version."""
        if self._count_cache is None or self._count_cache[0] != self.version:
            self._count_cache = (self.version, self.tokenizer.count(self.messages()))
        return self._count_cache[1]

    def ratio(self) -> float:
        return self.token_count() / self.budget

    def text(self) -> str:
        return "\n".join(e.content for e in self.entries)

    # -- rewrites ---------------------------------------------------------------------------
    def _rewritable(self, current_round: int) -> list[int]:
        return [
            i
            for i, e in enumerate(self.entries)
            if e.kind != "system" and not e.protected and (current_round < 0 or e.round_id != current_round)
        ]

    def select_span(self, span: str, current_round: int) -> SpanSelection:
        """Messages named by a Summary_context span, minus protected and current-turn ones."""
        numbered = [i for i, e in enumerate(self.entries) if e.kind != "system" and e.round_id != current_round]
        span = (span or "all").strip().lower()
        if span == "all":
            chosen = numbered
        elif re.fullmatch(r"\d+", span):
            n = int(span)
            if n < 1:
                return SpanSelection(error="span 'N' needs N >= 1")
            chosen = numbered[-n:]
        elif m := re.fullmatch(r"(\d+)\s*-\s*(\d+)", span):
            a, b = int(m.group(1)), int(m.group(2))
            if a < 1 or b < a:
                return SpanSelection(error=f"span '{span}' must be 'a-b' with 1 <= a <= b")
            chosen = numbered[a - 1 : b]
        else:
            return SpanSelection(error=f"span must be 'all', 'N' or 'a-b', got '{span[:40]}'")
        allowed = set(self._rewritable(current_round))
        return SpanSelection([i for i in chosen if i in allowed])

    def replace_with_summary(self, indices: Sequence[int], summary: str, *, stage: int) -> Entry:
        """Replace ``indices`` by one summary message at the position of the first of them."""
        keep = set(indices)
        first = min(indices)
        entry = Entry("tool", f"[summary of {len(indices)} messages]\n{summary}", "summary", stage=stage)
        new: list[Entry] = []
        for i, e in enumerate(self.entries):
            if i == first:
                new.append(entry)
            if i not in keep:
                new.append(e)
        self.entries = new
        self._touch()
        return entry

    def filter_candidates(self, current_round: int) -> list[int]:
        return self._rewritable(current_round)

    def remove(self, indices: Sequence[int]) -> int:
        drop = set(indices)
        before = len(self.entries)
        self.entries = [e for i, e in enumerate(self.entries) if i not in drop]
        self._touch()
        return before - len(self.entries)

    def truncate_oldest(self, limit: int, current_round: int = -1) -> tuple[int, bool]:
        """Drop the oldest rewritable messages until the count fits ``limit``.

        A dropped assistant message takes its tool results with it so no result is orphaned.
        Returns (messages dropped, whether it now fits).
        """
        dropped = 0
        while self.token_count() > limit:
            candidates = self._rewritable(current_round)
            if not candidates:
                return dropped, False
            first = candidates[0]
            group = [first]
            if self.entries[first].kind == "assistant":
                j = first + 1
                while j < len(self.entries) and self.entries[j].kind == "tool" and not self.entries[j].protected:
                    group.append(j)
                    j += 1
            dropped += self.remove(group)
        return dropped, True


def extractive_summary(
    texts: Sequence[str], encode: Callable[[list[str]], np.ndarray], *, ratio: float = 0.3, max_sentences: int = 8
) -> str:
    """Offline summary: the most central sentences (embedding centrality), in original order."""
    sentences = [s.strip() for t in texts for s in _SENTENCE_SPLIT.split(t) if s.strip()]
    if not sentences:
        return ""
    k = max(1, min(max_sentences, math.ceil(len(sentences) * ratio)))
    if len(sentences) <= k:
        return " ".join(sentences)
    vecs = np.asarray(encode(sentences), dtype=np.float32)
    centrality = (vecs @ vecs.T).sum(axis=1)
    top = sorted(np.argsort(-centrality)[:k].tolist())
    return " ".join(sentences[i] for i in top)


class EmbeddingCache:
    """Per-text embedding cache in front of an embedder (contexts re-embed the same messages)."""

    def __init__(self, encode: Callable[[list[str]], np.ndarray], max_items: int = 4096) -> None:
        self._encode = encode
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._max = max_items
        # The judge encodes from a worker thread while the event loop's engine encodes too.
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
            if missing:
                for text, vec in zip(missing, np.asarray(self._encode(list(missing)), dtype=np.float32)):
                    self._cache[text] = vec
            out = []
            for t in texts:
                self._cache.move_to_end(t)
                out.append(self._cache[t])
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        if not out:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack(out)


__all__ = [
    "ChatTokenizer",
    "ContextWindow",
    "EmbeddingCache",
    "Entry",
    "SpanSelection",
    "extractive_summary",
    "load_tokenizer",
]
