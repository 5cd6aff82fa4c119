"""``agemem episode``: run one episode on the shipped sample and print the transcript and reward."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from agemem.cli_common import ProfileOpt, SetOpt, configure_logging, settings_from_cli

logger = logging.getLogger(__name__)

# The scripted agent writes whole tool calls (its stage-1 reply is ~500 tokens); a smaller turn cap
# (the smoke profile's 24, sized for the tiny random model) would cut every call in half.
SCRIPTED_MIN_TURN_TOKENS = 1024


def episode(
    index: Annotated[int, typer.Option("--index", "-i", help="Record (or episode) index to run.")] = 0,
    profile: ProfileOpt = None,
    sets: SetOpt = None,
    episodes: Annotated[
        Optional[Path], typer.Option("--episodes", help="episodes.jsonl to read instead of the shipped sample.")
    ] = None,
    policy_url: Annotated[
        Optional[str], typer.Option("--policy-url", help="OpenAI-compatible endpoint for the policy (else scripted).")
    ] = None,
    policy_model: Annotated[str, typer.Option("--policy-model", help="Model name at --policy-url.")] = "default",
    as_json: Annotated[bool, typer.Option("--json", help="Print the statistics and reward as JSON.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run one three-stage episode and print its transcript and reward breakdown."""
    configure_logging(verbose)
    settings = settings_from_cli(profile, sets)
    if policy_url is None and settings.episode.max_turn_tokens < SCRIPTED_MIN_TURN_TOKENS:
        if not any(s.startswith("episode.max_turn_tokens=") for s in sets or []):
            settings.episode.max_turn_tokens = SCRIPTED_MIN_TURN_TOKENS
    script = _load_script(settings, index, episodes)
    result, score = asyncio.run(_run(settings, script, policy_url, policy_model))
    if as_json:
        typer.echo(json.dumps({"stats": result.extra_fields(), "reward": score}, indent=2, default=str))
        return
    typer.echo(result.transcript_text())
    typer.echo("\n=== episode ===")
    s = result.stats
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


def _load_script(settings, index: int, episodes: Path | None):
    if episodes is not None:
        from agemem.data.episodes_io import read_episodes

        items = read_episodes(episodes)
        if not 0 <= index < len(items):
            raise typer.BadParameter(f"--index {index} out of range: {episodes} has {len(items)} episodes")
        return items[index]
    from agemem.agent.scripted import episode_from_raw
    from agemem.assets import SAMPLE_DATA

    records = json.loads(SAMPLE_DATA.read_text(encoding="utf-8"))
    if not 0 <= index < len(records):
        raise typer.BadParameter(f"--index {index} out of range: the sample has {len(records)} records")
    return episode_from_raw(records, index, distractors=settings.data.distractor_messages, seed=settings.data.seed)


def _memory_client(settings):
    try:
        from agemem.memory.client import build_memory_client
    except ImportError:  # pragma: no cover - the client module ships with the memory area
        from agemem.memory.service import MemoryService

        return MemoryService.from_settings(settings)
    return build_memory_client(settings)


async def _run(settings, script, policy_url: str | None, policy_model: str):
    from agemem.agent.context import ChatTokenizer
    from agemem.agent.episode import EpisodeEngine, LLMChatPolicy
    from agemem.agent.scripted import ScriptedTokenPolicy
    from agemem.llm import build_llm_client
    from agemem.reward.judge import Judge
    from agemem.reward.score import compute_score

    tokenizer = ChatTokenizer.from_path(settings.episode.tokenizer)
    memory = _memory_client(settings)
    llm = build_llm_client(settings, "llm")
    judge = Judge.from_settings(settings)
    engine = EpisodeEngine(settings, tokenizer=tokenizer, memory=memory, llm=llm, judge=judge)
    try:
        if policy_url:
            from agemem.llm import LLMClient, OpenAICompatibleBackend

            client = LLMClient(OpenAICompatibleBackend(policy_url, None), model=policy_model,
                               timeout_s=settings.llm.timeout_s, max_retries=settings.llm.max_retries)
            result = await engine.run_chat(script, LLMChatPolicy(client))
            await client.aclose()
        else:
            result = await engine.run_tokens(script, ScriptedTokenPolicy(tokenizer, script))
    finally:
        close = getattr(memory, "aclose", None)
        if close is not None:
            await close()
        elif hasattr(memory, "close"):
            memory.close()
        await llm.aclose()
    score = compute_score("hotpotqa", result.transcript_text(), script.gold_answer, result.extra_fields())
    return result, score
