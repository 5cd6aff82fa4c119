"""The state of one episode (one rollout), shared by the stage driver and the tool executor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from agemem.agent.context import ContextWindow
from agemem.agent.memory_ids import MemoryIdAliases
from agemem.agent.segments import SegmentRecorder
from agemem.agent.stats import EpisodeStats, ToolEvent
from agemem.memory.base import MemorySession

if TYPE_CHECKING:
    from agemem.data.records import EpisodeScript
    from agemem.settings import EpisodeSettings


@dataclass
class EpisodeState:
    """Context window, segments, statistics, transcript and where the episode is."""

    script: "EpisodeScript"
    cfg: "EpisodeSettings"
    ctx: ContextWindow
    recorder: SegmentRecorder
    stats: EpisodeStats
    session: MemorySession | None
    transcript: list[dict[str, Any]] = field(default_factory=list)
    stage: int = 0
    round_id: int = -1  # rounds of the whole episode (messages remember the round that wrote them)
    stage_round: int = 0  # round within the current stage message
    last_answer: str | None = None  # the latest <answer>, whatever the stage (a conversation's reply)
    memory_ids: MemoryIdAliases = field(default_factory=MemoryIdAliases)
    #: Called with each tool event as it is recorded (``agemem chat --show-tools``).
    on_event: Callable[[ToolEvent], None] | None = None

    def add(self, role: str, content: str, kind: str) -> None:
        """A message enters the context (and the transcript); non-model ones are pending injections."""
        self.ctx.append(role, content, kind, stage=self.stage, round_id=self.round_id if kind != "stage" else -1)
        if role != "assistant":
            self.recorder.injected(role, content)
        else:
            self.recorder.model_turn(content)
        self.transcript.append(
            {"stage": self.stage, "round": self.stage_round, "role": role, "kind": kind, "content": content}
        )

    def rewritten(self, reason: str) -> None:
        """The context was rewritten: a new segment starts and the transcript says why."""
        self.recorder.rewritten(reason)
        self.transcript.append(
            {"stage": self.stage, "round": self.stage_round, "role": "engine", "kind": "rewrite",
             "content": f"[context rewritten: {reason}; {self.ctx.token_count()} tokens]"}
        )

    def tool_message(self, text: str) -> None:
        """A tool result for the model, cut to ``episode.max_tool_result_chars``."""
        limit = self.cfg.max_tool_result_chars
        if len(text) > limit:
            text = text[:limit] + " ...[truncated]"
        self.add("tool", text, "tool")

    def record_event(self, name: str, outcome: str, args: dict[str, Any], result: str,
                     data: dict[str, Any] | None = None, *, count: bool = True) -> None:
        """One executed tool call in the event log (kept even when a rewrite removes it from context)."""
        event = ToolEvent(
            stage=self.stage, round=self.stage_round, name=name, ok=outcome == "ok", outcome=outcome,
            arguments=dict(args), result=result[: self.cfg.max_tool_result_chars],
            context_tokens=self.ctx.token_count(), data=data or {},
        )
        self.stats.events.append(event)
        if count:
            self.stats.count_tool(name, outcome)
        if self.on_event is not None:
            self.on_event(event)


__all__ = ["EpisodeState"]
