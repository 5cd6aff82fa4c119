"""The rollout metrics every training step logs, with the same names for the local trainer and verl.

A trajectory is described by the episode statistics the engine recorded (``EpisodeResult.extra_fields()``,
which verl hands to ``compute_score`` as ``extra_info``) and its reward breakdown (``compute_score``'s
dict). :func:`trajectory_metrics` turns one trajectory into numbers; :func:`step_metrics` averages a
step's trajectories. These are the signals users of multi-turn RL watch first: the model silently
stops calling tools, parse failures climb, answers stop, the reward collapses.
"""

from __future__ import annotations

import statistics
from typing import Any, Mapping, Sequence

from agemem.agent.tools import TOOL_NAMES

#: Episode counters averaged per trajectory (``episode/<name>``).
EPISODE_COUNTERS: tuple[str, ...] = (
    "tool_call_count", "tool_error_count", "format_error_count", "total_rounds", "overflow_count",
)


def _num(value: Any) -> float:
    try:
        return float(value or 0)
    except (TypeError, ValueError):
        return 0.0


def trajectory_metrics(stats: Mapping[str, Any], scores: Mapping[str, Any]) -> dict[str, float]:
    """One trajectory's metrics from its episode statistics and its reward breakdown."""
    out: dict[str, float] = {f"reward/{key}": _num(value) for key, value in scores.items() if key != "score"}
    out["reward/score"] = _num(scores.get("score"))
    calls = stats.get("tool_calls") or {}
    for name in TOOL_NAMES:
        out[f"tools/{name}"] = float(sum((calls.get(name) or {}).values()))
    for key in EPISODE_COUNTERS:
        out[f"episode/{key}"] = _num(stats.get(key))
    rounds = max(1.0, _num(stats.get("total_rounds")))
    out["episode/parse_failure_rate"] = _num(stats.get("format_error_count")) / rounds
    out["episode/answered_rate"] = float(bool(stats.get("answered")))
    out["episode/response_tokens"] = float(sum(_num(v) for v in (stats.get("model_tokens") or {}).values()))
    out["tools/any_call_rate"] = float(_num(stats.get("tool_call_count")) > 0)
    return out


def step_metrics(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The means of a step's trajectory metrics, plus ``reward/mean`` and ``reward/std`` of the score."""
    if not rows:
        return {}
    keys = sorted({key for row in rows for key in row})
    out = {key: float(statistics.fmean(row.get(key, 0.0) for row in rows)) for key in keys}
    scores = [row.get("reward/score", 0.0) for row in rows]
    out["reward/mean"] = float(statistics.fmean(scores))
    out["reward/std"] = float(statistics.pstdev(scores)) if len(scores) > 1 else 0.0
    out.pop("reward/score", None)
    return out


__all__ = ["EPISODE_COUNTERS", "step_metrics", "trajectory_metrics"]
