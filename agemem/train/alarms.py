"""Collapse alarms: the failure modes of multi-turn RL that a reward curve alone hides.

The model silently stops calling tools, its entropy collapses onto one reply, or the gradient
explodes (or turns NaN). :class:`CollapseMonitor` checks each step's metrics; the trainer logs
every alarm as a warning with the step and, with ``train.stop_on_collapse``, stops and keeps the
last good checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from agemem.settings import TrainSettings


@dataclass
class CollapseMonitor:
    """Stateful over steps: a tool-call rate of zero alarms only after the model had called tools."""

    entropy_min: float
    grad_norm_max: float
    patience: int
    _called_tools: bool = False
    _steps_without_tools: int = 0

    @classmethod
    def from_settings(cls, train: TrainSettings) -> "CollapseMonitor":
        return cls(train.collapse_entropy_min, train.collapse_grad_norm_max, train.collapse_patience)

    def check(self, metrics: Mapping[str, float]) -> list[str]:
        """The alarms this step's metrics raise (empty when healthy)."""
        alarms: list[str] = []
        rate = metrics.get("tools/any_call_rate")
        if rate is not None:
            if rate > 0:
                self._called_tools, self._steps_without_tools = True, 0
            elif self._called_tools:
                self._steps_without_tools += 1
                if self._steps_without_tools >= self.patience:
                    alarms.append(f"tool-call rate is 0 for {self._steps_without_tools} steps (it was > 0 before)")
        entropy = metrics.get("train/entropy")
        if entropy is not None and entropy < self.entropy_min:
            alarms.append(f"entropy collapse: {entropy:.4f} nats per token < {self.entropy_min}")
        grad_norm = metrics.get("train/grad_norm")
        if grad_norm is not None and not math.isfinite(grad_norm):
            alarms.append(f"gradient norm is {grad_norm}")
        elif grad_norm is not None and grad_norm > self.grad_norm_max:
            alarms.append(f"gradient norm {grad_norm:.1f} > {self.grad_norm_max} (exploding)")
        return alarms


__all__ = ["CollapseMonitor"]
