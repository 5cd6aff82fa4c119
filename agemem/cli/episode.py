"""``agemem episode``: run one episode on the shipped sample and print the transcript and reward.

The player is the scripted agent unless ``--model`` (a checkpoint directory or ``models:/`` URI; the
endpoint's model name with ``--policy openai|dashscope``) or ``--policy-url`` names one; the model
is loaded by the loader evaluation uses (:func:`agemem.eval.policies.build_policy`, the ``eval``
section's policy keys).
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from agemem.agent.episode import EpisodeEngine, EpisodeResult
from agemem.agent.scripted import ScriptedTokenPolicy
from agemem.cli.common import JsonOpt, ProfileOpt, SetOpt, VerboseOpt, command, settings_from_cli, source_of
from agemem.data.episodes_io import read_episodes
from agemem.data.records import EpisodeScript
from agemem.data.samples import sample_episode
from agemem.eval.policies import PolicyHandle, build_policy
from agemem.reward.score import score_episode
from agemem.settings import Settings

logger = logging.getLogger(__name__)

# The scripted agent writes whole tool calls (its stage-1 reply is ~500 tokens); a smaller turn cap
# (the smoke profile's 24, sized for the tiny random model) would cut every call in half.
SCRIPTED_MIN_TURN_TOKENS = 1024


@command
def episode(
    index: Annotated[int, typer.Option("--index", "-i", help="Record (or episode) index to run.")] = 0,
    profile: ProfileOpt = None,
    sets: SetOpt = None,
    episodes: Annotated[
        Optional[Path], typer.Option("--episodes", help="episodes.jsonl to read instead of the shipped sample.")
    ] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="Who plays: a checkpoint directory or registry URI (models:/agemem-policy@candidate), or the "
                        "endpoint's model name with --policy openai|dashscope (default: the scripted agent).")
    ] = None,
    policy: Annotated[Optional[str], typer.Option(
        "--policy", help="checkpoint | openai | dashscope | scripted (default: checkpoint with --model, openai with "
                         "--policy-url, else scripted).")] = None,
    policy_url: Annotated[
        Optional[str], typer.Option("--policy-url", help="OpenAI-compatible endpoint for the policy (else scripted).")
    ] = None,
    policy_model: Annotated[str, typer.Option("--policy-model", help="Model name at --policy-url.")] = "default",
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run one three-stage episode and print its transcript and reward breakdown."""
    if policy is None:
        policy = "openai" if policy_url else "checkpoint" if model else "scripted"
    extra: dict[str, object] = {"eval.policy": policy, "eval.base_url": policy_url,
                                "eval.model": model if model is not None else policy_model if policy_url else None}
    if policy == "scripted" and source_of("episode.max_turn_tokens", profile, sets) in ("default", "profile"):
        extra["episode.max_turn_tokens"] = SCRIPTED_MIN_TURN_TOKENS
    settings = settings_from_cli(profile, sets, **extra)
    script = _load_script(settings, index, episodes)
    result, score, label = asyncio.run(_run(settings, script))
    if as_json:
        typer.echo(json.dumps({"policy": label, "stats": result.extra_fields(), "reward": score}, indent=2,
                              default=str))
        return
    typer.echo(result.transcript_text())
    typer.echo("\n=== episode ===")
    s = result.stats
    typer.echo(f"policy: {label}")
    typer.echo(f"question: {s.question}\ngold: {s.gold_answer}\nanswer: {s.final_answer}")
    typer.echo(f"judge: {s.judge_score:.3f} ({s.judge_source}) em={s.em:.0f} f1={s.f1:.3f} "
               f"memory_quality={s.memory_quality}")
    typer.echo(f"rounds: {s.rounds} tools: {s.tool_calls} format errors: {s.format_errors} "
               f"overflows: {s.overflow_count} segments: {len(result.segments)}")
    typer.echo(f"time: wall {s.wall_s:.2f}s, generation {s.generate_s:.2f}s, judge {s.judge_s:.2f}s, "
               f"engine {s.overhead_s:.2f}s")
    typer.echo("=== reward ({}) ===".format(s.reward_preset))
    for key, value in score.items():
        typer.echo(f"{key:>20}: {value:.4f}")


def _load_script(settings: Settings, index: int, episodes: Path | None) -> EpisodeScript:
    if episodes is not None:
        items = read_episodes(episodes)
        if not 0 <= index < len(items):
            raise ValueError(f"--index {index} out of range: {episodes} has {len(items)} episodes")
        return items[index]
    try:
        return sample_episode(settings, index)
    except IndexError as exc:
        raise ValueError(f"--index: {exc}") from exc


async def _run(settings: Settings, script: EpisodeScript) -> tuple[EpisodeResult, dict[str, float], str]:
    # The scripted token policy replays the script itself; every other player is evaluation's.
    handle = None if settings.eval.policy == "scripted" else build_policy(settings)
    engine = EpisodeEngine.from_settings(settings, tokenizer=handle.tokenizer if handle else None)
    try:
        if handle is None:
            result = await engine.run_tokens(script, ScriptedTokenPolicy(engine.tokenizer, script))
        else:
            logger.info("episode %s played by %s", script.episode_id, handle.label)
            result = await _play(engine, handle, script)
    finally:
        await engine.aclose()
        if handle is not None and handle.close is not None:
            await handle.close()
    return result, score_episode(result, script), handle.label if handle else "scripted"


async def _play(engine: EpisodeEngine, handle: PolicyHandle, script: EpisodeScript) -> EpisodeResult:
    policy = handle.for_script(script)
    if handle.mode == "tokens":
        return await engine.run_tokens(script, policy)
    return await engine.run_chat(script, policy)
