"""Reward configuration, presets and the pure component functions.

All inputs are episode statistics (``EpisodeStats`` as a dict, see ``agemem.agent.stats``), which
the engine computes from its per-rollout event log and the memory store, never from the final,
rewritten context.

Presets: ``paper`` is the paper's ``w^T [R_task, R_context, R_memory] + penalties`` with uniform
weights (no tool-efficiency term: that is the released code's, ``w_tool`` 0 here) and no early stage
end (``auto_summary_threshold`` None); ``official-code`` is what the released code instantiates
(weights 0.5 / 0.15 / 0.15 plus the tool term at 0.2, clip to [-1, 1], stage end at 80 % of the
context budget).

R_memory's terms: R_storage is the share of stored memories judged high quality for the question
and its answer, R_relevance the judged relevance of what stage 3 retrieved (``Judge.storage_quality``
/ ``Judge.retrieval_relevance``: the LLM judge when the judge is an LLM, else the documented offline
approximation, the share of items holding a gold supporting sentence or the answer). Recall of gold
facts (``storage_recall``, ``retrieval_recall``) stays a diagnostic: storing everything maximises it. Fixes against the reference (REFERENCE.md section 12): stage-1 memory writes
count (storage is measured on the event log), no term is always 1 (preservation is the share of
gold facts present in the context when answering), efficiency uses model rounds and is only
paid for an answer, and the round-limit penalty applies only when stage 3 ran out of rounds
without an answer.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PresetName = Literal["paper", "official-code"]


class RewardConfig(BaseModel):
    """Weights, penalties and thresholds of the trajectory reward. Override any field."""

    model_config = ConfigDict(extra="forbid")

    preset: str = "paper"
    w_task: float = Field(1.0, description="Weight of the task term (judge score in [0, 1]).")
    w_context: float = Field(1.0, description="Weight of mean(compression, preventive, preservation).")
    w_memory: float = Field(1.0, description="Weight of mean(storage, maintenance, relevance).")
    w_tool: float = Field(0.0, description="Weight of the tool-use term (the released code's; not in the paper).")
    no_answer_penalty: float = Field(-1.0, description="Added (unweighted) when stage 3 gives no answer.")
    round_limit_penalty: float = Field(-1.0, description="Added when stage 3 hit its round limit unanswered.")
    overflow_penalty: float = Field(-0.5, description="Added when any context overflow happened.")
    format_error_penalty: float = Field(0.0, description="Added per format error or failed tool call.")
    format_error_penalty_cap: float = Field(-0.5, description="Floor of the summed format-error penalty.")
    clip_min: float | None = Field(None, description="Lower clip of the total; None = no clip.")
    clip_max: float | None = Field(None, description="Upper clip of the total; None = no clip.")
    auto_summary_threshold: float | None = Field(
        None, gt=0, le=1,
        description="Share of the context budget at which the engine ends a stage message after a round "
        "without an answer (the released code's 0.8); None = never. episode.auto_summary_threshold overrides it.",
    )
    tool_ratio_low: float = 0.3
    tool_ratio_high: float = 2.0
    tool_ratio_excess: float = 3.0
    tool_scale_bonus: float = 0.2
    tool_scale_penalty: float = -0.1
    existence_retrieve: float = 0.2
    existence_context: float = 0.2
    existence_add: float = 0.1
    efficiency_bonus: float = 0.2
    tool_term_min: float = -0.5
    tool_term_max: float = 1.0


PRESETS: dict[str, dict[str, Any]] = {
    # The paper: uniform weights over task, context and memory; no tool term, no clip (GRPO normalises).
    "paper": {"preset": "paper"},
    # What the released code instantiates (ThreeStageRewardCalculator).
    "official-code": {
        "preset": "official-code",
        "w_task": 0.5,
        "w_tool": 0.2,
        "w_context": 0.15,
        "w_memory": 0.15,
        "clip_min": -1.0,
        "clip_max": 1.0,
        "auto_summary_threshold": 0.8,
    },
}


def reward_config(preset: str = "paper", overrides: dict[str, Any] | None = None) -> RewardConfig:
    """A preset plus overrides; raises ValueError naming the unknown preset or field."""
    if preset not in PRESETS:
        raise ValueError(f"unknown reward preset {preset!r}; choose one of {sorted(PRESETS)}")
    return RewardConfig(**{**PRESETS[preset], **(overrides or {})})


def auto_summary_threshold(episode: Any) -> float | None:
    """The stage-ending context share for an ``EpisodeSettings``: its own value, else its preset's."""
    if episode.auto_summary_threshold is not None:
        return None if episode.auto_summary_threshold >= 1.0 else float(episode.auto_summary_threshold)
    return reward_config(episode.reward_preset, episode.reward_overrides).auto_summary_threshold


def _f(stats: dict[str, Any], key: str, default: float = 0.0) -> float:
    value = stats.get(key)
    if value is None:
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def context_terms(stats: dict[str, Any]) -> dict[str, float]:
    ratio = _f(stats, "context_ratio_final", 1.0)
    preventive = float(_f(stats, "preventive_context_tools") > 0 and _f(stats, "overflow_count") == 0)
    key_info = stats.get("key_info_in_context")
    return {
        "r_compression": max(0.0, 1.0 - ratio),
        "r_preventive": preventive,
        "r_preservation": float(key_info) if key_info is not None else 0.0,
    }


def memory_terms(stats: dict[str, Any]) -> dict[str, float]:
    """R_storage, R_maintenance, R_relevance; a grade missing from the statistics counts 0."""
    return {
        "r_storage": _f(stats, "storage_quality"),
        "r_maintenance": float(_f(stats, "memory_updates_ok") + _f(stats, "memory_deletes_ok") > 0),
        "r_relevance": _f(stats, "retrieval_relevance"),
    }


def tool_terms(stats: dict[str, Any], cfg: RewardConfig) -> dict[str, float]:
    calls = _f(stats, "tool_call_count")
    rounds = max(1.0, _f(stats, "total_rounds"))
    ratio = calls / rounds
    if cfg.tool_ratio_low <= ratio <= cfg.tool_ratio_high:
        scale = cfg.tool_scale_bonus
    elif ratio > cfg.tool_ratio_excess:
        scale = cfg.tool_scale_penalty
    else:
        scale = 0.0
    ok = stats.get("tool_ok_counts") or {}
    existence = (
        cfg.existence_retrieve * float(ok.get("Retrieve_memory", 0) > 0)
        + cfg.existence_context * float(ok.get("Summary_context", 0) + ok.get("Filter_context", 0) > 0)
        + cfg.existence_add * float(ok.get("Add_memory", 0) > 0)
    )
    efficiency = 0.0
    if stats.get("answered"):
        max_rounds = max(1.0, _f(stats, "stage3_max_rounds", 1.0))
        efficiency = cfg.efficiency_bonus * (1.0 - _f(stats, "stage3_rounds") / max_rounds)
    total = min(cfg.tool_term_max, max(cfg.tool_term_min, scale + existence + efficiency))
    return {"tool_ratio": ratio, "tool_scale": scale, "tool_existence": existence, "tool_efficiency": efficiency,
            "tool": total}


__all__ = ["PRESETS", "PresetName", "RewardConfig", "auto_summary_threshold", "context_terms", "memory_terms", "reward_config", "tool_terms"]
