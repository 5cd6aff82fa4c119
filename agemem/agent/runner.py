"""Building the episode engine and running one trajectory, without verl.

The local trainer, the engine-overhead benchmark and verl's agent loop
(:mod:`agemem.agent.verl_loop`) share these two functions. Nothing here imports verl, so the
local trainer and evaluation do not pay verl's import (several seconds of torch/tensordict
set-up) just to run episodes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable

if TYPE_CHECKING:
    from agemem.agent.episode import EpisodeEngine, EpisodeResult
    from agemem.data.records import EpisodeScript
    from agemem.memory.base import MemoryClient
    from agemem.settings import Settings

logger = logging.getLogger(__name__)

Closer = Callable[[], Awaitable[None]]


async def build_engine(
    settings: "Settings", *, tokenizer: Any, memory: "MemoryClient | None" = None
) -> tuple["EpisodeEngine", list[Closer]]:
    """The episode engine with the memory client (built from settings unless given), LLM and judge.

    Returns the engine and the coroutines that close what was built here (call them in order).
    """
    from agemem.agent.episode import EpisodeEngine
    from agemem.llm import build_llm_client
    from agemem.reward.judge import Judge

    closers: list[Closer] = []
    if memory is None:
        from agemem.memory.client import build_memory_client

        memory = build_memory_client(settings)
        closers.append(memory.aclose)
    llm = build_llm_client(settings, "llm")
    engine = EpisodeEngine(settings, tokenizer=tokenizer, memory=memory, llm=llm)
    # The judge embeds through the engine's per-text cache: GRPO siblings share the gold sentences
    # and mostly the same stored facts, so memory quality is embedded once per group, not per rollout.
    judge = Judge.from_settings(settings, encode=engine.embed.encode)
    engine.judge = judge
    closers.append(llm.aclose)
    if judge.client is not None and judge.client is not llm:
        closers.append(judge.client.aclose)
    return engine, closers


async def run_episode(
    engine: "EpisodeEngine",
    script: "EpisodeScript",
    policy: Any,
    *,
    trajectory_id: str,
    sampling_overrides: dict[str, Any] | None = None,
) -> "EpisodeResult":
    """One trajectory: its own memory session (deleted in ``finally``), the engine's token path.

    The same call path serves verl's loop (policy = verl's server manager) and the local trainer
    (policy = :class:`agemem.train.token_server.LocalTokenServer`).
    """
    session = await engine.memory.create_session() if engine.memory is not None else None
    try:
        return await engine.run_tokens(
            script, policy, request_id=trajectory_id, session=session, sampling_overrides=sampling_overrides
        )
    finally:
        if session is not None:
            try:
                await engine.memory.delete_session(session)
            except Exception as exc:  # a failed delete must not lose the finished rollout
                logger.warning("trajectory %s: could not delete memory session: %s", trajectory_id, exc)


__all__ = ["Closer", "build_engine", "run_episode"]
