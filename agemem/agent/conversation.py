"""A conversation with the memory agent: user messages answered by the episode engine's own loop.

The same system prompt, tool schemas, parser, context window, budget and tool executor as an
episode: a :class:`Conversation` is an :class:`~agemem.agent.state.EpisodeState` driven by the
engine's :class:`~agemem.agent.episode.StageDriver`, one :meth:`~StageDriver.turn` per user
message. The context keeps growing across messages (overflow handled by
dropping the oldest messages whatever ``episode.overflow_policy`` says, Summary/Filter_context
available to the model); long-term memory is
the given session, typically a named memory space that outlives the conversation.

Messages of a conversation are stage 0 (memories it stores carry ``{"stage": "0"}``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from agemem.agent.parsing import visible_text
from agemem.agent.stats import ToolEvent
from agemem.data.records import EpisodeScript
from agemem.memory.base import MemorySession

if TYPE_CHECKING:
    from agemem.agent.episode import EpisodeEngine

CONVERSATION_STAGE = 0


def conversation_script(label: str) -> EpisodeScript:
    """The script of a conversation: no stage messages, no question, no gold (nothing is judged)."""
    return EpisodeScript(episode_id=label, record_id=label, seed=0, split="chat", stage1_turns=[],
                         distractor_slots=0, question="", gold_answer=None)


@dataclass
class ChatTurn:
    """One user message and how the agent answered it."""

    message: str
    reply: str
    end: str  # answer | round_limit | threshold | overflow
    answered: bool
    events: list[ToolEvent]
    rounds: int
    context_tokens: int
    budget: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "message": self.message,
            "reply": self.reply,
            "end": self.end,
            "answered": self.answered,
            "rounds": self.rounds,
            "tool_calls": [{"name": e.name, "arguments": e.arguments, "outcome": e.outcome, "result": e.result}
                           for e in self.events],
            "context_tokens": self.context_tokens,
            "budget": self.budget,
        }


class Conversation:
    """User messages in, replies out, the episode engine in between.

    ``policy`` and ``mode`` as the engine takes them (a token policy with ``"tokens"``, a chat
    policy with ``"chat"``); ``session`` is long-term memory (None: no memory, tools answer so).
    ``on_event`` sees every tool call as it completes.
    """

    def __init__(self, engine: "EpisodeEngine", policy: Any, *, mode: str, session: MemorySession | None,
                 max_rounds: int, label: str | None = None, on_event: Callable[[ToolEvent], None] | None = None,
                 sampling_overrides: dict[str, Any] | None = None) -> None:
        self.engine = engine
        self.session = session
        self.max_rounds = max_rounds
        self.state = engine.new_state(conversation_script(label or f"chat-{uuid.uuid4().hex[:12]}"), session)
        self.state.stage = CONVERSATION_STAGE
        if self.state.cfg.overflow_policy == "end_stage":
            # Ending "the stage" of a conversation would leave it over budget for every later
            # message: a conversation always drops its oldest messages instead.
            self.state.cfg = self.state.cfg.model_copy(update={"overflow_policy": "truncate"})
        self.state.on_event = on_event
        self.driver = engine.driver(self.state, policy, mode=mode,
                                    sampling=engine.sampling_params(sampling_overrides))
        self.turns = 0

    def add_history(self, role: str, content: str) -> None:
        """An earlier message of the conversation (a served request's history), before the first :meth:`say`."""
        if self.turns:
            raise RuntimeError("history goes before the first message")
        if role not in ("user", "assistant"):
            raise ValueError(f"history messages are 'user' or 'assistant', got {role!r}")
        self.state.add(role, content, "history")

    async def say(self, message: str) -> ChatTurn:
        """Answer one user message: rounds of generate -> parse -> tools until an answer or a limit."""
        state = self.state
        events_before, rounds_before = len(state.stats.events), state.stats.total_rounds
        replies_before = len(state.transcript)
        state.last_answer = None
        end = await self.driver.turn(message, self.max_rounds)
        self.turns += 1
        answered = end == "answer" and state.last_answer is not None
        reply = state.last_answer if answered else self._last_visible(replies_before)
        return ChatTurn(message=message, reply=reply or "", end=end, answered=answered,
                        events=list(state.stats.events[events_before:]),
                        rounds=state.stats.total_rounds - rounds_before,
                        context_tokens=state.ctx.token_count(), budget=state.cfg.max_context_tokens)

    def _last_visible(self, since: int) -> str:
        for item in reversed(self.state.transcript[since:]):
            if item["role"] == "assistant":
                return visible_text(item["content"])
        return ""

    def budget(self) -> dict[str, Any]:
        """Where the context stands: tokens against the budget, messages, rewrites, overflows."""
        state = self.state
        tokens = state.ctx.token_count()
        return {
            "context_tokens": tokens,
            "budget": state.cfg.max_context_tokens,
            "share": round(tokens / state.cfg.max_context_tokens, 4),
            "messages": len(state.ctx.entries),
            "overflows": state.stats.overflow_count,
            "rewrites": sum(1 for t in state.transcript if t["kind"] == "rewrite"),
            "turns": self.turns,
            "tool_calls": state.stats.tool_call_count,
        }


__all__ = ["CONVERSATION_STAGE", "ChatTurn", "Conversation", "conversation_script"]
