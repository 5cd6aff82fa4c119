"""Per-question evaluation rows and their aggregates.

A row flattens one episode's statistics (``EpisodeStats``) and reward breakdown into plain
numbers; aggregates are means over rows (plus counts and rates). Names are stable: they become
MLflow metrics and registry tags (``judge_score`` is J, the champion gate's default metric).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Sequence

from agemem.agent.tools import MEMORY_TOOL_NAMES

STAGES = ("1", "2", "3")
LONG_TERM = {"Add_memory", "Update_memory", "Delete_memory"}


def episode_row(stats: Mapping[str, Any], scores: Mapping[str, float] | None, *, split: str = "eval",
                error: str | None = None) -> dict[str, Any]:
    """One question's row from ``EpisodeStats.model_dump()`` and ``compute_score``'s dict.

    ``error``: the episode could not run (policy endpoint down, ...); the row scores 0 and says why.
    """
    tool_calls = {name: int(sum(outcomes.values())) for name, outcomes in (stats.get("tool_calls") or {}).items()}
    long_term = sum(n for name, n in tool_calls.items() if name in LONG_TERM)
    mq = stats.get("memory_quality")
    j = float(stats.get("judge_score") or 0.0)
    mq_value = float(mq) if mq is not None else None
    row: dict[str, Any] = {
        "episode_id": stats.get("episode_id", ""),
        "record_id": stats.get("record_id", ""),
        "split": split,
        "question": stats.get("question", ""),
        "gold_answer": stats.get("gold_answer"),
        "prediction": stats.get("final_answer"),
        "answered": bool(stats.get("answered")),
        "judge_score": j,
        "em": float(stats.get("em") or 0.0),
        "f1": float(stats.get("f1") or 0.0),
        "judge_source": stats.get("judge_source", "none"),
        "judge_fallback": bool(stats.get("judge_fallback")),
        "memory_quality": mq_value,
        "memory_quality_source": stats.get("memory_quality_source", "none"),
        "memory_quality_fallback": bool(stats.get("memory_quality_fallback")),
        # The reference's joint score: sqrt(answer * memory quality), 0 if either is 0.
        "joint": math.sqrt(j * mq_value) if mq_value and j > 0 else 0.0,
        "reward": float((scores or {}).get("score", 0.0)),
        "tool_calls": tool_calls,
        "tool_call_count": int(stats.get("tool_call_count") or 0),
        "tool_error_count": int(stats.get("tool_error_count") or 0),
        "long_term_memory_calls": long_term,
        "short_term_memory_calls": sum(tool_calls.values()) - long_term,
        "memory_tool_calls": sum(n for name, n in tool_calls.items() if name in MEMORY_TOOL_NAMES),
        "format_errors": int(stats.get("format_error_count") or 0),
        "rounds": int(stats.get("total_rounds") or 0),
        "stage3_rounds": int(stats.get("stage3_rounds") or 0),
        "overflow_events": int(stats.get("overflow_count") or 0),
        "prompt_tokens_max": int(stats.get("prompt_tokens_max") or 0),
        "memories_final": len(stats.get("memories_final") or []),
        "wall_s": float(stats.get("wall_s") or 0.0),
        "error": error,
    }
    for stage in STAGES:
        row[f"model_tokens_stage{stage}"] = int((stats.get("model_tokens") or {}).get(stage, 0))
        row[f"injected_tokens_stage{stage}"] = int((stats.get("injected_tokens") or {}).get(stage, 0))
    for key, value in (scores or {}).items():
        if key != "score":
            row[f"reward.{key}"] = float(value)
    return row


def error_row(episode: Any, error: str, *, split: str = "eval") -> dict[str, Any]:
    """A row for an episode that failed to run: zero scores, the reason kept."""
    stats = {"episode_id": episode.episode_id, "record_id": episode.record_id, "question": episode.question,
             "gold_answer": episode.gold_answer, "judge_source": "error"}
    return episode_row(stats, None, split=split, error=error)


def _mean(values: Sequence[float]) -> float:
    return float(statistics.fmean(values)) if values else 0.0


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Means over rows (memory quality over rows that have one) plus counts and rates."""
    n = len(rows)
    out: dict[str, float] = {"n": float(n)}
    if not n:
        return out
    for key in ("judge_score", "em", "f1", "joint", "reward", "tool_call_count", "tool_error_count",
                "long_term_memory_calls", "short_term_memory_calls", "format_errors", "rounds", "stage3_rounds",
                "overflow_events", "prompt_tokens_max", "memories_final", "wall_s"):
        out[key] = _mean([float(r.get(key) or 0.0) for r in rows])
    for stage in STAGES:
        for kind in ("model_tokens", "injected_tokens"):
            key = f"{kind}_stage{stage}"
            out[key] = _mean([float(r.get(key) or 0.0) for r in rows])
    mq = [float(r["memory_quality"]) for r in rows if r.get("memory_quality") is not None]
    out["memory_quality"] = _mean(mq)
    out["answered_rate"] = _mean([float(bool(r.get("answered"))) for r in rows])
    out["judge_fallback_rate"] = _mean([float(bool(r.get("judge_fallback"))) for r in rows])
    out["judge_fallbacks"] = float(sum(bool(r.get("judge_fallback")) for r in rows))
    out["errors"] = float(sum(1 for r in rows if r.get("error")))
    names = sorted({name for r in rows for name in (r.get("tool_calls") or {})})
    for name in names:
        out[f"tools.{name}"] = _mean([float((r.get("tool_calls") or {}).get(name, 0)) for r in rows])
    reward_keys = sorted({k for r in rows for k in r if k.startswith("reward.")})
    for key in reward_keys:
        out[key] = _mean([float(r.get(key) or 0.0) for r in rows])
    return out


__all__ = ["aggregate", "episode_row", "error_row"]
