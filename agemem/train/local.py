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

from agemem.data.records import EpisodeScript
from agemem.settings import Settings
from agemem.train import checkpoint as ckpt
from agemem.train.token_server import LocalTokenServer

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Where the newest checkpoint is and what the run did."""

    checkpoint_dir: Path
    adapter_dir: Path | None
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)


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


def resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def output_root(settings: Settings) -> Path:
    return settings.path(settings.train.output_dir) / "local"


def batch_indices(num_episodes: int, step: int, batch: int, seed: int) -> list[int]:
    """Episodes for 0-based ``step``: consecutive slices of a per-epoch seeded permutation."""
    out: list[int] = []
    for pos in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(pos, num_episodes)
        out.append(int(np.random.RandomState(seed + epoch).permutation(num_episodes)[offset]))
    return out


def load_train_episodes(path: Path) -> list[EpisodeScript]:
    from agemem.data.episodes_io import read_episodes

    episodes = read_episodes(Path(path))
    train = [e for e in episodes if e.split == "train"] or episodes
    if not train:
        raise ValueError(f"no episodes in {path}")
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


class LocalTrainer:
    """Holds the model, optimiser, engine and token server for one training run."""

    def __init__(self, settings: Settings, episodes: list[EpisodeScript], *, mlflow_run_id: str | None = None):
        import torch

        from agemem.train.tiny_model import load_policy_model, load_tokenizer

        self.settings = settings
        self.episodes = episodes
        self.mlflow_run_id = mlflow_run_id
        torch.set_num_threads(settings.train.torch_threads)
        self.device = resolve_device(settings.train.device)
        self.root = output_root(settings)
        self.tokenizer = load_tokenizer(settings)
        base = load_policy_model(settings, self.tokenizer, device=self.device)
        self.lora = settings.train.lora_rank > 0
        self.ref_model = None
        if self.lora:
            self.model = wrap_lora(base, settings)
        else:
            self.model = base
            if settings.train.kl_coef > 0:
                # Without adapters the reference must be a frozen copy of the initial weights.
                self.ref_model = copy.deepcopy(base).eval().requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.train.lr)
        self.state = ckpt.TrainerState()
        latest = ckpt.latest_checkpoint(self.root)
        if latest is not None:
            self.state = ckpt.load_checkpoint(latest, model=self.model, optimizer=self.optimizer, device=self.device)
            logger.info("resuming from %s (step %d)", latest, self.state.step)
        else:
            torch.manual_seed(settings.train.seed)
        self.server = LocalTokenServer.from_settings(self.model, self.tokenizer, settings, device=self.device)

    # -- rollouts -----------------------------------------------------------------------------

    async def rollouts(self, engine: Any, scripts: list[EpisodeScript], step: int) -> list[Rollout]:
        from agemem.agent.runner import run_episode
        from agemem.data.parquet import DATA_SOURCE
        from agemem.reward.score import compute_score

        async def one(script: EpisodeScript, k: int) -> Rollout:
            trajectory_id = f"{script.episode_id}-s{step}-r{k}-{uuid.uuid4().hex[:8]}"
            result = await run_episode(engine, script, self.server, trajectory_id=trajectory_id)
            scores = compute_score(
                data_source=DATA_SOURCE,
                solution_str=result.transcript_text(),
                ground_truth=script.gold_answer or "",
                extra_info=dict(result.extra_fields()),
            )
            return Rollout(script, f"{script.episode_id}#{step}", trajectory_id, result, scores)

        n = self.settings.train.rollouts_per_prompt
        jobs = [one(script, k) for script in scripts for k in range(n)]
        return list(await asyncio.gather(*jobs))

    # -- update -------------------------------------------------------------------------------

    def _ref_context(self) -> Any:
        return self.model.disable_adapter() if self.lora else nullcontext()

    def update(self, rollouts: list[Rollout]) -> dict[str, float]:
        import torch

        # grpo wraps verl's core_algos; imported here so importing this module (the CLI, flows,
        # evaluation) does not pay verl's import.
        from agemem.train import grpo

        t = self.settings.train
        advantages = grpo.trajectory_advantages([r.reward for r in rollouts], [r.group for r in rollouts])
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
        if t.kl_coef > 0:
            with torch.no_grad(), self._ref_context():
                ref = self.ref_model if self.ref_model is not None else self.model
                for it in items:
                    it.ref_log_probs = grpo.token_log_probs(ref, it, device=self.device)
        config = grpo.policy_loss_config(t.clip_ratio, total_tokens=total_tokens, total_rows=len(items))
        sums: dict[str, float] = {}
        for epoch in range(t.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            loss_total = 0.0
            for it in items:
                log_probs = grpo.token_log_probs(self.model, it, device=self.device)
                if epoch == 0:
                    # One optimiser step per epoch: before it, the current policy IS the old policy.
                    it.old_log_probs = log_probs.detach()
                loss, m = grpo.segment_loss(log_probs, it, config=config, kl_coef=t.kl_coef, kl_loss_type=t.kl_loss_type)
                loss.backward()
                loss_total += float(loss.detach())
                weight = it.num_tokens / total_tokens
                for key, value in m.items():
                    if key not in ("pg_loss", "kl_loss"):
                        sums[key] = sums.get(key, 0.0) + value * weight
                    else:
                        sums[key] = sums.get(key, 0.0) + value  # already scaled to the batch token-mean
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip)
            self.optimizer.step()
            self.server.invalidate()  # issue 12: cached K/V of the old weights must never serve a rollout
            metrics["train/loss"] = loss_total
            metrics["train/grad_norm"] = float(grad_norm)
        for key, value in sums.items():
            metrics[f"train/{key}"] = value / t.ppo_epochs
        if not math.isfinite(metrics["train/loss"]):
            raise FloatingPointError(f"non-finite loss {metrics['train/loss']} at step {self.state.step + 1}")
        return metrics

    # -- one step / the run -------------------------------------------------------------------

    def rollout_metrics(self, rollouts: list[Rollout]) -> dict[str, float]:
        rewards = [r.reward for r in rollouts]
        out: dict[str, float] = {
            "reward/mean": float(statistics.fmean(rewards)),
            "reward/std": float(statistics.pstdev(rewards)) if len(rewards) > 1 else 0.0,
        }
        for key in rollouts[0].scores:
            if key != "score":
                out[f"reward/{key}"] = float(statistics.fmean(r.scores[key] for r in rollouts))
        tools: dict[str, float] = {}
        for r in rollouts:
            stats = r.result.stats
            for name, outcomes in (getattr(stats, "tool_calls", None) or {}).items():
                tools[name] = tools.get(name, 0.0) + sum(outcomes.values())
        for name, count in tools.items():
            out[f"tools/{name}"] = count / len(rollouts)
        for attr in ("tool_call_count", "tool_error_count", "format_error_count", "total_rounds", "overflow_count"):
            values = [float(getattr(r.result.stats, attr, 0) or 0) for r in rollouts]
            out[f"episode/{attr}"] = float(statistics.fmean(values))
        out["tokens/model"] = float(sum(sum(sum(s.response_mask) for s in r.result.segments) for r in rollouts))
        out["tokens/total"] = float(sum(sum(len(s.prompt_ids) + len(s.response_ids) for s in r.result.segments)
                                        for r in rollouts))
        out["episode/segments"] = float(statistics.fmean(len(r.result.segments) for r in rollouts))
        return out

    async def run(self) -> TrainResult:
        from agemem.agent.runner import build_engine

        t = self.settings.train
        engine, closers = await build_engine(self.settings, tokenizer=self.tokenizer)
        try:
            while self.state.step < t.total_steps:
                step = self.state.step + 1
                started = time.perf_counter()
                self.server.stats.reset()
                idx = batch_indices(len(self.episodes), step - 1, t.tasks_per_batch, t.seed)
                rollouts = await self.rollouts(engine, [self.episodes[i] for i in idx], step)
                rollout_s = time.perf_counter() - started
                metrics = {"step": float(step), **self.rollout_metrics(rollouts)}
                gen_s = self.server.stats.seconds
                metrics.update({"time/rollout_s": rollout_s, "time/generate_s": gen_s,
                                "time/engine_overhead_share": max(0.0, rollout_s - gen_s) / rollout_s if rollout_s else 0.0})
                metrics.update(self.server.stats.metrics())  # issue 12: prefix-cache hit rate, cached tokens
                t0 = time.perf_counter()
                metrics.update(self.update(rollouts))
                metrics["time/update_s"] = time.perf_counter() - t0
                metrics["time/step_s"] = time.perf_counter() - started
                self.state.step = step
                self.state.history.append(metrics)
                if step % t.save_every == 0 or step == t.total_steps:
                    self.save(final=step == t.total_steps)
                self.append_metrics(metrics)
                self.log_mlflow(metrics, step)
                logger.info("step %d/%d reward %.3f±%.3f loss %.4f (%.1fs)", step, t.total_steps,
                            metrics["reward/mean"], metrics["reward/std"], metrics.get("train/loss", float("nan")),
                            metrics["time/step_s"])
        finally:
            for close in closers:
                await close()
        return self.result()

    def save(self, *, final: bool) -> Path:
        from agemem.train.tiny_model import RANDOM_WEIGHTS_NOTE, base_model_lines, is_tiny

        card = [f"# agemem local GRPO checkpoint, step {self.state.step}", "",
                *base_model_lines(self.settings.train.model), f"- LoRA rank: {self.settings.train.lora_rank}"]
        if is_tiny(self.settings.train.model):
            card += ["", f"**{RANDOM_WEIGHTS_NOTE}**"]
        last = self.state.history[-1] if self.state.history else {}
        card += ["", "Last step metrics:", "```json", json.dumps(last, indent=2), "```", ""]
        return ckpt.save_checkpoint(self.root, model=self.model, tokenizer=self.tokenizer, optimizer=self.optimizer,
                                    state=self.state, write_model=final or not self.lora, card="\n".join(card),
                                    keep=self.settings.train.keep_checkpoints)

    def append_metrics(self, metrics: dict[str, float]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(metrics) + "\n")

    def rewrite_metrics(self) -> None:
        """On resume, metrics.jsonl is made to match the checkpoint's history (no duplicate steps)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / ".metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(m) + "\n" for m in self.state.history))
        tmp.replace(self.root / "metrics.jsonl")

    def log_mlflow(self, metrics: dict[str, float], step: int) -> None:
        if not self.mlflow_run_id:
            return
        import mlflow
        from mlflow.entities import Metric

        client = mlflow.MlflowClient(tracking_uri=self.settings.tracking_uri)
        now = int(time.time() * 1000)
        batch = [Metric(key=k, value=float(v), timestamp=now, step=step) for k, v in metrics.items()
                 if k != "step" and math.isfinite(float(v))]
        client.log_batch(self.mlflow_run_id, metrics=batch)

    def result(self) -> TrainResult:
        latest = ckpt.latest_checkpoint(self.root)
        if latest is None:
            raise RuntimeError(f"no checkpoint written under {self.root}")
        adapter = latest / "adapter"
        model_dir = latest / "model"
        # The HF model of a LoRA run is written on the final step; earlier steps carry the adapter.
        return TrainResult(
            checkpoint_dir=model_dir if model_dir.is_dir() else latest,
            adapter_dir=adapter if adapter.is_dir() else None,
            steps=self.state.step,
            history=list(self.state.history),
        )


def train_local(settings: Settings, episodes_path: Path, *, mlflow_run_id: str | None = None) -> TrainResult:
    """Run (or resume) local GRPO training up to ``settings.train.total_steps``."""
    episodes = load_train_episodes(Path(episodes_path))
    trainer = LocalTrainer(settings, episodes, mlflow_run_id=mlflow_run_id)
    trainer.rewrite_metrics()
    if trainer.state.step >= settings.train.total_steps:
        logger.info("already at step %d >= total_steps %d; nothing to do", trainer.state.step,
                    settings.train.total_steps)
        return trainer.result()
    return asyncio.run(trainer.run())
