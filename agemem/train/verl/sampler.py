"""Per-step rollout metrics for verl's V1 trainer, through verl's own sampler hook.

verl 0.9.1's V1 trainer logs, each step, only what its own code computes (``critic/score``, lengths,
timings) plus the metrics dict its replay buffer's ``sample()`` returns. The replay buffer is
pluggable (``trainer.v1.sampler.custom_sampler.{path,name}``), so :class:`RolloutMetricsReplayBuffer`
is verl's sync ``ReplayBuffer`` unchanged, whose ``sample()`` also reads the sampled rows'
``extra_fields`` from TransferQueue (the episode statistics the agent loop put there and the reward
breakdown verl's reward loop added as ``reward_extra_info``) and adds the local trainer's metric
names (:mod:`agemem.train.metrics`) plus what only segments show:

- ``rollout/segments_per_trajectory``, ``rollout/truncated_segments`` (segments cut to verl's lengths);
- ``rollout/single_trajectory_groups``: groups left with one trajectory, where GRPO's advantage is
  the raw score (mean 0, std 1) instead of a comparison.

verl's tracking logs them beside its own at the same step (console, MLflow).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Mapping, Sequence

import transfer_queue as tq
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

from agemem.train.metrics import step_metrics, trajectory_metrics

logger = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """TransferQueue hands non-tensor fields back wrapped (``NonTensorData``) or plain."""
    return getattr(value, "data", value)


def segment_rollout_metrics(keys: Sequence[str], extra_fields: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Step metrics from the rows of one step: ``keys`` are verl's ``{uid}_{session}_{index}``.

    Every segment of a trajectory carries the episode statistics; the reward breakdown is read
    from its last segment (verl copies it to all of them).
    """
    last: dict[str, tuple[int, Mapping[str, Any]]] = {}
    segments: dict[str, int] = defaultdict(int)
    truncated = 0
    for key, fields in zip(keys, extra_fields, strict=True):
        uid, session, index = key.rsplit("_", 2)
        trajectory = f"{uid}_{session}"
        segments[trajectory] += 1
        truncated += int(bool(fields.get("truncated")))
        if trajectory not in last or last[trajectory][0] < int(index):
            last[trajectory] = (int(index), fields)
    if not last:
        return {}
    rows = [trajectory_metrics(fields, fields.get("reward_extra_info") or {}) for _, fields in last.values()]
    per_group: dict[str, int] = defaultdict(int)
    for trajectory in last:
        per_group[trajectory.rsplit("_", 1)[0]] += 1
    out = step_metrics(rows)
    out.update({
        "rollout/trajectories": float(len(last)),
        "rollout/segments_per_trajectory": sum(segments.values()) / len(last),
        "rollout/truncated_segments": float(truncated),
        "rollout/single_trajectory_groups": float(sum(1 for n in per_group.values() if n == 1)),
    })
    return out


class RolloutMetricsReplayBuffer(ReplayBuffer):
    """verl's sync replay buffer; ``sample()`` also returns this step's rollout metrics."""

    def sample(self, global_steps: int, partition_id: str, batch_size: int) -> tuple[Any, dict]:
        batch, metrics = super().sample(global_steps=global_steps, partition_id=partition_id, batch_size=batch_size)
        if partition_id != "train" or not batch.keys:
            return batch, metrics
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
        # A tensordict LinkedList, a NonTensorStack or an array depending on the backend: list() takes all.
        fields = [_plain(f) or {} for f in list(data["extra_fields"])]
        metrics = {**metrics, **segment_rollout_metrics(batch.keys, fields)}
        logger.info("step %d: %d rollout metrics from %d rows", global_steps, len(metrics), len(batch.keys))
        return batch, metrics


__all__ = ["RolloutMetricsReplayBuffer", "segment_rollout_metrics"]
