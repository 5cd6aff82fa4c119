"""verl's reward entry point: ``compute_score`` over the statistics the episode engine recorded.

Pure and cheap: the judge already ran at episode end inside the engine, so this only combines
numbers. ``solution_str`` (the whole transcript in verl) is not parsed; the answer and statistics
come from ``extra_info``. Every call returns the same keys, all floats.
"""

from __future__ import annotations

import logging
from typing import Any

from agemem.reward.components import RewardConfig, context_terms, memory_terms, reward_config, tool_terms

logger = logging.getLogger(__name__)

#: ``data_source`` of agemem's rows (verl parquet) and of every score this project computes.
DATA_SOURCE = "hotpotqa_agemem"

# Keys compute_score needs; missing ones are scored as "no answer" and flagged.
REQUIRED_KEYS: tuple[str, ...] = ("answered", "judge_score", "tool_call_count", "total_rounds", "context_ratio_final")

SCORE_KEYS: tuple[str, ...] = (
    "score", "raw_score", "task", "context", "memory", "tool",
    "r_compression", "r_preventive", "r_preservation", "r_storage", "r_maintenance", "r_relevance",
    "tool_ratio", "tool_scale", "tool_existence", "tool_efficiency",
    "penalty_no_answer", "penalty_round_limit", "penalty_overflow", "penalty_format",
    "answered", "acc", "judge_score", "em", "f1", "judge_fallback", "memory_quality", "stats_missing",
)


def _stats_from(extra_info: Any) -> tuple[dict[str, Any], bool]:
    if not isinstance(extra_info, dict):
        return {}, True
    stats = extra_info.get("agemem_stats") if isinstance(extra_info.get("agemem_stats"), dict) else extra_info
    missing = any(k not in stats for k in REQUIRED_KEYS)
    return stats, missing


def score_stats(stats: dict[str, Any], cfg: RewardConfig, *, stats_missing: bool = False) -> dict[str, float]:
    """The reward breakdown for one episode's statistics."""
    answered = bool(stats.get("answered")) and not stats_missing
    judge = float(stats.get("judge_score") or 0.0) if answered else 0.0
    ctx = context_terms(stats)
    mem = memory_terms(stats)
    tool = tool_terms(stats, cfg)
    context = sum(ctx.values()) / 3.0
    memory = sum(mem.values()) / 3.0
    failures = float(stats.get("format_error_count") or 0) + float(stats.get("tool_error_count") or 0)
    penalties = {
        "penalty_no_answer": 0.0 if answered else cfg.no_answer_penalty,
        "penalty_round_limit": cfg.round_limit_penalty if stats.get("round_limit_hit") and not answered else 0.0,
        "penalty_overflow": cfg.overflow_penalty if float(stats.get("overflow_count") or 0) > 0 else 0.0,
        "penalty_format": max(cfg.format_error_penalty_cap, cfg.format_error_penalty * failures)
        if cfg.format_error_penalty
        else 0.0,
    }
    raw = (
        cfg.w_task * judge
        + cfg.w_context * context
        + cfg.w_memory * memory
        + cfg.w_tool * tool["tool"]
        + sum(penalties.values())
    )
    total = raw
    if cfg.clip_min is not None:
        total = max(cfg.clip_min, total)
    if cfg.clip_max is not None:
        total = min(cfg.clip_max, total)
    out: dict[str, float] = {
        "score": total,
        "raw_score": raw,
        "task": judge,
        "context": context,
        "memory": memory,
        **ctx,
        **mem,
        **tool,
        **penalties,
        "answered": float(answered),
        "acc": judge,
        "judge_score": judge,
        "em": float(stats.get("em") or 0.0) if answered else 0.0,
        "f1": float(stats.get("f1") or 0.0) if answered else 0.0,
        "judge_fallback": float(bool(stats.get("judge_fallback"))),
        "memory_quality": float(stats.get("memory_quality") or 0.0),
        "stats_missing": float(stats_missing),
    }
    return {k: float(out[k]) for k in SCORE_KEYS}


def compute_score(
    data_source: str | None = None,
    solution_str: str | None = None,
    ground_truth: Any = None,
    extra_info: dict[str, Any] | None = None,
    *,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """verl's custom reward function. ``preset``/``overrides`` may come from verl's reward_kwargs;
    otherwise the preset recorded by the engine in ``extra_info`` (``reward_preset``) is used."""
    stats, missing = _stats_from(extra_info)
    if missing:
        logger.warning("compute_score: episode statistics missing from extra_info; scoring as no answer")
    name = preset or stats.get("reward_preset") or "paper"
    merged = {**(stats.get("reward_overrides") or {}), **(overrides or {})}
    cfg = reward_config(str(name), merged)
    return score_stats(stats, cfg, stats_missing=missing)


def score_episode(result: Any, script: Any) -> dict[str, float]:
    """The reward breakdown of one finished episode (an ``EpisodeResult`` of the episode engine)
    for its ``EpisodeScript``: the same call verl makes, with the same arguments."""
    return compute_score(DATA_SOURCE, result.transcript_text(), script.gold_answer or "", dict(result.extra_fields()))


__all__ = ["DATA_SOURCE", "REQUIRED_KEYS", "SCORE_KEYS", "compute_score", "score_episode", "score_stats"]
