"""Token bookkeeping of one trajectory: the segments a trainer learns from.

Context rewriting (Summary_context, Filter_context, overflow truncation, the stage-1 -> 2 reset)
changes earlier context, so one trajectory is not one token sequence. The recorder keeps a
*segment* per unrewritten stretch: its prompt is the context rendered when the segment opened,
and its response is every later turn in order, model turns with mask 1 and injected turns
(stage messages, tool results) with mask 0. The next prompt of a segment is therefore always its
prompt plus its response so far, exactly what the model saw.

It also keeps what the token server reports beside the tokens (verl's ``TokenOutput.extra_fields``):
verl's V1 trainer needs the trajectory's first ``min_global_steps`` and last ``max_global_steps``
on every output it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from agemem.agent.context import ChatTokenizer, ContextWindow, Message

#: Fields of verl's ``TokenOutput.extra_fields`` a trajectory carries: (key, keep the first or the last).
GENERATION_FIELDS: dict[str, str] = {"min_global_steps": "first", "max_global_steps": "last"}


@dataclass
class Segment:
    """One token sequence for training: a prompt and the turns that followed it."""

    prompt_ids: list[int]
    reason: str = "start"
    stage: int = 1
    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)
    response_logprobs: list[float] | None = field(default_factory=list)
    #: The same turns as chat messages: the context when the segment opened, then every later turn
    #: (what a chat-format SFT export, e.g. verl's multi-turn SFT dataset, trains on).
    messages: list[Message] = field(default_factory=list)

    def extend(self, ids: list[int], mask: int, logprobs: list[float] | None = None) -> None:
        self.response_ids.extend(ids)
        self.response_mask.extend([mask] * len(ids))
        if self.response_logprobs is not None:
            if mask == 1 and (logprobs is None or len(logprobs) != len(ids)):
                self.response_logprobs = None  # the policy gave none: drop rather than invent
            else:
                self.response_logprobs.extend(logprobs if mask == 1 and logprobs else [0.0] * len(ids))

    @property
    def num_model_tokens(self) -> int:
        return sum(self.response_mask)

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_ids": self.prompt_ids,
            "response_ids": self.response_ids,
            "response_mask": self.response_mask,
            "response_logprobs": self.response_logprobs,
            "reason": self.reason,
            "stage": self.stage,
        }


@dataclass
class Generation:
    """What one ``generate`` call returned, normalised from verl's ``TokenOutput`` or a dict."""

    token_ids: list[int]
    log_probs: list[float] | None = None
    extra_fields: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, out: Any) -> "Generation":
        if isinstance(out, dict):
            return cls(list(out.get("token_ids") or []), out.get("log_probs"), dict(out.get("extra_fields") or {}))
        ids = getattr(out, "token_ids", None)
        if ids is None and isinstance(out, (list, tuple)):
            return cls([int(i) for i in out])
        return cls(list(ids or []), getattr(out, "log_probs", None), dict(getattr(out, "extra_fields", None) or {}))


class SegmentRecorder:
    """Segments of one trajectory, the messages injected since the last model turn, and the
    generation fields verl needs on every output."""

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self.tokenizer = tokenizer
        self.segments: list[Segment] = []
        self.current: Segment | None = None
        self.dirty_reason: str | None = "start"
        self.pending: list[Message] = []
        self.generation_fields: dict[str, Any] = {}
        self._delta: list[int] | None = None

    def injected(self, role: str, content: str) -> None:
        """A non-model message entered the context after the last model turn."""
        self.pending.append({"role": role, "content": content})

    def rewritten(self, reason: str) -> None:
        """The context changed behind the current segment: the next turn opens a new one."""
        self.dirty_reason = reason

    def forget_pending(self) -> None:
        self.pending = []

    @property
    def opens_segment(self) -> bool:
        return self.current is None or self.dirty_reason is not None

    def prompt_len(self, ctx: ContextWindow) -> int:
        """Tokens the model would see on the next turn (the segment's token stream)."""
        if self.opens_segment:
            return ctx.token_count()
        assert self.current is not None
        self._delta = self.tokenizer.delta_ids(self.pending, last_response_ids=self.current.response_ids)
        return len(self.current.prompt_ids) + len(self.current.response_ids) + len(self._delta)

    def pending_tokens(self) -> int:
        """Tokens of the injected messages, rendered on their own (chat mode, a segment's first turn)."""
        return len(self.tokenizer.delta_ids(self.pending, last_response_ids=[])) if self.pending else 0

    def next_prompt(self, ctx: ContextWindow, stage: int) -> tuple[list[int], int]:
        """The prompt of the next model turn and how many injected tokens it adds.

        Opens a new segment when the context was rewritten; otherwise extends the current one with
        the injected messages (mask 0), so the prompt is the segment's prompt plus its response.
        """
        if self.opens_segment:
            self.close()
            messages = ctx.messages()
            self.current = Segment(self.tokenizer.prompt_ids(messages), reason=self.dirty_reason or "start",
                                   stage=stage, messages=[dict(m) for m in messages])
            self.dirty_reason = None
            injected = self.pending_tokens()
        else:
            assert self.current is not None
            delta = self._delta if self._delta is not None else self.tokenizer.delta_ids(
                self.pending, last_response_ids=self.current.response_ids)
            self.current.extend(delta, 0)
            self.current.messages.extend(dict(m) for m in self.pending)
            injected = len(delta)
        self._delta = None
        self.pending = []
        return self.current.prompt_ids + self.current.response_ids, injected

    def record(self, generation: Generation, max_tokens: int) -> list[int]:
        """Append a model turn (cut to ``max_tokens``) to the current segment; returns its ids."""
        assert self.current is not None, "record() before next_prompt()"
        ids = generation.token_ids[:max_tokens]
        logprobs = list(generation.log_probs)[: len(ids)] if generation.log_probs is not None else None
        self.current.extend(ids, 1, logprobs)
        for key, keep in GENERATION_FIELDS.items():
            if key in generation.extra_fields and (keep == "last" or key not in self.generation_fields):
                self.generation_fields[key] = generation.extra_fields[key]
        return ids

    def model_turn(self, text: str) -> None:
        """The decoded model turn just recorded, as the segment's next chat message."""
        if self.current is not None:
            self.current.messages.append({"role": "assistant", "content": text})

    def close(self) -> None:
        if self.current is not None and self.current.response_ids:
            self.segments.append(self.current)
        self.current = None


def model_token_count(segments: Sequence[Segment]) -> int:
    return sum(s.num_model_tokens for s in segments)


__all__ = ["GENERATION_FIELDS", "Generation", "Segment", "SegmentRecorder", "model_token_count"]
