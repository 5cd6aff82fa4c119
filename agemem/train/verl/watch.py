"""Watching a verl run from its console log: the rollout-vs-actor log-prob check after weight syncs.

LoRA with async vLLM has gone silently off-policy in verl before: the updated adapter never reached
the rollout engine, so the model that sampled is not the one trained. verl logs the per-token
difference between the rollout's and the actor's probabilities each step
(``training/rollout_probs_diff_mean``, with ``rollout.calculate_log_probs=true``); its console logger
prints every step as ``step:N - key:value - ...``. :class:`ProbsDiffWatch` reads those lines as
they stream and warns when the difference stays exactly zero (the rollout log-probs are not the
rollout's own) or explodes after a weight sync (the rollout serves other weights than the actor).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Callable

logger = logging.getLogger(__name__)

PROBS_DIFF_KEY = "training/rollout_probs_diff_mean"
#: Above this mean probability difference rollout and actor are different models (bf16 noise is ~1e-2).
EXPLODED_ABS = 0.1
#: ... or when it grew this much over the first step's (both engines then held the same weights).
EXPLODED_FACTOR = 10.0
ZERO_STEPS = 2

_STEP = re.compile(r"^step:(\d+)$")
# pprint renders numpy scalars as np.float64(0.01) under numpy 2, plain floats as 0.01.
_VALUE = re.compile(r"^(?:np\.\w+\()?(-?(?:[0-9.]+(?:e[-+]?\d+)?|nan|inf))\)?$")


def parse_console_metrics(line: str) -> tuple[int, dict[str, float]] | None:
    """``(step, metrics)`` of one verl console metrics line (``step:N - key:value - ...``), else None."""
    parts = line.strip().split(" - ")
    match = _STEP.match(parts[0])
    if match is None:
        return None
    metrics: dict[str, float] = {}
    for part in parts[1:]:
        key, sep, raw = part.rpartition(":")
        value = _VALUE.match(raw.strip())
        if sep and value:
            metrics[key] = float(value.group(1))
    return int(match.group(1)), metrics


class ProbsDiffWatch:
    """A line sink wrapper: passes lines on and warns about the rollout-vs-actor difference."""

    def __init__(self, sink: Callable[[str], None]) -> None:
        self.sink = sink
        self.history: list[tuple[int, float]] = []
        self.warnings: list[str] = []

    def __call__(self, line: str) -> None:
        self.sink(line)
        parsed = parse_console_metrics(line)
        if parsed is None or PROBS_DIFF_KEY not in parsed[1]:
            return
        step, value = parsed[0], parsed[1][PROBS_DIFF_KEY]
        if math.isfinite(value):
            self.history.append((step, value))
            self._check()

    def _warn(self, text: str) -> None:
        self.warnings.append(text)
        logger.warning(text)

    def _check(self) -> None:
        step, value = self.history[-1]
        recent = [v for _, v in self.history[-ZERO_STEPS:]]
        if len(recent) == ZERO_STEPS and all(v == 0.0 for v in recent):
            self._warn(f"step {step}: {PROBS_DIFF_KEY} has been exactly 0 for {ZERO_STEPS} steps: the rollout "
                       "log-probs are not the rollout engine's own (check rollout.calculate_log_probs)")
        first = self.history[0][1]
        if len(self.history) > 1 and (value > EXPLODED_ABS or (first > 0 and value > EXPLODED_FACTOR * first)):
            self._warn(f"step {step}: {PROBS_DIFF_KEY}={value:.4g} (step {self.history[0][0]}: {first:.4g}) after a "
                       "weight sync: the rollout engine may not serve the trained weights (LoRA sync to vLLM)")


__all__ = ["PROBS_DIFF_KEY", "ProbsDiffWatch", "parse_console_metrics"]
