"""Step-wise GRPO math for the local trainer, delegated to verl's ``core_algos``.

The advantage is computed over ONE reward per trajectory (the group = the rollouts of one
prompt) and broadcast to every segment of that trajectory, exactly as verl 0.9.1's
``compute_advantage_for_multi_trajectories`` does for agent loops that return several outputs.
The loss is verl's ``vanilla`` clipped policy loss plus a KL loss to the reference, both
aggregated token-mean over the whole batch (micro-batches scale by the global token count,
as verl's ``global_batch_info`` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from verl.trainer.ppo import core_algos


@dataclass
class SegmentBatchItem:
    """One training row: a segment of a trajectory, its advantage and the model-token positions."""

    input_ids: list[int]
    target_positions: list[int]  # index t predicts input_ids[t + 1]; only model tokens (mask 1)
    advantage: float
    trajectory: str
    group: str
    old_log_probs: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.target_positions)


def trajectory_advantages(rewards: Sequence[float], groups: Sequence[str], *, norm_by_std: bool = True) -> list[float]:
    """GRPO outcome advantages, one per trajectory, grouped by prompt (verl's ``grpo`` estimator)."""
    if len(rewards) != len(groups):
        raise ValueError(f"{len(rewards)} rewards for {len(groups)} group ids")
    if not rewards:
        return []
    scores = torch.tensor([[float(r)] for r in rewards], dtype=torch.float32)
    mask = torch.ones_like(scores)
    estimator = core_algos.get_adv_estimator_fn(core_algos.AdvantageEstimator.GRPO)
    advantages, _ = estimator(
        token_level_rewards=scores,
        response_mask=mask,
        index=np.array(list(groups), dtype=object),
        norm_adv_by_std_in_grpo=norm_by_std,
    )
    return [float(a) for a in advantages[:, 0]]


def segment_item(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    response_mask: Sequence[int],
    *,
    advantage: float,
    trajectory: str,
    group: str,
) -> SegmentBatchItem:
    """Flatten a segment: logits at position p-1 predict token p; keep positions of mask-1 tokens."""
    if len(response_ids) != len(response_mask):
        raise ValueError(f"response of {len(response_ids)} tokens with a mask of {len(response_mask)}")
    offset = len(prompt_ids)
    positions = [offset + j - 1 for j, m in enumerate(response_mask) if m]
    return SegmentBatchItem(
        input_ids=list(prompt_ids) + list(response_ids),
        target_positions=positions,
        advantage=advantage,
        trajectory=trajectory,
        group=group,
    )


def token_log_probs(model: Any, item: SegmentBatchItem, *, device: str,
                    with_entropy: bool = False, temperature: float = 1.0) -> Any:
    """Log-probs of the model tokens of one segment (only those logits are materialised).

    ``temperature``: the rollouts' sampling temperature. Like verl's actor, the logits are divided
    by it, so GRPO optimises the distribution the trajectories were sampled from (at 1.0 it would
    push on another policy than the one that acted: off-policy at every step). 0 (greedy) counts as 1.
    ``with_entropy``: also the policy's entropy at those positions (detached), as
    ``(log_probs, entropy)``: the collapse signal verl logs as ``actor/entropy``.
    """
    if not item.target_positions:
        empty = torch.zeros(0, device=device)
        return (empty, empty) if with_entropy else empty
    input_ids = torch.tensor([item.input_ids], dtype=torch.long, device=device)
    positions = torch.tensor(item.target_positions, dtype=torch.long, device=device)
    # logits_to_keep with an index tensor computes the LM head only at those positions (vocab is 152k).
    logits = model(input_ids=input_ids, logits_to_keep=positions).logits[0].float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[0, positions + 1]
    log_softmax = torch.log_softmax(logits, dim=-1)
    log_probs = log_softmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return log_probs
    with torch.no_grad():
        entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    return log_probs, entropy


def policy_loss_config(clip_ratio: float, *, total_tokens: int, total_rows: int) -> Any:
    """The slice of verl's ActorConfig that ``compute_policy_loss_vanilla`` reads."""
    return OmegaConf.create(
        {
            "clip_ratio": clip_ratio,
            "clip_ratio_low": clip_ratio,
            "clip_ratio_high": clip_ratio,
            "clip_ratio_c": 3.0,
            "global_batch_info": {"dp_size": 1, "batch_num_tokens": total_tokens, "global_batch_size": total_rows},
        }
    )


def segment_loss(
    log_probs: torch.Tensor,
    item: SegmentBatchItem,
    *,
    config: Any,
    kl_coef: float,
    kl_loss_type: str,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl's clipped policy loss + KL loss for one segment, scaled to the batch's token-mean."""
    n = log_probs.shape[0]
    mask = torch.ones(1, n, device=log_probs.device)
    logp = log_probs.unsqueeze(0)
    old = (item.old_log_probs if item.old_log_probs is not None else log_probs.detach()).unsqueeze(0)
    adv = torch.full_like(logp, item.advantage)
    policy_loss_fn = core_algos.get_policy_loss_fn("vanilla")
    pg_loss, pg_metrics = policy_loss_fn(
        old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode="token-mean", config=config
    )
    loss = pg_loss
    metrics = {"pg_loss": float(pg_loss.detach()), **{k.split("/")[-1]: float(v) for k, v in pg_metrics.items()}}
    if kl_coef > 0 and item.ref_log_probs is not None:
        kl = core_algos.kl_penalty(logp, item.ref_log_probs.unsqueeze(0), kl_loss_type)
        kl_loss = core_algos.agg_loss(
            loss_mat=kl, loss_mask=mask, loss_agg_mode="token-mean", **config.global_batch_info
        )
        loss = loss + kl_coef * kl_loss
        metrics["kl_loss"] = float(kl_loss.detach())
    return loss, metrics
