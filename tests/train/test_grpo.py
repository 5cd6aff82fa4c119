"""GRPO math delegated to verl's core_algos: group normalisation, broadcast, loss, log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from agemem.settings import Settings
from agemem.train import grpo
from agemem.train.models import load_policy_model, load_tokenizer


def test_advantages_are_normalised_within_each_prompt_group() -> None:
    rewards = [1.0, 0.0, 0.5, 0.2, 0.2, 0.8]
    groups = ["a", "a", "a", "b", "b", "b"]
    adv = grpo.trajectory_advantages(rewards, groups)
    for g in ("a", "b"):
        vals = torch.tensor([r for r, gg in zip(rewards, groups) if gg == g])
        expected = ((vals - vals.mean()) / (vals.std() + 1e-6)).tolist()
        got = [a for a, gg in zip(adv, groups) if gg == g]
        assert got == pytest.approx(expected, abs=1e-5)
    # Equal rewards give no signal; a lone rollout gets its raw reward (verl's convention).
    assert grpo.trajectory_advantages([0.3, 0.3], ["x", "x"]) == pytest.approx([0.0, 0.0])
    assert grpo.trajectory_advantages([0.3], ["x"]) == pytest.approx([0.3])
    # Unscaled (Dr. GRPO, train.norm_adv_by_std=false): a noise-level difference stays noise-sized.
    unscaled = grpo.trajectory_advantages([0.575, 0.573], ["x", "x"], norm_by_std=False)
    assert unscaled == pytest.approx([0.001, -0.001], abs=1e-6)
    assert grpo.trajectory_advantages([0.575, 0.573], ["x", "x"]) == pytest.approx([0.707, -0.707], abs=1e-3)


def test_segment_item_keeps_only_model_token_positions() -> None:
    item = grpo.segment_item([10, 11, 12], [20, 21, 22, 23], [1, 0, 0, 1], advantage=0.5, trajectory="t", group="g")
    assert item.input_ids == [10, 11, 12, 20, 21, 22, 23]
    # logits at position p predict token p+1: tokens 20 (index 3) and 23 (index 6)
    assert item.target_positions == [2, 5]
    with pytest.raises(ValueError):
        grpo.segment_item([1], [2, 3], [1], advantage=0.0, trajectory="t", group="g")


def test_token_log_probs_match_a_full_forward(tiny_train_settings: Settings) -> None:
    tok = load_tokenizer(tiny_train_settings)
    model = load_policy_model(tiny_train_settings, tok, device="cpu")
    item = grpo.segment_item([5, 6, 7, 8], [9, 10, 11], [1, 0, 1], advantage=1.0, trajectory="t", group="g")
    got = grpo.token_log_probs(model, item, device="cpu")
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=torch.tensor([item.input_ids])).logits[0].float(), -1)
    expected = torch.stack([full[3, 9], full[5, 11]])
    assert torch.allclose(got.detach(), expected, atol=1e-5)


def test_segment_loss_is_the_batch_token_mean_and_pushes_towards_positive_advantage() -> None:
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    item = grpo.segment_item([1], [2, 3], [1, 1], advantage=2.0, trajectory="t", group="g")
    item.ref_log_probs = torch.tensor([-1.0, -2.0])
    config = grpo.policy_loss_config(0.2, total_tokens=4, total_rows=2)  # this segment has half the batch tokens
    loss, metrics = grpo.segment_loss(logp, item, config=config, kl_coef=0.1, kl_loss_type="low_var_kl")
    # ratio 1 -> pg loss = -A * (2 tokens / 4 batch tokens); KL 0 at the reference
    assert float(loss.detach()) == pytest.approx(-2.0 * 2 / 4)
    assert metrics["kl_loss"] == pytest.approx(0.0) and math.isfinite(metrics["pg_loss"])
    loss.backward()
    assert (logp.grad < 0).all()  # gradient descent raises the log-probs of positively-advantaged tokens
