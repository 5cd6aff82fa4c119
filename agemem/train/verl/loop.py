"""verl agent loop: the three-stage AgeMem episode as a verl 0.9.1 ``AgentLoopBase``.

Token in, token out: the episode engine calls verl's server manager
(``server_manager.generate(request_id, prompt_ids=..., sampling_params=...)``) directly, so what is
trained is exactly what was sampled. The loop returns one ``AgentLoopOutput`` per engine segment
(a new segment whenever the context is rewritten); verl's v1 trainer gives every output the
trajectory's reward and broadcasts the trajectory's GRPO advantage to all of them.

Per trajectory the loop creates its own id and memory session and deletes the session in
``finally``. It never keys anything by ``uid``/``index``/``tools_kwargs``/``extra_info``: GRPO
siblings share all of those (even the same ``extra_info`` object), and the loop never mutates them.

verl instantiates the loop class once per trajectory, so the engine, memory client, LLM and judge
are built once per worker process and event loop and shared (:func:`worker_resources`).
Configuration comes from ``agemem.settings`` (``AGEMEM_*`` env propagated to Ray workers,
e.g. ``AGEMEM_MEMORY__SERVER_URL``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput

from agemem.agent.episode import EpisodeEngine, EpisodeResult
from agemem.settings import Settings, load_settings
from agemem.train.verl.rows import decode_script

logger = logging.getLogger(__name__)

# verl's sampling keys the engine forwards to the server manager (max_tokens stays the engine's per-turn cap).
_VERL_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "logprobs")


# A cache, not state: one engine (memory client, LLM, judge) per worker process and event loop.
_ENGINES: dict[int, tuple[Settings, EpisodeEngine]] = {}
_ENGINE_LOCKS: dict[int, asyncio.Lock] = {}


async def worker_resources(tokenizer: Any) -> tuple[Settings, EpisodeEngine]:
    """Settings and engine for this process's running event loop (built on first use)."""
    key = id(asyncio.get_running_loop())
    lock = _ENGINE_LOCKS.setdefault(key, asyncio.Lock())
    async with lock:
        if key not in _ENGINES:
            settings = load_settings()
            _ENGINES[key] = (settings, EpisodeEngine.from_settings(settings, tokenizer=tokenizer))
            logger.info("agent-loop worker resources ready (memory server %s)", settings.memory.server_url)
    return _ENGINES[key]


async def release_worker_resources() -> None:
    """Close the shared clients of the running event loop (tests, worker shutdown)."""
    key = id(asyncio.get_running_loop())
    entry = _ENGINES.pop(key, None)
    _ENGINE_LOCKS.pop(key, None)
    if entry is not None:
        await entry[1].aclose()


class StagedMemoryAgentLoop(AgentLoopBase):
    """AgeMem's staged memory episode as a verl agent loop (``agent_name: staged_memory_agent``)."""

    def __init__(self, *args: Any, tools: Any = None, **kwargs: Any) -> None:
        # verl passes its tool list too; memory tools run through the engine's own client instead.
        super().__init__(*args, **kwargs)
        self.prompt_length = int(self.rollout_config.prompt_length)
        self.response_length = int(self.rollout_config.response_length)

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> list[AgentLoopOutput]:
        script = decode_script(kwargs.get("extra_info"))
        settings, engine = await worker_resources(self.tokenizer)
        trajectory_id = f"{script.episode_id}-{uuid.uuid4().hex}"
        overrides = {k: sampling_params[k] for k in _VERL_SAMPLING_KEYS if k in sampling_params}
        result = await engine.run_tokens(script, self.server_manager, request_id=trajectory_id,
                                         sampling_overrides=overrides)
        return self.outputs(result, trajectory_id)

    def outputs(self, result: EpisodeResult, trajectory_id: str) -> list[AgentLoopOutput]:
        """One AgentLoopOutput per segment with at least one model token; stats on every output.

        Every output carries the trajectory's ``min_global_steps`` / ``max_global_steps`` (verl's
        V1 trainer turns them into TransferQueue tags and casts them to int) and ``truncated``
        (the segment was cut to verl's lengths; logged per step as ``rollout/truncated_segments``).
        """
        segments = [s for s in result.segments if sum(s.response_mask) > 0]
        stats = {**result.extra_fields(), **result.generation_fields}
        num_turns = len(result.transcript)
        outputs: list[AgentLoopOutput] = []
        for i, seg in enumerate(segments):
            prompt_ids, response_ids, mask, logprobs, truncated = self._fit(seg, trajectory_id, i)
            last = i == len(segments) - 1
            metrics = AgentLoopMetrics(
                generate_sequences=float(result.stats.generate_s) if last else 0.0,
                tool_calls=float(result.stats.overhead_s) if last else 0.0,
            )
            outputs.append(
                AgentLoopOutput(
                    prompt_ids=prompt_ids, response_ids=response_ids, response_mask=mask,
                    response_logprobs=logprobs, num_turns=num_turns, metrics=metrics,
                    extra_fields={**stats, "trajectory_id": trajectory_id, "segment_index": i,
                                  "num_segments": len(segments), "truncated": truncated},
                )
            )
        if not outputs:
            logger.warning("trajectory %s produced no model tokens", trajectory_id)
        return outputs

    def _fit(self, seg: Any, trajectory_id: str, i: int) -> tuple[list[int], list[int], list[int], Any, bool]:
        """A segment cut to verl's prompt and response lengths (never silently: warned and flagged)."""
        prompt_ids = list(seg.prompt_ids)
        truncated = False
        if len(prompt_ids) > self.prompt_length:
            logger.warning("trajectory %s segment %d: prompt of %d tokens > prompt_length %d, left-truncated",
                           trajectory_id, i, len(prompt_ids), self.prompt_length)
            prompt_ids, truncated = prompt_ids[-self.prompt_length:], True
        n = min(len(seg.response_ids), self.response_length)
        if n < len(seg.response_ids):
            logger.warning("trajectory %s segment %d: response of %d tokens > response_length %d, truncated "
                           "(leave train.max_response_length unset to derive it from the context budget)",
                           trajectory_id, i, len(seg.response_ids), self.response_length)
            truncated = True
        logprobs = list(seg.response_logprobs[:n]) if seg.response_logprobs else None
        return prompt_ids, list(seg.response_ids[:n]), list(seg.response_mask[:n]), logprobs, truncated
