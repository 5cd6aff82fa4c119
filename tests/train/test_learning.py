"""Does training move the policy the right way? GRPO's update on real segments and the warm start.

The update tests build two trajectories of one GRPO group from real tokens (the same prompt and
injected turn, different model replies, rewards 1 and 0) and take one real ``LocalTrainer.update``.
The high-reward reply must become more likely relative to the low-reward one. The same check is
run with the advantage sign flipped and with the response mask flipped, and must then fail: the
check can tell a correct update from the two classic bugs.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from agemem.agent.context import ChatTokenizer
from agemem.agent.segments import Segment
from agemem.settings import Settings
from agemem.train import grpo
from agemem.train.local import LocalTrainer, Rollout


@dataclass
class _Result:
    segments: list[Segment]


def _rollouts(trainer: LocalTrainer, script: Any) -> list[Rollout]:
    tok = ChatTokenizer(trainer.tokenizer)
    prompt = tok.prompt_ids([{"role": "user", "content": "Store the fact: the sky is blue."}])
    injected = tok.delta_ids([{"role": "user", "content": "ok"}], last_response_ids=[tok.eos_id])
    good = tok.encode('<tool_call>{"name": "Add_memory"}</tool_call>')
    bad = tok.encode("plain text with no tags at all")
    out = []
    for reply, reward in ((good, 1.0), (bad, 0.0)):
        seg = Segment(prompt_ids=prompt)
        seg.extend(injected, 0)
        seg.extend(reply, 1)
        out.append(Rollout(script, "group-0", f"traj-{reward}", _Result([seg]),
                           {"score": reward}))  # type: ignore[arg-type]
    return out


def _reply_log_prob(trainer: LocalTrainer, rollout: Rollout) -> float:
    seg = rollout.result.segments[0]
    item = grpo.segment_item(seg.prompt_ids, seg.response_ids, seg.response_mask, advantage=0.0,
                             trajectory="x", group="g")
    with torch.no_grad():
        return float(grpo.token_log_probs(trainer.model, item, device=trainer.device).sum())


def preference_gain(settings: Settings, episodes: list[Any], updates: int = 3) -> float:
    """How much more likely the rewarded reply became, relative to the unrewarded one (nats)."""
    trainer = LocalTrainer(settings, episodes)
    rollouts = _rollouts(trainer, episodes[0])
    before = [_reply_log_prob(trainer, r) for r in rollouts]
    for _ in range(updates):
        trainer.update(rollouts)
    after = [_reply_log_prob(trainer, r) for r in rollouts]
    return (after[0] - before[0]) - (after[1] - before[1])


@pytest.fixture
def learning_settings(tiny_train_settings: Settings) -> Settings:
    train = tiny_train_settings.train.model_copy(update={"lr": 5e-3, "kl_coef": 0.0, "lora_rank": 0})
    return tiny_train_settings.model_copy(update={"train": train})


def test_grpo_update_prefers_the_rewarded_reply(learning_settings: Settings, train_scripts: list[Any]) -> None:
    assert preference_gain(learning_settings, train_scripts) > 1.0


def test_the_check_fails_with_a_flipped_advantage_sign(learning_settings: Settings, train_scripts: list[Any],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real = grpo.trajectory_advantages
    monkeypatch.setattr(grpo, "trajectory_advantages",
                        lambda rewards, groups, **kw: [-a for a in real(rewards, groups, **kw)])
    assert preference_gain(learning_settings, train_scripts) < 1.0


def test_the_check_fails_with_a_flipped_response_mask(learning_settings: Settings, train_scripts: list[Any],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real = grpo.segment_item

    def flipped(prompt_ids, response_ids, response_mask, **kw):  # train on injected tokens, not the model's
        return real(prompt_ids, response_ids, [1 - m for m in response_mask], **kw)

    monkeypatch.setattr(grpo, "segment_item", flipped)
    assert preference_gain(learning_settings, train_scripts) < 1.0


def test_the_update_scores_tokens_under_the_sampling_temperature(learning_settings: Settings,
                                                                 train_scripts: list[Any]) -> None:
    """GRPO's log-probs are those of the distribution the rollouts were sampled from (logits / T, as
    verl's actor computes them); at T = 1 it would optimise another policy than the one that acted."""
    episode = learning_settings.episode.model_copy(update={"temperature": 0.5})
    settings = learning_settings.model_copy(update={"episode": episode})
    trainer = LocalTrainer(settings, train_scripts)
    seg = _rollouts(trainer, train_scripts[0])[0].result.segments[0]
    item = grpo.segment_item(seg.prompt_ids, seg.response_ids, seg.response_mask, advantage=0.0,
                             trajectory="x", group="g")
    ids = torch.tensor([item.input_ids])
    positions = torch.tensor(item.target_positions)
    with torch.no_grad():
        logits = trainer.model(input_ids=ids).logits[0, positions].float()
        expected = torch.log_softmax(logits / 0.5, dim=-1).gather(-1, ids[0, positions + 1].unsqueeze(-1)).squeeze(-1)
    trainer._optimise([item], item.num_tokens)  # records the pre-update (old) log-probs on the item
    assert torch.allclose(item.old_log_probs, expected, atol=1e-5)
