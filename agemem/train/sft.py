"""Teacher warm start: supervised fine-tuning on the teacher trajectories the reward accepts.

A teacher (the deterministic scripted agent, or any LLM through the project's client) plays the
train episodes through the same episode engine (:meth:`EpisodeEngine.run_teacher`), so its
trajectories are recorded as the policy's own token segments with the masks GRPO uses. Rejection
sampling keeps those whose reward (or judge score) reaches ``warm_start.min_score``. Training is
next-token cross-entropy on model tokens only (mask 1: never on injected turns or tool results),
token-mean per batch, LoRA or full fine-tune per ``train.lora_rank``. The result is a merged HF
model that GRPO then starts from (its reference policy is that warm-started model).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from agemem.agent.episode import EpisodeEngine, EpisodeResult
from agemem.agent.policy import LLMChatPolicy
from agemem.agent.scripted import COMPACT, ScriptedChatPolicy, ScriptStyle, default_responses
from agemem.data.records import EpisodeScript
from agemem.reward.score import score_episode
from agemem.settings import Settings, WarmStartSettings
from agemem.train import checkpoint as ckpt
from agemem.train.local import load_train_episodes, trainable_policy
from agemem.train.models import load_tokenizer, model_card_lines, resolve_device
from agemem.train.run import WARM_START_REPORT as REPORT_FILE
from agemem.train.run import TrainResult, grpo_settings, warm_start_dir, warm_start_hash

logger = logging.getLogger(__name__)




@dataclass
class TeacherTrajectory:
    script: EpisodeScript
    result: EpisodeResult
    scores: dict[str, float]

    def value(self, metric: str) -> float:
        return float(self.scores["score"] if metric == "reward" else self.scores.get(metric, 0.0))

    @property
    def malformed(self) -> bool:
        """A teacher reply the engine could not parse, e.g. one cut by ``episode.max_turn_tokens``."""
        return self.result.stats.format_error_count > 0


@dataclass
class WarmStartReport:
    """What the warm start did: how many teacher trajectories it kept and how training went."""

    teacher: str
    episodes: int
    trajectories: int
    kept: int
    malformed: int
    keep_metric: str
    min_score: float
    mean_score_all: float
    mean_score_kept: float
    model_tokens: int
    epochs: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def teacher_style(cfg: WarmStartSettings) -> ScriptStyle:
    """How the scripted teacher writes under ``cfg``."""
    return replace(COMPACT, query_words=cfg.query_words) if cfg.style == "compact" else ScriptStyle()


def teacher_policy(settings: Settings, script: EpisodeScript, engine: EpisodeEngine) -> Any:
    """The chat-level teacher of one episode."""
    cfg = settings.warm_start
    if cfg.teacher == "scripted":
        return ScriptedChatPolicy(script, default_responses(script, teacher_style(cfg)))
    if engine.llm is None or engine.llm.offline:
        raise ValueError("warm_start.teacher=llm needs a real llm backend (llm.backend=dashscope|openai)")
    return LLMChatPolicy(engine.llm)


async def collect(settings: Settings, episodes: list[EpisodeScript], tokenizer: Any) -> list[TeacherTrajectory]:
    """Teacher trajectories of ``episodes`` (``warm_start.rollouts_per_episode`` each); failures are dropped."""
    engine = EpisodeEngine.from_settings(settings, tokenizer=tokenizer)
    gate = asyncio.Semaphore(settings.llm.concurrency)

    async def one(script: EpisodeScript) -> TeacherTrajectory:
        async with gate:
            result = await engine.run_teacher(script, teacher_policy(settings, script, engine))
        return TeacherTrajectory(script, result, score_episode(result, script))

    jobs = [s for s in episodes for _ in range(settings.warm_start.rollouts_per_episode)]
    try:
        done = await asyncio.gather(*(one(s) for s in jobs), return_exceptions=True)
    finally:
        await engine.aclose()
    out: list[TeacherTrajectory] = []
    for script, item in zip(jobs, done):
        if isinstance(item, Exception):
            logger.warning("teacher trajectory of %s failed and is dropped: %s: %s", script.episode_id,
                           type(item).__name__, item)
        elif isinstance(item, BaseException):
            raise item
        else:
            out.append(item)
    return out


def select(trajectories: list[TeacherTrajectory], settings: Settings) -> list[TeacherTrajectory]:
    """Rejection sampling: the well-formed trajectories whose keep_metric reaches min_score.

    A malformed teacher reply would be trained on as it stands (a tool call cut mid-JSON by the turn
    budget teaches exactly the format error the warm start is there to remove), whatever its reward.
    """
    cfg = settings.warm_start
    return [t for t in trajectories
            if not (cfg.drop_malformed and t.malformed) and t.value(cfg.keep_metric) >= cfg.min_score]


def _items(kept: list[TeacherTrajectory]) -> list[Any]:
    from agemem.train import grpo  # verl's core_algos: only when training

    items = [grpo.segment_item(seg.prompt_ids, seg.response_ids, seg.response_mask, advantage=1.0,
                               trajectory=t.result.episode_id, group=t.script.episode_id)
             for t in kept for seg in t.result.segments]
    return [it for it in items if it.num_tokens > 0]


def fit(model: Any, items: list[Any], settings: Settings, device: str) -> list[dict[str, float]]:
    """Cross-entropy on model tokens, token-mean per batch of ``warm_start.batch_segments`` segments."""
    import torch

    from agemem.train import grpo

    cfg = settings.warm_start
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    rng = random.Random(settings.train.seed)
    history: list[dict[str, float]] = []
    model.train()
    for epoch in range(cfg.epochs):
        order = list(items)
        rng.shuffle(order)
        losses, norms = [], []
        for start in range(0, len(order), cfg.batch_segments):
            batch = order[start : start + cfg.batch_segments]
            tokens = sum(it.num_tokens for it in batch)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for it in batch:
                loss = -grpo.token_log_probs(model, it, device=device).sum() / tokens
                loss.backward()
                total += float(loss.detach())
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, settings.train.grad_clip)))
            optimizer.step()
            losses.append(total)
        history.append({"epoch": float(epoch + 1), "sft/loss": statistics.fmean(losses),
                        "sft/grad_norm": statistics.fmean(norms), "sft/batches": float(len(losses))})
        logger.info("warm start epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, history[-1]["sft/loss"])
    return history


def _save(root: Path, policy: Any, settings: Settings, report: WarmStartReport) -> Path:
    model_dir = root / "model"
    tmp = root / ".tmp-model"
    tmp.mkdir(parents=True, exist_ok=True)
    if policy.lora:
        base = policy.model.get_base_model()
        base.save_pretrained(tmp, state_dict=ckpt.merged_state_dict(policy.model))
    else:
        policy.model.save_pretrained(tmp)
    policy.tokenizer.save_pretrained(tmp)
    lines = ["# agemem warm-start model", "", *model_card_lines(settings.train.model),
             f"- teacher: {report.teacher}; kept {report.kept} of {report.trajectories} trajectories "
             f"({report.keep_metric} >= {report.min_score}; {report.malformed} dropped as malformed)", "", "```json",
             json.dumps(asdict(report), indent=2), "```", ""]
    (tmp / "README.md").write_text("\n".join(lines))
    if model_dir.exists():
        import shutil

        shutil.rmtree(model_dir)
    tmp.rename(model_dir)
    (root / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2))
    return model_dir


def _save_report(root: Path, trained: Path, settings: Settings, report: WarmStartReport) -> Path:
    """verl's merged SFT model becomes ``root/model`` beside the report."""
    model_dir = root / "model"
    if model_dir.exists():
        import shutil

        shutil.rmtree(model_dir)
    Path(trained).rename(model_dir)
    (root / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2))
    return model_dir


def _result(settings: Settings, model_dir: Path, report: dict[str, Any]) -> TrainResult:
    return TrainResult(backend="local", checkpoint_dir=model_dir, model_dir=model_dir, adapter_dir=None,
                       steps=int(sum(e.get("sft/batches", 0) for e in report.get("epochs", []))),
                       history=list(report.get("epochs", [])), config_hash=warm_start_hash(settings))


def warm_start(settings: Settings, episodes_path: Path) -> TrainResult:
    """Teacher trajectories -> rejection sampling -> SFT -> a merged model (reused when it exists)."""
    import torch

    root = warm_start_dir(settings)
    model_dir = root / "model"
    if (model_dir / "config.json").is_file() and (root / REPORT_FILE).is_file():
        logger.info("warm start %s already trained; reusing it", model_dir)
        return _result(settings, model_dir, json.loads((root / REPORT_FILE).read_text()))
    started = time.perf_counter()
    # Every core by default: SFT is one forward/backward loop (2 threads: 21 s an epoch against 34 s on 2 cores).
    torch.set_num_threads(settings.warm_start.torch_threads or os.cpu_count() or 1)
    torch.manual_seed(settings.train.seed)
    device = resolve_device(settings.train.device)
    episodes = load_train_episodes(episodes_path)[: settings.warm_start.episodes]
    on_verl = settings.train.backend == "verl"
    # On GPUs verl's SFT trainer holds the model; teacher trajectories need only the policy's tokenizer.
    policy = None if on_verl else trainable_policy(settings, device, reference=False)
    tokenizer = load_tokenizer(settings) if policy is None else policy.tokenizer
    trajectories = asyncio.run(collect(settings, episodes, tokenizer))
    kept = select(trajectories, settings)
    cfg = settings.warm_start
    metric = [t.value(cfg.keep_metric) for t in trajectories]
    malformed = sum(t.malformed for t in trajectories) if cfg.drop_malformed else 0
    logger.info("warm start: kept %d of %d teacher trajectories (%s >= %s; %d dropped as malformed)", len(kept),
                len(trajectories), cfg.keep_metric, cfg.min_score, malformed)
    if trajectories and malformed == len(trajectories):
        raise RuntimeError(f"warm start kept no teacher trajectory: every one has a malformed reply (cut by "
                           f"episode.max_turn_tokens={settings.episode.max_turn_tokens}?); raise it, use "
                           "warm_start.style=compact, or keep them with warm_start.drop_malformed=false")
    if not kept:
        raise RuntimeError(f"warm start kept no teacher trajectory: none reached {cfg.keep_metric} >= "
                           f"{cfg.min_score} (best {max(metric, default=float('nan')):.3f}); lower "
                           "warm_start.min_score or use another teacher")
    items = _items(kept)
    history = [] if policy is None else fit(policy.model, items, settings, device)
    report = WarmStartReport(
        teacher=cfg.teacher if cfg.teacher == "llm" else f"scripted ({cfg.style})", episodes=len(episodes),
        trajectories=len(trajectories), kept=len(kept), malformed=malformed, keep_metric=cfg.keep_metric,
        min_score=cfg.min_score,
        mean_score_all=statistics.fmean(metric), mean_score_kept=statistics.fmean(t.value(cfg.keep_metric) for t in kept),
        model_tokens=sum(it.num_tokens for it in items), epochs=history, seconds=time.perf_counter() - started,
    )
    if policy is None:
        from agemem.train.verl.sft import train_sft_verl  # verl: only on GPU machines

        trained = train_sft_verl(settings, kept, root / "verl")
        model_dir = _save_report(root, trained, settings, report)
    else:
        model_dir = _save(root, policy, settings, report)
    logger.info("warm start: %d epochs on %d model tokens in %.1fs -> %s", cfg.epochs, report.model_tokens,
                report.seconds, model_dir)
    return _result(settings, model_dir, asdict(report))


def after_warm_start(settings: Settings, result: TrainResult) -> Settings:
    """GRPO's settings after ``result`` (a warm start of ``settings``): :func:`agemem.train.run.grpo_settings`."""
    grpo = grpo_settings(settings)
    assert result.model_dir is not None and Path(grpo.train.model) == result.model_dir, "another warm start's result"
    return grpo


__all__ = ["TeacherTrajectory", "WarmStartReport", "after_warm_start", "collect", "fit", "select",
           "teacher_policy", "warm_start"]
