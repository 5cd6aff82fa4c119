"""Episode statistics and the per-rollout event log (independent of the mutable context)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from agemem.agent.tools import TOOL_NAMES

# The counter key of every call whose name is none of the six tools.
UNKNOWN_TOOL = "unknown"


class ToolEvent(BaseModel):
    """One tool call as executed, kept even when a later rewrite removes it from the context."""

    stage: int
    round: int
    name: str
    ok: bool
    outcome: str = Field(description="ok | error | unavailable | disabled | skipped")
    arguments: dict[str, Any] = Field(default_factory=dict)
    result: str = ""
    context_tokens: int = Field(0, description="Context tokens when the call ran.")
    data: dict[str, Any] = Field(default_factory=dict, description="Structured result (ids, hits, removed).")


class OverflowEvent(BaseModel):
    stage: int
    round: int
    tokens: int
    budget: int
    action: str = Field(description="truncate | end_stage")
    dropped_messages: int = 0
    fits: bool = True


class EpisodeStats(BaseModel):
    """Everything evaluation and ``compute_score`` read about one episode."""

    episode_id: str = ""
    record_id: str = ""
    question: str = ""
    gold_answer: str | None = None
    final_answer: str | None = None
    answered: bool = False
    stage3_rounds: int = 0
    stage3_max_rounds: int = 0
    round_limit_hit: bool = False
    stage_end: dict[str, str] = Field(default_factory=dict, description="stage -> answer|round_limit|overflow|...")
    rounds: dict[str, int] = Field(default_factory=dict)
    total_rounds: int = 0
    tool_calls: dict[str, dict[str, int]] = Field(default_factory=dict, description="name -> outcome -> count")
    tool_ok_counts: dict[str, int] = Field(default_factory=dict)
    tool_call_count: int = 0
    tool_error_count: int = 0
    format_errors: dict[str, int] = Field(default_factory=dict)
    format_error_count: int = 0
    no_action_rounds: int = 0
    tool_calls_ignored_in_think: int = 0
    model_tokens: dict[str, int] = Field(default_factory=dict, description="stage -> generated tokens")
    injected_tokens: dict[str, int] = Field(default_factory=dict, description="stage -> injected (mask 0) tokens")
    prompt_tokens_max: int = 0
    max_context_tokens: int = 0
    context_tokens_final: int = 0
    context_ratio_final: float = 0.0
    overflow_events: list[OverflowEvent] = Field(default_factory=list)
    overflow_count: int = 0
    preventive_context_tools: int = Field(0, description="Successful Summary/Filter calls before any overflow.")
    auto_summary_stops: int = Field(0, description="Stage messages ended by episode.auto_summary_threshold.")
    key_info_in_context: float | None = Field(None, description="Gold facts present in context at answer time.")
    storage_recall: float | None = Field(None, description="Gold facts covered by stored memory (event log).")
    retrieval_recall: float | None = Field(None, description="Gold facts covered by stage-3 retrievals.")
    retrieved_any: bool = False
    storage_quality: float | None = Field(None, description="R_storage: share of stored memories judged high quality.")
    storage_quality_source: str = "none"
    retrieval_relevance: float | None = Field(None, description="R_relevance: judged relevance of stage-3 retrievals.")
    retrieval_relevance_source: str = "none"
    memory_adds_ok: int = 0
    memory_updates_ok: int = 0
    memory_deletes_ok: int = 0
    memories_final: list[dict[str, Any]] = Field(default_factory=list)
    judge_score: float = 0.0
    em: float = 0.0
    f1: float = 0.0
    judge_source: str = "none"
    judge_fallback: bool = False
    memory_quality: float | None = None
    memory_quality_source: str = "none"
    memory_quality_fallback: bool = False
    memory_unavailable: int = 0
    events: list[ToolEvent] = Field(default_factory=list)
    reward_preset: str = "paper"
    reward_overrides: dict[str, Any] = Field(default_factory=dict)
    wall_s: float = 0.0
    generate_s: float = 0.0
    overhead_s: float = Field(0.0, description="Engine time outside generation and the end-of-episode judge.")
    judge_s: float = 0.0

    def count_tool(self, name: str, outcome: str) -> None:
        """Count one call. A name the model made up is counted under ``unknown``: counters become
        metric names downstream (MLflow refuses most characters a model writes); the event log
        keeps the name as written."""
        name = name if name in TOOL_NAMES else UNKNOWN_TOOL
        per = self.tool_calls.setdefault(name, {})
        per[outcome] = per.get(outcome, 0) + 1
        self.tool_call_count += 1
        if outcome == "ok":
            self.tool_ok_counts[name] = self.tool_ok_counts.get(name, 0) + 1
        else:
            self.tool_error_count += 1

    def count_format_error(self, kind: str) -> None:
        self.format_errors[kind] = self.format_errors.get(kind, 0) + 1
        self.format_error_count += 1

    def add_tokens(self, stage: int, *, model: int = 0, injected: int = 0) -> None:
        key = str(stage)
        self.model_tokens[key] = self.model_tokens.get(key, 0) + model
        self.injected_tokens[key] = self.injected_tokens.get(key, 0) + injected


__all__ = ["EpisodeStats", "OverflowEvent", "ToolEvent"]
