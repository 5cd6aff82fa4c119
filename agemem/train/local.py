"""The local GRPO trainer: one transformers model on CPU or one GPU, the same episode engine as verl.

Each step samples ``tasks_per_batch`` episode scripts, runs ``rollouts_per_prompt`` trajectories
per script through the episode engine against :class:`LocalTokenServer` (verl's server-manager
interface), scores them with ``agemem.reward.score.compute_score``, computes step-wise GRPO
advantages with verl's ``core_algos`` (one reward per trajectory, broadcast to its segments),
and takes one optimiser step on verl's clipped policy loss plus the KL loss. Checkpoints are
atomic per step; a re-run resumes from the newest one (weights, optimiser, RNG, history).
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import statistics
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agemem.agent.episode import EpisodeEngine
from agemem.data.episodes_io import read_episodes
from agemem.data.hotpot import require_labelled
from agemem.digests import stable_seed
from agemem.data.records import EpisodeScript
from agemem.reward.score import score_episode
from agemem.settings import Settings
from agemem.tracking.runs import log_metrics
from agemem.train import checkpoint as ckpt
from agemem.train.alarms import CollapseMonitor
from agemem.train.models import load_policy_model, load_tokenizer, model_card_lines, resolve_device
from agemem.train.metrics import step_metrics, trajectory_metrics
from agemem.train.run import (
    RolloutProgress,
    TrainResult,
    claim_checkpoint_root,
    config_hash,
    local_checkpoint_root,
)
from agemem.train.token_server import LocalTokenServer

logger = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One trajectory: its script, group (prompt), engine result and reward breakdown."""

    script: EpisodeScript
    group: str
    trajectory_id: str
    result: Any
    scores: dict[str, float]

    @property
    def reward(self) -> float:
        return float(self.scores["score"])


def output_root(settings: Settings) -> Path:
    """``<train.output_dir>/local/<config hash>``: checkpoints belong to one training configuration,
    so a run with another seed, learning rate or LoRA rank starts fresh instead of resuming this one."""
    return local_checkpoint_root(settings)


def batch_indices(num_episodes: int, step: int, batch: int, seed: int) -> list[int]:
    """Episodes for 0-based ``step``: consecutive slices of a per-epoch seeded permutation."""
    out: list[int] = []
    for pos in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(pos, num_episodes)
        out.append(int(np.random.RandomState(seed + epoch).permutation(num_episodes)[offset]))
    return out


def load_train_episodes(path: Path) -> list[EpisodeScript]:
    episodes = read_episodes(Path(path))
    train = [e for e in episodes if e.split == "train"] or episodes
    if not train:
        raise ValueError(f"no episodes in {path}")
    require_labelled(train, "training")
    return train


def wrap_lora(model: Any, settings: Settings) -> Any:
    from peft import LoraConfig, get_peft_model

    t = settings.train
    target: Any = t.lora_target_modules
    if target != "all-linear":
        target = [m.strip() for m in target.split(",") if m.strip()]
    config = LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, target_modules=target, lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


@dataclass
class TrainablePolicy:
    """The policy being trained: tokenizer, model (LoRA-wrapped when ``lora``) and, for a full
    fine-tune with a KL term, a frozen reference copy (with LoRA the reference is the adapter-free base)."""

    tokenizer: Any
    model: Any
    ref: Any | None
    lora: bool


def trainable_policy(settings: Settings, device: str, *, reference: bool) -> TrainablePolicy:
    """``train.model`` on ``device``, LoRA-wrapped when ``train.lora_rank > 0`` (GRPO and warm start)."""
    tokenizer = load_tokenizer(settings)
    base = load_policy_model(settings, tokenizer, device=device)
    if settings.train.lora_rank > 0:
        return TrainablePolicy(tokenizer, wrap_lora(base, settings), None, True)
    # Without adapters the reference must be a frozen copy of the initial weights.
    ref = copy.deepcopy(base).eval().requires_grad_(False) if reference else None
    return TrainablePolicy(tokenizer, base, ref, False)


def rollout_metrics(rollouts: list[Rollout]) -> dict[str, float]:
    """The step's rollout metrics (:mod:`agemem.train.metrics`, the names verl logs too) and token counts."""
    out = step_metrics([trajectory_metrics(r.result.extra_fields(), r.scores) for r in rollouts])
    out["tokens/model"] = float(sum(sum(sum(s.response_mask) for s in r.result.segments) for r in rollouts))
    out["tokens/total"] = float(sum(sum(len(s.prompt_ids) + len(s.response_ids) for s in r.result.segments)
                                    for r in rollouts))
    out["episode/segments"] = float(statistics.fmean(len(r.result.segments) for r in rollouts))
    return out


class LocalTrainer:
    """Holds the model, optimiser, engine and token server for one training run."""

    def __init__(self, settings: Settings, episodes: list[EpisodeScript], *, mlflow_run_id: str | None = None,
                 progress: RolloutProgress | None = None):
        import torch

        self.settings = settings
        self.episodes = episodes
        self.mlflow_run_id = mlflow_run_id
        self.progress = progress
        torch.set_num_threads(settings.train.torch_threads)
        self.device = resolve_device(settings.train.device)
        self.root = output_root(settings)
        policy = trainable_policy(settings, self.device, reference=settings.train.kl_coef > 0)
        self.tokenizer, self.model, self.ref_model, self.lora = policy.tokenizer, policy.model, policy.ref, policy.lora
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.failed: list[dict[str, Any]] = []
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.train.lr)
        self.state = ckpt.TrainerState()
        claim_checkpoint_root(self.root, settings)
        latest = ckpt.latest_checkpoint(self.root)
        if latest is not None:
            self.state = ckpt.load_checkpoint(latest, model=self.model, optimizer=self.optimizer, device=self.device)
            logger.info("resuming from %s (step %d)", latest, self.state.step)
        else:
            torch.manual_seed(settings.train.seed)
        self.server = LocalTokenServer.from_settings(self.model, self.tokenizer, settings, device=self.device)

    # -- rollouts -----------------------------------------------------------------------------

    async def rollouts(self, engine: EpisodeEngine, scripts: list[EpisodeScript], step: int) -> list[Rollout]:
        """``rollouts_per_prompt`` trajectories per script, concurrently; a trajectory that raises is
        logged as failed with its reason and left out of the update (never an exception out of the step)."""

        finished = 0

        async def one(script: EpisodeScript, k: int) -> Rollout:
            nonlocal finished
            trajectory_id = f"{script.episode_id}-s{step}-r{k}-{uuid.uuid4().hex[:8]}"
            try:
                # Per trajectory: reproducible from train.seed although batched decoding interleaves draws.
                seed = stable_seed(self.settings.train.seed, step, script.episode_id, k)
                result = await engine.run_tokens(script, self.server, request_id=trajectory_id,
                                                 sampling_overrides={"seed": seed})
                return Rollout(script, f"{script.episode_id}#{step}", trajectory_id, result,
                               score_episode(result, script))
            finally:
                finished += 1
                if self.progress is not None:
                    self.progress(step, finished, len(jobs))

        n = self.settings.train.rollouts_per_prompt
        jobs = [(script, k) for script in scripts for k in range(n)]
        done = await asyncio.gather(*(one(script, k) for script, k in jobs), return_exceptions=True)
        rollouts: list[Rollout] = []
        self.failed = []
        for (script, k), item in zip(jobs, done):
            if isinstance(item, BaseException):
                if not isinstance(item, Exception):
                    raise item  # cancellation / interrupt: not a rollout failure
                reason = f"{type(item).__name__}: {item}"
                logger.warning("step %d: trajectory %d of episode %s failed and is left out: %s", step, k,
                               script.episode_id, reason)
                self.failed.append({"episode_id": script.episode_id, "rollout": k, "reason": reason})
            else:
                rollouts.append(item)
        if not rollouts:
            raise RuntimeError(f"step {step}: every trajectory failed; first reason: {self.failed[0]['reason']}")
        return rollouts

    # -- update -------------------------------------------------------------------------------

    def _ref_context(self) -> Any:
        return self.model.disable_adapter() if self.lora else nullcontext()

    def update(self, rollouts: list[Rollout]) -> dict[str, float]:
        """One GRPO update on the step's rollouts: step-wise advantages, verl's clipped loss + KL."""
        # grpo wraps verl's core_algos; imported here so importing this module (the CLI, flows,
        # evaluation) does not pay verl's import.
        from agemem.train import grpo

        advantages = grpo.trajectory_advantages([r.reward for r in rollouts], [r.group for r in rollouts],
                                                norm_by_std=self.settings.train.norm_adv_by_std)
        items = [
            grpo.segment_item(seg.prompt_ids, seg.response_ids, seg.response_mask,
                              advantage=adv, trajectory=r.trajectory_id, group=r.group)
            for r, adv in zip(rollouts, advantages)
            for seg in r.result.segments
        ]
        items = [it for it in items if it.num_tokens > 0]
        total_tokens = sum(it.num_tokens for it in items)
        metrics: dict[str, float] = {"train/segments": float(len(items)), "train/model_tokens": float(total_tokens),
                                     "train/advantage_abs_mean": float(np.mean(np.abs(advantages))) if advantages else 0.0}
        if total_tokens == 0:
            logger.warning("no model tokens in this batch; skipping the update")
            return metrics
        self.model.train()
        self._reference_log_probs(items)
        metrics.update(self._optimise(items, total_tokens))
        return metrics

    def _reference_log_probs(self, items: list[Any]) -> None:
        import torch

        from agemem.train import grpo

        if self.settings.train.kl_coef <= 0:
            return
        temperature = self.settings.episode.temperature
        with torch.no_grad(), self._ref_context():
            ref = self.ref_model if self.ref_model is not None else self.model
            for it in items:
                it.ref_log_probs = grpo.token_log_probs(ref, it, device=self.device, temperature=temperature)

    def _optimise(self, items: list[Any], total_tokens: int) -> dict[str, float]:
        """``train.ppo_epochs`` optimiser steps over ``items``; a non-finite gradient skips its step."""
        import torch

        from agemem.train import grpo

        t = self.settings.train
        temperature = self.settings.episode.temperature  # the rollouts' (verl's actor does the same)
        config = grpo.policy_loss_config(t.clip_ratio, total_tokens=total_tokens, total_rows=len(items))
        sums: dict[str, float] = {}
        metrics: dict[str, float] = {}
        entropy_sum = 0.0
        for epoch in range(t.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            loss_total = 0.0
            for it in items:
                if epoch == 0:
                    log_probs, entropy = grpo.token_log_probs(self.model, it, device=self.device, with_entropy=True,
                                                              temperature=temperature)
                    # One optimiser step per epoch: before it, the current policy IS the old policy.
                    it.old_log_probs = log_probs.detach()
                    entropy_sum += float(entropy.sum())
                else:
                    log_probs = grpo.token_log_probs(self.model, it, device=self.device, temperature=temperature)
                loss, m = grpo.segment_loss(log_probs, it, config=config, kl_coef=t.kl_coef, kl_loss_type=t.kl_loss_type)
                loss.backward()
                loss_total += float(loss.detach())
                for key, value in m.items():
                    # pg_loss / kl_loss are already scaled to the batch token-mean; the rest are per segment.
                    sums[key] = sums.get(key, 0.0) + (value if key in ("pg_loss", "kl_loss")
                                                      else value * it.num_tokens / total_tokens)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip))
            if math.isfinite(grad_norm) and math.isfinite(loss_total):
                self.optimizer.step()
                self.server.invalidate()  # a cache of the old weights must never serve a rollout
            else:
                self.optimizer.zero_grad(set_to_none=True)
                metrics["train/skipped_updates"] = metrics.get("train/skipped_updates", 0.0) + 1
                logger.warning("step %d: non-finite loss %s / gradient norm %s: this update is skipped",
                               self.state.step + 1, loss_total, grad_norm)
            metrics["train/loss"] = loss_total
            metrics["train/grad_norm"] = grad_norm
        for key, value in sums.items():
            metrics[f"train/{key}"] = value / t.ppo_epochs
        metrics["train/entropy"] = entropy_sum / total_tokens
        return metrics

    # -- one step / the run -------------------------------------------------------------------

    async def step(self, engine: EpisodeEngine, step: int) -> dict[str, float]:
        """Rollouts, metrics and one update for ``step`` (1-based)."""
        t = self.settings.train
        started = time.perf_counter()
        self.server.stats.reset()
        idx = batch_indices(len(self.episodes), step - 1, t.tasks_per_batch, t.seed)
        rollouts = await self.rollouts(engine, [self.episodes[i] for i in idx], step)
        rollout_s = time.perf_counter() - started
        gen_s = self.server.stats.seconds
        metrics = {"step": float(step), **rollout_metrics(rollouts), "rollouts/failed": float(len(self.failed)),
                   "time/rollout_s": rollout_s, "time/generate_s": gen_s,
                   "time/engine_overhead_share": max(0.0, rollout_s - gen_s) / rollout_s if rollout_s else 0.0,
                   **self.server.stats.metrics()}
        t0 = time.perf_counter()
        metrics.update(self.update(rollouts))
        metrics["time/update_s"] = time.perf_counter() - t0
        metrics["time/step_s"] = time.perf_counter() - started
        return metrics

    async def run(self) -> TrainResult:
        t = self.settings.train
        engine = EpisodeEngine.from_settings(self.settings, tokenizer=self.tokenizer)
        monitor = CollapseMonitor.from_settings(t)
        try:
            while self.state.step < t.total_steps:
                step = self.state.step + 1
                metrics = await self.step(engine, step)
                alarms = monitor.check(metrics)
                metrics["alarms/count"] = float(len(alarms))
                for alarm in alarms:
                    logger.warning("step %d: collapse alarm: %s", step, alarm)
                if alarms and t.stop_on_collapse:
                    last = ckpt.latest_checkpoint(self.root)
                    logger.warning("train.stop_on_collapse: stopping at step %d; the last good checkpoint is %s",
                                   step, last)
                    self.log_mlflow(metrics, step)
                    break
                self.state.step = step
                self.state.history.append(metrics)
                if step % t.save_every == 0 or step == t.total_steps:
                    self.save(final=step == t.total_steps)
                ckpt.append_metrics(self.root, metrics)
                self.log_mlflow(metrics, step)
                logger.info("step %d/%d reward %.3f±%.3f loss %.4f entropy %.3f tool calls %.2f (%.1fs)", step,
                            t.total_steps, metrics["reward/mean"], metrics["reward/std"],
                            metrics.get("train/loss", float("nan")), metrics.get("train/entropy", float("nan")),
                            metrics.get("episode/tool_call_count", 0.0), metrics["time/step_s"])
        finally:
            await engine.aclose()
        return self.result()

    def save(self, *, final: bool) -> Path:
        card = [f"# agemem local GRPO checkpoint, step {self.state.step}", "",
                *model_card_lines(self.settings.train.model), f"- LoRA rank: {self.settings.train.lora_rank}"]
        last = self.state.history[-1] if self.state.history else {}
        card += ["", "Last step metrics:", "```json", json.dumps(last, indent=2), "```", ""]
        return ckpt.save_checkpoint(self.root, model=self.model, tokenizer=self.tokenizer, optimizer=self.optimizer,
                                    state=self.state, write_model=final or not self.lora, card="\n".join(card),
                                    keep=self.settings.train.keep_checkpoints)

    def log_mlflow(self, metrics: dict[str, float], step: int) -> None:
        if self.mlflow_run_id:
            log_metrics(self.settings, self.mlflow_run_id,
                                 {k: v for k, v in metrics.items() if k != "step"}, step=step)

    def result(self) -> TrainResult:
        latest = ckpt.latest_checkpoint(self.root)
        if latest is None:
            raise RuntimeError(f"no checkpoint written under {self.root}")
        model_dir, adapter_dir = ckpt.policy_dirs(latest)
        return TrainResult(
            backend="local",
            checkpoint_dir=model_dir or latest,
            model_dir=model_dir,
            adapter_dir=adapter_dir,
            steps=self.state.step,
            history=list(self.state.history),
            config_hash=config_hash(self.settings),
        )


def train_local(settings: Settings, episodes_path: Path, *, mlflow_run_id: str | None = None,
                progress: RolloutProgress | None = None) -> TrainResult:
    """Run (or resume) local GRPO training up to ``settings.train.total_steps``.

    ``progress(step, finished, total)`` is called as each rollout of a step finishes.
    """
    episodes = load_train_episodes(Path(episodes_path))
    trainer = LocalTrainer(settings, episodes, mlflow_run_id=mlflow_run_id, progress=progress)
    ckpt.rewrite_metrics(trainer.root, trainer.state.history)
    if trainer.state.step >= settings.train.total_steps:
        logger.info("already at step %d >= total_steps %d; nothing to do", trainer.state.step,
                    settings.train.total_steps)
        return trainer.result()
    return asyncio.run(trainer.run())
